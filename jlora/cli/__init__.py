"""The ``jlora`` command: parses arguments and calls :mod:`jlora.cli.run`; it has no logic of its own.

    jlora train --config configs/default.yaml [--set train.steps=20 ...] [--resume | --overwrite]
    jlora eval --config configs/default.yaml [--adapter RUN_DIR_OR_PEFT_DIR]
    jlora generate --model PATH [--adapter DIR] --prompt "..." [--chat] [--max-new-tokens 64]
    jlora merge --model PATH --adapter DIR --out OUT_DIR
    jlora export-peft --run RUN_DIR --out OUT_DIR [--step N]
    jlora inspect --model PATH [--targets q_proj v_proj] [--rank 16] [--adapter DIR]
    jlora serve --model PATH [--adapter NAME=DIR ...] [--port 8000]   (jlora.serve: an OpenAI-compatible server)

A user error (bad config, missing file, adapter for another model) prints one line and exits with code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML run config, e.g. configs/default.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable), e.g. --set train.steps=20")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jlora", description="LoRA fine-tuning for JAX/Flax.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fine-tune LoRA adapters from a YAML config")
    _config_args(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in run.dir from its last checkpoint")
    group.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")

    p = sub.add_parser("eval", help="validation loss and generation score of a base model or adapter")
    _config_args(p)
    p.add_argument("--adapter", help="a run folder or a PEFT adapter folder (default: the config's run.dir)")
    p.add_argument("--base", action="store_true", help="evaluate the base model without adapters")

    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("--model", required=True, help="HF folder, .gguf file or pkg://package/file")
    p.add_argument("--adapter", help="a run folder or a PEFT adapter folder")
    p.add_argument("--prompt", required=True, action="append", help="prompt text (repeatable: a batch)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("merge", help="fold an adapter into the base weights and save an HF folder")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)

    p = sub.add_parser("export-peft", help="write a run's adapters as a PEFT adapter folder")
    p.add_argument("--run", required=True, help="a run folder")
    p.add_argument("--out", required=True)
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")

    p = sub.add_parser("inspect", help="model and adapter summary with the rank ladder")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", help="a run folder or a PEFT adapter folder")
    p.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    p.add_argument("--rank", type=int, default=16)

    from jlora import serve
    serve.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from jlora.cli import run
    from jlora.cli.config import ConfigError

    try:
        if args.command == "train":
            cfg = run.load_config(args.config, args.overrides)
            result = run.train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
            return 130 if result.get("interrupted") else 0
        if args.command == "eval":
            cfg = run.load_config(args.config, args.overrides)
            run.evaluate_command(cfg, adapter=args.adapter, base=args.base)
        elif args.command == "generate":
            run.generate_command(args.model, args.prompt, adapter=args.adapter, chat=args.chat,
                                 max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        elif args.command == "merge":
            run.merge_command(args.model, args.adapter, args.out)
        elif args.command == "export-peft":
            run.export_peft_command(args.run, args.out, step=args.step)
        elif args.command == "inspect":
            run.inspect_command(args.model, adapter=args.adapter, targets=args.targets, rank=args.rank)
        elif args.command == "serve":
            from jlora import serve
            return serve.command(args)
        return 0
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        if args.debug:
            raise
        message = " ".join(str(e).split()) if not isinstance(e, KeyError) else str(e.args[0])
        print(f"jlora {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
