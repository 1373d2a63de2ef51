"""Runs the benchmarks: ``python -m bench.run`` (what ``make bench`` does).

    python -m bench.run                               # every section, SmolLM2-135M shape
    python -m bench.run --sections train,inference    # some sections
    python -m bench.run --quick                       # 4 layers, 3 repeats: checks that everything runs

Writes ``bench/results/<UTC time>.json`` (and ``latest.json``) with every sample, and rewrites ``bench/README.md``
with the tables. Sections: figures (compiled FLOPs, trainable fraction, checkpoint bytes), train (step times vs
PEFT and full fine-tuning), long_context (train-step memory at T = 512..4096 and time vs PEFT at 2048, batch 1),
inference (forward and generation), bank (many adapters on one base: a batch routed over
16 adapters vs one adapter, one at a time and merging in turn; swap time, bytes, FLOPs), compile (scan vs unrolled),
gpu (skips without a GPU), variants (``bench/variants.py``: DoRA and QLoRA, when present), serve
(``jlora serve``'s engine: 8 clients on 8 adapters vs on the base), data (``jlora.data.Loader``: records/s and memory
streaming 100k- and 1M-record JSONL files).

A partial run (``--sections``) keeps the other sections: from ``bench/results/latest.json`` when it holds a
full-size run, else as they stand in ``bench/README.md`` (each marked with the run that measured it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
SECTIONS = ("figures", "train", "long_context", "inference", "bank", "compile", "gpu", "variants", "serve", "data")
TITLES = {"figures": "Deterministic figures: compiled FLOPs, trainable fraction, checkpoint bytes",
          "train": "Train step: jlora vs PEFT vs full fine-tuning (CPU)",
          "long_context": "Long context: train-step memory and time vs sequence length",
          "inference": "Inference: forward and generation",
          "bank": "Many adapters on one base: a bank of slots routed per row (jlora.bank)",
          "compile": "Compile time: unrolled layers vs nn.scan",
          "gpu": "GPU: bf16 tokens/s and MFU",
          "variants": "LoRA variants: DoRA step time, QLoRA memory",
          "serve": "Serving: 8 clients on 8 adapters vs on the base",
          "data": "Data: records/s and memory streaming 100k and 1M-record JSONL files (jlora.data.Loader)"}


def _variants(quick: bool) -> dict:
    try:
        from bench import variants
    except ImportError as e:
        return {"results": {"skipped": f"bench/variants.py not importable ({e})"},
                "markdown": f"Skipped: bench/variants.py is not importable ({e})."}
    fn = getattr(variants, "run", None) or getattr(variants, "main")
    try:
        out = fn(quick=quick)
    except TypeError:
        out = fn()
    if isinstance(out, dict) and "markdown" in out:
        return out
    return {"results": out, "markdown": "```\n" + json.dumps(out, indent=1, default=str)[:4000] + "\n```"}


def _section(name: str, args) -> dict:
    from bench import bank, compile_time, figures, gpu, inference, long_context, train_speed

    layers = 4 if args.quick else None
    repeats = 3 if args.quick else args.repeats
    if name == "figures":
        return figures.run()
    if name == "train":
        return train_speed.run(repeats=repeats, layers=layers)
    if name == "long_context":
        return long_context.run(repeats=repeats, layers=layers)
    if name == "inference":
        return inference.run(repeats=repeats, layers=layers)
    if name == "bank":
        return bank.run(repeats=repeats, layers=layers, quick=args.quick)
    if name == "compile":
        return compile_time.run(layers=layers)
    if name == "gpu":
        return gpu.run()
    if name == "variants":
        return _variants(args.quick)
    if name == "serve":
        from bench import serve
        return serve.run(repeats=repeats, layers=layers)
    if name == "data":
        from bench import data
        return data.run(quick=args.quick)
    raise ValueError(f"unknown section {name!r}; sections: {', '.join(SECTIONS)}")


def _environment() -> dict:
    import jax

    from bench import common

    env = {"python": platform.python_version(), "jax": jax.__version__, "machine": platform.machine(),
           "processor": _cpu_name(), "vector_extensions": _vector_extensions(), "threads": common.threads(),
           "devices": [str(d) for d in jax.devices()][:4],
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "load_average_at_start": os.getloadavg()}
    try:
        import peft
        import torch
        import transformers
        env.update(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)
    except ImportError:
        pass
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "sve2")


def _vector_extensions() -> list[str]:
    """The CPU's vector extensions that matter to XLA:CPU's and torch's kernels (from /proc/cpuinfo's flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith(("flags", "Features"))), [])
    except OSError:
        return []
    return [f for f in VECTOR_FLAGS if f in flags]


def _memory_table(train: dict) -> str:
    """Compiled memory of the 30-layer jlora steps (XLA's memory analysis of the executables the train section
    timed): LoRA keeps no full-size gradients or optimizer moments."""
    rows = []
    for mode in ("1", "all"):
        groups = train.get(mode, {}).get("groups")
        if not groups:
            continue
        entries = [("LoRA q,v", groups["q,v"].get("jlora LoRA")),
                   ("LoRA all linear", groups["all linear"].get("jlora LoRA")),
                   ("full fine-tuning", groups["q,v"].get("jlora full"))]
        for name, e in entries:
            m = (e or {}).get("memory") or {}
            if m:
                rows.append([name, f"{m.get('argument_size_in_bytes', 0) / 2**20:.1f}",
                             f"{m.get('temp_size_in_bytes', 0) / 2**20:.1f}",
                             f"{(e.get('flops') or 0) / 1e9:.1f}", f"{e.get('compile_s', 0):.1f}"])
        break
    if not rows:
        return ""
    from bench import common
    full = rows[-1]
    extra = [f"LoRA / full compiled temp memory: "
             + ", ".join(f"{r[0]} {float(r[2]) / float(full[2]):.3f}" for r in rows[:-1]) + "; arguments (params + "
             f"trainable state): " + ", ".join(f"{r[0]} {float(r[1]) / float(full[1]):.3f}" for r in rows[:-1]) + "."]
    return "\n".join(["Compiled memory of the timed 30-layer executables (XLA memory analysis; arguments are the "
                      "frozen params plus the trainable state and batch):", "",
                      common.md_table(["jlora step", "arguments MiB", "temp MiB", "GFLOP", "compile s"], rows), "",
                      *extra])


def _targets(report: dict) -> str:
    """The issue's targets, each with its measured value from this run."""
    secs = {k: v.get("results", {}) for k, v in report["sections"].items()}
    rows = []

    def add(target, value, limit, note="", at_least=False):
        if value is None:
            return
        met = "yes" if (value >= limit if at_least else value <= limit) else "**no**"
        rows.append([target, f"{value:.3f}", f"{'>=' if at_least else '<='} {limit:.2f}",
                     "unreliable" if "contended" in note else met, note])

    def rounds(group, num, den="PEFT LoRA"):
        """The range of the per-round ratios behind a median (this machine's noise), as a note."""
        a, b = group.get(num, {}).get("wall_s"), group.get(den, {}).get("wall_s")
        if not a or not b:
            return ""
        r = [x / y for x, y in zip(a, b)]
        return f"; rounds {min(r):.3f}-{max(r):.3f}"

    train = secs.get("train", {})
    for mode, label in (("1", "1 thread"), ("all", "all cores")):
        for tset in ("q,v", "all linear"):
            group = train.get(mode, {}).get("groups", {}).get(tset, {})
            note = "aim <= 0.85"
            one = train.get("1", {}).get("groups", {}).get(tset, {}).get("PEFT LoRA", {}).get("wall_median_s")
            here = group.get("PEFT LoRA", {}).get("wall_median_s")
            if mode == "all" and one and here and here > one:
                note += (f"; **contended**: PEFT took {here:.1f} s on all cores vs {one:.1f} s on one core, so "
                         f"another process held the cores (torch's OpenMP waits suffer most); trust 1 thread")
            add(f"jlora LoRA / PEFT LoRA step, {tset}, {label}", group.get("ratios", {}).get(
                "jlora LoRA / PEFT LoRA (wall)"), 0.90, note + rounds(group, "jlora LoRA"))
            multi = next((k for k in group.get("ratios", {}) if "steps/call" in k and k.endswith("(wall)")), None)
            if multi:
                name = multi.split(" / ")[0]
                add(f"{name} / PEFT LoRA step, {tset}, {label}", group["ratios"][multi], 0.90,
                    note + rounds(group, name) + "; `jlora.scan_steps`: the same steps, several per call")
    long = secs.get("long_context", {})
    if long.get("temp_ratio") is not None:
        add(f"train-step temp memory, T=4096 / T=1024 (batch 1, q,v)", long["temp_ratio"], 4.5,
            f"whole-matrix attention: {long.get('temp_ratio_xla', float('nan')):.2f}")
    if long.get("step", {}).get("ratio_wall") is not None:
        add("jlora LoRA / PEFT LoRA step, T=2048, batch 1, q,v, 1 thread", long["step"]["ratio_wall"], 0.85,
            f"CPU-time ratio {long['step']['ratio_cpu']:.3f}" + rounds(long["step"], "jlora LoRA"))
    flops = secs.get("figures", {}).get("flops", {})
    add("LoRA / full compiled FLOPs, q,v", flops.get("q,v"), 0.69)
    add("LoRA / full compiled FLOPs, all linear", flops.get("all linear"), 0.72)
    ratios = secs.get("inference", {}).get("ratios", {})
    add("merged forward / base forward", ratios.get("merged / base"), 1.02)
    add("unmerged forward / base forward (r=16, q,v)", ratios.get("unmerged / base"), 1.10)
    bank = secs.get("bank", {}).get("ratios", {})
    bank_cpu = secs.get("bank", {}).get("cpu_ratios", {})

    def cpu_note(key):
        return f"CPU-time ratio {bank_cpu[key]:.3f}" if key in bank_cpu else ""

    for kind, label in (("forward", "forward (16 rows, r=16, q,v)"), ("generation", "32-token generation")):
        key = f"bank / one adapter, {kind}"
        add(f"bank of 16 adapters / one adapter, {label}", bank.get(key), 1.15, cpu_note(key))
    for kind in ("forward", "generation"):
        key = f"one at a time / bank, {kind}"
        add(f"16 adapters one at a time (batch 1) / bank, {kind}", bank.get(key), 5.0,
            "speedup; " + cpu_note(key) + ("; compute-bound on a CPU, see the section" if kind == "forward" else ""),
            at_least=True)
    if not rows:
        return ""
    from bench import common
    return common.md_table(["target", "measured", "target", "met", "note"], rows)


NOTES = """## What bounds the CPU train step (profiled with jax.profiler, XLA dumps and getrusage, 1 thread)

- Both sides spend most of the step in the same fp32 matmuls (SmolLM2 shape, batch 4 x 128: about 290 GFLOP
  for a LoRA step, 20% of it the tied 49152-word output projection and its input gradient), at 70-90 GFLOP/s
  per core on the AVX2 CPU of these first profiles (100-108 on the AVX-512 CPU of the later figures, a Zen 4 EPYC
  whose 512-bit FMAs run as two 256-bit halves, so its fp32 peak per cycle is AVX2's): XLA:CPU's YNNPACK dots and
  torch's MKL sgemm are within a few percent of each other on each shape. In user CPU time jlora's q,v step is already a little below PEFT's (3.8 s vs 3.9-4.0 s).
- The rest was system time: XLA:CPU allocates a step's scratch ("temp") memory afresh on every call, as one
  fresh mapping whose every page the kernel faults in and zeroes (about 3 us per 4 KiB page here). With 915 MiB
  of temp the q,v step paid 234k page faults, 0.75 s, per step; torch's allocations mostly reuse freed heap
  memory (98k faults, 0.25 s, nearly all its (B, T, vocab) buffers). So on this CPU, scratch memory is time.
- What this round changed (all in the library, used by every jlora model and `jlora train`):
  `jlora.loss.fused_causal_lm_loss` computes logits, loss and their gradients one chunk of tokens at a time
  (no (B, T, vocab) logits); the token NLL, the attention softmax and the silu gate got custom VJPs that save
  only what the backward pass needs (per layer 24.2 -> 16.6 MiB of temp). q,v step temp 915 -> 598 MiB, faults
  234k -> 153k per step; all linear 1266 -> 949 MiB. An XLA reduction with a fused exp (a slow path that
  took 180 ms on the logits) is avoided by writing the exponentials once.
- `jlora.scan_steps` (and `train.steps_per_call` in run configs) runs n steps in one call, so the scratch is
  faulted in once per call instead of once per step (38k faults per step at 4 steps/call): the
  "4 steps/call" rows. The same steps and numerics (tested against one call per step).
- Why the scratch came back as fresh pages every call: glibc gives a block over its mmap threshold (32 MiB at
  most) its own mapping and unmaps it when freed, and XLA:CPU's threads allocate from per-thread arenas whose
  heaps cannot hold a block over 64 MiB (turning off mmap alone left the faults; one arena as well removed them).
  `jlora.runtime.keep_freed_memory()` (one arena, no mmap'd blocks, no trimming) makes glibc keep the freed
  block and hand it back on the next call: page faults per q,v step 153k -> 2 and per all-linear step 243k -> 0,
  q,v step 3.38 -> 3.33 s and all-linear 4.24 -> 3.39 s in a side run (30 layers, 4 x 128, 1 core). `jlora
  train` and `jlora eval` call it at start, and the train-step tables here run both contenders with it (in one
  process, so PEFT gets it too: its own faults, 111k-116k per step, also drop to ~0). Its cost: the process keeps
  its peak memory. (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, transparent huge pages for malloc'd memory, was an
  earlier partial fix: 0.94 on q,v in a side run.) Its trim threshold was first 2**31 - 1, the largest value
  mallopt's int takes, and a freed block over 2 GiB was still handed back: the T = 2048 step (2.2 GB of temp)
  faulted 565k pages per call (0.96 -> 1.04 vs PEFT). -1, which turns trimming off, fixed it (0 faults).
- Where a step's time goes now (jax.profiler on a 4-layer q,v step at 4 x 128, 1 core): 93% of XLA's thunk
  time is in YNNPACK dot fusions running at 97-108 GFLOP/s; the rest is the loss's exponentials and small
  elementwise fusions. On these shapes XLA's dots are as fast as torch's MKL or faster (1 core, GFLOP/s, torch
  vs XLA: 512x576x1536 97.5 vs 103.5; 512x1536x576 98.8 vs 104.0; 512x576x576 98.9 vs 105.6; the head's
  256x576x49152 73.0 vs 84.7 and 256x49152x576 97.4 vs 97.2), and so is attention (one layer, forward +
  backward, ms: 4 x 128 jlora 6.8 vs torch SDPA 8.5; 1 x 2048 blocked 236 vs 259). Fitting step time against
  layer count (2 and 8 layers, same process): per layer 84.7 vs 88.5 ms for PEFT (0.957) and 608 vs 649 ms
  outside the layers (head, loss, optimizer; 0.94) at 4 x 128; 569.5 vs 594.4 ms and 2401 vs 2596 ms at
  1 x 2048. Both sides do the same FLOPs and their matmuls run within a few percent of each other, so what is
  left to win is the time outside the big dots; the next bullet is what that turned out to be.
- Five XLA:CPU code-generation pitfalls, found in the per-op profiles and the optimized HLO after the figures
  above (each fix is in the library and tested on the compiled HLO or against plain jnp; times 1 core):
  (1) XLA fused the rotary tables' `cos` and `sin` into every consumer, each layer's q and k rotations forward and
  backward, and evaluated them once per head there (about 80 ms of a 30-layer 4 x 128 step; with `jlora.scan_steps`
  the tables were hoisted out of the loop, which is why "4 steps/call" was faster). `jlora.fusion.as_buffer`
  computes them once per call, inside a conditional whose two branches are the same function (XLA removes
  optimization barriers before fusion; it neither fuses into a conditional's result nor folds across it).
  1-step q,v ratio 0.941 -> 0.918 in a section rerun. (2) A LoRA factor's gradient `x^T g` (in, r) ran as an
  Eigen dot at 0.34 ms for 576 x 16, against 0.11 ms for `g^T x` (r, in) plus a transpose, which XLA folds back
  into the slow form; `lora_dense` now takes A's tangent transposed through the same conditional (down_proj:
  2.27 -> ~0.7 ms per layer; gradients bit-identical). All-linear ratio 0.910 -> 0.889 in a rerun.
  (3) Each chunk of the fused loss reads the 113 MB output projection twice; chunks of 128 MiB of logits instead
  of 64 made a 30-layer 4 x 128 step 0.991x and a 2-layer 1 x 2048 step 0.962x, for 94 MiB more scratch.
  (4) The blocked kernel's backward laid tile pairs out queries first, so dk and dv contracted both operands'
  first axes (an Eigen dot about 1.5x slower); keys first, all five products per pair take the fast forms: one
  layer's attention, forward + backward at 1 x 2048, 232 -> 207 ms. (5) At batch 1, a last-axis reduction with an
  elementwise product fused in runs 10x-100x slower when the array's leading axis has size 1 (`sum(a * b, -1)`:
  (1, 2048, 576) 3.45 ms, the same data as (2048, 576) 0.26 ms; (1, 2048, 1536) 35 ms): RMSNorm forward +
  backward at 1 x 2048 took 12.6 ms instead of 1.1, per norm. The norms, softmax, blocked kernel and loss now drop
  leading unit axes first (`jlora.fusion.squeeze_leading`; merging all leading axes into one also worked for the
  norm, but XLA moved that reshape back past the attention's reduction). T = 2048 ratio 0.961 -> 0.875 in a
  `--step` rerun (before the attention-reduction part of (5)).
  Tried and dropped: the keys-first layout for the whole-matrix (one-tile) attention's backward (6.0 -> 6.5 ms
  per layer at 4 x 128: transposing the probabilities costs more than the faster dots save); a differently
  written sigmoid in the silu gate's backward, so that XLA does not merge it with the forward's (0.997x, noise);
  tiles of 256 for the new backward (214 vs 211 ms).
- Since then (A/B in one process, 1 core, median of alternating calls): the blocked kernel scales q once before
  tiling instead of every forward score tile (a pass over each tile fewer; bit-identical at D = 64) and turns dq
  back to (queries, D) as a buffer of its own (fused into the rope backward, its strided reads cost more): a
  4-layer step at 1 x 2048, 0.998x; the T = 2048 ratio stayed within noise (0.869 -> 0.871).
  Tried and dropped: the blocked backward with query tiles outer and key tiles inner (G times fewer bytes copied
  per tile pair, but dq's accumulation no longer fuses: 0.996x against 0.994x for the q scaling alone, one layer's
  attention); a custom VJP for the whole-matrix attention that takes dk and dv from transposed q and g
  (faster alone, 0.93-0.99x, but 1.000-1.007x inside an 8-layer 4 x 128 step: the transposes' copies and the
  slower fused softmax-backward dot eat the gain); the silu gate's backward through tanh (1.004x at 1 x 2048);
  a conditional in front of the softmax backward so that XLA does not fuse it into the dot (1.000x).
  Why fewer loss chunks are faster: YNNPACK packs a dot's right-hand operand on every call, about 0.11 ms per MB
  (a fitted 10-13 ms for the 113 MB head, against 0.53 ms per token row), and each chunk packs the head twice.
  Chunks of 256 MiB of logits instead of 128 made a 2-layer 1 x 2048 step 0.982x (about 62 ms, 0.4% of the
  30-layer step) for 192 MiB more scratch; 512 MiB (one chunk) was slower again (1.008x, 375 MiB more). Kept at
  128 MiB: 4 x 128 already fits in one chunk, and scratch is what limits context length.
  Where the 1 x 2048 step goes now (2-layer profile): the fused loss 2.35 s (8 head dots at ~102 GFLOP/s); per
  layer ~490 ms, of which ~441 ms dots at 104-108 GFLOP/s (MLP 204, projections 77, attention tiles ~160) and
  ~42 ms the rest (attention exponentials ~15, tile copies ~12, the memory-bound silu gate ~7). The causal
  diagonal tiles computed their masked half (~9.6 of ~21 ms of diagonal dots per layer); they now run in halves
  that skip the fully masked quarter (half- and quarter-size tile dots take 0.52 and 0.26 of a full one's time):
  one layer's attention 0.975-0.985x at 1 x 2048 and 0.944x at 512; a 4-layer 1 x 2048 step 0.998x and 1.006x in
  two runs, i.e. within this machine's noise, as is the T = 2048 ratio (per-round ratios 0.845-0.905 in this run;
  jlora's first timed round ran slow in three of the last four runs).
  Tried and dropped after that (one layer's attention at 1 x 2048, forward + backward, A/B in one process): the
  diagonal tiles in parts of 32 slots instead of halves (1.006x), and tiles of 256 with their diagonal in parts
  of 64 (1.001x; as much masked work as 128 in halves, a quarter of the tile pairs): the kernel's remaining
  non-dot time does not shrink with fewer, larger tile pairs. In the loss, folding the softmax's normalizer and
  the target's one-hot into the head gradient (`(e W) / sum(e) - W[target]`, one pass over the logits fewer) saved
  about 6 ms of a 700 ms 512-token chunk (0.996x): not worth a second code path for a trained output layer.
  The T = 2048 comparison now times 5 rounds instead of 3 (per-round ratios 0.865-0.941 in its first run, median
  0.875, the same as with 3). How close the step is to this core's limit: a 1024^3 matmul runs at 107 GFLOP/s
  here, the step's dots at 104-108, and they are ~91% of its time; both sides do the same FLOPs. A ratio of 0.85
  would need about a third of the remaining non-dot time gone (exponentials, tile copies, memory-bound gates).
  A fresh 30-layer profile at 1 x 2048 showed dq's "buffer of its own" from the paragraph before last was not
  one: XLA:CPU gave the transpose inside the conditional a transposed layout, so it compiled to a bitcast and the
  rope backward read dq strided anyway (3.4 ms per layer). Forcing a real copy (a reshape in the branch) ran
  1.002x; a plain transpose without the conditional 0.997x and 1.003x at 1 x 2048, 0.993x at 1 x 1024 (30-layer
  steps, A/B in one process): the conditional is gone. Also tried: the blocked kernel, with its diagonal halves,
  for one-tile sequences instead of the whole matrix (one layer's attention 6.52 -> 6.21 ms at 4 x 128, but the
  30-layer 4 x 128 step 1.003x): the picker keeps the whole matrix there.
- Where the T = 2048 step stands against PEFT, by layer count (2 and 6 layers, 1 x 2048, 1 core, same process):
  per layer 539 vs 584 ms (0.922), outside the layers (head, loss, optimizer) 2290 vs 2755 ms (0.831). A layer is
  ~290 ms of linear-layer dots (at 100-110 GF/s) plus ~210 ms of attention, forward and backward; the attention's
  loop structure alone (9 heads cut to 1, head size 64 to 8: the same tile pairs and loop trips) takes 6 ms, and
  exp 7.5 ms (replaced by a multiply). Its 17.4 GFLOP of tile-sized products run at 103-124 GF/s in a loop whose
  operands stay in cache (its own cost subtracted), which would be ~160 ms: the other ~45 ms are the elementwise
  passes over each (G*t, t) score tile, the tile copies, and products reading operands from farther out than
  the hot loop does. Tried: the causal tile pairs as round-robin rounds
  (each round pairs every tile with another, so the n/2 pairs of a round have distinct query and key tiles and
  run as one batched product, n - 1 loop trips instead of n(n+1)/2, plus one batched step for the diagonal):
  exact, but 1.28x slower for one layer at T = 2048, since a round's scores (8 tile pairs, 4.7 MB)
  spill the 1 MB L2 cache that one tile pair's scores fit in.
- How far 0.85 is from this core's limit at T = 2048 (the 30-layer step, 1 core): its products come to about
  1,620 GFLOP (per layer 29 of linear layers forward and input gradient, 17.4 of attention; 232 for the head and its
  input gradient), 15.2 s at the 107 GF/s of a 1024^3 matmul here, against PEFT's fastest step of 20.5 s (0.85 of
  it is 17.4 s; jlora's fastest was 17.8 s). A 2-layer profile puts 93% of XLA's thunk time in dot fusions (at
  93-103 GF/s for the layers' products, 99 for the head) and 62 ms per layer plus 106 ms in the loss's
  exponentials and reductions elsewhere; so the last 0.02 would need the dots themselves faster, or half of all
  the non-dot time gone. Fusing each layer's q, k, v kernels into one (576, 960) product and gate, up into one
  (576, 3072), forward and input gradient at 1 x 2048, was no faster (179.5 vs 175.4 ms, median of 15 A/B calls).
- The same targets on an AVX2 CPU (AMD EPYC Zen 3, family 25 model 1: avx2, fma, no AVX-512; 1 core, in one
  process per figure, contenders alternating): jlora / PEFT at 4 x 128 was 0.996 on q,v and 0.921 on all linear
  layers (4 steps per call: 0.940 and 0.963), jlora full / torch full 1.122, and at T = 2048 0.928; Zen 4 runs had
  0.906, 0.825 and 0.897 (2026-12-06) and 0.896, 0.856 and 0.848 (2026-12-07, the tables above), with no change to
  the step between those two runs: on the Zen 4 the 1-thread q,v and T = 2048 ratios sit at their limits, and
  which side of them a run lands on is this machine's noise (see each row's rounds). Fitting 2- and 8-layer q,v steps at 4 x 128: per layer 113.1 vs 114.7 ms
  (0.986), outside the layers 705 vs 730 ms (0.965); at 1 x 2048: 759 vs 774 ms (0.981) and 2865 vs 3021 ms
  (0.948), though that fit predicts 0.977 for 30 layers where the 30-layer run gave 0.928. Both sides do the same FLOPs and the step is dot-bound: in
  4-layer profiles, XLA's dot fusions took 93% of jlora's step and aten::mm 85% of PEFT's. On this core torch's
  MKL sgemm runs the layers' shapes at 90-92 GF/s and XLA's YNNPACK dots at 73-89 (one matmul, 1 core), so the
  ~10% that jlora wins elsewhere (fused loss, attention, fewer scratch pages) is what keeps the ratio near 1.
  Attention alone at T = 2048 (one layer, forward + backward): blocked 281 ms vs torch's SDPA 330; tiles of 64,
  256 and 512 took 292, 367 and 341 ms, so 128 stays. Screened here too: YNNPACK off (Eigen dots), XNNPACK dot
  fusions, oneDNN (q,v step 1.12-1.21x PEFT's, against 0.97 with the defaults) and one (576, 960) q, k, v
  product (no faster), as on the Zen 4. Also tried there: the blocked kernel's loops as flat scans of static
  length over the tile pairs (which JAX can differentiate in reverse twice; today's loops with traced bounds
  cannot), with each pair updating its tile of whole-sequence accumulators: one layer's attention, forward +
  backward, 1.03x at T = 2048 and 1.07x at T = 4096 (more dynamic slices and updates per pair); not taken.
  Measured on this core later: the layers' products ran 0.88-1.11x torch's time at 1 x 2048 (only down_proj's
  x W faster) and 1.03-1.09x at 512 rows (one matmul per form, x W and g W^T), and the head's input gradient (512 x 49152 x 576) 57-70 GF/s
  against MKL's 70-84. Tried for it: that product summed over vocabulary chunks of 2048 (XLA packs a 4.7 MB slice
  of the head per dot instead of all 113 MB), 0.91x alone and 0.94-0.99x for the fused loss alone, but 1.04x and
  1.08x for the 30-layer 4 x 128 step (A/B in one process): not taken. One layer's blocked attention run one KV
  head at a time (a (G*t, t) score tile of 196 KB instead of three in a 512 KB L2): 0.987x; not pursued.
  Tried on this core later still: the fp32 products of the linear layers and the head through OpenBLAS 0.3.31 (the
  copy numpy bundles) instead of XLA's dots, as an XLA FFI custom call wrapped in a JAX primitive with transpose
  rules (so autodiff runs through it; 2-D products, transposes passed to sgemm as flags). One matmul at 512 rows:
  0.91-0.95x XLA's time where the inner size is 576, 1.01x where it is 1536, 0.92x for the head's two products.
  The 30-layer q,v step at 4 x 128: 0.923x XLA's time (the same loss to 1e-6; 0.925 vs PEFT in that run, where
  XLA's step was 0.991); at 1 x 2048: 0.986x (0.919 vs PEFT, XLA's 0.971). Not taken: it reaches neither target,
  and it would need a C++ compiler on the user's machine, numpy's private library, rules of its own for vmap and
  sharding (XLA cannot partition a custom call), and on the AVX-512 CPU XLA's dots already beat MKL's.
- Sharded steps keep two matmuls per adapted layer (`transform.separate_low_rank`, entered by
  `jlora.parallel.make_sharded_train_step` when any frozen param is sharded): concatenating a sharded W with
  `s B` made XLA re-shard it (a 2-layer step on a tensor=2, fsdp=4 CPU mesh compiled to 79 all-gathers instead of
  12); replicated params (data parallel) keep the one-matmul form.
- The all-linear step's extra scratch: with every linear layer adapted, XLA:CPU fused each low-rank add
  `x W + (x A) B` into all its consumers (gate and up feed the silu gate, forward and backward), so it kept
  both (tokens, out) addends alive until the backward pass instead of their sum: 28.3 MiB of temp per layer at
  4 x 128, against 16.6 for q,v (optimization barriers are dropped by XLA:CPU; `jax.checkpoint` with a name
  policy made it larger, 17.8 / 30.5 MiB). On CPU the transform now computes an adapted `nn.Dense` as one
  matmul, `[x, x A] [W; s B]` (`jlora.transform.lora_dense`, a custom JVP whose frozen-kernel tangent is a
  symbolic zero, so no weight gradient is computed), which yields the sum itself: 22.3 MiB per layer (the rest
  over q,v is the inputs of the extra adapted layers, which their A gradients need); q,v unchanged. The
  30-layer all-linear step: temp 949 -> 774 MiB, the same compiled FLOPs, step time 1.005x the two-matmul form
  (1 core, median of 7 alternating calls in one process; 12 layers: 1.005x, q,v 1.000x), so copying W into
  `[W; s B]` costs about half a percent here. Other backends keep the two-matmul form (not measured there: no
  GPU in this run).
- Screened and rejected: XLA:CPU flags (fast math, vector width, oneDNN/XNNPACK dot fusions instead of
  YNNPACK, eltwise/reduce fusion types, schedulers): none beat the defaults; smaller loss chunks (fewer faults,
  but the 113 MB head weight is re-read per chunk: slower); `nn.scan` over layers (fewer faults, more user time).
- On all cores, a shared machine penalizes the side with more parallel regions per step (torch's eager ops
  wait for descheduled OpenMP threads); the 1-thread table is the steadier comparison.
- Two figures measured when the code went in (1 thread, SmolLM2 shape), kept here rather than in docstrings:
  attention laid out head-major (`jlora.models.attention.dense`: each KV head's query heads stacked
  along the query axis, so XLA:CPU needs one plain transpose per operand instead of strided copies around every
  batched matmul) takes about 17% less time for an attention block, forward and backward; and the scratch memory
  a q,v train step allocates afresh on every call (about 0.6 GB) costs about a tenth of the step's time in page
  faults, which `jlora.scan_steps` pays once per call instead of once per step.
- Attention kernels, measured when the blocked kernel went in (process CPU ms of one SmolLM2 layer's attention,
  forward + backward, 1 thread, median of 5): T = 2048, batch 1: whole matrix 1285, blocked with tiles of
  64 / 128 / 256 / 512 tokens 373 / 339 / 417 / 554 (so 128 on CPU); T = 512: 73 vs 21 (tiles of 128); batch 4 x
  128: 10 vs 10, and the whole train step was 4-5% faster with the whole-matrix kernel, so one-tile calls keep it.
  A first version that unrolled the tile pairs in Python let XLA:CPU's scheduler run many of them at once (temp
  217 MiB for one layer at T = 2048, still growing with T^2); loops (`lax.scan` over query tiles, `fori_loop`
  over key tiles) fix the order: 21 MiB at T = 2048, 42 MiB at 4096.
"""


KEPT = ("Rows of sections not measured in this run are kept from the previous bench/README.md; each such section "
        "says which run measured it.")


def _previous_readme(path: str) -> dict:
    """What a partial run keeps of the README it replaces: ``{"started", "blocks": {title: text}, "targets":
    [row cells]}`` (empty when there is no README)."""
    try:
        with open(path) as f:
            return _previous_readme_text(f.read())
    except OSError:
        return {"started": None, "blocks": {}, "targets": []}


def _previous_readme_text(text: str) -> dict:
    """:func:`_previous_readme` of a README's text."""
    run = re.search(r"^Run (\S+) \(", text, re.M)
    blocks = {}
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        title, _, body = part.partition("\n")
        blocks[title.strip()] = body.strip("\n")
    table = blocks.get("Targets", "").split(KEPT)[0]
    lines = [line for line in table.splitlines() if line.startswith("|")][2:]   # past the header and its rule
    targets = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    return {"started": run.group(1) if run else None, "blocks": blocks, "targets": targets}


def _readme(report: dict, previous: dict | None = None) -> str:
    """The README text; sections missing from ``report`` are kept from ``previous`` (:func:`_previous_readme`)."""
    env = report["environment"]
    previous = previous or {"started": None, "blocks": {}, "targets": []}
    missing = [n for n in SECTIONS if n not in report["sections"] and TITLES[n] in previous["blocks"]]
    when = previous["started"] or "a previous run"
    targets = _targets(report)
    if missing:
        have = {line.split("|")[1].strip() for line in targets.splitlines()[2:]}
        kept = [row for row in previous["targets"] if row and row[0] not in have]
        if kept:
            from bench import common
            rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in targets.splitlines()[2:]]
            targets = common.md_table(["target", "measured", "target", "met", "note"], kept + rows) + "\n\n" + KEPT
    ext = env.get("vector_extensions")
    lines = ["# jlora benchmarks", "",
             "Generated by `make bench` (`python -m bench.run`); every ratio is measured side by side in one run. "
             "Raw samples: `bench/results/*.json` (not committed).", "",
             f"Run {report['started']} ({report['total_s']:.0f} s): {env['processor']}"
             + (f" ({', '.join(ext)})" if ext else "") + f", {env['threads']} threads, "
             f"jax {env['jax']}, torch {env.get('torch', '-')}, transformers {env.get('transformers', '-')}, "
             f"peft {env.get('peft', '-')}; load average at start {env['load_average_at_start'][0]:.1f} "
             f"(the machine may be shared: compare ratios, not absolute times)."
             + (" **Quick mode: 4 layers, 3 repeats.**" if report["quick"] else ""), "",
             "## Targets", "",
             "Step-time ratios are medians of per-round ratios (the contenders alternate round by round); "
             "\"rounds\" gives the lowest and highest per-round ratio, this machine's noise in that run. A "
             "median within that range of a limit can land on either side of it in the next run.", "",
             targets, ""]
    for name in SECTIONS:
        sec = report["sections"].get(name)
        if sec is None:
            if name in missing:
                block = previous["blocks"][TITLES[name]]
                lines += [f"## {TITLES[name]}", "", block, ""]
                if "(measured in the run of" not in block:
                    lines += [f"(measured in the run of {when})", ""]
            continue
        when = sec.get("measured", report["started"])
        lines += [f"## {TITLES[name]}", "", sec.get("markdown", ""), ""]
        if when != report["started"]:
            lines += [f"(measured in the run of {when})", ""]
        if name == "train" and isinstance(sec.get("results"), dict):
            lines += [_memory_table(sec["results"]), ""]
    lines += [NOTES]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per contender after warm-up (>= 5)")
    parser.add_argument("--quick", action="store_true", help="4 layers, 3 repeats; writes no README")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite bench/README.md")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite bench/README.md from bench/results/latest.json")
    args = parser.parse_args(argv)
    readme = os.path.join(HERE, "README.md")
    if args.render:
        with open(os.path.join(HERE, "results", "latest.json")) as f:
            report = json.load(f)
        previous = _previous_readme(readme)
        with open(readme, "w") as f:
            f.write(_readme(report, previous))
        return 0
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    t0 = time.perf_counter()
    report = {"started": started, "quick": args.quick, "environment": _environment(), "sections": {}}
    latest = os.path.join(HERE, "results", "latest.json")
    if not args.quick and set(names) != set(SECTIONS) and os.path.exists(latest):
        # a partial run keeps the other sections of the last full-size run (each says when it was measured)
        with open(latest) as f:
            previous = json.load(f)
        if not previous.get("quick"):
            for name, sec in previous.get("sections", {}).items():
                sec.setdefault("measured", previous.get("started"))
                report["sections"][name] = sec
    failed = []
    for name in names:
        print(f"[bench] {name} ...", flush=True)
        s0 = time.perf_counter()
        try:
            report["sections"][name] = _section(name, args)
        except Exception as e:  # one failing section must not lose the others' results
            failed.append(name)
            report["sections"][name] = {"results": {"error": repr(e)}, "markdown": f"**Failed**: `{e!r}`",
                                        "traceback": traceback.format_exc()}
            traceback.print_exc()
        report["sections"][name]["seconds"] = time.perf_counter() - s0
        report["sections"][name]["measured"] = started
        print(report["sections"][name]["markdown"] + "\n", flush=True)
    report["total_s"] = time.perf_counter() - t0
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    for fname in (f"{started.replace(':', '')}.json", "latest.json"):
        with open(os.path.join(HERE, "results", fname), "w") as f:
            json.dump(report, f, indent=1, default=str)
    if not (args.quick or args.no_readme):
        previous = _previous_readme(readme)
        with open(readme, "w") as f:
            f.write(_readme(report, previous))
    print(f"[bench] done in {report['total_s']:.0f} s; results in bench/results/latest.json", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
