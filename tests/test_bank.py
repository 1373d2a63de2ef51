"""Many adapters on one base (jlora.bank): every row of a mixed batch equals its adapter alone, greedy generation per
row, N adapters trained together equal N separate trainings, and hot-swaps never recompile."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from helpers import assert_trees_all_close, max_diff
from jlora import bank as B
from jlora.models import generate as gen
from jlora.models.gpt2 import GPT2Config, GPT2LMHeadModel
from jlora.models.llama import LlamaConfig, LlamaForCausalLM
from tiny import TinyLM

KEY = jax.random.key(0)
LLAMA_ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPT2_ALL = ("c_attn", "attn/c_proj", "c_fc", "mlp/c_proj")


def _random(adapters, key, scale=0.1):
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _family(name, scan):
    if name == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, num_key_value_heads=2, scan_layers=scan))
        qv, everything = ("q_proj", "v_proj"), LLAMA_ALL
    else:
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, scan_layers=scan))
        qv, everything = ("c_attn",), GPT2_ALL
    ids = jax.random.randint(KEY, (5, 9), 0, 256)
    params = model.init(KEY, ids)["params"]
    return model, params, ids, jlora.layout(model, ids), qv, everything


def _four_adapters(params, lay, qv, everything):
    """Slots of ranks 4, 8 and 16, different alphas, rsLoRA, q,v beside all linear layers."""
    cfgs = [jlora.LoraConfig(rank=4, alpha=8.0, targets=qv),
            jlora.LoraConfig(rank=8, alpha=4.0, targets=everything, use_rslora=True),
            jlora.LoraConfig(rank=16, alpha=32.0, targets=qv, rank_pattern={"layers|h": 16}),
            jlora.LoraConfig(rank=8, alpha=2.0, targets=everything, rank_pattern={"(mlp|c_fc)": 4},
                             alpha_pattern={"(v_proj|c_attn)": 12.0})]
    ads = [_random(jlora.init(params, c, key=jax.random.key(i + 1), layout=lay), jax.random.key(10 + i), 0.05)
           for i, c in enumerate(cfgs)]
    return cfgs, ads


# the scanned Llama case (~19 s) runs in make test-all
@pytest.mark.parametrize("family,scan", [pytest.param("llama", True, marks=pytest.mark.slow), ("gpt2", False)])
def test_each_row_of_a_mixed_batch_equals_its_adapter_alone(family, scan):
    model, params, ids, lay, qv, everything = _family(family, scan)
    cfgs, ads = _four_adapters(params, lay, qv, everything)
    bank = B.create(params, capacity=6, rank=16, targets=everything, layout=lay)
    for slot, (ad, cfg) in zip((0, 1, 3, 5), zip(ads, cfgs)):
        bank = B.put(bank, slot, ad, cfg)
    rows = jnp.array([3, B.BASE, 0, 5, 1])
    mixed = jax.jit(lambda p, b, r, x: B.apply(model, p, b, r, x))(params, bank, rows, ids)
    by_slot = {0: 0, 1: 1, 3: 2, 5: 3}
    for i, slot in enumerate(rows.tolist()):
        if slot == B.BASE:
            want = model.apply({"params": params}, ids)
            assert max_diff(mixed[i], want[i]) <= 1e-5
            continue
        k = by_slot[slot]
        alone = jlora.apply(model, params, ads[k], cfgs[k], ids)
        merged = model.apply({"params": jlora.merge(params, ads[k], cfgs[k])}, ids)
        assert max_diff(mixed[i], alone[i]) <= 1e-5 and max_diff(mixed[i], merged[i]) <= 1e-4
    # get() gives back what was put, at its own rank and scale
    back, cfg = B.get(bank, 1)
    assert max_diff(jlora.apply(model, params, back, cfg, ids), jlora.apply(model, params, ads[1], cfgs[1], ids)) \
        <= 1e-6
    # an emptied slot is the base model
    cleared = B.clear(bank, 3)
    out = B.apply(model, params, cleared, jnp.full((5,), 3), ids)
    assert max_diff(out, model.apply({"params": params}, ids)) <= 1e-6


@pytest.mark.slow
def test_every_layer_kind_routes_per_row():
    ids = jnp.arange(24).reshape(3, 8) % 64
    model = TinyLM(multi_axis=True, tied=True)       # DenseGeneral q/k/v/o, Dense MLP, Embed + Embed.attend
    params = model.init(KEY, ids)["params"]
    lay = jlora.layout(model, ids)
    targets = ("q_proj", "o_proj", "up_proj", "embed")
    cfgs = [jlora.LoraConfig(rank=2, alpha=4.0, targets=targets), jlora.LoraConfig(rank=4, alpha=2.0,
                                                                                  targets=("o_proj", "embed"))]
    ads = [_random(jlora.init(params, c, key=jax.random.key(i), layout=lay), jax.random.key(5 + i))
           for i, c in enumerate(cfgs)]
    bank = B.create(params, capacity=2, rank=4, targets=targets, layout=lay)
    bank = B.put(B.put(bank, 0, ads[0], cfgs[0]), 1, ads[1], cfgs[1])
    out = B.apply(model, params, bank, jnp.array([1, 0, B.BASE]), ids)
    assert max_diff(out[0], jlora.apply(model, params, ads[1], cfgs[1], ids)[0]) <= 1e-5
    assert max_diff(out[1], jlora.apply(model, params, ads[0], cfgs[0], ids)[1]) <= 1e-5
    assert max_diff(out[2], model.apply({"params": params}, ids)[2]) <= 1e-5


def test_einsum_layer_routes_per_row():
    class Ein(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((3, 6, 5), "btd,hdo->bhto", use_bias=False, name="proj")(x)

    x = jax.random.normal(KEY, (2, 4, 6))
    model = Ein()
    params, ad, cfg, out = _routed_one_layer(model, x, slot=1, alpha=3.0)
    assert max_diff(out[0], jlora.apply(model, params, ad, cfg, x)[0]) <= 1e-5
    assert max_diff(out[1], model.apply({"params": params}, x)[1]) <= 1e-6


def _routed_one_layer(model, x, *, slot, alpha):
    """A random adapter on the layer "proj" put in ``slot`` of a bank of 2: (params, adapter, config, bank output
    for rows routed to ``slot`` and to the base)."""
    params = model.init(KEY, x)["params"]
    lay = jlora.layout(model, x)
    cfg = jlora.LoraConfig(rank=2, alpha=alpha, targets="proj")
    ad = _random(jlora.init(params, cfg, key=KEY, layout=lay), jax.random.key(1))
    bank = B.put(B.create(params, capacity=2, rank=2, targets="proj", layout=lay), slot, ad, cfg)
    return params, ad, cfg, B.apply(model, params, bank, jnp.array([slot, B.BASE]), x)


def test_dense_general_with_its_axes_out_of_order_routes_per_row():
    class Proj(nn.Module):                 # Flax pairs axis=(-1, -2) with the kernel's (3, 4) in sorted order
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral(5, axis=(-1, -2), name="proj")(x)

    x = jax.random.normal(KEY, (2, 3, 4))
    model = Proj()
    params, ad, cfg, out = _routed_one_layer(model, x, slot=0, alpha=2.0)
    merged = model.apply({"params": jlora.merge(params, ad, cfg)}, x)     # the update in W itself
    assert max_diff(out[0], merged[0]) <= 1e-5
    assert max_diff(out[1], model.apply({"params": params}, x)[1]) <= 1e-6


def _toy_llama():
    """A one-layer Llama of hidden size 8 (k/v kernels 8 x 4), vocab 64: (model, params)."""
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=4))
    return model, model.init(KEY, jnp.zeros((1, 4), jnp.int32))["params"]


def test_a_bank_rank_above_a_kernel_side_pads_with_zeros():
    """A toy Llama whose k/v kernels are 8 x 4: a bank of rank 16 (jlora serve's default) holds a PiSSA adapter's plain
    form, rank 2r = 6 > 4, and each row equals the adapter alone (both were refused: "exceeds the smaller side")."""
    from jlora.variants import inits

    model, params = _toy_llama()
    ids = jax.random.randint(KEY, (2, 5), 0, 64)
    pissa = jlora.LoraConfig(rank=3, alpha=6.0, targets=("q_proj", "k_proj", "v_proj"), init="pissa")
    trained, residual = jlora.init_with_base(params, pissa, key=KEY)
    trained = jax.tree.map(lambda x, d: x + d, trained, _random(trained, jax.random.key(1), 0.3))
    plain, cfg = inits.to_original_base(trained, params, pissa)
    assert cfg.rank == 6 and plain["layers_0"]["self_attn"]["k_proj"]["kernel"].a.shape == (8, 6)
    bank = B.put(B.create(params, capacity=2, rank=16, targets=pissa.targets), 1, plain, cfg)
    out = B.apply(model, params, bank, jnp.array([1, B.BASE]), ids)
    want = model.apply({"params": jlora.merge(residual, trained, pissa)}, ids)      # what the run trained
    assert max_diff(out[0], want[0]) <= 1e-4
    assert max_diff(out[1], model.apply({"params": params}, ids)[1]) <= 1e-6


def test_residual_and_misread_adapters_are_refused_by_name():
    model, params, ids, lay, qv, everything = _family("llama", False)
    bank = B.create(params, capacity=1, rank=4, targets=qv, layout=lay)
    pissa = jlora.LoraConfig(rank=2, targets=qv, init="pissa")
    adapters, _ = jlora.init_with_base(params, pissa, key=KEY, layout=lay)
    with pytest.raises(ValueError, match=r"pissa adapters, relative to a residual base .*to_original_base"):
        B.put(bank, 0, adapters, pissa)

    class Ein(nn.Module):                  # a square kernel read (out, in)
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((6, 6), "btd,od->bto", use_bias=False, name="proj")(x)

    x = jax.random.normal(KEY, (2, 3, 6))
    ein = Ein()
    eparams = ein.init(KEY, x)["params"]
    cfg = jlora.LoraConfig(rank=2, targets="proj")
    ebank = B.create(eparams, capacity=1, rank=2, targets="proj", layout=jlora.layout(ein, x))
    with pytest.raises(ValueError, match=r"made without a layout, .* the bank reads that kernel as \(out, in\)"):
        B.put(ebank, 0, jlora.init(eparams, cfg, key=KEY), cfg)     # no layout: taken as (in, out)


def test_bad_adapters_are_refused_by_name():
    model, params, ids, lay, qv, everything = _family("llama", False)
    bank = B.create(params, capacity=2, rank=4, targets=qv, layout=lay, fingerprint="abc")
    wide = jlora.LoraConfig(rank=8, targets=qv)
    with pytest.raises(ValueError, match=r"rank 8, above the bank's rank 4"):
        B.put(bank, 0, jlora.init(params, wide, key=KEY), wide)
    mlp = jlora.LoraConfig(rank=2, targets="down_proj")
    with pytest.raises(ValueError, match=r"'layers_0/mlp/down_proj/kernel' is outside the bank"):
        B.put(bank, 0, jlora.init(params, mlp, key=KEY), mlp)
    dora = jlora.LoraConfig(rank=2, targets=qv, use_dora=True)
    with pytest.raises(ValueError, match=r"'dora' adapter .* which a bank cannot hold"):
        B.put(bank, 0, jlora.init(params, dora, key=KEY), dora)
    saved = jlora.LoraConfig(rank=2, targets=qv, modules_to_save="lm_head")
    with pytest.raises(ValueError, match=r"whole tensors \['lm_head/kernel'\]"):
        B.put(bank, 0, jlora.init(params, saved, key=KEY), saved)
    plain = jlora.LoraConfig(rank=2, targets=qv)
    with pytest.raises(ValueError, match=r"another base model \(fingerprint xyz\)"):
        B.put(bank, 0, jlora.init(params, plain, key=KEY), plain, fingerprint="xyz")
    with pytest.raises(ValueError, match=r"slot 2 is out of range: the bank has slots 0..1"):
        B.put(bank, 2, jlora.init(params, plain, key=KEY), plain)
    with pytest.raises(ValueError, match="pass the slot of each batch row"):
        jlora.apply(model, params, bank.slots, bank.config, ids)
    other = jlora.LoraConfig(rank=2, targets="up_proj")     # q,v adapters with a config that does not make them
    with pytest.raises(ValueError, match=r"'layers_0/self_attn/q_proj/kernel' is not one that its config targets"):
        B.put(bank, 0, jlora.init(params, plain, key=KEY), other)
    for bad in (2, 7, -2):
        with pytest.raises(ValueError, match=rf"adapter ids \[{bad}\] are out of range: the bank has slots 0..1"):
            B.apply(model, params, bank, jnp.array([0, bad, -1, 1, 0]), ids)
    for floats in (jnp.array([-0.5, 0, 0, 1, 1]), jnp.full(5, 1.7)):   # not truncated to a slot: refused, traced too
        for apply in (B.apply, jax.jit(B.apply, static_argnums=0)):
            with pytest.raises(ValueError, match=r"adapter ids must be integers .* got dtype float32"):
                apply(model, params, bank, floats, ids)
    scanned_model, scanned_params, _, scanned_lay, _, _ = _family("llama", True)   # the other layer-stack form
    stacked = jlora.init(scanned_params, plain, key=KEY, layout=scanned_lay)
    with pytest.raises(ValueError, match=r"'layers/self_attn/q_proj/kernel' is stacked over the layers of a scanned "
                                         r"model \(scan_layers\), while the bank's model has them unrolled"):
        B.put(bank, 0, stacked, plain)
    scanned_bank = B.create(scanned_params, capacity=2, rank=4, targets=qv, layout=scanned_lay)
    with pytest.raises(ValueError, match=r"'layers_0/self_attn/q_proj/kernel' is one layer's of an unrolled model, "
                                         r"while the bank's model stacks its layers"):
        B.put(scanned_bank, 0, jlora.init(params, plain, key=KEY), plain)
    accumulating = optax.MultiSteps(B.optimizer([1e-3, 1e-3]), every_k_schedule=2)
    state = jlora.TrainState.create(B.factors(bank), accumulating, rng=KEY)
    batch = {"input_ids": ids, "adapter_ids": jnp.zeros(ids.shape[0], jnp.int32)}
    with pytest.raises(ValueError, match=r"optax.MultiSteps.* a slot absent from the last micro-batch"):
        B.make_train_step(model, bank, accumulating)(state, params, bank, batch)
    per_slot = B.per_slot(optax.MultiSteps(optax.adam(1e-3), every_k_schedule=2))   # each slot its own accumulator
    state = jlora.TrainState.create(B.factors(bank), per_slot, rng=KEY)
    state, _ = B.make_train_step(model, bank, per_slot)(state, params, bank, batch)
    assert state.opt_state.mini_step.tolist() == [1, 0]   # slot 0 had rows, slot 1 none


@pytest.mark.slow
def test_greedy_generation_per_row_equals_each_alone():
    model, params, _, lay, qv, everything = _family("llama", True)
    cfgs, ads = _four_adapters(params, lay, qv, everything)
    ads = [_random(a, jax.random.key(20 + i), 0.4) for i, a in enumerate(ads)]     # strong enough to differ
    bank = B.create(params, capacity=4, rank=16, targets=everything, layout=lay)
    for slot in range(4):
        bank = B.put(bank, slot, ads[slot], cfgs[slot])
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [1, 2, 3, 4, 5], [7]]
    rows = [2, 0, B.BASE, 3, 1]
    out = gen.generate(model, (params, bank, jnp.array(rows)), prompts, max_new_tokens=8, eos_token_id=(),
                       apply_fn=B.apply_fn(model)).to_lists()
    alone = []
    for prompt, slot in zip(prompts, rows):
        if slot == B.BASE:
            alone.append(gen.generate(model, params, [prompt], max_new_tokens=8, eos_token_id=()).to_lists()[0])
        else:
            alone.append(gen.generate(model, (params, ads[slot]), [prompt], max_new_tokens=8, eos_token_id=(),
                                      apply_fn=gen.lora_apply_fn(model, cfgs[slot])).to_lists()[0])
    assert out == alone
    assert len({tuple(t) for t in out}) > 2        # the adapters really steer the rows apart


def _batch(n_rows, length, key):
    k1, k2 = jax.random.split(key)
    ids = jax.random.randint(k1, (n_rows, length), 0, 256)
    mask = (jax.random.uniform(k2, (n_rows, length)) > 0.3).astype(jnp.int32).at[:, :2].set(0)
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "loss_mask": mask}


@pytest.fixture(scope="module")
def toy():
    """The toy Llama with a bank of 3 slots of rank 4, each holding a random rank-2 q,v adapter (numpy draws: no
    compiles), and one jitted bank step (AdamW, lr 1e-2 per slot) that the tests using it share."""
    model, params = _toy_llama()
    cfg = jlora.LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda: jlora.init(params, cfg, key=KEY))
    ads = [jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), shapes) for _ in range(3)]
    bank = B.create(params, capacity=3, rank=4, targets=cfg.targets)
    for slot, ad in enumerate(ads):
        bank = B.put(bank, slot, ad, cfg)
    opt = B.optimizer([1e-2] * 3)
    return model, params, cfg, ads, bank, opt, jax.jit(B.make_train_step(model, bank, opt))


def _packed(seed, routes):
    """A packed batch (``segment_ids``, no masks) of rows routed by ``routes``: several segments per row."""
    seg = np.array([[1] * 5 + [2] * 7, [1] * 3 + [2] * 4 + [3] * 5, [1] * 12, [1] * 8 + [2] * 4,
                    [1] * 2 + [2] * 10, [1] * 6 + [2] * 6, [1] * 4 + [2] * 4 + [3] * 4], np.int32)
    ids = np.random.default_rng(seed).integers(0, 64, seg.shape, np.int32)
    return {"input_ids": jnp.asarray(ids), "segment_ids": jnp.asarray(seg), "adapter_ids": jnp.array(routes)}


def _slot(factors, slot, rank):
    """Slot ``slot`` of a bank's :func:`factors`, cut to ``rank``, as ``{kernel path/0: A, kernel path/1: B}``."""
    out = {}
    for path, x in jlora.tree.leaves_by_path(factors).items():     # A (..., N, in, R), B (..., N, R, out)
        x = np.take(np.asarray(x), slot, axis=np.ndim(x) - 3)
        out[path] = x[..., :rank] if path.endswith("/0") else x[..., :rank, :]
    return out


def test_training_on_packed_rows_equals_each_adapter_alone_with_lm_loss(toy):
    """Packed rows without a loss_mask: lm_loss does not score a segment's first token (the segment before does not
    predict it); the bank's loss and its per-slot token counts must skip it too."""
    model, params, cfg, ads, bank, opt, step = toy
    routes = [[0, 2, 1, B.BASE, 2, 0, 1], [1, 0, 2, 2, B.BASE, 1, 0]]      # two rows per slot in each batch
    batches = [_packed(30 + i, r) for i, r in enumerate(routes)]
    state = jlora.TrainState.create(B.factors(bank), opt, rng=KEY)
    together = []
    for batch in batches:
        state, metrics = step(state, params, bank, batch)
        together.append(float(metrics["loss"]))
    alone_opt = optax.adamw(1e-2, weight_decay=0.0)
    one = jax.jit(jlora.make_train_step(model, cfg, alone_opt))       # lm_loss; one compile for every slot
    separate = np.zeros(len(batches))
    for slot in range(3):
        s = jlora.TrainState.create(ads[slot], alone_opt, rng=KEY)
        for i, batch in enumerate(batches):
            rows = np.flatnonzero(np.asarray(routes[i]) == slot)
            s, m = one(s, params, {k: v[rows] for k, v in batch.items() if k != "adapter_ids"})
            separate[i] += float(m["loss"]) / 3
        alone = {f"{p}/{i}": np.asarray(x) for p, n in jlora.adapter.adapter_items(s.adapters)
                 for i, x in enumerate((n.a, n.b))}
        start = {f"{p}/{i}": np.asarray(x) for p, n in jlora.adapter.adapter_items(ads[slot])
                 for i, x in enumerate((n.a, n.b))}
        assert max(np.abs(alone[k] - start[k]).max() for k in alone) > 1e-2      # the training moved it
        assert_trees_all_close(_slot(state.adapters, slot, 2), alone, atol=1e-6)
    np.testing.assert_allclose(together, separate, atol=1e-5)


def test_an_id_out_of_range_under_jit_never_touches_another_slot(toy):
    """Traced ids cannot be refused: above the last slot reads as the last slot, below BASE as the base, in the
    forward pass, the loss weights and the slots present alike (a fill-mode gather gave the other slots NaN)."""
    model, params, cfg, ads, bank, opt, step = toy
    good, bad = _packed(0, [0, 2, 1, B.BASE, 2, 0, 1]), _packed(0, [0, 7, 1, -5, 3, 0, 1])
    state = jlora.TrainState.create(B.factors(bank), opt, rng=KEY)
    want_state, want = step(state, params, bank, good)
    got_state, got = step(state, params, bank, bad)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got_state.adapters))
    assert_trees_all_close((got_state.adapters, got_state.opt_state, got),
                           (want_state.adapters, want_state.opt_state, want), atol=0)
    for f in (B.slot_weights, B.slots_present):
        f = jax.jit(f, static_argnums=1)
        np.testing.assert_array_equal(f(bad, 3), f(good, 3))
    with pytest.raises(ValueError, match=r"adapter ids \[-5, 3, 7\] are out of range: the bank has slots 0..2"):
        B.make_train_step(model, bank, opt)(state, params, bank, bad)      # known outside a trace: refused
    with pytest.raises(ValueError, match=r"adapter ids \[7\] are out of range"):
        B.slot_weights({**good, "adapter_ids": jnp.array([0, 7, 1, 1, 2, 0, 1])}, 3)


def test_bank_step_arguments_are_checked_by_name(toy):
    model, params, cfg, ads, bank, opt, _ = toy
    step = B.make_train_step(model, bank, opt)         # unjitted: every check runs before any compute
    batch = _packed(0, [0, 1, 2, 0, 1, 2, B.BASE])
    state = jlora.TrainState.create(B.factors(bank), opt, rng=KEY)
    with pytest.raises(ValueError, match=r"needs a dict batch with 'input_ids' \(B, T\) and 'adapter_ids' \(B,\).* "
                                         r"holds keys \['input_ids', 'segment_ids'\]"):
        step(state, params, bank, {k: v for k, v in batch.items() if k != "adapter_ids"})
    with pytest.raises(ValueError, match=r"batch\['adapter_ids'\] has shape \(3,\), but batch\['input_ids'\] has "
                                         r"shape \(7, 12\): pass one slot id per row, shape \(7,\)"):
        step(state, params, bank, {**batch, "adapter_ids": jnp.array([0, 1, 2])})
    with pytest.raises(ValueError, match=r"per-slot optimizer was given the whole Bank.*jlora.bank.factors\(bank\)"):
        jlora.TrainState.create(bank, opt, rng=KEY)
    sgd = optax.sgd(1e-2)
    with pytest.raises(ValueError, match=r"state.adapters is the whole Bank.*TrainState.create\(jlora.bank.factors"):
        B.make_train_step(model, bank, sgd)(jlora.TrainState.create(bank, sgd, rng=KEY), params, bank, batch)
    small = B.create(params, capacity=2, rank=4, targets=cfg.targets)
    two_slots = {**batch, "adapter_ids": jnp.array([0, 1, 0, 1, 0, 1, B.BASE])}   # ids that fit either bank
    with pytest.raises(ValueError, match=r"built for a bank of 2 slots but is called with a bank of 3"):
        jax.jit(B.make_train_step(model, small, sgd))(jlora.TrainState.create(B.factors(small), sgd, rng=KEY),
                                                      params, bank, two_slots)
    with pytest.raises(ValueError, match=r"state.adapters are not the factors of this bank \(4 of 4 leaves differ; "
                                         r"\['layers_0'\]\['self_attn'\]\['q_proj'\]\['kernel'\]\[0\]: state "
                                         r"\(2, 8, 4\), bank \(3, 8, 4\)"):
        jax.jit(B.make_train_step(model, bank, sgd))(jlora.TrainState.create(B.factors(small), sgd, rng=KEY), params,
                                                     bank, two_slots)


@pytest.mark.slow
def test_training_four_adapters_together_equals_four_separate_trainings():
    model, params, _, lay, qv, everything = _family("llama", True)
    cfgs, ads = _four_adapters(params, lay, qv, everything)
    lrs = [2e-3, 4e-3, 1e-3, 3e-3]
    bank = B.create(params, capacity=4, rank=16, targets=everything, layout=lay)
    for slot in range(4):
        bank = B.put(bank, slot, ads[slot], cfgs[slot])
    # eps 1e-6: Adam divides by sqrt(v) + eps, so where a gradient is ~1e-9 (a sum that cancels) the summation
    # order of a batch of 8 rows vs 2 rows would otherwise show up as a visible difference in that element
    opt = B.optimizer(lrs, weight_decay=0.01, eps=1e-6)
    state = jlora.TrainState.create(B.factors(bank), opt, rng=KEY)
    step = jax.jit(B.make_train_step(model, bank, opt))
    # Slot 3 has no rows in the second batch and slot 1 none in the fourth: they must skip those steps exactly
    # (factors, moments and Adam's step count), as their separate trainings do.
    routes = [[0, 1, 2, 3, 0, 2, 1, 3], [0, 1, 2, B.BASE, 0, 2, 1, 0], [3, 2, 1, 0, 0, 1, 2, 3],
              [0, 3, 2, 3, 0, 2, B.BASE, 3]]
    batches = [{**_batch(8, 10, jax.random.key(100 + s)), "adapter_ids": jnp.array(r)} for s, r in enumerate(routes)]
    together = []
    for batch in batches:
        state, metrics = step(state, params, bank, batch)
        together.append(float(metrics["loss"]))
    assert state.opt_state[0].count.tolist() == [4, 3, 4, 3]   # adamw's scale_by_adam state, one count per slot
    trained = B.with_factors(bank, state.adapters)
    separate_losses = np.zeros(len(batches))
    for slot in range(4):
        o = optax.adamw(lrs[slot], weight_decay=0.01, eps=1e-6)
        s = jlora.TrainState.create(ads[slot], o, rng=KEY)
        one = jax.jit(jlora.make_train_step(model, cfgs[slot], o))
        for i, batch in enumerate(batches):
            rows = np.flatnonzero(np.asarray(routes[i]) == slot)
            if rows.size:
                s, m = one(s, params, {k: v[rows] for k, v in batch.items() if k != "adapter_ids"})
                separate_losses[i] += float(m["loss"]) / len({r for r in routes[i] if r != B.BASE})
        moved = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), s.adapters, ads[slot])
        assert max(jax.tree.leaves(moved)) > 2 * lrs[slot]   # the training really moved the adapters
        got, got_cfg = B.get(trained, slot)
        assert jax.tree.map(np.shape, got) == jax.tree.map(np.shape, s.adapters)
        assert_trees_all_close(jlora.tree.leaves_by_path(got), jlora.tree.leaves_by_path(s.adapters), atol=1e-5)
        assert all(got_cfg.scale(p) == pytest.approx(cfgs[slot].scale(p), rel=1e-6)   # scales are float32 arrays
                   for p, _ in jlora.adapter.adapter_items(got))
    np.testing.assert_allclose(together, separate_losses, atol=1e-5)
    # the padded part of each slot (rank < 16) stayed exactly zero
    node = trained.slots["layers"]["self_attn"]["q_proj"]["kernel"]
    assert not np.any(np.asarray(node.a[:, 0, :, 4:])) and not np.any(np.asarray(node.b[:, 0, 4:, :]))


@pytest.mark.slow
def test_hot_swaps_never_recompile():
    model, params, ids, lay, qv, everything = _family("llama", True)
    cfgs, ads = _four_adapters(params, lay, qv, everything)
    bank = B.create(params, capacity=4, rank=16, targets=everything, layout=lay)
    fwd = jax.jit(lambda p, b, r, x: B.apply(model, p, b, r, x))
    opt = B.optimizer([1e-2] * 4)
    step = jax.jit(B.make_train_step(model, bank, opt))
    batch = {**_batch(4, 8, KEY), "adapter_ids": jnp.array([0, 1, 2, 3])}
    rows = jnp.array([0, 1, 2, 3, B.BASE])
    prompts = [[1, 2, 3]] * 4

    def run_all(bank):
        jax.block_until_ready(fwd(params, bank, rows, ids))
        gen.generate(model, (params, bank, rows[:4]), prompts, max_new_tokens=3, eos_token_id=(),
                     apply_fn=B.apply_fn(model))
        state = jlora.TrainState.create(B.factors(bank), opt, rng=KEY)
        jax.block_until_ready(step(state, params, bank, batch))

    run_all(bank)
    sizes = (fwd._cache_size(), gen._generate._cache_size(), step._cache_size())
    for swap in range(5):                     # different ranks, alphas, target sets into different slots
        k = swap % 4
        bank = B.put(bank, (swap * 3) % 4, _random(ads[k], jax.random.key(50 + swap)), cfgs[k])
        if swap == 3:
            bank = B.clear(bank, 1)
        run_all(bank)
    after = (fwd._cache_size(), gen._generate._cache_size(), step._cache_size())
    assert after == sizes and (sizes[0], sizes[2]) == (1, 1)   # generate's jit is shared with other tests


@pytest.mark.slow
def test_bank_inside_a_sharded_step_equals_one_device():
    from jlora import parallel

    model, params, _, lay, qv, everything = _family("llama", False)
    cfgs, ads = _four_adapters(params, lay, qv, everything)
    bank = B.create(params, capacity=4, rank=16, targets=everything, layout=lay)
    for slot in range(4):
        bank = B.put(bank, slot, ads[slot], cfgs[slot])
    opt = B.optimizer([1e-3, 2e-3, 1e-3, 3e-3], eps=1e-6)   # eps: see the training test
    batch = {**_batch(8, 8, KEY), "adapter_ids": jnp.array([0, 1, 2, 3, 3, 2, 1, 0])}
    state = jlora.TrainState.create(B.factors(bank), opt, rng=KEY)
    step = B.make_train_step(model, bank, opt)
    want_state, want = jax.jit(step)(state, params, bank, batch)
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    p_sh = parallel.param_shardings(params, mesh, "llama")
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sharded = jax.jit(step, in_shardings=(rep, p_sh, rep, parallel.batch_sharding(mesh)))
    got_state, got = sharded(state, parallel.place(params, p_sh), bank, parallel.shard_batch(batch, mesh))
    assert abs(float(got["loss"]) - float(want["loss"])) <= 1e-5
    assert_trees_all_close(got_state.adapters, want_state.adapters, atol=1e-5)


def _tiny_hf(tmp_path, seed):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                                   intermediate_size=64, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(tmp_path / f"base{seed}")
    return model, jlora.hf.load(tmp_path / f"base{seed}")


def test_slots_from_peft_and_run_folders_saved_loaded_and_exported_to_peft(tmp_path):
    import peft
    import torch

    from jlora import checkpoint

    hf_model, loaded = _tiny_hf(tmp_path, 0)
    params, ids = loaded.params, jnp.asarray([[1, 5, 9, 20, 3, 7], [4, 8, 15, 16, 23, 42]])
    c1 = jlora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    c2 = jlora.LoraConfig(rank=2, alpha=3.0, targets=("o_proj", "down_proj"), use_rslora=True)
    a1 = _random(jlora.init(params, c1, key=KEY), jax.random.key(1), 0.3)
    a2 = _random(jlora.init(params, c2, key=KEY), jax.random.key(2), 0.3)
    jlora.peft.save(tmp_path / "peft1", a1, c1, loaded)
    with checkpoint.CheckpointManager(tmp_path / "run2" / "checkpoints") as m:   # a run folder's checkpoint
        m.save(3, jlora.TrainState.create(a2, optax.adam(1e-3), rng=KEY), params=params, lora_config=c2,
               name=loaded.name)
    bank = B.create(params, capacity=3, rank=4, targets=("q_proj", "v_proj", "o_proj", "down_proj"),
                    fingerprint=checkpoint.fingerprint(params))
    bank = B.put_folder(B.put_folder(bank, 0, tmp_path / "peft1", loaded), 2, tmp_path / "run2", loaded)
    out = B.apply(loaded.model, params, bank, jnp.array([2, 0]), ids)
    assert max_diff(out[0], jlora.apply(loaded.model, params, a2, c2, ids)[0]) <= 1e-5
    assert max_diff(out[1], jlora.apply(loaded.model, params, a1, c1, ids)[1]) <= 1e-5
    # a run trained on another base is refused, naming that base and both fingerprints
    _, other = _tiny_hf(tmp_path, 1)
    with pytest.raises(ValueError, match=r"trained on base model '.+' \(fingerprint \w+\), not on this one "
                                         r"\(fingerprint \w+\).*--model PATH"):
        B.read_folder(tmp_path / "run2", other)
    # the bank round-trips through its folder, and a slot exports as a PEFT folder that PEFT itself runs
    B.save(tmp_path / "bank", bank)
    again = B.load(tmp_path / "bank")
    assert again.capacity == 3 and again.fingerprint == bank.fingerprint
    assert_trees_all_close(jlora.tree.leaves_by_path(again.slots), jlora.tree.leaves_by_path(bank.slots), atol=0)
    B.export_peft(again, 2, tmp_path / "slot2", loaded)
    theirs = peft.PeftModel.from_pretrained(hf_model, str(tmp_path / "slot2")).eval()
    with torch.no_grad():
        want = theirs(torch.tensor(np.asarray(ids))).logits.numpy()
    assert max_diff(jlora.apply(loaded.model, params, a2, c2, ids), want) <= 1e-4


def test_a_plain_optimizer_clips_all_slots_together_and_per_slot_each_alone():
    """What make_train_step's docstring warns of: clip_by_global_norm in a plain optimizer takes the norm of every
    slot's gradient together, so slot 0's update depends on slot 1's gradient; per_slot clips each slot alone."""
    clip = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0))
    params = {"q": {"a": jnp.zeros((2, 3, 2))}}
    g = jax.random.normal(KEY, (2, 3, 2))
    grads = [{"q": {"a": g}}, {"q": {"a": g.at[1].multiply(10.0)}}]     # slot 0 alike, slot 1 ten times larger
    for opt, coupled in ((clip, True), (B.per_slot(clip), False)):
        update = jax.jit(lambda x, opt=opt: opt.update(x, opt.init(params), params)[0]["q"]["a"][0])
        assert (max_diff(update(grads[0]), update(grads[1])) > 1e-3) == coupled


@pytest.mark.parametrize("kind", ["clip+lion", "sgd schedule", "adamw per-slot lr", "multisteps adam"])
def test_per_slot_equals_the_optimizer_run_on_each_slot_alone(kind):
    """bank.per_slot vs optax itself on each slot's slice of the factors, over steps where some slots are absent:
    per-slot global-norm clipping, step counts and schedules, per-slot learning rates and MultiSteps
    (each slot accumulates over the steps it is present in)."""
    n, steps = 3, 5
    lrs = [1e-2, 3e-2, 2e-2]
    make = {"clip+lion": lambda lr: optax.chain(optax.clip_by_global_norm(0.5), optax.lion(lr)),
            "sgd schedule": lambda lr: optax.sgd(optax.linear_schedule(lr, 0.0, 4), momentum=0.9),
            "adamw per-slot lr": lambda lr: optax.adamw(lr, weight_decay=0.1),
            "multisteps adam": lambda lr: optax.MultiSteps(optax.adam(lr), every_k_schedule=2)}[kind]
    opt = B.per_slot(make, lrs)
    keys = iter(jax.random.split(jax.random.key(0), 2 + 2 * steps))
    params = {"q": {"a": jax.random.normal(next(keys), (2, n, 5, 4)), "b": jax.random.normal(next(keys), (2, n, 4, 6))}}
    present = np.array([[1, 1, 1], [1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 1]], bool)
    grads = [jax.tree.map(lambda x, k=next(keys): jax.random.normal(k, x.shape), params) for _ in range(steps)]
    state, p = opt.init(params), params
    for i in range(steps):
        u, state = opt.update(grads[i], state, p, slots_present=jnp.asarray(present[i]))
        p = optax.apply_updates(p, u)
    for s in range(n):
        take = lambda t, s=s: jax.tree.map(lambda x: x[:, s], t)   # noqa: E731
        alone, ps = make(lrs[s]), take(params)
        st = alone.init(ps)
        for i in range(steps):
            if present[i, s]:
                u, st = alone.update(take(grads[i]), st, ps)
                ps = optax.apply_updates(ps, u)
        assert_trees_all_close(take(p), ps, atol=1e-6)
        assert not np.allclose(np.asarray(ps["q"]["a"]), np.asarray(take(params)["q"]["a"]))
    with pytest.raises(ValueError, match="3 learning rates for a bank of \\[2\\] slots"):
        opt.init(jax.tree.map(lambda x: x[:, :2], params))
    with pytest.raises(TypeError, match="function of the learning rate"):
        B.per_slot(optax.adam(1e-3), lrs)
    with pytest.raises(TypeError, match="GradientTransformation; got str"):
        B.per_slot(lambda lr: "adam", lrs).init(params)
