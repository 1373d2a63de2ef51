"""Causal-LM losses: next-token cross-entropy from logits, and the same loss fused with the output projection.

:func:`causal_lm_loss` takes (B, T, vocab) logits from any model. :func:`fused_causal_lm_loss` takes the final
hidden states and the output projection's weight instead, and never forms the (B, T, vocab) logits: it walks the
tokens in chunks, and for each chunk computes the logits, the loss and, when differentiated, the gradient with
respect to the hidden states (and the weight, if that trains) right away, keeping only those. Same FLOPs as the
unfused loss, but the largest buffers of a fine-tuning step (vocab 49,152 to 152,064 floats per token, several
times over) shrink to one chunk, which is what jlora's own models use for training (see
:func:`jlora.train.lm_loss`).

Both shift the targets (position t predicts token t+1) and average over the tokens that ``loss_mask`` keeps.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Logits per chunk of the fused loss: 128 MiB of float32. Each chunk multiplies by the whole output projection
# twice (logits, then their input gradient), and XLA:CPU's dots repack that operand on every call (about 12 ms for
# SmolLM2's 113 MB head), so fewer chunks are faster: on the SmolLM2 shape (1 core), 64 -> 128 MiB made a 4 x 128
# step 0.9% faster and a T = 2048 one ~130 ms faster for 94 MiB more scratch; 256 MiB would save ~60 ms more at
# T = 2048 for 192 MiB more (bench/README.md).
CHUNK_ELEMENTS = 1 << 25


class Hidden(NamedTuple):
    """What a model returns with ``return_hidden=True``: the input of :func:`fused_causal_lm_loss`.

    Attributes:
        states: (B, T, D) final hidden states, after the last norm.
        weight: the output projection, (V, D) (``vocab_axis=0``, a tied embedding) or (D, V) (``vocab_axis=1``).
        vocab_axis: which axis of ``weight`` is the vocabulary.
    """

    states: jax.Array
    weight: jax.Array
    vocab_axis: int


def shifted_targets(input_ids: jax.Array, loss_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """``(targets, weights)``, both (B, T): token t+1 as position t's target, and 1.0 where it counts.

    ``loss_mask`` (B, T) is aligned with ``input_ids``: ``loss_mask[:, t]`` says whether token t is a target. The
    last position has no next token and weight 0 (the targets are shifted, not the logits: slicing (B, T, vocab)
    logits would copy them and pad their gradient back).
    """
    b, t = input_ids.shape
    targets = jnp.concatenate([input_ids[:, 1:], jnp.zeros((b, 1), input_ids.dtype)], axis=1)
    keep = jnp.ones((b, t - 1), jnp.float32) if loss_mask is None else loss_mask[:, 1:].astype(jnp.float32)
    return targets, jnp.concatenate([keep, jnp.zeros((b, 1), jnp.float32)], axis=1)


def causal_lm_loss(logits: jax.Array, input_ids: jax.Array,
                   loss_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over the tokens that ``loss_mask`` keeps.

    Position t predicts token t+1. ``loss_mask`` (B, T) is aligned with ``input_ids``: ``loss_mask[:, t]``
    says whether token t is a target (e.g. 1 on completion tokens, 0 on the prompt and padding).

    Returns:
        ``(loss, n_tokens)``: the fp32 mean over kept targets, and how many there were.

    Examples:
        >>> import jax.numpy as jnp
        >>> logits = jnp.zeros((1, 3, 4))            # uniform over 4 tokens
        >>> loss, n = causal_lm_loss(logits, jnp.array([[0, 1, 2]]))
        >>> round(float(loss), 4), int(n)            # log(4)
        (1.3863, 2)
    """
    targets, weights = shifted_targets(input_ids, loss_mask)
    n = jnp.sum(weights)
    return jnp.sum(token_nll(logits.astype(jnp.float32), targets) * weights) / jnp.maximum(n, 1.0), n


@jax.custom_vjp
def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``-log softmax(logits)[..., targets]``: (..., vocab) float logits and (...) int targets -> (...).

    The custom VJP makes the backward pass one elementwise pass over the logits, ``softmax(logits) -
    onehot(targets)`` times the cotangent, which XLA writes over the logits' own buffer. Differentiating the plain
    formula instead materializes a masked copy of the logits to pick the target (or scatters into a zero
    vocab-sized buffer) and keeps the exponentials alive: two more (tokens, vocab) buffers.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> logits, targets = jnp.array([[0.0, 1.0, 2.0]]), jnp.array([2])
        >>> ref = lambda z: -jax.nn.log_softmax(z)[:, 2]
        >>> bool(jnp.allclose(token_nll(logits, targets), ref(logits)))
        True
        >>> g = jax.grad(lambda z: token_nll(z, targets).sum())(logits)
        >>> bool(jnp.allclose(g, jax.grad(lambda z: ref(z).sum())(logits)))
        True
    """
    return _nll(logits, targets)[0]


def _nll(logits, targets):
    """``(nll, logz)`` of float32 logits (..., V) and int targets (...)."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return logz - picked, logz


def _dlogits(logits, targets, logz, g):
    """``(softmax(logits) - onehot(targets)) * g``: the gradient of ``g * nll`` with respect to the logits."""
    # int32 whatever the ids' dtype: an iota in uint8 would wrap past 255 and hit again
    hit = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == targets[..., None].astype(jnp.int32)
    return (jnp.exp(logits - logz[..., None]) - hit.astype(logits.dtype)) * g[..., None].astype(logits.dtype)


def _token_nll_fwd(logits, targets):
    nll, logz = _nll(logits, targets)
    return nll, (logits, targets, logz)


def _token_nll_bwd(res, g):
    logits, targets, logz = res
    return _dlogits(logits, targets, logz, g), None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


# --- the fused loss -------------------------------------------------------------------------------------------

def fused_causal_lm_loss(hidden: jax.Array, weight: jax.Array, input_ids: jax.Array,
                         loss_mask: jax.Array | None = None, *, vocab_axis: int = 0,
                         chunk_tokens: int | None = None) -> tuple[jax.Array, jax.Array]:
    """:func:`causal_lm_loss` of the logits ``hidden @ weight`` without forming them all at once.

    Args:
        hidden: (B, T, D) final hidden states (after the last norm), in the head's compute dtype.
        weight: the output projection: (V, D) with ``vocab_axis=0`` (a tied embedding, logits ``hidden @
            weight.T``) or (D, V) with ``vocab_axis=1`` (a Dense kernel). Cast to ``hidden``'s dtype; the logits
            accumulate in float32.
        input_ids: (B, T) int tokens; loss_mask: (B, T) as in :func:`causal_lm_loss`.
        vocab_axis: which axis of ``weight`` is the vocabulary.
        chunk_tokens: tokens per chunk; by default as many as keep a chunk's logits within
            ``CHUNK_ELEMENTS`` floats.

    Returns:
        ``(loss, n_tokens)`` as :func:`causal_lm_loss`. Gradients flow to ``hidden`` and ``weight``; the one for
        ``weight`` is computed only when ``weight`` is being differentiated (a trained output layer).

    The chunks are a ``lax.scan``, which is what lets XLA reuse one chunk's buffers for the next (straight-line
    chunks get scheduled side by side). XLA's cost analysis counts a loop body once, so with more than one chunk
    a compiled step's reported FLOPs miss ``(chunks - 1)`` chunks of the head; measure FLOPs with one chunk
    (set ``CHUNK_ELEMENTS`` high: chunking does not change the FLOPs), as ``bench/`` does.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> h = jax.random.normal(jax.random.key(0), (2, 5, 8))
        >>> w = jax.random.normal(jax.random.key(1), (11, 8))
        >>> ids = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
        >>> fused, n = fused_causal_lm_loss(h, w, ids, chunk_tokens=3)
        >>> plain, _ = causal_lm_loss(h @ w.T, ids)
        >>> bool(jnp.allclose(fused, plain, atol=1e-5)), int(n)
        (True, 8)
    """
    if vocab_axis not in (0, 1) or weight.ndim != 2 or weight.shape[1 - vocab_axis] != hidden.shape[-1]:
        raise ValueError(f"output weight of shape {weight.shape} with vocab_axis={vocab_axis} does not fit hidden "
                         f"states of width {hidden.shape[-1]}: expected (V, {hidden.shape[-1]}) with vocab_axis=0 "
                         f"or ({hidden.shape[-1]}, V) with vocab_axis=1")
    b, t, d = hidden.shape
    targets, weights = shifted_targets(input_ids, loss_mask)
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be an int >= 1 (tokens per chunk) or None; got {chunk_tokens!r}")
    c = _chunk_length(t, b * weight.shape[vocab_axis]) if chunk_tokens is None else min(chunk_tokens, t)
    pad = -t % c
    k = (t + pad) // c

    def chunked(x):            # (B, T, ...) -> (k, B, c, ...): chunks along the sequence, so a batch-sharded
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))   # array stays sharded the same way
        return jnp.moveaxis(x.reshape(b, k, c, *x.shape[2:]), 1, 0)

    total = _fused_sum(chunked(hidden), weight, chunked(targets), chunked(weights), vocab_axis)
    n = jnp.sum(weights)
    return total / jnp.maximum(n, 1.0), n


def _chunk_length(t: int, floats_per_position: int) -> int:
    """Positions per chunk: the largest divisor of ``t`` whose logits fit ``CHUNK_ELEMENTS`` (padding ``t`` up
    only when every such divisor is under half the budget)."""
    limit = max(1, CHUNK_ELEMENTS // floats_per_position)
    if limit >= t:
        return t
    best = max(c for c in range(1, limit + 1) if t % c == 0)
    return best if 2 * best >= limit else limit


def _logits(h, w, vocab_axis):
    """(..., V) float32 logits of a chunk of hidden states (..., D)."""
    dims = (((h.ndim - 1,), (1 - vocab_axis,)), ((), ()))
    return jax.lax.dot_general(h, w.astype(h.dtype), dims, preferred_element_type=jnp.float32)


def _chunk_loss(h, w, targets, weights, vocab_axis):
    """Sum of ``weights * nll`` over one chunk (the forward-only path)."""
    return jnp.sum(_nll(_logits(h, w, vocab_axis), targets)[0] * weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fused_sum(h, w, targets, weights, vocab_axis):
    """Sum over chunks of ``weights * nll``; h (k, B, c, D), targets and weights (k, B, c)."""
    def body(total, xs):
        hc, tc, wc = xs
        return total + _chunk_loss(hc, w, tc, wc, vocab_axis), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, targets, weights))[0]


def _fused_sum_fwd(h, w, targets, weights, vocab_axis):
    # With symbolic zeros, each primal arrives wrapped with `.perturbed`: the weight's gradient (a (V, D) sum over
    # every token) is computed only when the output layer trains.
    h, w, targets, weights = h.value, w, targets.value, weights.value
    train_w = w.perturbed
    w = w.value

    def body(carry, xs):
        total, dw = carry
        hc, tc, wc = xs
        shape = hc.shape   # (B, c, D) as (tokens, D): XLA:CPU's reductions are slow at batch 1 otherwise (jlora.fusion)
        hc, tc, wc = hc.reshape(-1, shape[-1]), tc.reshape(-1), wc.reshape(-1)
        logits = _logits(hc, w, vocab_axis)
        top = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - top)   # used twice, so XLA writes it once (a fused exp-and-sum runs far slower)
        total_e = jnp.sum(e, axis=-1)
        picked = jnp.take_along_axis(logits, tc[..., None].astype(jnp.int32), axis=-1)[..., 0]
        loss = jnp.sum((jnp.log(total_e) + top[..., 0] - picked) * wc)
        hit = jax.lax.broadcasted_iota(jnp.int32, e.shape, e.ndim - 1) == tc[..., None].astype(jnp.int32)
        dlogits = ((e * (1.0 / total_e)[..., None] - hit.astype(e.dtype)) * wc[..., None]).astype(hc.dtype)
        dh = jax.lax.dot_general(dlogits, w.astype(hc.dtype), (((1,), (vocab_axis,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        if train_w:
            # (V, D) for vocab_axis 0, (D, V) for vocab_axis 1: contract the chunk's tokens.
            lhs, rhs = (dlogits, hc) if vocab_axis == 0 else (hc, dlogits)
            dw = dw + jax.lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return (total + loss, dw), dh.astype(h.dtype).reshape(shape)

    dw0 = jnp.zeros(w.shape, jnp.float32) if train_w else None
    (total, dw), dh = jax.lax.scan(body, (jnp.zeros((), jnp.float32), dw0), (h, targets, weights))
    return total, (dh, dw, w)


def _fused_sum_bwd(vocab_axis, res, g):
    dh, dw, w = res
    g = g.astype(jnp.float32)
    gw = None if dw is None else (g * dw).astype(w.dtype)
    return (g * dh).astype(dh.dtype), gw, None, None


_fused_sum.defvjp(_fused_sum_fwd, _fused_sum_bwd, symbolic_zeros=True)
