"""PEFT folders for your own Flax ports of PyTorch models (jlora.peft.TorchModel): a small torch CNN (Conv1d and
Conv2d with stride, padding, dilation, groups, depthwise) and a torch MLP, against PEFT both ways."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.adapter import adapter_items

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

NAMES = {"c1/kernel": "features.0", "c2/kernel": "features.2", "dw/kernel": "features.3", "t1/kernel": "seq.conv",
         "fc/kernel": "head"}


class TorchCNN(torch.nn.Module):
    def __init__(self, dilation=1):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(4, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 8, 3, padding=dilation, dilation=dilation, groups=2),
            torch.nn.Conv2d(8, 8, 3, padding=1, groups=8))                      # depthwise
        self.seq = torch.nn.Module()
        self.seq.conv = torch.nn.Conv1d(3, 6, 5, stride=2, padding=2, groups=3)
        self.head = torch.nn.Linear(8 + 6, 3)

    def forward(self, image, signal):     # NCHW and NCL, as PyTorch
        h = self.features(image).mean((-2, -1))
        s = self.seq.conv(signal).mean(-1)
        return self.head(torch.cat([h, s], -1))


class FlaxCNN(nn.Module):
    """The port: channels last, the same geometry."""
    dilation: int = 1

    @nn.compact
    def __call__(self, image, signal):
        d = self.dilation
        h = nn.relu(nn.Conv(8, (3, 3), strides=2, padding=1, name="c1")(image))
        h = nn.Conv(8, (3, 3), padding=d, kernel_dilation=d, feature_group_count=2, name="c2")(h)
        h = nn.Conv(8, (3, 3), padding=1, feature_group_count=8, name="dw")(h).mean((-3, -2))
        s = nn.Conv(6, (5,), strides=2, padding=2, feature_group_count=3, name="t1")(signal).mean(-2)
        return nn.Dense(3, name="fc")(jnp.concatenate([h, s], -1))


def _port(torch_model):
    """The torch model's weights as the Flax port's params."""
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    params = {}
    for path, module in NAMES.items():
        w = state[f"{module}.weight"]
        kernel = w.T if w.ndim == 2 else w.transpose(*range(2, w.ndim), 1, 0)
        params[path.split("/")[0]] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(state[f"{module}.bias"])}
    return params


def _inputs():
    rng = np.random.RandomState(0)
    return rng.normal(size=(2, 4, 9, 9)).astype(np.float32), rng.normal(size=(2, 3, 12)).astype(np.float32)


def _both(dilation=1):
    torch.manual_seed(0)
    torch_model = TorchCNN(dilation).eval()
    image, signal = _inputs()
    x = (jnp.asarray(image.transpose(0, 2, 3, 1)), jnp.asarray(signal.transpose(0, 2, 1)))
    model = FlaxCNN(dilation)
    params = _port(torch_model)
    assert np.abs(np.asarray(model.apply({"params": params}, *x)) -
                  torch_model(torch.from_numpy(image), torch.from_numpy(signal)).detach().numpy()).max() < 1e-5
    layout = jlora.layout(model, *x)
    return torch_model, (image, signal), model, params, x, jlora.peft.TorchModel(params, NAMES, layout, "torch-cnn")


CFG = jlora.LoraConfig(rank=4, alpha=8, targets=("c1", "c2", "dw", "t1", "fc"),
                       rank_pattern={"dw": 8, "t1": 3, "fc": 2})


def _random_adapters(params, cfg=CFG, *, layout=None, seed=0, scale=0.2, x_shape=None):
    """Adapters of ``cfg`` on ``params`` with random factors of about ``scale`` (B too), from one seeded numpy
    stream, so both frameworks see the same numbers; with ``x_shape``, also an input drawn next: (adapters, x)."""
    rng = np.random.RandomState(seed)
    made = jax.eval_shape(lambda: jlora.init(params, cfg, key=jax.random.key(0), layout=layout))
    adapters = jax.tree.map(lambda s: jnp.asarray(scale * rng.normal(size=s.shape), jnp.float32), made)
    return adapters if x_shape is None else (adapters, rng.normal(size=x_shape).astype(np.float32))


def _torch_out(torch_model, inputs):
    with torch.no_grad():
        return torch_model(*map(torch.from_numpy, inputs)).numpy()


def test_conv_export_equals_peft_and_imports_back(tmp_path):
    torch_model, inputs, model, params, x, tm = _both()
    adapters = _random_adapters(params, layout=tm.layout)
    ours = np.asarray(jlora.apply(model, params, adapters, CFG, *x))
    jlora.peft.save(tmp_path, adapters, CFG, tm)
    peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path)).eval()
    assert np.abs(_torch_out(peft_model, inputs) - _torch_out(TorchCNN().eval(), inputs)).max() > 1e-2
    np.testing.assert_allclose(_torch_out(peft_model, inputs), ours, atol=1e-5, rtol=0)
    a_dw = peft_model.base_model.model.features[3].lora_A["default"].weight
    assert tuple(a_dw.shape) == (8, 8, 3, 3)                 # PEFT's layout: (r, in, *k), zero outside the groups
    loaded, cfg = jlora.peft.load(tmp_path, tm)
    assert jax.tree.map(jnp.shape, loaded) == jax.tree.map(jnp.shape, adapters)
    np.testing.assert_allclose(np.asarray(jlora.apply(model, params, loaded, cfg, *x)), ours, atol=1e-5, rtol=0)
    merged = jlora.merge(params, adapters, CFG)           # PEFT refuses to merge groups > 1; jlora merges exactly
    np.testing.assert_allclose(np.asarray(model.apply({"params": merged}, *x)), ours, atol=1e-5, rtol=0)


def test_peft_trained_conv_adapter_loads_and_cross_group_a_is_refused(tmp_path):
    torch_model, inputs, model, params, x, tm = _both()
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(NAMES.values()), init_lora_weights=False,
                           rank_pattern={"features.3": 8, "seq.conv": 3, "head": 2})
    pm = peft.get_peft_model(torch_model, lcfg).eval()
    with torch.no_grad():      # jlora's grouped A sees its group's inputs only: make PEFT's A block-diagonal
        for conv, g in ((pm.base_model.model.features[2], 2), (pm.base_model.model.features[3], 8),
                        (pm.base_model.model.seq.conv, 3)):
            a = conv.lora_A["default"].weight
            r, n_in = a.shape[:2]
            mask = torch.zeros_like(a)
            for j in range(g):
                mask[j * r // g:(j + 1) * r // g, j * n_in // g:(j + 1) * n_in // g] = 1
            a.mul_(mask)
    pm.save_pretrained(str(tmp_path))
    adapters, cfg = jlora.peft.load(tmp_path, tm)
    assert {p: n.rank for p, n in adapter_items(adapters)} == {"c1/kernel": 4, "c2/kernel": 4, "dw/kernel": 8,
                                                                "t1/kernel": 3, "fc/kernel": 2}
    np.testing.assert_allclose(np.asarray(jlora.apply(model, params, adapters, cfg, *x)), _torch_out(pm, inputs),
                               atol=1e-5, rtol=0)
    with torch.no_grad():
        pm.base_model.model.features[2].lora_A["default"].weight.add_(0.1)
    pm.save_pretrained(str(tmp_path / "dense"))
    with pytest.raises(ValueError, match=r"features.2: PEFT's lora_A of this grouped convolution \(groups=2\) "
                                         r"connects rank channels to inputs of other groups"):
        jlora.peft.load(tmp_path / "dense", tm)


def test_dilated_conv_exports_for_peft_merge_only(tmp_path):
    torch_model, inputs, model, params, x, tm = _both(dilation=2)
    adapters = _random_adapters(params, layout=tm.layout, seed=1)
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=("c2",))
    adapters = {"c2": adapters["c2"]}
    with pytest.raises(ValueError, match=r"'c2/kernel' .* kernel_dilation \(2, 2\): PEFT 0.21 builds lora_A "
                                         r"without the base layer's dilation.*merge_only=True"):
        jlora.peft.save(tmp_path, adapters, cfg, tm)
    jlora.peft.save(tmp_path, adapters, cfg, tm, merge_only=True)
    base_state = {k: v.clone() for k, v in torch_model.state_dict().items()}
    # PEFT cannot merge groups > 1; its delta for the weights jlora wrote, added to the kernel by hand:
    peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path)).eval()
    layer = peft_model.base_model.model.features[2]
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    dense = torch.nn.functional.conv2d(a.transpose(0, 1), b, groups=2)       # (in, out, k, k) for the full conv
    per_group = dense.shape[0] // 2
    delta = torch.cat([dense[j * per_group:(j + 1) * per_group, j * 4:(j + 1) * 4] for j in range(2)], 1)
    fresh = TorchCNN(dilation=2).eval()
    fresh.load_state_dict(base_state)
    with torch.no_grad():
        fresh.features[2].weight.add_(2.0 * delta.transpose(0, 1))
    ours = np.asarray(jlora.apply(model, params, adapters, cfg, *x))
    np.testing.assert_allclose(_torch_out(fresh, inputs), ours, atol=1e-5, rtol=0)
    back, cfg2 = jlora.peft.load(tmp_path, tm)
    np.testing.assert_allclose(np.asarray(jlora.apply(model, params, back, cfg2, *x)), ours, atol=1e-5, rtol=0)


class TorchMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(approximate="tanh"),
                                       torch.nn.Linear(16, 5))
        self.proj = torch.nn.Linear(5, 2)   # (not "out": PEFT matches modules_to_save by suffix, as "lora_dropout")

    def forward(self, x):
        return self.proj(self.net(x))


class FlaxMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(nn.Dense(16, name="up")(x), approximate=True)
        return nn.Dense(2, name="out")(nn.Dense(5, name="down")(h))


def test_mlp_port_round_trips_with_peft(tmp_path):
    torch.manual_seed(0)
    torch_model = TorchMLP().eval()
    names = {"up/kernel": "net.0", "down/kernel": "net.2", "out/kernel": "proj"}.get      # a function works too
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    params = {p: {"kernel": jnp.asarray(state[f"{m}.weight"].T), "bias": jnp.asarray(state[f"{m}.bias"])}
              for p, m in (("up", "net.0"), ("down", "net.2"), ("out", "proj"))}
    tm = jlora.peft.TorchModel(params, names, name="torch-mlp")
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=("up", "down"), modules_to_save=("out",))
    adapters, x = _random_adapters(params, cfg, scale=0.3, x_shape=(3, 6))
    ours = np.asarray(jlora.apply(FlaxMLP(), params, adapters, cfg, jnp.asarray(x)))
    jlora.peft.save(tmp_path, adapters, cfg, tm)
    peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path)).eval()
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
    back, cfg2 = jlora.peft.load(tmp_path, tm)
    np.testing.assert_allclose(np.asarray(jlora.apply(FlaxMLP(), params, back, cfg2, jnp.asarray(x))), ours,
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"adapter at 'up/kernel' has no PyTorch module name in the TorchModel"):
        jlora.peft.save(tmp_path / "x", adapters, cfg, jlora.peft.TorchModel(params, {"down/kernel": "net.2"}))


class TorchNested(torch.nn.Module):
    """``proj`` and ``block.proj``: one module name is the dotted tail of another's."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.block = torch.nn.Module()
        self.block.proj = torch.nn.Linear(4, 4)
        self.other = torch.nn.Linear(4, 4)

    def forward(self, x):
        return self.other(self.block.proj(self.proj(x)))


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="proj")(x)


class FlaxNested(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(4, name="other")(_Block(name="block")(nn.Dense(4, name="proj")(x)))


def test_pattern_keys_select_one_module_when_a_name_ends_another(tmp_path):
    """An alpha for ``proj`` alone: the key ``proj`` would also select ``block.proj`` in PEFT (its keys match any
    dotted tail), so export anchors it; PEFT and the re-import get each module's own scale."""
    torch.manual_seed(0)
    torch_model = TorchNested().eval()
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    layer = lambda m: {"kernel": jnp.asarray(state[f"{m}.weight"].T), "bias": jnp.asarray(state[f"{m}.bias"])}  # noqa: E731
    params = {"proj": layer("proj"), "block": {"proj": layer("block.proj")}, "other": layer("other")}
    tm = jlora.peft.TorchModel(params, {"proj/kernel": "proj", "block/proj/kernel": "block.proj",
                                        "other/kernel": "other"})
    cfg = jlora.LoraConfig(rank=2, alpha=8.0, targets=("proj", "other"), alpha_pattern={"^proj/": 2.0})
    adapters, x = _random_adapters(params, cfg, scale=0.5, x_shape=(3, 4))
    ours = np.asarray(jlora.apply(FlaxNested(), params, adapters, cfg, jnp.asarray(x)))
    jlora.peft.save(tmp_path, adapters, cfg, tm)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["alpha_pattern"] == {"^proj": 2.0}
    peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path)).eval()
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
    back, cfg2 = jlora.peft.load(tmp_path, tm)
    assert [cfg2.scale(p) for p in ("proj/kernel", "block/proj/kernel", "other/kernel")] == [1.0, 4.0, 4.0]


class _Stack(nn.Module):
    """A scanned stack of Dense layers (params with a leading layer axis), ported from a torch ModuleList."""

    @nn.compact
    def __call__(self, x):
        def body(mdl, h, _):
            return jnp.tanh(nn.Dense(4, name="fc")(h)), None

        return nn.scan(body, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True}, length=3)(
            self, x, None)[0]


def test_scanned_stack_names_each_layer(tmp_path):
    torch.manual_seed(0)
    layers = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(3)])
    x = np.random.RandomState(0).normal(size=(2, 4)).astype(np.float32)
    model = _Stack()
    params = {"fc": {"kernel": jnp.stack([jnp.asarray(m.weight.detach().numpy().T) for m in layers]),
                     "bias": jnp.stack([jnp.asarray(m.bias.detach().numpy()) for m in layers])}}
    tm = jlora.peft.TorchModel(params, {"fc/kernel": "layers.{layer}"}, jlora.layout(model, jnp.asarray(x)))
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets="fc")
    made = jax.eval_shape(lambda: jlora.init(params, cfg, key=jax.random.key(0), layout=tm.layout))
    rng = np.random.RandomState(1)
    adapters = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32), made)
    ours = np.asarray(jlora.apply(model, params, adapters, cfg, jnp.asarray(x)))

    class Torch(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = layers

        def forward(self, h):
            for m in self.layers:
                h = torch.tanh(m(h))
            return h

    jlora.peft.save(tmp_path, adapters, cfg, tm)
    assert sorted(json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]) == \
        ["layers.0", "layers.1", "layers.2"]
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(Torch(), str(tmp_path)).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
    back, cfg2 = jlora.peft.load(tmp_path, tm)
    np.testing.assert_allclose(np.asarray(jlora.apply(model, params, back, cfg2, jnp.asarray(x))), ours, atol=1e-5,
                               rtol=0)


def test_nnx_port_exports_to_peft(tmp_path):
    """An NNX port of the torch MLP: its adapters have the same path strings, so the same TorchModel serves."""
    from flax import nnx

    class NnxMLP(nnx.Module):
        def __init__(self, rngs):
            self.up, self.down, self.out = (nnx.Linear(6, 16, rngs=rngs), nnx.Linear(16, 5, rngs=rngs),
                                            nnx.Linear(5, 2, rngs=rngs))

        def __call__(self, x):
            return self.out(self.down(nn.gelu(self.up(x), approximate=True)))

    torch.manual_seed(0)
    torch_model = TorchMLP().eval()
    state = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    model = NnxMLP(nnx.Rngs(0))
    for name, module in (("up", "net.0"), ("down", "net.2"), ("out", "proj")):
        getattr(model, name).kernel.set_value(jnp.asarray(state[f"{module}.weight"].T))
        getattr(model, name).bias.set_value(jnp.asarray(state[f"{module}.bias"]))
    params = jlora.nnx.params(model)
    tm = jlora.peft.TorchModel(params, {"up/kernel": "net.0", "down/kernel": "net.2", "out/kernel": "proj"})
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=("up", "down"))
    rng = np.random.RandomState(1)
    made = jax.eval_shape(lambda: jlora.init(model, cfg, key=jax.random.key(0)))
    adapters = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.normal(size=s.shape), jnp.float32), made)
    x = rng.normal(size=(3, 6)).astype(np.float32)
    ours = np.asarray(jlora.apply(model, params, adapters, cfg, jnp.asarray(x)))
    jlora.peft.save(tmp_path, adapters, cfg, tm)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(torch_model, str(tmp_path)).eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
    back, cfg2 = jlora.peft.load(tmp_path, tm)
    np.testing.assert_allclose(np.asarray(jlora.apply(model, params, back, cfg2, jnp.asarray(x))), ours, atol=1e-5)
