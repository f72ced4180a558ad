"""``powercap check-scheduler-version``: refuse a kube-scheduler the version skew policy does
not support (:mod:`powercap.versionskew`).

It runs as the power-aware-scheduler pod's init container: it reads the image of that pod's
``kube-scheduler`` container and the API server's ``/version``, and exits 1 with one log
line naming both and the image to run instead, so the pod stays in ``Init:Error`` rather
than scheduling with an unsupported kube-scheduler. ``--image`` checks an image without
reading a pod (for any other install). Exit status: 0 supported (or an image whose tag
names no version, logged), 1 refused, 2 no cluster or no such pod or container.
"""

from __future__ import annotations

import argparse
import logging
import os

from powercap import kube
from powercap.runtime.cliargs import add_log_level_argument
from powercap.runtime.logs import configure_logging
from powercap.versionskew import image_tag, parse_version, skew_refusal

EXIT_REFUSED = 1
EXIT_USAGE = 2
SCHEDULER_CONTAINER = "kube-scheduler"
log = logging.getLogger("check-scheduler-version")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check-scheduler-version",
        help="refuse a kube-scheduler image the Kubernetes version skew policy does not support",
        description="Compare the kube-scheduler image's version with the API server's (/version): "
        "kube-scheduler may be as new as the API server or one minor version older. Exit 1 when it is not.",
    )
    parser.add_argument("--image", help="the kube-scheduler image to check (default: read it from --pod)")
    parser.add_argument("--pod", default=os.environ.get("POD_NAME"), metavar="NAME",
                        help="the pod whose container --container runs kube-scheduler (default: $POD_NAME)")
    parser.add_argument("--namespace", default=os.environ.get("POD_NAMESPACE"), metavar="NAMESPACE",
                        help="that pod's namespace (default: $POD_NAMESPACE)")
    parser.add_argument("--container", default=SCHEDULER_CONTAINER, metavar="NAME",
                        help=f"the container running kube-scheduler (default {SCHEDULER_CONTAINER})")
    add_log_level_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    if args.image is None and not (args.pod and args.namespace):
        log.error("give --image, or --pod and --namespace (or $POD_NAME and $POD_NAMESPACE) to read it from")
        return EXIT_USAGE
    try:
        client = kube.KubeClient.from_environment()
    except kube.KubeConfigError as error:
        log.error("cannot reach the API server: %s", error)
        return EXIT_USAGE
    try:
        image = args.image or scheduler_image(client, args.namespace, args.pod, args.container)
        server_version = str(client.get("/version").get("gitVersion", ""))
    except LookupError as error:
        log.error("%s", error)
        return EXIT_USAGE
    except kube.ApiError as error:
        log.error("cannot read the versions to compare: %s", error)
        return EXIT_USAGE
    finally:
        client.close()
    return check(image, server_version)


def scheduler_image(client: kube.KubeClient, namespace: str, pod_name: str, container_name: str) -> str:
    try:
        pod = client.get(kube.pod_path(namespace, pod_name))
    except kube.NotFound:
        raise LookupError(f"pod {namespace}/{pod_name} not found") from None
    for container in pod.get("spec", {}).get("containers", []):
        if container.get("name") == container_name:
            return str(container.get("image", ""))
    raise LookupError(f"pod {namespace}/{pod_name} has no container {container_name!r}")


def check(image: str, server_version: str) -> int:
    fields = {"image": image, "api_server_version": server_version}
    tag = image_tag(image)
    scheduler = parse_version(tag) if tag else None
    api_server = parse_version(server_version)
    if scheduler is None or api_server is None:
        log.warning("cannot tell the kube-scheduler version from image %s (tag %s) against API server %r; not checked",
                    image, tag or "none", server_version, extra=fields)
        return 0
    refusal = skew_refusal(api_server, scheduler, image)
    if refusal is not None:
        log.error("%s", refusal, extra=fields)
        return EXIT_REFUSED
    log.info("kube-scheduler %s is supported with the API server %s", scheduler, api_server, extra=fields)
    return 0
