"""The server's side of provisioning: a run's provisioner and controller from its settings, driven by its
energy state on a thread of their own."""

from __future__ import annotations

import threading
from pathlib import Path

from pilot import coordination
from pilot.provision.controller import EventSink, ProvisionController, Provisioner, RetryPolicy, follow_energy
from pilot.provision.kubernetes import KubernetesProvisioner
from pilot.provision.local import LocalProvisioner
from pilot.provision.sites import SiteSpecError, assign_gpu_sets, parse_sites
from pilot.settings import ProvisionGroup


class Provisioning:
    """A controller with its provisioner, driven for one run: by the run's energy state (a thread of its
    own, on its own Redis connection), or, with curtailment "always", every site up for the whole run."""

    def __init__(self, controller: ProvisionController, provisioner: Provisioner, redis_url: str, run_id: str,
                 follow: bool):
        self.controller, self.provisioner = controller, provisioner
        self.stop = threading.Event()
        self.client = coordination.client_from_url(redis_url) if follow else None
        self.thread = None
        if self.client is not None:
            self.thread = threading.Thread(target=follow_energy, args=(controller, self.client, run_id, self.stop),
                                           name="provision-follow", daemon=True)
            self.thread.start()
        else:
            controller.reconcile(controller.sites)

    def close(self, timeout_s: float | None = None) -> bool:
        """Stop following, bring every site down; True if all went down. Never raises."""
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        done = self.controller.close(timeout_s)
        if isinstance(self.provisioner, LocalProvisioner):
            try:  # the last sweep: whatever a failed close left on this host
                self.provisioner.close()
            except Exception:  # noqa: BLE001 - closing must not raise into the server's shutdown
                done = False
        if self.client is not None:
            self.client.close()
        return done


def start_provisioning(cfg: ProvisionGroup, curtailment: str, redis_url: str, run_id: str, run_dir: str | Path,
                       on_event: EventSink | None = None, env: dict[str, str] | None = None) -> Provisioning | None:
    """The provisioning of a run from its settings, started; None with provisioner "none". Bad settings raise
    SiteSpecError / ValueError (at start-up, not later in the loop)."""
    if cfg.kind == "none":
        return None
    if cfg.kind not in ("local", "kubernetes"):
        raise ValueError(f'provisioner must be "none", "local" or "kubernetes", got {cfg.kind!r}')
    if not cfg.sites:
        raise SiteSpecError('provision-sites is empty: name the sites, e.g. "client_0:2,client_1:2,client_2:2"')
    sites = parse_sites(cfg.sites)
    client = coordination.client_from_url(redis_url)
    provisioner: Provisioner
    if cfg.kind == "local":
        root = cfg.root_certificates or None
        provisioner = LocalProvisioner(assign_gpu_sets(sites), cfg.superlink, log_dir=Path(run_dir) / "provision",
                                       run_id=run_id, redis_client=client, startup_delay_s=cfg.startup_delay,
                                       root_certificates=root, auth_key_dir=cfg.auth_key_dir or None, env=env)
        if root is None and on_event is not None:
            on_event("provision-warning", {"detail": "SuperNodes start --insecure: no TLS, no authentication"})
    else:
        provisioner = KubernetesProvisioner(sites, cfg.namespace, run_id=run_id, redis_client=client)
    policy = RetryPolicy(open_timeout_s=cfg.open_timeout, backoff_base_s=cfg.backoff,
                         health_interval_s=cfg.health_interval)
    controller = ProvisionController(provisioner, [s.name for s in sites], on_event=on_event, policy=policy)
    return Provisioning(controller, provisioner, redis_url, run_id, follow=curtailment != "always")
