"""``powercap webhook`` and ``powercap certs``, registered through the ``powercap.commands``
entry-point group (pyproject.toml).

This module imports nothing heavy at the top: ``powercap --help`` loads every command's
``register`` function, and the metrics library must not be imported before the server has
chosen its multiprocess directory (``PROMETHEUS_MULTIPROC_DIR`` is read at import time).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from powercap.runtime.cliargs import add_log_level_argument, bind_address, dns_label, positive_int

EXIT_CONFIG_ERROR = 2
DEFAULT_BIND = "0.0.0.0:8443"
# Two single-threaded Python processes use both cores of a small node; four threads each
# overlap the little I/O there is. See docs/benchmarks.md.
DEFAULT_WORKERS = 2
DEFAULT_THREADS = 4
DEFAULT_SERVING_DAYS = 365
DEFAULT_CA_DAYS = 3650
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def register_webhook(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "webhook",
        help="serve the admission webhook (validate and default policies)",
        description="Serve POST /validate and POST /mutate (AdmissionReview admission.k8s.io/v1), "
        "/healthz, /readyz and /metrics over HTTPS (TLS >= 1.2). The certificate is read from "
        "CERT_DIR/tls.crt and CERT_DIR/tls.key and reloaded when the files change.",
    )
    parser.add_argument("--cert-dir", required=True, type=Path, help="directory holding tls.crt and tls.key")
    parser.add_argument("--bind", default=DEFAULT_BIND, type=bind_address, metavar="HOST:PORT", help="address to listen on (default %(default)s)")
    parser.add_argument("--workers", type=positive_int, default=DEFAULT_WORKERS, metavar="N", help="worker processes (default %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=DEFAULT_THREADS, metavar="N", help="threads per worker (default %(default)s)")
    parser.add_argument(
        "--no-cross-policy-checks", dest="cross_policy_checks", action="store_false",
        help="do not read other policies from the Kubernetes API (no overlap or shared-rack checks)",
    )
    parser.add_argument(
        "--client-ca-file", type=Path, metavar="FILE",
        help="PEM CA certificate(s): /validate and /mutate then answer only clients presenting a certificate "
        "it signed (kube-apiserver, through its AdmissionConfiguration kubeconfig); probes and /metrics "
        "stay open. Default: no client certificates asked for",
    )
    parser.add_argument("--metrics-dir", metavar="DIR", help=f"prometheus multiprocess directory (default ${METRICS_DIR_ENV} or a new temporary directory)")
    add_log_level_argument(parser)
    parser.set_defaults(func=run_webhook)


def register_certs(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "certs",
        help="make the webhook's CA and serving certificate",
        description="Write ca.crt, ca.key, tls.crt and tls.key to OUT (keys mode 0600) and print the "
        "base64 caBundle for the webhook configurations on stdout. An existing CA in OUT is kept and "
        "only the serving certificate is renewed.",
    )
    parser.add_argument("--service", required=True, type=dns_label, help="name of the webhook's Service")
    parser.add_argument("--namespace", required=True, type=dns_label, help="namespace of the webhook's Service")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    parser.add_argument("--days", type=_validity_days, default=DEFAULT_SERVING_DAYS, help="serving certificate validity (default %(default)s)")
    parser.add_argument("--ca-days", type=_validity_days, default=DEFAULT_CA_DAYS, help="validity of a new CA (default %(default)s)")
    parser.add_argument("--extra-san", action="append", default=[], type=subject_alt_name, metavar="SAN",
                        help="another DNS name or IP address (repeatable)")
    parser.set_defaults(func=run_certs)


def subject_alt_name(text: str) -> str:
    """argparse ``type=`` of --extra-san: an IP address or a DNS name (``*.`` allowed first)."""
    import ipaddress

    from powercap.policies import is_dns1123_subdomain

    try:
        ipaddress.ip_address(text)
        return text
    except ValueError:
        pass
    if not is_dns1123_subdomain(text.removeprefix("*.")):
        raise argparse.ArgumentTypeError(f"{text!r} is neither an IP address nor a DNS name")
    return text


MAX_VALIDITY_DAYS = 36500  # 100 years; X.509 dates end in 9999


def _validity_days(text: str) -> int:
    value = positive_int(text)
    if value > MAX_VALIDITY_DAYS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_VALIDITY_DAYS} days, not {value}")
    return value


def run_certs(args: argparse.Namespace) -> int:
    from webhook import certs

    try:
        issued = certs.issue(
            args.out, args.service, args.namespace,
            serving_days=args.days, ca_days=args.ca_days, extra_sans=tuple(args.extra_san),
        )
    except (certs.CertificateError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    names = ", ".join(certs.san_names(issued.serving_certificate))
    print(
        f"{'created' if issued.ca_created else 'kept'} CA {args.out / certs.CA_CERT} "
        f"(valid until {issued.ca_certificate.not_valid_after_utc:%Y-%m-%d})\n"
        f"wrote {args.out / certs.TLS_CERT} for {names} (valid until "
        f"{issued.serving_certificate.not_valid_after_utc:%Y-%m-%d})\n"
        "caBundle for the webhook configurations on stdout",
        file=sys.stderr,
    )
    print(issued.ca_bundle)
    return 0


def prepare_metrics_dir(requested: str | None) -> str:
    """Choose and empty the prometheus multiprocess directory, and export it for the workers.

    prometheus_client picks its value class (per process, or shared through this directory)
    when it is first imported, and ``powercap``'s other commands import it while the
    parser is built: pick again now that the directory is set, before any webhook metric
    exists, or each gunicorn worker would count only its own requests.
    """
    directory = requested or os.environ.get(METRICS_DIR_ENV) or tempfile.mkdtemp(prefix="powercap-webhook-metrics-")
    Path(directory).mkdir(parents=True, exist_ok=True)
    for stale in Path(directory).glob("*.db"):
        stale.unlink()
    os.environ[METRICS_DIR_ENV] = directory
    values = sys.modules.get("prometheus_client.values")
    if values is not None:
        values.ValueClass = values.get_value_class()  # type: ignore[attr-defined]
    return directory


def run_webhook(args: argparse.Namespace) -> int:
    metrics_dir = prepare_metrics_dir(args.metrics_dir)
    from webhook import wiring
    from webhook.server import ServerOptions, WebhookServer, new_server_context

    options = ServerOptions(
        cert_dir=args.cert_dir, bind=args.bind, workers=args.workers, threads=args.threads,
        metrics_dir=metrics_dir, log_level=args.log_level, client_ca_file=args.client_ca_file,
    )
    try:
        new_server_context(options.cert_file, options.key_file, options.client_ca_file)
        connect = wiring.kubernetes_policies if args.cross_policy_checks else None
        if connect is not None:
            wiring.check_kubernetes_configuration()
    except (OSError, ValueError, wiring.ConfigurationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    factory = wiring.app_factory(connect, metrics_dir, require_client_certificate=options.client_ca_file is not None)
    WebhookServer(options, factory).run()
    return 0
