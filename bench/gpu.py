"""Section: on a GPU, bf16 LoRA train steps of a 1B Llama shape at 2,048 tokens with cuDNN's flash attention:
tokens/s and model FLOPs utilization (MFU).

Skips (returns ``{"skipped": reason}``) when JAX sees no GPU. MFU = the step's model FLOPs / step time / the
device's dense bf16 peak (known per device kind). Model FLOPs are counted analytically, because XLA's cost analysis
does not see inside cuDNN's fused attention: per token, 2 FLOPs per frozen weight in the forward pass and 2 in the
backward pass (input gradients only: frozen weights get no weight gradients), the low-rank paths' matmuls
(3 x 2 x r x (in + out) per adapted layer: forward, input and factor gradients), and causal attention
(forward 2 x 2 x T/2 x heads x head_dim per layer, backward twice that). XLA's own count is shown beside it.
"""

from __future__ import annotations

import re
import statistics

from bench import common, steps

# Dense (no sparsity) bf16 tensor-core peaks, FLOP/s.
# Device kinds as JAX names them (``NVIDIA H100 80GB HBM3``); a model whose kind names none of these (e.g. A10G)
# gets no MFU rather than a wrong one.
PEAK_BF16 = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
             "A100": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12, "A10": 125e12}

# Llama 3.2 1B, as its config.json says.
LLAMA_1B = dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=131072,
                hidden_act="silu", bos_token_id=128000, eos_token_id=128001)


def _peak(kind: str) -> float | None:
    """The dense bf16 peak of a device kind: the longest name in :data:`PEAK_BF16` it holds as whole words.

    Examples:
        >>> [_peak(k) / 1e12 for k in ("NVIDIA H100 80GB HBM3", "NVIDIA H100 PCIe", "NVIDIA L40S", "NVIDIA L4")]
        [989.0, 756.0, 362.0, 121.0]
        >>> _peak("NVIDIA A10G") is None, _peak("NVIDIA A100-SXM4-80GB") / 1e12
        (True, 312.0)
    """
    names = sorted(PEAK_BF16, key=len, reverse=True)
    return next((PEAK_BF16[k] for k in names if re.search(rf"(?<![\w]){re.escape(k)}(?![\w])", kind)), None)


def model_flops(hf: dict, seq: int, targets, rank: int = common.RANK) -> float:
    """Model FLOPs of one LoRA train step per token (see the module docstring).

    Examples:
        >>> round(model_flops(LLAMA_1B, 2048, common.QV) / 1e9, 2)
        5.36
    """
    d, f, layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    heads, kv, hd = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    shapes = {"q_proj": (d, heads * hd), "k_proj": (d, kv * hd), "v_proj": (d, kv * hd), "o_proj": (heads * hd, d),
              "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}
    frozen = layers * sum(i * o for i, o in shapes.values()) + d * hf["vocab_size"]      # + the output projection
    lora = layers * sum(3 * 2 * rank * (i + o) for name, (i, o) in shapes.items() if name in targets)
    attention = layers * 3 * 2 * 2 * (seq / 2) * heads * hd
    return 4 * frozen + lora + attention


def measure(hf: dict, *, batch: int, seq: int, attention: str, repeats: int, peak: float | None) -> dict:
    """Times LoRA q,v and all-linear steps of the bf16 model ``hf`` at ``batch x seq``; tokens/s and MFU."""
    import jax.numpy as jnp

    ids = common.token_batch(batch=batch, seq=seq, vocab=hf["vocab_size"])
    model, params = common.jlora_model(hf, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention=attention)
    out, rows = {}, []
    for name, targets in (("LoRA q,v", common.QV), ("LoRA all linear", common.ALL_LINEAR)):
        c = steps.jlora_lora(model, params, ids, targets)
        samples = common.interleaved({name: c.run}, repeats=repeats, warmup=2)[name]
        t = statistics.median(samples.wall)
        flops = model_flops(hf, seq, targets) * batch * seq
        mfu = None if peak is None else flops / t / peak
        out[name] = {**samples.summary(), "tokens_per_s": batch * seq / t, "model_flops": flops,
                     "xla_flops": c.flops, "tflops_per_s": flops / t / 1e12, "mfu": mfu}
        rows.append([name, f"{t * 1e3:.1f}", f"{batch * seq / t:,.0f}", f"{flops / t / 1e12:.1f}",
                     f"{c.flops / 1e12:.2f} / {flops / 1e12:.2f}", "n/a" if mfu is None else f"{100 * mfu:.1f}%"])
    return {"results": out, "rows": rows}


def run(*, repeats: int = 10, batch: int = 4, seq: int = 2048) -> dict:
    import jax

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        reason = f"no GPU visible to JAX (devices: {[d.platform for d in jax.devices()][:4]}...)"
        return {"results": {"skipped": reason}, "markdown": f"Skipped: {reason}."}
    kind = gpus[0].device_kind
    m = measure(LLAMA_1B, batch=batch, seq=seq, attention="cudnn", repeats=repeats, peak=_peak(kind))
    md = [f"{kind}, Llama-3.2-1B shape, bf16 params and compute (fp32 adapters and logits), batch {batch} x {seq}, "
          f"r={common.RANK}, attention by cuDNN (`attention=\"cudnn\"`). Model FLOPs counted analytically (module "
          f"docstring of bench/gpu.py); XLA's count misses the fused attention.", "",
          common.md_table(["step", "ms", "tokens/s", "model TFLOP/s", "TFLOP per step: XLA / model", "MFU"],
                          m["rows"])]
    return {"results": {"device": kind, "batch": [batch, seq], **m["results"]}, "markdown": "\n".join(md)}
