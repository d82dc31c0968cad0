"""ElasticMoE serving plane: model families, engine, HTTP API, metrics.

Import name `elasticmoe_worker` (folder `worker/`). The operator (`elasticmoe_operator`)
must never import this package's torch-using modules.
"""

__version__ = "0.1.0"
