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
from jax import custom_batching


def as_buffer(fn: Callable[[jax.Array], object], x: jax.Array, *, like: jax.Array) -> object:
    """``fn(x)``, computed as its own buffer on CPU (elsewhere plain ``fn(x)``: on a GPU a conditional can cost a
    device-to-host sync).

    Args:
        fn: the computation (a pytree of arrays out).
        x: its operand.
        like: any array of the primal computation; its first element picks one of the two identical branches
            (an empty one: plain ``fn(x)``). Never a tangent: reverse mode needs the choice fixed before backward.
            Under ``vmap`` the choice stays one scalar (:func:`_first_is_zero`), so the conditional is still one
            and still transposes (a batched choice would turn it into a select, which reverse mode cannot take
            through a linear ``x``).

    Examples:
        >>> import jax.numpy as jnp
        >>> x = jnp.arange(6.0).reshape(2, 3)
        >>> bool(jnp.array_equal(as_buffer(jnp.transpose, x, like=x), x.T))
        True
    """
    if jax.default_backend() != "cpu" or not like.size:
        return fn(x)
    return jax.lax.cond(_first_is_zero(jax.lax.stop_gradient(like)), fn, fn, x)


@custom_batching.custom_vmap
def _first_is_zero(like: jax.Array) -> jax.Array:
    """``like``'s first element is 0: a data-dependent scalar, so that XLA cannot fold the conditional away. Its
    batching rule takes the first element of the whole batch and stays unbatched: both branches are the same
    function, so any scalar picks right, and an unbatched one keeps the conditional a conditional."""
    return jnp.ravel(like)[0] == 0


@_first_is_zero.def_vmap
def _first_is_zero_batched(axis_size: int, in_batched: list[bool], like: jax.Array) -> tuple[jax.Array, bool]:
    del axis_size, in_batched
    return jnp.ravel(like)[0] == 0, False


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
