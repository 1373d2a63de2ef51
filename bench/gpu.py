"""Section 5: on a GPU, bf16 LoRA and full fine-tuning steps: tokens/s and model FLOPs utilization (MFU).

Skips (returns ``{"skipped": reason}``) when JAX sees no GPU. MFU = the compiled step's FLOPs (XLA cost analysis,
on unrolled layers) / step time / the device's dense bf16 peak, where the peak is known for the device kind.
"""

from __future__ import annotations

import statistics

from bench import common, steps

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def _peak(kind: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in kind), None)


def run(*, repeats: int = 10, batch: int = 16, seq: int = 1024) -> dict:
    import jax
    import jax.numpy as jnp

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        reason = f"no GPU visible to JAX (devices: {[d.platform for d in jax.devices()][:4]}...)"
        return {"results": {"skipped": reason}, "markdown": f"Skipped: {reason}."}
    kind = gpus[0].device_kind
    ids = common.token_batch(batch=batch, seq=seq)
    model, params = common.jlora_model(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    out = {"device": kind, "batch": [batch, seq]}
    contenders = {"LoRA q,v": lambda: steps.jlora_lora(model, params, ids, common.QV),
                  "LoRA all linear": lambda: steps.jlora_lora(model, params, ids, common.ALL_LINEAR),
                  "full": lambda: steps.jlora_full(model, params, ids)}
    rows = []
    for name, make in contenders.items():
        c = make()
        samples = common.interleaved({name: c.run}, repeats=repeats, warmup=2)[name]
        t = statistics.median(samples.wall)
        peak = _peak(kind)
        out[name] = {**samples.summary(), "tokens_per_s": batch * seq / t, "flops": c.flops,
                     "tflops_per_s": c.flops / t / 1e12, "mfu": None if peak is None else c.flops / t / peak}
        rows.append([name, f"{t * 1e3:.1f}", f"{batch * seq / t:,.0f}", f"{c.flops / t / 1e12:.1f}",
                     "n/a" if peak is None else f"{100 * c.flops / t / peak:.1f}%"])
    md = [f"{kind}, bf16 params and compute (fp32 adapters and logits), batch {batch} x {seq}:", "",
          common.md_table(["step", "ms", "tokens/s", "TFLOP/s", "MFU"], rows)]
    return {"results": out, "markdown": "\n".join(md)}
