"""The `vapo` command line: one sub-command per process or tool, each importing its code lazily.

Lives in `deploy/` because it is the one place allowed to reach into `shared`, `learner`
and `actors` alike. Sub-commands parse `CONFIG [key=value ...]` the same way everywhere
(`shared.config.load_config`), so a typo in any of them fails with the same one-line error.
Errors meant for the user (ValueError from config or data) print one line and exit 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


def _load(args: argparse.Namespace):  # -> VapoConfig, typed lazily to keep start-up light
    from shared.config import load_config

    return load_config(args.configs, args.overrides)


def _split_config_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """`a.yaml b.yaml k=v k2=v2` -> (files, overrides); a file may not contain '='."""
    files = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    return files, overrides


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config_args",
        nargs="*",
        metavar="CONFIG|key=value",
        help="YAML files merged left to right, then key=value overrides",
    )


def cmd_config(args: argparse.Namespace) -> int:
    """Print the resolved configuration."""
    from shared.config import to_yaml

    print(to_yaml(_load(args)), end="")
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    """Build (or find cached) the tiny model and print its directory."""
    from learner.tiny_model import build_tiny_model, default_tiny_model_dir

    out = Path(args.out) if args.out else default_tiny_model_dir()
    print(build_tiny_model(out, seed=args.seed))
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "config": (cmd_config, "print the resolved configuration"),
    "make-tiny-model": (cmd_make_tiny_model, "build the tiny Qwen2-style model and its char-level tokenizer"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vapo", description="Asynchronous actor-learner RL with VAPO")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "make-tiny-model":
            p.add_argument("--out", default=None, help="output directory (default: the cache directory)")
            p.add_argument("--seed", type=int, default=0)
        else:
            _add_config_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "config_args"):
        args.configs, args.overrides = _split_config_args(args.config_args)
    handler = COMMANDS[args.command][0]
    try:
        return handler(args)
    except ValueError as e:
        print(f"vapo {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
