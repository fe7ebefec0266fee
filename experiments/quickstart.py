"""``rlhf quickstart``: the whole loop on the embedded defaults, in one command.

It runs the shipped experiment ``experiments/quickstart.yaml`` (generate → simulate → export →
reward model train and eval → SFT → PPO → eval), so the quickstart and
``rlhf experiment run experiments/quickstart.yaml`` are one pipeline with one cache: a second
``rlhf quickstart`` reuses every stage whose config and inputs did not change. Every stage is a
W&B run (offline by default) in one group, every output under ``runs/<experiment>/<stage>/``.

``--preset smollm2`` (the default) uses the embedded SmolLM2-135M-Instruct; ``--preset tiny`` a
few-layer model built in code (about a minute; its text is random tokens, so it checks the
plumbing, not RLHF). Any field of any stage can be overridden: ``ppo.kl_coef=0.1`` or
``--ppo.total_episodes 64``.

``--annotate`` stops after generation and opens the annotation app on the generated candidates,
for a lab that wants humans in the loop from the first round.
"""

from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

from rlhf.config import parse_overrides

PRESETS = ("tiny", "smollm2")


def experiment_file() -> Path:
    """The shipped ``quickstart.yaml`` (inside the installed package, or the checkout)."""
    return Path(str(resources.files("experiments") / "quickstart.yaml"))


def _runner_args(args: argparse.Namespace) -> tuple[str | None, dict]:
    overrides = parse_overrides(list(args.overrides or []))
    if args.runs_dir:
        overrides["runs_dir"] = args.runs_dir
    if args.seed is not None:
        overrides["seed"] = args.seed
    return (None if args.preset == "smollm2" else args.preset), overrides


def run_quickstart(args: argparse.Namespace) -> dict:
    from experiments import runner

    preset, overrides = _runner_args(args)
    file = str(experiment_file())
    if args.annotate:
        return _annotate(file, preset, overrides, args)
    print(f"quickstart ({args.preset}): the stages of {file}")
    summary = runner.run_experiment(file, overrides, preset=preset, force_from=args.from_stage)
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    stages = summary["stages"]
    print("\n== quickstart summary ==")
    for name, st in stages.items():
        secs = st.get("seconds")
        took = f"{secs:7.1f} s" if isinstance(secs, (int, float)) else "       "
        print(f"  {name:<9} {st.get('status', ''):<7} {took}")
    acc = stages.get("rm_eval", {}).get("eval/pair_accuracy")
    if acc is not None:
        print(f"  reward model held-out pair accuracy: {acc:.3f}")
    ev = stages.get("eval", {})
    rows = [
        ("reward-model score", "eval/score"),
        ("gold score", "eval/gold_score"),
        ("length (tokens)", "eval/length"),
        ("EOS rate", "eval/eos_rate"),
    ]
    for label, key in rows:
        after, before = ev.get(key), ev.get("eval/reference_" + key.split("/", 1)[1])
        if after is not None:
            ref = f"SFT {before:8.3f}  →  " if before is not None else ""
            print(f"  {label:<20} {ref}PPO {after:8.3f}")
    for label, key in (("KL to the SFT policy", "eval/kl"), ("win rate vs SFT (RM)", "eval/win_rate")):
        if ev.get(key) is not None:
            print(f"  {label:<20} {ev[key]:.4f}")
    curves = stages.get("ppo", {}).get("learning_curves")
    if curves:
        print(f"  PPO learning curves: {curves}")
    out_dir = Path(summary["dir"])
    print(f"  summary: {out_dir / 'experiment_summary.json'}")
    print(
        f"  view the runs: wandb leet {out_dir}   (or `wandb sync {out_dir}/*/wandb/offline-run-*` to upload)"
    )


def _annotate(file: str, preset: str | None, overrides: dict, args: argparse.Namespace) -> dict:
    """Run only the generate stage (cached like any other), then serve its candidates."""
    from annotation_app.app import serve_candidates
    from experiments import runner

    exp = runner.parse_experiment(runner.load_raw(file), file, preset, overrides)
    plan = [n for n in runner.build_plan(exp) if n.name == "generate"]
    ctx = runner.RunContext(
        exp, Path(exp.runs_dir), [f"experiment={exp.name}"], {}, args.from_stage, False, file
    )
    results = runner.run_plan(ctx, plan)
    candidates = results["generate"]["candidates"]
    db = args.db or str(Path(exp.runs_dir) / exp.name / "annotate" / "lab.db")
    Path(db).parent.mkdir(parents=True, exist_ok=True)
    print(
        f"\nnext: rank in the browser, then `rlhf annotate export --db {db} --out rankings.jsonl` "
        f"and `rlhf rm train --rankings rankings.jsonl`"
    )
    serve_candidates(candidates, db=db, port=args.port)
    return {"candidates": candidates, "db": db}


def _bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "quickstart",
        help="the whole loop on the embedded defaults, in one command",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default="smollm2",
        help="smollm2 (default: the embedded SmolLM2-135M-Instruct, about 18 min on 2 cores) or "
        "tiny (a few-layer model built in code, about a minute)",
    )
    p.add_argument(
        "--runs-dir",
        "--runs_dir",
        dest="runs_dir",
        default=None,
        help="root folder of run directories (default runs/)",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of every stage (default 0)")
    p.add_argument(
        "--from",
        dest="from_stage",
        metavar="STAGE",
        default=None,
        help="rerun this stage and everything after it, even if cached",
    )
    p.add_argument(
        "--annotate",
        nargs="?",
        const=True,
        default=False,
        type=_bool,
        metavar="BOOL",
        help="after generation, open the annotation app on the candidates instead of simulating annotators",
    )
    p.add_argument(
        "--db",
        default="",
        help="annotation database for --annotate (default runs/<experiment>/annotate/lab.db)",
    )
    p.add_argument("--port", type=int, default=7860, help="annotation app port for --annotate")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="STAGE.FIELD=VALUE",
        help="override any stage field (ppo.kl_coef=0.1) or top-level key (tracking.mode=disabled)",
    )
    p.set_defaults(func=lambda args: (run_quickstart(args), 0)[1])
    return p


if __name__ == "__main__":  # pragma: no cover
    import sys

    from rlhf.cli import main

    sys.exit(main(["quickstart", *sys.argv[1:]]))
