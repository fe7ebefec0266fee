"""``rlhf quickstart``: the whole loop on the embedded defaults, in one command.

It runs the shipped experiment ``experiments/quickstart.yaml`` (SFT → generate from the SFT
policy → simulate → export → reward model train and eval → PPO → eval → a blind arena of SFT
against PPO), so the quickstart and
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
import math
from importlib import resources
from pathlib import Path

from experiments.evidence import arena_rate, arena_win_rates, evidence_lines, voter_words
from experiments.pipeline.execution import run_experiment, run_plan
from experiments.pipeline.experiment_file import load_raw, parse_experiment
from experiments.pipeline.plan import build_plan, upstream_of
from experiments.pipeline.run_context import RunContext
from rlhf.config import parse_overrides
from rlhf.errors import require_extra

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
    preset, overrides = _runner_args(args)
    file = str(experiment_file())
    if args.annotate:
        return _annotate(file, preset, overrides, args)
    print(f"quickstart ({args.preset}): the stages of {file}")
    summary = run_experiment(file, overrides, preset=preset, force_from=args.from_stage)
    print_summary(summary)
    return summary


def print_summary(summary: dict) -> None:
    """Stage times, then every figure of the run with its 95 % interval, reference and verdict."""
    stages = summary["stages"]
    print("\n== quickstart summary ==")
    for name, st in stages.items():
        secs = st.get("seconds")
        took = f"{secs:7.1f} s" if isinstance(secs, (int, float)) else "       "
        print(f"  {name:<9} {st.get('status', ''):<7} {took}")
    ran = [st["seconds"] for st in stages.values() if st.get("status") == "ran" and st.get("seconds")]
    if ran:
        print(f"  {'total':<17} {sum(ran):7.1f} s  ({sum(ran) / 60:.1f} min in the stages that ran)")
    rm, ppo, ev = stages.get("rm_eval", {}), stages.get("ppo", {}), stages.get("eval", {})
    if rm:
        print(
            f"\n  reward model, {_int(rm.get('eval/prompts'))} held-out prompts ({_int(rm.get('eval/gold_pairs'))} gold pairs)"
        )
        _row("accuracy vs gold", rm, "eval/gold_pair_accuracy", "chance 0.5")
        _row("annotators vs gold", rm, "eval/annotator_gold_accuracy", "the ceiling")
        _row("accuracy vs annotators", rm, "eval/pair_accuracy", "chance 0.5")
        _row("Kendall τ vs annotators", rm, "eval/kendall_tau", "chance 0")
        _row("reward-length corr.", rm, "eval/length_corr", _gold_own(rm, "eval/gold_length_corr"))
        explained = rm.get("eval/length_corr_explained")
        if explained is not None and not math.isnan(explained):
            _row(
                "  beyond its accuracy",
                rm,
                "eval/length_corr_beyond",
                f"0 = the {explained:.3f} its agreement with the gold explains (docs/reward-models.md)",
            )
        _row(
            "longer answer preferred",
            rm,
            "eval/longer_preferred",
            _gold_own(rm, "eval/gold_longer_preferred"),
        )
    if ppo.get("ppo/score_gain") is not None:
        print(f"\n  PPO, {_int(ppo.get('updates'))} updates")
        _row(
            "training score gain",
            ppo,
            "ppo/score_gain",
            "last quarter's rollouts − the first quarter's; 0 = no learning",
        )
    if ev:
        print(
            f"\n  held-out evaluation, {_int(ev.get('eval/prompts'))} prompts (SFT and PPO sample with the same random numbers)"
        )
        for label, key in (
            ("reward-model score", "eval/score"),
            ("gold score", "eval/gold_score"),
            ("length (tokens)", "eval/length"),
            ("EOS rate", "eval/eos_rate"),
        ):
            after, before = ev.get(key), ev.get("eval/reference_" + key.split("/", 1)[1])
            if after is not None and before is not None:
                print(f"    {label:<26}SFT {before:7.3f}  →  PPO {after:7.3f}")
        _row("RM score difference", ev, "eval/score_diff", "PPO − SFT; 0 = no change")
        _row("RM win rate vs SFT", ev, "eval/win_rate", "chance 0.5")
        _row("gold win rate vs SFT", ev, "eval/gold_win_rate", "chance 0.5")
        _row("gold score difference", ev, "eval/gold_score_diff", "PPO − SFT")
        if ev.get("eval/kl") is not None:
            print(f"    {'KL to the SFT policy':<26}{ev['eval/kl']:>7.3f}")
    arena = stages.get("arena", {})
    if arena.get("png"):
        print(f"\n  blind arena, {arena.get('arena/prompts', '?')} held-out prompts: {arena['png']}")
        for key, voter, model in sorted(arena_win_rates(arena)):
            rate_key, raw = arena_rate(arena, key)
            kind = (
                "raw win rate vs SFT (lengths barely overlap)" if raw else "length-controlled win rate vs SFT"
            )
            _row(f"{model}, by {voter_words(voter, short=True)}"[:26], arena, rate_key, f"{kind}; chance 0.5")
    for reason in (arena.get("arena/unrated") or {}).values():
        print(f"\n  blind arena: {reason}")
    claims = summary.get("evidence") or []
    if claims:
        print("\n  verdicts (yes: the whole 95 % interval is on the better side of the reference):")
        for line in evidence_lines(claims):
            print(f"    {line}")
    curves = ppo.get("learning_curves")
    if curves:
        print(f"\n  PPO learning curves: {curves}")
    out_dir = Path(summary["dir"])
    print(f"  summary: {out_dir / 'experiment_summary.json'}")
    print(
        f"  view the runs: wandb leet {out_dir}   (to upload, `wandb sync` its offline-run-* folders "
        "oldest first: README, Viewing runs)"
    )


def _int(value) -> str:
    return str(int(value)) if isinstance(value, (int, float)) else "?"


def _row(label: str, stage: dict, key: str, reference: str) -> None:
    value = stage.get(key)
    if value is None:
        return
    print(f"    {label:<26}{value:>7.3f} {_interval(stage, key):<17}  {reference}")


def _interval(stage: dict, key: str) -> str:
    low, high = stage.get(key + "_ci_low"), stage.get(key + "_ci_high")
    return f"[{low:.3f}, {high:.3f}]" if low is not None and high is not None else ""


def _gold_own(rm: dict, key: str) -> str:
    """The gold's own figure for a length row's reference (a reward should not lean more)."""
    own = rm.get(key)
    return f"the gold's own {own:.3f} {_interval(rm, key)}" if own is not None else ""


def _annotate(file: str, preset: str | None, overrides: dict, args: argparse.Namespace) -> dict:
    """Run the generate stage and what it needs (the SFT policy), cached like any other, then serve
    its candidates."""
    require_extra("gradio", "app", "the annotation app (--annotate)")
    from annotation_app.server import serve_candidates  # imports gradio (the optional `app` extra)

    exp = parse_experiment(load_raw(file), file, preset, overrides)
    plan = upstream_of(build_plan(exp), "generate")  # SFT first: candidates come from it
    ctx = RunContext(exp, Path(exp.runs_dir), [f"experiment={exp.name}"], {}, args.from_stage, False, file)
    results = run_plan(ctx, plan)
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
        help="smollm2 (default: the embedded SmolLM2-135M-Instruct, about 10 min on 2 cores) or "
        "tiny (a few-layer model built in code, about a minute)",
    )
    p.add_argument("--runs_dir", default=None, help="root folder of run directories (default runs/)")
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
