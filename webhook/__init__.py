"""powercap webhook service."""
