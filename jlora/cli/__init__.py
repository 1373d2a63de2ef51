"""The ``jlora`` command: parses arguments and calls :mod:`jlora.cli.run`; it has no logic of its own.

    jlora train --config configs/default.yaml [--set train.steps=20 ...] [--resume | --overwrite]
    jlora eval --config configs/default.yaml [--adapter RUN_DIR_OR_PEFT_DIR | --base]
               [--side-effects [--out DIR [--overwrite]]]
    jlora generate --model PATH [--adapter DIR | --adapter NAME=DIR ... --route NAME,...] --prompt "..."
                   [--chat [--system "..."]] [--max-new-tokens 64] [--temperature 0.7 [--top-k 50] [--top-p 0.9]]
                   [--seed N]
    jlora merge --model PATH --adapter DIR --out OUT_DIR [--overwrite]
    jlora compose --model PATH --adapter NAME=DIR[:WEIGHT] ... --method METHOD --out OUT_DIR [--overwrite]
    jlora export-peft --run RUN_DIR --out OUT_DIR [--model PATH] [--step N] [--overwrite]
    jlora inspect --model PATH [--targets q_proj v_proj --rank 16 | --adapter DIR]
    jlora serve --model PATH [--adapter NAME=DIR ...] [--port 8000]   (jlora.serve: an OpenAI-compatible server)

Every subcommand goes through one error path (:func:`main`): a user error (bad config or option, missing file,
adapter for another model) prints one line and exits with code 2; Ctrl-C prints one line and exits with 130;
``--debug`` shows the traceback instead. Every command runs in one process on one host, with all of its devices: in
a JAX job of several processes it refuses before doing anything (:func:`jlora.cli.run.require_single_process`).
"""

from __future__ import annotations

import argparse
import os
import sys

MODEL_HELP = "an HF folder (config.json + safetensors), a .gguf file, or pkg://package/file"
ADAPTER_HELP = "a run folder (its latest checkpoint) or a PEFT adapter folder (adapter_config.json)"


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/default.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.steps=20")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jlora", description="LoRA fine-tuning for JAX/Flax.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune LoRA adapters from a YAML config")
    _config_args(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in run.dir from its last checkpoint")
    group.add_argument("--overwrite", action="store_true", help="replace an existing run folder (says so)")
    p.add_argument("--no-progress", action="store_true",
                   help="log a line every train.log_every steps instead of a progress bar (the default when "
                        "stderr is not a terminal)")

    p = sub.add_parser("eval", help="validation loss and generation score of a base model or adapter")
    _config_args(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--adapter", help=f"{ADAPTER_HELP} (default: the config's run.dir)")
    group.add_argument("--base", action="store_true", help="evaluate the base model without adapters")
    p.add_argument("--side-effects", action="store_true",
                   help="also compare the adapter with the base on the task and on eval.general text it was not "
                        "trained for (KL, top-1 agreement, loss change, unchanged continuations)")
    p.add_argument("--out", help="with --side-effects: the folder for the report files (side_effects.json/.png); "
                                 "default: the config's run.dir when it is the run evaluated, else none are written")
    p.add_argument("--overwrite", action="store_true",
                   help="with --out: replace a side-effect report there that another adapter or run wrote (or write "
                        "into another run's folder); without it that is refused")

    p = sub.add_parser("compose", help="combine adapters (PEFT's add_weighted_adapter methods) into one")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", action="append", required=True,
                   help="NAME=DIR[:WEIGHT] (a run or PEFT folder; weight 1 by default), repeatable")
    p.add_argument("--method", required=True, help="linear, cat, svd, ties, ties_svd, dare_linear, dare_ties, "
                                                   "dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd")
    p.add_argument("--density", type=float, help="fraction kept by ties/dare/magnitude_prune (0 < density <= 1)")
    p.add_argument("--svd-rank", type=int, help="rank of the svd methods' result (default: the largest input rank)")
    p.add_argument("--majority-sign-method", default="total", choices=("total", "frequency"),
                   help="ties' sign election (default total)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the dare methods' masks (default 0)")
    p.add_argument("--out", required=True, help="the PEFT folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PEFT folder at --out")

    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", action="append",
                   help=f"{ADAPTER_HELP}; or NAME=DIR, repeatable, to serve several adapters at once with --route")
    p.add_argument("--route", help="with NAME=DIR adapters: the adapter of each prompt in order, comma-separated "
                                   "('base' for none), e.g. --route sql,base,sql; all prompts decode in one batch")
    p.add_argument("--prompt", required=True, action="append", help="prompt text (repeatable: one output each)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    p.add_argument("--system", help="with --chat: the system turn (default: the training data's system prompt "
                                    "when --adapter is a run folder whose chats all open with one; '' for none)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, help="sample from the k most likely tokens only (default: all)")
    p.add_argument("--top-p", type=float, help="sample from the smallest set of tokens with this much probability "
                                               "(default: 1, all)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")

    p = sub.add_parser("merge", help="fold an adapter into the base weights and save an HF folder")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", required=True, help=ADAPTER_HELP)
    p.add_argument("--out", required=True, help="the folder to write (config.json, model.safetensors, tokenizer)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing merged-model folder --out")

    p = sub.add_parser("export-peft", help="write a run's adapters as a PEFT adapter folder")
    p.add_argument("--run", required=True, help="a run folder (the run.dir of a `jlora train` config)")
    p.add_argument("--out", required=True, help="the folder to write (adapter_config.json, adapter_model.safetensors)")
    p.add_argument("--model", help=f"the base model the run trained on: {MODEL_HELP} (default: the run's model.path; "
                                   f"a relative one is looked up from the working directory, then from the folder "
                                   f"the run was trained in)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PEFT adapter folder --out")

    p = sub.add_parser("inspect", help="model and adapter summary with the rank ladder")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", help=f"{ADAPTER_HELP}: summarize it (instead of new adapters)")
    p.add_argument("--targets", nargs="+", metavar="REGEX",
                   help="modules of new adapters to summarize (default: q_proj k_proj v_proj o_proj)")
    p.add_argument("--rank", type=int, help="rank of new adapters to summarize (default 16)")

    from jlora import serve
    serve.add_parser(sub)
    return parser


def _run(args: argparse.Namespace) -> int:
    from jlora.cli import run

    run.require_single_process(args.command)
    if args.command == "train":
        cfg = run.load_config(args.config, args.overrides)
        result = run.train(cfg, resume=args.resume, overwrite=args.overwrite,
                           progress=False if args.no_progress else None)
        return 130 if result.get("interrupted") else 0
    if args.command == "eval":
        cfg = run.load_config(args.config, args.overrides)
        if args.out and not args.side_effects:
            raise run.UsageError("--out is where --side-effects writes its report; add --side-effects or drop --out")
        if args.overwrite and not args.out:
            raise run.UsageError("--overwrite lets --out replace another adapter's side-effect report; add --out DIR "
                                 "or drop --overwrite")
        run.evaluate_command(cfg, adapter=args.adapter, base=args.base, side_effects=args.side_effects,
                             out=args.out, overwrite=args.overwrite)
    elif args.command == "compose":
        run.compose_command(args.model, args.adapter, args.method, args.out, density=args.density,
                            svd_rank=args.svd_rank, majority_sign_method=args.majority_sign_method, seed=args.seed,
                            overwrite=args.overwrite)
    elif args.command == "generate":
        options = dict(chat=args.chat, system=args.system, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        named = [a for a in args.adapter or [] if "=" in a and not os.path.exists(a)]   # a folder may hold "="
        if named or args.route:
            run.generate_routed_command(args.model, args.prompt, args.adapter or [], args.route, **options)
        else:
            if args.adapter and len(args.adapter) > 1:
                raise run.UsageError("several --adapter values need names (NAME=DIR) and a --route")
            run.generate_command(args.model, args.prompt, adapter=(args.adapter or [None])[0], **options)
    elif args.command == "merge":
        run.merge_command(args.model, args.adapter, args.out, overwrite=args.overwrite)
    elif args.command == "export-peft":
        run.export_peft_command(args.run, args.out, model=args.model, step=args.step, overwrite=args.overwrite)
    elif args.command == "inspect":
        run.inspect_command(args.model, adapter=args.adapter, targets=args.targets, rank=args.rank)
    elif args.command == "serve":
        from jlora import serve
        return serve.command(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs one ``jlora`` command; returns its exit code (0, 2 for a user error, 130 for Ctrl-C)."""
    args = build_parser().parse_args(argv)
    prefix = f"jlora {args.command}:"
    try:
        return _run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{prefix} interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout was closed by its reader (`| head`): stop quietly, pointing stdout at nothing so that the
        # interpreter's final flush does not fail again
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (AttributeError, OSError, ValueError):   # a stdout without a file descriptor
            pass
        return 0
    except Exception as e:   # noqa: BLE001  (sorted by _user_error: anything else is a bug and re-raised)
        message = _user_error(e)
        if message is None or args.debug:
            raise
        from jlora.cli.run import damaged_step_advice

        message = damaged_step_advice(e, args.command) or message
        if message.startswith("interrupted"):
            print(f"{prefix} {message}", file=sys.stderr)
            return 130
        print(f"{prefix} error: {message}", file=sys.stderr)
        return 2


def console() -> None:
    """The ``jlora`` program (and ``python -m jlora.cli``): :func:`main` on the command line, after
    :func:`jlora.runtime.keep_freed_memory` for ``train`` and ``eval``, whose compiled steps reuse one scratch
    block from call to call instead of faulting it in afresh (up to 20 % of a CPU train step, bench/README.md)."""
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if command in ("train", "eval"):
        from jlora import runtime

        runtime.keep_freed_memory()
    code = main()
    if code == 130:
        # Interrupted (its checkpoint, if any, is written): leave without the interpreter's teardown, which can
        # crash (SIGSEGV) under native threads still compiling or prefetching when Ctrl-C comes before step 1.
        import multiprocessing

        for child in multiprocessing.active_children():   # data worker processes end with the run
            child.terminate()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _user_error(e: Exception) -> str | None:
    """The one-line message of an error the user can fix (or of an interrupted run), or None for a bug."""
    from jlora.cli.run import RunInterrupted

    if isinstance(e, RunInterrupted):
        return str(e)
    if isinstance(e, KeyError):   # the library's lookup errors carry their message as the key
        return " ".join(str(e.args[0] if e.args else e).split())
    if isinstance(e, (ValueError, OSError)):   # ConfigError is a ValueError; OSError: missing, unreadable, full disk
        notes = getattr(e, "__notes__", None) or []   # e.g. which file a full disk stopped, what was kept
        return " ".join(" ".join([str(e), *(f"({note})" for note in notes)]).split())
    return None
