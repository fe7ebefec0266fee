"""`rlhf experiment run` end to end on the tiny model, through the real command line.

Caching (nothing reruns; a changed field reruns that stage and what depends on it; --from), a 2 × 2
sweep read back from W&B offline files and compared, human annotation that stops and resumes, and
two rounds of the closed loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf.cli import main

REPO = Path(__file__).resolve().parents[2]
WANDB = Path(sys.executable).parent / "wandb"


def write_exp(path: Path, spec: dict) -> str:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return str(path)


def statuses(summary_file: Path) -> dict[str, str]:
    return {k: v["status"] for k, v in json.loads(summary_file.read_text())["stages"].items()}


def ran(summary_file: Path) -> set[str]:
    return {k for k, s in statuses(summary_file).items() if s == "ran"}


GEN = {"model": "tiny", "limit": 4, "k": 3, "max_new_tokens": 6, "batch_size": 12}


def test_cache_reruns_only_what_changed(tmp_path, capsys):
    runs = tmp_path / "runs"
    f = write_exp(
        tmp_path / "e.yaml",
        {
            "name": "cache",
            "runs_dir": str(runs),
            "tracking": {"mode": "disabled"},
            "stages": {"generate": GEN, "simulate": {"scorer": "length:target=3"}, "export": {}},
        },
    )
    summary = runs / "cache" / "experiment_summary.json"
    assert main(["experiment", "run", f]) == 0
    assert ran(summary) == {"generate", "simulate", "export"}
    stage_json = {
        s: json.loads((runs / "cache" / s / "stage.json").read_text())
        for s in ("generate", "simulate", "export")
    }
    assert stage_json["simulate"]["result"]["rankings"].endswith("rankings.jsonl")
    mtimes = {
        p: p.stat().st_mtime_ns
        for p in (runs / "cache").rglob("*")
        if p.is_file() and ".cache" not in p.parts
    }

    # 1. nothing changed: nothing reruns, no file is touched
    assert main(["experiment", "run", f]) == 0
    assert set(statuses(summary).values()) == {"cached"}
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p.name != "experiment_summary.json")

    # 2. a simulate field changed: simulate and export (its dependant) rerun, generate does not
    assert main(["experiment", "run", f, "simulate.temperature=0.5"]) == 0
    assert ran(summary) == {"simulate", "export"}
    assert yaml.safe_load((runs / "cache" / "simulate" / "config.yaml").read_text())["temperature"] == 0.5
    new_key = json.loads((runs / "cache" / "simulate" / "stage.json").read_text())["key"]
    assert new_key != stage_json["simulate"]["key"]

    # 3. a field only export reads: export alone reruns
    assert main(["experiment", "run", f, "simulate.temperature=0.5", "export.drop_ties=true"]) == 0
    assert ran(summary) == {"export"}

    # 4. --from forces a stage and its dependants; --dry-run only prints the plan
    capsys.readouterr()
    assert (
        main(
            [
                "experiment",
                "run",
                f,
                "simulate.temperature=0.5",
                "export.drop_ties=true",
                "--from",
                "simulate",
                "--dry-run",
            ]
        )
        == 0
    )
    plan = capsys.readouterr().out
    assert (
        "generate       cached" in plan and "simulate       forced" in plan and "export         run" in plan
    )
    assert (
        main(
            [
                "experiment",
                "run",
                f,
                "simulate.temperature=0.5",
                "export.drop_ties=true",
                "--from",
                "simulate",
            ]
        )
        == 0
    )
    assert ran(summary) == {"simulate", "export"}

    # 5. bad input: one line, exit 2
    assert main(["experiment", "run", f, "ppo.kl_coef=0.1"]) == 2
    assert "'ppo' is neither a stage" in capsys.readouterr().err
    assert main(["experiment", "run", f, "simulate.temprature=0.5"]) == 2
    assert "temprature" in capsys.readouterr().err
    assert main(["experiment", "run", f, "--from", "ppo"]) == 2
    # a typo in a later stage is caught before the first stage runs
    f2 = write_exp(
        tmp_path / "typo.yaml",
        {
            "name": "typo",
            "runs_dir": str(runs),
            "tracking": {"mode": "disabled"},
            "stages": {"generate": GEN, "simulate": {"scorr": "vader"}},
        },
    )
    assert main(["experiment", "run", f2]) == 2
    assert "stages.simulate.scorr: unknown config key (did you mean 'scorer'?)" in capsys.readouterr().err
    assert not (runs / "typo").exists()


def test_changing_a_ppo_field_reruns_only_ppo_and_eval(tmp_path):
    runs = tmp_path / "runs"
    f = write_exp(
        tmp_path / "p.yaml",
        {
            "name": "ppo_cache",
            "runs_dir": str(runs),
            "tracking": {"mode": "disabled"},
            "stages": {
                "sft": {
                    "model": "tiny",
                    "max_examples": 8,
                    "batch_size": 4,
                    "learning_rate": 1e-3,
                    "eval_fraction": 0.0,
                },
                "ppo": {
                    "reward": "length:target=4",
                    "total_episodes": 8,
                    "batch_size": 8,
                    "minibatch_size": 8,
                    "micro_batch_size": 8,
                    "ppo_epochs": 1,
                    "response_length": 4,
                    "num_eval_prompts": 0,
                    "sample_every": 0,
                    "learning_rate": 1e-3,
                },
                "eval": {"reward": "length:target=4", "num_prompts": 4, "max_new_tokens": 4},
            },
        },
    )
    summary = runs / "ppo_cache" / "experiment_summary.json"
    assert main(["experiment", "run", f]) == 0
    assert ran(summary) == {"sft", "ppo", "eval"}
    ppo_cfg = yaml.safe_load((runs / "ppo_cache" / "ppo" / "config.yaml").read_text())
    assert ppo_cfg["policy"] == str(runs / "ppo_cache" / "sft" / "policy")  # wired from sft
    assert main(["experiment", "run", f]) == 0
    assert ran(summary) == set()
    assert main(["experiment", "run", f, "ppo.kl_coef=0.2"]) == 0
    assert ran(summary) == {"ppo", "eval"}
    assert yaml.safe_load((runs / "ppo_cache" / "ppo" / "config.yaml").read_text())["kl_coef"] == 0.2


def _leet(run_wandb_dir: Path) -> dict:
    out = subprocess.run(
        [str(WANDB), "leet", "inspect", "--json", str(run_wandb_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for line in out.splitlines():
        rec = json.loads(line)
        if rec.get("type") == "run":
            return rec["run"]
    raise AssertionError("no run record in " + out[:500])


def test_sweep_two_seeds_by_two_kl_values_compare_and_wandb_group(tmp_path):
    runs = tmp_path / "runs"
    f = write_exp(
        tmp_path / "s.yaml",
        {
            "name": "kl_tiny",
            "runs_dir": str(runs),
            "tracking": {"mode": "offline"},
            "stages": {
                # (SFT sends nothing to W&B here only to keep the test short: one W&B run fewer)
                "sft": {
                    "model": "tiny",
                    "max_examples": 8,
                    "batch_size": 4,
                    "learning_rate": 1e-3,
                    "eval_fraction": 0.0,
                    "tracking": {"mode": "disabled"},
                },
                "ppo": {
                    "reward": "length:target=4",
                    "total_episodes": 8,
                    "batch_size": 8,
                    "minibatch_size": 8,
                    "micro_batch_size": 8,
                    "ppo_epochs": 1,
                    "response_length": 4,
                    "num_eval_prompts": 0,
                    "sample_every": 0,
                    "learning_rate": 1e-3,
                },
            },
            "sweep": {"method": "grid", "parameters": {"ppo.kl_coef": [0.01, 0.5], "ppo.seed": [0, 1]}},
        },
    )
    assert main(["experiment", "run", f]) == 0
    sweep = json.loads((runs / "kl_tiny" / "sweep.json").read_text())
    assert [r["values"] for r in sweep["runs"]] == [
        {"ppo.kl_coef": 0.01, "ppo.seed": 0},
        {"ppo.kl_coef": 0.01, "ppo.seed": 1},
        {"ppo.kl_coef": 0.5, "ppo.seed": 0},
        {"ppo.kl_coef": 0.5, "ppo.seed": 1},
    ]
    # SFT does not depend on the swept fields: it ran once and the other three points reused it
    assert [r["stages"]["sft"]["status"] for r in sweep["runs"]] == ["ran", "cached", "cached", "cached"]
    assert all(r["stages"]["ppo"]["status"] == "ran" for r in sweep["runs"])

    out = tmp_path / "cmp"
    assert (
        main(
            [
                "compare",
                str(runs / "kl_tiny"),
                "--stage",
                "ppo",
                "--metrics",
                "objective/scores,objective/kl",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "index.html").read_text()
    assert "data:image/png;base64," in page and "kl_coef=0.01" in page and "kl_coef=0.5" in page
    csv = (out / "final.csv").read_text().splitlines()
    assert len(csv) == 3 and all(line.split(",")[1] == "2" for line in csv[1:])  # 2 seeds per group

    # the W&B runs of the sweep share one group and carry the swept values in their config (under
    # config.sweep too, what `rlhf report` groups by), each under its own name
    seen, names = set(), set()
    for point in sweep["runs"]:
        ppo_dir = Path(point["stages"]["ppo"]["run_dir"])
        (wandb_dir,) = list((ppo_dir / "wandb").glob("offline-run-*"))
        run = _leet(wandb_dir)
        cfg = run["config"]["update"]
        kl, seed = point["values"]["ppo.kl_coef"], point["values"]["ppo.seed"]
        assert run["run_group"] == "kl_tiny" and run["job_type"] == "ppo"
        assert cfg["kl_coef"] == kl and cfg["seed"] == seed
        assert cfg["sweep"]["ppo"] == {"kl_coef": kl, "seed": seed}
        assert f"ppo.kl_coef={kl}" in run["tags"] and "shared" not in run["tags"]
        assert run["display_name"] == f"kl_tiny-ppo-kl_coef={kl}-seed={seed}"
        seen.add((cfg["kl_coef"], cfg["seed"]))
        names.add(run["display_name"])
    assert len(seen) == 4 and len(names) == 4


def test_wandb_sweep_file(tmp_path, capsys):
    out = tmp_path / "sweep.yaml"
    assert (
        main(
            [
                "experiment",
                "run",
                str(REPO / "experiments" / "kl_sweep.yaml"),
                "--preset",
                "tiny",
                "--wandb-sweep",
                str(out),
            ]
        )
        == 0
    )
    spec = yaml.safe_load(out.read_text())
    assert spec["parameters"]["ppo.kl_coef"] == {"values": [0.01, 0.2]}
    assert spec["project"] == "rlhf-lab"  # where the stage runs log: the agent's runs join them
    assert "wandb agent" in capsys.readouterr().out


def test_each_stage_run_is_named_and_tagged_by_the_swept_values_it_depends_on():
    from experiments.runner import (
        RunContext,
        build_plan,
        load_raw,
        parse_experiment,
        stage_tracking,
        sweep_dependencies,
        sweep_points,
    )

    file = str(REPO / "experiments" / "kl_sweep.yaml")
    raw = load_raw(file)
    points = sweep_points(parse_experiment(raw, file, "tiny").sweep)

    def variant(values):
        return parse_experiment(raw, file, "tiny", values)

    names: dict[str, set[str]] = {}
    for values in points:
        exp = variant(values)
        ctx = RunContext(exp, Path("runs"), [f"experiment={exp.name}"], values)
        ctx.stage_values, ctx.shared_stages = sweep_dependencies(variant, values, points)
        for node in build_plan(exp):
            tracking = stage_tracking(ctx, node)
            names.setdefault(node.name, set()).add(tracking["name"])
            if node.name == "ppo":
                kl, seed = values["ppo.kl_coef"], values["ppo.seed"]
                assert tracking["name"] == f"kl_sweep_tiny-ppo-kl_coef={kl}-seed={seed}"
                assert tracking["sweep"] == values and f"ppo.seed={seed}" in tracking["tags"]
            else:  # one run serves every point: none of the first point's values, the tag `shared`
                assert tracking["sweep"] == {} and "shared" in tracking["tags"]
                assert not any(t.startswith("ppo.") for t in tracking["tags"])
    assert len(names["ppo"]) == 4 and all(len(n) == 1 for stage, n in names.items() if stage != "ppo")

    loop = parse_experiment(load_raw(REPO / "experiments" / "closed_loop.yaml"), "closed_loop.yaml")
    ctx = RunContext(loop, Path("runs"), [], {})
    tracking = {n.name: stage_tracking(ctx, n) for n in build_plan(loop)}
    assert tracking["ppo@2"]["name"] == "closed_loop-ppo@2" and "round=2" in tracking["ppo@2"]["tags"]


def test_human_annotation_stops_with_resume_command_then_continues(tmp_path, capsys):
    from annotation_app.store import Store

    cands = tmp_path / "cands.jsonl"
    with open(cands, "w") as fh:
        for i in range(2):
            fh.write(
                json.dumps(
                    {
                        "prompt_id": f"p{i}",
                        "prompt": f"say something {i}",
                        "candidates": [
                            {"label": lab, "text": f"answer {lab} {i}", "model": "m", "gen": {}}
                            for lab in "ABC"
                        ],
                    }
                )
                + "\n"
            )
    runs = tmp_path / "runs"
    db = tmp_path / "lab.db"
    f = write_exp(
        tmp_path / "h.yaml",
        {
            "name": "human",
            "runs_dir": str(runs),
            "tracking": {"mode": "disabled"},
            "stages": {
                "annotate": {"candidates": str(cands), "db": str(db), "quorum": 1, "project": "r1"},
                "export": {},
            },
        },
    )
    assert main(["experiment", "run", f]) == 2
    err = capsys.readouterr().err
    assert "error[annotation_pending]" in err and "0/2 prompts" in err
    assert "rlhf annotate serve --db" in err and f"rlhf experiment run {f}" in err
    assert not (runs / "human" / "export").exists()

    store = Store(db)
    store.add_user("ann", "pw-123456")
    for _ in range(2):
        item = store.next_item("ann", "r1")
        store.submit("ann", item.prompt_id, "C > A = B")
    store.close()
    assert main(["experiment", "run", f]) == 0
    pairs = [json.loads(x) for x in (runs / "human" / "export" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 6 and sum(p["tie"] for p in pairs) == 2
    assert statuses(runs / "human" / "experiment_summary.json") == {"annotate": "ran", "export": "ran"}


SMALL_LOOP = [  # the shipped tiny preset, smaller still: no SFT (PPO starts from the tiny base), fewer steps
    "round.prompts_per_round=8",
    "rm_train.max_steps=2",
    "ppo.total_episodes=8",
    "ppo.num_eval_prompts=0",
    "ppo.policy=tiny",
]


def test_two_rounds_of_the_closed_loop(tmp_path):
    runs = tmp_path / "runs"
    raw = yaml.safe_load((REPO / "experiments" / "closed_loop.yaml").read_text())
    del raw["stages"]["sft"]
    tiny = {k: v for k, v in raw["presets"]["tiny"].items() if not k.startswith("sft.")}
    tiny["rm_train.config"] = str(REPO / "experiments" / tiny["rm_train.config"])  # the file now lives in tmp
    raw["presets"]["tiny"] = tiny
    f = write_exp(tmp_path / "loop.yaml", raw)
    assert (
        main(
            [
                "experiment",
                "run",
                f,
                "--preset",
                "tiny",
                f"runs_dir={runs}",
                "tracking.mode=disabled",
                *SMALL_LOOP,
            ]
        )
        == 0
    )
    root = runs / "closed_loop_tiny"
    summary = json.loads((root / "experiment_summary.json").read_text())["stages"]
    assert set(summary) >= {
        "generate",
        "simulate",
        "rm_train",
        "ppo",
        "prompts@2",
        "generate@2",
        "simulate@2",
        "collect@2",
        "rm_train@2",
        "ppo@2",
    }
    r1 = {json.loads(x)["prompt_id"] for x in Path(summary["simulate"]["rankings"]).read_text().splitlines()}
    r2 = {
        json.loads(x)["prompt_id"] for x in Path(summary["simulate@2"]["rankings"]).read_text().splitlines()
    }
    assert len(r1) == 8 and len(r2) == 8 and not r1 & r2  # fresh prompts each round
    assert summary["collect@2"]["n_rankings"] == 16  # the round-2 reward model trains on every ranking so far
    gen2 = yaml.safe_load((Path(summary["generate@2"]["run_dir"]) / "config.yaml").read_text())
    assert gen2["model"] == summary["ppo"]["policy_dir"]  # round 2 samples from round 1's policy
    ppo2 = yaml.safe_load((Path(summary["ppo@2"]["run_dir"]) / "config.yaml").read_text())
    assert (
        ppo2["policy"] == summary["ppo"]["policy_dir"]
        and ppo2["reward"] == summary["rm_train@2"]["model_dir"]
    )
    rm2 = yaml.safe_load((Path(summary["rm_train@2"]["run_dir"]) / "config.yaml").read_text())
    assert rm2["rankings"] == summary["collect@2"]["rankings"]
    assert (Path(summary["ppo@2"]["policy_dir"]) / "rlhf_policy.json").is_file()
    # the internal round stages record their inputs like every stage (W&B lineage rankings → RM → policy)
    collect = json.loads((Path(summary["collect@2"]["run_dir"]) / "summary.json").read_text())
    assert [i["type"] for i in collect["lineage/inputs"]] == ["dataset", "dataset"]
    assert yaml.safe_load((Path(summary["collect@2"]["run_dir"]) / "config.yaml").read_text())["round"] == 2


@pytest.mark.slow
def test_uncertainty_selection_round(tmp_path):
    runs = tmp_path / "runs"
    assert (
        main(
            [
                "experiment",
                "run",
                str(REPO / "experiments" / "closed_loop.yaml"),
                "--preset",
                "tiny",
                f"runs_dir={runs}",
                "tracking.mode=disabled",
                "round.select=uncertainty",
                "round.prompts_per_round=4",
                "round.pool=8",
            ]
        )
        == 0
    )
    summary = json.loads((runs / "closed_loop_tiny" / "experiment_summary.json").read_text())["stages"]
    sel = summary["select@2"]
    assert sel["select/pool"] == 8 and sel["select/selected"] == 4
    assert sel["select/disagreement_selected"] >= sel["select/disagreement_rest"]


def _artifacts(stage_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """The artifacts of a stage's offline W&B run: ``{"in": [(name, type)], "out": [...]}``, and the
    records themselves under ``"records"``."""
    (wandb_dir,) = list((stage_dir / "wandb").glob("offline-run-*"))
    out = subprocess.run(
        [str(WANDB), "leet", "inspect", "--json", str(wandb_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    records = [
        r["artifact"] for r in map(json.loads, filter(str.strip, out.splitlines())) if r["type"] == "artifact"
    ]
    records = [a for a in records if not a["type"].startswith("wandb-")]  # (W&B's own, for tables)
    return {
        "in": [(a["name"], a["type"]) for a in records if a.get("use_after_commit")],
        "out": [(a["name"], a["type"]) for a in records if not a.get("use_after_commit")],
        "records": records,
    }


def test_shipped_quickstart_tiny_offline_lineage_and_reruns_that_keep_earlier_results(tmp_path):
    runs = tmp_path / "runs"
    qs = str(REPO / "experiments" / "quickstart.yaml")
    common = ["--preset", "tiny", f"runs_dir={runs}", "tracking.mode=offline"]
    root = runs / "quickstart_tiny"
    summary = root / "experiment_summary.json"
    assert main(["experiment", "run", qs, *common]) == 0
    assert ran(summary) == {
        "generate",
        "simulate",
        "export",
        "rm_train",
        "rm_eval",
        "sft",
        "ppo",
        "eval",
        "arena",
    }

    # Lineage in the offline run files: every input is the artifact its producer logged, so after
    # `wandb sync` the graph reads candidates → rankings → reward model → policies across runs.
    exp = "quickstart_tiny"
    assert _artifacts(root / "simulate")["in"] == [(f"{exp}-candidates", "dataset")]
    assert (f"{exp}-rankings", "dataset") in _artifacts(root / "rm_train")["in"]
    ppo = _artifacts(root / "ppo")
    assert {(f"{exp}-reward-model", "model"), (f"{exp}-sft-policy", "model")} <= set(ppo["in"])
    assert ppo["out"] == [(f"{exp}-ppo-policy", "model")]
    evaluation = _artifacts(root / "eval")
    assert {(f"{exp}-ppo-policy", "model"), (f"{exp}-sft-policy", "model")} <= set(evaluation["in"])
    produced = next(a for a in ppo["records"] if a["name"] == f"{exp}-ppo-policy")
    used = next(a for a in evaluation["records"] if a["name"] == f"{exp}-ppo-policy")
    assert used["digest"] == produced["digest"]
    arena = _artifacts(root / "arena")  # the arena judged SFT and PPO, with the reward model as a judge
    assert {
        (f"{exp}-ppo-policy", "model"),
        (f"{exp}-sft-policy", "model"),
        (f"{exp}-reward-model", "model"),
    } <= set(arena["in"])
    assert (f"{exp}-arena-votes", "dataset") in arena["out"]
    sft = _artifacts(root / "sft")  # SFT records its demonstrations and its base model
    assert ("demonstrations", "dataset") in sft["in"] and ("base-tiny", "model") in sft["in"]
    # the KB-sized datasets are in the artifacts themselves (a teammate can download them)
    candidates = next(a for a in _artifacts(root / "generate")["records"] if a["name"] == f"{exp}-candidates")
    assert all("local_path" in e and "ref" not in e for e in candidates["manifest"]["contents"])

    assert main(["experiment", "run", qs, *common]) == 0
    assert ran(summary) == set()
    # another kl_coef: ppo and eval rerun, and the earlier results move aside instead of being overwritten
    assert main(["experiment", "run", qs, *common, "ppo.kl_coef=0.1"]) == 0
    assert ran(summary) == {"ppo", "eval", "arena"}
    (earlier_ppo,) = root.glob("ppo@*")
    assert yaml.safe_load((earlier_ppo / "config.yaml").read_text())["kl_coef"] == 0.05
    assert yaml.safe_load((root / "ppo" / "config.yaml").read_text())["kl_coef"] == 0.1
    assert (earlier_ppo / "policy").is_dir() and (root / "ppo" / "policy").is_dir()
    # going back to the earlier value reuses what was moved
    assert main(["experiment", "run", qs, *common]) == 0
    assert ran(summary) == set()
    stages = json.loads(summary.read_text())["stages"]
    assert stages["ppo"]["run_dir"] == str(earlier_ppo) and stages["eval"]["run_dir"].startswith(
        str(root / "eval@")
    )

    # A stage command run into the experiment's stage dir (here the evaluation, with its saved config)
    # moves the experiment's finished result aside instead of overwriting it, and the experiment
    # still reuses that result afterwards.
    assert main(["experiment", "run", qs, *common, "ppo.kl_coef=0.1"]) == 0
    assert ran(summary) == set()
    finished = json.loads((root / "eval" / "stage.json").read_text())
    assert main(["eval", "--config", str(root / "eval" / "config.yaml"), "num_prompts=2"]) == 0
    (kept,) = (
        d for d in root.glob("eval@*") if json.loads((d / "stage.json").read_text())["key"] == finished["key"]
    )
    assert (kept / "metrics.jsonl").read_text() and not (root / "eval" / "stage.json").exists()
    assert yaml.safe_load((root / "eval" / "config.yaml").read_text())["num_prompts"] == 2
    assert main(["experiment", "run", qs, *common, "ppo.kl_coef=0.1"]) == 0
    assert ran(summary) == set()
    assert json.loads(summary.read_text())["stages"]["eval"]["run_dir"] == str(kept)
