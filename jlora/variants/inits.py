"""Adapter inits that change the base: PiSSA and OLoRA, returning the residual base explicitly.

Both start the adapter at a nonzero ``A @ B`` taken from the kernel itself and subtract it from the base, so the
model's output is unchanged at step 0 while the adapter holds the kernel's most important directions:

- PiSSA (Meng et al. 2024): with the SVD ``W = U S Vt`` (W of shape (in, out)), ``A = U_r sqrt(S_r / s)`` and
  ``B = sqrt(S_r / s) Vt_r`` (PEFT's ``pissa_init``, transposed to Flax's layout).
- OLoRA (Büyükakyüz 2024): with the QR factorization of PEFT's (out, in) weight ``W^T = Q R``, ``A = R_r^T`` and
  ``B = Q_r^T`` (PEFT's ``olora_init``).

The residual base is ``W - s A @ B``, i.e. :func:`jlora.unmerge` of the initial adapters. Both are deterministic
functions of the kernel (the key is unused), so the initial adapters can be recomputed from the original base:
:func:`to_original_base` turns trained ones into the rank-2r LoRA ``[A | A0] @ [B ; -B0]``
relative to the original base, which is what PEFT writes for sharing (:func:`jlora.peft.save` writes it too) and
what the ``jlora`` commands use on a PiSSA/OLoRA run, so a run needs only the base model it was trained from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp

from jlora import adapter as adapter_lib
from jlora import lora as lora_lib
from jlora import tree as tree_lib
from jlora.adapter import Adapter
from jlora.config import CHANGES_BASE, LoraConfig


def pissa_factors(w: jax.Array, r: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """PiSSA's ``(A (..., in, r), B (..., r, out))`` with ``s A @ B`` the rank-r truncated SVD of ``w``."""
    u, sv, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
    root = jnp.sqrt(sv[..., :r] / scale)
    return u[..., :, :r] * root[..., None, :], root[..., :, None] * vt[..., :r, :]


def olora_factors(w: jax.Array, r: int, scale: float) -> tuple[jax.Array, jax.Array]:
    """OLoRA's ``(A, B)``: ``B`` the first r orthonormal rows of Q, ``A`` R's first r rows, from ``W^T = Q R``."""
    del scale  # OLoRA does not rescale the factors (PEFT's olora_init); the residual subtracts s * A @ B
    q, rr = jnp.linalg.qr(jnp.swapaxes(w.astype(jnp.float32), -1, -2))
    return jnp.swapaxes(rr[..., :r, :], -1, -2), jnp.swapaxes(q[..., :, :r], -1, -2)


_FACTORS = {"pissa": pissa_factors, "olora": olora_factors}


def init_with_base(params: Mapping, cfg: LoraConfig, *, key: jax.Array,
                   layout: Mapping | None = None) -> tuple[dict, dict]:
    """Creates adapters and returns them with the base to train on: ``(adapters, params)``.

    For ``init="pissa"``/``"olora"`` the returned params hold the residual ``W - s A @ B`` at every adapted
    kernel (in the kernel's dtype), so ``apply(model, params_out, adapters, ...)`` equals the original model at
    step 0; for the other inits the params are returned unchanged (and this equals :func:`jlora.init`). An NNX
    model gives back a new model holding the residual (as :func:`jlora.merge` does); the model passed in is not
    changed.

    Examples:
        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"q_proj": {"kernel": jax.random.normal(jax.random.key(0), (16, 8))}}
        >>> cfg = jlora.LoraConfig(rank=2, alpha=4, targets="q_proj", init="pissa")
        >>> adapters, base = init_with_base(params, cfg, key=jax.random.key(1))
        >>> bool(jnp.allclose(jlora.merge(base, adapters, cfg)["q_proj"]["kernel"], params["q_proj"]["kernel"],
        ...                   atol=1e-5))
        True
    """
    if cfg.init not in CHANGES_BASE:
        return lora_lib.init(params, cfg, key=key, layout=layout), params
    if any(adapter_lib.kernel_type(x) is not None for x in tree_lib.flatten(lora_lib.plain_params(params)).values()):
        raise ValueError(f"init={cfg.init!r} needs full-precision kernels (as PEFT): run it on the unquantized "
                         f"params, then quantize the returned residual base with jlora.quantize")
    adapters = lora_lib.init(params, cfg, key=key, layout=layout, factors=_FACTORS[cfg.init])
    return adapters, residual(params, adapters, cfg, layout)


def residual(params: Mapping, adapters: Mapping, cfg: LoraConfig, layout: Mapping | None = None) -> dict:
    """``params`` minus the low-rank part of ``adapters`` at every adapted kernel: ``W - s A @ B``."""
    lowrank = tree_lib.unflatten({p: Adapter(n.a, n.b, layout=n.layout)
                                  for p, n in adapter_lib.adapter_items(adapters)})
    return lora_lib.unmerge(params, lowrank, cfg, layout)


def to_original_base(adapters: Mapping, params: Mapping, cfg: LoraConfig) -> tuple[dict, LoraConfig]:
    """PiSSA/OLoRA ``adapters``, trained on the residual of the *original* base ``params``, as plain LoRA adapters
    on ``params`` itself; other inits come back unchanged.

    ``A' = [A | A0]`` and ``B' = [B ; -B0]``, the initial factors recomputed from ``params``, at twice the rank with
    alpha times 2 (sqrt 2 with rsLoRA), so the scale ``s`` is unchanged and ``W + s A' B' = (W - s A0 B0) + s A B``:
    what PEFT writes when it shares such an adapter. Merging, evaluating or serving them needs only the original
    base, as any other adapter does.

    Examples:
        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"q_proj": {"kernel": jax.random.normal(jax.random.key(0), (16, 8))}}
        >>> cfg = jlora.LoraConfig(rank=2, alpha=4, targets="q_proj", init="pissa")
        >>> adapters, residual_base = init_with_base(params, cfg, key=jax.random.key(1))
        >>> plain, plain_cfg = to_original_base(adapters, params, cfg)
        >>> plain_cfg.rank, plain_cfg.init, plain["q_proj"]["kernel"].a.shape
        (4, 'default', (16, 4))
        >>> x = jnp.ones((1, 16))
        >>> w_trained = jlora.merge(residual_base, adapters, cfg)["q_proj"]["kernel"]
        >>> bool(jnp.allclose(jlora.merge(params, plain, plain_cfg)["q_proj"]["kernel"], w_trained, atol=1e-5))
        True
    """
    if cfg.init not in CHANGES_BASE:
        return dict(adapters), cfg
    flat = tree_lib.flatten(params)
    out: dict = dict(adapter_lib.full_items(adapters))
    for path, node in adapter_lib.adapter_items(adapters):
        a0, b0 = _FACTORS[cfg.init](lora_lib.dense_value(flat[path]), node.rank, cfg.scale(path))
        out[path] = node.replace(a=jnp.concatenate([node.a, a0.astype(node.a.dtype)], axis=-1),
                                 b=jnp.concatenate([node.b, (-b0).astype(node.b.dtype)], axis=-2))
    k = 2 ** 0.5 if cfg.use_rslora else 2.0
    plain = dataclasses.replace(cfg, init="default", rank=2 * cfg.rank, alpha=cfg.alpha * k,
                                rank_pattern={p: 2 * r for p, r in cfg.rank_pattern.items()},
                                alpha_pattern={p: a * k for p, a in cfg.alpha_pattern.items()})
    return tree_lib.unflatten(out), plain


__all__ = ["init_with_base", "residual", "to_original_base", "pissa_factors", "olora_factors", "CHANGES_BASE"]
