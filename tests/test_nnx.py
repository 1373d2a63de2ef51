"""Flax NNX models: the functional contract of Linen, checked against plain-jnp references and Linen itself."""

import dataclasses
import math
import re
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from helpers import assert_trees_all_close, randomize

D, H, V = 16, 2, 11


# --- models -------------------------------------------------------------------------------------------------------

class SharedMLP(nnx.Module):
    """An MLP that uses one layer twice (shared weights)."""

    def __init__(self, rngs):
        self.inp = nnx.Linear(6, D, rngs=rngs)
        self.shared = nnx.Linear(D, D, rngs=rngs)
        self.out = nnx.Linear(D, 3, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.tanh(self.inp(x))
        h = jax.nn.tanh(self.shared(h))
        h = jax.nn.tanh(self.shared(h))
        return self.out(h)


def ref_mlp(p, ad, cfg, x):
    def w(name):
        kernel = p[name]["kernel"]
        node = ad.get(name, {}).get("kernel")
        return kernel if node is None else kernel + cfg.scale(f"{name}/kernel") * node.a @ node.b
    with jax.numpy_rank_promotion("allow"):
        h = jax.nn.tanh(x @ w("inp") + p["inp"]["bias"])
        h = jax.nn.tanh(h @ w("shared") + p["shared"]["bias"])
        h = jax.nn.tanh(h @ w("shared") + p["shared"]["bias"])
        return h @ w("out") + p["out"]["bias"]


class Block(nnx.Module):
    """Attention with LinearGeneral/Einsum projections, and an MLP."""

    def __init__(self, d, heads, rngs):
        hd = d // heads
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.q = nnx.LinearGeneral(d, (heads, hd), rngs=rngs)
        self.k = nnx.Einsum("btd,dhk->bthk", (d, heads, hd), rngs=rngs)
        self.v = nnx.LinearGeneral(d, (heads, hd), use_bias=False, rngs=rngs)
        self.o = nnx.LinearGeneral((heads, hd), d, axis=(-2, -1), rngs=rngs)
        self.up = nnx.Linear(d, 2 * d, rngs=rngs)
        self.down = nnx.Linear(2 * d, d, rngs=rngs)

    def __call__(self, x):
        h = self.norm(x)
        x = x + self.o(_attention(self.q(h), self.k(h), self.v(h)))
        return x + self.down(jax.nn.gelu(self.up(x), approximate=False))


def _attention(q, k, v):
    t = q.shape[1]
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e9)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)


class Stack(nnx.Module):
    """A tied-embedding LM over a stack of blocks made by nnx.vmap and run by nnx.scan (with nnx.remat)."""

    def __init__(self, rngs, d=D, heads=H, layers=3, vocab=V, remat=True):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.remat = remat

        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r):
            return Block(d, heads, r)

        self.blocks = make(rngs)

    def __call__(self, ids):
        def body(x, block):
            return block(x)

        body = nnx.scan(nnx.remat(body) if self.remat else body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)

        return self.embed.attend(body(self.embed(ids), self.blocks))


class LinenBlock(nn.Module):
    d: int = D
    heads: int = H

    @nn.compact
    def __call__(self, x, _):
        hd = self.d // self.heads
        h = nn.LayerNorm(epsilon=1e-6, name="norm")(x)
        q = nn.DenseGeneral((self.heads, hd), name="q")(h)
        k = nn.Einsum((self.d, self.heads, hd), "btd,dhk->bthk", use_bias=False, name="k")(h)
        v = nn.DenseGeneral((self.heads, hd), use_bias=False, name="v")(h)
        x = x + nn.DenseGeneral(self.d, axis=(-2, -1), name="o")(_attention(q, k, v))
        return x + nn.Dense(self.d, name="down")(nn.gelu(nn.Dense(2 * self.d, name="up")(x), approximate=False)), None


class LinenStack(nn.Module):
    """The same model in Linen: the same param paths, so the same params and adapters fit both."""

    layers: int = 3

    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(V, D, name="embed")
        blocks = nn.scan(nn.remat(LinenBlock), variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                         length=self.layers)
        x, _ = blocks(name="blocks")(embed(ids), None)
        return embed.attend(x)


def ref_stack(p, ad, cfg, ids, layers=3):
    """The Stack in plain jnp, each kernel replaced by W + s * (A @ B) in its own layout."""
    with jax.numpy_rank_promotion("allow"):
        return _ref_stack(p, ad, cfg, ids, layers)


def _ref_stack(p, ad, cfg, ids, layers):
    def w(path, i=None):
        node = jlora.tree.flatten(ad).get(path)
        kernel = jlora.tree.flatten(p)[path]
        if i is not None:
            kernel = kernel[i]
        if node is None:
            return kernel
        a, b = (node.a, node.b) if i is None else (node.a[i], node.b[i])
        return kernel + cfg.scale(path) * (a @ b).reshape(kernel.shape)

    def norm(x, s, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + 1e-6) * s + b

    e = w("embed/embedding")
    x = e[ids]
    blk = p["blocks"]
    for i in range(layers):
        h = norm(x, blk["norm"]["scale"][i], blk["norm"]["bias"][i])
        q = jnp.einsum("btd,dhk->bthk", h, w("blocks/q/kernel", i)) + blk["q"]["bias"][i]
        k = jnp.einsum("btd,dhk->bthk", h, w("blocks/k/kernel", i))
        v = jnp.einsum("btd,dhk->bthk", h, w("blocks/v/kernel", i))
        x = x + jnp.einsum("bthk,hkd->btd", _attention(q, k, v), w("blocks/o/kernel", i)) + blk["o"]["bias"][i]
        u = jax.nn.gelu(x @ w("blocks/up/kernel", i) + blk["up"]["bias"][i], approximate=False)
        x = x + u @ w("blocks/down/kernel", i) + blk["down"]["bias"][i]
    return x @ e.T


def _random_adapters(model, cfg, seed=1):
    return randomize(jlora.init(model, cfg, key=jax.random.key(seed)), jax.random.key(seed))


STACK_CFG = jlora.LoraConfig(rank=2, alpha=4, targets=r"(q|k|v|o|up|down)/kernel|embed/embedding")
MLP_CFG = jlora.LoraConfig(rank=3, alpha=6, targets=r"kernel")
IDS = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
X = jax.random.normal(jax.random.key(7), (4, 6))


# --- tests --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mlp", pytest.param("stack", marks=pytest.mark.slow)])   # stack: ~13 s
def test_fresh_adapters_are_a_no_op_and_apply_equals_merged_and_reference(name):
    model, cfg, inp, ref = ((SharedMLP(nnx.Rngs(0)), MLP_CFG, X, ref_mlp) if name == "mlp"
                            else (Stack(nnx.Rngs(0)), STACK_CFG, IDS, ref_stack))
    params = jlora.nnx.params(model)
    fresh = jlora.init(model, cfg, key=jax.random.key(1))
    apply = jax.jit(lambda p, a: jlora.apply(model, p, a, cfg, inp))
    plain = nnx.jit(lambda m: m(inp))
    assert bool(jnp.array_equal(apply(params, fresh), plain(model)))
    ad = _random_adapters(model, cfg)
    y = apply(params, ad)
    assert not np.allclose(y, plain(model), atol=1e-3)
    np.testing.assert_allclose(y, plain(jlora.merge(model, ad, cfg)), atol=1e-5)
    np.testing.assert_allclose(y, jax.jit(ref, static_argnums=2)(params, ad, cfg, inp), atol=1e-5)
    grads = jax.jit(jax.grad(lambda a: apply(params, a).sum()))(ad)
    ref_grads = jax.jit(jax.grad(lambda a: ref(params, a, cfg, inp).sum()))(ad)
    assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=1e-6)     # some of these gradients are ~30


def test_linear_general_with_axes_out_of_order_equals_the_plain_reference():
    """Flax pairs a LinearGeneral's input axes with its kernel in sorted order, whatever order `axis` lists."""
    model = nnx.LinearGeneral((3, 4), 5, axis=(-1, -3), rngs=nnx.Rngs(0))    # kernel (3, 4, 5): input axes 1, 3
    x = jax.random.normal(jax.random.key(3), (2, 3, 6, 4))
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets="kernel")
    ad = _random_adapters(model, cfg)
    kernel = model.kernel[...] + cfg.scale("kernel") * (ad["kernel"].a @ ad["kernel"].b).reshape(3, 4, 5)
    want = jnp.einsum("bimj,ijo->bmo", x, kernel) + model.bias[...][None, None]
    np.testing.assert_allclose(jlora.apply(model, jlora.nnx.params(model), ad, cfg, x), want, atol=1e-5)
    np.testing.assert_allclose(jlora.merge(model, ad, cfg)(x), want, atol=1e-5)


def test_merge_of_a_model_with_attached_adapters_adds_them_once():
    model, x = nnx.Linear(6, 5, rngs=nnx.Rngs(0)), jax.random.normal(jax.random.key(4), (2, 6))
    cfg = jlora.LoraConfig(rank=2, alpha=2, targets="kernel")
    ad = _random_adapters(model, cfg)
    base = model(x)
    want = base + cfg.scale("kernel") * (x @ ad["kernel"].a) @ ad["kernel"].b         # plain jnp reference
    jlora.nnx.attach(model, ad, cfg)
    merged = jlora.merge(model, jlora.nnx.adapters(model), cfg)
    assert type(merged) is nnx.Linear and not jlora.nnx.adapters(merged)
    np.testing.assert_allclose(merged(x), want, atol=1e-5)
    np.testing.assert_allclose(model(x), want, atol=1e-5)                              # still attached
    unmerged = jlora.unmerge(model, ad, cfg)             # from the attached model too: a plain copy, W - s A B
    assert type(unmerged) is nnx.Linear
    np.testing.assert_allclose(unmerged(x), 2 * base - want, atol=1e-5)


def test_graphdef_and_state_form_and_nnx_jit():
    model = Stack(nnx.Rngs(0))
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    ad = _random_adapters(model, STACK_CFG)
    y = jax.jit(lambda s, a: jlora.apply(graphdef, s, a, STACK_CFG, IDS, variables=rest))(state, ad)
    np.testing.assert_allclose(y, ref_stack(jlora.nnx.params(state), ad, STACK_CFG, IDS), atol=1e-5)
    y2 = nnx.jit(lambda m, a: jlora.apply(m, jlora.nnx.params(m), a, STACK_CFG, IDS))(model, ad)
    np.testing.assert_allclose(y2, y, atol=1e-6)
    merged_state = jlora.merge(state, ad, STACK_CFG)
    assert isinstance(merged_state, nnx.State)
    np.testing.assert_allclose(nnx.merge(graphdef, merged_state, rest)(IDS), y, atol=1e-5)
    with pytest.raises(ValueError, match="pass the param state itself"):
        jlora.apply(graphdef, jlora.nnx.params(model), ad, STACK_CFG, IDS)


def test_graphdef_without_its_other_state_says_what_to_pass():
    """A graphdef of a model with RNG state, applied without ``variables``: nnx counts leaves only; the error says
    to pass the rest of nnx.split's state."""
    class Drop(nnx.Module):
        def __init__(self, rngs):
            self.fc, self.drop = nnx.Linear(4, 4, rngs=rngs), nnx.Dropout(0.1, rngs=rngs)

        def __call__(self, x):
            return self.drop(self.fc(x), deterministic=True)

    model = Drop(nnx.Rngs(0))
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    cfg = jlora.LoraConfig(rank=2, targets="fc")
    ad = jlora.init(jlora.nnx.params(model), cfg, key=jax.random.key(1))
    x = jnp.ones((1, 4))
    np.testing.assert_allclose(jlora.apply(graphdef, state, ad, cfg, x, variables=rest), model(x), atol=1e-6)
    with pytest.raises(ValueError, match=r"does not fit the params alone \(no `variables`\): .*variables=rest"):
        jlora.apply(graphdef, state, ad, cfg, x)


def test_nnx_and_linen_versions_agree():
    model = Stack(nnx.Rngs(0))
    params = jlora.nnx.params(model)
    linen = LinenStack()
    linen_params = linen.init(jax.random.key(0), IDS)["params"]
    assert jax.tree.map(jnp.shape, linen_params) == jax.tree.map(jnp.shape, params)
    ad = _random_adapters(model, STACK_CFG)
    linen_ad = jlora.init(linen_params, STACK_CFG, key=jax.random.key(1), layout=jlora.layout(linen, IDS))
    assert jax.tree.map(jnp.shape, linen_ad) == jax.tree.map(jnp.shape, ad)
    assert {p: n.layout for p, n in jlora.adapter.adapter_items(linen_ad)} == \
        {p: n.layout for p, n in jlora.adapter.adapter_items(ad)}
    y_nnx = jlora.apply(model, params, ad, STACK_CFG, IDS)
    y_linen = jlora.apply(linen, params, ad, STACK_CFG, IDS)
    # The two module sets order their float32 sums differently: each is ~2.4e-6 from the plain-jnp reference on
    # outputs up to ~8, where one float32 step is 9.5e-7, so 1e-5 (this file's tolerance) and not 1e-6.
    np.testing.assert_allclose(y_nnx, y_linen, atol=1e-5)
    np.testing.assert_allclose(y_nnx, ref_stack(params, ad, STACK_CFG, IDS), atol=1e-5)


def test_train_step_changes_adapters_only_and_merge_round_trips():
    model = Stack(nnx.Rngs(0))
    params = jlora.nnx.params(model)
    before = jax.tree.map(np.asarray, params)
    opt = optax.adam(1e-2)
    state = jlora.TrainState.create(jlora.init(model, STACK_CFG, key=jax.random.key(1)), opt, rng=jax.random.key(2))
    step = jax.jit(jlora.make_train_step(model, STACK_CFG, opt))
    new, metrics = step(state, params, {"input_ids": IDS})
    new, metrics2 = step(new, params, {"input_ids": IDS})
    assert float(metrics2["loss"]) < float(metrics["loss"])
    assert jax.tree.structure(new.adapters) == jax.tree.structure(state.adapters)
    assert not np.allclose(new.adapters["blocks"]["q"]["kernel"].b, 0)
    assert_trees_all_close(jlora.nnx.params(model), before, atol=0)
    merged = jlora.merge(model, new.adapters, STACK_CFG)
    assert_trees_all_close(jlora.nnx.params(model), before, atol=0)   # the given model is untouched
    back = jlora.unmerge(merged, new.adapters, STACK_CFG)
    assert_trees_all_close(jlora.nnx.params(back), before, atol=1e-5)


def test_attach_with_nnx_optimizer_trains_like_the_functional_step():
    cfg, opt = MLP_CFG, optax.adam(1e-2)
    y_true = jnp.ones((4, 3))
    model = SharedMLP(nnx.Rngs(0))
    ad0 = jlora.init(model, cfg, key=jax.random.key(1))

    def loss_fn(apply_fn, batch):
        loss = ((apply_fn(batch["x"]) - batch["y"]) ** 2).mean()
        return loss, {"loss": loss}

    step = jax.jit(jlora.make_train_step(model, cfg, opt, loss_fn=loss_fn))
    state = jlora.TrainState.create(ad0, opt, rng=jax.random.key(0))
    for _ in range(3):
        state, _ = step(state, jlora.nnx.params(model), {"x": X, "y": y_true})

    jlora.nnx.attach(model, ad0, cfg)
    optimizer = nnx.Optimizer(model, opt, wrt=jlora.nnx.AdapterParam)

    @nnx.jit
    def nnx_step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: ((m(X) - y_true) ** 2).mean(),
                                         argnums=nnx.DiffState(0, jlora.nnx.AdapterParam))(model)
        optimizer.update(model, grads)
        return loss

    frozen = jax.tree.map(np.asarray, jlora.nnx.params(model))
    for _ in range(3):
        nnx_step(model, optimizer)
    assert_trees_all_close(jlora.nnx.adapters(model), state.adapters, atol=1e-6)
    assert_trees_all_close(jlora.nnx.params(model), frozen, atol=0)
    trained = jlora.nnx.detach(model)
    assert type(model.shared) is nnx.Linear
    np.testing.assert_allclose(jlora.apply(model, jlora.nnx.params(model), trained, cfg, X),
                               jlora.merge(model, trained, cfg)(X), atol=1e-5)


@pytest.mark.parametrize("which", ["mlp", pytest.param("stack", marks=pytest.mark.slow)])
def test_attached_dropout_draws_a_fresh_mask_per_call(which):
    """nnx.Dropout semantics: under nnx.jit each call of an attached model moves its dropout keys on (a shared layer
    used twice draws twice), the sequence is fixed by the key given to attach, and jlora.apply, which starts from
    its caller's key, gives the first call's output."""
    model, cfg, x = ((SharedMLP(nnx.Rngs(0)), MLP_CFG, X) if which == "mlp" else
                     (Stack(nnx.Rngs(0)), STACK_CFG, IDS))
    cfg = dataclasses.replace(cfg, dropout=0.5)
    ad = _random_adapters(model, cfg)
    params = jlora.nnx.params(model)
    first = jlora.apply(model, params, ad, cfg, x, rngs={"lora_dropout": jax.random.key(3)})
    plain = jlora.apply(model, params, ad, cfg, x)
    run = nnx.jit(lambda m, x: m(x))
    outs = []
    for _ in range(2):
        m = jlora.nnx.attach(nnx.clone(model), ad, cfg, rngs={"lora_dropout": jax.random.key(3)})
        outs.append([np.asarray(run(m, x)) for _ in range(3)])
    np.testing.assert_allclose(outs[0][0], first, atol=1e-5)
    assert not np.allclose(outs[0][0], plain, atol=1e-4)
    assert not np.allclose(outs[0][0], outs[0][1], atol=1e-4)
    assert not np.allclose(outs[0][1], outs[0][2], atol=1e-4)
    np.testing.assert_array_equal(np.stack(outs[0]), np.stack(outs[1]))


class DropNet(nnx.Module):
    """An MLP with its own nnx.Dropout."""

    def __init__(self, rngs):
        self.fc, self.out = nnx.Linear(6, D, rngs=rngs), nnx.Linear(D, 3, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.out(self.drop(jax.nn.tanh(self.fc(x))))


@pytest.mark.parametrize("streams", ["default", "dropout"])
def test_model_dropout_is_reseeded_by_the_key_given_and_gets_a_new_one_every_step(streams):
    """jlora.apply is pure: the model's own nnx.Dropout draws its first mask on every call, as the merged model's
    first call does; threading the state of mutable=True continues as the model's second call.
    rngs={"dropout": key} reseeds the model's stream as nnx.reseed does on the merged model (its `default` stream
    for a model built with nnx.Rngs(0)), and make_train_step feeds it the documented new key every step (it used to
    keep one mask)."""
    model = DropNet(nnx.Rngs(0) if streams == "default" else nnx.Rngs(params=0, dropout=1))
    cfg, opt = jlora.LoraConfig(rank=2, alpha=4, targets=("fc", "out")), optax.sgd(0.0)
    ad, params = _random_adapters(model, cfg), jlora.nnx.params(model)

    @jax.jit
    def oracle(keys):                    # the merged model: two plain calls, then one call per key after a reseed
        merged = jlora.merge(model, ad, cfg)
        out = [merged(X), merged(X)]
        for key in keys:
            nnx.reseed(merged, **{streams: key})
            out.append(merged(X))
        return out

    @jax.jit
    def apply(keys):
        first, state = jlora.apply(model, params, ad, cfg, X, mutable=True)
        out = [first, jlora.apply(model, params, ad, cfg, X), jlora.apply(model, params, ad, cfg, X, variables=state)]
        return out + [jlora.apply(model, params, ad, cfg, X, rngs={"dropout": key}) for key in keys]

    keys = [jax.random.key(1), jax.random.key(1), jax.random.key(2)]
    got, want = apply(keys), oracle(keys)
    for y, w in zip(got, [want[0], want[0], *want[1:]], strict=True):
        np.testing.assert_allclose(y, w, atol=1e-5)
    assert not np.allclose(got[0], got[2]) and not np.allclose(got[3], got[5])

    def loss_fn(apply_fn, x):
        loss = jnp.mean(apply_fn(x) ** 2)
        return loss, {"loss": loss}

    step = jax.jit(jlora.make_train_step(model, cfg, opt, loss_fn=loss_fn))
    state, rngs, losses = jlora.TrainState.create(ad, opt, rng=jax.random.key(3)), [], []
    for _ in range(3):
        rngs.append(jax.random.fold_in(jax.random.split(state.rng)[1], zlib.crc32(b"dropout") & 0x7FFFFFFF))
        state, metrics = step(state, params, X)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, [float(jnp.mean(y ** 2)) for y in oracle(rngs)[2:]], rtol=1e-5)
    assert len(set(losses)) == 3


class SlicedStack(Stack):
    """Stack, with a scan that slices only the state its nnx.StateAxes name (the rest is broadcast)."""

    def __init__(self, rngs, sliced):
        super().__init__(rngs, remat=False)
        self.sliced = sliced

    def __call__(self, ids):
        axes = nnx.StateAxes({self.sliced: 0, ...: None})
        body = nnx.scan(lambda x, block: block(x), in_axes=(nnx.Carry, axes), out_axes=nnx.Carry)
        return self.embed.attend(body(self.embed(ids), self.blocks))


def test_a_scan_whose_state_axes_name_adapter_state_runs_as_a_scan_over_all_state():
    """With jlora.nnx.AdapterState beside nnx.Param in the StateAxes, each layer gets its adapter and its dropout
    key, and the output equals the scan over all state (dropout included, same key); naming only the params (or
    the adapters' AdapterParam, without the dropout keys) is an error that names the fix."""
    cfg = dataclasses.replace(STACK_CFG, dropout=0.5)
    full = Stack(nnx.Rngs(0), remat=False)
    ad = _random_adapters(full, cfg)
    rngs = {"lora_dropout": jax.random.key(3)}
    want = jlora.apply(full, jlora.nnx.params(full), ad, cfg, IDS, rngs=rngs)
    model = SlicedStack(nnx.Rngs(0), (nnx.Param, jlora.nnx.AdapterState))
    np.testing.assert_allclose(jlora.apply(model, jlora.nnx.params(model), ad, cfg, IDS, rngs=rngs), want, atol=1e-5)
    attached = jlora.nnx.attach(nnx.clone(model), ad, cfg, rngs=rngs)
    np.testing.assert_allclose(attached(IDS), want, atol=1e-5)
    for sliced in (nnx.Param, (nnx.Param, jlora.nnx.AdapterParam)):
        model = SlicedStack(nnx.Rngs(0), sliced)
        with pytest.raises(ValueError, match=r"put jlora.nnx.AdapterState beside nnx.Param in the StateAxes"):
            jlora.apply(model, jlora.nnx.params(model), ad, cfg, IDS, rngs=rngs)


def test_flax_lora_layers_both_ways():
    cfg = jlora.LoraConfig(rank=2, alpha=8, targets=r"(l1|l2)/kernel")

    class Plain(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.l2 = nnx.Linear(5, 4, rngs=rngs), nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    class WithFlaxLora(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.LoRALinear(5, 4, lora_rank=2, rngs=rngs)
            self.l2 = nnx.LoRA(4, 2, 3, base_module=nnx.Linear(4, 3, rngs=rngs), rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.l1(x)))

    plain, flax_model = Plain(nnx.Rngs(0)), WithFlaxLora(nnx.Rngs(1))
    base = jlora.nnx.params(plain)
    flax_model.l1.kernel.set_value(base["l1"]["kernel"])
    flax_model.l1.bias.set_value(base["l1"]["bias"])
    flax_model.l2.base_module.kernel.set_value(base["l2"]["kernel"])
    flax_model.l2.base_module.bias.set_value(base["l2"]["bias"])
    x = jax.random.normal(jax.random.key(3), (2, 5))
    ad = _random_adapters(plain, cfg)
    jlora.nnx.to_flax_lora(flax_model, ad, cfg)
    np.testing.assert_allclose(flax_model(x), jlora.apply(plain, base, ad, cfg, x), atol=1e-5)
    assert_trees_all_close(jlora.nnx.from_flax_lora(flax_model, cfg), ad, atol=1e-6)
    with pytest.raises(ValueError, match="rank 2 but the config gives rank 4"):
        jlora.nnx.from_flax_lora(flax_model, jlora.LoraConfig(rank=4, targets="kernel"))
    # a refused call writes nothing: the whole trained biases are refused before any lora_a/lora_b is set
    with_bias = dataclasses.replace(cfg, bias="all")
    before = [np.asarray(v) for v in jax.tree.leaves(nnx.state(flax_model))]
    with pytest.raises(ValueError, match=r"whole trained tensors at \['l1/bias', 'l2/bias'\]"):
        jlora.nnx.to_flax_lora(flax_model, _random_adapters(plain, with_bias, seed=5), with_bias)
    for old, new in zip(before, jax.tree.leaves(nnx.state(flax_model)), strict=True):
        np.testing.assert_array_equal(new, old)
    # nnx.LoRA around a layer other than nnx.Linear: refused, naming it (it used to come back as a Dense adapter)
    flax_model.l2 = nnx.LoRA(4, 2, 3, base_module=nnx.Conv(4, 3, (3,), rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"Flax LoRA layer at 'l2' is an nnx.LoRA\(base_module=nnx.Conv\); jlora "
                                         r"converts Flax LoRA layers of nnx.Linear only.*plain nnx.Conv.*jlora.init"):
        jlora.nnx.from_flax_lora(flax_model, cfg)
    with pytest.raises(ValueError, match=r"'l2' is an nnx.LoRA\(base_module=nnx.Conv\)"):
        jlora.nnx.to_flax_lora(flax_model, ad, cfg)


def test_unsupported_layers_are_named_with_their_path():
    class WithConvT(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.ConvTranspose(3, 4, (2,), rngs=rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.head(self.up(x))

    model = WithConvT(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"'up/kernel' is targeted, but it belongs to a nnx.ConvTranspose layer"):
        jlora.init(model, jlora.LoraConfig(rank=2, targets="kernel"), key=jax.random.key(0))
    hand_made = {"up": {"kernel": jlora.Adapter(jnp.zeros((6, 2)), jnp.zeros((2, 4)))}}
    with pytest.raises(ValueError, match=r"an nnx.ConvTranspose layer at 'up'.*nnx.Linear"):
        jlora.apply(model, jlora.nnx.params(model), hand_made, jlora.LoraConfig(rank=2, targets="kernel"),
                    jnp.ones((1, 5, 3)))
    # quantized kernels are Linen-only: said before the model runs (it used to fail inside nnx.Linear)
    lin = nnx.Linear(64, 64, rngs=nnx.Rngs(0))
    cfg = jlora.LoraConfig(rank=2, targets="kernel")
    with pytest.raises(ValueError, match=r"quantized kernels at \['kernel'\].*Flax Linen models only"):
        jlora.apply(lin, jlora.quantize(jlora.nnx.params(lin)), jlora.init(lin, cfg, key=jax.random.key(0)), cfg,
                    jnp.ones((1, 64)))


def test_nnx_adapters_checkpoint_round_trip(tmp_path):
    model = Stack(nnx.Rngs(0))
    ad = _random_adapters(model, STACK_CFG)
    opt = optax.adam(1e-3)
    state = jlora.TrainState.create(ad, opt, rng=jax.random.key(0))
    with jlora.checkpoint.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(0, state, params=model, lora_config=STACK_CFG)
        manager.wait()
        restored = manager.restore(state, params=jlora.nnx.params(model), lora_config=STACK_CFG).state
        only = manager.restore_adapters(params=model, lora_config=STACK_CFG)
    assert_trees_all_close(restored.adapters, ad, atol=0)
    assert_trees_all_close(only, ad, atol=0)
    np.testing.assert_allclose(jlora.apply(model, jlora.nnx.params(model), restored.adapters, STACK_CFG, IDS),
                               jlora.apply(model, jlora.nnx.params(model), ad, STACK_CFG, IDS), atol=0)


def test_lora_grad_step_flops_are_at_most_0_72_of_the_full_step():
    """Compiled FLOPs (deterministic): the unmerged low-rank path never forms a full-size update or its grad.

    Without remat (which recomputes the forward pass in both steps alike, so the ratio tends to 3/4 with it).
    """
    model = Stack(nnx.Rngs(0), d=256, heads=4, layers=2, vocab=64, remat=False)
    params = jlora.nnx.params(model)
    ids = jnp.zeros((2, 32), jnp.int32)
    cfg = jlora.LoraConfig(rank=16, alpha=32, targets=r"(q|v)/kernel")
    ad = jlora.init(model, cfg, key=jax.random.key(0))
    graphdef, rest = nnx.split(model, nnx.Param, ...)[0::2]

    def full_loss(p):
        state = nnx.split(model, nnx.Param, ...)[1]
        nnx.replace_by_pure_dict(state, p)
        return nnx.merge(graphdef, state, rest, copy=True)(ids).sum()

    def flops(f, *a):
        return jax.jit(f).lower(*a).compile().cost_analysis()["flops"]

    lora_flops = flops(jax.grad(lambda a: jlora.apply(model, params, a, cfg, ids).sum()), ad)
    full_flops = flops(jax.grad(full_loss), params)
    assert lora_flops <= 0.72 * full_flops, (lora_flops, full_flops)


def test_dropout_and_a_bank_of_adapters():
    model = SharedMLP(nnx.Rngs(0))
    params = jlora.nnx.params(model)
    cfg = jlora.LoraConfig(rank=3, alpha=6, targets="kernel", dropout=0.5)
    ad = _random_adapters(model, cfg)
    plain = jlora.apply(model, params, ad, cfg, X)
    drop = jax.jit(lambda k: jlora.apply(model, params, ad, cfg, X, rngs={"lora_dropout": k}))
    assert not np.allclose(drop(jax.random.key(0)), plain, atol=1e-4)
    np.testing.assert_array_equal(drop(jax.random.key(0)), drop(jax.random.key(0)))
    assert not np.allclose(drop(jax.random.key(0)), drop(jax.random.key(1)), atol=1e-4)

    from jlora import bank as B
    cfg = MLP_CFG
    ads = [_random_adapters(model, cfg, seed) for seed in (1, 2)]
    bank = B.create(model, capacity=2, rank=3, targets="kernel")
    for slot, a in enumerate(ads):
        bank = B.put(bank, slot, a, cfg)
    ids = jnp.array([1, 0, B.BASE, 1])
    y = jax.jit(lambda b, i: B.apply(model, params, b, i, X))(bank, ids)
    want = [jlora.apply(model, params, ads[1], cfg, X), jlora.apply(model, params, ads[0], cfg, X), model(X),
            jlora.apply(model, params, ads[1], cfg, X)]
    np.testing.assert_allclose(y, jnp.stack([w[i] for i, w in enumerate(want)]), atol=1e-5)


class CNN(nnx.Module):
    """Grouped strided conv -> BatchNorm -> depthwise dilated conv -> 1-D conv over rows -> linear head."""

    def __init__(self, rngs, train=False):
        self.c1 = nnx.Conv(4, 8, (3, 3), strides=2, padding=1, feature_group_count=2, rngs=rngs)
        self.bn = nnx.BatchNorm(8, use_running_average=not train, rngs=rngs)
        self.c2 = nnx.Conv(8, 8, (3, 3), kernel_dilation=2, padding="SAME", feature_group_count=8, rngs=rngs)
        self.c3 = nnx.Conv(8, 6, (2,), padding="VALID", rngs=rngs)
        self.head = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.bn(self.c1(x)))
        h = jax.nn.relu(self.c2(h))                      # (B, 4, 4, 8)
        h = jax.nn.relu(self.c3(h.reshape(h.shape[0], -1, 8)))
        return self.head(h.mean(axis=1))


def conv_delta(node, kernel, groups):
    """The full-size conv update A @ B in plain jnp: out channel o sees only its group's r / groups A channels."""
    *k, cin, out = kernel.shape
    a = node.a.reshape(*k, cin, groups, -1)                          # (*k, in/g, g, r/g)
    own = a[..., jnp.arange(out) // (out // groups), :]             # (*k, in/g, out, r/g)
    return jnp.einsum("...ioc,co->...io", own, node.b)


def ref_cnn(p, ad, cfg, x, stats):
    def w(name, groups=1):
        node = ad[name]["kernel"]
        return p[name]["kernel"] + cfg.scale(f"{name}/kernel") * conv_delta(node, p[name]["kernel"], groups)

    def conv(h, kernel, stride, pad, groups, dil=1):
        n = kernel.ndim - 2
        dims = ("NHWC", "HWIO", "NHWC") if n == 2 else ("NWC", "WIO", "NWC")
        return jax.lax.conv_general_dilated(h, kernel, (stride,) * n, pad, rhs_dilation=(dil,) * n,
                                            dimension_numbers=dims, feature_group_count=groups)

    with jax.numpy_rank_promotion("allow"):
        h = conv(x, w("c1", 2), 2, ((1, 1), (1, 1)), 2) + p["c1"]["bias"]
        h = (h - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
        h = jax.nn.relu(h)
        h = jax.nn.relu(conv(h, w("c2", 8), 1, "SAME", 8, dil=2) + p["c2"]["bias"])
        h = jax.nn.relu(conv(h.reshape(h.shape[0], -1, 8), w("c3"), 1, "VALID", 1) + p["c3"]["bias"])
        return h.mean(axis=1) @ p["head"]["kernel"] + p["head"]["bias"]


CNN_CFG = jlora.LoraConfig(rank=4, alpha=8, targets=r"c\d/kernel", rank_pattern={"c2": 8})
IMAGES = jax.random.normal(jax.random.key(5), (2, 8, 8, 4))


@pytest.mark.slow   # ~19 s; conv LoRA against its reference is in test_conv (make test)
def test_cnn_conv_adapters():
    model = CNN(nnx.Rngs(0))
    params = jlora.nnx.params(model)
    stats = {"mean": model.bn.mean.get_value(), "var": model.bn.var.get_value()}
    apply = jax.jit(lambda p, a: jlora.apply(model, p, a, CNN_CFG, IMAGES))
    fresh = jlora.init(model, CNN_CFG, key=jax.random.key(1))
    assert bool(jnp.array_equal(apply(params, fresh), model(IMAGES)))
    ad = _random_adapters(model, CNN_CFG)
    y = apply(params, ad)
    assert not np.allclose(y, model(IMAGES), atol=1e-3)
    np.testing.assert_allclose(y, jlora.merge(model, ad, CNN_CFG)(IMAGES), atol=1e-5)
    np.testing.assert_allclose(y, ref_cnn(params, ad, CNN_CFG, IMAGES, stats), atol=1e-5)
    grads = jax.jit(jax.grad(lambda a: apply(params, a).sum()))(ad)
    assert_trees_all_close(grads, jax.grad(lambda a: ref_cnn(params, a, CNN_CFG, IMAGES, stats).sum())(ad),
                           atol=1e-5)
    back = jlora.unmerge(jlora.merge(model, ad, CNN_CFG), ad, CNN_CFG)
    assert_trees_all_close(jlora.nnx.params(back), params, atol=1e-5)

    # BatchNorm in training mode: mutable=True hands back the updated statistics; the given model is untouched.
    train_model = CNN(nnx.Rngs(0), train=True)
    out, state = jlora.apply(train_model, params, ad, CNN_CFG, IMAGES, mutable=True)
    merged = jlora.merge(train_model, ad, CNN_CFG)
    np.testing.assert_allclose(out, merged(IMAGES), atol=1e-5)
    np.testing.assert_allclose(state["bn"]["mean"].get_value(), merged.bn.mean.get_value(), atol=1e-6)
    assert float(jnp.abs(train_model.bn.mean.get_value()).max()) == 0.0


def test_a_layer_set_up_in_a_way_lora_does_not_support_is_an_error_only_when_targeted():
    class Batched(nnx.Module):
        def __init__(self, rngs):
            self.odd = nnx.LinearGeneral(4, 3, batch_axis={0: 2}, rngs=rngs)
            self.head = nnx.Linear(4, 2, rngs=rngs)

    model = Batched(nnx.Rngs(0))
    assert set(jlora.layout(model)) == {"head/kernel"}
    jlora.init(model, jlora.LoraConfig(rank=2, targets="head"), key=jax.random.key(0))
    with pytest.raises(ValueError, match=re.escape("parameter 'odd/kernel' is targeted, but nnx.LinearGeneral at 'odd' "
                                                   "has batch_axis={0: 2}; LoRA supports LinearGeneral without batch "
                                                   "axes only. Exclude it from the targets.") + "$"):
        jlora.init(model, jlora.LoraConfig(rank=2, targets="odd"), key=jax.random.key(0))


def test_a_subclass_override_gets_the_update_where_it_calls_the_layer():
    """Merging puts the update in the kernel, so an override that transforms the layer's own output (``2 *
    super().__call__(x + 1)``) transforms the update with it; an override that never calls the layer's own method
    gets the update added to what it returns. Oracle: the merged model, through jlora.apply (jitted) and attach."""
    class Doubled(nnx.Linear):
        def __call__(self, x):
            return 2.0 * super().__call__(x + 1.0)

    class Own(nnx.Linear):
        def __call__(self, x):
            return x @ self.kernel[...] + self.bias[...][None]

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.a, self.b, self.c = Doubled(6, 5, rngs=rngs), Own(5, 4, rngs=rngs), nnx.Linear(4, 3, rngs=rngs)

        def __call__(self, x):
            return self.c(jnp.tanh(self.b(jnp.tanh(self.a(x)))))

    model, cfg = Model(nnx.Rngs(0)), jlora.LoraConfig(rank=2, alpha=4, targets="kernel")
    ad = _random_adapters(model, cfg)
    x = jax.random.normal(jax.random.key(3), (2, 6))
    want = jlora.merge(model, ad, cfg)(x)
    assert not np.allclose(want, model(x), atol=1e-3)
    got = jax.jit(lambda p, a: jlora.apply(model, p, a, cfg, x))(jlora.nnx.params(model), ad)
    np.testing.assert_allclose(got, want, atol=1e-5)
    jlora.nnx.attach(model, ad, cfg)
    np.testing.assert_allclose(model(x), want, atol=1e-5)
    jlora.nnx.detach(model)
    assert type(model.a) is Doubled and type(model.b) is Own
