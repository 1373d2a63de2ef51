"""DoRA: weight-decomposed low-rank adaptation, with PEFT's ``lora_magnitude_vector`` semantics.

A DoRA adapter is a LoRA pair plus a magnitude ``m`` with one value per output feature. The adapted kernel is
``W' = m * V / ||V||`` with ``V = W + s * A @ B`` and ``||V||`` the L2 norm of each output column (in Flax's
(in, out) layout; PEFT's row norm of its (out, in) weight, ``torch.linalg.norm(weight, dim=1)``). As in the
DoRA paper (section 4.3) and PEFT, the norm is treated as a constant in the backward pass.

The layer output is computed from the unmerged pieces (PEFT's ``DoraLinearLayer.forward``):
``y = g * (x @ W) + g * s * (x @ A) @ B + bias`` with ``g = m / ||V||``, and the column norms come from
products with ``A`` and ``B`` instead of the full-size ``A @ B``::

    ||V_j||^2 = ||W_j||^2 + 2 s (A^T W)_j . B_j + s^2 B_j^T (A^T A) B_j

which costs an (r, out) and an (r, r) intermediate rather than an (in, out) one. With LoRA dropout ``drop``, PEFT
keeps the layer's plain output on the undropped input and applies DoRA's change to the dropped one:
``y = x @ W + bias + (g - 1) * (drop(x) @ W) + g * s * (drop(x) @ A) @ B``; so does :func:`dense_output`.

An embedding (PEFT's ``DoraEmbeddingLayer``) is the same decomposition of its table ``(vocab, features)``, read
as ``(in, out)``: one magnitude per feature, the norm of each feature's column over the vocabulary, and the output
``g * (E[ids] + s * A[ids] @ B)`` (:func:`embed_output`). A tied head (``Embed.attend``) uses the same adapted table,
as :func:`jlora.merge` does: ``(q * g) @ (E + s A B)^T``.

Magnitudes live in the adapter as the extra ``m`` of shape ``(*lead, out)``, in an :class:`jlora.Adapter` whose
variant is ``"dora"``; this module registers that variant's hooks (init, merge, layer call) with
:func:`jlora.adapter.register_variant`. DoRA is implemented for ``nn.Dense`` layers (PEFT's ``Linear``) and
embeddings (PEFT's ``Embedding``); other layer kinds raise an error naming the layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jlora.adapter import Adapter, LayerCall, Variant, register_variant

MAGNITUDE = "m"


def column_norm(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``||W + scale * A @ B||`` per output column, for kernels ``(*lead, in, out)``, without forming ``A @ B``.

    Computed in fp32. Returns shape ``(*lead, out)``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> w, a, b = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(6, 5), (6, 2), (2, 5)]))
        >>> full = jnp.linalg.norm(w + 0.5 * a @ b, axis=0)
        >>> bool(jnp.allclose(column_norm(w, a, b, 0.5), full, atol=1e-5))
        True
    """
    w, a, b = (t.astype(jnp.float32) for t in (w, a, b))
    wa = jnp.einsum("...io,...ir->...ro", w, a)            # (r, out): A^T W
    gram = jnp.einsum("...ir,...is->...rs", a, a)          # (r, r):   A^T A
    cross = jnp.sum(wa * b, axis=-2)                       # (out,):   (A^T W)_j . B_j
    quad = jnp.sum(b * jnp.einsum("...rs,...so->...ro", gram, b), axis=-2)
    sq = jnp.sum(w * w, axis=-2) + 2.0 * scale * cross + (scale * scale) * quad
    return jnp.sqrt(jnp.maximum(sq, 0.0))


def dense_output(x: jax.Array, y: jax.Array, kernel: jax.Array, bias: jax.Array | None, node: Adapter,
                 scale: float, dtype, dropout=None) -> jax.Array:
    """A DoRA ``nn.Dense`` output from its unmerged pieces.

    Args:
        x: the layer input ``(..., in)``.
        y: the layer's plain output ``x @ W + bias``.
        kernel: the (dequantized) frozen kernel ``(in, out)``.
        bias: the layer's bias (or None).
        node: the adapter: ``a`` (in, r), ``b`` (r, out), extra ``m`` (out,).
        scale: the LoRA scale s.
        dtype: the layer's compute dtype.
        dropout: optional function applied to the input of the adapted path (LoRA dropout).

    Returns:
        ``g * (x @ W + s * (x @ A) @ B) + bias`` with ``g = m / stop_gradient(||W + s A B||)``; with ``dropout``,
        ``y + (g - 1) * (drop(x) @ W) + g * s * (drop(x) @ A) @ B``.
    """
    g32 = _gain(kernel, node, scale)
    lift = (None,) * (y.ndim - 1)                          # explicit broadcasting over batch axes
    a, b = node.a.astype(dtype), node.b.astype(dtype)
    if dropout is None:
        xd = x.astype(dtype)
        base = y if bias is None else y - bias.astype(y.dtype)[lift]
    else:
        xd = dropout(x).astype(dtype)
        base = jnp.matmul(xd, kernel.astype(dtype))
    return _rescaled(y, base, scale * jnp.matmul(jnp.matmul(xd, a), b), g32[lift], dtype)


def embed_output(x: jax.Array, y: jax.Array, table: jax.Array, node: Adapter, scale: float, dtype,
                 method: str = "__call__") -> jax.Array:
    """A DoRA embedding's output from its unmerged pieces (PEFT's ``DoraEmbeddingVariant.forward``).

    Args:
        x: the ids (``__call__``) or the query ``(..., features)`` (``attend``).
        y: the layer's plain output (``E[ids]``, or ``query @ E^T``).
        table: the frozen embedding ``(vocab, features)``.
        node: the adapter: ``a`` (vocab, r), ``b`` (r, features), extra ``m`` (features,).
        scale: the LoRA scale s.
        dtype: the layer's compute dtype.
        method: ``"__call__"`` (lookup) or ``"attend"`` (a tied output head).

    Returns:
        ``g * (E[ids] + s * A[ids] @ B)`` with ``g = m / stop_gradient(||E + s A B||)`` (the norm of each feature's
        column over the vocabulary); for ``attend``, ``(query * g) @ (E + s A B)^T``, the merged table's product.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from jlora import Adapter
        >>> e, a, b, m = (jax.random.normal(jax.random.key(i), s) for i, s in enumerate([(9, 4), (9, 2), (2, 4), (4,)]))
        >>> node, ids = Adapter(a, b, {"m": m}, variant="dora"), jnp.array([[3, 0, 8]])
        >>> merged = merged_kernel(e, node, 0.5)
        >>> bool(jnp.allclose(embed_output(ids, e[ids], e, node, 0.5, jnp.float32), merged[ids], atol=1e-5))
        True
    """
    g32 = _gain(table, node, scale)
    a, b = node.a.astype(dtype), node.b.astype(dtype)
    lift = (None,) * (jnp.ndim(x) - (method == "attend"))      # explicit broadcasting over batch axes
    if method == "attend":   # the merged table's product: (q * g) @ E^T + s ((q * g) @ B^T) @ A^T
        q = x.astype(dtype) * g32.astype(dtype)[lift]
        out = jnp.matmul(q, table.astype(dtype).T) + scale * jnp.matmul(jnp.matmul(q, b.T), a.T)
        return out.astype(y.dtype)
    return _rescaled(y, y, scale * jnp.matmul(jnp.take(a, x, axis=0), b), g32[lift], dtype)


def _gain(kernel: jax.Array, node: Adapter, scale: float) -> jax.Array:
    """``g = m / stop_gradient(||W + s A B||)`` per output feature, in fp32 (the norm at the magnitude's
    precision, :func:`_at_precision_of`)."""
    m = node.extras[MAGNITUDE]
    norm = _at_precision_of(column_norm(kernel, node.a, node.b, scale), m)
    return m.astype(jnp.float32) / jax.lax.stop_gradient(norm)


def _rescaled(y: jax.Array, base: jax.Array, low: jax.Array, g32: jax.Array, dtype) -> jax.Array:
    """``g * (base + low)`` written as ``y + (g - 1) * base + g * low`` (``y`` is ``base`` plus any bias), with
    ``g - 1`` taken in fp32: in bf16 a magnitude change under 0.4% (its step near 1) would round away."""
    g, shift = g32.astype(dtype), (g32 - 1).astype(dtype)
    return (y + shift * base.astype(dtype) + g * low).astype(y.dtype)


def _at_precision_of(norm: jax.Array, m: jax.Array) -> jax.Array:
    """The fp32 column norm rounded to the magnitude's dtype (and back), so that ``m / norm`` is exactly 1 for a
    fresh adapter whose ``m`` was that norm stored in bf16 (unrounded, g was off 1 by up to 0.4%: the fresh
    adapter changed the model); for an fp32 ``m`` it is the norm itself."""
    return norm.astype(m.dtype).astype(jnp.float32)


def unrounded_magnitude(kernel: jax.Array, node: Adapter, scale: float) -> jax.Array:
    """The fp32 magnitude that gives, with the norm unrounded (PEFT's ``g = m / ||W + s A B||``), the gain this
    adapter has (:func:`_gain`: the norm at the magnitude's precision): ``m`` itself for an fp32 one. What an export
    writes, so that PEFT and a reload compute the function trained in bf16.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> w = jax.random.normal(jax.random.key(0), (6, 5))
        >>> node = Adapter(jnp.ones((6, 2), jnp.bfloat16), jnp.full((2, 5), 0.1, jnp.bfloat16),
        ...                {MAGNITUDE: jnp.full((5,), 2.0, jnp.bfloat16)})
        >>> m = unrounded_magnitude(w, node, 0.5)
        >>> bool(jnp.allclose(m / column_norm(w, node.a, node.b, 0.5), _gain(w, node, 0.5), rtol=1e-6))
        True
        >>> fp32 = Adapter(node.a, jnp.zeros((2, 5)), {MAGNITUDE: jnp.ones(5)})   # as it is (a zero column too)
        >>> unrounded_magnitude(w.at[:, 0].set(0.0), fp32, 0.5).tolist()
        [1.0, 1.0, 1.0, 1.0, 1.0]
    """
    m = node.extras[MAGNITUDE]
    if m.dtype == jnp.float32:   # its norm is not rounded: nothing to make up for
        return m
    norm = column_norm(kernel, node.a, node.b, scale)
    return m.astype(jnp.float32) * (norm / _at_precision_of(norm, m))


def merged_kernel(w: jax.Array, node: Adapter, scale: float) -> jax.Array:
    """``m * (W + s A B) / ||W + s A B||`` for a kernel ``(*lead, in, out)``, in fp32."""
    v = w.astype(jnp.float32) + scale * jnp.matmul(node.a.astype(jnp.float32), node.b.astype(jnp.float32))
    m = node.extras[MAGNITUDE]
    g = m.astype(jnp.float32) / _at_precision_of(jnp.linalg.norm(v, axis=-2), m)
    return v * g[..., None, :]


def _layer_call(c: LayerCall) -> jax.Array:
    if c.kind == "Embed":
        return embed_output(c.x, c.y, c.kernel, c.adapter, c.scale, c.dtype, c.method)
    return dense_output(c.x, c.y, c.kernel, c.bias, c.adapter, c.scale, c.dtype, c.dropout)


VARIANT = register_variant(Variant(
    "dora",
    init_extras=lambda w, a, b, scale: {MAGNITUDE: column_norm(w, a, b, scale)},
    merged=merged_kernel,
    layer_call=_layer_call,
    layers=("Dense", "Embed"),
    invertible=False,
))
