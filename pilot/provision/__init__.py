"""Elastic sites: a site's compute comes up when its curtailment window opens and goes away when it closes.

    sites.py        the sites file (TOML or NAME[:GPUS],...): names, GPU sets, node selectors, checked
    controller.py   pure retry policy and the controller: compares wanted with actual, acts on threads
    local.py        the local provisioner: a flower-supernode per site on this host, its own GPU set
    kubernetes.py   the Kubernetes provisioner and its manifests (render, validate, scale StatefulSets)
    run.py          the server's side: a run's provisioning from its settings, following its energy state
    cli.py          `pilot provision` (python -m pilot.provision)
"""
