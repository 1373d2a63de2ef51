"""Section 3: inference. Forward of the base model vs unmerged LoRA vs merged params; generation tokens/s.

Forward: batch 4 x 128, fp32 logits, r = 16 on q,v (the adapters' B is made non-zero so the low-rank path computes
something real). Unmerged runs ``jlora.apply``; merged runs the plain model on ``jlora.merge``'s params (the same
executable as the base, so its ratio measures noise). Generation: greedy, jitted prefill + ``while_loop`` decoding
with the KV cache (:func:`jlora.models.generate.generate`), prompts of 4 x 32 tokens, 64 new tokens, base params and
unmerged adapters. KV cache vs recomputing: the same greedy decoding with ``use_cache=False`` (every step recomputes
the whole fixed-size sequence; token-identical, tested in tests/test_generate.py), prompts of 2 x 128 tokens, 16 new
tokens, time per new token.
"""

from __future__ import annotations

from bench import common


def _forward_fns(model, params, ids):
    import jax
    import jax.numpy as jnp

    import jlora

    cfg = jlora.LoraConfig(rank=common.RANK, alpha=common.ALPHA, targets=common.QV)
    adapters = jlora.init(params, cfg, key=jax.random.key(1))
    # a trained-looking B (init makes it zero, which would let XLA skip nothing but reads as a no-op)
    adapters = jax.tree.map(lambda x: x + 0.01 if x.ndim == 2 else x, adapters)
    merged = jlora.merge(params, adapters, cfg)
    x = jnp.asarray(ids)
    base = jax.jit(lambda p, x: model.apply({"params": p}, x))
    unmerged = jax.jit(lambda p, a, x: jlora.apply(model, p, a, cfg, x))

    def run(f, *args):
        return lambda: jax.block_until_ready(f(*args))

    fns = {"base": run(base, params, x), "unmerged LoRA": run(unmerged, params, adapters, x),
           "merged LoRA": run(base, merged, x)}
    err = float(jnp.max(jnp.abs(unmerged(params, adapters, x) - base(merged, x))))
    return fns, cfg, adapters, err


def _generation(model, params, cfg, adapters, *, repeats: int) -> dict:
    import numpy as np

    from jlora.models import generate as gen

    prompts = common.token_batch(batch=4, seq=32, seed=1)
    new = 64
    lora_fn = gen.lora_apply_fn(model, cfg)

    def base():
        return gen.generate(model, params, prompts, max_new_tokens=new, eos_token_id=())

    def lora():
        return gen.generate(model, (params, adapters), prompts, max_new_tokens=new, eos_token_id=(),
                            apply_fn=lora_fn)

    samples = common.interleaved({"base": base, "unmerged LoRA": lora}, repeats=repeats)
    out = {}
    for name, s in samples.items():
        t = float(np.median(s.wall))
        out[name] = {**s.summary(), "tokens_per_s": prompts.shape[0] * new / t}
    out["setup"] = {"batch": prompts.shape[0], "prompt_tokens": prompts.shape[1], "new_tokens": new,
                    "note": "time includes the 32-token prefill"}
    return out


def _cache_vs_recompute(model, params, *, repeats: int) -> dict:
    from jlora.models import generate as gen

    prompts = common.token_batch(batch=2, seq=128, seed=2)
    new = 16

    def decode(use_cache):
        return lambda: gen.generate(model, params, prompts, max_new_tokens=new, eos_token_id=(), use_cache=use_cache)

    samples = common.interleaved({"KV cache": decode(True), "recompute": decode(False)}, repeats=repeats)
    out = {name: {**s.summary(), "ms_per_token": 1e3 * s.summary()["wall_median_s"] / new}
           for name, s in samples.items()}
    out["recompute / KV cache"] = common.paired_ratio(samples, "recompute", "KV cache")
    out["setup"] = {"batch": prompts.shape[0], "prompt_tokens": prompts.shape[1], "new_tokens": new}
    return out


def run(*, repeats: int = 5, layers: int | None = None) -> dict:
    hf = common.hf_config(**({} if layers is None else {"num_hidden_layers": layers}))
    model, params = common.jlora_model(hf)
    ids = common.token_batch()
    fns, cfg, adapters, err = _forward_fns(model, params, ids)
    samples = common.interleaved(fns, repeats=repeats)
    fwd = {name: s.summary() for name, s in samples.items()}
    ratios = {"merged / base": common.paired_ratio(samples, "merged LoRA", "base"),
              "unmerged / base": common.paired_ratio(samples, "unmerged LoRA", "base")}
    generation = _generation(model, params, cfg, adapters, repeats=max(3, repeats // 2))
    cache = _cache_vs_recompute(model, params, repeats=max(3, repeats // 2))
    results = {"forward": fwd, "ratios": ratios, "max |unmerged - merged| logits": err, "generation": generation,
               "cache": cache}
    rows = [[name, f"{fwd[name]['wall_median_s'] * 1e3:.1f}"] for name in fwd]
    md = [f"Forward, batch 4 x 128, r=16 on q,v, {hf['num_hidden_layers']} layers, median of {repeats}: "
          f"merged / base = {ratios['merged / base']:.3f} (target <= 1.02), unmerged / base = "
          f"{ratios['unmerged / base']:.3f} (target <= 1.10). Max |unmerged - merged| logit: {err:.2e}.", "",
          common.md_table(["forward", "ms (median)"], rows), "",
          "Generation with the KV cache (greedy, 4 prompts x 32 tokens, 64 new tokens, one jitted call):", "",
          common.md_table(["params", "s (median)", "tokens/s"],
                          [[n, f"{generation[n]['wall_median_s']:.2f}", f"{generation[n]['tokens_per_s']:.1f}"]
                           for n in ("base", "unmerged LoRA")]), "",
          "KV cache vs recomputing the whole sequence each step (greedy, base params, 2 prompts x 128 tokens, 16 new "
          f"tokens): recompute / KV cache = {cache['recompute / KV cache']:.2f}.", "",
          common.md_table(["decoding", "ms per new token (median)"],
                          [[n, f"{cache[n]['ms_per_token']:.1f}"] for n in ("KV cache", "recompute")])]
    return {"results": results, "markdown": "\n".join(md)}
