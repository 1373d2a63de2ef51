"""jlora.compose against PEFT's add_weighted_adapter (every combination type), and stacking against merged sums.

The PEFT side is built from a tiny random transformers model: three PEFT LoRA adapters with random A and B
(init_lora_weights=False), different alphas, targets, rsLoRA and (for cat/svd) ranks, saved and loaded into jlora.
PEFT's add_weighted_adapter then makes the combined adapter, and every module's update (get_delta_weight) must
equal jlora's ``scale * A @ B`` at that path. DARE draws random masks: PEFT's are recorded as it draws them and fed
to jlora's mask function, so both prune the same entries.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from peft.utils import merge_utils

import jlora
from jlora import compose, models

WEIGHTS = [0.7, -0.4, 1.3]
# name -> (r, alpha, targets, use_rslora, rank_pattern); the first uses no rsLoRA (PEFT copies the first's flag)
SAME_RANK = {
    "t1": (4, 8, ["q_proj", "v_proj", "down_proj", "embed_tokens"], False, {}),
    "t2": (4, 3, ["q_proj", "v_proj", "o_proj"], True, {}),
    "t3": (4, 16, ["q_proj", "down_proj", "embed_tokens"], False, {}),
}
MIXED_RANK = {
    "t1": (2, 8, ["q_proj", "v_proj", "down_proj", "embed_tokens"], False, {}),
    "t2": (4, 3, ["q_proj", "v_proj", "o_proj"], True, {"v_proj": 3}),
    "t3": (3, 16, ["q_proj", "down_proj", "embed_tokens"], False, {}),
}
GPT2 = {
    "t1": (2, 8, ["c_attn", "c_fc"], False, {}),
    "t2": (4, 3, ["c_attn", "c_proj"], False, {}),
}
EQUAL_RANK_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DARE = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")


def _hf(kind, folder):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                                       intermediate_size=64, num_key_value_heads=2)
    else:
        cfg = transformers.GPT2Config(vocab_size=96, n_embd=32, n_head=4, n_layer=2, n_positions=64)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(folder)
    return model


class PeftSet:
    """A PeftModel holding the adapters of ``spec``, and the same adapters loaded into jlora."""

    def __init__(self, kind, spec, tmp):
        model = _hf(kind, tmp / kind)
        self.folder = tmp / kind
        self.loaded = jlora.hf.load(self.folder)
        self.names = list(spec)
        torch.manual_seed(1)
        pm = None
        for name, (r, alpha, targets, rslora, pattern) in spec.items():
            c = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                                rank_pattern=pattern, init_lora_weights=False)
            if pm is None:
                pm = peft.get_peft_model(model, c, adapter_name=name)
            else:
                pm.add_adapter(name, c)
        with torch.no_grad():   # updates of LoRA's usual size (~0.1), as the tolerance is absolute
            for pname, p in pm.named_parameters():
                if "lora_" in pname:
                    p.mul_(0.03 if "lora_embedding" in pname else 0.3)  # N(0, 1) embedding factors: shrink more
        self.model = pm.eval()
        self.adapter_folders = []
        for name in self.names:
            pm.save_pretrained(tmp / f"{kind}-peft", selected_adapters=[name], save_embedding_layers=False)
            self.adapter_folders.append(tmp / f"{kind}-peft" / name)
        self.items = [jlora.peft.load(f, self.loaded) for f in self.adapter_folders]
        self.table = models.hf_module_table(self.loaded.family, self.loaded.config)

    def scanned(self):
        """The same model and adapters loaded with the layers in one nn.scan (a leading layer axis)."""
        other = object.__new__(PeftSet)
        other.loaded = jlora.hf.load(self.folder, scan_layers=True)
        other.items = [jlora.peft.load(f, other.loaded) for f in self.adapter_folders]
        other.table = models.hf_module_table(other.loaded.family, other.loaded.config)
        return other

    def peft_deltas(self, adapter):
        """HF module name -> the adapter's update in jlora's kernel layout, from PEFT."""
        out = {}
        for name, module in self.model.named_modules():
            if isinstance(module, peft.tuners.lora.LoraLayer) and (adapter in module.lora_A
                                                                  or adapter in module.lora_embedding_A):
                d = module.get_delta_weight(adapter).detach().numpy()
                module_name = name.removeprefix("base_model.model.")
                path, _ = self.table[module_name]
                fan_in_fan_out = getattr(module, "fan_in_fan_out", False)
                out[module_name] = d if models.module_kind(path) == "embedding" or fan_in_fan_out else d.T
        return out

    def jlora_deltas(self, adapters, cfg):
        """HF module name -> jlora's update ``scale * A @ B`` (per layer of a scanned stack)."""
        out = {}
        by_path = {v: k for k, v in self.table.items()}
        for path, node in jlora.adapter.adapter_items(adapters):
            d = cfg.scale(path) * np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)
            if d.ndim == 2:
                out[by_path[(path, None)]] = d
            else:
                for layer in range(d.shape[0]):
                    out[by_path[(path, layer)]] = d[layer]
        return out


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compose")
    return {"same": PeftSet("llama", SAME_RANK, tmp / "same"), "mixed": PeftSet("llama", MIXED_RANK, tmp / "mixed"),
            "gpt2": PeftSet("gpt2", GPT2, tmp / "gpt2")}


class SharedMasks:
    """Records each mask PEFT's DARE draws (with the tensor it prunes) and serves it to jlora's mask function."""

    def __init__(self, monkeypatch):
        self.drawn = []
        self.used = 0
        original = merge_utils.random_pruning

        def recording(tensor, density, rescale):
            mask = torch.bernoulli(torch.full_like(tensor, density))
            self.drawn.append((tensor.detach().numpy().astype(np.float64), mask.numpy()))
            pruned = tensor * mask
            return pruned / density if rescale else pruned

        assert original.__code__.co_varnames[:3] == ("tensor", "density", "rescale")
        monkeypatch.setattr(merge_utils, "random_pruning", recording)
        monkeypatch.setattr(compose, "_keep_mask", self.lookup)

    def lookup(self, key, density, x):
        x = np.asarray(x, np.float64)
        for tensor, mask in self.drawn:
            for t, m in ((tensor, mask), (tensor.T, mask.T)):
                if t.shape == x.shape and np.allclose(t, x, atol=1e-5, rtol=1e-5):
                    self.used += 1
                    return jnp.asarray(m, x.dtype if x.dtype != np.float64 else jnp.float32)
        raise AssertionError(f"PEFT drew no mask for a tensor of shape {x.shape}")


def _compare(s, name, ours, cfg):
    theirs = s.peft_deltas(name)
    mine = s.jlora_deltas(ours, cfg)
    assert sorted(mine) == sorted(theirs)
    for module in theirs:
        assert np.abs(theirs[module]).max() > 1e-3, module
        np.testing.assert_allclose(mine[module], theirs[module], atol=1e-5, rtol=0, err_msg=f"{name}: {module}")


def _canonical_svd(svd):
    """``torch.linalg.svd`` with jlora's sign convention: each row of Vh has its largest-magnitude entry > 0."""
    def canonical(*args, **kwargs):
        u, s, vh = svd(*args, **kwargs)
        p = min(u.shape[-2], vh.shape[-1])
        top = torch.gather(vh[..., :p, :], -1, vh[..., :p, :].abs().argmax(dim=-1, keepdim=True))
        sign = torch.where(top < 0, -1.0, 1.0)                                  # (p, 1)
        u, vh = u.clone(), vh.clone()
        u[..., :, :p] *= sign.transpose(-1, -2)
        vh[..., :p, :] *= sign
        return u, s, vh

    return canonical


CASES = ([("same", m, {}) for m in EQUAL_RANK_TYPES]
         + [("mixed", m, {}) for m in ("cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd",
                                       "magnitude_prune_svd")]
         + [("same", "ties", {"majority_sign_method": "frequency", "density": 0.3}),
            ("mixed", "dare_ties_svd", {"majority_sign_method": "frequency"}),
            ("mixed", "svd", {"svd_rank": 3}),
            ("mixed", "svd", {"svd_full_matrices": False}),
            ("mixed", "svd", {"svd_rank": 4, "svd_clamp": 0.9}),
            ("mixed", "ties_svd", {"svd_rank": 2, "svd_clamp": 0.95, "density": 0.7}),
            ("gpt2", "svd", {}), ("gpt2", "cat", {}), ("gpt2", "magnitude_prune_svd", {})])


@pytest.mark.parametrize("which,method,extra", CASES,
                         ids=[f"{w}-{m}-{'-'.join(map(str, e.values()))}" for w, m, e in CASES])
def test_equals_peft(sets, which, method, extra, monkeypatch):
    s = sets[which]
    opts = dict(extra)
    if method not in ("linear", "cat", "svd"):
        opts.setdefault("density", 0.5)
    masks = SharedMasks(monkeypatch) if method in DARE else None
    if opts.get("svd_clamp") is not None:
        # the clamp's quantile depends on the singular vectors' signs, which LAPACK picks: PEFT's SVD is given
        # jlora's sign convention (any SVD is as valid), so both clamp the same factors
        monkeypatch.setattr(torch.linalg, "svd", _canonical_svd(torch.linalg.svd))
    weights = WEIGHTS[:len(s.names)]
    name = f"{method}-{len(s.model.peft_config)}"
    s.model.add_weighted_adapter(s.names, weights, name, combination_type=method, **opts)
    ours, cfg = compose.combine(s.items, weights, method, key=jax.random.key(0), **opts)
    _compare(s, name, ours, cfg)
    assert all(cfg.scale(p) == 1.0 for p, _ in jlora.adapter.adapter_items(ours))
    if masks is not None:
        assert masks.used == len(masks.drawn) > 0


def test_single_adapter_is_linear_as_in_peft(sets):
    s = sets["mixed"]
    s.model.add_weighted_adapter(["t1"], [-0.6], "single", combination_type="svd", svd_rank=1)
    ours, cfg = compose.combine(s.items[:1], [-0.6], "svd", svd_rank=1)
    _compare(s, "single", ours, cfg)
    assert ours == compose.combine(s.items[:1], [-0.6], "linear")[0]


def test_rslora_first_input_differs_from_peft_by_sqrt_rank(sets):
    """PEFT copies use_rslora from the first input into the merged adapter's config, so its merged update is
    sqrt(rank) times what its factors mean; jlora's result has scale 1."""
    s = sets["same"]
    items, names = [s.items[1], s.items[0]], ["t2", "t1"]
    s.model.add_weighted_adapter(names, [1.0, 0.5], "rslora-first", combination_type="cat")
    theirs = s.peft_deltas("rslora-first")
    ours, cfg = compose.combine(items, [1.0, 0.5], "cat")
    mine = s.jlora_deltas(ours, cfg)
    rank = 8   # PEFT's new rank for cat: the sum of the inputs' ranks
    for module in theirs:
        np.testing.assert_allclose(theirs[module], np.sqrt(rank) * mine[module], atol=1e-5)


def test_combined_adapter_exports_to_peft(sets, tmp_path):
    """The result is an ordinary adapter: jlora.peft.save writes it and PEFT loads the same updates."""
    s = sets["mixed"]
    ours, cfg = compose.combine(s.items, WEIGHTS, "ties_svd", density=0.6, svd_rank=3)
    folder = jlora.peft.save(tmp_path / "combined", ours, cfg, s.loaded)
    base = transformers.AutoModelForCausalLM.from_pretrained(s.folder)
    loaded = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    mine = s.jlora_deltas(ours, cfg)
    theirs = {}
    for name, module in loaded.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            d = module.get_delta_weight("default").detach().numpy()
            name = name.removeprefix("base_model.model.")
            theirs[name] = d if models.module_kind(s.table[name][0]) == "embedding" else d.T
    assert sorted(theirs) == sorted(mine)
    for module in mine:
        np.testing.assert_allclose(theirs[module], mine[module], atol=1e-6, err_msg=module)


def test_scanned_layers_combine_per_layer(sets):
    """A scanned layer stack combines layer by layer, as the same adapters on an unscanned model."""
    flat = sets["same"]
    scanned = flat.scanned()
    for method in ("linear", "cat", "ties", "magnitude_prune_svd"):
        opts = {} if method in ("linear", "cat") else {"density": 0.5}
        a, ca = compose.combine(flat.items, WEIGHTS, method, svd_rank=3, **opts)
        b, cb = compose.combine(scanned.items, WEIGHTS, method, svd_rank=3, **opts)
        da, db = flat.jlora_deltas(a, ca), scanned.jlora_deltas(b, cb)
        assert sorted(da) == sorted(db)
        for module in da:
            np.testing.assert_allclose(da[module], db[module], atol=1e-5, err_msg=f"{method}: {module}")


def test_a_scanned_and_an_unrolled_read_of_one_model_are_refused(sets):
    """Adapters read for a scanned and an unrolled form of one model name the same kernels by other paths: their
    combination would hold both, which no one model has. Refused, naming both forms and the inputs."""
    flat, scanned = sets["same"], sets["same"].scanned()
    mixed = [scanned.items[0], flat.items[1]]
    for run in (lambda: compose.combine(mixed, WEIGHTS[:2], "cat", names=["a", "b"]),
                lambda: compose.stack(mixed, WEIGHTS[:2], names=["a", "b"])):
        with pytest.raises(ValueError, match=r"^'a' adapts '\S+', a scanned stack of layers, and 'b' '\S+_0/\S+', "
                                             r"one of those layers unrolled: .*the same scan_layers"):
            run()
    # a model's own `proj` beside `proj_1` is no such pair (no layer axis between them): combined as usual
    import flax.linen as nn

    class TwoProj(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="proj_1")(nn.Dense(4, name="proj")(x))

    params = TwoProj().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    cfg = jlora.LoraConfig(rank=2, targets="proj")
    items = [(jlora.init(params, cfg, key=jax.random.key(k)), cfg) for k in (1, 2)]
    assert sorted(jlora.tree.flatten(compose.stack(items, [1.0, 1.0], names=["a", "b"])[0])) == [
        "proj/kernel", "proj_1/kernel"]


# ------------------------------------------------------------------------------------- stacking at inference

def _tiny_llama(scan=False):
    from jlora.models.llama import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, scan_layers=scan)
    model = LlamaForCausalLM(cfg)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 7)), jnp.int32)
    params = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    return model, params, ids


def _random_items(params, cfgs, lay=None, seed=0):
    """(adapters with random nonzero A and B, config) per config: jlora.init's structure (traced, not run) filled
    with numpy draws, so no random-number kernels compile."""
    rng = np.random.default_rng(seed)
    out = []
    for c in cfgs:
        shapes = jax.eval_shape(lambda: jlora.init(params, c, key=jax.random.key(0), layout=lay))
        out.append((jax.tree.map(lambda x: jnp.asarray(0.3 * rng.normal(size=x.shape), x.dtype), shapes), c))
    return out


def test_stack_equals_merged_weighted_sum():
    model, params, ids = _tiny_llama(scan=True)     # a layer stack: adapters with a leading layer axis
    lay = jlora.layout(model, ids)
    cfgs = [jlora.LoraConfig(rank=2, alpha=4, targets=("q_proj", "v_proj", "embed_tokens")),
            jlora.LoraConfig(rank=3, alpha=3, targets=("q_proj", "o_proj", "up_proj"), use_rslora=True),
            jlora.LoraConfig(rank=1, alpha=8, targets=("v_proj", "down_proj"), rank_pattern={"down_proj": 2})]
    items = _random_items(params, cfgs, lay)
    weights = [0.8, -1.5, 0.6]
    adapters, cfg = compose.stack(items, weights)
    merged = compose.merge_weighted(params, items, weights)

    # the weights: plain jnp reference W + sum_i w_i s_i A_i @ B_i at every adapted path
    flat_p, flat_m = jlora.tree.flatten(params), jlora.tree.flatten(merged)
    expected = {p: np.asarray(v, np.float64) for p, v in flat_p.items()}
    for (ad, c), w in zip(items, weights):
        for path, node in jlora.adapter.adapter_items(ad):
            d = w * c.scale(path) * np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64)
            expected[path] = expected[path] + d.reshape(expected[path].shape)
    for path in flat_p:
        np.testing.assert_allclose(flat_m[path], expected[path], atol=1e-5, err_msg=path)
    assert any(np.abs(flat_m[p] - flat_p[p]).max() > 1e-2 for p in flat_p)

    # the model: stacked adapters, unmerged, give the merged model's logits; and cat merges to the same weights
    stacked = jax.jit(lambda p, a: jlora.apply(model, p, a, cfg, ids))(params, adapters)
    reference = jax.jit(model.apply)({"params": merged}, ids)
    np.testing.assert_allclose(stacked, reference, atol=1e-5)
    cat, cat_cfg = compose.combine(items, weights, "cat")
    for path, v in jlora.tree.flatten(jlora.merge(params, cat, cat_cfg)).items():
        np.testing.assert_allclose(v, flat_m[path], atol=1e-5, err_msg=path)


def test_svd_at_full_rank_is_the_exact_weighted_sum():
    model, params, ids = _tiny_llama()
    cfgs = [jlora.LoraConfig(rank=2, alpha=4, targets=("q_proj", "down_proj")),
            jlora.LoraConfig(rank=3, alpha=3, targets=("q_proj",))]
    items = _random_items(params, cfgs)
    merged = compose.merge_weighted(params, items, [1.0, 2.0])
    full, cfg = compose.combine(items, [1.0, 2.0], "svd", svd_rank=5)
    low, low_cfg = compose.combine(items, [1.0, 2.0], "svd", svd_rank=2)
    flat = jlora.tree.flatten
    exact, truncated = flat(jlora.merge(params, full, cfg)), flat(jlora.merge(params, low, low_cfg))
    merged = flat(merged)
    assert {p: n.rank for p, n in jlora.adapter.adapter_items(low)} == {p: 2 for p in flat(full)}
    for path in merged:
        np.testing.assert_allclose(exact[path], merged[path], atol=1e-5, err_msg=path)
    q = "layers_0/self_attn/q_proj/kernel"     # rank 5 in sum: the rank-2 truncation differs
    assert np.abs(np.asarray(truncated[q]) - np.asarray(exact[q])).max() > 1e-3


def test_linear_is_not_the_weighted_sum_but_cat_is():
    """What the docs say: linear combines A and B separately (cross terms), cat is exact."""
    a1, b1, a2, b2 = (jnp.asarray(np.random.default_rng(i).normal(size=s), jnp.float32)
                      for i, s in enumerate([(6, 2), (2, 5), (6, 2), (2, 5)]))
    cfg = jlora.LoraConfig(rank=2, alpha=2, targets="kernel")
    items = [({"kernel": jlora.Adapter(a1, b1)}, cfg), ({"kernel": jlora.Adapter(a2, b2)}, cfg)]
    exact = 0.5 * a1 @ b1 + 2.0 * a2 @ b2
    for method, is_exact in (("cat", True), ("linear", False)):
        out, _ = compose.combine(items, [0.5, 2.0], method)
        update = out["kernel"].a @ out["kernel"].b
        assert bool(jnp.allclose(update, exact, atol=1e-5)) == is_exact, method
    out, _ = compose.combine(items, [0.5, 2.0], "linear")
    cross = (np.sqrt(0.5) * a1 + np.sqrt(2.0) * a2) @ (np.sqrt(0.5) * b1 + np.sqrt(2.0) * b2)
    np.testing.assert_allclose(out["kernel"].a @ out["kernel"].b, cross, atol=1e-5)


def test_dare_is_a_pure_function_of_the_key():
    cfg = jlora.LoraConfig(rank=2, alpha=2, targets="kernel")
    rng = np.random.default_rng(0)
    items = [({"kernel": jlora.Adapter(jnp.asarray(rng.normal(size=(8, 2)), jnp.float32),
                                       jnp.asarray(rng.normal(size=(2, 8)), jnp.float32))}, cfg) for _ in range(2)]
    one = compose.combine(items, [1, 1], "dare_ties", density=0.5, key=jax.random.key(3))[0]
    assert one == compose.combine(items, [1, 1], "dare_ties", density=0.5, key=jax.random.key(3))[0]
    assert one != compose.combine(items, [1, 1], "dare_ties", density=0.5, key=jax.random.key(4))[0]

    # the masks are the ones the module docstring names, at a path whose CRC-32 has its top bit set ('q/kernel')
    documented = "fold_in(fold_in(key, zlib.crc32(p.encode()) & 0x7FFFFFFF), 2 * i + f)"
    assert documented in " ".join(compose.__doc__.split())
    nested = [({"q": {"kernel": ad["kernel"]}, "kernel": ad["kernel"]}, cfg) for ad, _ in items]
    key, weights = jax.random.key(5), [0.5, 2.0]
    out, _ = compose.combine(nested, weights, "dare_linear", density=0.6, key=key)
    for path, got in jlora.adapter.adapter_items(out):
        k = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
        for f, name in enumerate("ab"):
            xs = [getattr(ad["kernel"], name) for ad, _ in items]
            cs = [np.sqrt(w) for w in weights]                 # linear's split of w_i * s_i (s_i = 1) over A and B
            want = sum(c * x * jax.random.bernoulli(jax.random.fold_in(k, 2 * i + f), 0.6, x.shape) / 0.6
                       for i, (x, c) in enumerate(zip(xs, cs)))
            np.testing.assert_allclose(getattr(got, name), want, atol=1e-6, err_msg=f"{path} {name}")


def test_bad_input_errors():
    cfg2, cfg3 = (jlora.LoraConfig(rank=r, alpha=2, targets="kernel") for r in (2, 3))
    ad = lambda r: {"kernel": jlora.Adapter(jnp.ones((4, r)), jnp.ones((r, 5)))}  # noqa: E731
    items = [(ad(2), cfg2), (ad(3), cfg3)]
    with pytest.raises(ValueError, match="unknown combination type 'mean'"):
        compose.combine(items, [1, 1], "mean")
    with pytest.raises(ValueError, match="one weight per adapter: 2 adapters"):
        compose.combine(items, [1], "cat")
    with pytest.raises(ValueError, match=r"at 'kernel' the ranks are items\[0\]: 2, items\[1\]: 3"):
        compose.combine(items, [1, 1], "linear")
    with pytest.raises(ValueError, match=r"at 'kernel' the ranks are 'style': 2, 'task': 3"):   # the user's names
        compose.combine(items, [1, 1], "linear", names=["style", "task"])
    with pytest.raises(ValueError, match=r"^'style': the adapter at 'kernel' has rank 2 but its config gives rank 3"):
        compose.stack([(ad(2), cfg3)], [1], names=["style"])
    with pytest.raises(ValueError, match=r"one name \(a string\) per adapter: 2 adapters but names=\['a'\]"):
        compose.combine(items, [1, 1], "cat", names=["a"])
    with pytest.raises(ValueError, match="pass `density`"):
        compose.combine(items, [1, 1], "ties_svd")
    with pytest.raises(ValueError, match=r"`density` must be a number in \(0, 1\]"):
        compose.combine(items, [1, 1], "ties_svd", density=1.5)
    with pytest.raises(ValueError, match="explicit PRNG key"):
        compose.combine(items, [1, 1], "dare_linear_svd", density=0.5)
    with pytest.raises(ValueError, match="majority_sign_method"):
        compose.combine(items, [1, 1], "ties_svd", density=0.5, majority_sign_method="mean")
    with pytest.raises(ValueError, match="do not fit one kernel"):
        compose.combine([(ad(2), cfg2), ({"kernel": jlora.Adapter(jnp.ones((3, 2)), jnp.ones((2, 5)))}, cfg2)],
                        [1, 1], "cat")
    with pytest.raises(ValueError, match="has rank 2 but its config gives rank 3"):
        compose.combine([(ad(2), cfg3)], [1], "cat")
    with pytest.raises(ValueError, match="whole trained tensors at \\['bias'\\]"):
        compose.combine([({**ad(2), "bias": jnp.zeros(5)}, cfg2)], [1], "cat")
    dora = {"kernel": jlora.Adapter(jnp.ones((4, 2)), jnp.ones((2, 5)), {"m": jnp.ones(5)}, variant="dora")}
    with pytest.raises(ValueError, match="'dora' adapter at 'kernel'"):
        compose.stack([(dora, cfg2)], [1])
