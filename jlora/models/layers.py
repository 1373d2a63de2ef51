"""Building blocks shared by jlora's model families: norms, rotary embeddings, masked attention, the KV cache,
the layer stack (unrolled or scanned), and the activations' sharding constraints (:func:`constrain`).

Every projection in the models is a plain ``nn.Dense`` (so the LoRA transform can intercept it); this module
holds only the parameter-free math plus two norms, written out so that their numerics follow transformers'
PyTorch code (statistics in float32, the result cast to the compute dtype) whatever the dtype promotion mode.

The KV cache is an explicit pytree argument, not a Flax variable: a model called with ``cache=`` returns
``(logits, new_cache)``. Slots are shared by all rows of a batch (left padding aligns them), so one scalar
``end`` says where the next tokens go; ``mask`` records which slots hold real tokens and ``pos`` the next
position of each row, so decoding continues the positions of a left-padded prompt correctly. Layers read their
cache slab and return only the new tokens' keys/values; the model writes those for all layers at once
(:func:`append`), so a decoding step never copies the cache.

Attention rule (one function for training, prefill and decoding): query slot ``end + t`` may attend key slot
``s`` when ``s <= end + t``, slot ``s`` holds a real token, and (with a sliding window ``w``)
``end + t - s < w``, exactly transformers' ``kv_idx > q_idx - sliding_window``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jlora import fusion
from jlora.models import attention

Dtype = Any


class KVCache(NamedTuple):
    """Keys and values of every layer, plus the bookkeeping shared by all layers.

    Attributes:
        k: ``(layers, batch, max_len, kv_heads, head_dim)`` cached keys (after RoPE).
        v: ``(layers, batch, max_len, kv_heads, head_dim)`` cached values.
        mask: ``(batch, max_len)`` int32, 1 where a slot holds a real (non-padding) token.
        pos: ``(batch,)`` int32, the position the next real token of each row gets.
        end: ``()`` int32, the number of slots written so far (the next tokens go to ``end, end + 1, ...``).
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    pos: jax.Array
    end: jax.Array


def make_cache(num_layers: int, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int,
               dtype: Dtype) -> KVCache:
    """An empty :class:`KVCache`. Writing past ``max_len`` slots is not checked (size it for prompt + new tokens).

    Examples:
        >>> c = make_cache(2, 3, 16, 4, 8, jnp.float32)
        >>> c.k.shape, c.mask.shape, int(c.end)
        ((2, 3, 16, 4, 8), (3, 16), 0)
    """
    shape = (num_layers, batch_size, max_len, num_kv_heads, head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch_size, max_len), jnp.int32),
                   jnp.zeros((batch_size,), jnp.int32), jnp.zeros((), jnp.int32))


class Masking(NamedTuple):
    """What every layer needs to attend. Without a cache the mask stays in parts (``valid``, ``segment_ids``; the
    causal and window rules are static), so the attention kernel never needs a (T, T) array.

    Attributes:
        positions: (B, T) positions of the new tokens.
        valid: (B, T) int32, 1 where a new token is real (not padding); None when no ``attention_mask`` was given.
        segment_ids: (B, T) packed rows' example ids, or None.
        allowed: with a cache, (B, T, T) bool, which new tokens each new token may attend (causal, padding,
            window); None without a cache.
        cached_allowed: (B, T, S) bool, which cache slots each new token may attend; None without a cache.
    """

    positions: jax.Array
    valid: jax.Array | None
    segment_ids: jax.Array | None
    allowed: jax.Array | None
    cached_allowed: jax.Array | None


def lookup_ids(input_ids: jax.Array, attention_mask: jax.Array | None, vocab_size: int) -> jax.Array:
    """The ids to look up in the token embedding: a padding slot's id (``attention_mask`` 0) outside the vocabulary
    (a tokenizer's pad id past the model's table) reads row 0. ``jnp.take`` gives such an id a NaN row, and
    attention's zero weight for a masked key times a NaN value is NaN in every query. A real token's id out of
    range still gives NaN logits, as it should be seen."""
    if attention_mask is None:
        return input_ids
    ids = jnp.asarray(input_ids)
    outside = (ids < 0) | (ids >= vocab_size)
    return jnp.where((jnp.asarray(attention_mask) == 0) & outside, jnp.zeros_like(ids), ids)


def masking(input_ids: jax.Array, attention_mask: jax.Array | None, positions: jax.Array | None,
            cache: KVCache | None, sliding_window: int | None = None,
            segment_ids: jax.Array | None = None) -> Masking:
    """Positions and attention masks for a call on ``input_ids`` (B, T), with or without a cache.

    Default positions are ``cumsum(attention_mask) - 1`` clipped at 0 (continuing from ``cache.pos``), so
    left-padded rows start at position 0 at their first real token. ``segment_ids`` (B, T) (packed rows: 1, 2,
    ... per example) restrict attention to tokens of the same segment; pass the per-example ``positions`` too.
    """
    b, t = input_ids.shape
    mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask).astype(jnp.int32)
    if mask.shape != (b, t):
        raise ValueError(f"`attention_mask` has shape {mask.shape} but `input_ids` has shape {(b, t)}; they must "
                         f"match (with a cache, pass the mask of the new tokens only)")
    start = jnp.zeros((b,), jnp.int32) if cache is None else cache.pos
    if positions is None:
        positions = jnp.maximum(start[:, None] + jnp.cumsum(mask, axis=1) - 1, 0)
    positions = jnp.asarray(positions).astype(jnp.int32)

    def rule(rel, key_valid):          # rel: (T, S) query slot - key slot; key_valid: (B, S)
        return attention.band(rel, True, sliding_window)[None, :, :] & (key_valid[:, None, :] > 0)

    seg = None
    if segment_ids is not None:
        if cache is not None:
            raise ValueError("`segment_ids` (packed sequences) cannot be combined with a KV cache")
        seg = jnp.asarray(segment_ids)
        if seg.shape != (b, t):
            raise ValueError(f"`segment_ids` has shape {seg.shape} but `input_ids` has shape {(b, t)}")
    valid = None if attention_mask is None else mask
    if cache is None:
        return Masking(positions, valid, seg, None, None)
    steps = jnp.arange(t, dtype=jnp.int32)
    slots = jnp.arange(cache.mask.shape[1], dtype=jnp.int32)     # slots >= end were never written: their mask is 0
    return Masking(positions, valid, None, rule(steps[:, None] - steps[None, :], mask),
                   rule(cache.end + steps[:, None] - slots[None, :], cache.mask))


def append(cache: KVCache, k: jax.Array, v: jax.Array, attention_mask: jax.Array | None) -> KVCache:
    """The cache with the new tokens' keys/values (L, B, T, KV, D) written at slot ``end``, and the bookkeeping
    advanced: one ``dynamic_update_slice`` per array, done in place inside a jitted decoding loop."""
    b, t = k.shape[1], k.shape[2]
    mask = jnp.ones((b, t), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask).astype(jnp.int32)
    zero = jnp.zeros((), jnp.int32)
    idx = (zero, zero, cache.end, zero, zero)
    return KVCache(k=jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), idx),
                   v=jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), idx),
                   mask=jax.lax.dynamic_update_slice(cache.mask, mask, (zero, cache.end)),
                   pos=cache.pos + jnp.sum(mask, axis=1), end=cache.end + t)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, m: Masking, scale: float,
           kv_cache: tuple[jax.Array, jax.Array] | None = None, *, window: int | None = None,
           implementation: str = "auto") -> jax.Array:
    """Masked softmax attention with grouped KV heads (MHA, GQA and MQA alike), over the new tokens and,
    when given, one layer's cache slots (one joint softmax; the cache is read, never copied).

    Args:
        q: (B, T, H, D) queries; head ``h`` uses KV head ``h // (H // KV)``, as transformers' ``repeat_kv``.
        k, v: (B, T, KV, D) keys/values of the new tokens.
        m: the :class:`Masking` of this call.
        scale: multiplies the scores (``1/sqrt(D)`` for these models).
        kv_cache: this layer's cached ``(k, v)``, each (B, S, KV, D), or None.
        window: the model's sliding window (the same one given to :func:`masking`), or None.
        implementation: the attention kernel without a cache (:func:`jlora.models.attention.choose`); with a
            cache (decoding, prefill for generation) the masked scores are computed whole.

    Returns:
        (B, T, H, D) in ``q``'s dtype. Scores and softmax are float32. A row with nothing allowed (a padding
        query) gets a finite output that is meaningless and ignored downstream.
    """
    if kv_cache is None:
        return attention.attention(q, k, v, scale=scale, causal=True, window=window, valid=m.valid,
                                   segment_ids=m.segment_ids, implementation=implementation)
    b, t, h, d = q.shape
    kv = k.shape[2]
    if h % kv:
        raise ValueError(f"{h} query heads are not a multiple of {kv} key/value heads")
    qg = q.reshape(b, t, kv, h // kv, d)
    neg = jnp.finfo(jnp.float32).min

    def scores(keys, allowed):
        s = jnp.einsum("btkgd,bskd->bkgts", qg, keys.astype(q.dtype), preferred_element_type=jnp.float32) * scale
        return jnp.where(allowed[:, None, None, :, :], s, neg)

    s_new = scores(k, m.allowed)
    s_old = scores(kv_cache[0], m.cached_allowed)
    probs = jax.nn.softmax(jnp.concatenate([s_old, s_new], axis=-1), axis=-1).astype(q.dtype)
    n_old = s_old.shape[-1]
    out = (jnp.einsum("bkgts,bskd->btkgd", probs[..., :n_old], kv_cache[1].astype(q.dtype))
           + jnp.einsum("bkgts,bskd->btkgd", probs[..., n_old:], v.astype(q.dtype)))
    return out.reshape(b, t, h, v.shape[-1])


def output(x: jax.Array, head: nn.Module, return_hidden: bool):
    """The model's output from its final hidden states ``x``: float32 logits from ``head`` (an ``nn.Embed``,
    through ``attend``, or an ``nn.Dense``), or with ``return_hidden`` a :class:`jlora.loss.Hidden` for the fused
    loss, when the head's weight may be read directly: not when the LoRA transform adapts it (the module holds a
    ``"lora"`` variable) or it is quantized (not an array); then logits after all."""
    from jlora.loss import Hidden

    tied = isinstance(head, nn.Embed)
    leaf = "embedding" if tied else "kernel"
    if return_hidden and not head.has_variable("lora", leaf):
        weight = head.get_variable("params", leaf)
        if isinstance(weight, jax.Array) and (tied or not head.use_bias):   # the fused loss has no bias
            return Hidden(x, weight, 0 if tied else 1)
    return (head.attend(x) if tied else head(x)).astype(jnp.float32)


@jax.custom_vjp
def silu_gate(gate: jax.Array, up: jax.Array) -> jax.Array:
    """``silu(gate) * up``, the gated MLP of Llama-style models, saving only ``gate`` and ``up`` for the backward
    pass (the sigmoid is recomputed there) instead of the four (tokens, intermediate) intermediates that
    differentiating ``jax.nn.silu(gate) * up`` keeps per layer.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> g, u = jnp.array([-1.0, 0.5, 2.0]), jnp.array([3.0, -1.0, 0.25])
        >>> bool(jnp.allclose(silu_gate(g, u), jax.nn.silu(g) * u))
        True
        >>> ref = jax.grad(lambda a, b: jnp.sum(jax.nn.silu(a) * b), argnums=(0, 1))(g, u)
        >>> got = jax.grad(lambda a, b: jnp.sum(silu_gate(a, b)), argnums=(0, 1))(g, u)
        >>> all(bool(jnp.allclose(x, y)) for x, y in zip(got, ref))
        True
    """
    return jax.nn.silu(gate) * up


def _silu_gate_fwd(gate, up):
    return jax.nn.silu(gate) * up, (gate, up)


def _silu_gate_bwd(res, dy):
    gate, up = res
    sig = jax.nn.sigmoid(gate)
    dgate = dy * up * sig * (1 + gate * (1 - sig))
    return dgate.astype(gate.dtype), (dy * gate * sig).astype(up.dtype)


silu_gate.defvjp(_silu_gate_fwd, _silu_gate_bwd)


def gated(name: str, gate: jax.Array, up: jax.Array) -> jax.Array:
    """``activation(name)(gate) * up``, through :func:`silu_gate` for silu."""
    if name in ("silu", "swish"):
        return silu_gate(gate, up)
    return activation(name)(gate) * up


# --- rotary position embeddings (transformers' "rotate_half" layout) ------------------------------------------

def rope_inv_freq(head_dim: int, theta: float, rope_type: str = "default", factor: float = 1.0,
                  low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                  original_max_position_embeddings: int | None = None) -> np.ndarray:
    """Inverse frequencies (head_dim // 2,) float32, as transformers' ``ROPE_INIT_FUNCTIONS`` compute them.

    Supports ``rope_type`` "default", "linear" (frequencies / factor) and "llama3" (Llama 3.1's smooth
    interpolation between low and high frequency bands).

    Examples:
        >>> rope_inv_freq(4, 10000.0).tolist()
        [1.0, 0.009999999776482582]
    """
    inv = (1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))).astype(np.float32)
    if rope_type == "default":
        return inv
    if rope_type == "linear":
        return (inv / np.float32(factor)).astype(np.float32)
    if rope_type == "llama3":
        old = float(original_max_position_embeddings)
        low_wavelen, high_wavelen = old / low_freq_factor, old / high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"rope_type {rope_type!r} is not supported; supported: 'default', 'linear', 'llama3'")


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype: Dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables (B, T, head_dim) for integer ``positions`` (B, T), cast to ``dtype``.

    Computed once per call, as buffers (:func:`jlora.fusion.as_buffer`): left to XLA:CPU, the ``cos`` and ``sin``
    were evaluated again in each layer's query and key rotations, once per head, about 2.5% of a SmolLM2-shape
    train step.
    """
    def tables(pos):
        freqs = pos.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)

    return fusion.as_buffer(tables, positions, like=positions)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` (B, T, H, D) by the tables (B, T, D): ``x * cos + rotate_half(x) * sin``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# --- norms ---------------------------------------------------------------------------------------------------

def _expand(v: jax.Array, ndim: int) -> jax.Array:
    """A feature vector shaped to broadcast explicitly against an array of ``ndim`` dims."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


class RMSNorm(nn.Module):
    """``scale * x / sqrt(mean(x^2) + eps)``; statistics in float32, like transformers' LlamaRMSNorm."""

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = fusion.squeeze_leading(x).astype(jnp.float32)     # batch 1: the fast reductions (jlora.fusion)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return (_expand(scale, y.ndim).astype(self.dtype) * y.astype(self.dtype)).reshape(x.shape)


class LayerNorm(nn.Module):
    """``(x - mean) / sqrt(var + eps) * scale + bias`` computed in float32, cast to ``dtype``."""

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
        x32 = fusion.squeeze_leading(x).astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * _expand(scale, y.ndim).astype(jnp.float32) + _expand(bias, y.ndim).astype(jnp.float32)
        return y.astype(self.dtype).reshape(x.shape)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str):
    """The activation function transformers calls ``name`` (``ACT2FN``)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


# --- activation sharding --------------------------------------------------------------------------------------

# Flax logical axis names of the (batch, tokens, features) activations that the models constrain: the hidden
# states (EMBED features), attention's projected heads flattened (HEADS: heads * head_dim) and an MLP's inner
# activations (MLP). They constrain nothing until rules bind all three axes of an array to mesh axes
# (``flax.linen.logical_axis_rules``), as :func:`jlora.parallel.make_sharded_train_step` does.
BATCH, LENGTH = "activation_batch", "activation_length"
EMBED, HEADS, MLP = "activation_embed", "activation_heads", "activation_mlp"


def constrain(x: jax.Array, features: str = EMBED) -> jax.Array:
    """``x`` (B, T, F) under the sharding that the bound logical axis rules give ``(BATCH, LENGTH, features)``
    (``nn.with_logical_constraint``); ``x`` itself, untouched, unless rules name all three (one device, a plain
    ``jax.jit``, ``pmap``).

    The models call it on the hidden states at every residual connection and on the outputs of the projections
    that open attention and MLP blocks. Left alone, XLA's partitioner may carry a frozen kernel's FSDP sharding
    (over its feature dims) into the activations, and all-gather the whole batch's activations for each matmul
    instead of the kernel.

    Examples:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((2, 3, 4))
        >>> constrain(x) is x
        True
    """
    return nn.with_logical_constraint(x, (BATCH, LENGTH, features), fallback=nn.spmd.RulesFallback.NO_CONSTRAINT)


REMAT_POLICIES = ("none", "full", "dots")


def maybe_remat(block_cls, remat: str, *, scanned: bool):
    """Wraps a layer class in ``nn.remat`` per the config's ``remat`` ("none" | "full" | "dots")."""
    if remat == "none":
        return block_cls
    if remat == "full":
        return nn.remat(block_cls, prevent_cse=not scanned)
    if remat == "dots":
        return nn.remat(block_cls, prevent_cse=not scanned,
                        policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    raise ValueError(f"remat={remat!r} is not one of {REMAT_POLICIES}")


# Variable collections and rng streams of a scanned layer stack: params and LoRA adapters get a leading layer axis,
# and every layer draws its own init and dropout randomness.
SCAN_VARIABLE_AXES = {"params": 0, "lora": 0}
SCAN_SPLIT_RNGS = {"params": True, "dropout": True, "lora_dropout": True}


def run_layers(layer_cls, config, prefix: str, x, kv, shared):
    """Runs ``config.num_hidden_layers`` layers, unrolled (``{prefix}_{i}``) or as one ``nn.scan`` (``prefix``).

    ``layer_cls(config, name=...)`` is a layer with the scan-friendly signature ``(x, kv, shared) -> (x, new_kv)``;
    ``config.scan_layers`` and ``config.remat`` choose scanning and rematerialization. Must be called inside a
    compact method of the parent module. ``kv`` is the cache's ``(k, v)`` stacked over layers or None;
    ``shared`` is broadcast to every layer. Returns ``(x, new_kv)``, the new tokens' keys/values stacked over
    layers (None without a cache).
    """
    n = config.num_hidden_layers
    block = maybe_remat(layer_cls, config.remat, scanned=config.scan_layers)
    if config.scan_layers:
        stack = nn.scan(block, variable_axes=SCAN_VARIABLE_AXES, split_rngs=SCAN_SPLIT_RNGS,
                        in_axes=(0, nn.broadcast), length=n)
        return stack(config, name=prefix)(x, kv, shared)
    new = []
    for i in range(n):
        x, new_kv = block(config, name=f"{prefix}_{i}")(x, None if kv is None else (kv[0][i], kv[1][i]), shared)
        new.append(new_kv)
    if kv is None:
        return x, None
    return x, (jnp.stack([a for a, _ in new]), jnp.stack([b for _, b in new]))
