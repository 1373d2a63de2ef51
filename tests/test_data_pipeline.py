"""jlora.data's Grain pipeline: its batches equal the in-memory loader's of before (tests/_reference_loader.py) on
the demo data, padded and packed; JSONL, Parquet, Arrow and ArrayRecord files of the same records (written by
`datasets` and `array_record` themselves) give the same batches; worker processes change nothing; a position
resumes exactly and refuses changed data; two processes each read half of the records and together build the
one-process global batches; bad data is named by file and line or row, or skipped and counted."""

import json
import os
import pathlib
import pickle
import socket
import subprocess
import sys

import numpy as np
import pytest

from _reference_loader import Loader as ReferenceLoader
from jlora import data

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "data" / "train.jsonl"
B, L = 8, 128


@pytest.fixture(scope="module")
def records():
    return [json.loads(line) for line in TRAIN.read_text().splitlines()]


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def _loader(path, tok, **kw):
    kw = {"batch_size": B, "max_length": L, "pad_id": tok.pad_token_id, "tokenizer": tok, "seed": 3, **kw}
    return data.Loader(path, **kw)


@pytest.mark.parametrize("packing", [False, True])
def test_batches_equal_the_in_memory_loader_of_before_on_the_demo_data(smol, packing):
    examples = data.load(TRAIN, smol, max_length=L)
    want = ReferenceLoader(examples, batch_size=B, max_length=L, pad_id=smol.pad_token_id, seed=3, packing=packing)
    got = _loader(TRAIN, smol, packing=packing)
    if packing:   # packing now runs on across epochs; within one they agree (the reference ends epoch 0 early)
        n = 0
        while want.position["epoch"] == 0:
            assert _same(next(got), next(want)), n
            n += 1
        assert n > 10
    else:         # padding: two and a half epochs, across the epoch boundaries
        for n in range(125):
            assert _same(next(got), next(want)), n
        assert want.position == {k: v for k, v in got.position.items() if k not in ("fingerprint", "counts")}


def _write_all_formats(folder, recs):
    """The same records as JSONL, Parquet (small row groups), a folder of 3 Arrow stream shards listed by a
    `state.json` (`save_to_disk`'s layout), an Arrow IPC file, ArrayRecord, and Parquet with other column names."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python import array_record_module

    paths = {"jsonl": folder / "d.jsonl"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in recs))
    table = pa.Table.from_pylist(recs)
    paths["parquet"] = folder / "d.parquet"
    pq.write_table(table, paths["parquet"], row_group_size=7)
    paths["arrow_shards"] = folder / "shards"
    paths["arrow_shards"].mkdir()
    names = [f"data-{i:05d}-of-00003.arrow" for i in range(3)]
    for name, part in zip(names[::-1], (table.slice(0, 15), table.slice(15, 15), table.slice(30))):
        with pa.ipc.new_stream(paths["arrow_shards"] / name, table.schema) as w:   # listed out of name order
            w.write_table(part)
    (paths["arrow_shards"] / "state.json").write_text(json.dumps({"_data_files": [{"filename": n}
                                                                                  for n in names[::-1]]}))
    paths["arrow_file"] = folder / "d.arrow"
    with pa.ipc.new_file(paths["arrow_file"], table.schema) as w:
        w.write_table(table)
    paths["array_record"] = folder / "d.array_record"
    writer = array_record_module.ArrayRecordWriter(str(paths["array_record"]), "group_size:1")
    for r in recs:
        writer.write(json.dumps(r).encode())
    writer.close()
    paths["renamed"] = folder / "renamed"
    paths["renamed"].mkdir()
    pq.write_table(pa.Table.from_pylist([{"conversation": r["messages"], "id": i} for i, r in enumerate(recs)]),
                   paths["renamed"] / "train-00000-of-00001.parquet")
    return paths


def test_every_format_gives_the_same_batches(smol, records, tmp_path):
    paths = _write_all_formats(tmp_path, records[:40])
    want = _take(_loader(paths["jsonl"], smol, batch_size=4), 14)   # past the epoch boundary (10 batches each)
    for name, path in paths.items():
        columns = {"messages": "conversation"} if name == "renamed" else None
        got = _take(_loader(path, smol, batch_size=4, columns=columns), 14)
        assert all(_same(g, w) for g, w in zip(got, want)), name
    assert len(data.open_source(paths["arrow_shards"]).files) == 3


def test_json_text_columns_read_as_their_values(tmp_path, monkeypatch):
    """`datasets` stores a column whose values mix types (a completion given as a list in some records, chat
    messages whose keys differ) as JSON text, Arrow's `arrow.json` type: it reads back as the values, as `datasets`
    reads it, not as quoted text to train on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "name": "bot"}]
    texts = pa.array([None, [json.dumps(m) for m in messages]], pa.list_(pa.string()))
    completions = pa.array(['"Paris"', None]).cast(pa.json_())
    table = pa.table({"prompt": pa.array(["Capital?", None]), "completion": completions,
                      "messages": texts.cast(pa.list_(pa.json_()))})
    pq.write_table(table, tmp_path / "d.parquet")
    with pa.ipc.new_file(str(tmp_path / "d.arrow"), table.schema) as writer:
        writer.write_table(table)
    for name in ("d.parquet", "d.arrow"):
        source = data.open_source(tmp_path / name)
        assert source[0][1] == {"prompt": "Capital?", "completion": "Paris", "messages": None}, name
        assert source[1][1] == {"prompt": None, "completion": None, "messages": messages}, name
        assert pickle.loads(pickle.dumps(source))[1][1]["messages"] == messages    # as worker processes get it
    # a Parquet file rewritten with one value changed and the same size is decoded again, not read from the cache
    # (its hash samples blocks of the file: here only its first and last 16 bytes)
    monkeypatch.setattr(data.sources, "_SAMPLES", 0)
    monkeypatch.setattr(data.sources, "_SAMPLE_BYTES", 16)
    for answer in ("yes", "noo"):
        pq.write_table(pa.table({"prompt": ["q"] * 3, "completion": ["a", answer, "c"]}), tmp_path / "e.parquet",
                       compression="none", write_statistics=False)
        assert data.open_source(tmp_path / "e.parquet")[1][1]["completion"] == answer


@pytest.mark.slow   # ~10 s, most of it importing `datasets`
def test_files_written_by_datasets_give_the_same_batches(smol, records, tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(records[:40])
    ds.save_to_disk(str(tmp_path / "disk"), num_shards=3)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records[:40]))
    want = _take(_loader(jsonl, smol, batch_size=4), 14)
    for path in (tmp_path / "disk", tmp_path / "d.parquet", tmp_path / "dict" / "train"):
        assert all(_same(g, w) for g, w in zip(_take(_loader(path, smol, batch_size=4), 14), want)), path
    with pytest.raises(data.DataError, match="DatasetDict folder with splits \\['train'\\]; name one"):
        data.open_source(tmp_path / "dict")


def test_worker_processes_give_the_same_batches(smol):
    want = _take(_loader(TRAIN, smol, packing=True), 3)
    loader = _loader(TRAIN, smol, packing=True, workers=2)
    assert all(_same(g, w) for g, w in zip(_take(loader, 3), want))
    loader.close()


@pytest.mark.slow   # ~20 s: worker processes started twice
def test_worker_processes_resume_exactly(smol):
    loader = _loader(TRAIN, smol, workers=2)
    _take(loader, 5)
    position = loader.position
    got = _take(loader, 3)
    loader.close()
    resumed = _loader(TRAIN, smol, workers=1, position=position)   # another worker count: the same batches
    assert all(_same(g, w) for g, w in zip(_take(resumed, 3), got))
    resumed.close()


@pytest.mark.parametrize("packing", [False, True])
def test_a_saved_position_resumes_exactly_and_refuses_changed_data(smol, records, tmp_path, packing):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:30]))
    run = _loader(path, smol, batch_size=4, packing=packing)
    batches, positions = [], []
    for _ in range(20):                          # padding: 7 batches an epoch; packing: fewer
        positions.append(json.loads(json.dumps(run.position)))
        batches.append(next(run))
    assert positions[-1]["epoch"] >= 2
    for k in (1, 6, 7, 13):
        resumed = _loader(path, smol, batch_size=4, packing=packing, position=positions[k])
        assert all(_same(next(resumed), want) for want in batches[k:])
        assert resumed.counts == run.counts          # counted on from the saved position, as if never stopped
    path.write_text(path.read_text().replace("Zoe", "Zara"))   # same size, other text
    with pytest.raises(data.DataError, match="the data changed since this position was saved"):
        _loader(path, smol, batch_size=4, packing=packing, position=positions[3])


def _mp_pair(tmp_path, phase_args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH",
                                                                                                       "")]))
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "_mp_data_worker.py"), str(i), str(port),
                               *map(str, phase_args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            p.kill()
            outs.append(p.communicate()[0])
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)


@pytest.mark.parametrize("packing", [False, pytest.param(True, marks=pytest.mark.slow)])   # ~15 s each
def test_two_processes_each_read_half_and_build_the_global_batches(smol, tmp_path, packing):
    """Padding: the processes' rows together are the one-process batches. Packing: each process packs its own half of
    every epoch's order, so the global batch is the two one-process shard loaders' batches side by side."""
    out, tok = tmp_path / "out.npz", tmp_path / "tokenizer.pkl"
    tok.write_bytes(pickle.dumps(smol))
    _mp_pair(tmp_path, [TRAIN, int(packing), tok, out])
    got = dict(np.load(out))
    n = int(got.pop("batches"))
    if packing:
        shards = [_loader(TRAIN, smol, packing=True, rows=(4 * s, 4 * s + 4)) for s in range(2)]
        want = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(_take(shards[0], n), _take(shards[1], n))]
    else:
        want = _take(_loader(TRAIN, smol), n)
    for i in range(n):
        assert _same({k[len(f"{i}/"):]: v for k, v in got.items() if k.startswith(f"{i}/")}, want[i]), i
    # each process tokenized only its own rows: padding, 4 of each batch's 8; packing, the examples packed into its
    # rows plus the one it looked ahead at (the first of its next batch)
    for p in range(2):
        placed = sum(int(w["segment_ids"][4 * p:4 * p + 4].max(1).sum()) for w in want) if packing else 4 * n
        assert int(got[f"examples_{p}"]) == placed + packing, p


# ------------------------------------------------------------------------------------------- bad data


def _lines(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


PAIR = {"prompt": "Question: what is 2+2?\nAnswer:", "completion": " 4, of course."}


def test_a_malformed_record_is_named_or_skipped_and_counted(smol, tmp_path):
    path = _lines(tmp_path / "d.jsonl", [PAIR, PAIR, "", '{"prompt": "cut sh', PAIR, {"prompt": "no completion"}])
    with pytest.raises(data.DataError, match=r"d\.jsonl:4: malformed JSON .*on_bad_record='skip'"):
        _take(_loader(path, smol, batch_size=4, shuffle=False, drop_last=False, epochs=1), 2)
    with pytest.raises(data.DataError, match=r"d\.jsonl:4: malformed JSON"):
        data.records.check(data.open_source(path))
    assert data.records.check(data.open_source(path), on_bad_record="skip") == 2
    loader = _loader(path, smol, batch_size=4, shuffle=False, drop_last=False, epochs=1, on_bad_record="skip")
    with pytest.warns(UserWarning, match="skipped a malformed record"):
        first, second = list(loader)
    assert first["attention_mask"].any(1).tolist() == [True, True, False, True]   # the bad record's row is empty
    assert second["attention_mask"].any(1).tolist() == [False, False, False, False]
    assert loader.counts["skipped"] == 2 and loader.counts["examples"] == 3
    assert "2 skipped" in loader.summary()
    # a lone surrogate escape is valid JSON but no text: named (the tokenizer raised a bare TypeError), or skipped
    broken = tmp_path / "s.jsonl"
    broken.write_text('{"prompt": "a\\ud800b", "completion": "x"}\n' + json.dumps(PAIR) + "\n")
    with pytest.raises(data.DataError, match=r"s\.jsonl:1: 'prompt' holds '\\ud800' at character 1, a lone UTF-16"):
        _take(_loader(broken, smol, batch_size=2, shuffle=False, epochs=1), 1)
    loader = _loader(broken, smol, batch_size=2, shuffle=False, drop_last=False, epochs=1, on_bad_record="skip")
    with pytest.warns(UserWarning, match="skipped a malformed record"):
        list(loader)
    assert (loader.counts["skipped"], loader.counts["examples"]) == (1, 1)


def test_over_long_records_in_each_overflow_mode(smol, tmp_path):
    long = {"prompt": "word " * 40, "completion": " ok"}
    path = _lines(tmp_path / "d.jsonl", [PAIR, long, PAIR, PAIR])
    kw = dict(batch_size=2, max_length=24, shuffle=False, drop_last=False, epochs=1)
    with pytest.raises(data.DataError, match=r"d\.jsonl:2: example has \d+ tokens .* max_length is 24; raise"):
        list(_loader(path, smol, **kw))
    with pytest.warns(UserWarning, match=r"d\.jsonl:2: example longer than max_length=24 dropped"):
        loader = _loader(path, smol, overflow="drop", **kw)
        batches = list(loader)
    assert [b["attention_mask"].any(1).tolist() for b in batches] == [[True, False], [True, True]]
    assert loader.counts["dropped"] == 1
    with pytest.warns(UserWarning, match="dropped"):
        loader = _loader(path, smol, overflow="drop", packing=True, **kw)   # packing moves on to the next one
        batches = list(loader)
    assert loader.counts["dropped"] == 1 and sum(int(b["segment_ids"].max(1).sum()) for b in batches) == 3
    long_prompt = {"prompt": "word " * 10, "completion": " ok " * 30}
    path = _lines(tmp_path / "t.jsonl", [long_prompt, PAIR])
    with pytest.warns(UserWarning, match="truncated"):
        (batch,) = list(_loader(path, smol, overflow="truncate", **kw))
    assert batch["attention_mask"][0].sum() == 24
    all_long = _lines(tmp_path / "l.jsonl", [long, long])
    with pytest.raises(data.DataError, match="every one was dropped"), pytest.warns(UserWarning):
        _take(_loader(all_long, smol, overflow="drop", batch_size=1, max_length=24), 5)


def test_missing_column_empty_shard_and_mixed_folder_are_named(smol, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"question": ["a"], "answer": ["b"]}), tmp_path / "q.parquet")
    with pytest.raises(data.DataError, match=r"q\.parquet: missing column\(s\) \['prompt', 'completion'\].*"
                                             r"columns \['question', 'answer'\]"):
        _loader(tmp_path / "q.parquet", smol)
    batch = next(_loader(tmp_path / "q.parquet", smol, batch_size=1,
                         columns={"prompt": "question", "completion": "answer"}))
    assert batch["loss_mask"].sum() >= 1
    shards = tmp_path / "shards"
    shards.mkdir()
    _lines(shards / "a-0.jsonl", [PAIR])
    (shards / "a-1.jsonl").write_text("\n \n")
    with pytest.raises(data.DataError, match=r"a-1\.jsonl' holds no records \(an empty shard\)"):
        data.open_source(shards)
    (shards / "a-1.jsonl").unlink()
    pq.write_table(pa.table({"prompt": ["a"], "completion": ["b"]}), shards / "b.parquet")
    with pytest.raises(data.DataError, match="files of several formats"):
        data.open_source(shards)
    with pytest.raises(FileNotFoundError, match="no such file, folder or glob match"):
        data.open_source(tmp_path / "nothing*.jsonl")
    # an Arrow file's error lists the file's columns (not only those read), and the example maps the spare one
    table = pa.table({"prompt": ["a"], "answer": ["b"], "id": [1]})
    with pa.OSFile(str(tmp_path / "x.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(data.DataError, match=r"x\.arrow: missing column\(s\) \['completion'\].*columns "
                                             r"\['prompt', 'answer', 'id'\].*\{'prompt': 'prompt', 'completion': 'answer'\}"):
        _loader(tmp_path / "x.arrow", smol)
    # the Hub's layout keeps every split in data/: reading them all would train on the test split
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    for split in ("train", "test"):
        pq.write_table(pa.table({"prompt": [split], "completion": ["b"]}), hub / f"{split}-00000-of-00001.parquet")
    with pytest.raises(data.DataError, match=r"holds the splits \['test', 'train'\].*e\.g\. '.*data/train-\*'"):
        data.open_source(tmp_path / "hub")
    assert [os.path.basename(f) for f in data.sources.expand(hub / "train-*")] == ["train-00000-of-00001.parquet"]
    # and so does a small data set's: train.jsonl beside test.jsonl (`datasets` reads two splits)
    small = tmp_path / "small"
    small.mkdir()
    for split in ("train", "test"):
        (small / f"{split}.jsonl").write_text(json.dumps({"prompt": split, "completion": "b"}) + "\n")
    with pytest.raises(data.DataError, match=r"holds the splits \['test', 'train'\].*e\.g\. '.*small/train\.jsonl'"):
        data.open_source(small)


def test_a_process_whose_rows_lie_past_a_short_epoch_gets_empty_batches():
    """Three examples, batch 4, this process holds row 3: every batch it gets is empty (the epoch's padded tail),
    which is not "every record was dropped"."""
    examples = [data.Example((1, 2), (3,)), data.Example((4,), (5, 6)), data.Example((7,), (8,))]
    loader = data.Loader(examples, batch_size=4, max_length=8, pad_id=0, shuffle=False, drop_last=False, rows=(3, 4))
    assert [int(next(loader)["attention_mask"].sum()) for _ in range(4)] == [0, 0, 0, 0]


def test_jsonl_index_reads_any_record_with_its_line(tmp_path):
    lines = []
    for i in range(300):
        lines += [json.dumps({"prompt": f"p{i}", "completion": "c"})] + ([""] * (i % 3 == 0)) + (["  "] * (i == 7))
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines))                            # no newline at the end
    src = data.open_source(path)
    assert len(src) == 300
    line_of = {json.loads(x)["prompt"]: n for n, x in enumerate(lines, 1) if x.strip()}
    for i in np.random.default_rng(0).permutation(300).tolist() + list(range(300)):
        where, raw = src[i]
        assert json.loads(raw)["prompt"] == f"p{i}" and where == f"{path}:{line_of[f'p{i}']}"
    assert [w for w, _ in src.scan()] == [src[i][0] for i in range(300)]


def test_jsonl_index_carries_lines_across_read_chunks(tmp_path, monkeypatch):
    """The indexing pass reads the file in `_CHUNK`-byte steps: a line cut by a chunk boundary (7 bytes here, so
    nearly every line is) must still count once, with its own line number and bytes."""
    from jlora.data import sources

    monkeypatch.setattr(sources, "_CHUNK", 7)
    lines = [json.dumps({"prompt": "p" * (i % 11), "completion": str(i)}) for i in range(150)]
    lines[40:40] = ["", "   "]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    src = data.open_source(path)
    assert len(src) == 150
    kept = [(n, x) for n, x in enumerate(lines, 1) if x.strip()]
    for i in [0, 1, 63, 64, 65, 127, 128, 149]:
        assert src[i] == (f"{path}:{kept[i][0]}", kept[i][1].encode())


def test_a_generator_of_examples_loses_no_example(smol, records):
    examples = data.tokenize_all(records[:20], smol, max_length=L)
    want = data.Loader(examples, batch_size=4, max_length=L, pad_id=smol.pad_token_id, shuffle=False)
    got = data.Loader((e for e in examples), batch_size=4, max_length=L, pad_id=smol.pad_token_id, shuffle=False)
    assert len(got.records) == 20 and got.fingerprint == want.fingerprint
    assert all(_same(a, b) for a, b in zip(_take(got, 5), _take(want, 5)))


def test_a_split_scans_and_tokenizes_only_its_own_records(smol, tmp_path):
    recs = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(40)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    src = data.open_source(path)
    train, valid = data.sources.split(src, valid_fraction=0.25, seed=2)
    assert len(valid) == 10 and len(train) == 30
    assert [w for w, _ in valid.scan()] == [valid[i][0] for i in range(10)]
    assert [json.loads(r) for _, r in train.scan()] == [recs[i] for i in train.indices]
    # the same records and the same seed split a list alike
    assert [recs[i] for i in valid.indices] == data.split(recs, valid_fraction=0.25, seed=2)[1]
    examples = data.records.tokenize_source(valid, smol, max_length=L)
    assert [e.source for e in examples] == [f"{path}:{i + 1}" for i in valid.indices]
    assert examples == data.tokenize_all([recs[i] for i in valid.indices], smol, max_length=L,
                                         sources=[f"{path}:{i + 1}" for i in valid.indices])
    assert data.fingerprint(valid) == valid.fingerprint() != src.fingerprint() != train.fingerprint()


def test_the_run_holds_out_a_seeded_validation_split_of_the_train_file(smol, records, tmp_path):
    """`jlora train` with `data.valid_fraction` and no `data.valid`: the held-out records are tokenized (and left
    out of training) exactly as `data.split` and `data.tokenize_all` would, a malformed one skipped under
    `on_bad_record: skip`."""
    import types

    from jlora.cli import config as runconfig
    from jlora.cli import run as run_lib

    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:40]) + '{"prompt": 1}\n')
    cfg = runconfig.parse({"model": {"path": "unused"}, "data": {"train": str(path), "valid_fraction": 0.2,
                                                                  "seed": 0, "on_bad_record": "skip"}})
    loaded = types.SimpleNamespace(tokenizer=smol, params={}, name="tiny")
    got = run_lib._load_data(cfg, loaded)
    held = data.sources.held_out_mask(41, round(41 * 0.2), 0)
    assert held[40]                     # the malformed record falls in the validation split, and is skipped
    want_valid = [(f"{path}:{i + 1}", r) for i, r in enumerate(records[:40]) if held[i]]
    assert len(got.train) == 41 - held.sum()
    # the generation eval's prompts are the held-out records' (the first eval.num_examples), as `jlora eval`'s
    want_prompts = data.eval_prompts([r for _, r in want_valid], smol)[:cfg.eval.num_examples]
    assert [(p.source, p.prompt_ids, p.target) for p in got.prompts] == [
        (w, q.prompt_ids, q.target) for (w, _), q in zip(want_valid, want_prompts)]
    assert got.valid == data.tokenize_all([r for _, r in want_valid], smol, max_length=cfg.data.max_length,
                                          sources=[w for w, _ in want_valid])
    assert [w for w, _ in got.train.scan()] == [f"{path}:{i + 1}" for i in range(41) if not held[i]]


@pytest.mark.parametrize("drop_last", [True, False])
def test_counts_are_the_examples_in_the_yielded_batches_at_a_packed_stream_end(drop_last):
    """Packing with drop_last does not yield the stream's last, partial batch; its examples are not counted as
    read into training either (they were: 10 counted, 8 yielded). The oracle is the segments of the batches."""
    from jlora.data.records import Example

    examples = [Example((1, 1, 1), (5, 5, 5)) for _ in range(10)]              # 6 tokens: two to a row of 12
    loader = data.Loader(examples, batch_size=2, max_length=12, pad_id=0, packing=True, epochs=1,
                         drop_last=drop_last, shuffle=False)
    yielded = sum(int(b["segment_ids"].max(axis=1).sum()) for b in loader)
    assert yielded == (8 if drop_last else 10) and loader.counts["examples"] == yielded
