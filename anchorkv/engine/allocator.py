"""The C allocator's and the garbage collector's settings for a long-running server process."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger("anchorkv.engine")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
KEEP_FREED_BYTES = 256 << 20
HEAP_BELOW_BYTES = 64 << 20


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep memory it frees for the next allocation instead of returning it to the
    system: allocations under HEAP_BELOW_BYTES come from the heap, and up to KEEP_FREED_BYTES of free heap
    stays mapped. A step's temporaries (logits in float64, a top-k's buffers, a Redis value) then reuse pages
    already faulted in; given back, each came back as fresh pages, faulted in at 1-17 us per 4 KiB on a
    virtual machine (a top-k sampling draw took 448 faults, 0.85 ms, against 0.15 ms without). Returns
    whether it applied (not on other C libraries)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = bool(mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES)) and bool(mallopt(M_MMAP_THRESHOLD, HEAP_BELOW_BYTES))
    if not ok:
        log.debug("mallopt refused the allocator settings")
    return ok


def freeze_loaded_objects() -> None:
    """Leave what the process holds once loaded (modules, the model, the tokenizer: about 230k objects)
    out of every later garbage collection. A full collection scanned them all, 170-180 ms with the engine's
    thread stopped, whenever enough objects had piled up since the last; frozen, it scans only those made
    since. For a process that keeps what it loaded until it exits: a server, a stage worker."""
    gc.collect()
    gc.freeze()


def available_memory() -> int | None:
    """Bytes the system could give a process now without swapping (Linux's MemAvailable), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
