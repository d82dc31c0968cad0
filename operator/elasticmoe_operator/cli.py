"""`elasticmoe operator`: runs the kopf operator for ElasticMoE resources.

Reached from the `elasticmoe` command before anything imports torch. Logs are JSON lines
(one object per record) so cluster log pipelines can index them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from elasticmoe_operator import __version__


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="elasticmoe operator",
        description="The ElasticMoE Kubernetes operator (kopf): for each ElasticMoE resource it creates the "
                    "coordinator Deployment + Service, one worker Pod per device, a ConfigMap and a Secret (the "
                    "admin token and the worker secret), and scales by creating pods, waiting for their workers "
                    "to register and asking the coordinator to scale (or, down, by asking first and deleting "
                    "exactly the released pods). "
                    "Credentials: the pod's service account, else $KUBECONFIG / ~/.kube/config.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable; globs allowed); default: $POD_NAMESPACE, "
                            "else the whole cluster")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace")
    p.add_argument("--image", default=os.environ.get("ELASTICMOE_IMAGE", f"elasticmoe:{__version__}"),
                   help="image of coordinators and workers whose spec names none (default: $ELASTICMOE_IMAGE, "
                        "else %(default)s)")
    p.add_argument("--coordinator-url", default=None,
                   help="template of a coordinator's admin API URL, with {name} {namespace} {service} {port} "
                        "(default: http://{service}.{namespace}.svc:{port}; set it when the operator runs "
                        "outside the cluster)")
    p.add_argument("--standalone", action="store_true",
                   help="no peering with other operator replicas (run exactly one)")
    p.add_argument("--liveness", default=None, metavar="URL",
                   help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--listen", default=None, metavar="HOST:PORT",
                   help="serve POST /alerts (Alertmanager webhook: a firing SLO alert makes the Slo autoscaler "
                        "evaluate its instance at once) and GET /metrics (the operator's own metrics) here, e.g. "
                        "0.0.0.0:8081 (the chart's webhook port); default: not served")
    p.add_argument("--alerts-token-file", default=os.environ.get("ELASTICMOE_ALERTS_TOKEN_FILE"), metavar="PATH",
                   help="file holding the bearer token Alertmanager must send to POST /alerts (a mounted Secret; "
                        "re-read on every request). Default: $ELASTICMOE_ALERTS_TOKEN_FILE, else the token in "
                        "$ELASTICMOE_ALERTS_TOKEN; with neither, every notification is refused (401)")
    p.add_argument("--network-policy", default=None, metavar="JSON",
                   help="also create, for each ElasticMoE, a NetworkPolicy `<name>-ingress`: the instance's own "
                        "pods reach one another on every port (control channel, rendezvous, collectives) and "
                        "nothing else reaches them but the peers named here on the coordinator's http port "
                        "(OpenAI API, /admin, /metrics). JSON: {\"operator\": [...], \"prometheus\": [...], "
                        "\"apiClients\": [...]}, each a list of NetworkPolicyPeers (the chart writes it from "
                        "networkPolicy.*). Default: no NetworkPolicy")
    p.add_argument("--log-level", default=os.environ.get("ELASTICMOE_LOG_LEVEL", "info").lower(),
                   choices=["debug", "info", "warning", "error"],
                   help="logging verbosity (default: $ELASTICMOE_LOG_LEVEL, else info)")
    p.add_argument("--log-format", default="json", choices=["json", "text"], help="(default: %(default)s)")
    p.add_argument("--version", action="version", version=f"elasticmoe operator {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The whole command line is checked before logging is set up: a refused one changes nothing.
    if args.listen:
        from elasticmoe_operator import httpserver

        try:
            httpserver.parse_address(args.listen)
        except ValueError as exc:
            build_parser().error(str(exc))
    network_peers = None
    if args.network_policy is not None:
        from elasticmoe_operator import children

        try:
            network_peers = children.network_peers(args.network_policy)
        except ValueError as exc:
            build_parser().error(str(exc))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if args.log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), handlers=[handler], force=True)
    namespaces = args.namespace or ([os.environ["POD_NAMESPACE"]] if os.environ.get("POD_NAMESPACE")
                                    and not args.all_namespaces else [])
    return run(image=args.image, coordinator_url=args.coordinator_url,
               namespaces=namespaces, standalone=args.standalone, liveness=args.liveness, listen=args.listen,
               alerts_token_file=args.alerts_token_file, network_peers=network_peers)


def run(*, image: str, coordinator_url: str | None = None, namespaces: list[str] = (), standalone: bool = True,
        liveness: str | None = None, listen: str | None = None, alerts_token_file: str | None = None,
        network_peers=None) -> int:
    import kopf

    from elasticmoe_operator import handlers

    handlers.CONFIG.image = image
    handlers.CONFIG.network_peers = network_peers
    if coordinator_url:
        handlers.CONFIG.coordinator_url = coordinator_url
    handlers.CONFIG.listen = listen
    handlers.CONFIG.alerts_token_file = alerts_token_file
    handlers.CONFIG.alerts_token = os.environ.get("ELASTICMOE_ALERTS_TOKEN")
    log = logging.getLogger("elasticmoe.operator")
    log.info("operator %s starting: namespaces %s, default image %s", __version__,
             list(namespaces) or "all", image)
    try:
        asyncio.run(kopf.operator(standalone=standalone, clusterwide=not namespaces, namespaces=list(namespaces),
                                  liveness_endpoint=liveness))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
