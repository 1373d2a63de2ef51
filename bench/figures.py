"""Section 2: deterministic figures. Compiled FLOPs of LoRA vs full fine-tuning, trainable fraction, checkpoint bytes.

FLOPs come from XLA's cost analysis of the compiled train step (forward, backward and AdamW), on unrolled layers
(the analysis counts a scan body once). Layers are identical, so the count is affine in the number of layers:
``flops(L) = flops(1) + (L - 1) * (flops(2) - flops(1))``. Compiling 1- and 2-layer models therefore gives the
30-layer SmolLM2 figure exactly, in seconds instead of minutes; :mod:`bench.train_speed` cross-checks it against
the 30-layer executable it times.
"""

from __future__ import annotations

import tempfile

from bench import common, steps


def step_flops(layers: int, targets: tuple[str, ...] | None, *, seq: int = common.SEQ) -> float:
    """Compiled FLOPs of one train step on a SmolLM2-shaped model with ``layers`` layers (full FT when no targets)."""
    model, params = common.jlora_model(common.hf_config(num_hidden_layers=layers))
    ids = common.token_batch(seq=seq)
    if targets is None:
        return steps.jlora_full(model, params, ids).flops
    return steps.jlora_lora(model, params, ids, targets).flops


def smollm2_flops(targets: tuple[str, ...] | None, layers: int = common.SMOLLM2["num_hidden_layers"]) -> float:
    """Compiled step FLOPs at ``layers`` layers, extrapolated exactly from 1- and 2-layer compiles."""
    one, two = step_flops(1, targets), step_flops(2, targets)
    return one + (layers - 1) * (two - one)


def flops_ratios() -> dict:
    """``{"q,v": LoRA/full, "all linear": LoRA/full}`` compiled FLOPs on the SmolLM2 shape, plus the counts."""
    full = smollm2_flops(None)
    out = {"full_flops": full}
    for label, targets in common.TARGET_SETS.items():
        lora = smollm2_flops(targets)
        out[f"{label} flops"] = lora
        out[label] = lora / full
    return out


def trainable_and_bytes() -> dict:
    """Trainable fraction per target set, and adapter checkpoint bytes vs full model bytes."""
    import jax
    import optax

    import jlora
    from jlora.checkpoint import CheckpointManager

    model, params = common.jlora_model()
    n_params = sum(x.size for x in jax.tree.leaves(params))
    out = {"params": int(n_params), "model_bytes_fp32": common.tree_bytes(params)}
    # a full fine-tuning checkpoint that can resume holds params and AdamW's two moments
    out["full_ft_checkpoint_bytes"] = 3 * out["model_bytes_fp32"]
    for label, targets in common.TARGET_SETS.items():
        cfg = jlora.LoraConfig(rank=common.RANK, alpha=common.ALPHA, targets=targets)
        adapters = jlora.init(params, cfg, key=jax.random.key(1))
        opt = optax.adamw(steps.LR)
        state = jlora.TrainState.create(adapters, opt, rng=jax.random.key(2))
        with tempfile.TemporaryDirectory() as tmp:
            with CheckpointManager(tmp) as manager:
                manager.save(0, state, params=params, lora_config=cfg, name="SmolLM2-135M (random)")
            ckpt = common.dir_bytes(tmp)
        out[label] = {"trainable": jlora.count(adapters), "fraction": jlora.count(adapters) / n_params,
                      "adapter_bytes_fp32": common.tree_bytes(adapters), "checkpoint_bytes": ckpt,
                      "checkpoint / model bytes": ckpt / out["model_bytes_fp32"],
                      "checkpoint / full-FT checkpoint bytes": ckpt / out["full_ft_checkpoint_bytes"]}
    return out


def run() -> dict:
    flops = flops_ratios()
    sizes = trainable_and_bytes()
    rows = []
    for label in common.TARGET_SETS:
        s = sizes[label]
        rows.append([label, f"{flops[label]:.4f}", f"{s['trainable']:,}", f"{100 * s['fraction']:.3f}%",
                     f"{s['checkpoint_bytes'] / 2**20:.2f} MiB",
                     f"{s['checkpoint / model bytes']:.4f}", f"{s['checkpoint / full-FT checkpoint bytes']:.4f}"])
    md = [f"SmolLM2 shape, {sizes['params']:,} params ({sizes['model_bytes_fp32'] / 2**20:.1f} MiB fp32); full "
          f"fine-tuning step {flops['full_flops'] / 1e9:.1f} GFLOP (XLA cost analysis, batch 4 x 128). Checkpoint: "
          f"jlora.checkpoint on disk (adapters + AdamW state + step, RNG, metadata); a resumable full-FT checkpoint "
          f"is counted as params + two AdamW moments.", "",
          common.md_table(["targets (r=16)", "LoRA / full FLOPs", "trainable", "fraction", "adapter checkpoint",
                           "ckpt / model bytes", "ckpt / full-FT ckpt"], rows)]
    return {"results": {"flops": flops, "sizes": sizes}, "markdown": "\n".join(md)}
