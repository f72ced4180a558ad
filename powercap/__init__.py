"""powercap: GPU power capping for LLM inference on Kubernetes.

This package is the pure core: the policy model and its schema, the cluster view,
placement algorithms, budget allocation, the cap control law and the GPU physics model.
It never imports flask, gunicorn, pynvml or requests; only ``powercap.kube`` imports
``kubernetes`` (see tests/test_layering.py).
"""

__version__ = "0.1.0"

API_GROUP = "powercapping.example.com"
API_VERSION = "v1alpha1"
KIND = "PowerCappingPolicy"
PLURAL = "powercappingpolicies"
