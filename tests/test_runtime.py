"""jlora.runtime.keep_freed_memory: a compiled function's scratch block is reused from call to call, so repeated
calls stop page-faulting it in (counted by the kernel, so deterministic enough to assert), and results are the
same. Each setting runs in its own process: malloc settings are process-wide."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = r"""
import json, resource, sys
keep = sys.argv[1] == "keep"
if keep:
    import jlora.runtime
    applied = jlora.runtime.keep_freed_memory()
else:
    applied = False
import jax, jax.numpy as jnp

@jax.jit
def f(x):   # two (4096, 4096) float32 products, 64 MiB each: a 128 MiB scratch block, over glibc's 64 MiB arena heaps
    y, z = jnp.sin(x[:, :64]) @ x[:64], jnp.cos(x[:, :64]) @ x[:64]
    return jnp.sum(jnp.tanh(y) * jnp.exp(-z.T))

x = jnp.linspace(0, 1, 4096 * 4096, dtype=jnp.float32).reshape(4096, 4096)
f(x).block_until_ready(); f(x).block_until_ready()
faults, out = [], None
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = float(f(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults, "out": out}))
"""


def _run(script, *args):
    """Runs ``script`` in a fresh Python (malloc settings are per process) and returns its last line's JSON."""
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _probe(mode):
    return _run(PROBE, mode)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_stops_the_page_faults_of_each_call_and_changes_no_result():
    default, kept = _probe("default"), _probe("keep")
    assert kept["applied"] is True and kept["out"] == default["out"]
    pages = 2 * 4096 * 4096 * 4 // 4096                # the two products, in 4 KiB pages
    assert min(default["faults"]) > pages // 4, (default, kept)         # fresh pages on every call (~17,000 here)
    # Reused: most calls take no fresh pages (0-1 faults). Not every one: a small allocation between calls can
    # split the freed block, and the next call then takes fresh pages at the top of the heap (a 64 MiB product,
    # 17,152 faults, in up to 5 of 12 calls in 8 probes), so the test counts the calls that faulted nothing.
    reused = sum(f < pages // 100 for f in kept["faults"])
    assert reused >= len(kept["faults"]) // 2, (default, kept)


BIG = r"""
import ctypes, json, resource, sys
import jlora.runtime
applied = jlora.runtime.keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = int(sys.argv[1])
faults = []
for _ in range(2):   # a block over 2 GiB (a long-context step's scratch), written, freed, asked for again
    p = libc.malloc(size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(p, 1, size)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(p)
print(json.dumps({"applied": applied, "faults": faults}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_kept_memory_holds_a_block_over_two_gib():
    """The bug this catches: a trim threshold of 2**31 - 1 (mallopt takes an int) let glibc hand back a freed
    2.2 GB scratch block (T = 2048, 30 layers), so every call faulted it in again; -1 turns trimming off."""
    size = (2 << 30) + (256 << 20)
    out = _run(BIG, str(size))
    pages = size // 4096
    assert out["applied"] is True and out["faults"][0] > pages // 2, out    # the first write faults it in
    assert out["faults"][1] < pages // 100, out                             # the second reuses it
