"""Shared setup for tests/test_parallel.py, and the worker process of its multi-process test.

As a script: ``python tests/_mp_worker.py PROCESS_ID NUM_PROCESSES PORT PHASE CKPT_DIR OUT`` joins a
``jax.distributed`` job on 127.0.0.1:PORT with 2 CPU devices per process (gloo collectives), builds the tiny
Llama of :func:`setup` on an fsdp=2 x tensor=2 mesh over the 4 global devices, feeds this process's rows of each
batch, and
- PHASE "train": checks that the `jlora` command refuses to run in the job, trains ``SPLIT`` steps from scratch and
  saves checkpoint ``SPLIT`` from every process, each with its own data position;
- PHASE "resume": restores the latest checkpoint onto the sharded state (each process its own data position) and
  trains to ``TOTAL`` steps;
- PHASE "mismatch": the processes disagree (batch shapes, the step saved, the LoRA config restored): each call
  raises in every process, none waits forever in a collective; each process writes what it raised to OUT.<id>.
"train" passes the job's coordinates to ``jlora.parallel.initialize`` as arguments, "resume" through the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables.
Process 0 writes the losses and the final adapters (gathered to host) to OUT (.npz).
"""

import os
import sys

B, T = 16, 16          # global batch: 8 rows per process in the 2-process run
SPLIT, TOTAL = 5, 8    # steps before the checkpoint, and in all


def setup(scan_layers=False, remat="none"):
    """(model, params, lora config, optimizer, initial adapters, batches): identical in every process."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import jlora
    from jlora.models.llama import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = LlamaForCausalLM(config)
    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj",
                                                     "embed_tokens"))
    # numpy randomness only: nothing to compile (compiling is most of a worker process's time)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda kp, s: jnp.asarray(1.0 + 0.1 * rng.standard_normal(s.shape) if jax.tree_util.keystr(kp).endswith(
            "['scale']") else 0.05 * rng.standard_normal(s.shape), jnp.float32), shapes)
    shapes = jax.eval_shape(lambda p: jlora.init(p, cfg, key=jax.random.key(1)), params)
    # random A and B factors, so every factor gets a gradient from the first step
    adapters = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), jnp.float32), shapes)
    batches = []
    for _ in range(TOTAL):
        ids = rng.integers(0, config.vocab_size, (B, T), dtype=np.int32)
        lengths = rng.integers(T // 2, T + 1, (B,))
        mask = (np.arange(T)[None, :] >= (T - lengths)[:, None]).astype(np.int32)   # left padding
        batches.append({"input_ids": ids, "attention_mask": mask})
    if scan_layers or remat != "none":
        import dataclasses
        model = LlamaForCausalLM(dataclasses.replace(config, scan_layers=scan_layers, remat=remat))
    return model, params, cfg, optax.adam(1e-2), adapters, batches


def main(process_id, num_processes, port, phase, ckpt_dir, out):
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np

    import jlora
    from jlora import parallel
    from jlora.checkpoint import CheckpointManager

    if phase == "train":      # both ways of configuring the job: arguments, and the environment variables
        parallel.initialize(f"127.0.0.1:{port}", num_processes, process_id)
    else:
        os.environ.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
                          JAX_PROCESS_ID=str(process_id))
        parallel.initialize()
    jax.config.update("jax_numpy_rank_promotion", "raise")
    assert jax.device_count() == 2 * num_processes and jax.local_device_count() == 2, jax.devices()

    model, params, cfg, opt, adapters, batches = setup()
    mesh = parallel.make_mesh(fsdp=2, tensor=2)
    p_sh = parallel.param_shardings(params, mesh, family="llama")
    params = parallel.place(params, p_sh)
    state = jlora.TrainState.create(adapters, opt, rng=jax.random.key(4))
    s_sh = parallel.state_shardings(state, parallel.adapter_shardings(adapters, p_sh))
    state = parallel.place(state, s_sh)
    step = parallel.make_sharded_train_step(model, cfg, opt, mesh, param_shardings=p_sh, state_shardings=s_sh)

    manager = CheckpointManager(ckpt_dir)
    if phase == "mismatch":
        _mismatch(process_id, mesh, batches[0], manager, state, params, cfg, out)
        manager.close()
        jax.distributed.shutdown()
        return
    position = {"next": SPLIT, "process": process_id}   # each process's own, as a packing loader's are
    if phase == "resume":
        restored = manager.restore(state, params=params, lora_config=cfg)
        assert restored.data_position == position, (process_id, restored.data_position)
        state = restored.state
    else:   # the `jlora` commands are single-host: in this job of two processes each refuses up front
        import contextlib
        import io

        from jlora import cli

        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(["train", "--config", "unread.yaml"])
        assert code == 2 and "runs on one host" in err.getvalue(), (code, err.getvalue())
    rows = parallel.local_batch_rows(mesh, B)
    losses = []
    for i in range(int(jax.device_get(state.step)), SPLIT if phase == "train" else TOTAL):
        local = {k: np.asarray(v)[rows] for k, v in batches[i].items()}
        state, metrics = step(state, params, parallel.shard_local_batch(local, mesh))
        losses.append(float(parallel.to_host(metrics["loss"])))
    if phase == "train":
        manager.save(SPLIT, state, params=params, lora_config=cfg, data_position=position)
    manager.close()
    flat = jlora.tree.leaves_by_path(parallel.to_host(state.adapters))   # a collective: every process calls it
    if parallel.is_main_process():
        np.savez(out, losses=np.asarray(losses), step=int(parallel.to_host(state.step)), **flat)
    jax.distributed.shutdown()


def _mismatch(process_id, mesh, batch, manager, state, params, cfg, out):
    """Each disagreement of the processes raises in both (what each raised goes to OUT.<process id>)."""
    import dataclasses
    import json

    import numpy as np

    from jlora import parallel

    raised = {}

    def attempt(name, call):
        try:
            call()
        except Exception as e:  # noqa: BLE001  (recorded for the test to check)
            raised[name] = f"{type(e).__name__}: {e}"

    rows = parallel.local_batch_rows(mesh, B)
    local = {k: np.asarray(v)[rows] for k, v in batch.items()}
    if process_id == 1:     # a loader without width=: this process pads to a longer row
        local = {k: np.pad(v, ((0, 0), (0, 8))) for k, v in local.items()}
    attempt("batch", lambda: parallel.shard_local_batch(local, mesh))
    attempt("save", lambda: manager.save(1 + process_id, state, params=params, lora_config=cfg))
    manager.save(1, state, params=params, lora_config=cfg)   # in step again: this one is saved
    manager.wait()
    other = dataclasses.replace(cfg, rank=8) if process_id == 1 else cfg
    attempt("restore", lambda: manager.restore(state, params=params, lora_config=other))
    attempt("restore_adapters", lambda: manager.restore_adapters(params=params, lora_config=other))
    with open(f"{out}.{process_id}", "w") as f:
        json.dump(raised, f)


if __name__ == "__main__":
    pid, n, port, phase, ckpt, out = sys.argv[1:]
    main(int(pid), int(n), int(port), phase, ckpt, out)
