"""Freed tensors go back to the operating system at once, in Pilot's long-lived processes (the ServerApp, the
site trainer).

Every round they allocate and free model-sized sets of tensors (a pseudo-gradient, the next global model, a
running mean), each tensor from a few kB to hundreds of MB. glibc's malloc raises its mmap threshold to the
largest block freed so far (up to 32 MB), after which tensors below it come from the heap, whose freed space is
rarely given back: the footprint grows round by round. Measured (bench/utilisation.py, depth 16, three rounds):
the ServerApp's peak RSS went 5.2 -> 6.0 GB over the rounds, 4.6 GB with a fixed threshold; a site trainer's
4.78 -> 4.6 GB. A fixed threshold (which also turns the dynamic raise off) makes every allocation of 1 MiB or
more a mapping of its own, unmapped when freed; small allocations stay on the heap.
"""

from __future__ import annotations

import ctypes
import sys

MMAP_THRESHOLD = 1 << 20   # bytes: an allocation this large or larger is its own mapping
_M_MMAP_THRESHOLD = -3     # mallopt's parameter number (glibc malloc.h)


def return_freed_memory(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc malloc's mmap threshold for this process; False where there is no glibc (nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):   # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, threshold) == 1
