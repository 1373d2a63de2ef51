"""jlora.parallel on 8 virtual CPU devices: sharded and pmapped training equals the single-device run; FSDP
shrinks per-device parameter memory (XLA's compiled memory analysis); two processes on jax.distributed train,
checkpoint and resume; the sharding rules; clear errors (the README's Scaling out snippet runs in test_readme.py).

The oracle of every equivalence test is the plain single-device ``jax.jit(jlora.make_train_step(...))`` run
(fp32), for 5 steps of a tiny Llama with left-padded batches (token-weighted losses)."""

import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jlora
from _mp_worker import SPLIT, TOTAL, setup
from helpers import assert_trees_all_close
from jlora import parallel

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 5


def _copy(tree):
    return jax.tree.map(jnp.array, tree)   # a fresh buffer: donating the state must not delete the originals


@pytest.fixture(scope="module")
def tiny():
    return setup()


@pytest.fixture(scope="module")
def reference(tiny):
    """The single-device run: losses of all TOTAL steps, adapters after STEPS and after TOTAL steps."""
    model, params, cfg, opt, adapters, batches = tiny
    step = jax.jit(jlora.make_train_step(model, cfg, opt), donate_argnums=0)
    state = jlora.TrainState.create(_copy(adapters), opt, rng=jax.random.key(4))
    losses, snapshots = [], {}
    for i, batch in enumerate(batches):
        state, metrics = step(state, params, batch)
        losses.append(float(metrics["loss"]))
        snapshots[i + 1] = jax.tree.map(np.asarray, state.adapters)
    return np.asarray(losses), snapshots


def _stack_layers(tree, n):
    """Unrolled ``layers_{i}`` subtrees -> one ``layers`` subtree with a leading layer axis (nn.scan's layout)."""
    out = {k: v for k, v in tree.items() if not re.fullmatch(r"layers_\d+", k)}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[tree[f"layers_{i}"] for i in range(n)])
    return out


def _unstack_layers(tree, n):
    out = {k: v for k, v in tree.items() if k != "layers"}
    out.update({f"layers_{i}": jax.tree.map(lambda x: x[i], tree["layers"]) for i in range(n)})
    return out


SHARDED_CASES = {
    "data8": dict(mesh=dict(data=8)),
    "fsdp8": dict(mesh=dict(fsdp=8)),
    "fsdp4_tensor2": dict(mesh=dict(fsdp=4, tensor=2)),
    # everything at once: 3 axes, scanned layers, remat, gradient accumulation
    "data2_fsdp2_tensor2_scan_remat_accum2": dict(mesh=dict(data=2, fsdp=2, tensor=2), scan=True, remat="dots",
                                                  accum=2),
}


def _activation_gathers(hlo, tokens):
    """``(rows, op_name)`` of every all-gather (or part of a combined one) in the layers of a compiled step whose
    result looks like activations, ``(rows, tokens, features...)`` in floating point, from its HLO text."""
    found = []
    for result, op in re.findall(r"= (.*?) all-gather(?:-start)?\(.*op_name=\"([^\"]*)\"", hlo):
        if re.search(r"/layers(_\d+)?/", op):
            found += [(int(rows), op) for rows, t in re.findall(r"\bb?f(?:16|32|64)\[(\d+),(\d+),[\d,]+\]", result)
                      if int(t) == tokens]
    return found


# fsdp8 and fsdp4_tensor2 are covered by the all-axes case in `make test`; they run in `make test-all`
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in ("fsdp8", "fsdp4_tensor2") else c
                                  for c in SHARDED_CASES])
def test_sharded_training_equals_single_device(case, tiny, reference):
    """The sharded step's losses and adapters equal the single-device run's, and its layers keep the activations
    batch-sharded: FSDP gathers the kernels, never another device's rows of a layer's activations (XLA's partitioner
    gathered the whole batch's when it followed a kernel's FSDP sharding into them; the models now constrain their
    activations with ``jlora.models.layers.constrain``, which the sharded step binds to the batch axes)."""
    spec = SHARDED_CASES[case]
    model, params, cfg, opt, adapters, batches = setup(scan_layers=spec.get("scan", False),
                                                       remat=spec.get("remat", "none")) if (
        spec.get("scan") or spec.get("remat")) else tiny
    n_layers = model.config.num_hidden_layers
    if spec.get("scan"):
        params, adapters = _stack_layers(params, n_layers), _stack_layers(adapters, n_layers)
    mesh = parallel.make_mesh(**spec["mesh"])
    p_sh = parallel.param_shardings(params, mesh, family="llama")
    params = parallel.place(params, p_sh)
    state = jlora.TrainState.create(_copy(adapters), opt, rng=jax.random.key(4))
    s_sh = parallel.state_shardings(state, parallel.adapter_shardings(adapters, p_sh))
    state = parallel.place(state, s_sh)
    step = parallel.make_sharded_train_step(model, cfg, opt, mesh, param_shardings=p_sh, state_shardings=s_sh,
                                            grad_accum_steps=spec.get("accum", 1))
    losses = []
    for batch in batches[:STEPS]:
        state, metrics = step(state, params, parallel.shard_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    ref_losses, ref_adapters = reference
    np.testing.assert_allclose(losses, ref_losses[:STEPS], atol=1e-5, rtol=0)
    got = jax.tree.map(np.asarray, state.adapters)
    if spec.get("scan"):
        got = _unstack_layers(got, n_layers)
    assert_trees_all_close(got, ref_adapters[STEPS], atol=1e-5)
    # the state really is sharded as planned, and stays so across steps (out_shardings = in_shardings)
    assert jax.tree.map(lambda x: x.sharding, state) == s_sh
    if mesh.shape["fsdp"] > 1:
        q = params["layers" if spec.get("scan") else "layers_0"]["self_attn"]["q_proj"]["kernel"]
        assert "fsdp" in q.sharding.spec
    # the step just ran, so lowering and compiling it again are cache hits
    hlo = step.lower(state, params, parallel.shard_batch(batches[0], mesh)).compile().as_text()
    rows, tokens = batches[0]["input_ids"].shape
    own_rows = rows // spec.get("accum", 1) // (mesh.shape["data"] * mesh.shape["fsdp"])
    gathered = _activation_gathers(hlo, tokens)
    assert not [g for g in gathered if g[0] > own_rows], gathered
    if mesh.shape["fsdp"] > 1:   # what FSDP gathers instead: the kernels (q_proj's (64, 64), less its tensor split)
        q_kernel = rf"\[64,{64 // mesh.shape['tensor']}\]"
        assert re.search(q_kernel + r"\S* all-gather(?:-start)?\(.*/layers(_\d+)?/self_attn/q_proj/", hlo)


def test_pmap_training_equals_single_device(tiny, reference):
    model, params, cfg, opt, adapters, batches = tiny
    step = parallel.make_pmap_train_step(model, cfg, opt, grad_accum_steps=2)
    state = parallel.replicate(jlora.TrainState.create(_copy(adapters), opt, rng=jax.random.key(4)))
    params = parallel.replicate(params)
    losses = []
    for batch in batches[:STEPS]:
        state, metrics = step(state, params, parallel.split_for_pmap(batch))
        assert np.ptp(np.asarray(metrics["loss"])) == 0     # pmean: every replica reports the same loss
        losses.append(float(metrics["loss"][0]))
        # the whole batch's target tokens (lm_loss: attended positions after the first)
        assert float(metrics["tokens"][0]) == float(batch["attention_mask"][:, 1:].sum())
    ref_losses, ref_adapters = reference
    np.testing.assert_allclose(losses, ref_losses[:STEPS], atol=1e-5, rtol=0)
    assert_trees_all_close(jax.tree.map(np.asarray, parallel.unreplicate(state.adapters)), ref_adapters[STEPS],
                           atol=1e-5)
    # every replica holds the same adapters
    for leaf in jax.tree.leaves(state.adapters):
        np.testing.assert_array_equal(np.asarray(leaf), np.broadcast_to(np.asarray(leaf)[:1], leaf.shape))


def test_sharded_accumulation_with_dropout_and_an_unweighted_loss_equals_the_plain_step(tiny):
    """Both steps split micro-batches the same way (rows i, i+k, ...) and draw the same dropout masks, so a loss
    that weights micro-batches equally (no "tokens") and LoRA dropout give the same numbers sharded or not; and a
    state the sharded step consumed is refused, not handed to XLA."""
    model, params, cfg, opt, adapters, batches = tiny
    cfg = jlora.LoraConfig(**{**cfg.to_dict(), "dropout": 0.3})

    def loss_fn(apply_fn, batch):
        loss = jlora.lm_loss(apply_fn, batch)[0]
        return loss, {"loss": loss}

    plain = jax.jit(jlora.make_train_step(model, cfg, opt, loss_fn=loss_fn, grad_accum_steps=2))
    want, want_metrics = plain(jlora.TrainState.create(_copy(adapters), opt, rng=jax.random.key(4)), params,
                               batches[0])
    mesh = parallel.make_mesh(data=2, fsdp=4)
    p_sh = parallel.param_shardings(params, mesh, family="llama")
    state = jlora.TrainState.create(_copy(adapters), opt, rng=jax.random.key(4))
    s_sh = parallel.state_shardings(state, parallel.adapter_shardings(adapters, p_sh))
    state = parallel.place(state, s_sh)
    step = parallel.make_sharded_train_step(model, cfg, opt, mesh, param_shardings=p_sh, state_shardings=s_sh,
                                            loss_fn=loss_fn, grad_accum_steps=2)
    sharded_params, batch = parallel.place(params, p_sh), parallel.shard_batch(batches[0], mesh)
    got, metrics = step(state, sharded_params, batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(want_metrics["loss"]), rtol=1e-6)
    assert_trees_all_close(jax.tree.map(np.asarray, got.adapters), jax.tree.map(np.asarray, want.adapters),
                           atol=1e-5)
    with pytest.raises(ValueError, match="was donated to an earlier call"):
        step(state, sharded_params, batch)


def test_fsdp_cuts_per_device_parameter_bytes_per_xla_memory_analysis(tiny):
    model, params, *_ = tiny
    ids = jnp.zeros((8, 16), jnp.int32)
    total = sum(x.nbytes for x in jax.tree.leaves(params))

    def per_device_argument_bytes(mesh):
        shardings = (parallel.param_shardings(params, mesh, family="llama"), parallel.batch_sharding(mesh))
        fwd = jax.jit(lambda p, x: model.apply({"params": p}, x), in_shardings=shardings)
        return fwd.lower(params, ids).compile().memory_analysis().argument_size_in_bytes - ids.nbytes // 8

    fsdp, replicated = per_device_argument_bytes(parallel.make_mesh(fsdp=8)), per_device_argument_bytes(
        parallel.make_mesh(data=8))
    print(f"frozen params per device: unsharded {total} B, data-parallel {replicated} B, FSDP(8) {fsdp} B "
          f"({fsdp / total:.4f} of unsharded)")
    assert replicated >= total
    assert fsdp <= total / 7


# --- two processes ---------------------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_pair(phase, tmp_path, timeout=240):
    """Runs two worker processes of one jax.distributed job; kills both if either fails or hangs. Returns what
    process 0 wrote to ``<phase>.npz`` (None for a phase that writes none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_FLAGS", "JAX_"))}
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=os.pathsep.join(
                   [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")]))
    port, out = _free_port(), tmp_path / f"{phase}.npz"
    logs = [open(tmp_path / f"{phase}.{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "_mp_worker.py"), str(i), "2", str(port), phase,
                               str(tmp_path / "ckpt"), str(out)], env=env, stdout=logs[i], stderr=subprocess.STDOUT)
             for i in range(2)]
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = []
    for f in logs:
        f.seek(0)
        texts.append(f.read())
        f.close()
    if any(p.returncode for p in procs):
        pytest.fail(f"{phase} workers exited with {[p.returncode for p in procs]}:\n" +
                    "\n".join(f"--- process {i} ---\n{t[-3000:]}" for i, t in enumerate(texts)))
    return dict(np.load(out)) if out.exists() else None


def test_two_processes_that_disagree_raise_in_both_and_wait_for_nothing(tmp_path):
    """Processes fed batches of other shapes ran different programs with no error (wrong losses); processes saving
    other steps waited forever in orbax's barrier, and a restore refused in one process left the other waiting in
    orbax's collective read. Each now raises in every process, naming both sides."""
    import json

    _run_pair("mismatch", tmp_path, timeout=180)   # (within the time: nothing waits forever)
    raised = [json.loads((tmp_path / f"mismatch.npz.{i}").read_text()) for i in range(2)]
    for i, r in enumerate(raised):
        assert r["batch"].startswith("ValueError: the processes' local batches differ (process 0: attention_mask: "
                                     "int32[8, 16], input_ids: int32[8, 16]; process 1: attention_mask: "
                                     "int32[8, 24], input_ids: int32[8, 24]); every process must feed"), (i, r)
        assert r["save"].startswith(f"RuntimeError: saving checkpoint step {1 + i} in ") and \
            "the processes save different steps (process 0: 1, process 1: 2)" in r["save"], (i, r)
    for what in ("restore", "restore_adapters"):   # process 1's own error; process 0 names it
        assert "rank" in raised[1][what] and raised[1][what].startswith("CheckpointError"), raised[1]
        assert raised[0][what].startswith(f"CheckpointError: restoring {tmp_path / 'ckpt'} failed in process(es) "
                                          f"[1], so in this one too; process 1: CheckpointError: "), raised[0]


@pytest.mark.slow
def test_two_processes_train_checkpoint_and_a_new_pair_resumes(tmp_path, reference):
    ref_losses, ref_adapters = reference
    first = _run_pair("train", tmp_path)
    assert int(first.pop("step")) == SPLIT
    np.testing.assert_allclose(first.pop("losses"), ref_losses[:SPLIT], atol=1e-5, rtol=0)
    assert_trees_all_close(first, jlora.tree.leaves_by_path(ref_adapters[SPLIT]), atol=1e-5)
    assert (tmp_path / "ckpt" / str(SPLIT)).is_dir()

    second = _run_pair("resume", tmp_path)      # new processes: everything comes from the checkpoint
    assert int(second.pop("step")) == TOTAL
    np.testing.assert_allclose(second.pop("losses"), ref_losses[SPLIT:TOTAL], atol=1e-5, rtol=0)
    assert_trees_all_close(second, jlora.tree.leaves_by_path(ref_adapters[TOTAL]), atol=1e-5)


# --- sharding rules --------------------------------------------------------------------------------------------

def _specs(params, mesh, family="llama"):
    return {k: tuple(v) for k, v in jlora.tree.flatten(parallel.param_specs(params, mesh, family)).items()}


def test_llama_rules_megatron_and_fsdp(tiny):
    _, params, *_ = tiny
    specs = _specs(params, parallel.make_mesh(fsdp=4, tensor=2))
    # column-parallel: output columns over tensor; row-parallel: input rows over tensor; fsdp on the other dim
    for name in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "mlp/gate_proj", "mlp/up_proj"):
        assert specs[f"layers_1/{name}/kernel"] == ("fsdp", "tensor"), name
    for name in ("self_attn/o_proj", "mlp/down_proj"):
        assert specs[f"layers_1/{name}/kernel"] == ("tensor", "fsdp"), name
    assert specs["embed_tokens/embedding"] == ("tensor", "fsdp")      # vocab-parallel
    assert specs["lm_head/kernel"] == ("fsdp", "tensor")
    assert specs["norm/scale"] == (None,)
    assert specs["layers_0/input_layernorm/scale"] == (None,)
    # FSDP alone: the largest divisible dim (embedding: vocab 256 > hidden 64; up_proj: 128 > 64)
    specs = _specs(params, parallel.make_mesh(fsdp=8))
    assert specs["embed_tokens/embedding"] == ("fsdp", None)
    assert specs["layers_0/mlp/up_proj/kernel"] == (None, "fsdp")
    assert specs["layers_0/mlp/down_proj/kernel"] == ("fsdp", None)
    # data parallel: everything replicated
    assert set(_specs(params, parallel.make_mesh(data=8)).values()) <= {(None,), (None, None)}


def test_scanned_layer_axis_is_never_sharded_and_biases_follow_columns():
    mesh = parallel.make_mesh(fsdp=4, tensor=2)
    params = {"layers": {"self_attn": {"q_proj": {"kernel": jnp.zeros((8, 32, 64)), "bias": jnp.zeros((8, 64))},
                                       "o_proj": {"kernel": jnp.zeros((8, 64, 32))}}}}
    specs = _specs(params, mesh)
    assert specs["layers/self_attn/q_proj/kernel"] == (None, "fsdp", "tensor")
    assert specs["layers/self_attn/q_proj/bias"] == (None, "tensor")
    assert specs["layers/self_attn/o_proj/kernel"] == (None, "tensor", "fsdp")
    # the generic rule (family=None) knows no layer axis and no tensor rule: FSDP on the largest divisible dim
    assert _specs(params, mesh, None)["layers/self_attn/q_proj/kernel"] == (None, None, "fsdp")


def test_generic_rule_keeps_the_layer_axis_of_a_named_scan_stack_whole_in_the_compiled_step():
    """family=None cannot tell a (16, 8, 8) stack of Dense kernels from one DenseGeneral kernel: unnamed, FSDP takes
    the largest divisible dim, the layer axis; named by ``stacked=``, no all-gather of the compiled step gathers a
    stack along its layer axis (each one would gather all 16 layers' weights at every step)."""
    import flax.linen as nn

    layers = 16

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(8, name="proj")(jnp.tanh(nn.LayerNorm(name="norm")(x))), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Layer, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True}, length=layers)
            return scan(name="layers")(x, None)[0]

    model, x = Stack(), jnp.ones((8, 8))
    params = model.init(jax.random.key(0), x)["params"]
    mesh = parallel.make_mesh(fsdp=8)
    assert tuple(parallel.param_specs(params, mesh)["layers"]["proj"]["kernel"]) == ("fsdp", None, None)
    specs = jlora.tree.flatten(parallel.param_specs(params, mesh, stacked="layers"))
    assert {k: tuple(v) for k, v in specs.items()} == {
        "layers/proj/kernel": (None, "fsdp", None), "layers/proj/bias": (None, None),
        "layers/norm/scale": (None, None), "layers/norm/bias": (None, None)}
    with pytest.raises(ValueError, match=r"`stacked` names \['layer'\], which hold no parameter.*layers/proj"):
        parallel.param_specs(params, mesh, stacked="layer")

    cfg = jlora.LoraConfig(rank=2, targets="proj")
    adapters = jlora.init(params, cfg, key=jax.random.key(1), layout=jlora.layout(model, x))
    opt = optax.sgd(0.1)
    p_sh = parallel.param_shardings(params, mesh, stacked="layers")
    state = jlora.TrainState.create(adapters, opt, rng=jax.random.key(2))
    s_sh = parallel.state_shardings(state, parallel.adapter_shardings(adapters, p_sh), opt)

    def loss_fn(apply_fn, batch):
        loss = jnp.mean(apply_fn(batch["x"]) ** 2)
        return loss, {"loss": loss}

    step = parallel.make_sharded_train_step(model, cfg, opt, mesh, param_shardings=p_sh, state_shardings=s_sh,
                                            loss_fn=loss_fn, donate=False)
    hlo = step.lower(parallel.place(state, s_sh), parallel.place(params, p_sh),
                     parallel.shard_batch({"x": x}, mesh)).compile().as_text()
    gathers = re.findall(r"= \w+\[([\d,]+)\][^ ]* all-gather(?:-start)?\(.*?dimensions=\{(\d+)\}", hlo)
    assert gathers                                     # the sharded kernels are gathered, by their feature dim
    whole_stacks = [g for g in gathers if g[1] == "0" and g[0].split(",")[0] == str(layers)]
    assert not whole_stacks, whole_stacks


def test_generic_rule_leaves_non_divisible_kernels_replicated():
    mesh = parallel.make_mesh(fsdp=8)
    params = {"a": {"kernel": jnp.zeros((12, 20))}, "b": {"kernel": jnp.zeros((12, 24))}}
    assert _specs(params, mesh, None) == {"a/kernel": (None, None), "b/kernel": (None, "fsdp")}


def test_adapters_follow_their_kernels_and_optimizer_state_follows_adapters(tiny):
    _, params, cfg, _, adapters, _ = tiny
    mesh = parallel.make_mesh(fsdp=4, tensor=2)
    p_sh = parallel.param_shardings(params, mesh, family="llama")
    a_sh = jlora.tree.leaves_by_path(parallel.adapter_shardings(adapters, p_sh))
    k = "layers_0/self_attn/"
    assert tuple(a_sh[k + "q_proj/kernel/a"].spec) == ("fsdp", None)      # kernel (fsdp, tensor)
    assert tuple(a_sh[k + "q_proj/kernel/b"].spec) == (None, "tensor")
    assert tuple(a_sh[k + "o_proj/kernel/a"].spec) == ("tensor", None)    # kernel (tensor, fsdp)
    assert tuple(a_sh[k + "o_proj/kernel/b"].spec) == (None, "fsdp")
    assert tuple(a_sh["embed_tokens/embedding/a"].spec) == ("tensor", None)
    # q_proj's and o_proj's A have the same shape (64, 4) but different shardings: state leaves match by path
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = jlora.TrainState.create(adapters, opt, rng=jax.random.key(0))
    s_sh = parallel.state_shardings(state, parallel.adapter_shardings(adapters, p_sh))
    by_path = {jlora.tree.path_str(kp): s for kp, s in jax.tree_util.tree_flatten_with_path(s_sh.opt_state)[0]}
    for path, sharding in by_path.items():
        adapter_path = next((p for p in a_sh if path.endswith("/" + p)), None)
        expected = a_sh[adapter_path].spec if adapter_path else P()
        assert sharding.spec == expected, path
    assert sum("mu/" in p for p in by_path) == len(a_sh)
    assert s_sh.step.spec == P() and s_sh.rng.spec == P()
    # given the optimizer, optax.tree_map_params finds the parameter-shaped state: the same shardings
    with_opt = parallel.state_shardings(state, parallel.adapter_shardings(adapters, p_sh), opt)
    assert jax.tree.map(lambda s: s.spec, with_opt.opt_state) == jax.tree.map(lambda s: s.spec, s_sh.opt_state)


def test_adapter_shardings_of_multi_axis_kernels_need_params():
    from tiny import TinyLM

    model = TinyLM(vocab=64, dim=32, heads=4, layers=1, multi_axis=True)
    ids = jnp.zeros((1, 4), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), ids)["params"]     # shapes are all the rules need
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=("q_proj", "o_proj"))
    layout = jlora.layout(model, ids)
    adapters = jax.eval_shape(lambda p: jlora.init(p, cfg, key=jax.random.key(1), layout=layout), params)
    mesh = parallel.make_mesh(fsdp=4, data=2)
    p_sh = parallel.param_shardings(params, mesh)        # generic: q (32, 4, 8) -> fsdp on 32; o (4, 8, 32) -> 32
    assert tuple(p_sh["layers_0"]["q_proj"]["kernel"].spec) == ("fsdp", None, None)
    assert tuple(p_sh["layers_0"]["o_proj"]["kernel"].spec) == (None, None, "fsdp")
    with_params = jlora.tree.leaves_by_path(parallel.adapter_shardings(adapters, p_sh, params))
    assert tuple(with_params["layers_0/q_proj/kernel/a"].spec) == ("fsdp", None)   # a: (32, 2)
    assert tuple(with_params["layers_0/q_proj/kernel/b"].spec) == (None, None)     # b: (2, 4*8): out unsharded
    assert tuple(with_params["layers_0/o_proj/kernel/b"].spec) == (None, "fsdp")   # b: (2, 32)
    # adapters carry their kernel's layout, so params are not needed to tell the input dims any more
    without = jlora.tree.leaves_by_path(parallel.adapter_shardings(adapters, p_sh))
    assert {p: tuple(s.spec) for p, s in without.items()} == {p: tuple(s.spec) for p, s in with_params.items()}
    # hand-made adapters without a layout: a >2-D kernel without params cannot be told apart, so it is replicated
    bare = jax.tree.map(lambda x: x, adapters, is_leaf=lambda x: isinstance(x, jlora.Adapter))
    bare = jax.tree.map(lambda n: n.replace(layout=None), bare, is_leaf=lambda x: isinstance(x, jlora.Adapter))
    assert all(tuple(s.spec) == () for s in
               jlora.tree.leaves_by_path(parallel.adapter_shardings(bare, p_sh)).values())


# --- errors ----------------------------------------------------------------------------------------------------

def test_mesh_size_must_equal_device_count():
    with pytest.raises(ValueError, match=r"data=2 x fsdp=2 x tensor=1 = 4 devices, but there are 8 devices"):
        parallel.make_mesh(data=2, fsdp=2)
    with pytest.raises(ValueError, match=r"= 16 devices, but there are 8"):
        parallel.make_mesh(fsdp=8, tensor=2)
    with pytest.raises(ValueError, match=r"at most one may be -1"):
        parallel.make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match=r"not a multiple"):
        parallel.make_mesh(data=-1, tensor=3)
    assert parallel.make_mesh(data=2, fsdp=2, devices=jax.devices()[:4]).devices.size == 4
    assert parallel.make_mesh(data=np.int64(8)).shape["data"] == 8
    with pytest.raises(ValueError, match=r"`devices` lists cpu:0 more than once"):
        parallel.make_mesh(data=2, devices=[jax.devices()[0]] * 2)


def test_batch_that_does_not_divide_is_a_clear_error():
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    batch = {"input_ids": np.zeros((6, 8), np.int32)}
    with pytest.raises(ValueError, match=r"'input_ids' has 6 rows, which do not divide into 4 equal batch shards.*"
                                         r"multiple of 4"):
        parallel.shard_batch(batch, mesh)
    with pytest.raises(ValueError, match=r"6 rows.*8 pmap devices"):
        parallel.split_for_pmap(batch, 8)
    with pytest.raises(ValueError, match=r"has 6 rows.*4 equal batch shards"):
        parallel.local_batch_rows(mesh, 6)
    sharded = parallel.shard_batch({"input_ids": np.zeros((8, 8), np.int32)}, mesh)   # 8 rows: 2 per shard
    assert sharded["input_ids"].sharding.spec == P(("data", "fsdp"))


def test_tensor_dim_that_does_not_divide_is_a_clear_error():
    mesh = parallel.make_mesh(fsdp=2, tensor=4)
    params = {"layers_0": {"self_attn": {"k_proj": {"kernel": jnp.zeros((64, 6))}}}}
    with pytest.raises(ValueError, match=r"'layers_0/self_attn/k_proj/kernel' \(shape \(64, 6\)\).*6 is not "
                                         r"divisible by 4.*e.g. 2"):
        parallel.param_specs(params, mesh, "llama")
    with pytest.raises(ValueError, match=r"no sharding rules for family 'bert'"):
        parallel.param_specs(params, mesh, "bert")


def test_single_process_helpers():
    assert parallel.is_main_process()
    mesh = parallel.make_mesh(data=8)
    assert parallel.local_batch_rows(mesh, 16) == slice(0, 16)
    local = parallel.shard_local_batch({"x": np.arange(16.0).reshape(16, 1)}, mesh)   # one process: = global
    np.testing.assert_array_equal(parallel.to_host(local)["x"][:, 0], np.arange(16.0))


def test_to_host_of_a_sharded_train_state_keeps_its_key_and_feeds_back(tiny, reference):
    """to_host(TrainState) gives numpy arrays and its PRNG key as a key array (numpy cannot hold one), which
    place() puts back on the mesh: the restored state trains on with the reference loss."""
    model, params, cfg, opt, adapters, batches = tiny
    mesh = parallel.make_mesh(fsdp=4, tensor=2)
    p_sh = parallel.param_shardings(params, mesh, family="llama")
    state = jlora.TrainState.create(_copy(adapters), opt, rng=jax.random.key(4))
    s_sh = parallel.state_shardings(state, parallel.adapter_shardings(adapters, p_sh))
    host = parallel.to_host(parallel.place(state, s_sh))
    assert all(type(x) is np.ndarray for x in jax.tree.leaves((host.step, host.adapters, host.opt_state)))
    assert jax.dtypes.issubdtype(host.rng.dtype, jax.dtypes.prng_key)
    assert jax.random.key_impl(host.rng) == jax.random.key_impl(state.rng)
    np.testing.assert_array_equal(jax.random.key_data(host.rng), jax.random.key_data(state.rng))
    assert_trees_all_close(host.adapters, adapters, atol=0)
    step = parallel.make_sharded_train_step(model, cfg, opt, mesh, param_shardings=p_sh, state_shardings=s_sh)
    _, metrics = step(parallel.place(host, s_sh), parallel.place(params, p_sh), parallel.shard_batch(batches[0], mesh))
    np.testing.assert_allclose(float(parallel.to_host(metrics["loss"])), reference[0][0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mesh_kw, fused", [(dict(fsdp=4, tensor=2), False), (dict(data=8), True)])
def test_sharded_step_computes_low_rank_apart_from_a_sharded_kernel(tiny, monkeypatch, mesh_kw, fused):
    """On CPU an adapted Dense is one matmul ``[x, x A] [W; s B]`` (``transform.lora_dense``); with a sharded W the
    concatenation makes XLA re-shard it (more all-gathers), so the sharded step keeps two matmuls when any frozen
    param is sharded, and the one-matmul form when all are replicated (data parallel)."""
    from jlora import transform

    model, params, cfg, opt, adapters, batches = tiny
    calls, original = [], transform.lora_dense
    monkeypatch.setattr(transform, "lora_dense", lambda *a: calls.append(1) or original(*a))
    mesh = parallel.make_mesh(**mesh_kw)
    p_sh = parallel.param_shardings(params, mesh, family="llama")
    state = jlora.TrainState.create(adapters, opt, rng=jax.random.key(4))
    s_sh = parallel.state_shardings(state, parallel.adapter_shardings(adapters, p_sh))
    step = parallel.make_sharded_train_step(model, cfg, opt, mesh, param_shardings=p_sh, state_shardings=s_sh)
    step.lower(parallel.place(state, s_sh), parallel.place(params, p_sh), parallel.shard_batch(batches[0], mesh))
    assert bool(calls) == fused
    assert not transform._SEPARATE.get()   # the context ends with the trace


# The README's "Scaling out" snippet runs in tests/test_readme.py with the other README examples.
