"""The train step: adapters-only gradients (FLOPs), memorization, frozen params untouched, accumulation,
mixed precision; hypothesis properties of config validation and partition/combine."""

import dataclasses
import json
import math
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jlora
from helpers import assert_trees_all_close, randomize
from tiny import TinyLM

KEY = jax.random.key(0)


def _flops(fn, *args):
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def test_lora_grad_step_skips_full_weight_gradients():
    # hidden 256, r = 8, every linear layer targeted, layers unrolled (cost analysis counts a scan body once)
    model = TinyLM(vocab=512, dim=256, heads=4, layers=2, multi_axis=False)
    ids = jax.random.randint(KEY, (4, 64), 0, 512)
    params = model.init(KEY, ids)["params"]
    cfg = jlora.LoraConfig(rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj",
                                                      "down_proj"))
    adapters = jlora.init(params, cfg, key=KEY)
    batch = {"input_ids": ids}

    def lora_grad(adapters, params, batch):
        return jax.grad(lambda a: jlora.lm_loss(
            lambda *x: jlora.apply(model, params, a, cfg, *x), batch)[0])(adapters)

    def full_grad(params, batch):
        return jax.grad(lambda p: jlora.lm_loss(
            lambda *x: model.apply({"params": p}, *x), batch)[0])(params)

    ratio = _flops(lora_grad, adapters, params, batch) / _flops(full_grad, params, batch)
    print(f"LoRA / full grad-step FLOPs: {ratio:.3f}")
    assert ratio <= 0.72


def _memorize_setup(scan=False):
    model = TinyLM(vocab=64, dim=32, heads=4, layers=2, scan=scan, multi_axis=False)
    ids = jax.random.randint(jax.random.key(3), (4, 12), 0, 64)
    params = model.init(KEY, ids)["params"]
    return model, ids, params


def test_lora_memorizes_and_frozen_params_stay_bitwise_identical():
    model, ids, params = _memorize_setup()
    snapshot = jax.tree.map(np.array, params)
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
    opt = optax.adam(2e-2)
    state = jlora.TrainState.create(jlora.init(params, cfg, key=KEY), opt, rng=jax.random.key(1))
    step = jax.jit(jlora.make_train_step(model, cfg, opt), donate_argnums=0)
    losses = []
    for _ in range(150):
        state, metrics = step(state, params, {"input_ids": ids})
        losses.append(float(metrics["loss"]))
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] <= 0.2 * losses[0]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, snapshot)
    # optimizer state exists for adapter leaves only
    assert jlora.count(state.opt_state) == 2 * jlora.count(state.adapters) + 1  # adam mu, nu (+ count)


def test_grad_accumulation_equals_one_big_batch():
    model, ids, params = _memorize_setup()
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets="proj")
    opt = optax.sgd(0.1)
    mask = jnp.asarray(np.random.default_rng(0).integers(0, 2, ids.shape), jnp.int32)
    batch = {"input_ids": ids, "loss_mask": mask}
    state = jlora.TrainState.create(jlora.init(params, cfg, key=KEY), opt, rng=KEY)
    one, m1 = jax.jit(jlora.make_train_step(model, cfg, opt))(state, params, batch)
    acc, m4 = jax.jit(jlora.make_train_step(model, cfg, opt, grad_accum_steps=2))(state, params, batch)
    assert_trees_all_close(one.adapters, acc.adapters, atol=1e-6)
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-5)
    assert float(m1["tokens"]) == float(m4["tokens"]) == float(mask[:, 1:].sum())
    with pytest.raises(ValueError, match="does not divide"):
        jlora.make_train_step(model, cfg, opt, grad_accum_steps=3)(state, params, batch)


def test_grad_accumulation_takes_strided_micro_batches_in_float32():
    """Micro-batch i holds rows i, i+k, ...: with a loss that weights micro-batches equally (no "tokens" metric),
    the step's gradient is the mean of jax.grad over those row sets. Sums run in float32: bf16 adapters and an
    integer metric accumulate, and the optimizer state keeps the adapters' dtype."""
    model, ids, params = _memorize_setup()
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets="proj")
    adapters = jax.tree.map(lambda x: x + 0.05, jlora.init(params, cfg, key=KEY))
    opt = optax.sgd(1.0)

    def loss_fn(apply_fn, batch):          # equal weights: no "tokens"; an int metric
        loss = jlora.lm_loss(apply_fn, batch)[0]
        return loss, {"loss": loss, "rows": jnp.sum(batch["input_ids"][:, 0] >= 0)}

    state = jlora.TrainState.create(adapters, opt, rng=KEY)
    new, metrics = jax.jit(jlora.make_train_step(model, cfg, opt, loss_fn=loss_fn, grad_accum_steps=2))(
        state, params, {"input_ids": ids})
    grad = lambda rows: jax.grad(lambda a: loss_fn(lambda *x: jlora.apply(model, params, a, cfg, *x),  # noqa: E731
                                                   {"input_ids": ids[rows]})[0])(adapters)
    want = jax.tree.map(lambda a, g0, g1: a - (g0 + g1) / 2, adapters, grad(slice(0, None, 2)),
                        grad(slice(1, None, 2)))
    assert_trees_all_close(new.adapters, want, atol=1e-6)
    assert float(metrics["rows"]) == 2.0          # per micro-batch, averaged

    cfg16 = jlora.LoraConfig(rank=2, alpha=4, targets="proj", dtype="bfloat16")
    ad16 = jlora.init(params, cfg16, key=KEY)
    adam = optax.adam(1e-2)
    results = []
    for k in (1, 2):
        state = jlora.TrainState.create(ad16, adam, rng=KEY)
        state, metrics = jax.jit(jlora.make_train_step(model, cfg16, adam, grad_accum_steps=k))(
            state, params, {"input_ids": ids})
        assert {x.dtype for x in jax.tree.leaves(state.opt_state[0].mu)} == {jnp.dtype(jnp.bfloat16)}
        results.append(float(metrics["loss"]))
    np.testing.assert_allclose(results[0], results[1], rtol=1e-5)


def test_mixed_precision_bf16_params_fp32_adapters():
    model, ids, params = _memorize_setup()
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets="proj", dropout=0.1)
    opt = optax.adamw(1e-2)
    state = jlora.TrainState.create(jlora.init(params16, cfg, key=KEY), opt, rng=KEY)
    step = jax.jit(jlora.make_train_step(model, cfg, opt))
    state, metrics = step(state, params16, {"input_ids": ids})
    state, metrics = step(state, params16, {"input_ids": ids})
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.adapters))
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(state.opt_state))
    assert metrics["loss"].dtype == jnp.float32 and bool(jnp.isfinite(metrics["loss"]))


def test_float16_adapters_train_with_a_float32_optimizer_state():
    """float16 adapters (LoraConfig.dtype) made every value NaN at step 1: Adam's state in float16 rounds eps=1e-8
    to 0, and A's gradient at B = 0 is exactly 0 (0/0). The optimizer now works in float32 (its state float32, the
    update rounded once into the float16 adapters). Oracle: optax by hand on float32 copies, rounding each step."""
    model, ids, params = _memorize_setup()
    opt = optax.adamw(1e-2)
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets="proj", dtype="float16")
    adapters = jlora.init(params, cfg, key=KEY)
    state = jlora.TrainState.create(adapters, opt, rng=KEY)
    step = jax.jit(jlora.make_train_step(model, cfg, opt))
    f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)  # noqa: E731
    want, want_state = adapters, opt.init(f32(adapters))
    loss = lambda a: jlora.lm_loss(lambda *x: jlora.apply(model, params, a, cfg, *x), {"input_ids": ids})[0]  # noqa
    losses = []
    for _ in range(4):
        state, metrics = step(state, params, {"input_ids": ids})
        losses.append(float(metrics["loss"]))
        updates, want_state = opt.update(f32(jax.grad(loss)(want)), want_state, f32(want))
        want = jax.tree.map(lambda a, u: (a.astype(jnp.float32) + u).astype(jnp.float16), want, updates)
    assert {x.dtype for x in jax.tree.leaves(state.adapters)} == {jnp.dtype(jnp.float16)}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state[0].mu)} == {jnp.dtype(jnp.float32)}
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(state.adapters)) and losses[-1] < losses[0]
    for got, ref in zip(jax.tree.leaves(state.adapters), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=1e-3, rtol=0)


def test_a_non_finite_step_is_applied_and_apply_if_finite_skips_it():
    """As the docstring says: a NaN loss gives NaN adapters; optax.apply_if_finite leaves them as they were."""
    model, ids, params = _memorize_setup()
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets="proj")
    adapters = jax.tree.map(lambda x: x + 0.05, jlora.init(params, cfg, key=KEY))

    def loss_fn(apply_fn, batch):
        loss = jlora.lm_loss(apply_fn, batch)[0] * batch["scale"]
        return loss, {"loss": loss}

    bad = {"input_ids": ids, "scale": jnp.float32(jnp.nan)}
    for opt, finite in ((optax.adam(1e-2), False), (optax.apply_if_finite(optax.adam(1e-2), 3), True)):
        state = jlora.TrainState.create(adapters, opt, rng=KEY)
        state, _ = jax.jit(jlora.make_train_step(model, cfg, opt, loss_fn=loss_fn))(state, params, bad)
        assert all(bool(jnp.isfinite(x).all()) == finite for x in jax.tree.leaves(state.adapters))
        if finite:
            assert_trees_all_close(state.adapters, adapters, atol=0)


def test_causal_lm_loss_matches_numpy_reference():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, (2, 5))
    mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = [-logp[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, 5) if mask[b, t]]
    loss, n = jlora.causal_lm_loss(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)
    assert int(n) == len(nll)


# ---------------------------------------------------------------- hypothesis properties
@settings(max_examples=60, deadline=None)
@given(rank=st.integers(-3, 70), alpha=st.one_of(st.floats(-2, 100), st.sampled_from([float("nan"), float("inf")])), dropout=st.floats(-0.5, 1.5))
def test_config_validation_property(rank, alpha, dropout):
    valid = rank >= 1 and alpha > 0 and math.isfinite(alpha) and 0 <= dropout < 1
    if valid:
        cfg = jlora.LoraConfig(rank=rank, alpha=alpha, dropout=dropout)
        assert jlora.LoraConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert cfg.scale("q_proj/kernel") == pytest.approx(alpha / rank)
    else:
        with pytest.raises(ValueError, match=r"`(rank|alpha|dropout)`"):
            jlora.LoraConfig(rank=rank, alpha=alpha, dropout=dropout)


def test_default_loss_names_the_batch_keys_it_has_and_needs():
    import flax.linen as nn

    model, x = nn.Dense(4), jnp.ones((2, 8))
    params = model.init(KEY, x)["params"]
    cfg, opt = jlora.LoraConfig(rank=2, targets="kernel"), optax.sgd(0.1)
    state = jlora.TrainState.create(jlora.init(params, cfg, key=KEY), opt, rng=KEY)
    with pytest.raises(ValueError, match=r"needs a dict batch with 'input_ids' \(and optionally 'attention_mask', "
                                         r"'loss_mask', 'positions', 'segment_ids'\); the batch holds keys \['x'\]"):
        jlora.make_train_step(model, cfg, opt)(state, params, {"x": x})
    with pytest.raises(ValueError, match=r"the batch is a tuple"):
        jlora.make_train_step(model, cfg, opt)(state, params, (x,))


def test_config_errors_name_field_and_value():
    with pytest.raises(ValueError, match=r"`targets` holds an invalid regex '\(q'"):
        jlora.LoraConfig(targets="(q")
    with pytest.raises(ValueError, match=r"unknown LoraConfig keys \['rnak'\]"):
        jlora.LoraConfig.from_dict({"rnak": 4})
    with pytest.raises(ValueError, match=r"rank_pattern\['v'\].*>= 1; got 0"):
        jlora.LoraConfig(rank_pattern={"v": 0})
    with pytest.raises(ValueError, match="`init`"):
        jlora.LoraConfig(init="pissa!")
    with pytest.raises(TypeError):
        jlora.LoraConfig(rank_pattern={"v": 2}).rank_pattern["q"] = 3
    hash(jlora.LoraConfig(rank_pattern={"v": 2}))


leaf = st.one_of(st.integers(), st.floats(allow_nan=False))
trees = st.recursive(st.dictionaries(st.text("abc", min_size=1, max_size=3), leaf, min_size=1, max_size=3),
                     lambda children: st.dictionaries(st.text("abc", min_size=1, max_size=3), children,
                                                      min_size=1, max_size=3), max_leaves=12)


@settings(max_examples=80, deadline=None)
@given(tree=trees, pattern=st.sampled_from(["a", "b$", "^c", "a/b", "zzz"]))
def test_partition_combine_round_trip(tree, pattern):
    sel, rest = jlora.partition(tree, pattern)
    assert jlora.combine(sel, rest) == tree
    assert jlora.combine(rest, sel) == tree
    flat_sel = jlora.tree.flatten(sel)
    flat_rest = jlora.tree.flatten(rest)
    for path, value in jlora.tree.flatten(tree).items():
        picked = flat_sel[path] is not None
        assert (flat_rest[path] is None) == picked
    assert jlora.tree.unflatten(jlora.tree.flatten(tree)) == tree


def test_partition_with_callable_and_bool_prefix():
    tree = {"w": jnp.ones(3), "n": {"scale": jnp.ones(2), "count": 3}}
    arrays, other = jlora.partition(tree, lambda x: isinstance(x, jax.Array))
    assert other == {"w": None, "n": {"scale": None, "count": 3}}
    first, second = jlora.partition(tree, {"w": True, "n": False})
    assert second["w"] is None and first["n"] == {"scale": None, "count": None}


def test_scan_steps_equals_the_same_steps_one_call_each():
    model, ids, params = _memorize_setup()
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj"), dropout=0.1)
    opt = optax.adamw(1e-2)
    state = jlora.TrainState.create(jlora.init(params, cfg, key=KEY), opt, rng=jax.random.key(7))
    step = jlora.make_train_step(model, cfg, opt)
    batches = [{"input_ids": jnp.roll(ids, i, axis=1)} for i in range(3)]
    one, losses = state, []
    for b in batches:
        one, m = jax.jit(step)(one, params, b)
        losses.append(float(m["loss"]))
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *batches)
    many, metrics = jax.jit(jlora.scan_steps(step))(state, params, stacked)
    assert int(many.step) == 3 and metrics["loss"].shape == (3,)
    np.testing.assert_allclose(np.asarray(metrics["loss"]), losses, rtol=1e-6)
    assert_trees_all_close(many.adapters, one.adapters, atol=1e-6)
    assert_trees_all_close(many.opt_state, one.opt_state, atol=1e-6)


class DropMLP(nn.Module):
    """A Linen MLP with its own nn.Dropout and a BatchNorm that uses its running averages (if any)."""

    norm: bool = False

    @nn.compact
    def __call__(self, x, train=True):
        h = jnp.tanh(nn.Dense(16, name="fc")(x))
        h = nn.BatchNorm(use_running_average=not train or self.norm == "frozen", name="bn")(h) if self.norm else h
        return nn.Dense(2, name="out")(nn.Dropout(0.5, deterministic=not train)(h))


def _model_key(key, name="dropout"):   # the key make_train_step documents for the model's stream `name`
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _normal(shape, seed=[0]):            # noqa: B006  (numpy: no XLA programs to compile for test data)
    seed[0] += 1
    return np.random.default_rng(seed[0]).normal(size=shape).astype(np.float32)


def _sq_loss(apply_fn, batch):
    loss = jnp.mean(apply_fn(batch["x"]) ** 2)
    return loss, {"loss": loss}


def test_model_dropout_gets_a_new_key_every_step_and_micro_batch():
    """A Linen model's own nn.Dropout trains under make_train_step: each step (and micro-batch) feeds it the
    documented key, so the step's loss is the plain model's on the merged params with that key; masks differ
    across steps, the same seed repeats the run, LoRA dropout keeps its key, and a loss_fn's own rngs win."""
    model, x, opt = DropMLP(), _normal((4, 6)), optax.sgd(0.0)   # lr 0: only the masks change the loss
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=("fc", "out"))
    params = jax.tree.map(lambda s: _normal(s.shape), jax.eval_shape(lambda: model.init(KEY, x, False))["params"])
    ad = jax.tree.map(lambda s: _normal(s.shape), jax.eval_shape(lambda p: jlora.init(p, cfg, key=KEY), params))

    @jax.jit
    def plain(x, rng):                   # the merged model's loss, with the key the step at `rng` gives the model
        key = _model_key(jax.random.split(rng)[1])
        return jnp.mean(model.apply({"params": jlora.merge(params, ad, cfg)}, x, rngs={"dropout": key}) ** 2)

    compiled = {}

    def run(cfg=cfg, steps=3, batch=None, **kw):
        step = compiled.setdefault((cfg, *kw.items()), jax.jit(jlora.make_train_step(model, cfg, opt, **kw)))
        state, out = jlora.TrainState.create(ad, opt, rng=jax.random.key(5)), []
        for _ in range(steps):
            rng = state.rng
            state, metrics = step(state, params, batch or {"x": x})
            out.append((float(metrics["loss"]), rng))
        return out

    steps = run(steps=4, loss_fn=_sq_loss)
    for loss, rng in steps:
        np.testing.assert_allclose(loss, plain(x, rng), rtol=1e-5)
    assert len({loss for loss, _ in steps}) == 4
    assert [loss for loss, _ in steps[:3]] == [loss for loss, _ in run(loss_fn=_sq_loss)]   # same seed, same run

    lora_drop = dataclasses.replace(cfg, dropout=0.5)

    @jax.jit
    def micro(x, rng, i):                # micro-batch i: rows i::2, LoRA dropout on fold_in(key, i) as before
        key = jax.random.fold_in(jax.random.split(rng)[1], i)
        rngs = {"lora_dropout": key, "dropout": _model_key(key)}
        return jnp.mean(jlora.apply(model, params, ad, lora_drop, x, rngs=rngs) ** 2)

    for loss, rng in run(lora_drop, steps=2, loss_fn=_sq_loss, grad_accum_steps=2):
        np.testing.assert_allclose(loss, np.mean([micro(x[i::2], rng, i) for i in range(2)]), rtol=1e-5)

    def own_rngs(apply_fn, batch):                                  # passing rngs used to be a TypeError
        key = _model_key(jax.random.split(batch["rng"])[1])
        loss = jnp.mean(apply_fn(batch["x"], rngs={"dropout": key}) ** 2)
        return loss, {"loss": loss}

    batch = {"x": x, "rng": jax.random.key(6)}
    [(loss, _)] = run(loss_fn=own_rngs, steps=1, batch=batch)
    np.testing.assert_allclose(loss, plain(x, batch["rng"]), rtol=1e-5)
    with pytest.raises(ValueError, match=r"`model_rngs` names the model's own rng streams.*'lora_dropout'"):
        jlora.make_train_step(model, cfg, opt, model_rngs=("dropout", "lora_dropout"))
    with pytest.raises(ValueError, match=r"a scalar in the batch \(it has no batch axis to split\)"):
        run(steps=1, batch=batch, loss_fn=own_rngs, grad_accum_steps=2)


@pytest.mark.parametrize("norm", ["frozen", "train"])
def test_batch_norm_in_the_step_is_an_error_that_says_how_or_runs_as_documented(norm):
    """make_train_step carries no state besides the adapters: a BatchNorm whose statistics are not passed, or that
    would update them, is an error naming the fix; passed through `variables`, the running averages are used."""
    model, x = DropMLP(norm=norm), _normal((4, 6))
    shapes = jax.eval_shape(lambda: model.init(KEY, x, False))
    params, stats = (jax.tree.map(lambda s: _normal(s.shape), shapes[k]) for k in ("params", "batch_stats"))
    stats = {"batch_stats": jax.tree.map(np.abs, stats)}
    cfg, opt = jlora.LoraConfig(rank=2, alpha=4, targets="fc"), optax.sgd(0.0)
    ad = jax.tree.map(lambda s: _normal(s.shape), jax.eval_shape(lambda p: jlora.init(p, cfg, key=KEY), params))
    state = jlora.TrainState.create(ad, opt, rng=KEY)
    with pytest.raises(ValueError, match=r"(?s)batch_stats.*carries no other state.*variables=\{\"batch_stats\""):
        jax.jit(jlora.make_train_step(model, cfg, opt, loss_fn=_sq_loss))(state, params, {"x": x})

    def with_stats(apply_fn, batch):
        loss = jnp.mean(apply_fn(batch["x"], variables=stats) ** 2)
        return loss, {"loss": loss}

    step = jax.jit(jlora.make_train_step(model, cfg, opt, loss_fn=with_stats))
    if norm == "train":         # it would update its statistics: an error that says how to run it
        with pytest.raises(ValueError, match=r"(?s)batch_stats.*immutable.*use_running_average=True"):
            step(state, params, {"x": x})
        return
    _, metrics = step(state, params, {"x": x})
    want = jax.jit(lambda: jnp.mean(model.apply({"params": jlora.merge(params, ad, cfg), **stats}, x, rngs={
        "dropout": _model_key(jax.random.split(KEY)[1])}) ** 2))()
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
