"""Which Flower node is which site: the handshake both apps speak.

Node ids are random and change when a SuperNode restarts; a site's name does not. A SuperNode names its
site with `--node-config 'name="client_0" partition-id=0'`; in Flower's simulation engine, where nodes
only get a partition id, partition N is site `client_N`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

IDENTIFY = "pilot.identify"  # the QUERY message's config key that asks a node for its site name


def site_name(node_config: Mapping[str, Any]) -> str:
    """The site a node serves, from its node config."""
    name = node_config.get("name")
    if isinstance(name, str) and name:
        return name
    if "partition-id" in node_config:
        return f"client_{int(node_config['partition-id'])}"
    raise ValueError(
        f"node config {dict(node_config)} names no site: start the SuperNode with "
        "--node-config 'name=\"client_0\" partition-id=0'")
