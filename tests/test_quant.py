"""QLoRA: NF4 against a plain numpy reference built from the published constants, memory, the quantized
transform, merge re-quantization, and a QLoRA fine-tune against plain LoRA."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from helpers import max_diff, randomize
from jlora.variants import quant
from tiny import TinyLM

# The 16 NF4 values as published (QLoRA paper appendix E / bitsandbytes).
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


def ref_dynamic_map():
    """bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8), in float64."""
    data = []
    for i in range(7):
        bounds = np.linspace(0.1, 1, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / 2
        data += list(10.0 ** (-6 + i) * means) + list(-(10.0 ** (-6 + i)) * means)
    return np.sort(np.array(data + [0.0, 1.0])).astype(np.float32)


def ref_nearest(x, code):
    """Nearest code index by exact (float64) distance; ties to the lower index."""
    d = np.abs(x.astype(np.float64)[..., None] - code.astype(np.float64))
    return np.argmin(d, axis=-1)


def ref_blocks(x, block):
    x = x.reshape(-1)
    x = np.concatenate([x, np.zeros(-x.size % block, x.dtype)]).reshape(-1, block)
    absmax = np.abs(x).max(axis=1)
    norm = np.where(absmax[:, None] > 0, x / np.where(absmax > 0, absmax, 1)[:, None], 0).astype(np.float32)
    return norm, absmax.astype(np.float32)


def ref_quantize(w, double_quant=False, offset=None):
    """Plain numpy NF4 of one 2-D kernel: codes (packed bytes), fp32 absmax, or the double-quantized parts."""
    norm, absmax = ref_blocks(np.asarray(w, np.float32), 64)
    idx = ref_nearest(norm, NF4).reshape(-1).astype(np.uint8)
    packed = (idx[0::2] << 4) | idx[1::2]
    if not double_quant:
        return packed, absmax, None, None
    offset = np.float32(absmax.astype(np.float64).mean()) if offset is None else offset
    norm2, scale = ref_blocks(absmax - offset, 256)
    q2 = ref_nearest(norm2, ref_dynamic_map()).reshape(-1)[:absmax.size].astype(np.uint8)
    return packed, q2, scale, offset


def ref_dequantize(packed, absmax, shape, scale=None, offset=None):
    if scale is not None:
        dm = ref_dynamic_map()
        padded = np.concatenate([absmax, np.zeros(-absmax.size % 256, np.uint8)])
        absmax = ((dm[padded].reshape(-1, 256) * scale[:, None]).reshape(-1)[:absmax.size] + offset)
        absmax = absmax.astype(np.float32)
    idx = np.stack([packed >> 4, packed & 15], axis=-1).reshape(-1, 64)
    vals = (NF4[idx] * absmax[:, None]).astype(np.float32).reshape(-1)
    return vals[:int(np.prod(shape))].reshape(shape)


def _weights():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((96, 200)) * 0.05).astype(np.float32)
    w[:1, :64] = 0.0                                 # an all-zero block
    w[5, 7] = 0.9                                    # an outlier
    return w


def test_nf4_matches_numpy_reference_bit_for_bit():
    assert np.array_equal(quant.NF4_CODE, NF4)
    for shape in [(96, 200), (7, 9)]:                # 9 is not a multiple of 64: padded last block
        w = _weights()[: shape[0], : shape[1]]
        q = quant.quantize_array(jnp.asarray(w))
        packed, absmax, _, _ = ref_quantize(w)
        assert q.codes.dtype == jnp.uint8 and q.codes.shape == packed.shape
        np.testing.assert_array_equal(np.asarray(q.codes), packed)
        np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
        np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), ref_dequantize(packed, absmax, shape))


def test_double_quant_matches_numpy_reference():
    assert np.array_equal(quant.DYNAMIC_MAP, ref_dynamic_map())
    w = np.tile(_weights(), (1, 4))                   # 76,800 values: 1,200 blocks -> 5 double-quant blocks
    q = quant.quantize_array(jnp.asarray(w), double_quant=True)
    # the offset is a mean (fp32 summation order is unspecified): equal to float64's within 1e-6 relative ...
    offset = np.asarray(q.absmax_offset)
    _, _, _, ref_offset = ref_quantize(w, double_quant=True)
    np.testing.assert_allclose(offset, ref_offset, rtol=1e-6)
    # ... and given it, everything is bit for bit
    packed, q2, scale, _ = ref_quantize(w, double_quant=True, offset=offset)
    np.testing.assert_array_equal(np.asarray(q.codes), packed)
    np.testing.assert_array_equal(np.asarray(q.absmax), q2)
    np.testing.assert_array_equal(np.asarray(q.absmax_scale), scale)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), ref_dequantize(packed, q2, w.shape, scale, offset))


def test_dynamic_map_is_bitsandbytes_within_one_ulp():
    import torch
    data = []   # bitsandbytes' create_dynamic_map as published, fp32 torch.linspace included
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + ((-(10 ** (-6 + i))) * means).tolist()
    bnb = np.sort(np.array(data + [0.0, 1.0], np.float32))
    np.testing.assert_array_max_ulp(quant.DYNAMIC_MAP, bnb, maxulp=1)


def test_stacked_kernels_quantize_per_layer():
    w = jnp.asarray(np.stack([_weights()[:64, :64], 2 * _weights()[:64, :64]]))
    q = quant.quantize_array(w, double_quant=True)
    assert q.shape == (2, 64, 64) and q.codes.shape == (2, 2048) and q.absmax_offset.shape == (2,)
    for i in range(2):
        one = quant.quantize_array(w[i], double_quant=True)
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda x: x[i], q), one)


def test_quantized_params_take_under_0_3_of_bf16():
    model = TinyLM(vocab=64, dim=256, heads=4, layers=2, multi_axis=False, tied=False)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    for dq, bound in ((False, 0.3), (True, 0.27)):
        q = jlora.quantize(params, double_quant=dq)
        paths = [p for p, v in jlora.tree.flatten(q).items() if quant.is_quantized(v)]
        assert len(paths) == 12 and "lm_head/kernel" not in paths
        qs = [jlora.tree.flatten(q)[p] for p in paths]
        bf16 = [jnp.asarray(jlora.tree.flatten(params)[p], jnp.bfloat16) for p in paths]

        def arg_bytes(tree):
            compiled = jax.jit(lambda t: jax.tree.map(lambda x: x.ravel()[:1], t)).lower(tree).compile()
            return compiled.memory_analysis().argument_size_in_bytes

        ratio = arg_bytes(qs) / arg_bytes(bf16)
        print(f"double_quant={dq}: quantized / bf16 bytes = {ratio:.3f}")
        assert ratio <= bound


@pytest.mark.slow   # a compiled-memory figure (~12 s); the quantized forward/backward stay in `make test`
def test_no_full_precision_kernel_outlives_its_layer():
    """XLA's temp memory of a QLoRA forward and gradient stays at about one layer's decoded kernels."""
    ids = jnp.zeros((1, 8), jnp.int32)
    temps = {}
    for layers in (1, 4):
        model = TinyLM(vocab=64, dim=256, heads=4, layers=layers, multi_axis=False, tied=False)
        params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
        q = jlora.quantize(params)
        cfg = jlora.LoraConfig(rank=4, targets="q_proj")
        ad = jlora.init(q, cfg, key=jax.random.key(1))
        loss = lambda a, p: jnp.sum(jlora.apply(model, p, a, cfg, ids))  # noqa: E731
        temps[layers] = [jax.jit(f).lower(ad, q).compile().memory_analysis().temp_size_in_bytes
                         for f in (loss, jax.grad(loss))]
        decoded = sum(4 * v.size for p, v in jlora.tree.flatten(params).items()
                      if quant.is_quantized(jlora.tree.flatten(q)[p]))
    per_layer = decoded // 4
    print(f"temp bytes (forward, grad): 1 layer {temps[1]}, 4 layers {temps[4]}; fp32 kernels {decoded}")
    # three more layers add less than one layer's decoded kernels (activations only), and the whole is small
    assert all(t4 - t1 < per_layer for t1, t4 in zip(temps[1], temps[4]))
    assert max(temps[4]) <= 0.25 * decoded


def test_qlora_gradients_equal_those_on_the_dequantized_base():
    model = TinyLM(vocab=64, dim=64, heads=2, layers=2, multi_axis=False, tied=False, scan=True)
    ids = jax.random.randint(jax.random.key(3), (2, 8), 0, 64)
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]     # the custom backward under nn.scan
    lay = jlora.layout(model, ids)
    q = jlora.quantize(params, layout=lay, double_quant=True)
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=("q_proj", "up_proj"))
    ad = randomize(jlora.init(q, cfg, key=jax.random.key(1), layout=lay), jax.random.key(2), 0.2)
    loss = lambda a, p: jlora.lm_loss(lambda *x: jlora.apply(model, p, a, cfg, *x), {"input_ids": ids})[0]  # noqa
    g_q = jax.jit(jax.grad(loss))(ad, q)
    g_d = jax.jit(jax.grad(loss))(ad, quant.dequantize_params(q))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5), g_q, g_d)


def _model_and_params(scan=False):
    model = TinyLM(vocab=64, dim=64, heads=4, layers=2, multi_axis=False, tied=False, scan=scan)
    ids = jax.random.randint(jax.random.key(3), (4, 16), 0, 64)
    return model, ids, jax.jit(model.init)(jax.random.key(0), ids)["params"]


@pytest.mark.slow
def test_quantized_transform_equals_dequantized_model():
    model, ids, params = _model_and_params()
    q = jlora.quantize(params, double_quant=True)
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "down_proj"))
    ad = randomize(jlora.init(q, cfg, key=jax.random.key(1)), jax.random.key(2), 0.2)
    deq = quant.dequantize_params(q)
    got = jax.jit(lambda p, a: jlora.apply(model, p, a, cfg, ids))(q, ad)
    assert max_diff(got, model.apply({"params": jlora.merge(deq, ad, cfg)}, ids)) <= 1e-5
    # the quantization error is real but small, and reported
    err = quant.error(params, q)
    assert 0 < err["total"]["rel_fro"] < 0.15 and set(err) > {"layers_0/q_proj/kernel", "total"}
    # plain model.apply cannot run NF4 kernels
    with pytest.raises(Exception):
        model.apply({"params": q}, ids)


def test_one_bad_row_or_an_empty_batch_through_an_nf4_layer_is_what_the_dequantized_layer_gives():
    """The NF4 layer's decoding depends on one input value (to keep XLA from hoisting it): a non-finite value
    there must not spoil the kernel for the other rows, and an empty batch has no value to read."""
    model = nn.Dense(64)
    x = jax.random.normal(jax.random.key(0), (4, 64))
    params = model.init(jax.random.key(1), x)["params"]
    q = jlora.quantize(params, targets="kernel", exclude=())
    cfg = jlora.LoraConfig(rank=4, targets="kernel")
    ad = randomize(jlora.init(q, cfg, key=jax.random.key(2)), jax.random.key(3), 0.2)
    merged = {"params": jlora.merge(quant.dequantize_params(q), ad, cfg)}
    for bad in (x.at[0, 0].set(jnp.inf), x.at[0, 0].set(jnp.nan), jnp.zeros((0, 64))):
        got, want = jlora.apply(model, q, ad, cfg, bad), model.apply(merged, bad)
        assert got.shape == want.shape
        np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
        np.testing.assert_allclose(got[1:], want[1:], atol=1e-5)


@pytest.mark.slow   # ~7 s; scanned layers are in test_models, QLoRA in the other tests here
def test_quantized_scanned_model():
    model, ids, params = _model_and_params(scan=True)
    lay = jlora.layout(model, ids)
    q = jlora.quantize(params, layout=lay)
    assert q["layers"]["q_proj"]["kernel"].codes.shape[0] == 2
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets="v_proj")
    ad = randomize(jlora.init(q, cfg, key=jax.random.key(1), layout=lay), jax.random.key(2), 0.2)
    want = model.apply({"params": jlora.merge(quant.dequantize_params(q), ad, cfg, layout=lay)}, ids)
    assert max_diff(jlora.apply(model, q, ad, cfg, ids), want) <= 1e-5


def test_merge_into_quantized_base_requantizes_and_reports_error():
    model, ids, params = _model_and_params()
    q = jlora.quantize(params)
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "up_proj"))
    ad = randomize(jlora.init(q, cfg, key=jax.random.key(1)), jax.random.key(2), 0.2)
    merged = jlora.merge(q, ad, cfg)
    k = merged["layers_0"]["q_proj"]["kernel"]
    assert quant.is_quantized(k) and k.shape == q["layers_0"]["q_proj"]["kernel"].shape
    exact = jlora.merge(quant.dequantize_params(q), ad, cfg)
    err = quant.error(exact, merged)
    assert 0 < err["total"]["rel_fro"] < 0.15
    np.testing.assert_array_equal(np.asarray(quant.dequantize(k)),
                                  np.asarray(quant.dequantize(quant.quantize_array(
                                      exact["layers_0"]["q_proj"]["kernel"]))))
    # unadapted quantized kernels are untouched
    assert merged["layers_0"]["k_proj"]["kernel"] is q["layers_0"]["k_proj"]["kernel"]


@pytest.mark.slow
def test_qlora_finetune_lowers_loss_like_lora():
    model, ids, params = _model_and_params()
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))

    def finetune(base):
        opt = optax.adam(2e-2)
        state = jlora.TrainState.create(jlora.init(base, cfg, key=jax.random.key(1)), opt, rng=jax.random.key(2))
        step = jax.jit(jlora.make_train_step(model, cfg, opt), donate_argnums=0)
        losses = []
        for _ in range(60):
            state, metrics = step(state, base, {"input_ids": ids})
            losses.append(float(metrics["loss"]))
        return losses

    lora, qlora = finetune(params), finetune(jlora.quantize(params, double_quant=True))
    drop, qdrop = lora[0] - lora[-1], qlora[0] - qlora[-1]
    print(f"LoRA loss {lora[0]:.3f} -> {lora[-1]:.3f}; QLoRA {qlora[0]:.3f} -> {qlora[-1]:.3f}")
    assert drop > 0.5 * lora[0]
    assert qdrop >= 0.9 * drop


def test_quantized_non_dense_kernel_is_an_error():
    model = nn.DenseGeneral((2, 32), axis=-1)
    x = jnp.ones((1, 64))
    params = model.init(jax.random.key(0), x)["params"]
    q = jlora.quantize(params)
    with pytest.raises(ValueError, match="belongs to a DenseGeneral layer.*nn.Dense layers only"):
        jlora.apply(model, q, {}, jlora.LoraConfig(targets="kernel"), x)
    with pytest.raises(ValueError, match="selected no kernel"):
        jlora.quantize(params, layout=jlora.layout(model, x))
