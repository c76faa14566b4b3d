"""python -m pilot.provision: the provisioning CLI (pilot/provision/cli.py)."""

import sys

from pilot.provision.cli import main

sys.exit(main())
