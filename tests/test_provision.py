"""Elastic site provisioning (pilot/provision/).

Pure policy without processes; the local provisioner with a real flower-superlink, real flower-supernode
processes, a real energy_simulation.py on a scripted MOER trace and a real site trainer, checked by PID
for orphans; failures (a SuperNode that exits at once, one that never connects, kubectl that cannot reach
its API server) retried with back-off and reported; the Kubernetes manifests validated offline against
the Kubernetes JSON schemas."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest
import yaml

from nanochat.trainer import TrainConfig
from pilot import protocol, settings
from pilot.coordination import free_port
from pilot.energy.events import EnergyEvents
from pilot.provision import cli as provision_cli
from pilot.provision import kubernetes as k8s
from pilot.provision import run as provision_run
from pilot.provision import sites as provision_sites
from pilot.provision.controller import (
    CHECK,
    CLOSE,
    CLOSING,
    DOWN,
    OPEN,
    OPENING,
    UP,
    ProvisionController,
    ProvisionError,
    RetryPolicy,
    backoff_delay,
    next_action,
)
from pilot.provision.local import LocalProvisioner
from pilot.provision.sites import SiteSpec, SiteSpecError, assign_gpu_sets, parse_sites
from pilot.site.process import LAUNCHER, family, is_trainer_of, stop_processes, trainer_command
from tests.conftest import PROJECT_ROOT, VENV_BIN, subprocess_env

SITES_FILE = PROJECT_ROOT / "deploy" / "kubernetes" / "sites.toml"
RENDERED = PROJECT_ROOT / "deploy" / "kubernetes" / "rendered"


def start_provisioning(run_config: dict, *args, **kwargs):
    """The server's call, from a run config as Flower gives it."""
    loaded = settings.load(run_config)
    return provision_run.start_provisioning(loaded.provision, loaded.rounds.curtailment, *args, **kwargs)


def gone(pid: int) -> bool:
    """Not running. A zombie counts as gone: it holds nothing, and this sandbox's init does not reap."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Recorder:
    """The controller's event sink: (monotonic time, kind, fields)."""

    def __init__(self):
        self.events: list[tuple[float, str, dict]] = []
        self.lock = threading.Lock()

    def __call__(self, kind: str, fields: dict) -> None:
        with self.lock:
            self.events.append((time.monotonic(), kind, dict(fields)))

    def of(self, kind: str, site: str | None = None) -> list[tuple[float, dict]]:
        with self.lock:
            return [(t, f) for t, k, f in self.events if k == kind and (site is None or f.get("site") == site)]


# ------------------------------------------------------------------ pure policy
def test_backoff_doubles_from_the_base_up_to_the_cap():
    assert backoff_delay(0, 2.0, 50.0) == 0.0
    assert [backoff_delay(n, 2.0, 50.0) for n in range(1, 7)] == [2.0, 4.0, 8.0, 16.0, 32.0, 50.0]
    assert backoff_delay(10_000, 2.0, 50.0) == 50.0


def test_next_action_from_desired_and_actual_state():
    now = 100.0
    assert next_action(True, DOWN, now, retry_at=0, check_at=0) == OPEN
    assert next_action(False, UP, now, retry_at=0, check_at=0) == CLOSE
    assert next_action(True, UP, now, retry_at=0, check_at=now + 1) is None       # up, checked recently
    assert next_action(True, UP, now, retry_at=0, check_at=now - 1) == CHECK
    assert next_action(True, DOWN, now, retry_at=now + 5, check_at=0) is None     # waits out its back-off
    assert next_action(False, UP, now, retry_at=now + 5, check_at=0) is None
    assert next_action(False, OPENING, now, retry_at=0, check_at=0) is None       # one operation at a time
    assert next_action(True, CLOSING, now, retry_at=0, check_at=0) is None
    assert next_action(False, DOWN, now, retry_at=0, check_at=0) is None


def test_site_lists_parse_and_bad_ones_say_what_is_wrong(tmp_path):
    sites = parse_sites("client_0:2, client_1:2,client_2")
    assert [(s.name, s.partition_id, s.gpus) for s in sites] == [("client_0", 0, 2), ("client_1", 1, 2),
                                                                  ("client_2", 2, 0)]
    assert [s.gpu_ids for s in assign_gpu_sets(sites)] == [(0, 1), (2, 3), ()]   # 3 GPU sets on one host
    explicit = [SiteSpec("a", 0, 2, (0, 1)), SiteSpec("b", 1, 2), SiteSpec("c", 2, 1)]
    assert [s.gpu_ids for s in assign_gpu_sets(explicit)] == [(0, 1), (2, 3), (4,)]
    assert [s.k8s_name for s in parse_sites(str(SITES_FILE))] == ["client-0", "client-1", "client-2"]
    assert start_provisioning({"provisioner": "none"}, "redis://127.0.0.1:1/0", "r", tmp_path) is None
    with pytest.raises(ValueError, match='provisioner must be "none", "local" or "kubernetes"'):
        start_provisioning({"provisioner": "slurm"}, "redis://127.0.0.1:1/0", "r", tmp_path)
    with pytest.raises(SiteSpecError, match="provision-sites is empty"):
        start_provisioning({"provisioner": "local"}, "redis://127.0.0.1:1/0", "r", tmp_path)
    odd = [SiteSpec("a-1", 3, 2, (5, 7), {"zone": 'x"y', "k8s.io/gpu": "H100"}), SiteSpec("b", 0)]
    (tmp_path / "round-trip.toml").write_text(provision_sites.sites_toml(odd))
    assert provision_sites.load_sites(tmp_path / "round-trip.toml") == odd

    bad = {
        "client 0": "name must be",                       # not a node-config / Kubernetes name
        "client_0,client-0": "same name once written as a Kubernetes name",
        "client_0:two": "GPUS a whole number",
    }
    for text, message in bad.items():
        with pytest.raises(SiteSpecError, match=message):
            parse_sites(text)
    files = {
        '[[sites]]\nname = "a"\ngpu = 2\n': r"\[\[sites\]\] #1: unknown key\(s\) \['gpu'\]",
        '[[sites]]\nname = "a"\ngpus = -1\n': r"#1 \(a\): gpus must be a whole number >= 0",
        '[[sites]]\nname = "a"\ngpus = 3\ngpu_ids = [0, 1]\n': r"\(a\): gpus = 3 but gpu_ids has 2",
        '[[sites]]\nname = "a"\ngpu_ids = [0]\n[[sites]]\nname = "b"\ngpu_ids = [0]\n': "GPU 0 is given to both 'a' and 'b'",
        '[[sites]]\nname = "a"\nnode_selector = { zone = 3 }\n': r"\(a\): node_selector must be a table of strings",
        '[sites]\nname = "a"\n': r"expected only \[\[sites\]\] tables",
        "[[sites]\n": "not valid TOML",
    }
    for i, (text, message) in enumerate(files.items()):
        path = tmp_path / f"sites{i}.toml"
        path.write_text(text)
        with pytest.raises(SiteSpecError, match=message) as error:
            parse_sites(str(path))
        assert str(path) in str(error.value)


def test_trainer_command_lines_are_recognised_by_site_and_run():
    plain = trainer_command("client_0", "run-a", "/r", 1, "cpu")[1:]
    torchrun = trainer_command("client_0", "run-a", "/r", 4, "cuda")[1:]
    rank = ["python", "-u", "-m", "pilot.site.trainer", "--site", "client_0", "--run-id", "run-a"]
    assert is_trainer_of(plain, "client_0", "run-a")
    assert is_trainer_of(torchrun, "client_0", "run-a") and is_trainer_of(rank, "client_0", "run-a")
    assert not is_trainer_of(plain, "client_1", "run-a") and not is_trainer_of(plain, "client_0", "run-b")
    assert not is_trainer_of(["flower-supernode", "--node-config", 'name="client_0"'], "client_0", "run-a")


def test_supernode_command_line_and_gpu_set(tmp_path):
    sites = assign_gpu_sets(parse_sites("client_0:2,client_1"))
    insecure = LocalProvisioner(sites, "10.0.0.1:8000", log_dir=tmp_path)
    assert insecure.command("client_0", 9100) == [
        "flower-supernode", "--insecure", "--superlink", "10.0.0.1:8000", "--port", "9100",
        "--node-config", 'name="client_0" partition-id=0']
    assert insecure.environment("client_0")["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert insecure.environment("client_1")["CUDA_VISIBLE_DEVICES"] == ""           # CPU: no GPU visible
    secure = LocalProvisioner(sites, "link:8000", log_dir=tmp_path, root_certificates="certs/ca.crt",
                              auth_key_dir="certs/sites")
    assert secure.command("client_1", 9101) == [
        "flower-supernode", "--root-certificates", "certs/ca.crt", "--auth-supernode-private-key",
        str(Path("certs/sites/client_1")), "--superlink", "link:8000", "--port", "9101",
        "--node-config", 'name="client_1" partition-id=1']


# ------------------------------------------------------------------ Kubernetes
def test_rendered_manifests_validate_and_are_the_committed_ones(tmp_path):
    sites = parse_sites(str(SITES_FILE))
    files = k8s.render_manifests(sites, k8s.ClusterConfig())
    k8s.validate_manifests(files, "1.31")
    k8s.write_manifests(files, tmp_path)
    committed = sorted(p.name for p in RENDERED.glob("*.yaml"))
    assert committed == sorted(files), "deploy/kubernetes/rendered is stale: render it again (docs/provisioning.md)"
    for name in files:
        assert (tmp_path / name).read_text() == (RENDERED / name).read_text(), f"{name} is stale: render it again"
    k8s.validate_manifests(k8s.read_manifests(RENDERED), "1.31")

    docs = {(d["kind"], d["metadata"]["name"]): d for ds in files.values() for d in ds}
    for site in sites:
        sts = docs[("StatefulSet", f"pilot-site-{site.k8s_name}")]["spec"]
        pod = sts["template"]["spec"]
        container = pod["containers"][0]
        assert sts["replicas"] == 0                               # up only while the site's window is open
        assert container["resources"]["limits"]["nvidia.com/gpu"] == site.gpus
        assert pod["nodeSelector"] == site.node_selector
        assert container["args"][container["args"].index("--node-config") + 1] == \
            f'name="{site.name}" partition-id={site.partition_id}'
        assert "--insecure" not in container["args"] and "--auth-supernode-private-key" in container["args"]
    link = docs[("Deployment", "pilot-superlink")]["spec"]["template"]["spec"]["containers"][0]
    assert "--enable-supernode-auth" in link["args"] and "--ssl-certfile" in link["args"]
    # least privilege: Redis knows one user per role; every pod is its own role, with only its own password
    redis_pod = docs[("StatefulSet", "pilot-redis")]["spec"]["template"]["spec"]
    assert redis_pod["containers"][0]["args"][:2] == ["--aclfile", "/etc/pilot/redis-users/users.acl"]
    assert redis_pod["volumes"][0]["secret"]["secretName"] == "pilot-redis-users"
    roles = {("Deployment", "pilot-superlink"): "server", ("Deployment", "pilot-provisioner"): "server",
             ("Deployment", "pilot-energy"): "energy",
             **{("StatefulSet", f"pilot-site-{site.k8s_name}"): f"site-{site.name}" for site in sites}}
    for (kind, name), role in roles.items():
        pod = docs[(kind, name)]["spec"]["template"]["spec"]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["PILOT_REDIS_URL"]["value"] == f"redis://{role}@pilot-redis:6379/0", name
        assert "REDIS_PASSWORD" not in env and ":$(" not in env["PILOT_REDIS_URL"]["value"]
        secrets = [v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v]
        assert [s for s in secrets if s.startswith("pilot-redis")] == [k8s.redis_role_secret(role)], name
    assert k8s.redis_role_secret("site-client_0") == "pilot-redis-site-client-0"
    assert docs[("Deployment", "pilot-energy")]["spec"]["template"]["spec"]["containers"][0]["args"][0].endswith(
        "energy_simulation.py")
    assert not any(d["kind"] == "Secret" for d in docs.values())   # secrets are made by the user, never rendered
    # the provisioner's pod reads the very sites it was rendered from
    shipped = tmp_path / "shipped-sites.toml"
    shipped.write_text(docs[("ConfigMap", "pilot-sites")]["data"]["sites.toml"])
    assert provision_sites.load_sites(shipped) == sites
    controller = docs[("Deployment", "pilot-provisioner")]["spec"]["template"]["spec"]
    assert controller["serviceAccountName"] == "pilot-provisioner"
    assert controller["containers"][0]["args"][:3] == ["kubernetes", "--sites", "/etc/pilot/sites/sites.toml"]
    rules = docs[("Role", "pilot-provisioner")]["rules"]
    assert {r for rule in rules for r in rule["resources"]} == {"statefulsets", "statefulsets/scale", "pods"}
    assert not {"create", "delete", "*"} & {v for rule in rules for v in rule["verbs"]}   # scaling rights only

    insecure = k8s.render_manifests(sites[:1], k8s.ClusterConfig(secure=False, scenario=str(
        PROJECT_ROOT / "pilot" / "energy" / "data" / "default_scenario.toml"), storage_class="nfs"))
    k8s.validate_manifests(insecure, "1.31")
    node = insecure["50-site-client-0.yaml"][1]["spec"]["template"]["spec"]["containers"][0]
    assert node["args"][0] == "--insecure"
    assert insecure["40-energy.yaml"][0]["kind"] == "ConfigMap"


def test_invalid_manifests_and_bad_sites_are_rejected_with_a_clear_error(tmp_path, capsys):
    files = k8s.render_manifests(parse_sites("client_0:1"), k8s.ClusterConfig())
    sts = files["50-site-client-0.yaml"][1]
    sts["spec"]["replicas"] = "two"
    with pytest.raises(k8s.ManifestError, match=r"StatefulSet/pilot-site-client-0: spec\.replicas: 'two' is not of type"):
        k8s.validate_manifests(files, "1.31")
    sts["spec"]["replicas"] = 0
    sts["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(k8s.ManifestError, match="imagePullPolicyy' was unexpected"):
        k8s.validate_manifests(files, "1.31")
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
                                      "spec": {"template": {}}}))
    assert provision_cli.main(["validate", str(broken)]) == 2
    assert "Deployment/x" in capsys.readouterr().err

    bad_sites = tmp_path / "sites.toml"
    bad_sites.write_text('[[sites]]\nname = "client_0"\ngpus = "four"\n')
    assert provision_cli.main(["render", "--sites", str(bad_sites), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "(client_0): gpus must be a whole number" in err and str(bad_sites) in err
    assert not (tmp_path / "out").exists()


def test_kubernetes_provisioner_commands_and_api_errors_are_retried(tmp_path):
    sites = parse_sites(str(SITES_FILE))
    kubeconfig = tmp_path / "kubeconfig"   # an API server address where nothing listens
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test", "users": [{"name": "u", "user": {}}],
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{free_port()}"}}],
        "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u"}}]}))
    kubectl = shutil.which("kubectl")
    assert kubectl, "this test needs kubectl on PATH (Debian: kubernetes-client; any version talks to no server alike)"
    prov = k8s.KubernetesProvisioner(sites, "pilot", kubectl=kubectl, kubeconfig=str(kubeconfig))
    base = [kubectl, "--kubeconfig", str(kubeconfig), "--namespace", "pilot", "--request-timeout=30s"]
    assert prov.scale_command("client_1", 1) == [*base, "scale", "statefulset/pilot-site-client-1", "--replicas=1"]
    assert prov.scale_command("client_1", 0)[-1] == "--replicas=0"
    assert prov.pods_command("client_1") == [*base, "get", "pods", "--selector", "pilot/site=client_1", "-o", "name"]
    with pytest.raises(ProvisionError, match="refused"):
        prov.open_site("client_1", timeout_s=5)

    failures = []

    def sink(kind: str, fields: dict) -> None:
        if kind == "provision-failed":
            failures.append((time.monotonic(), fields))
        raise RuntimeError("a broken event sink")   # must not stop the controller

    controller = ProvisionController(prov, [s.name for s in sites], on_event=sink,
                                     policy=RetryPolicy(backoff_base_s=0.1, backoff_max_s=0.4))
    deadline = time.monotonic() + 20
    while len(failures) < 4:
        assert time.monotonic() < deadline
        controller.reconcile({"client_1"})   # a server-loop tick: returns at once, never raises
        time.sleep(0.02)
    assert controller.close(timeout_s=5)
    assert [f["attempt"] for _, f in failures[:4]] == [1, 2, 3, 4]
    assert all(f["site"] == "client_1" and f["op"] == "open" and "refused" in f["error"] for _, f in failures)
    assert [f["retry_in"] for _, f in failures[:4]] == [0.1, 0.2, 0.4, 0.4]
    gaps = [b[0] - a[0] for a, b in zip(failures, failures[1:4], strict=False)]
    assert all(gap >= delay for gap, delay in zip(gaps, [0.1, 0.2, 0.4], strict=True)), gaps


# ------------------------------------------------------------------ local processes
@pytest.fixture(scope="module")
def superlink(tmp_path_factory):
    """A real flower-superlink on loopback; yields (address, environment for Flower processes)."""
    home = tmp_path_factory.mktemp("flwr")
    env = subprocess_env(HOME=str(home), FLWR_HOME=str(home / "flwr"), FLWR_TELEMETRY_ENABLED="0",
                         FLWR_DISABLE_UPDATE_CHECK="1", PILOT_SITE_THREADS="1")
    port = free_port()
    link = subprocess.Popen([str(VENV_BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    yield f"127.0.0.1:{port}", env
    stop_processes(family(link.pid))
    link.wait(timeout=10)


def supernodes_of(address: str) -> list[psutil.Process]:
    """flower-supernode processes (and their children) that point at `address`, still running."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if address in cmd and any("supernode" in part for part in cmd):
            found += [p for p in family(proc.pid) if not gone(p.pid)]
    return found


def test_a_failing_site_is_retried_with_backoff_while_the_others_come_up(superlink, tmp_path):
    """client_0's SuperNode binary exits at once (as one does on a host whose GPU driver is broken):
    retried with back-off and reported, while client_1 comes up beside it."""
    address, env = superlink
    wrapper = tmp_path / "bin" / "site-supernode"
    wrapper.parent.mkdir()
    wrapper.write_text('#!/bin/sh\ncase "$*" in *\'name="client_0"\'*) echo "no usable GPU" >&2; exit 3;; esac\n'
                       'exec flower-supernode "$@"\n')
    wrapper.chmod(0o755)
    prov = LocalProvisioner(parse_sites("client_0,client_1"), address, log_dir=tmp_path / "logs",
                            supernode=[str(wrapper)], env=env)
    events = Recorder()
    controller = ProvisionController(prov, ["client_0", "client_1"], on_event=events,
                                     policy=RetryPolicy(open_timeout_s=30, backoff_base_s=0.3, backoff_max_s=1.0))
    try:
        deadline = time.monotonic() + 40
        while len(events.of("provision-failed", "client_0")) < 3 or not events.of("provision-done", "client_1"):
            assert time.monotonic() < deadline, events.events
            controller.reconcile({"client_0", "client_1"})
            time.sleep(0.05)
        assert prov.status("client_1") == "up" and controller.states()["client_1"] == UP
        failed = events.of("provision-failed", "client_0")
        assert [f["attempt"] for _, f in failed[:3]] == [1, 2, 3]
        assert all("exited with code 3" in f["error"] and "no usable GPU" in f["error"] for _, f in failed)
        starts = [t for t, f in events.of("provision-start", "client_0")]
        for n, (before, after) in enumerate(zip(starts, starts[1:3], strict=False), start=1):
            assert after - before >= backoff_delay(n, 0.3, 1.0)
        controller.reconcile({"client_1"})   # client_0's window closes: no more attempts (checked below)
        time.sleep(0.5)                      # (an attempt already under way ends: its binary exits at once)
        attempts = len(events.of("provision-start", "client_0"))

        pids = prov.pids("client_1")
        assert pids and not any(gone(p) for p in pids)
        time.sleep(1.0)
        assert len(events.of("provision-start", "client_0")) == attempts
    finally:
        assert controller.close(timeout_s=30)
    assert all(gone(p) for p in pids)
    assert not supernodes_of(address)


def test_always_curtailed_sites_stay_up_and_a_dead_node_is_opened_again(superlink, redis_server, tmp_path):
    """With curtailment "always" every site is opened at once; nobody calls reconcile afterwards, yet a
    SuperNode that dies is noticed by the controller's own health check and opened again."""
    address, env = superlink
    events = Recorder()
    settings = {"provisioner": "local", "provision-sites": "client_0", "provision-superlink": address,
                "curtailment": "always", "provision-health-interval": 0.5, "provision-backoff": 0.3}
    provisioning = start_provisioning(settings, redis_server.url, "always", tmp_path,
                                                on_event=events, env=env)
    prov = provisioning.provisioner
    try:
        wait_for(lambda: events.of("provision-done", "client_0"), 40, "client_0 up")
        first = prov.pids("client_0")
        assert first and prov.status("client_0") == "up"
        psutil.Process(prov.nodes["client_0"].process.pid).kill()
        wait_for(lambda: len(events.of("provision-done", "client_0")) >= 2, 40, "client_0 opened again")
        assert events.of("provision-lost", "client_0") and prov.status("client_0") == "up"
        again = prov.pids("client_0")
        assert not set(again) & set(first)
    finally:
        assert provisioning.close(timeout_s=30)
    assert all(gone(p) for p in first + again)
    assert not supernodes_of(address)


def test_a_node_that_never_connects_times_out_and_leaves_nothing(tmp_path):
    nowhere = f"127.0.0.1:{free_port()}"   # no SuperLink there
    env = subprocess_env(HOME=str(tmp_path), FLWR_HOME=str(tmp_path / "flwr"), FLWR_TELEMETRY_ENABLED="0")
    prov = LocalProvisioner(parse_sites("client_0"), nowhere, log_dir=tmp_path / "logs",
                            supernode=[str(VENV_BIN / "flower-supernode")], env=env)
    events = Recorder()
    controller = ProvisionController(prov, ["client_0"], on_event=events,
                                     policy=RetryPolicy(open_timeout_s=1.5, backoff_base_s=0.2))
    controller.reconcile({"client_0"})
    wait_for(lambda: len(events.of("provision-failed")) >= 2, 30, "two timed-out opens")
    assert controller.close(timeout_s=30)
    failed = events.of("provision-failed")
    assert all(f"not connected to {nowhere} after 1.5 s" in f["error"] and f["seconds"] >= 1.5 for _, f in failed)
    assert not supernodes_of(nowhere)


# ------------------------------------------------------------------ windows from a scripted trace
PHASES = [set(), {"client_0", "client_1"}, {"client_0", "client_1"}, {"client_1"}, {"client_0"}, {"client_0"}, set()]
STEP_S = 300
WALL_S_PER_STEP = 4.5   # every window lasts 2 steps: longer than a SuperNode takes to start here
START = datetime(2025, 6, 1, tzinfo=UTC)


def write_scenario(folder: Path) -> Path:
    rows = ["timestamp,R0,R1"]
    for i, curtailed in enumerate(PHASES):
        when = (START + timedelta(seconds=STEP_S * i)).isoformat()
        rows.append(",".join([when] + ["50" if f"client_{k}" in curtailed else "500" for k in range(2)]))
    (folder / "trace.csv").write_text("\n".join(rows) + "\n")
    sites = "".join(f'\n[[sites]]\nname = "client_{k}"\nregion = "R{k}"\nsignal = "moer"\ngpus = 1\n'
                    f'gpu_train_kw = 0.7\ngpu_idle_kw = 0.1\nmoer_trace = "trace.csv"\n' for k in range(2))
    end = (START + timedelta(seconds=STEP_S * len(PHASES))).isoformat()
    path = folder / "scenario.toml"
    path.write_text(f'[scenario]\nstart = "{START.isoformat()}"\nend = "{end}"\nstep_s = {STEP_S}\n'
                    f"threshold = 100.0\nmin_on_s = 0\nmin_off_s = 0\n{sites}")
    return path


def test_sites_open_and_close_with_their_windows_and_nothing_is_left(superlink, redis_server, redis_client,
                                                                     tmp_path, text_shards, tiny_tokenizer):
    address, env = superlink
    run_id, run_dir = "provision-e2e", tmp_path / "run"
    env = {**env, "PILOT_REDIS_URL": redis_server.url}
    spec = {**asdict(TrainConfig(depth=2, max_seq_len=128, device_batch_size=4, total_batch_size=512, compile="off")),
            "num_iterations": 10, "data_dir": str(text_shards), "tokenizer_dir": str(tiny_tokenizer)}
    redis_client.set(protocol.train_config_key(run_id), json.dumps(spec))

    events = Recorder()
    seen_pids: dict[str, set[int]] = {"client_0": set(), "client_1": set()}
    checks: list[str] = []

    def on_event(kind: str, fields: dict) -> None:
        events(kind, fields)
        site = fields.get("site")
        if kind == "provision-done" and fields["op"] == OPEN:
            seen_pids[site] |= set(prov.pids(site))
        if kind == "provision-start" and fields["op"] == CLOSE and site == "client_1":
            # client_0 closed a window earlier: none of client_1's processes went with it
            checks.append(f"client_1 before its close: {sorted(p for p in seen_pids[site] if gone(p))} gone")
        if kind == "provision-done" and fields["op"] == CLOSE:
            left = [p for p in seen_pids[site] if not gone(p)]
            checks.append(f"{site} closed, left: {left}")

    # what the server does with its run settings: provisioning that follows the run's energy state
    settings = {"provisioner": "local", "provision-sites": "client_0:1,client_1:1", "provision-superlink": address,
                "provision-startup-delay": 0.5, "provision-open-timeout": 40, "provision-backoff": 0.5}
    provisioning = start_provisioning(settings, redis_server.url, run_id, run_dir, on_event=on_event, env=env)
    prov, controller = provisioning.provisioner, provisioning.controller
    assert events.of("provision-warning")   # --insecure is said out loud
    energy = None
    try:
        # client_0's site trainer, warm as its handshake leaves it (started the way its ClientApp starts it:
        # detached, in a session of its own, nobody's child): it is client_0's close that must end it
        log = run_dir / "sites" / "client_0" / "trainer.log"
        log.parent.mkdir(parents=True)
        subprocess.run([sys.executable, "-c", LAUNCHER, json.dumps(trainer_command("client_0", run_id, str(run_dir),
                                                                                   1, "cpu")), str(log)],
                       env=env, check=True, timeout=30)
        wait_for(lambda: prov.trainer_processes("client_0"), 10, "the trainer process")
        trainer_pid = prov.trainer_processes("client_0")[0].pid
        seen_pids["client_0"].add(trainer_pid)
        wait_for(lambda: redis_client.hget(protocol.trainer_key(run_id, "client_0"), "status") == "idle", 90,
                 "the trainer to be ready")

        energy = subprocess.Popen(
            [sys.executable, str(PROJECT_ROOT / "energy_simulation.py"), "--scenario", str(write_scenario(tmp_path)),
             "--run-id", run_id, "--redis-url", redis_server.url, "--speedup", str(STEP_S / WALL_S_PER_STEP)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())
        energy.wait(timeout=90)
        wait_for(controller.settled, 60, "every window's sites settled")
    finally:
        closed = provisioning.close(timeout_s=60)
        if energy is not None and energy.poll() is None:
            energy.kill()
    assert closed
    assert energy.returncode == 0, energy.stdout.read()

    # the provisioner followed every transition of the trace, in order, and nothing failed. (On a loaded
    # machine a window may close before its node is up: that open is cancelled, which is the site going
    # up and down without ever running, so it stands for both.)
    history = EnergyEvents(redis_client, run_id).history()
    for site in ("client_0", "client_1"):
        transitions = [OPEN if e.curtailed else CLOSE for e in history if e.site == site]
        ops = []
        for _, kind, fields in events.events:
            if fields.get("site") == site and kind == "provision-done":
                ops.append(fields["op"])
            elif fields.get("site") == site and kind == "provision-cancelled":
                ops += [OPEN, CLOSE]
        assert ops == transitions, (site, ops, transitions)
    assert transitions == [OPEN, CLOSE] and [OPEN if e.curtailed else CLOSE for e in history
                                             if e.site == "client_0"] == [OPEN, CLOSE, OPEN, CLOSE]
    assert [e[1] for e in events.events if e[1] in ("provision-failed", "provision-error", "provision-lost")] == []

    # both sites' first windows opened at the same step: provisioned in parallel (their opens overlap)
    (s0, _), (s1, _) = events.of("provision-start", "client_0")[0], events.of("provision-start", "client_1")[0]
    (d0, f0), (d1, f1) = events.of("provision-done", "client_0")[0], events.of("provision-done", "client_1")[0]
    assert f0["op"] == f1["op"] == OPEN
    assert max(s0, s1) < min(d0, d1), "the two opens ran one after the other"

    # each close left none of the site's processes; the other site stayed up meanwhile
    assert all(check.endswith("left: []") for check in checks if " left: " in check), checks
    assert "client_1 before its close: [] gone" in checks, checks
    # the trainer left through its inbox ("shutdown"), not a signal, and nothing is left of it in Redis
    assert "shutdown requested" in log.read_text()
    assert gone(trainer_pid)
    assert not redis_client.exists(protocol.alive_key(run_id, "client_0"))
    assert not [f for _, f in redis_client.xrange(protocol.inbox_key(run_id, "client_0")) if f["kind"] == "shutdown"]
    # after the run: no process of any site, by PID and by command line
    assert all(gone(p) for pids in seen_pids.values() for p in pids), seen_pids
    assert len(seen_pids["client_0"]) >= 5   # two SuperNodes with their SuperExec each, and the trainer
    assert not supernodes_of(address)
    assert not [p for p in psutil.process_iter(["cmdline"]) if is_trainer_of(p.info["cmdline"] or [], "client_0", run_id)
                and not gone(p.pid)]
