"""The Kubernetes path of provisioning: manifests for a whole deployment, and a provisioner that scales a
site's SuperNode StatefulSet to one replica when its window opens and to zero when it closes.

    docs = render_manifests(load_sites("deploy/kubernetes/sites.toml"), ClusterConfig(image="REGISTRY/pilot:TAG"))
    validate_manifests(docs, "1.31")             # offline, against the schemas kubernetes-validate ships
    write_manifests(docs, Path("deploy/kubernetes/rendered"))
    KubernetesProvisioner(sites, namespace="pilot").open_site("client_0")   # kubectl scale ... --replicas=1

What is rendered (namespace `pilot` by default; docs/provisioning.md has the commands):

    pilot-shared        PersistentVolumeClaim, ReadWriteMany: data, tokenizer and run directories, mounted at
                        the same path in every pod (a site trainer reads the shards the server names)
    pilot-redis         StatefulSet + Service: redis-server with its ACL file (one user per role) from Secret
                        pilot-redis-users
    pilot-superlink     Deployment + Service: the SuperLink (Fleet and Control API on 8000) and the ServerApp
                        that it runs (weights server on 8470)
    pilot-energy        Deployment: energy_simulation.py, publishing every site's curtailment to Redis
    pilot-provisioner   Deployment (+ ServiceAccount, Role to scale StatefulSets, ConfigMap of the sites):
                        `python -m pilot.provision kubernetes`, opening and closing sites with their windows
    pilot-site-NAME     StatefulSet (replicas 0 until the site's window opens) + headless Service: the site's
                        SuperNode with its nvidia.com/gpu request and node selector; its trainer runs in the pod

Secrets are never rendered: `pilot certs` makes them and `kubectl create secret` stores them (pilot-redis-users,
pilot-redis-ROLE per Redis role, pilot-tls, pilot-site-key-NAME). Each pod gets only its own role's Redis
password, as a file (least privilege, docs/deployment.md): the SuperLink's pod and the provisioner are `server`,
the energy simulation `energy`, a site's pod `site-NAME`. Without `secure`, the SuperLink and SuperNodes run --insecure (a test
cluster only).
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml

from pilot.provision.controller import (
    CLOSE_TIMEOUT_S,
    DRAIN_TIMEOUT_S,
    OPEN_TIMEOUT_S,
    ProvisionCancelled,
    ProvisionError,
)
from pilot.provision.sites import SiteSpec, check_sites, sites_toml
from pilot.site.process import drain_trainer

# ------------------------------------------------------------------ settings
SUPERLINK_PORT = 8000        # Flower 1.41: Fleet and Control API on one HTTP port
BLOB_PORT = 8470             # the ServerApp's weights server (run settings blob-host/blob-port/blob-url)
CLIENTAPPIO_PORT = 9094      # the SuperNode's runtime API (inside its pod)
HEALTH_PORT = 8081           # the SuperNode's gRPC health server (readiness probe)
REDIS_PORT = 6379
MOUNT = "/var/lib/pilot"     # the shared volume, at the same path in every pod
TLS_DIR = "/etc/pilot/tls"
SITE_KEY_DIR = "/etc/pilot/site-key"
SCENARIO_DIR = "/etc/pilot/scenario"
SITES_DIR = "/etc/pilot/sites"
REDIS_PASSWORD_DIR = "/etc/pilot/redis-password"   # the pod's own role's password (Secret pilot-redis-ROLE)
REDIS_USERS_DIR = "/etc/pilot/redis-users"         # redis-server's ACL file (Secret pilot-redis-users)
REDIS_IMAGE = "redis:7.2"
REDIS_GID = 999              # the redis user's group in the official image
KUBECTL_TIMEOUT_S = 30.0
POLL_S = 2.0
HEADER = ("# Rendered by `python -m pilot.provision render` from a sites file; edit that file (or the flags)\n"
          "# and render again rather than editing this one. Secrets are not here: see docs/provisioning.md.\n")


class PlainDumper(yaml.SafeDumper):
    """YAML without anchors and aliases (&id001 / *id001): each manifest reads on its own."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    """Multi-line strings (a ConfigMap's file) as literal blocks, readable as the file they are."""
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


PlainDumper.add_representer(str, _text)


class ManifestError(ValueError):
    """A manifest that does not validate: which file, which object, which field, what was wrong."""


@dataclass(frozen=True)
class ClusterConfig:
    namespace: str = "pilot"
    image: str = "pilot:latest"
    run_id: str = "default"
    secure: bool = True                 # TLS + SuperNode authentication (False: --insecure, test clusters)
    storage_class: str = ""             # of the shared ReadWriteMany volume ("" = the cluster's default)
    shared_storage: str = "100Gi"
    redis_storage: str = "2Gi"
    scenario: str | None = None         # an energy scenario file to ship (None: the packaged one)


# ------------------------------------------------------------------ names
def statefulset_name(site: SiteSpec) -> str:
    return f"pilot-site-{site.k8s_name}"


def site_key_secret(site: SiteSpec) -> str:
    return f"pilot-site-key-{site.k8s_name}"


def labels(component: str, **extra: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "pilot", "app.kubernetes.io/component": component, **extra}


def meta(name: str, cluster: ClusterConfig, component: str, **extra: str) -> dict[str, Any]:
    return {"name": name, "namespace": cluster.namespace, "labels": labels(component, **extra)}


# ------------------------------------------------------------------ pieces shared by the pods
def redis_role_secret(role: str) -> str:
    """The Secret holding a Redis role's password (`pilot certs`' redis-passwords/ROLE): a DNS-1123 name."""
    return "pilot-redis-" + role.lower().replace("_", "-")


def common_env(cluster: ClusterConfig, role: str) -> list[dict[str, Any]]:
    """Every Pilot container: the run, its Redis as its own role's user (the password read from the mounted
    Secret, never in the URL, the environment or a command line), the shared directories, Flower offline."""
    return [
        {"name": "PILOT_REDIS_URL", "value": f"redis://{role}@pilot-redis:{REDIS_PORT}/0"},
        {"name": "PILOT_REDIS_PASSWORD_FILE", "value": f"{REDIS_PASSWORD_DIR}/password"},
        {"name": "PILOT_RUN_ID", "value": cluster.run_id},
        {"name": "PILOT_HOME", "value": MOUNT},
        {"name": "NANOCHAT_BASE_DIR", "value": f"{MOUNT}/nanochat"},
        {"name": "FLWR_HOME", "value": f"{MOUNT}/flwr"},
        {"name": "FLWR_TELEMETRY_ENABLED", "value": "0"},
        {"name": "FLWR_DISABLE_UPDATE_CHECK", "value": "1"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def shared_volume() -> dict[str, Any]:
    return {"name": "shared", "persistentVolumeClaim": {"claimName": "pilot-shared"}}


def shared_mount() -> dict[str, Any]:
    return {"name": "shared", "mountPath": MOUNT}


def secret_volume(name: str, secret: str) -> dict[str, Any]:
    return {"name": name, "secret": {"secretName": secret, "defaultMode": 0o400}}


def redis_password_volume(role: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(volume, mount) of a role's Redis password file."""
    return (secret_volume("redis-password", redis_role_secret(role)),
            {"name": "redis-password", "mountPath": REDIS_PASSWORD_DIR, "readOnly": True})


# ------------------------------------------------------------------ the components
def namespace(cluster: ClusterConfig) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": cluster.namespace, "labels": labels("namespace")}}


def shared_claim(cluster: ClusterConfig) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"],
                            "resources": {"requests": {"storage": cluster.shared_storage}}}
    if cluster.storage_class:
        spec["storageClassName"] = cluster.storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta("pilot-shared", cluster, "storage"),
            "spec": spec}


def redis_manifests(cluster: ClusterConfig) -> list[dict[str, Any]]:
    select = labels("redis")
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta("pilot-redis", cluster, "redis"),
               "spec": {"selector": select, "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": REDIS_PORT}]}}
    # one user per role with only its own keys (`pilot certs`' redis-users.acl; Redis >= 7), the default user
    # the administrator's: no shared password
    container = {
        "name": "redis", "image": REDIS_IMAGE,
        "args": ["--aclfile", f"{REDIS_USERS_DIR}/users.acl", "--appendonly", "yes", "--dir", "/data"],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
        "readinessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 5},
        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}},
        "volumeMounts": [{"name": "data", "mountPath": "/data"},
                         {"name": "users", "mountPath": REDIS_USERS_DIR, "readOnly": True}],
    }
    statefulset = {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": meta("pilot-redis", cluster, "redis"),
        "spec": {"serviceName": "pilot-redis", "replicas": 1, "selector": {"matchLabels": select},
                 # the image's redis user (uid/gid 999) reads the ACL file through its group
                 "template": {"metadata": {"labels": select}, "spec": {
                     "containers": [container], "securityContext": {"fsGroup": REDIS_GID},
                     "volumes": [{"name": "users", "secret": {"secretName": "pilot-redis-users",
                                                              "defaultMode": 0o440}}]}},
                 "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {
                     "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": cluster.redis_storage}}}}]},
    }
    return [service, statefulset]


def superlink_manifests(cluster: ClusterConfig) -> list[dict[str, Any]]:
    """The SuperLink and the ServerApp it runs (Flower's subprocess isolation: same pod)."""
    select = labels("superlink")
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta("pilot-superlink", cluster, "superlink"),
               "spec": {"selector": select, "ports": [
                   {"name": "flower", "port": SUPERLINK_PORT, "targetPort": SUPERLINK_PORT},
                   {"name": "weights", "port": BLOB_PORT, "targetPort": BLOB_PORT}]}}
    args = ["--host", "0.0.0.0", "--port", str(SUPERLINK_PORT), "--disable-runtime-dependency-installation",
            "--database", f"{MOUNT}/superlink/state.db"]
    password_volume, password_mount = redis_password_volume("server")
    mounts, volumes = [shared_mount(), password_mount], [shared_volume(), password_volume]
    if cluster.secure:
        args += ["--ssl-ca-certfile", f"{TLS_DIR}/ca.crt", "--ssl-certfile", f"{TLS_DIR}/superlink.crt",
                 "--ssl-keyfile", f"{TLS_DIR}/superlink.key", "--enable-supernode-auth"]
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        volumes.append(secret_volume("tls", "pilot-tls"))
    else:
        args.insert(0, "--insecure")
    container = {
        "name": "superlink", "image": cluster.image,
        "command": ["sh", "-c", f'mkdir -p {MOUNT}/superlink && exec flower-superlink "$@"', "flower-superlink"],
        "args": args, "env": common_env(cluster, "server"),
        "ports": [{"name": "flower", "containerPort": SUPERLINK_PORT}, {"name": "weights", "containerPort": BLOB_PORT}],
        "readinessProbe": {"tcpSocket": {"port": SUPERLINK_PORT}, "periodSeconds": 5},
        "resources": {"requests": {"cpu": "2", "memory": "16Gi"}},   # the ServerApp holds global weights + eval
        "volumeMounts": mounts,
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("pilot-superlink", cluster, "superlink"),
        "spec": {"replicas": 1, "strategy": {"type": "Recreate"}, "selector": {"matchLabels": select},
                 "template": {"metadata": {"labels": select},
                              "spec": {"containers": [container], "volumes": volumes}}},
    }
    return [service, deployment]


def energy_manifests(cluster: ClusterConfig) -> list[dict[str, Any]]:
    select = labels("energy")
    args = ["energy_simulation.py",  # in the image's working directory, the project (Dockerfile)
            "--run-id", cluster.run_id, "--speedup", "1"]
    docs: list[dict[str, Any]] = []
    password_volume, password_mount = redis_password_volume("energy")
    mounts, volumes = [shared_mount(), password_mount], [shared_volume(), password_volume]
    if cluster.scenario:
        path = Path(cluster.scenario)
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("pilot-scenario", cluster, "energy"),
                     "data": {path.name: path.read_text()}})
        args += ["--scenario", f"{SCENARIO_DIR}/{path.name}"]
        mounts.append({"name": "scenario", "mountPath": SCENARIO_DIR, "readOnly": True})
        volumes.append({"name": "scenario", "configMap": {"name": "pilot-scenario"}})
    container = {"name": "energy", "image": cluster.image, "command": ["python"], "args": args,
                 "env": common_env(cluster, "energy"),
                 "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}, "volumeMounts": mounts}
    docs.append({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("pilot-energy", cluster, "energy"),
        "spec": {"replicas": 1, "strategy": {"type": "Recreate"}, "selector": {"matchLabels": select},
                 "template": {"metadata": {"labels": select},
                              "spec": {"containers": [container], "volumes": volumes}}},
    })
    return docs


def provisioner_manifests(sites: Sequence[SiteSpec], cluster: ClusterConfig) -> list[dict[str, Any]]:
    """The provisioning controller: follows the run's energy state in Redis and scales each site's
    StatefulSet (`python -m pilot.provision kubernetes`), with only the rights that takes."""
    select = labels("provisioner")
    password_volume, password_mount = redis_password_volume("server")
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta("pilot-provisioner", cluster, "provisioner")}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": meta("pilot-provisioner", cluster, "provisioner"),
            "rules": [{"apiGroups": ["apps"], "resources": ["statefulsets", "statefulsets/scale"],
                       "verbs": ["get", "list", "watch", "patch", "update"]},
                      {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": meta("pilot-provisioner", cluster, "provisioner"),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pilot-provisioner"},
               "subjects": [{"kind": "ServiceAccount", "name": "pilot-provisioner", "namespace": cluster.namespace}]}
    config = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta("pilot-sites", cluster, "provisioner"),
              "data": {"sites.toml": sites_toml(sites)}}
    container = {
        "name": "provisioner", "image": cluster.image, "command": ["python", "-m", "pilot.provision"],
        "args": ["kubernetes", "--sites", f"{SITES_DIR}/sites.toml", "--namespace", cluster.namespace,
                 "--run-id", cluster.run_id],
        "env": common_env(cluster, "server"),   # it acts for the server: reads the energy state, drains trainers
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
        "volumeMounts": [{"name": "sites", "mountPath": SITES_DIR, "readOnly": True}, password_mount],
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta("pilot-provisioner", cluster, "provisioner"),
        "spec": {"replicas": 1, "strategy": {"type": "Recreate"}, "selector": {"matchLabels": select},
                 "template": {"metadata": {"labels": select},
                              "spec": {"serviceAccountName": "pilot-provisioner", "containers": [container],
                                       "volumes": [{"name": "sites", "configMap": {"name": "pilot-sites"}},
                                                   password_volume]}}},
    }
    return [account, role, binding, config, deployment]


def site_manifests(site: SiteSpec, cluster: ClusterConfig) -> list[dict[str, Any]]:
    """A site: a StatefulSet of at most one SuperNode pod (0 replicas while its window is closed)."""
    name = statefulset_name(site)
    select = labels("supernode", **{"pilot/site": site.name})
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta(name, cluster, "supernode", **{"pilot/site": site.name}),
               "spec": {"clusterIP": "None", "selector": select,
                        "ports": [{"name": "health", "port": HEALTH_PORT, "targetPort": HEALTH_PORT}]}}
    args = ["--superlink", f"pilot-superlink:{SUPERLINK_PORT}", "--port", str(CLIENTAPPIO_PORT),
            "--health-server-address", f"0.0.0.0:{HEALTH_PORT}",
            "--node-config", f'name="{site.name}" partition-id={site.partition_id}']
    password_volume, password_mount = redis_password_volume(f"site-{site.name}")   # its ClientApp's and trainer's
    mounts, volumes = [shared_mount(), {"name": "dshm", "mountPath": "/dev/shm"}, password_mount], \
        [shared_volume(), {"name": "dshm", "emptyDir": {"medium": "Memory"}}, password_volume]   # NCCL: real /dev/shm
    if cluster.secure:
        args = ["--root-certificates", f"{TLS_DIR}/ca.crt", "--auth-supernode-private-key", f"{SITE_KEY_DIR}/key",
                *args]
        mounts += [{"name": "tls", "mountPath": TLS_DIR, "readOnly": True},
                   {"name": "site-key", "mountPath": SITE_KEY_DIR, "readOnly": True}]
        volumes += [{"name": "tls", "secret": {"secretName": "pilot-tls", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    secret_volume("site-key", site_key_secret(site))]
    else:
        args.insert(0, "--insecure")
    resources: dict[str, Any] = {"requests": {"cpu": "2", "memory": "8Gi"}}
    if site.gpus:
        resources["limits"] = {"nvidia.com/gpu": site.gpus}
    container = {
        "name": "supernode", "image": cluster.image, "command": ["flower-supernode"], "args": args,
        "env": common_env(cluster, f"site-{site.name}"),
        "ports": [{"name": "health", "containerPort": HEALTH_PORT}],
        "readinessProbe": {"grpc": {"port": HEALTH_PORT}, "periodSeconds": 5},
        "resources": resources, "volumeMounts": mounts,
    }
    pod: dict[str, Any] = {"containers": [container], "volumes": volumes,
                           # a closing site's trainer stops within one step and hands in its work first
                           "terminationGracePeriodSeconds": int(DRAIN_TIMEOUT_S)}
    if site.node_selector:
        pod["nodeSelector"] = dict(site.node_selector)
    if site.gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    statefulset = {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": meta(name, cluster, "supernode", **{"pilot/site": site.name}),
        "spec": {"serviceName": name, "replicas": 0, "podManagementPolicy": "Parallel",
                 "selector": {"matchLabels": select},
                 "template": {"metadata": {"labels": select}, "spec": pod}},
    }
    return [service, statefulset]


def render_manifests(sites: Sequence[SiteSpec], cluster: ClusterConfig) -> dict[str, list[dict[str, Any]]]:
    """Every manifest of the deployment, by file name (applied in name order)."""
    sites = check_sites(list(sites), "render")
    files = {"00-namespace.yaml": [namespace(cluster)], "10-storage.yaml": [shared_claim(cluster)],
             "20-redis.yaml": redis_manifests(cluster), "30-superlink.yaml": superlink_manifests(cluster),
             "40-energy.yaml": energy_manifests(cluster), "45-provisioner.yaml": provisioner_manifests(sites, cluster)}
    for site in sites:
        files[f"50-site-{site.k8s_name}.yaml"] = site_manifests(site, cluster)
    return files


# ------------------------------------------------------------------ files and validation
def write_manifests(files: dict[str, list[dict[str, Any]]], out_dir: Path) -> list[Path]:
    """Write one YAML file per component into `out_dir` (old rendered files there are replaced)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("[0-9][0-9]-*.yaml"):
        if stale.name not in files:
            stale.unlink()
    paths = []
    for name, docs in files.items():
        path = out_dir / name
        path.write_text(HEADER + yaml.dump_all(docs, Dumper=PlainDumper, sort_keys=False, width=120))
        paths.append(path)
    return paths


def read_manifests(path: Path) -> dict[str, list[dict[str, Any]]]:
    """The documents of a YAML file, or of every *.yaml / *.yml file in a directory, by file."""
    paths = sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
    if not paths:
        raise ManifestError(f"{path}: no YAML files")
    files = {}
    for p in paths:
        try:
            files[str(p)] = [d for d in yaml.safe_load_all(p.read_text()) if d]
        except yaml.YAMLError as error:
            raise ManifestError(f"{p}: not valid YAML: {error}") from None
    return files


def validate_manifests(files: dict[str, list[dict[str, Any]]], kubernetes_version: str = "1.31",
                       where: str = "") -> None:
    """Check every document against the Kubernetes JSON schemas of that version (strict: an unknown field
    is an error too), offline: the schemas ship inside the kubernetes-validate package."""
    import kubernetes_validate

    for name, docs in files.items():
        for doc in docs:
            what = f"{where or name}: {doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"
            try:
                kubernetes_validate.validate(doc, kubernetes_version, strict=True)
            except kubernetes_validate.ValidationError as error:
                field = ".".join(str(p) for p in error.path) or "(top level)"
                raise ManifestError(f"{what}: {field}: {error.message}") from None
            except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.VersionNotSupportedError) as error:
                raise ManifestError(f"{what}: {error.message}") from None
            except KeyError as error:
                raise ManifestError(f"{what}: missing {error}") from None


# ------------------------------------------------------------------ the provisioner
Runner = Callable[[list[str], float], subprocess.CompletedProcess]


def run_kubectl(command: list[str], timeout_s: float) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


class KubernetesProvisioner:
    """Opens a site by scaling its StatefulSet to 1 and waiting for its pod to be ready; closes it by
    letting its trainer hand in its work, then scaling to 0 and waiting for the pod to be gone. Every call
    is a `kubectl` command (kubeconfig or, inside the cluster, the pod's ServiceAccount)."""

    def __init__(self, sites: Sequence[SiteSpec], namespace: str = "pilot", *, kubectl: str = "kubectl",
                 kubeconfig: str | None = None, context: str | None = None, run_id: str = "",
                 redis_client: redis.Redis | None = None, poll_s: float = POLL_S, runner: Runner = run_kubectl):
        self.sites = {s.name: s for s in check_sites(list(sites), "KubernetesProvisioner")}
        self.namespace = namespace
        self.kubectl = [kubectl, *(["--kubeconfig", kubeconfig] if kubeconfig else []),
                        *(["--context", context] if context else [])]
        self.run_id, self.r = run_id, redis_client
        self.poll_s = poll_s
        self.runner = runner

    # -------------------------------------------------------------- the exact commands
    def base(self) -> list[str]:
        return [*self.kubectl, "--namespace", self.namespace, f"--request-timeout={int(KUBECTL_TIMEOUT_S)}s"]

    def scale_command(self, site: str, replicas: int) -> list[str]:
        return [*self.base(), "scale", f"statefulset/{statefulset_name(self.spec(site))}", f"--replicas={replicas}"]

    def status_command(self, site: str) -> list[str]:
        return [*self.base(), "get", f"statefulset/{statefulset_name(self.spec(site))}", "-o",
                "jsonpath={.spec.replicas} {.status.readyReplicas}"]

    def pods_command(self, site: str) -> list[str]:
        return [*self.base(), "get", "pods", "--selector", f"pilot/site={site}", "-o", "name"]

    # -------------------------------------------------------------- the interface
    def open_site(self, site: str, *, timeout_s: float = OPEN_TIMEOUT_S,
                  cancel: threading.Event | None = None) -> None:
        cancel = cancel or threading.Event()
        self._run(self.scale_command(site, 1))
        deadline = time.monotonic() + timeout_s
        while self.status(site) != "up":
            if cancel.is_set() or time.monotonic() > deadline:
                self._run(self.scale_command(site, 0))   # do not leave a half-started pod holding GPUs
                if cancel.is_set():
                    raise ProvisionCancelled(f"{site}: window closed while its pod was starting")
                raise ProvisionError(f"{site}: pod of {statefulset_name(self.spec(site))} not ready after "
                                     f"{timeout_s:.0f} s (kubectl describe pod to see why: GPUs, image, ...)")
            cancel.wait(self.poll_s)

    def close_site(self, site: str, *, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        if self.r is not None and self.run_id:
            drain_trainer(self.r, self.run_id, site, min(DRAIN_TIMEOUT_S, timeout_s / 2))
        self._run(self.scale_command(site, 0))
        deadline = time.monotonic() + timeout_s
        while self._run(self.pods_command(site)).strip():
            if time.monotonic() > deadline:
                raise ProvisionError(f"{site}: pod still there {timeout_s:.0f} s after scaling to 0")
            time.sleep(self.poll_s)

    def status(self, site: str) -> str:
        wanted, _, ready = self._run(self.status_command(site)).strip().partition(" ")
        if wanted in ("", "0"):
            return "down"
        return "up" if ready.strip() not in ("", "0") else "starting"

    # -------------------------------------------------------------- internals
    def spec(self, site: str) -> SiteSpec:
        if site not in self.sites:
            raise ProvisionError(f"unknown site {site!r}; known: {sorted(self.sites)}")
        return self.sites[site]

    def _run(self, command: list[str]) -> str:
        try:
            done = self.runner(command, KUBECTL_TIMEOUT_S + 5)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise ProvisionError(f"{' '.join(command)}: {error}") from None
        if done.returncode != 0:
            raise ProvisionError(f"{' '.join(command)}: exit {done.returncode}: "
                                 f"{(done.stderr or done.stdout).strip()[-400:]}")
        return done.stdout

