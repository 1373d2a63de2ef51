"""Section: long context. Compiled scratch memory of the LoRA train step as the sequence grows, and the step time
vs PEFT at 2,048 tokens (SmolLM2-135M shape, batch 1, rank 16 on q,v, AdamW, fp32).

Memory: XLA's memory analysis of the compiled step (nothing runs) at T = 512 ... 4096, with jlora's attention as
chosen on this platform ("auto": the blocked kernel on CPU) and with the whole-matrix reference (``attention="xla"``,
the kernel jlora used before), whose saved probabilities grow with T^2. Time: jlora's step vs PEFT's (transformers'
SDPA attention, a fused flash kernel on CPU) in one process pinned to one core (the steadier comparison on a shared
machine, see bench/train_speed.py), contenders alternating round by round.

    python -m bench.long_context --step --out /tmp/step.json    # only the timed comparison, JSON to a file
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile

from bench import common, steps
from jlora import runtime

LENGTHS = (512, 1024, 2048, 4096)
STEP_LENGTH = 2048
WARMUP = 2   # rounds: the heap settles once each side has run after the other (see common.interleaved)


def temp_memory(length: int, attention: str, *, layers: int | None = None) -> dict:
    """Compiled memory (MiB) and compile time of the batch-1 LoRA q,v step at ``length`` tokens."""
    hf = common.hf_config(**({} if layers is None else {"num_hidden_layers": layers}))
    model, params = common.jlora_model(hf, attention=attention)
    c = steps.jlora_lora(model, params, common.token_batch(batch=1, seq=length), common.QV, count_flops=False)
    mib = {k.replace("_size_in_bytes", "_mib"): v / 2**20 for k, v in c.memory.items()}
    return {**mib, "compile_s": c.compile_s}


def step_times(*, length: int = STEP_LENGTH, repeats: int = 5, layers: int | None = None) -> dict:
    """jlora's and PEFT's LoRA q,v step at batch 1 x ``length``, in this process (pin it first)."""
    common.set_torch_threads(common.threads())
    hf = common.hf_config(**({} if layers is None else {"num_hidden_layers": layers}))
    ids = common.token_batch(batch=1, seq=length)
    model, params = common.jlora_model(hf)
    jl = steps.jlora_lora(model, params, ids, common.QV, count_flops=False)
    fns = {"jlora LoRA": jl.run, "PEFT LoRA": steps.torch_step(common.torch_model(hf), ids, targets=common.QV)}
    samples = common.interleaved(fns, repeats=repeats, warmup=WARMUP)
    out = {name: s.summary() for name, s in samples.items()}
    out["ratio_wall"] = common.paired_ratio(samples, "jlora LoRA", "PEFT LoRA")
    out["ratio_cpu"] = common.paired_ratio(samples, "jlora LoRA", "PEFT LoRA", "cpu")
    out["jlora_loss"] = jl.loss()
    out["threads"] = common.threads()
    return out


def run(*, repeats: int = 5, layers: int | None = None, lengths=LENGTHS) -> dict:
    results = {"lengths": list(lengths), "memory": {}}
    rows = []
    for attention in ("auto", "xla"):
        results["memory"][attention] = mem = {}
        for t in lengths:
            mem[t] = temp_memory(t, attention, layers=layers)
            gc.collect()
    auto, ref = results["memory"]["auto"], results["memory"]["xla"]
    for t in lengths:
        rows.append([t, f"{auto[t]['temp_mib']:.0f}", f"{auto[t]['temp_mib'] / auto[lengths[0]]['temp_mib']:.2f}",
                     f"{ref[t]['temp_mib']:.0f}", f"{ref[t]['temp_mib'] / ref[lengths[0]]['temp_mib']:.2f}",
                     f"{auto[t]['argument_mib']:.0f}", f"{auto[t]['compile_s']:.1f}"])
    base = 1024 if 1024 in lengths else lengths[0]
    top = lengths[-1]
    results["temp_ratio"] = auto[top]["temp_mib"] / auto[base]["temp_mib"]
    results["temp_ratio_xla"] = ref[top]["temp_mib"] / ref[base]["temp_mib"]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "step.json")
        args = ["--step", "--repeats", str(repeats), "--out", out] + ([] if layers is None else
                                                                        ["--layers", str(layers)])
        results["step"] = st = common.run_module("bench.long_context", *args, out=out)
    n_layers = layers or common.SMOLLM2["num_hidden_layers"]
    md = [f"SmolLM2-135M shape ({n_layers} layers), batch 1, LoRA r=16 on q,v, AdamW, fp32. Compiled scratch ('temp') "
          f"memory of the train step (XLA memory analysis; nothing runs): jlora's attention as chosen here "
          f"(`attention=\"auto\"`: the blocked kernel on CPU) vs the whole-matrix kernel it replaced "
          f"(`attention=\"xla\"`).", "",
          common.md_table(["T", "temp MiB", f"x T={lengths[0]}", "whole-matrix temp MiB", f"x T={lengths[0]}",
                           "arguments MiB", "compile s"], rows), "",
          f"temp({top}) / temp({base}): {results['temp_ratio']:.2f} with the blocked kernel (4.00 is linear, 16 "
          f"quadratic), {results['temp_ratio_xla']:.2f} with the whole-matrix one.", "",
          f"Step time at T = {STEP_LENGTH}, batch 1, {st['threads']} thread (process pinned to one core), median of "
          f"{repeats} steps after {WARMUP} warm-up rounds, alternating, in one process with "
          f"`jlora.runtime.keep_freed_memory()`:", "",
          common.md_table(["step", "wall s (median)", "process CPU s (median)"],
                          [[n, f"{st[n]['wall_median_s']:.2f}", f"{st[n]['cpu_median_s']:.2f}"]
                           for n in ("jlora LoRA", "PEFT LoRA")]), "",
          f"jlora LoRA / PEFT LoRA (median of per-round ratios): wall {st['ratio_wall']:.3f}, CPU time "
          f"{st['ratio_cpu']:.3f}."]
    return {"results": results, "markdown": "\n".join(md)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", action="store_true", help="only the timed step comparison (one core)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.step:
        runtime.keep_freed_memory()    # as `jlora train` does (before jax starts); PEFT, in this process, gets it too
        common.pin_one_core()          # before jax or torch start their thread pools
        result = step_times(repeats=args.repeats, layers=args.layers)
    else:
        result = run(repeats=args.repeats, layers=args.layers)
    with open(args.out, "w") as f:
        json.dump(result, f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
