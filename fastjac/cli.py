"""The ``fastjac`` command. Each subcommand lives in its own module exposing
``add_arguments(parser)`` and ``run(args) -> int``; a module that is absent is not offered.

CPU threads: ``fastjac --threads N <command>`` (or the command's own ``--threads``) sets torch's
threads; without either, the default counts only idle cores (:mod:`fastjac.training.threads`).

Errors: a mistake the user can fix (a bad setting, path or data file, a full or read-only disk)
is printed as one line with exit status 2, an interruption (Ctrl-C) with 130, a lost peer
process with 1. Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import warnings

COMMANDS = {
    "info": ("fastjac._info_cli", "versions, devices and backends"),
    "demo": ("fastjac.demo", "train a small GRAE≈ and a β-VAE on scikit-learn digits"),
    "train": ("fastjac.training.cli", "train a β-VAE or GRAE (resumable, DDP-ready)"),
    "reproduce": ("fastjac.experiments.cli", "reproduce a figure of the paper"),
    "bench": ("fastjac.bench", "speed ratios against baselines measured in the same run"),
}


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _parser():
    parser = argparse.ArgumentParser(prog="fastjac", description="Jacobian-regularised autoencoders: "
                                     "train, reproduce the paper, benchmark")
    parser.add_argument("--threads", dest="global_threads", metavar="N", type=positive_int, default=None,
                        help="CPU threads for torch, for any command (default: the idle cores, at most 4; "
                             "1 per process under torchrun)")
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
    return parser, modules


def _run(module, args) -> int:
    """The command, with user-fixable failures turned into one line and an exit status."""
    from .training.errors import OSERROR_REASONS, PeerError, TrainingInterrupted, UsageError
    name = f"fastjac {args.command}"
    try:
        return int(module.run(args) or 0)
    except TrainingInterrupted as e:
        if e.rank == 0:  # one message for all the processes
            print(f"{name}: {e}", file=sys.stderr)
        return 128 + e.signal_number
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except UsageError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except PeerError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a path the user gave, or the machine (full, read-only): not a bug
        if e.errno not in OSERROR_REASONS or e.filename is None:
            raise
        print(f"{name}: error: cannot use {e.filename}: {OSERROR_REASONS[e.errno]}", file=sys.stderr)
        return 2


_show_warning = warnings.showwarning


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    from .training.errors import RunWarning
    if issubclass(category, RunWarning):
        print(f"fastjac: warning: {message}", file=sys.stderr)
    else:
        _show_warning(message, category, filename, lineno, file, line)


def main(argv=None) -> int:
    parser, modules = _parser()
    args = parser.parse_args(argv)
    if getattr(args, "threads", None) is None:  # the command's own --threads, when given, wins
        from .training.threads import use_threads
        use_threads(args.global_threads)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        return _run(modules[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
