"""powercap extender service."""
