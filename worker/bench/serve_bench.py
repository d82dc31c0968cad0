"""`elasticmoe bench serve` (being written)."""
DESCRIPTION = "Serving throughput of ElasticMoE vs transformers generate."


def add_arguments(parser):
    pass


def run(args):
    raise SystemExit("elasticmoe bench serve: not written yet")
