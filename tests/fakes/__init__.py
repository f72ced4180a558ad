"""Test doubles: the fake Kubernetes API server and friends."""
