"""ElasticMoE control plane (import name `elasticmoe_operator`, folder `operator/`).

Never imports torch: the operator image and its tests stay light.
"""

__version__ = "0.1.0"
