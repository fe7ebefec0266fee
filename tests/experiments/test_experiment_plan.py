"""Pure parts of the experiment runner: parsing, overrides, sweeps, the unrolled plan, cache keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from experiments.runner import (
    Node,
    apply_overrides,
    build_plan,
    cached_result,
    ensemble_disagreement,
    parse_experiment,
    stage_key,
    sweep_points,
    sweep_run_id,
    wandb_sweep_yaml,
)
from rlhf.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "experiments").glob("*.yaml"))


def test_grid_sweep_is_the_product_in_file_order():
    pts = sweep_points({"method": "grid", "parameters": {"ppo.kl_coef": [0.01, 0.1], "seed": [0, 1]}})
    assert pts == [
        {"ppo.kl_coef": 0.01, "seed": 0},
        {"ppo.kl_coef": 0.01, "seed": 1},
        {"ppo.kl_coef": 0.1, "seed": 0},
        {"ppo.kl_coef": 0.1, "seed": 1},
    ]
    assert sweep_run_id(pts[1]) == "ppo.kl_coef=0.01,seed=1"


def test_random_sweep_is_seeded_and_in_range():
    spec = {
        "method": "random",
        "count": 5,
        "seed": 3,
        "parameters": {
            "ppo.learning_rate": {"min": 1e-6, "max": 1e-3, "distribution": "log_uniform"},
            "rm_train.loss": ["bt", "davidson"],
        },
    }
    a, b = sweep_points(spec), sweep_points(spec)
    assert a == b and len(a) == 5
    assert all(1e-6 <= p["ppo.learning_rate"] <= 1e-3 and p["rm_train.loss"] in ("bt", "davidson") for p in a)


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"method": "grid", "parameters": {"a.b": []}}, "non-empty list"),
        ({"method": "random", "parameters": {"a.b": [1]}}, "count"),
        ({"method": "bayes", "parameters": {"a.b": [1]}}, "grid or random"),
        ({"parameters": {}}, "parameters"),
    ],
)
def test_bad_sweeps_are_rejected(bad, match):
    with pytest.raises(ConfigError, match=match):
        sweep_points(bad)


def test_overrides_reach_stage_sections_and_top_level_keys():
    raw = {"name": "x", "stages": {"ppo": {"kl_coef": 0.05}, "sft": None}}
    out = apply_overrides(raw, {"ppo.kl_coef": 0.1, "sft.lora": True, "seed": 3, "tracking.mode": "disabled"})
    assert out["stages"]["ppo"]["kl_coef"] == 0.1 and out["stages"]["sft"] == {"lora": True}
    assert out["seed"] == 3 and out["tracking"] == {"mode": "disabled"}
    assert raw["stages"]["ppo"]["kl_coef"] == 0.05  # the file's mapping is not modified
    with pytest.raises(ConfigError, match="'rm' is neither a stage"):
        apply_overrides(raw, {"rm.loss": "bt"})


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"stages": {"ppo": {}}, "colour": 1}, "unknown key 'colour'"),
        ({"stages": {"orpo": {}}}, "unknown stage 'orpo'"),
        ({"stages": {}}, "stages"),
        ({"stages": {"ppo": {}}, "rounds": 2}, "needs a generate stage"),
        ({"stages": {"ppo": {}}, "name": "a b"}, "name"),
    ],
)
def test_bad_experiment_files_name_the_problem(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_experiment(raw, "x.yaml")


def test_default_wiring_follows_quickstart_and_explicit_refs_win():
    exp = parse_experiment(
        {
            "name": "w",
            "stages": {
                "generate": {},
                "simulate": {},
                "export": {},
                "rm_train": {},
                "rm_eval": {},
                "sft": {},
                "ppo": {"reward": "vader"},
                "eval": {"reward": "${rm_train.model_dir}"},
            },
        }
    )
    plan = {n.name: {**n.wired, **n.section} for n in build_plan(exp)}
    assert plan["simulate"]["candidates"] == "${generate.candidates}"
    assert plan["export"]["rankings"] == plan["rm_train"]["rankings"] == "${simulate.rankings}"
    assert plan["rm_eval"] == {
        "reward_model": "${rm_train.model_dir}",
        "rankings": "${rm_train.eval_rankings}",
    }
    assert plan["ppo"] == {"policy": "${sft.policy_dir}", "reward": "vader"}
    assert plan["eval"] == {
        "policy": "${ppo.policy_dir}",
        "reference": "${sft.policy_dir}",
        "reward": "${rm_train.model_dir}",
    }


def test_the_arena_judges_the_answers_eval_sampled():
    exp = parse_experiment({"stages": {"sft": {}, "ppo": {"reward": "vader"}, "eval": {}, "arena": {}}})
    plan = {n.name: {**n.wired, **n.section} for n in build_plan(exp)}
    assert plan["arena"] == {
        "policies": ["sft=${sft.policy_dir}", "ppo=${ppo.policy_dir}"],
        "responses_from": "${eval.run_dir}",
    }
    without_eval = parse_experiment({"stages": {"sft": {}, "ppo": {"reward": "vader"}, "arena": {}}})
    assert "responses_from" not in {n.name: n.wired for n in build_plan(without_eval)}["arena"]


def test_dpo_takes_the_sft_policy_and_the_rankings_and_eval_judges_it():
    exp = parse_experiment(
        {"stages": {"sft": {}, "generate": {}, "simulate": {}, "dpo": {"loss": "rao_kupper"}, "eval": {}}}
    )
    plan = {n.name: {**n.wired, **n.section} for n in build_plan(exp)}
    assert plan["dpo"] == {
        "policy": "${sft.policy_dir}",
        "rankings": "${simulate.rankings}",
        "loss": "rao_kupper",
    }
    assert plan["eval"] == {"policy": "${dpo.policy_dir}", "reference": "${sft.policy_dir}"}


def test_a_reference_to_a_missing_stage_is_an_error():
    exp = parse_experiment({"stages": {"ppo": {"reward": "${rm_train.model_dir}"}}})
    with pytest.raises(ConfigError, match="names no stage"):
        build_plan(exp)


def test_rounds_unroll_into_a_closed_loop():
    exp = parse_experiment(
        {
            "name": "loop",
            "rounds": 3,
            "round": {"prompts_per_round": 4},
            "stages": {"generate": {}, "simulate": {}, "rm_train": {}, "sft": {}, "ppo": {}},
        }
    )
    plan = {n.name: {**n.wired, **n.section} for n in build_plan(exp)}
    # round 2 samples from round 1's policy on unused prompts, retrains on all rankings, continues PPO
    assert plan["generate@2"]["model"] == "${ppo.policy_dir}"
    assert plan["generate@2"]["prompts"] == "${prompts@2.prompts}"
    assert plan["prompts@2"]["exclude"] == ["${simulate.rankings}"]
    assert plan["collect@2"]["rankings"] == ["${simulate.rankings}", "${simulate@2.rankings}"]
    assert plan["rm_train@2"]["rankings"] == "${collect@2.rankings}"
    assert plan["ppo@2"] == {"policy": "${ppo.policy_dir}", "reward": "${rm_train@2.model_dir}"}
    # round 3 builds on round 2
    assert plan["generate@3"]["model"] == "${ppo@2.policy_dir}"
    assert plan["prompts@3"]["exclude"] == ["${simulate.rankings}", "${simulate@2.rankings}"]
    assert plan["collect@3"]["rankings"][-1] == "${simulate@3.rankings}"
    assert plan["ppo@3"]["policy"] == "${ppo@2.policy_dir}"
    assert "sft@2" not in plan  # SFT happens once


def test_uncertainty_rounds_train_an_ensemble_and_select():
    exp = parse_experiment(
        {
            "rounds": 2,
            "round": {"select": "uncertainty", "ensemble": 3, "prompts_per_round": 2},
            "stages": {"generate": {}, "simulate": {}, "rm_train": {"seed": 5}, "sft": {}, "ppo": {}},
        }
    )
    plan = {n.name: n for n in build_plan(exp)}
    sel = plan["select@2"].section
    assert sel["reward_models"] == [
        "${rm_train.model_dir}",
        "${rm_ens1@2.model_dir}",
        "${rm_ens2@2.model_dir}",
    ]
    assert {plan["rm_ens1@2"].section["seed"], plan["rm_ens2@2"].section["seed"]} == {1005, 2005}
    assert {**plan["simulate@2"].wired, **plan["simulate@2"].section}[
        "candidates"
    ] == "${select@2.candidates}"


def test_ensemble_disagreement_by_hand():
    # 2 members, 2 candidates: variances (0.5²=0.25) and 0 → mean 0.125
    assert ensemble_disagreement([[1.0, 2.0], [2.0, 2.0]]) == pytest.approx(0.125)
    assert ensemble_disagreement([[1.0, 2.0], [1.0, 2.0]]) == 0.0
    assert ensemble_disagreement([[1.0]]) == 0.0


def test_cache_key_ignores_run_location_but_not_config(tmp_path):
    a = stage_key(
        "ppo", {"kl_coef": 0.1, "runs_dir": "a", "experiment": "x", "tracking": {"mode": "offline"}}, tmp_path
    )
    b = stage_key(
        "ppo",
        {"kl_coef": 0.1, "runs_dir": "b", "experiment": "y", "tracking": {"mode": "disabled"}},
        tmp_path,
    )
    c = stage_key("ppo", {"kl_coef": 0.2, "runs_dir": "a"}, tmp_path)
    assert a == b != c
    f = tmp_path.parent / "prompts_input.jsonl"
    f.write_text("{}\n")
    k1 = stage_key("generate", {"prompts": str(f)}, tmp_path)
    f.write_text('{"changed": 1}\n')  # an edited input file changes the key
    assert stage_key("generate", {"prompts": str(f)}, tmp_path) != k1


def test_cached_result_needs_matching_stage_json_and_outputs(tmp_path):
    run = tmp_path / "runs" / "x" / "simulate"
    run.mkdir(parents=True)
    out = run / "rankings.jsonl"
    out.write_text("{}\n")
    info = {"key": "k1", "result": {"run_dir": str(run), "rankings": str(out)}}
    (run / "stage.json").write_text(json.dumps(info))
    assert cached_result("k1", run, tmp_path / "cache") == info["result"]
    assert cached_result("k2", run, tmp_path / "cache") is None  # the dir holds another config's run
    out.unlink()
    assert cached_result("k1", run, tmp_path / "cache") is None  # outputs gone → rerun


def test_wandb_sweep_yaml_passes_swept_values_as_overrides():
    exp = parse_experiment(
        {
            "name": "kl",
            "stages": {"ppo": {}},
            "tracking": {"project": "lab"},
            "sweep": {"method": "grid", "parameters": {"ppo.kl_coef": [0.01, 0.1]}},
        }
    )
    spec = wandb_sweep_yaml(exp, "experiments/kl_sweep.yaml", "tiny", ["seed=1"])
    assert spec["parameters"] == {"ppo.kl_coef": {"values": [0.01, 0.1]}}
    assert spec["command"][-1] == "${args_no_hyphens}" and "--sweep-run" in spec["command"]
    assert spec["project"] == "lab" and spec["method"] == "grid"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_experiments_parse_with_every_preset(path):
    raw = yaml.safe_load(path.read_text())
    for preset in [None, *(raw.get("presets") or {})]:
        exp = parse_experiment(raw, str(path), preset)
        assert build_plan(exp)
        if exp.sweep:
            assert sweep_points(exp.sweep)


def test_node_refs():
    n = Node(
        "eval",
        "eval",
        {"policy": "${ppo@2.policy_dir}", "x": ["${a.b}"]},
        {"reward": "${rm_train.model_dir}"},
    )
    assert n.refs() == {"ppo@2", "a", "rm_train"}


def test_agent_run_env_hides_the_agents_run_from_other_stages(monkeypatch):
    from experiments.runner import agent_run_env

    monkeypatch.setenv("WANDB_RUN_ID", "abc")
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw")
    import os

    with agent_run_env(keep=False):
        assert "WANDB_RUN_ID" not in os.environ and "WANDB_SWEEP_ID" not in os.environ
    assert os.environ["WANDB_RUN_ID"] == "abc" and os.environ["WANDB_SWEEP_ID"] == "sw"
    with agent_run_env(keep=True):
        assert os.environ["WANDB_RUN_ID"] == "abc"
