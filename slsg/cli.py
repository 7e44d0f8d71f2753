"""The ``slsg`` command. Sub-commands live in their own modules and are imported lazily,
so ``slsg serve --help`` never loads torch.

Each command module provides ``add_arguments(parser)`` and ``run(args) -> int | None`` and
imports only the standard library at module level; heavy imports happen inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from slsg import __version__

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("slsg_train.commands.synth", "write a synthetic data set in the MVTec LOCO AD layout"),
    "train": ("slsg_train.commands.train", "train one SLSG model for a category (or each category in turn)"),
    "evaluate": ("slsg_train.commands.evaluate", "evaluate a checkpoint with the LOCO metrics"),
    "calibrate": ("slsg_train.commands.calibrate", "re-choose the image-score threshold from normal images"),
    "checks": ("slsg_train.commands.checks", "add, refit or remove a checkpoint's reference checks, then recalibrate"),
    "export": ("slsg_train.commands.export", "export a checkpoint to ONNX in a Triton model repository"),
    "info": ("slsg_train.commands.info", "print a checkpoint's configuration, parameters and GFLOP"),
    "import-authors": ("slsg_train.commands.import_authors",
                       "convert the SLSG authors' released weights (<category>.tch) into a checkpoint"),
    "score": ("slsg_train.commands.score", "score image files with a checkpoint, no server (raw and calibrated)"),
    "triton": ("slsg_triton.command", "run a local Triton server (CPU, no container) over a repository"),
    "serve": ("slsg_gateway.commands.serve", "run the inspection gateway"),
    "dataset": ("slsg_gateway.commands.dataset", "data sets from the gateway's records: from-reviews"),
    "promote": ("slsg_gateway.commands.promote", "gate a model version on reviewed frames; --load serves it"),
    "deploy": ("slsg.commands.deploy", "choose the version every gateway serves (a rollback: an older one)"),
    "bench": ("slsg_bench.command", "benchmarks: model, gateway, triton, load, pipeline, presets, records, padim"),
}


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        return exc


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slsg", description="SLSG visual inspection: train, export, serve.")
    parser.add_argument("--version", action="version", version=f"slsg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # Only the module of the command being run is imported (plus none for a bare `slsg --help`).
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            mod = _load(module)
            if isinstance(mod, Exception):
                p.set_defaults(_missing=mod)
            else:
                mod.add_arguments(p)
                p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    missing = getattr(args, "_missing", None)
    if missing is not None:
        extra = "serve" if args.command in ("serve", "triton", "dataset", "promote") else "train"
        print(
            f"slsg {args.command}: cannot import {missing.name!r}. Install the '{extra}' extra: "
            f"pip install -e '.[{extra}]'",
            file=sys.stderr,
        )
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
