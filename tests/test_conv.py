"""Convolution LoRA on Linen models (1-D to 3-D): A a convolution of the layer's geometry into r channels, B a
(grouped) 1x1 convolution; checked against a reference that merges with plain numpy loops and runs Flax's conv."""

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from jlora import bank
from jlora.adapter import adapter_items
from helpers import assert_trees_all_close


class CNNs(nn.Module):
    """Three small CNNs side by side (1-D, 2-D, 3-D), so that one compiled call checks them all."""

    @nn.compact
    def __call__(self, x1, x2, x3):
        h = nn.Conv(6, 3, padding="CAUSAL", kernel_dilation=2, name="causal")(x1)
        h = nn.Conv(6, 5, strides=2, padding="VALID", feature_group_count=3, name="strided")(h)
        y1 = nn.Conv(4, 3, padding="REFLECT", use_bias=False, name="reflect")(nn.relu(h))
        h = nn.relu(nn.Conv(8, (3, 3), strides=2, padding=1, name="stem")(x2))
        h = nn.Conv(8, (3, 3), padding="SAME", kernel_dilation=2, feature_group_count=2, name="grouped")(h)
        h = nn.Conv(8, (3, 3), padding="CIRCULAR", feature_group_count=8, name="depthwise")(h)
        y2 = nn.Dense(3, name="head")(nn.Conv(6, (1, 1), name="pointwise")(h).mean((-3, -2)))
        h = nn.Conv(4, (2, 3, 3), strides=(1, 2, 2), padding=((1, 0), (1, 1), (0, 2)), input_dilation=(1, 2, 1),
                    name="c1")(x3)
        y3 = nn.Conv(4, (1, 2, 2), padding="SAME_LOWER", feature_group_count=4, name="c2")(h)
        return y1, y2, y3


SHAPES = ((2, 3, 16, 3), (2, 9, 9, 4), (2, 4, 6, 5, 2))   # the 1-D input has two batch axes
CFG = jlora.LoraConfig(rank=4, alpha=8, targets="causal|strided|reflect|stem|grouped|depthwise|pointwise|c1|c2",
                       rank_pattern={"depthwise": 8, "causal|strided|reflect": 3, "c1": 2})


@functools.cache
def _setup():
    """The model, inputs, random params, config, layout and fresh adapters (B = 0), drawn with numpy: compiling
    JAX's random initializers costs more than every check below."""
    model, rng = CNNs(), np.random.RandomState(0)
    xs = tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in SHAPES)
    shapes = jax.eval_shape(model.init, jax.random.key(1), *xs)["params"]
    params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32), shapes)
    layout = jlora.layout(model, *xs)
    made = jax.eval_shape(lambda: jlora.init(params, CFG, key=jax.random.key(2), layout=layout))
    def draw(s, scale=0.1):
        return jnp.asarray(scale * rng.normal(size=s.shape), jnp.float32)

    fresh = jax.tree.map(lambda n: n.replace(a=draw(n.a), b=jnp.zeros(n.b.shape)), made,
                         is_leaf=jlora.adapter.is_adapter)
    adapters = jax.tree.map(draw, made)
    return model, xs, params, CFG, layout, fresh, adapters


def _reference_merge(params, adapters, cfg, layout):
    """W + scale * A @ B, with B expanded to its block-diagonal (r, out) by explicit loops over the groups."""
    flat = jlora.tree.flatten(params)
    for path, node in adapter_items(adapters):
        w = flat[path]
        g, (r, out) = layout[path].groups, (node.rank, w.shape[-1])
        full_b = jnp.zeros((r, out))
        for j in range(g):
            rows, cols = slice(j * r // g, (j + 1) * r // g), slice(j * out // g, (j + 1) * out // g)
            full_b = full_b.at[rows, cols].set(node.b[:, cols])
        flat[path] = w + cfg.scale(path) * (node.a @ full_b).reshape(w.shape)
    return jlora.tree.unflatten(flat)


def test_conv_lora_matches_reference_and_merge():
    model, x, params, cfg, layout, fresh, adapters = _setup()

    def lora_out(params, a, x):
        return jlora.apply(model, params, a, cfg, *x)

    def ref_out(params, a, x):
        return model.apply({"params": _reference_merge(params, a, cfg, layout)}, *x)

    def checks(params, a, x):   # everything in one compiled call: op-by-op convolutions compile slowly
        def grad(fn):
            return jax.grad(lambda b: sum(jnp.sum(jnp.sin(y)) for y in fn(params, b, x)))(a)

        merged = jlora.merge(params, a, cfg)
        return dict(plain=model.apply({"params": params}, *x), lora=lora_out(params, a, x),
                    ref=ref_out(params, a, x), merged=model.apply({"params": merged}, *x), grads=grad(lora_out),
                    ref_grads=grad(ref_out), unmerged=jlora.unmerge(merged, a, cfg))

    out = jax.jit(checks)(params, adapters, x)
    plain = model.apply({"params": params}, *x)       # op by op (as the eager lora_out): XLA's fusion stays out
    assert all(jnp.array_equal(f, p) for f, p in zip(lora_out(params, fresh, x), plain))   # fresh: bit-identical
    assert all(float(jnp.max(jnp.abs(r - p))) > 1e-2 for r, p in zip(out["ref"], out["plain"]))  # they do something
    assert_trees_all_close(out["lora"], out["ref"], atol=1e-5)
    assert_trees_all_close(out["merged"], out["ref"], atol=1e-5)
    assert_trees_all_close(out["grads"], out["ref_grads"], atol=1e-5)
    assert_trees_all_close(out["unmerged"], params, atol=1e-6)


def test_conv_adapter_shapes_grouped_b_and_summary():
    model, x, params, cfg, layout, _, adapters = _setup()
    shapes = {p: (n.a.shape, n.b.shape) for p, n in adapter_items(adapters)}
    assert shapes["stem/kernel"] == ((36, 4), (4, 8))            # (3*3*4, r), (r, out)
    assert shapes["grouped/kernel"] == ((36, 4), (2, 8))         # groups=2: B holds its 2 blocks (r/2, out)
    assert shapes["depthwise/kernel"] == ((9, 8), (1, 8))        # depthwise: in/groups = 1, r/groups = 1
    assert shapes["c1/kernel"] == ((36, 2), (2, 4))              # 3-D: (2*3*3*2, r)
    assert layout["grouped/kernel"].conv == jlora.ConvSpec((3, 3), (1, 1), "SAME", (1, 1), (2, 2), 2)
    assert layout["causal/kernel"].conv.padding == "CAUSAL"
    assert jlora.count(adapters) == sum(math.prod(a) + math.prod(b) for a, b in shapes.values())
    assert re.search(r"depthwise/kernel +\(3, 3, 1, 8\) +8 +80 ", jlora.summary(params, adapters))
    jlora.lora.check_fits(params, adapters, cfg)
    bad = {"grouped": {"kernel": adapters["grouped"]["kernel"].replace(b=jnp.zeros((4, 8)))}}
    with pytest.raises(ValueError, match=r"'grouped/kernel' does not fit.* b \('r/2', 8\)"):
        jlora.lora.check_fits(params, bad)


def test_train_step_changes_adapters_only():
    model, x, params, cfg, _, _, adapters = _setup()      # random adapters: one step moves A and B

    def loss_fn(apply_fn, batch):
        return sum(jnp.mean((y - 1.0) ** 2) for y in apply_fn(*batch["x"])), {}

    opt = optax.adam(1e-2)
    state = jlora.TrainState.create(adapters, opt, rng=jax.random.key(5))
    step = jax.jit(jlora.make_train_step(model, cfg, opt, loss_fn=loss_fn))
    before = jax.tree.map(np.array, params)
    new, _ = step(state, params, {"x": x})
    changed = jax.tree.map(lambda n, o: not np.array_equal(n, o), new.adapters, adapters)
    assert all(jax.tree.leaves(changed)), changed
    assert_trees_all_close(params, before, atol=0.0)


def test_grouped_rank_and_unsupported_conv_layers_are_clear_errors():
    model, x, params, _, layout, _, _ = _setup()
    with pytest.raises(ValueError, match=r"rank 3 at 'grouped/kernel'.* in each of 2 groups.*divisible"):
        jlora.init(params, jlora.LoraConfig(rank=3, targets="grouped"), key=jax.random.key(0), layout=layout)
    with pytest.raises(ValueError, match=r"dora variant supports Dense.*'stem/kernel' is used by a Conv layer"):
        jlora.init(params, jlora.LoraConfig(rank=2, targets="stem", use_dora=True), key=jax.random.key(0),
                   layout=layout)

    class Other(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.ConvTranspose(4, (3, 3), name="up")(x)
            return nn.ConvLocal(4, (3, 3), name="local")(x)

    z = jnp.ones((1, 5, 5, 2))
    shapes = jax.eval_shape(Other().init, jax.random.key(0), z)["params"]
    other_params = jax.tree.map(lambda s: jnp.ones(s.shape), shapes)
    other_layout = jlora.layout(Other(), z)
    for target, cls in (("up", "ConvTranspose"), ("local", "ConvLocal")):
        with pytest.raises(ValueError, match=rf"'{target}/kernel' is targeted, but it belongs to a {cls} layer"):
            jlora.init(other_params, jlora.LoraConfig(rank=2, targets=target), key=jax.random.key(0),
                       layout=other_layout)
    node = jlora.Adapter(jnp.ones((2 * 9 * 5, 2)), jnp.zeros((2, 4)))     # hand-made: apply names layer and path
    with pytest.raises(ValueError, match=r"'local/kernel' targets a parameter of a ConvLocal layer"):
        jlora.apply(Other(), other_params, {"local": {"kernel": node}}, jlora.LoraConfig(rank=2, targets="local"), z)


def test_bank_and_compose_refuse_what_they_cannot_hold():
    _, _, params, cfg, layout, _, adapters = _setup()
    with pytest.raises(ValueError, match=r"a bank does not hold adapters of convolutions: 'stem/kernel'"):
        bank.create(params, capacity=2, rank=2, targets="stem", layout=layout)
    grouped = {"grouped": adapters["grouped"]}
    with pytest.raises(ValueError, match=r"'grouped/kernel' are on a grouped convolution \(groups=2\)"):
        jlora.compose.combine([(grouped, cfg), (grouped, cfg)], [0.5, 0.5], "cat")


def test_masked_conv_is_refused_only_when_targeted():
    """A layer LoRA cannot follow (a masked conv, a DenseGeneral with batch_dims) is an error when targeted, and
    does not stop the rest of the model from being adapted (as in NNX)."""

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3,), mask=jnp.ones((3, 2, 4)), name="masked")(x)
            x = nn.DenseGeneral(4, axis=-1, batch_dims=(0,), name="odd")(x)
            return nn.Conv(4, (3,), name="plain")(x)

    x = jax.random.normal(jax.random.key(1), (2, 6, 2))
    params = Model().init(jax.random.key(0), x)["params"]
    layout = jlora.layout(Model(), x)
    assert "plain/kernel" in layout and "masked/kernel" not in layout
    for target, reason in (("masked", "the Conv layer at 'masked' has a kernel mask, which LoRA does not support (the "
                                      "update would not be masked); exclude it from the targets"),
                           ("odd", "nn.DenseGeneral at 'odd' has batch_dims=(0,); LoRA supports DenseGeneral without "
                                   "batch_dims only. Exclude it from the targets.")):
        with pytest.raises(ValueError, match=re.escape(f"parameter '{target}/kernel' is targeted, but {reason}") + "$"):
            jlora.init(params, jlora.LoraConfig(rank=2, targets=target), key=jax.random.key(0), layout=layout)
    cfg = jlora.LoraConfig(rank=2, alpha=2, targets="plain")
    adapters = jlora.init(params, cfg, key=jax.random.key(0), layout=layout)
    adapters = jax.tree.map(lambda v: v + 0.1, adapters)
    np.testing.assert_allclose(jlora.apply(Model(), params, adapters, cfg, x),
                               Model().apply({"params": jlora.merge(params, adapters, cfg)}, x), atol=1e-5)
