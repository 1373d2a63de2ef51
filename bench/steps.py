"""Train steps on both sides, each wrapped as a zero-argument callable that runs one step and blocks.

jlora side: ``jlora.make_train_step`` (LoRA) and a full fine-tuning step written the plain JAX way (gradients of
every param, AdamW on all of them), each compiled once ahead of time (``jit(...).lower(...).compile()``) so the
compile time and XLA's memory analysis come from the very executable that is timed; FLOPs come from the same step
compiled with the fused loss in one chunk (:func:`exact_flops`).
torch side: PEFT ``get_peft_model`` LoRA and plain full fine-tuning of transformers' model, AdamW, loss from
``labels=input_ids`` (the same mean next-token cross-entropy as ``jlora.lm_loss``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from bench import common

LR = 1e-4


@dataclasses.dataclass
class Compiled:
    """One compiled jlora step: ``run()`` does a step and blocks; figures come from the executable."""

    run: Callable[[], object]
    compile_s: float
    flops: float
    memory: dict
    loss: Callable[[], float]


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
    return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def _compile(fn, *args, donate=(0,)):
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    return compiled, time.perf_counter() - t0


def exact_flops(fn, *args) -> float:
    """Compiled FLOPs of ``fn`` with the fused loss in one chunk.

    jlora's fused output-projection loss walks the tokens in a ``lax.scan`` of chunks, and XLA's cost analysis
    counts a loop body once; chunking does not change the FLOPs, so one chunk gives the exact count.
    """
    import jax

    from jlora import loss

    saved = loss.CHUNK_ELEMENTS
    loss.CHUNK_ELEMENTS = 1 << 62
    try:   # a fresh wrapper: jit would otherwise reuse the trace of ``fn`` made with the current chunk size
        return _flops(jax.jit(lambda *a: fn(*a)).lower(*args).compile())
    finally:
        loss.CHUNK_ELEMENTS = saved


def jlora_lora(model, params, ids, targets, *, loss_fn=None, steps_per_call: int = 1,
               count_flops: bool = True) -> Compiled:
    """jlora's LoRA train step (rank 16, alpha 32 on ``targets``), AdamW.

    With ``steps_per_call`` n > 1, ``run()`` does n steps on the same batch in one call (:func:`jlora.scan_steps`);
    divide its time by n for a per-step time. FLOPs are per step either way (``count_flops=False``: not counted,
    which saves a second compile; ``flops`` is then 0).
    """
    import jax
    import jax.numpy as jnp
    import optax

    import jlora

    cfg = jlora.LoraConfig(rank=common.RANK, alpha=common.ALPHA, targets=tuple(targets))
    layout = jlora.layout(model, jnp.asarray(ids[:1, :8])) if model.config.scan_layers else None
    adapters = jlora.init(params, cfg, key=jax.random.key(1), layout=layout)
    opt = optax.adamw(LR)
    kw = {} if loss_fn is None else {"loss_fn": loss_fn}
    step = jlora.make_train_step(model, cfg, opt, **kw)
    state = jlora.TrainState.create(adapters, opt, rng=jax.random.key(2))
    batch = {"input_ids": jnp.asarray(ids)}
    flops = exact_flops(step, state, params, batch) if count_flops else 0.0
    if steps_per_call > 1:
        step = jlora.scan_steps(step)
        batch = {"input_ids": jnp.stack([jnp.asarray(ids)] * steps_per_call)}
    compiled, seconds = _compile(step, state, params, batch)
    box = {"state": state, "metrics": None}

    def run():
        box["state"], box["metrics"] = compiled(box["state"], params, batch)
        return jax.block_until_ready(box["metrics"])

    return Compiled(run, seconds, flops, _memory(compiled), lambda: float(jnp.ravel(box["metrics"]["loss"])[-1]))


def full_step_fn(model, opt):
    """A plain full fine-tuning step: ``(params, opt_state), batch -> (params, opt_state), loss``."""
    import jax
    import optax

    import jlora

    def step(carry, batch):
        params, opt_state = carry

        def loss(p):
            def apply_fn(*a, **k):
                return model.apply({"params": p}, *a, **k)

            apply_fn.hidden_output = getattr(model, "HIDDEN_OUTPUT", False)   # the same (fused) loss as LoRA's
            return jlora.lm_loss(apply_fn, batch)[0]

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    return step


def jlora_full(model, params, ids) -> Compiled:
    """Full fine-tuning of the same Flax model in JAX (every param trains), AdamW. Consumes ``params``."""
    import jax
    import jax.numpy as jnp
    import optax

    opt = optax.adamw(LR)
    carry = (jax.tree.map(jnp.copy, params), None)
    carry = (carry[0], opt.init(carry[0]))
    batch = {"input_ids": jnp.asarray(ids)}
    compiled, seconds = _compile(full_step_fn(model, opt), carry, batch)
    flops = exact_flops(full_step_fn(model, opt), carry, batch)
    box = {"carry": carry, "loss": None}

    def run():
        box["carry"], box["loss"] = compiled(box["carry"], batch)
        return jax.block_until_ready(box["loss"])

    return Compiled(run, seconds, flops, _memory(compiled), lambda: float(box["loss"]))


def torch_step(model, ids, *, targets=None) -> Callable[[], object]:
    """One torch AdamW step; PEFT LoRA (rank 16, alpha 32) on ``targets``, or full fine-tuning when None."""
    import torch

    if targets is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=common.RANK, lora_alpha=common.ALPHA, lora_dropout=0.0,
                                                 target_modules=list(targets)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=LR)
    tids = torch.as_tensor(ids, dtype=torch.long)

    def run():
        loss = model(input_ids=tids, labels=tids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return run
