"""LoRA variants: DoRA vs LoRA train-step time, and QLoRA (NF4 base) memory and step time vs LoRA on a bf16 base.

    python -m bench.variants [--quick]

Called by ``bench/run.py`` as ``run(quick=...)``, which returns ``{"results": {...}, "markdown": "..."}``.
Everything runs on the SmolLM2-135M shape (fewer layers, random weights) with rank 16 on all linear layers.
Step times are interleaved and reported as paired ratios measured in the same run; memory figures come from XLA's
memory analysis of the compiled train step (arguments = frozen params + state + batch, temp = activations and
workspace), so they are deterministic.
"""

from __future__ import annotations

import argparse
import json

from bench import common


def _step(model, params, ids, cfg):
    """A compiled jlora train step for ``cfg`` (AdamW) as ``(run, memory, flops)``."""
    import jax
    import jax.numpy as jnp
    import optax

    import jlora
    from bench import steps

    opt = optax.adamw(1e-4)
    adapters = jlora.init(params, cfg, key=jax.random.key(1))
    state = jlora.TrainState.create(adapters, opt, rng=jax.random.key(2))
    batch = {"input_ids": jnp.asarray(ids)}
    compiled = jax.jit(jlora.make_train_step(model, cfg, opt), donate_argnums=0).lower(state, params, batch).compile()
    box = {"state": state}

    def run():
        box["state"], metrics = compiled(box["state"], params, batch)
        return jax.block_until_ready(metrics)

    return run, steps._memory(compiled), steps._flops(compiled)


def run(*, quick: bool = False) -> dict:
    """Measures DoRA vs LoRA and QLoRA vs LoRA; returns ``{"results": ..., "markdown": ...}``."""
    import jax
    import jax.numpy as jnp

    import jlora
    from jlora.variants import quant

    layers, repeats = (2, 2) if quick else (4, 5)
    model, params = common.jlora_model(common.hf_config(num_hidden_layers=layers))
    ids = common.token_batch(batch=2 if quick else common.BATCH, seq=64 if quick else common.SEQ)
    lora = jlora.LoraConfig(rank=common.RANK, alpha=common.ALPHA, targets=common.ALL_LINEAR)
    dora = jlora.LoraConfig(rank=common.RANK, alpha=common.ALPHA, targets=common.ALL_LINEAR, use_dora=True)

    # DoRA vs LoRA on the fp32 base
    run_lora, mem_lora, flops_lora = _step(model, params, ids, lora)
    run_dora, mem_dora, flops_dora = _step(model, params, ids, dora)
    samples = common.interleaved({"lora": run_lora, "dora": run_dora}, repeats=repeats)
    dora_res = {"step_time_ratio_dora_over_lora": common.paired_ratio(samples, "dora", "lora"),
                "flops_ratio_dora_over_lora": flops_dora / flops_lora,
                "temp_bytes_ratio_dora_over_lora": mem_dora.get("temp_size_in_bytes", 0) /
                max(mem_lora.get("temp_size_in_bytes", 1), 1),
                "lora": samples["lora"].summary(), "dora": samples["dora"].summary()}

    # QLoRA: NF4 base (with and without double quantization) vs LoRA on a bf16 base
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    nf4 = jlora.quantize(bf16)
    nf4_dq = jlora.quantize(bf16, double_quant=True)
    qpaths = [p for p, v in jlora.tree.flatten(nf4).items() if quant.is_quantized(v)]

    def kernel_bytes(tree):
        flat = jlora.tree.flatten(tree)
        return common.tree_bytes([flat[p] for p in qpaths])

    bases = {"lora_bf16": bf16, "qlora_nf4": nf4, "qlora_nf4_dq": nf4_dq}
    runs, mems = {}, {}
    for name, base in bases.items():
        runs[name], mems[name], _ = _step(model, base, ids, lora)
    qsamples = common.interleaved(runs, repeats=repeats)
    err = quant.error(bf16, nf4)["total"]
    qlora_res = {
        "quantized_kernels": len(qpaths),
        "kernel_bytes": {name: kernel_bytes(base) for name, base in bases.items()},
        "param_bytes": {name: common.tree_bytes(base) for name, base in bases.items()},
        "step_memory": mems,
        "step_time_ratio_over_lora_bf16": {name: common.paired_ratio(qsamples, name, "lora_bf16")
                                           for name in ("qlora_nf4", "qlora_nf4_dq")},
        "nf4_rel_fro_error": err["rel_fro"],
    }
    kb = qlora_res["kernel_bytes"]
    rows = []
    for name in bases:
        m = mems[name]
        rows.append([name, f"{kb[name] / kb['lora_bf16']:.3f}",
                     f"{qlora_res['param_bytes'][name] / 2**20:.1f}",
                     f"{m.get('argument_size_in_bytes', 0) / 2**20:.1f}", f"{m.get('temp_size_in_bytes', 0) / 2**20:.1f}",
                     "1.000" if name == "lora_bf16" else
                     f"{qlora_res['step_time_ratio_over_lora_bf16'][name]:.3f}"])
    markdown = "\n\n".join([
        f"SmolLM2-135M shape, {layers} layers, batch {ids.shape[0]}x{ids.shape[1]}, rank {common.RANK} on all "
        f"linear layers, AdamW; times are paired medians over {repeats} interleaved rounds.",
        common.md_table(["", "DoRA / LoRA"], [
            ["train step wall time", f"{dora_res['step_time_ratio_dora_over_lora']:.3f}"],
            ["compiled FLOPs", f"{dora_res['flops_ratio_dora_over_lora']:.3f}"],
            ["compiled temp memory", f"{dora_res['temp_bytes_ratio_dora_over_lora']:.3f}"]]),
        common.md_table(["base", "quantized kernels / bf16", "all params MiB", "step args MiB", "step temp MiB",
                         "step time / LoRA bf16"], rows),
        f"NF4 relative Frobenius error of the quantized kernels: {err['rel_fro']:.4f}.",
    ])
    return {"results": {"dora": dora_res, "qlora": qlora_res}, "markdown": markdown}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    out = run(quick=parser.parse_args().quick)
    print(out["markdown"])
    print(json.dumps(out["results"], indent=1, default=str)[:3000])
