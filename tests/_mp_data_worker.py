"""Worker of tests/test_data_pipeline.py's two-process test: ``python tests/_mp_data_worker.py PROCESS_ID PORT TRAIN
PACKING TOKENIZER OUT`` (TOKENIZER: a pickled jlora Tokenizer) joins a 2-process ``jax.distributed`` job (one CPU device each, gloo), builds this process's rows of
``N`` global batches with :class:`jlora.data.Loader` (``rows`` from ``jlora.parallel.local_batch_rows``), places them
as one global array per key (``shard_local_batch``) and gathers them back; checks that a Loader started from the
position saved after the first batch yields the same rows; process 0 writes the global batches and both processes'
example counts to OUT (.npz)."""

import os
import pickle
import sys

N, B, L = 3, 8, 128


def main(pid, port, train, packing, tokenizer, out):
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import numpy as np

    from jlora import data, parallel

    parallel.initialize(f"127.0.0.1:{port}", 2, pid)
    with open(tokenizer, "rb") as f:
        tok = pickle.load(f)
    mesh = parallel.make_mesh(data=2)
    kw = dict(batch_size=B, max_length=L, pad_id=tok.pad_token_id, tokenizer=tok, seed=3, packing=packing,
              rows=parallel.local_batch_rows(mesh, B), width=parallel.max_over_processes)
    loader = data.Loader(train, **kw)
    local, saved = [], {}
    for i in range(N):
        local.append(next(loader))
        if i == 0:
            position = loader.position
        host = parallel.to_host(parallel.shard_local_batch(local[-1], mesh))   # a collective: both processes
        saved.update({f"{i}/{k}": v for k, v in host.items()})
    counts = parallel.to_host(jax.experimental.multihost_utils.process_allgather(
        np.int32(loader.counts["examples"])))
    resumed = data.Loader(train, **kw, position=position)
    for i in range(1, N):
        got = next(resumed)
        assert all(np.array_equal(got[k], local[i][k]) for k in got), f"process {pid}: resumed batch {i} differs"
    if pid == 0:
        np.savez(out, batches=N, examples_0=counts[0], examples_1=counts[1], **saved)
    jax.distributed.shutdown()


if __name__ == "__main__":
    pid, port, train, packing, tokenizer, out = sys.argv[1:]
    main(int(pid), int(port), train, bool(int(packing)), tokenizer, out)
