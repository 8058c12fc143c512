"""The ``fastjac`` command. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; a module that is absent is not offered."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "info": ("fastjac._info_cli", "versions, devices and backends"),
    "demo": ("fastjac.demo", "train a small GRAE≈ and a β-VAE on scikit-learn digits"),
    "train": ("fastjac.training.cli", "train a β-VAE or GRAE (resumable, DDP-ready)"),
    "reproduce": ("fastjac.experiments.cli", "reproduce a figure of the paper"),
    "bench": ("fastjac.bench", "speed ratios against baselines measured in the same run"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastjac", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):
                continue  # this command's module is not part of this build
            raise
        modules[name] = module
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    return int(modules[args.command].run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
