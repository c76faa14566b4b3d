#!/usr/bin/env bash
# Set up Pilot in ./.venv: the pinned stack from requirements.lock, the project itself (editable), and the
# environment that makes `flwr` use this project's connections (.flwr/config.toml) instead of ~/.flwr.
#
# torch is pinned as torch==2.13.0: pip takes a local CPU wheel where the machine's pip configuration points
# at one (PIP_FIND_LINKS or pip.conf find-links), and the CUDA build from PyPI on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

# System packages (system-packages.txt): installed when missing and this is root with apt-get (CI, containers);
# otherwise named, so a user knows what the tests that need them want.
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

"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade "pip>=24"
.venv/bin/python -m pip install --quiet -r requirements.lock
.venv/bin/python -m pip install --quiet --no-deps -e .

# Every Python process of this venv (flwr, flower-superlink, Ray workers) sees the project's Flower home.
site_packages=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
.venv/bin/python - "$site_packages/pilot_flwr_env.pth" <<'PY'
import sys
from pilot.cli import flwr_environment
line = "import os; " + "; ".join(f"os.environ.setdefault({k!r}, {v!r})" for k, v in flwr_environment().items())
open(sys.argv[1], "w").write(line + "\n")
PY
echo "Pilot is set up in .venv (activate it with: source .venv/bin/activate). Test: .venv/bin/python -m pytest"
