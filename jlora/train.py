"""Training: a TrainState, a causal-LM loss, and a pure train step over the adapters only.

The step differentiates with respect to the adapter tree alone; the frozen params are an ordinary argument, so
gradients and optimizer state exist for adapter leaves only by construction. It is a pure function of
``(state, params, batch)``: jit it (donating the state), pmap it, or shard it (see :mod:`jlora.parallel`).

Mixed precision: frozen params may be bf16 while adapters, gradients and optimizer state stay fp32; the transform
casts adapters to each layer's compute dtype, and the loss is computed from fp32 logits.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jlora import transform
from jlora.loss import Hidden, causal_lm_loss, fused_causal_lm_loss, token_nll  # noqa: F401  (re-exported)
from jlora.config import LoraConfig

Batch = Mapping[str, jax.Array]
LossFn = Callable[[Callable[..., Any], Batch], tuple[jax.Array, dict]]


class TrainState(NamedTuple):
    """Everything that changes during training. ``step`` is an int32 scalar, ``rng`` a PRNG key."""

    step: jax.Array
    adapters: Any
    opt_state: Any
    rng: jax.Array

    @classmethod
    def create(cls, adapters: Any, optimizer: optax.GradientTransformation, *, rng: jax.Array) -> "TrainState":
        """A step-0 state with fresh optimizer state for ``adapters`` (float32 for float16 ones: :func:`opt_view`)."""
        return cls(jnp.zeros((), jnp.int32), adapters, optimizer.init(opt_view(adapters)), rng)


def opt_view(adapters: Any) -> Any:
    """The adapters as the optimizer sees them, float16 leaves as float32: in float16 Adam's eps=1e-8 is 0, and A's
    zero gradient at B = 0 gave 0/0 = NaN. The update is rounded once into the adapters (bfloat16: kept as it is)."""
    return jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.float16 else x, adapters)


_LM_INPUTS = ("attention_mask", "loss_mask", "positions", "segment_ids")   # what lm_loss reads besides input_ids


def loss_mask(batch: Batch) -> jax.Array | None:
    """The loss mask of :func:`lm_loss`: ``batch["loss_mask"]``, else ``batch["attention_mask"]``, else None (all
    ones); without a ``loss_mask``, a packed row's first token of each segment (``segment_ids``) is no target."""
    mask = batch.get("loss_mask", batch.get("attention_mask"))
    if "loss_mask" not in batch and "segment_ids" in batch:
        seg = batch["segment_ids"]
        first = jnp.pad(seg[:, 1:] != seg[:, :-1], ((0, 0), (1, 0)))
        mask = ~first if mask is None else jnp.where(first, 0, mask)
    return mask


def lm_loss(apply_fn: Callable[..., Any], batch: Batch) -> tuple[jax.Array, dict]:
    """The default loss: ``apply_fn(input_ids, **model_inputs)``, then :func:`causal_lm_loss`.

    ``model_inputs`` are whichever of ``attention_mask``, ``positions`` and ``segment_ids`` (packed rows) the batch
    holds. The loss mask is ``batch["loss_mask"]`` if present, else ``batch["attention_mask"]``, else all ones (then
    in packed rows a segment's first token is no target: the segment before does not predict it).

    When the model can hand back its final hidden states and output weight instead of logits (jlora's own
    models: ``apply_fn.hidden_output`` is true, and the output layer carries no adapter and no quantization), the
    loss is :func:`jlora.loss.fused_causal_lm_loss`, the same value without (B, T, vocab) logits in memory.
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        found = (f"holds keys {sorted(map(str, batch))}" if isinstance(batch, Mapping)
                 else f"is a {type(batch).__name__}")
        raise ValueError(f"the default loss (jlora.lm_loss) needs a dict batch with 'input_ids' (and optionally "
                         f"{', '.join(map(repr, _LM_INPUTS))}); the batch {found}. Rename the key, or pass a "
                         f"`loss_fn` that reads your batch")
    kwargs = {k: batch[k] for k in ("attention_mask", "positions", "segment_ids") if k in batch}
    mask = loss_mask(batch)
    if getattr(apply_fn, "hidden_output", False):
        out = apply_fn(batch["input_ids"], return_hidden=True, **kwargs)
    else:
        out = apply_fn(batch["input_ids"], **kwargs)
    if isinstance(out, Hidden):
        loss, n = fused_causal_lm_loss(out.states, out.weight, batch["input_ids"], mask, vocab_axis=out.vocab_axis)
    else:
        loss, n = causal_lm_loss(out, batch["input_ids"], mask)
    return loss, {"loss": loss, "tokens": n}


_STATELESS = ("{error}\nThe step (jlora.make_train_step, make_eval_step) gives the model its params and adapters and "
              "carries no other state from step to step. Pass the model's other collections where your `loss_fn` "
              "calls `apply_fn`, e.g. `apply_fn(x, variables={{\"batch_stats\": stats}})` (closed over, or read "
              "from the batch), with BatchNorm on its running averages (use_running_average=True); to update batch "
              "statistics while training, write your own step around `jlora.apply(..., variables=..., "
              "mutable=[\"batch_stats\"])` and carry them yourself")


def stream_keys(key: jax.Array, names: Sequence[str]) -> dict[str, jax.Array]:
    """The keys of the model's rng streams ``names`` from a step's (or micro-batch's) ``key``."""
    return {name: jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF) for name in names}


def _bind(model: nn.Module, cfg: LoraConfig, params, adapters, rng, model_rngs: Sequence[str] = ()
          ) -> Callable[..., Any]:
    """``apply_fn`` for a loss: the model with these adapters. ``apply_fn.hidden_output`` says whether the model
    takes ``return_hidden=True`` (class attribute ``HIDDEN_OUTPUT``).

    With an ``rng``, the model gets keys derived from it for its streams ``model_rngs`` and, when ``cfg.dropout > 0``,
    ``rng`` itself for LoRA dropout; ``rngs`` given to ``apply_fn`` are merged in (theirs win a name in both)."""
    own = {} if rng is None else stream_keys(rng, model_rngs)
    if rng is not None and cfg.dropout > 0:
        own[transform.DROPOUT_RNG] = rng

    def apply_fn(*args, rngs: Mapping[str, jax.Array] | None = None, **kwargs):
        merged = {**own, **dict(rngs or {})} or None
        try:
            return transform.apply(model, params, adapters, cfg, *args, rngs=merged, **kwargs)
        except (flax.errors.ScopeCollectionNotFound, flax.errors.ModifyScopeVariableError) as e:
            raise ValueError(_STATELESS.format(error=e)) from e

    apply_fn.hidden_output = bool(getattr(model, "HIDDEN_OUTPUT", False))
    return apply_fn


def _weighted_grads(model, cfg, loss_fn, params, adapters, batch, rng, model_rngs=()):
    """Loss, metrics and gradients of one (micro)batch, weighted by its token count."""
    def f(ad):
        loss, metrics = loss_fn(_bind(model, cfg, params, ad, rng, model_rngs), batch)
        return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(adapters)
    weight = metrics.get("tokens", jnp.ones((), jnp.float32)).astype(jnp.float32)
    return jax.tree.map(lambda g: g * weight, grads), metrics, weight


def make_train_step(model: nn.Module, cfg: LoraConfig, optimizer: optax.GradientTransformation, *,
                    loss_fn: LossFn = lm_loss, grad_accum_steps: int = 1,
                    reduce_grads: Callable[[Any], Any] | None = None, model_rngs: Sequence[str] = ("dropout",)):
    """Builds ``step(state, params, batch) -> (state, metrics)``, a pure function for ``jax.jit``.

    Args:
        model: the Flax model.
        cfg: the LoRA config of ``state.adapters``.
        optimizer: an optax transformation over the adapter tree.
        loss_fn: ``loss_fn(apply_fn, batch) -> (loss, metrics)`` where ``apply_fn(*args, **kwargs)`` runs the
            model with the current adapters (as :func:`jlora.apply`; ``rngs`` it is given are merged with the
            step's, and win a name in both). ``metrics["tokens"]``, if present, weights micro-batches.
        grad_accum_steps: split the batch's leading axis into this many micro-batches (micro-batch i takes
            rows i, i+k, ..., so that a batch sharded over devices by rows keeps every device busy on each), run
            them one after another (``lax.scan``, so activation memory is that of one micro-batch), and apply the
            token-weighted mean gradient once (summed in float32 whatever the adapters' dtype).
        reduce_grads: optional hook applied to the (weighted sum of) gradients, metrics and weights before the
            update, e.g. a ``lax.psum`` under ``pmap`` (see :func:`jlora.parallel.make_pmap_train_step`).
        model_rngs: the model's own rng streams (its ``nn.Dropout``/``nnx.Dropout``), each fed a fresh key every
            step: ``fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)`` of the step's key
            ``jax.random.split(state.rng)[1]`` (under accumulation, micro-batch i's key ``fold_in(key, i)``), which
            LoRA dropout uses as it is. A Linen model gets them as ``rngs``, an NNX model's streams are reseeded
            (:func:`jlora.nnx.apply`); a stream the model lacks is ignored.

    The model's other state is read, never carried: give a Linen model its collections through ``apply_fn(...,
    variables={"batch_stats": ...})`` in ``loss_fn`` (a missing or updated collection is an error that says so);
    an NNX model's in-place updates (BatchNorm statistics) are dropped after each call; to train BatchNorm
    statistics, write a step around ``jlora.apply(..., mutable=[...])`` that carries them. A non-finite loss or
    gradient gives a non-finite update, which is applied: ``optax.apply_if_finite(optimizer, n)`` skips those.

    Returns:
        The step function. ``metrics`` holds ``loss`` (token-weighted mean), ``tokens`` and ``grad_norm``.

    Examples:
        >>> import jax, jax.numpy as jnp, optax, flax.linen as nn, jlora
        >>> class LM(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, ids):
        ...         return nn.Dense(11, name="out")(nn.Embed(11, 8, name="embed")(ids))
        >>> model, ids = LM(), jnp.array([[1, 2, 3, 4]])
        >>> params = model.init(jax.random.key(0), ids)["params"]
        >>> cfg = jlora.LoraConfig(rank=2, alpha=4, targets="out")
        >>> opt = optax.adam(1e-2)
        >>> state = TrainState.create(jlora.init(params, cfg, key=jax.random.key(1)), opt, rng=jax.random.key(2))
        >>> step = jax.jit(make_train_step(model, cfg, opt), donate_argnums=0)
        >>> state, metrics = step(state, params, {"input_ids": ids})
        >>> int(state.step), sorted(metrics)
        (1, ['grad_norm', 'loss', 'tokens'])
    """
    if not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
        raise ValueError(f"`grad_accum_steps` must be an integer >= 1; got {grad_accum_steps!r}")
    model_rngs = (model_rngs,) if isinstance(model_rngs, str) else tuple(model_rngs)
    if transform.DROPOUT_RNG in model_rngs or not all(isinstance(n, str) for n in model_rngs):
        raise ValueError(f"`model_rngs` names the model's own rng streams (strings, not {transform.DROPOUT_RNG!r}, "
                         f"which `cfg.dropout` turns on); got {model_rngs!r}")
    user_loss_fn = loss_fn

    def loss_fn(apply_fn, batch):   # the user's, with its return value checked (at trace time)
        out = user_loss_fn(apply_fn, batch)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)) or jnp.ndim(out[0]):
            kind = lambda v: f"an array of shape {jnp.shape(v)}" if hasattr(v, "shape") else type(v).__name__  # noqa
            got = f"({', '.join(map(kind, out))})" if isinstance(out, tuple) else kind(out)
            raise TypeError(f"`loss_fn` must return `(loss, metrics)`: a scalar loss and a dict of metrics, e.g. "
                            f"`return loss, {{\"loss\": loss}}`; it returned {got}")
        return out

    def step(state: TrainState, params, batch: Batch):
        rng, step_rng = jax.random.split(state.rng)
        if grad_accum_steps == 1:
            grads, metrics, weight = _weighted_grads(model, cfg, loss_fn, params, state.adapters, batch, step_rng,
                                                      model_rngs)
            metrics = jax.tree.map(lambda m: m * weight, metrics)
        else:
            micro = jax.tree.map(lambda x: _split_micro(x, grad_accum_steps), batch)
            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, _at_least_f32(x.dtype)), state.adapters)

            def add(total, v):   # in the running total's (float32 or wider) dtype: the scan's carry keeps it
                return total + v.astype(total.dtype)

            def body(carry, xs):
                i, mb = xs
                g_sum, w_sum, m_sum = carry
                g, m, w = _weighted_grads(model, cfg, loss_fn, params, state.adapters, mb,
                                          jax.random.fold_in(step_rng, i), model_rngs)
                m = jax.tree.map(lambda v: v * w, m)
                return (jax.tree.map(add, g_sum, g), w_sum + w, jax.tree.map(add, m_sum, m)), None

            first = jax.tree.map(lambda x: x[0], micro)
            _, m0, _ = jax.eval_shape(lambda: _weighted_grads(model, cfg, loss_fn, params, state.adapters,
                                                              first, step_rng, model_rngs))
            m_init = jax.tree.map(lambda s: jnp.zeros(s.shape, _at_least_f32(s.dtype)), m0)
            (grads, weight, metrics), _ = jax.lax.scan(
                body, (zeros, jnp.zeros((), jnp.float32), m_init), (jnp.arange(grad_accum_steps), micro))
        if reduce_grads is not None:
            grads, metrics, weight = reduce_grads((grads, metrics, weight))
        denom = jnp.maximum(weight, 1e-9)
        seen = opt_view(state.adapters)   # the dtypes the optimizer state has (float32 would change a bfloat16 one)
        grads = jax.tree.map(lambda g, a: (g / denom).astype(jnp.result_type(a)), grads, seen)
        metrics = jax.tree.map(lambda m: m / denom, metrics)
        if "tokens" in metrics:
            metrics["tokens"] = weight
        updates, opt_state = optimizer.update(grads, state.opt_state, seen)
        adapters = optax.apply_updates(state.adapters, updates)
        metrics["grad_norm"] = optax.global_norm(grads)
        return TrainState(state.step + 1, adapters, opt_state, rng), metrics

    return step


def _split_micro(x: jax.Array, k: int) -> jax.Array:
    """(B, ...) -> (k, B/k, ...), micro-batch i holding rows i, i+k, ... (a row-sharded batch stays sharded on
    each micro-batch's rows: XLA folds the reshapes, no data moves between devices)."""
    if not jnp.ndim(x) or x.shape[0] % k:
        got = f"batch size {x.shape[0]}" if jnp.ndim(x) else "a scalar in the batch (it has no batch axis to split)"
        raise ValueError(f"{got} does not divide into grad_accum_steps={k} micro-batches")
    return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)


def _at_least_f32(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def scan_steps(step: Callable[..., tuple[TrainState, dict]]):
    """Several train steps in one call: ``multi(state, params, batches) -> (state, metrics)``.

    ``batches`` is a batch whose arrays have a leading axis of length n, one slice per step; the steps run in a
    ``lax.scan`` and ``metrics`` come back stacked (n, ...). The result equals n calls of ``step``.

    Why: a compiled step allocates its scratch memory afresh on every call. On the CPU that memory is fresh
    pages the kernel must fault in and zero each time (bench/README.md measures what that costs); inside one
    call the scan reuses the same scratch for every step. On accelerators it saves the
    per-call dispatch instead. The price: n batches are in memory at once, and the host sees metrics every n
    steps.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> def step(state, params, batch):          # any function of make_train_step's signature
        ...     state = state + params * batch["x"]
        ...     return state, {"loss": state}
        >>> state, metrics = jax.jit(scan_steps(step))(0.0, 2.0, {"x": jnp.array([1.0, 2.0, 3.0])})
        >>> float(state), metrics["loss"].tolist()
        (12.0, [2.0, 6.0, 12.0])
    """
    def multi(state: TrainState, params, batches: Batch):
        return jax.lax.scan(lambda s, batch: step(s, params, batch), state, batches)

    return multi


def make_eval_step(model: nn.Module, cfg: LoraConfig, *, loss_fn: LossFn = lm_loss):
    """Builds ``eval_step(params, adapters, batch) -> metrics`` (no dropout, no gradients)."""
    def eval_step(params, adapters, batch: Batch):
        _, metrics = loss_fn(_bind(model, cfg, params, adapters, None), batch)
        return metrics

    return eval_step
