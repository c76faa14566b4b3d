"""pilot/procmem.py: in a process that frees tensors of many sizes round after round, freed memory goes back to
the operating system (glibc's dynamic mmap threshold would keep it in the heap)."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import sys, torch
from pilot import procmem
if sys.argv[1] == "fixed":
    assert procmem.return_freed_memory()
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
big = torch.ones(4 << 20)                        # a 16 MB tensor freed: glibc raises its mmap threshold to it
del big
base = rss_mb()
tensors = [torch.ones(512 << 10) for _ in range(96)]   # a round's tensors: 96 x 2 MB, written
keep = tensors[-1]                               # the last one lives on (the next round's, say)
del tensors
print(rss_mb() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_freed_tensors_go_back_to_the_system():
    def held_mb(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    assert held_mb("fixed") < 20          # the one tensor kept, and little else
    assert held_mb("default") > 150       # the heap keeps the freed 190 MB (what the fix is for)
