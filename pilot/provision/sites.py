"""The sites file: which sites exist, their GPUs and node selectors (TOML or NAME[:GPUS],...), checked
with errors that name the site, the key and what was expected."""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SITE_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_-]{0,38}[A-Za-z0-9])?$")


class SiteSpecError(ValueError):
    """A bad site list: says which site, which key, what was expected."""


# ------------------------------------------------------------------ sites
@dataclass(frozen=True)
class SiteSpec:
    """One GPU site: its name (the SuperNode's node-config name), its data partition and its GPUs."""

    name: str
    partition_id: int
    gpus: int = 0                                   # GPUs of the site (0: CPU)
    gpu_ids: tuple[int, ...] = ()                   # local provisioner: which of this host's GPUs
    node_selector: dict[str, str] = field(default_factory=dict)   # Kubernetes: where the site's pod may run

    @property
    def k8s_name(self) -> str:
        """The site's name as a Kubernetes object name (DNS label: lower case, '-' for '_')."""
        return self.name.lower().replace("_", "-")


SITE_KEYS = {"name", "gpus", "gpu_ids", "node_selector", "partition_id"}


def site_from_table(table: dict[str, Any], index: int, where: str) -> SiteSpec:
    """A SiteSpec from one `[[sites]]` table (or inline entry); every mistake names the site and the key."""
    unknown = sorted(set(table) - SITE_KEYS)
    if unknown:
        raise SiteSpecError(f"{where}: unknown key(s) {unknown}; known: {sorted(SITE_KEYS)}")
    name = table.get("name")
    if not isinstance(name, str) or not SITE_NAME.match(name):
        raise SiteSpecError(f"{where}: name must be 1-40 letters, digits, '_' or '-' (starting and ending with a "
                            f"letter or digit), got {name!r}")
    where = f"{where} ({name})"
    gpu_ids = table.get("gpu_ids", [])
    if not isinstance(gpu_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                                for i in gpu_ids):
        raise SiteSpecError(f"{where}: gpu_ids must be a list of GPU indices >= 0, got {gpu_ids!r}")
    if len(set(gpu_ids)) != len(gpu_ids):
        raise SiteSpecError(f"{where}: gpu_ids lists a GPU twice: {gpu_ids}")
    gpus = table.get("gpus", len(gpu_ids))
    if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
        raise SiteSpecError(f"{where}: gpus must be a whole number >= 0, got {gpus!r}")
    if gpu_ids and len(gpu_ids) != gpus:
        raise SiteSpecError(f"{where}: gpus = {gpus} but gpu_ids has {len(gpu_ids)} entries")
    selector = table.get("node_selector", {})
    if not isinstance(selector, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in selector.items()):
        raise SiteSpecError(f"{where}: node_selector must be a table of strings, got {selector!r}")
    partition = table.get("partition_id", index)
    if not isinstance(partition, int) or isinstance(partition, bool) or partition < 0:
        raise SiteSpecError(f"{where}: partition_id must be a whole number >= 0, got {partition!r}")
    return SiteSpec(name, partition, gpus, tuple(gpu_ids), dict(selector))


def check_sites(sites: Sequence[SiteSpec], where: str) -> list[SiteSpec]:
    """No two sites share a name, a Kubernetes name or a GPU."""
    if not sites:
        raise SiteSpecError(f"{where}: no sites")
    seen: dict[str, str] = {}
    gpu_owner: dict[int, str] = {}
    for site in sites:
        if site.k8s_name in seen:
            raise SiteSpecError(f"{where}: sites {seen[site.k8s_name]!r} and {site.name!r} have the same name "
                                f"once written as a Kubernetes name ({site.k8s_name!r})")
        seen[site.k8s_name] = site.name
        for gpu in site.gpu_ids:
            if gpu in gpu_owner:
                raise SiteSpecError(f"{where}: GPU {gpu} is given to both {gpu_owner[gpu]!r} and {site.name!r}")
            gpu_owner[gpu] = site.name
    return list(sites)


def parse_sites(text: str) -> list[SiteSpec]:
    """`client_0:2,client_1:2,client_2` (name[:GPU count], comma-separated) or the path of a sites TOML file."""
    if text.endswith(".toml") or Path(text).is_file():
        return load_sites(text)
    tables = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, gpus = item.partition(":")
        if gpus and not gpus.isdigit():
            raise SiteSpecError(f"--sites {item!r}: expected NAME or NAME:GPUS with GPUS a whole number")
        tables.append({"name": name, **({"gpus": int(gpus)} if gpus else {})})
    return check_sites([site_from_table(t, i, f"--sites entry {i + 1}") for i, t in enumerate(tables)], "--sites")


def load_sites(path: str | Path) -> list[SiteSpec]:
    """Sites from a TOML file of `[[sites]]` tables (keys: name, gpus, gpu_ids, node_selector, partition_id)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SiteSpecError(f"{path}: no such sites file") from None
    except tomllib.TOMLDecodeError as error:
        raise SiteSpecError(f"{path}: not valid TOML: {error}") from None
    unknown = sorted(set(data) - {"sites"})
    if unknown or not isinstance(data.get("sites"), list):
        raise SiteSpecError(f"{path}: expected only [[sites]] tables, found {sorted(data) or 'nothing'}")
    sites = [site_from_table(t, i, f"{path}: [[sites]] #{i + 1}") for i, t in enumerate(data["sites"])]
    return check_sites(sites, str(path))


def sites_toml(sites: Sequence[SiteSpec]) -> str:
    """The sites as a TOML file that `load_sites` reads back to the same specs."""
    def text(value: str) -> str:
        return json.dumps(value)   # a JSON string is a TOML basic string
    blocks = []
    for site in sites:
        lines = ["[[sites]]", f"name = {text(site.name)}", f"partition_id = {site.partition_id}", f"gpus = {site.gpus}"]
        if site.gpu_ids:
            lines.append(f"gpu_ids = [{', '.join(map(str, site.gpu_ids))}]")
        if site.node_selector:
            pairs = ", ".join(f"{text(k)} = {text(v)}" for k, v in site.node_selector.items())
            lines.append(f"node_selector = {{ {pairs} }}")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def assign_gpu_sets(sites: Sequence[SiteSpec], first_gpu: int = 0) -> list[SiteSpec]:
    """Give each site without explicit gpu_ids the next `gpus` GPUs of the host, in site order
    (3 sites x 2 GPUs on an 8-GPU host: 0,1 / 2,3 / 4,5), skipping GPUs that another site names."""
    taken = {g for s in sites for g in s.gpu_ids}
    next_gpu, out = first_gpu, []
    for site in sites:
        if site.gpu_ids or site.gpus == 0:
            out.append(site)
            continue
        ids = []
        while len(ids) < site.gpus:
            if next_gpu not in taken:
                ids.append(next_gpu)
            next_gpu += 1
        out.append(SiteSpec(site.name, site.partition_id, site.gpus, tuple(ids), site.node_selector))
    return out


