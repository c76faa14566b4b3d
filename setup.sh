#!/usr/bin/env bash
# Set up Pilot in ./.venv with uv, from uv.lock (the one list of exact versions):
#   system packages (as root with apt) -> uv venv -> uv sync (the dev group: pytest, ruff) -> Flower's home.
# This is `uv venv && uv sync` plus two things uv cannot know:
#  - torch: uv.lock pins torch==2.13.0 from PyPI, the CUDA build on Linux (what a GPU machine wants). uv does
#    not read pip's configuration, so where pip's configuration (find-links: PIP_FIND_LINKS, pip.conf) or
#    UV_FIND_LINKS points at a local torch wheel of the locked version (a CPU build, say), this script installs
#    that wheel and leaves out the CUDA libraries only the PyPI build needs. No path is written into the repo.
#  - Flower: a .pth file in the venv makes every Python process of it (flwr, flower-superlink, Ray workers)
#    use this project's Flower home (.flwr/config.toml) instead of ~/.flwr.
# uv itself: taken from PATH (or `python3 -m uv`); when absent, installed with `pip install --user uv`.
# PYTHON=/path/to/python3.11 picks the interpreter; uv finds a 3.11/3.12 one on its own otherwise.
set -euo pipefail
cd "$(dirname "$0")"

# ---- system packages (system-packages.txt): installed when missing and this is root with apt-get (CI,
# containers); otherwise named, so a user knows what the tests that need them want.
missing=()
command -v dpkg >/dev/null || echo "setup: not Debian: make sure chromium and redis-server (with TLS) are installed"
command -v dpkg >/dev/null && for pkg in $(sed -e 's/#.*//' system-packages.txt); do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
# kubectl (the Kubernetes provisioner's tests run it against an unreachable API server): any build will do
command -v dpkg >/dev/null && ! command -v kubectl >/dev/null && missing+=(kubernetes-client)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing ${missing[*]} (system-packages.txt)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; }
  else
    echo "setup: please install these system packages (Debian names): ${missing[*]}"
  fi
fi

# ---- uv
if command -v uv >/dev/null; then
  uv=(uv)
elif python3 -m uv --version >/dev/null 2>&1; then
  uv=(python3 -m uv)
else
  echo "setup: uv not found: installing it into your user site with pip (python3 -m pip install --user uv)"
  python3 -m pip install --quiet --user uv || {
    echo "setup: could not install uv with pip; install it (pipx install uv, or see https://docs.astral.sh/uv/) and rerun"
    exit 1
  }
  uv=(python3 -m uv)
fi

# ---- the venv and the locked stack
"${uv[@]}" venv --quiet --allow-existing ${PYTHON:+--python "$PYTHON"} .venv

# A local torch wheel of the locked version, found through pip's configuration or UV_FIND_LINKS? Prints the
# wheel's path, then the locked packages that only the PyPI build of torch needs (nothing when none is found).
pip_find_links=$(python3 -m pip config list 2>/dev/null | sed -n 's/^[^=]*find-links=//p' | tr -d "'\"") || true
mapfile -t bridge < <(PIP_FIND_LINKS_SEEN="$pip_find_links" .venv/bin/python - <<'PY'
import os, re, sys, sysconfig, tomllib, zipfile
from collections import defaultdict
from pathlib import Path

norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
lock = tomllib.loads(Path("uv.lock").read_text())
locked_torch = next(p["version"] for p in lock["package"] if p["name"] == "torch")
places = " ".join([os.environ.get("UV_FIND_LINKS", ""), os.environ.get("PIP_FIND_LINKS_SEEN", "")]).split()
py = f"cp{sys.version_info.major}{sys.version_info.minor}"
machine = sysconfig.get_platform().split("-")[-1]
wheel = None
for place in places:
    folder = Path(place.removeprefix("file://"))
    if place.startswith(("http://", "https://")) or not folder.is_dir():
        continue
    for f in sorted(folder.glob(f"torch-{locked_torch}[+-]*.whl")):
        if f"-{py}-" in f.name and machine in f.name:
            wheel = f
            break
    if wheel:
        break
if wheel is None:
    sys.exit(0)
with zipfile.ZipFile(wheel) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    wants = {norm(re.split(r"[ ;<>=!~\[(]", line.split(":", 1)[1].strip())[0])
             for line in z.read(meta).decode().splitlines()
             if line.startswith("Requires-Dist:") and "extra ==" not in line}
edges = defaultdict(set)  # every edge of the lock, extras and groups included
for p in lock["package"]:
    deps = list(p.get("dependencies", []))
    for table in ("optional-dependencies", "dev-dependencies"):
        for group in p.get(table, {}).values():
            deps += group
    for d in deps:
        edges[p["name"]].add(d["name"])
roots = [p["name"] for p in lock["package"] if "editable" in p.get("source", {}) or "virtual" in p.get("source", {})]

def reach(cut):
    seen, todo = set(), list(roots)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += [m for m in edges[n] if not (n == "torch" and cut and norm(m) not in wants)]
    return seen

print(wheel)
print(*sorted(reach(False) - reach(True) | {"torch"}))
PY
)
if [ ${#bridge[@]} -gt 0 ]; then
  wheel=${bridge[0]}
  read -r -a skip <<<"${bridge[1]}"
  echo "setup: torch from the local wheel $(basename "$wheel") (find-links of pip or uv); not installing the PyPI build's ${#skip[@]} extra packages"
  "${uv[@]}" sync --locked --quiet --compile-bytecode "${skip[@]/#/--no-install-package=}"
  "${uv[@]}" pip install --quiet --python .venv/bin/python --no-deps --compile-bytecode "$wheel"
else
  "${uv[@]}" sync --locked --quiet --compile-bytecode
fi

# (--compile-bytecode: the .pyc files are written once, here. Without them every Python process compiles the
# sources it imports again, and where PYTHONDONTWRITEBYTECODE is set (CI) it never stops: `import torch` took
# 6.8 s of CPU instead of 1.x, and every site trainer, ClientApp and test subprocess paid it.)

# ---- Flower: every Python process of this venv sees the project's Flower home (the one import to update
# if flwr_environment moves).
site_packages=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
.venv/bin/python - "$site_packages/pilot_flwr_env.pth" <<'PY'
import sys
from pilot.cli import flwr_environment
line = "import os; " + "; ".join(f"os.environ.setdefault({k!r}, {v!r})" for k, v in flwr_environment().items())
open(sys.argv[1], "w").write(line + "\n")
PY
echo "Pilot is set up in .venv (activate it with: source .venv/bin/activate). Test: .venv/bin/python -m pytest"
if [ ${#bridge[@]} -gt 0 ]; then
  echo "setup: rerun ./setup.sh after changing dependencies: a bare 'uv sync' would swap the local torch for uv.lock's PyPI build"
fi
