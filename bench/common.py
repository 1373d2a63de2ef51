"""Shared pieces: the SmolLM2-135M shape, random models on both sides, batches, and interleaved timing.

Both sides get the same architecture (from one HF config dict), the same token batch and the same number of
threads (XLA:CPU uses every core; torch is set to the same count). Weights are random: speed does not depend on
their values, and nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

# SmolLM2-135M(-Instruct), as its config.json says.
SMOLLM2 = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
               tie_word_embeddings=True, max_position_embeddings=8192, hidden_act="silu", bos_token_id=1,
               eos_token_id=2)
QV = ("q_proj", "v_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_SETS = {"q,v": QV, "all linear": ALL_LINEAR}
RANK, ALPHA = 16, 32
STEPS_PER_CALL = 4   # the jlora.scan_steps contender
BATCH, SEQ = 4, 128


def hf_config(**overrides) -> dict:
    """The SmolLM2 config dict with ``overrides`` (e.g. ``num_hidden_layers=2``)."""
    return {**SMOLLM2, **overrides}


def threads() -> int:
    """Threads for both sides: XLA:CPU's default, all cores visible to this process."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def token_batch(batch: int = BATCH, seq: int = SEQ, vocab: int = SMOLLM2["vocab_size"], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (batch, seq)).astype(np.int32)


def jlora_model(hf: dict | None = None, **config_overrides):
    """``(model, params)``: a jlora Flax Llama with random fp32 params (jitted init)."""
    import jax
    import jax.numpy as jnp

    from jlora.models import family_for

    family = family_for("llama")
    config = dataclasses.replace(family.config_from_hf(hf or SMOLLM2), **config_overrides)
    model = family.make_model(config)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, params


def torch_model(hf: dict | None = None):
    """A transformers ``LlamaForCausalLM`` with random fp32 weights, SDPA attention, in train mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = {k: v for k, v in (hf or SMOLLM2).items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**cfg, attn_implementation="sdpa"))
    return model.train()


def set_torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


@dataclasses.dataclass
class Samples:
    """Wall-clock and process CPU seconds of repeated calls."""

    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)

    def scaled(self, factor: float) -> "Samples":
        """These samples times ``factor`` (e.g. per-call times -> per-step times)."""
        return Samples([x * factor for x in self.wall], [x * factor for x in self.cpu])

    def summary(self) -> dict:
        return {"wall_median_s": statistics.median(self.wall), "cpu_median_s": statistics.median(self.cpu),
                "wall_s": [round(x, 4) for x in self.wall], "cpu_s": [round(x, 4) for x in self.cpu]}


def interleaved(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1) -> dict[str, Samples]:
    """Times each zero-argument ``fn`` (which must block until its work is done) ``repeats`` times, alternating.

    Round ``i`` runs the contenders in rotated order, so a slow spell on a shared machine lands on all of them.
    The ``warmup`` rounds alternate too, so the timed rounds start from the heap state they will keep (with
    ``jlora.runtime.keep_freed_memory`` each side's first call after the other's first call can still fault
    fresh pages in).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    out = {name: Samples() for name in names}
    for i in range(repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            w0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            out[name].wall.append(time.perf_counter() - w0)
            out[name].cpu.append(time.process_time() - c0)
    return out


def paired_ratio(samples: dict[str, Samples], num: str, den: str, field: str = "wall") -> float:
    """Median over rounds of ``num``'s time / ``den``'s time in the same round."""
    a, b = getattr(samples[num], field), getattr(samples[den], field)
    return statistics.median(x / y for x, y in zip(a, b))


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def block(tree):
    """Waits for every array in ``tree`` (jax or torch)."""
    import jax

    return jax.block_until_ready(tree)


def tree_bytes(tree) -> int:
    import jax

    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module: str, *args: str, out: str | None = None, timeout: float | None = None):
    """Runs ``python -m <module> <args>`` from the repository root in a fresh process (its own thread pools and
    core affinity) and returns what it wrote as JSON: the file ``out`` if given, else the last line of its stdout.

    Raises:
        RuntimeError: the process failed; the message holds the command and the end of its stderr.
    """
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    if out is None:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    with open(out) as f:
        return json.load(f)


def pin_one_core() -> int:
    """Pins this process to one core (the last one it may run on); call it before jax or torch start threads."""
    core = sorted(os.sched_getaffinity(0))[-1]
    os.sched_setaffinity(0, {core})
    return core
