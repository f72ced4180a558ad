"""powercap nodeagent service."""
