"""``jlora serve``: an OpenAI-compatible server for one base model and many hot-swappable adapters.

    jlora serve --model PATH [--adapter NAME=DIR ...] [--host 127.0.0.1] [--port 8000] [--slots N] [--rank R]
                [--max-batch B] [--api-key KEY] [--adapter-root DIR]

A request's ``model`` field picks the base (its name: ``GET /v1/models``) or an adapter; requests that arrive
together are decoded in one batch whatever their adapters (:mod:`jlora.serve.engine`: a bank of adapter slots,
a short batching window, bucketed shapes so nothing recompiles on a swap); :mod:`jlora.serve.app` is the HTTP
layer (Starlette + uvicorn, the ``serve`` extra); :mod:`jlora.serve.protocol` checks OpenAI's request fields and
builds its responses. Everything the server does is a library call too::

    from jlora import hf
    from jlora.serve.engine import Engine, EngineConfig
    engine = Engine(hf.load(path), EngineConfig(slots=8), adapters={"json": "runs/default"})
    engine.add_adapter("other", "peft_folder")                      # a hot-swap: no recompile
    out = engine.generate(token_ids, adapter="json", max_tokens=32)  # batched with concurrent calls

This module holds only the command line (``add_parser``, ``command``); importing it loads nothing heavy.
"""

from __future__ import annotations

import argparse
import os
import pathlib

DEFAULT_PORT = 8000


def _adapter_arg(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=DIR, e.g. json=runs/default")
    return name, folder


def _sizes_arg(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated batch sizes, e.g. 1,2,4,8") from None
    return sizes


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the ``serve`` subcommand to the ``jlora`` command's subparsers."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible server: one base, many hot-swappable adapters")
    p.add_argument("--model", required=True, help="HF folder, .gguf file or pkg://package/file")
    p.add_argument("--adapter", action="append", default=[], type=_adapter_arg, metavar="NAME=DIR",
                   help="an adapter to serve as model NAME: a PEFT folder or a run folder (repeatable)")
    p.add_argument("--name", help="the base model's name in requests (default: the model's own name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port to listen on (default {DEFAULT_PORT})")
    p.add_argument("--slots", type=int, default=8, help="adapters held at once (the bank's slots)")
    p.add_argument("--rank", type=int, help="the bank's rank: the largest adapter rank it takes (default 16, or the "
                                            "largest rank among --adapter)")
    p.add_argument("--targets", nargs="+", help="regexes of the kernels the bank covers (default: those the --adapter "
                                                "folders use, else every linear layer; fewer is faster)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most")
    p.add_argument("--batch-sizes", type=_sizes_arg, help="sizes a batch is padded to, each compiled once "
                                                          "(default: powers of two up to --max-batch)")
    p.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="how long the first waiting request waits for others to share its batch")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get HTTP 429")
    p.add_argument("--api-key", default=os.environ.get("JLORA_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every request (default: $JLORA_API_KEY)")
    p.add_argument("--adapter-root", help="allow POST /v1/adapters to load folders under this directory only")
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="weights and compute dtype (default: a run folder's, else float32)")
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=None,
                   help="nn.scan over the layers (default: a run folder's setting, else off)")
    p.add_argument("--warmup", action="store_true", help="compile every batch size before listening")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="the server's log level (default info: one line per request)")
    return p


def _run_settings(folders) -> dict:
    """``{"dtype", "scan_layers"}`` recorded by the first run folder among ``folders`` (its config.yaml), so that
    the base loads the way the run trained (as ``jlora generate --adapter RUN`` does)."""
    import yaml

    for folder in folders:
        path = pathlib.Path(folder) / "config.yaml"
        if path.is_file():
            model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
            return {k: model[k] for k in ("dtype", "scan_layers") if k in model}
    return {}


def load_engine(args):
    """The :class:`~jlora.serve.engine.Engine` the command line describes."""
    import jax.numpy as jnp

    from jlora import hf
    from jlora.serve.engine import Engine, EngineConfig

    names = [n for n, _ in args.adapter]
    if len(set(names)) != len(names):
        raise ValueError(f"--adapter names repeat: {names}; give each adapter its own name")
    recorded = _run_settings(f for _, f in args.adapter)
    dtype = args.dtype or recorded.get("dtype", "float32")
    scan = args.scan_layers if args.scan_layers is not None else bool(recorded.get("scan_layers", False))
    loaded = hf.load(args.model, dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype], scan_layers=scan)
    if loaded.tokenizer is None:
        raise FileNotFoundError(f"model {args.model!r} has no tokenizer; jlora serve needs one for text prompts")
    config = EngineConfig(slots=args.slots, rank=args.rank, targets=tuple(args.targets) if args.targets else None,
                          max_batch=args.max_batch, batch_sizes=args.batch_sizes, max_queue=args.max_queue,
                          window_ms=args.batch_window_ms)
    return Engine(loaded, config, adapters=dict(args.adapter), name=args.name)


def bind_port(host: str, port: int) -> list:
    """The listening address of ``jlora serve``, bound before the model loads (each address ``host`` names, as
    uvicorn would bind them, with ``SO_REUSEADDR``: a port that a server just left, still in TIME_WAIT, is free):
    the sockets, which the caller hands to uvicorn and closes. A ``--port`` outside 1..65535, or one that cannot be
    bound (in use, or below 1024 without the right), is a :class:`ValueError` naming it and the fix; the server
    would otherwise load the model, announce the port, and then fail. Holding the sockets from here on, no other
    process can take the port while the model loads.

    Examples:
        >>> bind_port("127.0.0.1", 99999)
        Traceback (most recent call last):
        ...
        ValueError: --port 99999 is not a TCP port; give one from 1 to 65535 (default 8000)
    """
    import errno
    import socket

    if not 1 <= port <= 65535:
        raise ValueError(f"--port {port} is not a TCP port; give one from 1 to 65535 (default {DEFAULT_PORT})")
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} cannot be resolved ({e.strerror}); give an address of this machine, "
                         f"e.g. 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    sockets = []
    for family, kind, proto, _, address in dict.fromkeys(addresses):
        sock = socket.socket(family, kind, proto)
        sockets.append(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:      # as asyncio binds: the IPv6 socket does not take the IPv4 address too
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind(address)
        except OSError as e:
            for s in sockets:
                s.close()
            if e.errno == errno.EADDRINUSE:
                why = "is in use (another server, or a jlora serve still running)"
                fix = "stop that server or pass another --port"
            elif e.errno == errno.EACCES and port < 1024:
                why, fix = "is a privileged port (below 1024)", "pass --port 1024 or above"
            else:
                why, fix = f"cannot be listened on ({e.strerror})", "pass another --host or --port"
            raise ValueError(f"--port {port}: {host}:{port} {why}; {fix}") from None
    return sockets


def command(args) -> int:
    """Runs ``jlora serve`` until interrupted."""
    import sys

    if args.adapter_root is not None and not os.path.isdir(args.adapter_root):
        raise FileNotFoundError(f"--adapter-root {args.adapter_root!r} is not a directory")
    try:
        from jlora.serve import app  # the serve extra
    except ImportError as e:
        print(f"jlora serve: error: {e}", file=sys.stderr)
        return 2
    sockets = bind_port(args.host, args.port)    # before the model loads, which takes a while
    try:
        return _serve(args, app, sockets)
    finally:
        for sock in sockets:
            sock.close()


def _serve(args, app, sockets: list) -> int:
    import logging
    import sys

    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("jlora.serve").setLevel(args.log_level.upper())
    engine = load_engine(args)
    if args.warmup:
        print(f"jlora serve: warmup compiled {engine.warmup()} shapes", file=sys.stderr, flush=True)
    adapters = ", ".join(f"{n} (slot {i['slot']})" for n, i in engine.adapters().items()) or "none yet"
    print(f"jlora serve: base {engine.name!r}; adapters: {adapters}; bank of {engine.bank.capacity} slots at rank "
          f"{engine.bank.rank}; listening on http://{args.host}:{args.port}"
          + ("" if args.api_key else " (no --api-key: anyone who can reach it may use it)"), file=sys.stderr,
          flush=True)
    app.serve(engine, host=args.host, port=args.port, api_key=args.api_key, adapter_root=args.adapter_root,
              log_level=args.log_level, sockets=sockets)
    return 0


__all__ = ["add_parser", "bind_port", "command", "load_engine"]
