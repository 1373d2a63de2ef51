"""The typed adapter node and the core defects found when jlora was used from research code (issue 12, item 6).

Each test here failed before its fix; the oracle is a plain jnp computation or the merged model.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import jlora
from helpers import assert_trees_all_close, max_diff, randomize
from tiny import TinyLM

KEY = jax.random.key(0)


# ---------------------------------------------------------------- the node
def test_adapter_is_a_pytree_node_with_attribute_paths():
    params = {"q": {"kernel": jnp.ones((6, 4))}, "n": {"scale": jnp.ones(4)}}
    ad = jlora.init(params, jlora.LoraConfig(rank=2, targets="q"), key=KEY)
    node = ad["q"]["kernel"]
    assert isinstance(node, jlora.Adapter) and node.rank == 2
    assert list(jlora.tree.leaves_by_path(ad)) == ["q/kernel/a", "q/kernel/b"]
    doubled = jax.tree.map(lambda x: 2 * x, ad)["q"]["kernel"]
    assert isinstance(doubled, jlora.Adapter) and doubled.layout == node.layout
    # optax state mirrors the node, and the node survives jit
    state = optax.adam(1e-3).init(ad)
    assert isinstance(state[0].mu["q"]["kernel"], jlora.Adapter)
    assert isinstance(jax.jit(lambda t: t)(ad)["q"]["kernel"], jlora.Adapter)


def test_a_dict_with_a_and_b_keys_is_not_an_adapter():
    """Adapters are found by type: a user's submodule named "a"/"b" is never mistaken for a factor pair."""
    params = {"proj": {"kernel": jnp.ones((4, 3))}}
    as_dict = {"proj": {"kernel": {"a": jnp.ones((4, 1)), "b": jnp.ones((1, 3))}}}
    assert list(jlora.adapter.adapter_items(as_dict)) == []
    with pytest.raises(TypeError, match=r"'proj/kernel' is a plain dict with keys \['a', 'b'\], not a jlora.Adapter"):
        jlora.merge(params, as_dict, jlora.LoraConfig(rank=1, targets="proj"))


# ---------------------------------------------------------------- 2-D Einsum kernels stored (out, in)
class EinsumOutIn(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Einsum((6, 6), "bi,oi->bo", use_bias=False, name="proj")(x)   # kernel (out, in)


def test_einsum_out_in_kernel_without_layout_is_refused_not_transposed():
    x = jax.random.normal(jax.random.key(1), (3, 6))
    model = EinsumOutIn()
    params = model.init(KEY, x)["params"]
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets="proj")
    guessed = randomize(jlora.init(params, cfg, key=KEY), jax.random.key(2))
    with pytest.raises(ValueError, match=r"'proj/kernel' was made without a layout.*\(in, out\).*reads its kernel "
                                         r"\(6, 6\) as \(out, in\).*jlora.layout"):
        jlora.apply(model, params, guessed, cfg, x)


def test_einsum_out_in_kernel_merges_as_it_applies_without_passing_layout():
    x = jax.random.normal(jax.random.key(1), (3, 6))
    model = EinsumOutIn()
    params = model.init(KEY, x)["params"]
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets="proj")
    ad = randomize(jlora.init(params, cfg, key=KEY, layout=jlora.layout(model, x)), jax.random.key(2))
    got = jlora.apply(model, params, ad, cfg, x)
    node = ad["proj"]["kernel"]
    want = x @ params["proj"]["kernel"].T + 2.0 * (x @ node.a) @ node.b     # plain jnp: (out, in) kernel
    assert max_diff(got, want) <= 1e-5
    merged = jlora.merge(params, ad, cfg)                                   # no layout argument
    assert max_diff(model.apply({"params": merged}, x), want) <= 1e-5
    assert_trees_all_close(jlora.unmerge(merged, ad, cfg), params, atol=1e-5)


def test_a_hand_made_adapter_merges_by_the_layout_passed():
    """``Adapter(a, b)`` carries no layout: apply follows the layer, and merge must follow ``layout=``."""
    x = jax.random.normal(jax.random.key(1), (3, 6))
    model = EinsumOutIn()
    params = model.init(KEY, x)["params"]
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets="proj")
    a, b = jax.random.normal(jax.random.key(2), (6, 2)), jax.random.normal(jax.random.key(3), (2, 6))
    ad = {"proj": {"kernel": jlora.Adapter(a, b)}}
    want = x @ params["proj"]["kernel"].T + 2.0 * (x @ a) @ b               # plain jnp: (out, in) kernel
    assert max_diff(jlora.apply(model, params, ad, cfg, x), want) <= 1e-5
    merged = jlora.merge(params, ad, cfg, layout=jlora.layout(model, x))
    assert max_diff(model.apply({"params": merged}, x), want) <= 1e-5
    dense = nn.DenseGeneral((2, 3))                                         # a 3-D kernel: no default to guess
    dparams = dense.init(KEY, x)["params"]
    dad = {"kernel": jlora.Adapter(a, jax.random.normal(jax.random.key(4), (2, 6)))}
    dcfg = dataclasses.replace(cfg, targets="kernel")                       # the adapter's path is "kernel" here
    merged = jlora.merge(dparams, dad, dcfg, layout=jlora.layout(dense, x))
    assert max_diff(dense.apply({"params": merged}, x), jlora.apply(dense, dparams, dad, dcfg, x)) <= 1e-5


@pytest.mark.slow
def test_merge_needs_no_layout_for_scanned_and_multi_axis_kernels():
    ids = jnp.arange(16).reshape(2, 8) % 64
    model = TinyLM(scan=True)
    params = model.init(KEY, ids)["params"]
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "o_proj", "down_proj"))
    ad = randomize(jlora.init(params, cfg, key=KEY, layout=jlora.layout(model, ids)), jax.random.key(3))
    merged = jlora.merge(params, ad, cfg)
    assert max_diff(model.apply({"params": merged}, ids), jlora.apply(model, params, ad, cfg, ids)) <= 1e-5
    assert_trees_all_close(jlora.unmerge(merged, ad, cfg), params, atol=1e-5)


# ---------------------------------------------------------------- subclasses of the supported layers
class PassDense(nn.Dense):
    @nn.compact
    def __call__(self, x):
        return super().__call__(x)


class ScaledDense(nn.Dense):              # post-processes: the update must be scaled as the kernel is
    @nn.compact
    def __call__(self, x):
        return 2.0 * super().__call__(x)


class ScaledAgain(ScaledDense):          # an override of an override
    @nn.compact
    def __call__(self, x):
        return super().__call__(x) - 1.0


class OwnDense(nn.Dense):                 # never reaches nn.Dense.__call__: reads the kernel itself
    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        return x @ kernel


class PassEmbed(nn.Embed):
    def attend(self, query):
        return super().attend(query)


@pytest.mark.parametrize("layer", [PassDense, ScaledDense, ScaledAgain, OwnDense])
def test_a_subclass_of_a_layer_gets_its_update_once_as_merged(layer):
    """Flax intercepts both a subclass's __call__ and the nn.Dense.__call__ it reaches through super(): the update
    goes in once, inside the subclass's own arithmetic, as merging it into the kernel puts it."""
    x = jax.random.normal(jax.random.key(1), (3, 6))
    model = layer(4, use_bias=layer is not OwnDense)
    params = model.init(KEY, x)["params"]
    cfg = jlora.LoraConfig(rank=2, alpha=2.0, targets="kernel")
    ad = randomize(jlora.init(params, cfg, key=KEY), jax.random.key(2))
    merged = model.apply({"params": jlora.merge(params, ad, cfg)}, x)
    assert max_diff(jlora.apply(model, params, ad, cfg, x), merged) <= 1e-5
    emb = PassEmbed(10, 6)
    eparams = emb.init(KEY, jnp.array([1, 2]))["params"]
    ecfg = jlora.LoraConfig(rank=2, alpha=2.0, targets="embedding")
    ead = randomize(jlora.init(eparams, ecfg, key=KEY), jax.random.key(3))
    merged = emb.apply({"params": jlora.merge(eparams, ead, ecfg)}, x, method="attend")
    assert max_diff(jlora.apply(emb, eparams, ead, ecfg, x, method="attend"), merged) <= 1e-5


# ---------------------------------------------------------------- rank must match the config
def test_rank_differing_from_config_is_an_error_not_a_rescale():
    x = jnp.ones((2, 8))
    model = nn.Dense(4)
    params = model.init(KEY, x)["params"]
    ad = jlora.init(params, jlora.LoraConfig(rank=2, targets="kernel"), key=KEY)
    other = jlora.LoraConfig(rank=4, targets="kernel")
    for call in (lambda: jlora.apply(model, params, ad, other, x), lambda: jlora.merge(params, ad, other)):
        with pytest.raises(ValueError, match=r"'kernel' has rank 2 but the config gives rank 4"):
            call()
    patterned = jlora.LoraConfig(rank=2, targets="kernel", rank_pattern={"kernel": 1})
    with pytest.raises(ValueError, match=r"rank 2 but the config gives rank 1.*rank_pattern"):
        jlora.apply(model, params, ad, patterned, x)


# ---------------------------------------------------------------- which unused adapters are errors
class EncDec(nn.Module):
    def setup(self):
        self.enc = nn.Dense(5)
        self.dec = nn.Dense(3)

    def encode(self, x):
        return self.enc(x)

    def __call__(self, x):
        return self.dec(self.encode(x))


def test_method_that_runs_part_of_the_model_is_allowed():
    x = jax.random.normal(jax.random.key(1), (2, 4))
    model = EncDec()
    params = model.init(KEY, x)["params"]
    cfg = jlora.LoraConfig(rank=2, targets=("enc", "dec"))
    ad = randomize(jlora.init(params, cfg, key=KEY), jax.random.key(2))
    got = jlora.apply(model, params, ad, cfg, x, method=EncDec.encode)
    want = model.apply({"params": jlora.merge(params, ad, cfg)}, x, method=EncDec.encode)
    assert max_diff(got, want) <= 1e-5


class Heads(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        h = nn.Dense(4, name="body")(x)
        return nn.Dense(2, name="aux_head")(h) if train else h


def test_eval_mode_that_skips_a_training_head_is_allowed():
    x = jnp.ones((2, 3))
    model = Heads()
    params = model.init(KEY, x)["params"]
    cfg = jlora.LoraConfig(rank=1, targets=("body", "aux_head"))
    ad = randomize(jlora.init(params, cfg, key=KEY), jax.random.key(1))
    got = jlora.apply(model, params, ad, cfg, x, train=False)
    assert max_diff(got, model.apply({"params": jlora.merge(params, ad, cfg)}, x, train=False)) <= 1e-5


def test_scan_without_lora_in_variable_axes_is_named():
    class Blk(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.Dense(4, name="d")(x), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            s = nn.scan(Blk, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
            return s(name="layers")(x, None)[0]

    x = jnp.ones((1, 4))
    model = Stack()
    params = model.init(KEY, x)["params"]
    cfg = jlora.LoraConfig(rank=1, targets="d")
    ad = jlora.init(params, cfg, key=KEY, layout=jlora.layout(model, x))
    with pytest.raises(ValueError, match=r"layer 'layers/d' ran without seeing its adapter.*variable_axes lack "
                                         r"'lora'"):
        jlora.apply(model, params, ad, cfg, x)


# ---------------------------------------------------------------- other variable collections
class WithBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        h = nn.Dense(6, name="proj")(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(h)


def test_apply_takes_and_returns_batch_stats():
    x = jax.random.normal(jax.random.key(1), (8, 5))
    model = WithBatchNorm()
    variables = model.init(KEY, x, train=False)
    params, stats = variables["params"], {"batch_stats": variables["batch_stats"]}
    stats = jax.tree.map(lambda v: v + 0.25, stats)                       # not the init values
    cfg = jlora.LoraConfig(rank=2, targets="proj")
    ad = randomize(jlora.init(params, cfg, key=KEY), jax.random.key(2))
    merged = {"params": jlora.merge(params, ad, cfg), **stats}
    # eval mode reads the given running statistics
    got = jlora.apply(model, params, ad, cfg, x, train=False, variables=stats)
    assert max_diff(got, model.apply(merged, x, train=False)) <= 1e-5
    # train mode returns the mutated ones, as model.apply does
    out, new = jlora.apply(model, params, ad, cfg, x, train=True, variables=stats, mutable=["batch_stats"])
    want_out, want_new = model.apply(merged, x, train=True, mutable=["batch_stats"])
    assert max_diff(out, want_out) <= 1e-5 and set(new) == {"batch_stats"}
    assert_trees_all_close(new, want_new, atol=1e-5)
    with pytest.raises(ValueError, match="`variables` holds the collections"):
        jlora.apply(model, params, ad, cfg, x, train=False, variables={"params": params, **stats})


def test_apply_with_flax_attention_decode_cache():
    model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, decode=True)
    x = jax.random.normal(jax.random.key(1), (1, 4, 8))
    variables = model.init(KEY, x)
    params, cache = variables["params"], {"cache": variables["cache"]}
    cfg = jlora.LoraConfig(rank=2, targets=("query", "value"))
    ad = randomize(jlora.init(params, cfg, key=KEY, layout=jlora.layout(model, x)), jax.random.key(2))
    merged = jlora.merge(params, ad, cfg)
    ours, theirs = cache, cache
    for t in range(4):
        tok = x[:, t:t + 1]
        y, mut = jlora.apply(model, params, ad, cfg, tok, variables=ours, mutable=["cache"])
        want, wmut = model.apply({"params": merged, **theirs}, tok, mutable=["cache"])
        assert max_diff(y, want) <= 1e-5
        ours, theirs = mut, wmut
    assert int(ours["cache"]["cache_index"]) == 4                          # the cache advanced, not restarted


# ---------------------------------------------------------------- forward-mode autodiff
def _dense_setup():
    x = jax.random.normal(jax.random.key(1), (3, 5, 6))
    model = nn.Dense(4)
    params = model.init(KEY, x)["params"]
    cfg = jlora.LoraConfig(rank=2, alpha=3.0, targets="kernel")
    ad = randomize(jlora.init(params, cfg, key=KEY), jax.random.key(2), 0.3)
    return model, params, ad, cfg, x


@pytest.mark.slow
def test_forward_mode_through_apply_matches_plain_autodiff():
    model, params, ad, cfg, x = _dense_setup()
    w, bias = params["kernel"], params["bias"]

    def ours(a, b):
        node = ad["kernel"].replace(a=a, b=b)
        return jnp.sum(jnp.tanh(jlora.apply(model, params, {"kernel": node}, cfg, x)))

    def plain(a, b):
        return jnp.sum(jnp.tanh(x @ w + bias[None, None] + 1.5 * (x @ a) @ b))

    a, b = ad["kernel"].a, ad["kernel"].b
    for transform in (jax.jacfwd, jax.jacrev, jax.hessian):
        got, want = transform(ours, argnums=(0, 1))(a, b), transform(plain, argnums=(0, 1))(a, b)
        assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)
    tangent = (jnp.ones_like(a), jnp.ones_like(b))
    (_, t1), (_, t2) = jax.jvp(ours, (a, b), tangent), jax.jvp(plain, (a, b), tangent)
    assert abs(float(t1 - t2)) <= 1e-4
    _, lin = jax.linearize(ours, a, b)
    assert abs(float(lin(*tangent) - t2)) <= 1e-4


def test_low_rank_matmul_gradients_pass_numerical_checks():
    from jlora.transform import _low_rank_matmul

    x = jax.random.normal(jax.random.key(1), (2, 3, 5))
    a = jax.random.normal(jax.random.key(2), (5, 2))
    b = jax.random.normal(jax.random.key(3), (2, 4))
    check_grads(_low_rank_matmul, (x, a, b), order=2, modes=("fwd", "rev"))
    plain = jax.grad(lambda *t: jnp.sum(jnp.sin((t[0] @ t[1]) @ t[2])), argnums=(0, 1, 2))(x, a, b)
    ours = jax.grad(lambda *t: jnp.sum(jnp.sin(_low_rank_matmul(*t))), argnums=(0, 1, 2))(x, a, b)
    assert_trees_all_close(ours, plain, atol=1e-5)


def test_low_rank_reverse_pass_keeps_large_operands_untransposed():
    """The reason for the custom rule: no transposed copy of the (tokens, features) operands in the backward."""
    from jlora.transform import _low_rank_matmul, lora_dense

    x, w = jnp.ones((4, 64, 96)), jnp.ones((96, 128))
    a, b = jnp.ones((96, 4)), jnp.ones((4, 128))

    def hlo(f):
        g = jax.jit(jax.grad(lambda x, a, b: jnp.sum(jnp.tanh(f(x, a, b))), argnums=(0, 1, 2)))
        return g.lower(x, a, b).compile().as_text()

    ours, plain = hlo(lambda x, a, b: x @ w + _low_rank_matmul(x, a, b)), hlo(lambda x, a, b: x @ w + (x @ a) @ b)
    fused = hlo(lambda x, a, b: lora_dense(x, x, w, a, b))
    big = ("f32[128,256]", "f32[96,256]", "f32[128,4,64]", "f32[96,4,64]")
    count = lambda text: sum(line.count(s) for line in text.splitlines()                      # noqa: E731
                             if " transpose(" in line or " copy(" in line for s in big)
    assert count(ours) == count(fused) == 0 < count(plain)


def test_lora_dense_computes_the_factor_gradient_in_the_fast_layout():
    """A's gradient ``x^T g`` (in, r) is computed as ``g^T x`` (r, in) and then transposed: XLA:CPU's dot is about
    3x faster that way round (bench/README.md). The compiled reverse pass has no dot that yields (in, r)."""
    from jlora.transform import lora_dense

    x, w = jnp.ones((4, 64, 96)), jnp.ones((96, 128))
    a, b = jnp.ones((96, 4)), jnp.ones((4, 128))
    g = jax.jit(jax.grad(lambda x, a, b: jnp.sum(jnp.tanh(lora_dense(x, x, w, a, b))), argnums=(0, 1, 2)))
    dots = [line.split(" = ")[1].split(" ")[0] for line in g.lower(x, a, b).compile().as_text().splitlines()
            if " dot(" in line]
    assert "f32[4,96]{1,0}" in dots and "f32[96,4]{1,0}" not in dots, dots


def test_lora_dense_gradients_pass_numerical_checks():
    """The one-matmul Dense + low-rank path: every input differentiable, both modes, against plain jnp."""
    from jlora.transform import lora_dense

    ks = jax.random.split(jax.random.key(7), 5)
    shapes = ((2, 3, 5), (2, 3, 5), (5, 4), (5, 2), (2, 4))      # x, xd (dropout's input), w, a, b
    with jax.enable_x64(True):   # finite differences of second order need float64 (float32's are ~2% off)
        check_grads(lora_dense, [jax.random.normal(k, s, jnp.float64) for k, s in zip(ks, shapes)], order=2,
                    modes=("fwd", "rev"))
    x, xd, w, a, b = [jax.random.normal(k, s) for k, s in zip(ks, shapes)]
    plain = lambda x, xd, w, a, b: x @ w + (xd @ a) @ b                                      # noqa: E731
    loss = lambda f: lambda *t: jnp.sum(jnp.sin(f(*t)))                                     # noqa: E731
    assert max_diff(lora_dense(x, xd, w, a, b), plain(x, xd, w, a, b)) <= 1e-5
    assert_trees_all_close(jax.grad(loss(lora_dense), argnums=range(5))(x, xd, w, a, b),
                           jax.grad(loss(plain), argnums=range(5))(x, xd, w, a, b), atol=1e-5)


def test_gradients_through_vmap_of_an_adapted_dense():
    """Reverse mode through jlora under ``vmap`` over the inputs: a batched loss, per-example gradients and a Linen
    ``nn.vmap`` ensemble's train step. On CPU the one-matmul path's buffer conditional used to turn into a select
    there, whose reverse pass raised "Transpose rule ... for 'stop_gradient' not implemented". The oracle is the
    same loss through the merged kernel."""
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets="kernel")
    x = jax.random.normal(jax.random.key(5), (3, 4, 6))
    dense = nn.Dense(5)
    params = dense.init(KEY, x[0])["params"]
    ad = randomize(jlora.init(params, cfg, key=jax.random.key(1)), jax.random.key(2))
    ours = lambda a, xi: jnp.sum(jnp.sin(jlora.apply(dense, params, a, cfg, xi)))                 # noqa: E731
    merged = lambda a, xi: jnp.sum(jnp.sin(dense.apply({"params": jlora.merge(params, a, cfg)}, xi)))  # noqa: E731
    batched = lambda f: lambda a: jnp.sum(jax.vmap(lambda xi: f(a, xi))(x))                      # noqa: E731
    assert_trees_all_close(jax.grad(batched(ours))(ad), jax.grad(batched(merged))(ad), atol=1e-5)
    per_example = lambda f: jax.jit(jax.vmap(jax.grad(f), (None, 0)))                             # noqa: E731
    assert_trees_all_close(per_example(ours)(ad, x), per_example(merged)(ad, x), atol=1e-5)

    class Ensemble(nn.Module):                          # one Dense per leading slice of x
        @nn.compact
        def __call__(self, x):
            return nn.vmap(nn.Dense, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True})(5)(x)

    model = Ensemble()
    params = model.init(KEY, x)["params"]
    ad = randomize(jlora.init(params, cfg, key=jax.random.key(1), layout=jlora.layout(model, x)), jax.random.key(2))
    loss = lambda f, batch: (jnp.mean(f(batch["x"]) ** 2), {})                                # noqa: E731
    got = jax.grad(lambda a: loss(lambda v: jlora.apply(model, params, a, cfg, v), {"x": x})[0])(ad)
    want = jax.grad(lambda a: loss(lambda v: model.apply({"params": jlora.merge(params, a, cfg)}, v), {"x": x})[0])(ad)
    assert_trees_all_close(got, want, atol=1e-5)
    opt = optax.adam(1e-2)
    state, _ = jax.jit(jlora.make_train_step(model, cfg, opt, loss_fn=loss))(
        jlora.TrainState.create(ad, opt, rng=KEY), params, {"x": x})
    assert int(state.step) == 1


def test_lora_dense_frozen_kernel_costs_no_weight_gradient():
    """With the kernel frozen its tangent is a symbolic zero: the step does the FLOPs of the two-matmul form."""
    from jlora.transform import _low_rank_matmul, lora_dense

    x, w = jnp.ones((4, 64, 96)), jnp.ones((96, 128))
    a, b = jnp.ones((96, 4)), jnp.ones((4, 128))

    def flops(f):
        g = jax.jit(jax.grad(lambda x, a, b: jnp.sum(jnp.tanh(f(x, a, b))), argnums=(0, 1, 2)))
        return g.lower(x, a, b).compile().cost_analysis()["flops"]

    ours = flops(lambda x, a, b: lora_dense(x, x, w, a, b))
    plain = flops(lambda x, a, b: x @ w + _low_rank_matmul(x, a, b))
    weight_gradient = 2 * 4 * 64 * 96 * 128
    assert abs(ours - plain) < weight_gradient / 10, (ours, plain)


def test_adapted_dense_keeps_one_sum_per_gated_mlp_input(monkeypatch):
    """On CPU, ``jlora.apply`` computes an adapted ``nn.Dense`` as one matmul, so a gated MLP's backward keeps
    the sum ``x W + s (x A) B`` instead of both addends: compiled temp memory drops by at least one
    (tokens, intermediate) buffer per layer against the two-matmul form (deterministic: XLA's buffer plan)."""
    from jlora import transform
    from jlora.models.layers import silu_gate

    tokens, width, inter, layers = 4 * 64, 32, 256, 3

    class GatedMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(layers):
                dense = lambda n, name: nn.Dense(n, use_bias=False, name=f"{name}{i}")          # noqa: E731
                x = x + dense(width, "down")(silu_gate(dense(inter, "gate")(x), dense(inter, "up")(x)))
            return x

    x = jax.random.normal(KEY, (4, 64, width))
    model = GatedMLP()
    params = model.init(KEY, x)["params"]
    cfg = jlora.LoraConfig(rank=4, targets=("gate", "up", "down"))
    ad = randomize(jlora.init(params, cfg, key=KEY), jax.random.key(3), 0.3)

    def step():
        f = jax.jit(jax.grad(lambda ad: jnp.mean(jnp.tanh(jlora.apply(model, params, ad, cfg, x)))))
        return f.lower(ad).compile().memory_analysis().temp_size_in_bytes, f(ad)

    fused, grads = step()
    monkeypatch.setattr(transform, "_fused_dense", lambda *a: False)
    plain, want = step()
    assert fused <= plain - layers * tokens * inter * 4, (fused, plain)
    assert_trees_all_close(grads, want, atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------- stacked adapters
def test_stacked_adapters_in_merge_say_so():
    params = {"d": {"kernel": jnp.ones((6, 4))}}
    cfg = jlora.LoraConfig(rank=2, targets="d")
    stacked = jax.vmap(lambda k: jlora.init(params, cfg, key=k))(jax.random.split(KEY, 3))
    with pytest.raises(ValueError, match=r"carries 1 extra leading axis of size \(3,\).*stacked adapters"):
        jlora.merge(params, stacked, cfg)
    one = jax.tree.map(lambda x: x[1], stacked)
    assert jlora.merge(params, one, cfg)["d"]["kernel"].shape == (6, 4)


# ---------------------------------------------------------------- configs and params
def test_pattern_order_is_part_of_config_equality():
    first = jlora.LoraConfig(alpha_pattern={"q": 1.0, "q_proj": 3.0})
    swapped = jlora.LoraConfig(alpha_pattern={"q_proj": 3.0, "q": 1.0})
    path = "layers_0/q_proj/kernel"
    assert first.scale(path) != swapped.scale(path)
    assert first != swapped and hash(first) != hash(swapped)
    assert first == jlora.LoraConfig(alpha_pattern={"q": 1.0, "q_proj": 3.0})
    assert jlora.LoraConfig.from_dict(swapped.to_dict()) == swapped


def test_numpy_scalars_are_accepted_and_stored_as_python_numbers():
    """A rank sweep over np.arange: NumPy integers and floats are numbers; the config keeps Python ones, so it
    serializes (to_dict, YAML, JSON) and compares as if they had been typed in."""
    cfg = jlora.LoraConfig(rank=np.arange(8, 9)[0], alpha=np.float32(16.0), dropout=np.float64(0.25),
                           rank_pattern={"q": np.int64(4)}, alpha_pattern={"v": np.int32(3)})
    assert cfg == jlora.LoraConfig(rank=8, alpha=16.0, dropout=0.25, rank_pattern={"q": 4}, alpha_pattern={"v": 3})
    assert [type(x) for x in (cfg.rank, cfg.alpha, cfg.rank_pattern["q"], cfg.alpha_pattern["v"])] == \
        [int, float, int, int]
    json.dumps(cfg.to_dict())
    for bad, message in ((dict(rank=np.float64(2.0)), "`rank` must be an integer >= 1"),
                         (dict(rank=np.True_), "`rank` must be an integer >= 1"),
                         (dict(alpha=np.float32("nan")), "`alpha` must be a finite number > 0")):
        with pytest.raises(ValueError, match=message):
            jlora.LoraConfig(**bad)


def test_whole_variables_dict_is_refused_at_init():
    model = nn.Dense(3)
    variables = model.init(KEY, jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r"whole variables dict.*variables\['params'\]"):
        jlora.init(variables, jlora.LoraConfig(rank=1, targets="kernel"), key=KEY)
    assert np.shape(jlora.init(variables["params"], jlora.LoraConfig(rank=1, targets="kernel"),
                               key=KEY)["kernel"].a) == (4, 1)
