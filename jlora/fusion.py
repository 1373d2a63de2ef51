"""Computing a value as a buffer of its own on XLA:CPU, where fusing or folding it costs time.

XLA fuses cheap producers into each of their consumers and folds a transpose into the dot next to it. Two places
in jlora are measurably faster on CPU when it does not (bench/README.md has the figures):

- the rotary-embedding tables: fused, their ``cos`` and ``sin`` are evaluated again in every consumer (each
  layer's query and key rotations, forward and backward) and once per head there;
- the gradient of a LoRA factor ``A`` (in, r): XLA:CPU's dot computes ``g^T x`` (r, in) about 3x faster than
  ``x^T g`` (in, r), but folds the transpose of the fast form's result back into the slow form.

``jax.lax.optimization_barrier`` does not stop either (XLA:CPU removes barriers before fusion). A conditional
does: XLA neither fuses into its result nor folds across it, and when both branches are the same function the
result is the same whichever one runs.

One more XLA:CPU pathology, of a different kind: a reduction over the last axis with an elementwise product fused
in (``sum(a * b, -1)``, a norm's statistics, and the reductions autodiff makes of broadcasts) runs 10x to 100x
slower when the array's leading axis has size 1, i.e. at batch 1 (a (1, 2048, 576) one took 3.45 ms, the same
data as (2048, 576) 0.26 ms; 1 core, jax 0.10.2). :func:`squeeze_leading` drops such axes first.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def as_buffer(fn: Callable[[jax.Array], object], x: jax.Array, *, like: jax.Array) -> object:
    """``fn(x)``, computed as its own buffer on CPU (elsewhere plain ``fn(x)``: on a GPU a conditional can cost a
    device-to-host sync).

    Args:
        fn: the computation (a pytree of arrays out).
        x: its operand.
        like: any array of the primal computation; its first element picks one of the two identical branches
            (an empty one: plain ``fn(x)``). Never a tangent: reverse mode needs the choice fixed before backward.

    Examples:
        >>> import jax.numpy as jnp
        >>> x = jnp.arange(6.0).reshape(2, 3)
        >>> bool(jnp.array_equal(as_buffer(jnp.transpose, x, like=x), x.T))
        True
    """
    if jax.default_backend() != "cpu" or not like.size:
        return fn(x)
    return jax.lax.cond(jnp.ravel(like)[0] == 0, fn, fn, x)


def squeeze_leading(x: jax.Array) -> jax.Array:
    """``x`` without its leading axes of size 1 (at most ``x.ndim - 1`` of them), so that XLA:CPU's fused
    last-axis reductions take their fast path at batch 1 too (see the module docstring); reshape the result back
    with ``.reshape(x.shape)``. (Merging all leading axes into one works for some reductions, but XLA moves such a
    reshape back past a reduction, and the slow form returns.)

    Examples:
        >>> squeeze_leading(jnp.zeros((1, 5, 3))).shape, squeeze_leading(jnp.zeros((2, 5, 3))).shape
        ((5, 3), (2, 5, 3))
    """
    k = 0
    while k < x.ndim - 1 and x.shape[k] == 1:
        k += 1
    return x.reshape(x.shape[k:])
