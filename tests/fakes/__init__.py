"""Test doubles: fakes at our own wrapper boundaries (see each module)."""
