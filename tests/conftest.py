"""Shared pytest fixtures: ``apiserver`` (a running fake Kubernetes API server)."""

pytest_plugins = ["fakes.apiserver"]
