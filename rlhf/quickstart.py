"""``rlhf quickstart``: the whole loop on the embedded defaults, in one command.

generate → simulate → export pairs → reward model (train, eval) → SFT → PPO → evaluation,
every stage a W&B run (offline by default) in one group, every output under
``runs/<experiment>/<stage>/``. A preset is a YAML file in ``experiments/configs/``
(``quickstart_tiny.yaml``, ``quickstart_smollm2.yaml``) with one section per stage; each section is
that stage's config (``rlhf <stage> --help`` lists the fields). Outputs are wired from stage to
stage: the candidates file feeds the simulated annotators, their rankings feed the reward model,
and so on.

``--annotate`` stops after generation and opens the annotation app on the generated candidates,
for a lab that wants humans in the loop from the first round.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from rlhf.config import ConfigError, add_config_arguments, build_config, config_from_args, option, read_yaml
from rlhf.tracking import TrackingConfig

PRESETS = ("tiny", "smollm2")
STAGES = ("generate", "simulate", "export", "rm_train", "rm_eval", "sft", "ppo", "eval")


@dataclass
class QuickstartConfig:
    preset: str = option("smollm2", help="tiny (a few-layer model built in code: about a minute) or smollm2 "
                         "(the embedded SmolLM2-135M-Instruct)", choices=PRESETS)
    preset_file: str = option("", help="use this preset YAML instead of the shipped one")
    experiment: str = option("quickstart", help="experiment name: the W&B group and runs/<experiment>/")
    runs_dir: str = option("runs", help="root folder of run directories")
    seed: int = option(0, help="seed for every stage")
    stages: list[str] = option(default_factory=lambda: list(STAGES), help="stages to run, in loop order")
    annotate: bool = option(False, help="after generation, open the annotation app on the candidates instead "
                            "of simulating annotators")
    db: str = option("", help="annotation database for --annotate (default: runs/<experiment>/annotate/lab.db)")
    port: int = option(7860, help="annotation app port for --annotate")
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ConfigError(f"unknown stage {bad[0]!r}; stages: {', '.join(STAGES)}")


def preset_sections(cfg: QuickstartConfig) -> dict:
    if cfg.preset_file:
        return read_yaml(cfg.preset_file)
    ref = resources.files("experiments") / "configs" / f"quickstart_{cfg.preset}.yaml"
    with resources.as_file(ref) as path:
        return read_yaml(path)


def _stage_config(cls, section: dict, cfg: QuickstartConfig, wired: dict):
    common = {"experiment": cfg.experiment, "runs_dir": cfg.runs_dir, "seed": cfg.seed,
              "tracking": {"project": cfg.tracking.project, "mode": cfg.tracking.mode,
                           "tags": list(cfg.tracking.tags) + ["quickstart"], "entity": cfg.tracking.entity}}
    return build_config(cls, None, {**wired, **section}, base=common)


def run_quickstart(cfg: QuickstartConfig) -> dict:
    cfg.validate()
    sections = preset_sections(cfg)
    unknown = set(sections) - set(STAGES) - {"description"}
    if unknown:
        raise ConfigError(f"preset has unknown stage section {sorted(unknown)[0]!r}; stages: {', '.join(STAGES)}")
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}
    stages = [s for s in STAGES if s in cfg.stages and s in sections]
    print(f"quickstart ({cfg.preset}): {' → '.join(stages)}; runs in {Path(cfg.runs_dir) / cfg.experiment}/")

    def step(name: str, fn, cls, wired: dict) -> dict:
        print(f"\n== {name} ==", flush=True)
        t0 = time.time()
        out = fn(_stage_config(cls, sections.get(name) or {}, cfg, wired))
        timings[name] = time.time() - t0
        results[name] = out
        return out

    if "generate" in stages:
        from rlhf.generation import GenerateConfig, run_generate

        gen = step("generate", run_generate, GenerateConfig, {})
        if cfg.annotate:
            return _annotate(cfg, gen["candidates"])
    if "simulate" in stages:
        from reward_models.simulate import SimulateConfig, run_simulate

        step("simulate", run_simulate, SimulateConfig, {"candidates": results["generate"]["candidates"]})
    if "export" in stages:
        from rlhf.data import ExportConfig, run_export

        step("export", run_export, ExportConfig, {"rankings": results["simulate"]["rankings"]})
    if "rm_train" in stages:
        from reward_models.train import RMTrainConfig, run_rm_train

        step("rm_train", run_rm_train, RMTrainConfig, {"rankings": results["simulate"]["rankings"]})
    if "rm_eval" in stages:
        from reward_models.evaluate import RMEvalConfig, run_rm_eval

        step("rm_eval", run_rm_eval, RMEvalConfig, {"reward_model": results["rm_train"]["model_dir"],
                                                    "rankings": results["rm_train"]["eval_rankings"]})
    if "sft" in stages:
        from rlhf.sft import SFTConfig, run_sft

        step("sft", run_sft, SFTConfig, {})
    if "ppo" in stages:
        from rlhf.ppo.loop import PPOConfig, run_ppo

        step("ppo", run_ppo, PPOConfig, {"policy": results["sft"]["policy_dir"],
                                         "reward": results["rm_train"]["model_dir"]})
    if "eval" in stages:
        from rlhf.evaluate import EvalConfig, run_eval

        step("eval", run_eval, EvalConfig, {"policy": results["ppo"]["policy_dir"],
                                            "reference": results["sft"]["policy_dir"],
                                            "reward": results["rm_train"]["model_dir"]})
    summary = {"preset": cfg.preset, "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "stages": {k: {kk: vv for kk, vv in v.items() if isinstance(vv, (int, float, str))}
                          for k, v in results.items()}}
    out_dir = Path(cfg.runs_dir) / cfg.experiment
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quickstart_summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary, out_dir)
    return summary


def _print_summary(summary: dict, out_dir: Path) -> None:
    print("\n== summary ==")
    for name, secs in summary["timings_s"].items():
        print(f"  {name:<9} {secs:7.1f} s")
    stages = summary["stages"]
    if "rm_eval" in stages:
        acc = stages["rm_eval"].get("eval/pair_accuracy")
        if acc is not None:
            print(f"  reward model held-out pair accuracy: {acc:.3f}")
    if "eval" in stages:
        for key, val in stages["eval"].items():
            if isinstance(val, float):
                print(f"  {key}: {val:.4f}")
    print(f"  summary: {out_dir / 'quickstart_summary.json'}")
    print(f"  view the runs: wandb leet {out_dir}   (or `wandb sync {out_dir}/*/wandb/offline-run-*` to upload)")


def _annotate(cfg: QuickstartConfig, candidates: str) -> dict:
    from annotation_app.app import serve_candidates

    db = cfg.db or str(Path(cfg.runs_dir) / cfg.experiment / "annotate" / "lab.db")
    serve_candidates(candidates, db=db, port=cfg.port)
    return {"candidates": candidates, "db": db}


def add_parser(subparsers):
    p = subparsers.add_parser("quickstart", help="the whole loop on the embedded defaults, in one command",
                              description=__doc__)
    add_config_arguments(p, QuickstartConfig)
    p.set_defaults(func=lambda args: run_quickstart(config_from_args(args, QuickstartConfig)) and 0)
    return p
