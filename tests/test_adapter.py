"""The typed adapter node and the core defects found when jlora was used from research code (issue 12, item 6).

Each test here failed before its fix; the oracle is a plain jnp computation or the merged model.
"""

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
    with pytest.raises(ValueError, match="fully trained tensor at 'proj/kernel/a'"):
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
    from jlora.transform import _low_rank_matmul

    x, w = jnp.ones((4, 64, 96)), jnp.ones((96, 128))
    a, b = jnp.ones((96, 4)), jnp.ones((4, 128))

    def hlo(f):
        g = jax.jit(jax.grad(lambda x, a, b: jnp.sum(jnp.tanh(x @ w + f(x, a, b))), argnums=(0, 1, 2)))
        return g.lower(x, a, b).compile().as_text()

    ours, plain = hlo(_low_rank_matmul), hlo(lambda x, a, b: (x @ a) @ b)
    big = ("f32[128,256]", "f32[96,256]", "f32[128,4,64]", "f32[96,4,64]")
    count = lambda text: sum(line.count(s) for line in text.splitlines()                      # noqa: E731
                             if " transpose(" in line or " copy(" in line for s in big)
    assert count(ours) == 0 < count(plain)


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


def test_whole_variables_dict_is_refused_at_init():
    model = nn.Dense(3)
    variables = model.init(KEY, jnp.ones((1, 4)))
    with pytest.raises(ValueError, match=r"whole variables dict.*variables\['params'\]"):
        jlora.init(variables, jlora.LoraConfig(rank=1, targets="kernel"), key=KEY)
    assert np.shape(jlora.init(variables["params"], jlora.LoraConfig(rank=1, targets="kernel"),
                               key=KEY)["kernel"].a) == (4, 1)
