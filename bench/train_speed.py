"""Section 1: train step time, jlora LoRA vs jlora full FT vs PEFT LoRA vs torch full FT (SmolLM2 shape).

Batch 4 x 128 random tokens, every token a target, rank 16 / alpha 32 on q,v and on all linear layers, AdamW,
fp32 on both sides, the same thread count. Each group's contenders alternate round by round (see
:func:`bench.common.interleaved`); the ratios are medians of per-round ratios.

Two thread settings, each in a fresh process (thread pools are fixed when XLA and torch start):
``all``: every core on both sides (XLA's default; ``torch.set_num_threads`` to match), and ``1``: the process
pinned to one core, so both sides run single-threaded. On a shared machine the second is the steadier
comparison: a multi-threaded step waits at every parallel region for a descheduled thread, which penalizes
torch's many small eager ops far more than XLA's few fused ones.

    python -m bench.train_speed --threads 1 --out /tmp/t1.json     # one setting, JSON to a file
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

MULTI = f"jlora LoRA, {common.STEPS_PER_CALL} steps/call"


def run(*, repeats: int = 5, layers: int | None = None, modes=("1", "all")) -> dict:
    """Runs :func:`measure` for each thread setting in its own process and joins the tables."""
    results, md = {}, []
    for mode in modes:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.json")
            args = ["--threads", mode, "--repeats", str(repeats), "--out", out]
            section = common.run_module("bench.train_speed", *args, *([] if layers is None else
                                                                      ["--layers", str(layers)]), out=out)
        label = "1 thread (pinned to one core)" if mode == "1" else f"all cores ({section['results']['threads']} threads)"
        results[mode] = section["results"]
        md += [f"### {label}", "", section["markdown"], ""]
    return {"results": results, "markdown": "\n".join(md).rstrip()}


def measure(*, repeats: int = 5, layers: int | None = None) -> dict:
    n = common.threads()
    common.set_torch_threads(n)
    hf = common.hf_config(**({} if layers is None else {"num_hidden_layers": layers}))
    ids = common.token_batch()
    results = {"threads": n, "batch": list(ids.shape), "layers": hf["num_hidden_layers"], "groups": {}}
    rows = []
    for label, targets in common.TARGET_SETS.items():
        model, params = common.jlora_model(hf)
        compiled = {"jlora LoRA": steps.jlora_lora(model, params, ids, targets),
                    MULTI: steps.jlora_lora(model, params, ids, targets, steps_per_call=common.STEPS_PER_CALL)}
        fns = {"jlora LoRA": compiled["jlora LoRA"].run, MULTI: compiled[MULTI].run,
               "PEFT LoRA": steps.torch_step(common.torch_model(hf), ids, targets=targets)}
        if label == "q,v":   # full fine-tuning does not depend on the targets: time it once, beside q,v
            compiled["jlora full"] = steps.jlora_full(model, params, ids)
            fns["jlora full"] = compiled["jlora full"].run
            fns["torch full"] = steps.torch_step(common.torch_model(hf), ids)
        samples = common.interleaved(fns, repeats=repeats)
        samples[MULTI] = samples[MULTI].scaled(1 / common.STEPS_PER_CALL)   # per step
        group = {name: s.summary() for name, s in samples.items()}
        for name, c in compiled.items():
            group[name].update(compile_s=c.compile_s, flops=c.flops, memory=c.memory, last_loss=c.loss())
        group["ratios"] = ratios = {
            "jlora LoRA / PEFT LoRA (wall)": common.paired_ratio(samples, "jlora LoRA", "PEFT LoRA"),
            "jlora LoRA / PEFT LoRA (cpu)": common.paired_ratio(samples, "jlora LoRA", "PEFT LoRA", "cpu"),
            f"{MULTI} / PEFT LoRA (wall)": common.paired_ratio(samples, MULTI, "PEFT LoRA"),
            f"{MULTI} / PEFT LoRA (cpu)": common.paired_ratio(samples, MULTI, "PEFT LoRA", "cpu")}
        if "jlora full" in samples:
            ratios["jlora LoRA / jlora full (wall)"] = common.paired_ratio(samples, "jlora LoRA", "jlora full")
            ratios["PEFT LoRA / torch full (wall)"] = common.paired_ratio(samples, "PEFT LoRA", "torch full")
            ratios["jlora full / torch full (wall)"] = common.paired_ratio(samples, "jlora full", "torch full")
        results["groups"][label] = group
        for name, s in samples.items():
            rows.append([label if "LoRA" in name else "(none)", name, f"{group[name]['wall_median_s']:.3f}",
                         f"{group[name]['cpu_median_s']:.3f}"])
        del fns, samples, model, params, compiled
        gc.collect()
    qv, al = results["groups"]["q,v"]["ratios"], results["groups"]["all linear"]["ratios"]
    target = qv["jlora LoRA / PEFT LoRA (wall)"]
    results["target"] = {"jlora LoRA / PEFT LoRA, q,v (wall)": target, "met (<= 1.00)": target <= 1.0,
                         "aim (<= 0.85)": target <= 0.85}
    md = [f"Batch {ids.shape[0]} x {ids.shape[1]}, {hf['num_hidden_layers']} layers, fp32, {n} threads on both "
          f"sides, median of {repeats} steps after warm-up (alternating contenders). \"{MULTI}\": "
          f"{common.STEPS_PER_CALL} steps in one call (`jlora.scan_steps`), per-step time = call time / "
          f"{common.STEPS_PER_CALL}. Both run in one process with `jlora.runtime.keep_freed_memory()`, as "
          f"`jlora train` runs.", "",
          common.md_table(["targets", "step", "wall s (median)", "process CPU s (median)"], rows), "",
          common.md_table(["ratio (median of per-round ratios)", "q,v", "all linear"],
                          [[k, common.fmt_ratio(v), common.fmt_ratio(al.get(k))] for k, v in qv.items()])]
    return {"results": results, "markdown": "\n".join(md)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", choices=("1", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    runtime.keep_freed_memory()   # as `jlora train` does (before jax starts); PEFT, in this process, gets it too
    if args.threads == "1":
        common.pin_one_core()   # before jax or torch start their thread pools
    section = measure(repeats=args.repeats, layers=args.layers)
    with open(args.out, "w") as f:
        json.dump(section, f, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
