"""powercap: GPU power capping for LLM inference on Kubernetes.

The modules directly in this package are the pure core: the policy model and its schema,
the cluster view, placement algorithms, budget allocation, the cap control law and the
GPU physics model. Beside them: ``powercap.kube`` (the Kubernetes client),
``powercap.runtime`` (what the programs share), ``powercap.simulation`` and
``powercap.commands``. The layers are import-linter contracts (.importlinter).
"""

__version__ = "0.1.0"

API_GROUP = "powercapping.example.com"
API_VERSION = "v1alpha1"
KIND = "PowerCappingPolicy"
PLURAL = "powercappingpolicies"
