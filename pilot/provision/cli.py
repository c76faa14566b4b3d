"""`pilot provision` (python -m pilot.provision): bring sites up and down with a run's windows, locally or on
Kubernetes; render and validate the Kubernetes manifests. docs/provisioning.md has every command."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis

from pilot import coordination
from pilot.provision.controller import (
    BACKOFF_BASE_S,
    OPEN_TIMEOUT_S,
    ProvisionController,
    ProvisionError,
    RetryPolicy,
    follow_energy,
)
from pilot.provision.local import LocalProvisioner
from pilot.provision.sites import SiteSpecError, assign_gpu_sets, parse_sites


# ------------------------------------------------------------------ CLI
def print_event(kind: str, fields: dict[str, Any]) -> None:
    print(f"[provision {time.strftime('%H:%M:%S')}] {kind} " + " ".join(f"{k}={v}" for k, v in fields.items()),
          flush=True)


def follow_until_done(controller: ProvisionController, client: redis.Redis, run_id: str,
                      exit_when_finished: bool) -> bool:
    """Drive `controller` from the run's energy state until SIGTERM / Ctrl-C (or, with `exit_when_finished`,
    until the energy simulation has finished); then close every site. True if all went down."""
    from pilot.energy.events import EnergyEvents

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    follower = threading.Thread(target=follow_energy, args=(controller, client, run_id, stop), daemon=True)
    follower.start()
    events = EnergyEvents(client, run_id)
    finished_said = False
    try:
        while not stop.wait(1.0):
            clock = events.clock()
            if clock is not None and clock.status == "finished" and not finished_said:
                finished_said = True
                print("the energy simulation finished: every window is closed", flush=True)
                if exit_when_finished:
                    break
    except KeyboardInterrupt:
        pass
    stop.set()
    follower.join(timeout=5)
    return controller.close()


def cmd_local(args: argparse.Namespace) -> int:
    sites = assign_gpu_sets(parse_sites(args.sites), args.first_gpu)
    if args.insecure == bool(args.root_certificates):
        raise SiteSpecError("give either --root-certificates (TLS) or --insecure (local development only)")
    if args.insecure:
        print("WARNING: --insecure: SuperNodes connect WITHOUT TLS or authentication; local development only",
              file=sys.stderr)
    run_dir = Path(args.run_dir) if args.run_dir else coordination.default_run_dir(args.run_id)
    client = coordination.connect(args.redis_url or None, run_dir=run_dir, wait=True)
    provisioner = LocalProvisioner(sites, args.superlink, log_dir=run_dir / "provision", run_id=args.run_id,
                                   redis_client=client, startup_delay_s=args.startup_delay,
                                   root_certificates=args.root_certificates, auth_key_dir=args.auth_key_dir)
    policy = RetryPolicy(open_timeout_s=args.open_timeout, backoff_base_s=args.backoff)
    controller = ProvisionController(provisioner, [s.name for s in sites], on_event=print_event, policy=policy)
    for site in sites:
        print(f"site {site.name}: partition {site.partition_id}, CUDA_VISIBLE_DEVICES="
              f"{','.join(map(str, site.gpu_ids)) or '(none: CPU)'}, log {run_dir / 'provision'}/{site.name}.*")
    done = follow_until_done(controller, client, args.run_id, exit_when_finished=True)
    provisioner.close()   # whatever a failed close left behind
    coordination.release(client, run_dir)
    return 0 if done else 1


def cmd_kubernetes(args: argparse.Namespace) -> int:
    from pilot.provision import kubernetes as k8s
    sites = parse_sites(args.sites)
    client = coordination.connect(args.redis_url or None, run_dir=args.run_dir, wait=True)
    provisioner = k8s.KubernetesProvisioner(sites, args.namespace, kubeconfig=args.kubeconfig, context=args.context,
                                            run_id=args.run_id, redis_client=client)
    policy = RetryPolicy(open_timeout_s=args.open_timeout, backoff_base_s=args.backoff)
    controller = ProvisionController(provisioner, [s.name for s in sites], on_event=print_event, policy=policy)
    print(f"scaling {', '.join(k8s.statefulset_name(s) for s in sites)} in namespace {args.namespace} with the "
          f"energy state of run {args.run_id}", flush=True)
    done = follow_until_done(controller, client, args.run_id, exit_when_finished=args.exit_when_finished)
    return 0 if done else 1


def cmd_render(args: argparse.Namespace) -> int:
    from pilot.provision import kubernetes as k8s
    cluster = k8s.ClusterConfig(namespace=args.namespace, image=args.image, run_id=args.run_id,
                                secure=not args.insecure, storage_class=args.storage_class,
                                shared_storage=args.shared_storage, scenario=args.scenario)
    docs = k8s.render_manifests(parse_sites(args.sites), cluster)
    try:
        k8s.validate_manifests(docs, args.kubernetes_version)
    except ModuleNotFoundError:
        print("warning: not validated (pip install kubernetes-validate, or the dev extra)", file=sys.stderr)
    for path in k8s.write_manifests(docs, Path(args.out)):
        print(path)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from pilot.provision import kubernetes as k8s
    count = 0
    for path in args.paths:
        files = k8s.read_manifests(Path(path))
        k8s.validate_manifests(files, args.kubernetes_version)
        count += sum(len(docs) for docs in files.values())
    print(f"{count} manifests valid against the Kubernetes {args.kubernetes_version} schemas")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pilot.provision", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sites_help = ("sites: NAME[:GPUS],... (e.g. client_0:2,client_1:2,client_2:2) or a TOML file of [[sites]] "
                  "tables (keys: name, gpus, gpu_ids, node_selector, partition_id)")

    p = sub.add_parser("local", help="run SuperNodes on this host, opened and closed with the run's energy state")
    p.add_argument("--sites", required=True, help=sites_help)
    p.add_argument("--superlink", default="127.0.0.1:8000", help="SuperLink Fleet API address HOST:PORT")
    p.add_argument("--run-id", default=os.environ.get("PILOT_RUN_ID", "default"),
                   help="run whose energy state opens and closes the sites")
    p.add_argument("--run-dir", default=None, help="run directory (default: the run's under $PILOT_HOME/runs)")
    p.add_argument("--redis-url", default=None,
                   help=f"Redis of the run (default: ${coordination.REDIS_URL_ENV}, else the run's embedded server)")
    p.add_argument("--first-gpu", type=int, default=0, help="first GPU index given out to sites without gpu_ids")
    p.add_argument("--startup-delay", type=float, default=0.0,
                   help="seconds before a site's SuperNode starts, to model a real machine's provisioning")
    p.add_argument("--open-timeout", type=float, default=OPEN_TIMEOUT_S,
                   help="seconds a SuperNode may take to connect before the open counts as failed")
    p.add_argument("--backoff", type=float, default=BACKOFF_BASE_S, help="first retry delay after a failure (s)")
    p.add_argument("--root-certificates", default=None, help="CA certificate of the SuperLink (TLS), e.g. certs/ca.crt")
    p.add_argument("--auth-key-dir", default=None,
                   help="directory of the sites' private keys (file = site name), e.g. certs/sites")
    p.add_argument("--insecure", action="store_true", help="no TLS, no authentication: local development only")
    p.set_defaults(func=cmd_local)

    p = sub.add_parser("kubernetes", help="scale the sites' SuperNode StatefulSets with the run's energy state "
                                          "(kubectl: kubeconfig, or the pod's ServiceAccount in the cluster)")
    p.add_argument("--sites", required=True, help=sites_help)
    p.add_argument("--namespace", default="pilot")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: kubectl's own choice)")
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument("--run-id", default=os.environ.get("PILOT_RUN_ID", "default"),
                   help="run whose energy state opens and closes the sites")
    p.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--redis-url", default=None,
                   help=f"Redis of the run (default: ${coordination.REDIS_URL_ENV})")
    p.add_argument("--open-timeout", type=float, default=OPEN_TIMEOUT_S,
                   help="seconds a site's pod may take to be ready (image pull, GPU node scale-up)")
    p.add_argument("--backoff", type=float, default=BACKOFF_BASE_S, help="first retry delay after a failure (s)")
    p.add_argument("--exit-when-finished", action="store_true",
                   help="exit once the energy simulation has finished (default: keep running, as a Deployment)")
    p.set_defaults(func=cmd_kubernetes)

    p = sub.add_parser("render", help="render the Kubernetes manifests of a deployment (validated before written)")
    p.add_argument("--sites", required=True, help=sites_help)
    p.add_argument("--out", required=True, help="directory for the manifests (one YAML file per component)")
    p.add_argument("--namespace", default="pilot")
    p.add_argument("--image", default="pilot:latest", help="container image with this project installed")
    p.add_argument("--run-id", default="default")
    p.add_argument("--storage-class", default="", help="storage class of the shared ReadWriteMany volume")
    p.add_argument("--shared-storage", default="100Gi", help="size of the shared volume (data, runs)")
    p.add_argument("--scenario", default=None, help="energy scenario TOML to ship in a ConfigMap (default: the "
                                                    "packaged scenario)")
    p.add_argument("--insecure", action="store_true", help="no TLS, no SuperNode authentication (not for clusters)")
    p.add_argument("--kubernetes-version", default="1.31", help="Kubernetes version whose schemas validate")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("validate", help="validate manifests (files or directories) against the Kubernetes schemas")
    p.add_argument("paths", nargs="+")
    p.add_argument("--kubernetes-version", default="1.31")
    p.set_defaults(func=cmd_validate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SiteSpecError, ProvisionError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
