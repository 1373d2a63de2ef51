"""Host-memory setting for train steps on the CPU: reuse XLA's per-call scratch block instead of faulting it in.

A compiled train step gets its scratch ("temp") memory as one block per call: 0.6 GB for a LoRA q,v step of
SmolLM2-135M at 4 x 128 tokens, 0.95 GB with every linear layer adapted. glibc's malloc gives a block that large
its own ``mmap`` and unmaps it when it is freed (and XLA:CPU's threads allocate from per-thread arenas, whose heaps
cannot hold a block over 64 MiB anyway), so each call gets fresh pages and the kernel faults every 4 KiB page in
again and zeroes it: 150,000 to 240,000 page faults per step, up to 20 % of the step on the
project's CPU machine (bench/README.md). :func:`keep_freed_memory` makes glibc serve large blocks from one heap
and keep what is freed, so from the second call on the block is reused, mostly with no page faults (a call can
still take fresh pages when a small allocation has split the freed block; the heap settles after a few calls).

The cost: the process keeps its peak memory (freed memory is reused, not handed back to the OS) and all threads
share one malloc arena. That suits a training or evaluation process; ``jlora train`` and ``jlora eval`` call it at
start. Call it first thing in your own training program, before JAX starts its threads::

    import jlora.runtime
    jlora.runtime.keep_freed_memory()
    import jax   # ... then build and run the train step as usual
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Sets glibc's malloc to serve every block from one heap (``M_ARENA_MAX=1``, ``M_MMAP_MAX=0``) and to keep
    freed memory (``M_TRIM_THRESHOLD=-1``: never trim; the largest positive value, 2 GiB, would still hand back a
    long-context step's scratch), so that a compiled step's scratch block is reused from call to call (see the
    module docstring). Idempotent.

    Returns:
        True when glibc took the settings; False on other C libraries (macOS, musl), where nothing changes.
    """
    global _applied
    if _applied is None:
        _applied = _mallopt_all() if platform.libc_ver()[0] == "glibc" else False
    return _applied


def _mallopt_all() -> bool:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))   # -1: never trim (mallopt(3))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


__all__ = ["keep_freed_memory"]
