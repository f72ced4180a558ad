"""Test doubles: fakes at our own wrapper boundaries (the fake libnvidia-ml.so, the fake
Kubernetes API server; see each module)."""
