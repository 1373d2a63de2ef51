"""Small shared test utilities (an `assert_trees_all_close` of our own, as optax does)."""

import jax
import jax.numpy as jnp
import numpy as np


def assert_trees_all_close(a, b, atol=1e-5, rtol=0.0):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb, f"tree structures differ:\n{ta}\n{tb}"
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), atol=atol, rtol=rtol)


def randomize(adapters, key, scale=0.1):
    """Replaces every adapter leaf with random values, so that A @ B != 0."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def max_diff(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def train_peft(peft_model, ids, steps=3, lr=1e-2):
    """A few AdamW steps of a PEFT model on ``ids`` (its own LM loss), then eval mode: a trained PEFT oracle."""
    import torch

    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    ids = torch.as_tensor(ids)
    for _ in range(steps):
        peft_model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return peft_model.eval()


def wait_until_serving(proc, log, url, *, headers=None, seconds=180):
    """Polls ``url``/health until a `jlora serve` subprocess answers 200; fails with its log if it exits first
    (or kills it after ``seconds``)."""
    import time

    import httpx
    import pytest

    deadline = time.time() + seconds
    while True:
        if proc.poll() is not None:
            log.seek(0)
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", headers=headers or {}, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server did not come up in {seconds} s")
        time.sleep(0.3)
