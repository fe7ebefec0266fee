"""``rlhf experiment run FILE``: a whole RLHF pipeline from one YAML file, cached stage by stage.

An experiment file lists stages in loop order, each with the config of that stage (the same fields
as ``rlhf <stage> --help``); see ``experiments/README.md`` for the full format. In short::

    name: kl_sweep                      # the W&B group and runs/<name>/
    seed: 0                             # seed of every stage (a stage section may set its own)
    gold: vader                         # the gold scorer: simulate.scorer, ppo/eval.gold (unless set)
    stages:
      generate: {model: tiny, limit: 16}
      simulate: {scorer: vader}
      rm_train: {config: experiments/configs/rm_tiny.yaml, loss: bt}   # `config:` = a preset file
      sft: {model: tiny}
      ppo: {kl_coef: 0.05, gold: vader}
      eval: {reward: "${rm_train.model_dir}"}                          # explicit wiring
    sweep: {method: grid, parameters: {ppo.kl_coef: [0.01, 0.1], seed: [0, 1]}}
    rounds: 2                           # the closed loop (see below)
    presets: {tiny: {generate.model: tiny}}   # named override sets: --preset tiny

**Wiring.** Outputs flow as in ``rlhf quickstart`` unless a section sets the field itself:
sft.policy_dir → a later generate's model (candidates come from the SFT policy); generate.candidates → simulate/annotate; their rankings → export, rm_train; rm_train.model_dir and
eval_rankings → rm_eval; sft.policy_dir → ppo/baseline policy; rm_train.model_dir → ppo/baseline
reward; ppo.policy_dir → eval policy (sft as reference); sft and the trained policies → arena
policies, rm_train.model_dir → arena reward. Any string may reference an output with
``${stage.key}``.

**Caching.** Each stage's key is a hash of its resolved config (without ``runs_dir``, ``experiment``
and ``tracking``, with every wired input replaced by the hash of the stage that produced it, and
with the size and mtime of local input files). The key and the stage's result are stored in
``stage.json`` in the stage's run dir (and in ``runs/<name>/.cache/``, so runs of a sweep share
identical upstream stages). A stage reruns when its key changed, its outputs are gone, or
``--from`` names it or one of its inputs; everything downstream of a changed stage gets a new key.
A stage that reruns with another config first moves the earlier result aside, to
``runs/<name>/<stage>@<its key[:8]>/`` (its cache entry follows), so both stay on disk and going back
to the earlier override reuses it.

**Annotation by people** (stage ``annotate``): the candidates are imported into the annotation app's
database; when every prompt has reached its quorum the submitted rankings are exported and the
pipeline goes on. Otherwise the run waits (``wait: true``) or stops with the commands to serve the
app and to resume.

**Rounds** (``rounds: N``): after the first pass, each round samples candidates from the latest
policy on prompts not used yet (``round.select: next``, or ``uncertainty``: the prompts whose
candidates an ensemble of reward models disagrees on most), annotates them, retrains the reward
model on all rankings so far and continues PPO from the last policy. Every round's stages log to
W&B with the tag ``round=<r>`` and artifact lineage rankings → reward model → policy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

# The runner's parts live in experiments/pipeline/: experiment_file (the file, overrides, references,
# sweeps), plan (the stage graph and its wiring), run_context (each stage's config and W&B run), cache,
# validation (before anything runs), internal_stages and execution. Every name this module held stays
# importable from here, kept for user code (the noqa: F401 imports).
from experiments.pipeline.cache import (  # noqa: F401
    OUTPUT_KEYS,
    cached_result,
    stage_key,
    store_result,
)
from experiments.pipeline.execution import run_experiment, run_plan  # noqa: F401
from experiments.pipeline.experiment_file import (  # noqa: F401
    GOLD_FIELDS,
    INTERNAL_STAGES,
    LIBRARY_STAGES,
    REF,
    TOP_LEVEL_KEYS,
    USER_STAGES,
    Experiment,
    apply_overrides,
    load_raw,
    parse_experiment,
    stage_kind,
    sweep_points,
    sweep_run_id,
    wandb_sweep_yaml,
)
from experiments.pipeline.internal_stages import (  # noqa: F401
    ANNOTATE_FIELDS,
    INTERNAL_INPUTS,
    INTERNAL_OUTPUTS,
    AnnotationPending,
    InternalStageConfig,
    ensemble_disagreement,
    log_internal_stage,
    run_annotate,
    run_internal,
    run_select,
)
from experiments.pipeline.plan import (  # noqa: F401
    RANKINGS_PRODUCERS,
    Node,
    build_plan,
    default_wiring,
    stage_fingerprints,
    sweep_dependencies,
    upstream_of,
)
from experiments.pipeline.run_context import AGENT_ENV, RunContext, agent_run_env, stage_tracking  # noqa: F401
from experiments.pipeline.validation import (  # noqa: F401
    DATA_FILE_SUFFIXES,
    INPUT_CHECKS,
    _most_specific,
    check_plan,
    check_sweep,
)
from rlhf.config import ConfigProblems, parse_overrides
from rlhf.errors import ConfigError
from rlhf.stage_results import keep_earlier_result  # noqa: F401


def _cmd_run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides or [])
    if args.wandb_sweep:
        raw, parsed_overrides = load_raw(args.file), parse_overrides(overrides)
        exp = parse_experiment(raw, args.file, args.preset, parsed_overrides)
        if not exp.sweep:
            raise ConfigError(f"--wandb-sweep: {args.file} has no `sweep:` block")
        # the agent runs each point later: a typo must stop the sweep before it is created
        problems = check_sweep(raw, args.file, args.preset, parsed_overrides, sweep_points(exp.sweep))
        if problems:
            raise ConfigProblems(problems, where=args.file)
        spec = wandb_sweep_yaml(exp, args.file, args.preset, overrides)
        Path(args.wandb_sweep).parent.mkdir(parents=True, exist_ok=True)
        Path(args.wandb_sweep).write_text(yaml.safe_dump(spec, sort_keys=False))
        print(
            f"wrote {args.wandb_sweep}; start it with:\n  wandb sweep {args.wandb_sweep}\n"
            f"  wandb agent <entity>/<project>/<sweep id printed by the line above>"
        )
        return 0
    only = [int(x) for x in args.only.split(",")] if args.only else None
    if args.dry_run:
        print(f"plan for {args.file} (nothing runs):")
    run_experiment(
        args.file,
        overrides,
        preset=args.preset,
        force_from=args.from_stage,
        dry_run=args.dry_run,
        sweep_run=args.sweep_run,
        only=only,
    )
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "experiment",
        help="run a named pipeline, sweep or closed loop from a YAML file",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="experiment_command", metavar="{run}", required=True)
    r = sub.add_parser(
        "run",
        help="run an experiment file (cached: only changed stages rerun)",
        description="Run FILE's stages in order, reusing every stage whose config and inputs did "
        "not change. Overrides after FILE: stage.field=value (ppo.kl_coef=0.1) or a top-level "
        "key (seed=3, rounds=2, tracking.mode=disabled).",
    )
    r.add_argument("file", metavar="FILE.yaml", help="experiment file, e.g. experiments/quickstart.yaml")
    r.add_argument("--preset", default=None, help="apply the file's named override set (e.g. tiny)")
    r.add_argument(
        "--from",
        dest="from_stage",
        metavar="STAGE",
        default=None,
        help="rerun this stage and everything after it that uses its outputs, even if cached",
    )
    r.add_argument(
        "--dry_run", action="store_true", help="print which stages would run or be reused; run nothing"
    )
    r.add_argument(
        "--wandb_sweep",
        metavar="OUT.yaml",
        default=None,
        help="write the W&B sweep YAML for the file's sweep block (and print how to start the agent) "
        "instead of running locally",
    )
    r.add_argument(
        "--sweep_run",
        action="store_true",
        help="(used by wandb agent) run one sweep point given as overrides, in its sweep folder",
    )
    r.add_argument(
        "--only", default=None, metavar="I,J", help="run only these sweep points (0-based indices)"
    )
    r.set_defaults(func=_cmd_run, overrides=[])
    return p


if __name__ == "__main__":  # pragma: no cover
    from rlhf.cli import main

    sys.exit(main(["experiment", *sys.argv[1:]]))
