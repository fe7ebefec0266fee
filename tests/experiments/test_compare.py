"""`rlhf compare` on hand-made run folders: grouping, mean ± std over seeds, PNG + HTML, errors."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import pytest
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg

from experiments.compare import (
    LABEL_MAX_CHARS,
    compare_runs,
    curve,
    draw_figure,
    final_value,
    find_run_dirs,
    group_runs,
    load_run,
    mean_std,
    short_values,
)
from rlhf.cli import main


def make_run(
    root: Path, values: dict, kl_coef: float, seed: int, scores: list[float], kls: list[float]
) -> Path:
    """A sweep point folder like `rlhf experiment run` writes, holding one ppo run dir."""
    point = root / "sweep" / ",".join(f"{k}={v}" for k, v in values.items())
    run = point / "exp" / "ppo"
    run.mkdir(parents=True)
    (point / "sweep_run.json").write_text(json.dumps({"experiment": "exp", "values": values}))
    (run / "config.yaml").write_text(
        yaml.safe_dump(
            {"kl_coef": kl_coef, "seed": seed, "runs_dir": str(point), "tracking": {"mode": "offline"}}
        )
    )
    with open(run / "metrics.jsonl", "w") as fh:
        for step, (s, k) in enumerate(zip(scores, kls), 1):
            fh.write(
                json.dumps({"step": step, "_time": 0.0, "objective/scores": s, "objective/kl": k}) + "\n"
            )
    (run / "summary.json").write_text(json.dumps({"objective/scores": scores[-1]}))
    return run


@pytest.fixture
def sweep_root(tmp_path) -> Path:
    root = tmp_path / "runs" / "exp"
    for kl in (0.01, 0.1):
        for seed in (0, 1):
            final = (1.0 if kl == 0.01 else 0.5) + 0.2 * seed
            make_run(
                root,
                {"ppo.kl_coef": kl, "ppo.seed": seed},
                kl,
                seed,
                [0.0, final / 2, final],
                [0.0, 1.0, 4.0],
            )
    (root / "generate").mkdir()  # a shared stage dir without metrics is ignored by --stage
    return root


def test_mean_std_by_hand():
    assert mean_std([1.0, 1.2]) == pytest.approx((1.1, math.sqrt(0.02)))
    assert mean_std([3.0]) == (3.0, 0.0)


def test_compare_groups_by_swept_fields_and_averages_seeds(sweep_root, tmp_path):
    res = compare_runs(
        [str(sweep_root)], ["objective/scores", "objective/kl"], str(tmp_path / "cmp"), stage="ppo"
    )
    assert res["runs"] == 4 and res["group_by"] == ["ppo.kl_coef"]
    g = res["groups"]
    assert g["kl_coef=0.01"]["objective/scores"] == pytest.approx((1.1, math.sqrt(0.02)))
    assert g["kl_coef=0.1"]["objective/scores"] == pytest.approx((0.6, math.sqrt(0.02)))
    assert g["kl_coef=0.1"]["objective/kl"] == pytest.approx((4.0, 0.0))
    png = Path(res["png"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    page = Path(res["html"]).read_text()
    assert base64.b64encode(png).decode()[:200] in page  # the PNG is embedded: the page stands alone
    assert "kl_coef=0.01" in page and "1.1 ± 0.14" in page and "<img" in page and 'src="http' not in page
    csv = Path(res["csv"]).read_text().splitlines()
    assert csv[0].startswith("group,runs,objective/scores mean")
    assert len(csv) == 3


def test_sqrt_x_axis_and_final_value_fallback(sweep_root):
    run_dir = next(sweep_root.rglob("ppo"))
    run = load_run(run_dir)
    xs, ys = curve(run, "objective/scores", "sqrt:objective/kl")
    assert xs == [0.0, 1.0, 2.0] and len(ys) == 3
    assert final_value(run, "objective/kl") == 4.0  # not in summary.json: the last logged value


def test_groups_by_differing_config_when_not_a_sweep(tmp_path):
    for name, loss, acc in (("a", "bt", 0.6), ("b", "davidson", 0.7)):
        run = tmp_path / name / "rm_eval"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(
            yaml.safe_dump({"loss": loss, "seed": 0, "runs_dir": str(tmp_path / name)})
        )
        (run / "metrics.jsonl").write_text(
            json.dumps({"step": 0, "_time": 0, "eval/pair_accuracy": acc}) + "\n"
        )
    res = compare_runs(
        [str(tmp_path / "a"), str(tmp_path / "b")], ["eval/pair_accuracy"], str(tmp_path / "out")
    )
    assert res["group_by"] == ["loss"]
    assert res["groups"]["loss=davidson"]["eval/pair_accuracy"] == pytest.approx((0.7, 0.0))


def test_compare_cli_and_its_errors(sweep_root, tmp_path, capsys):
    out = tmp_path / "cli_out"
    assert (
        main(
            ["compare", str(sweep_root), "--stage", "ppo", "--metrics", "objective/scores", "--out", str(out)]
        )
        == 0
    )
    assert (out / "curves.png").is_file() and (out / "index.html").is_file()
    assert "kl_coef=0.01: objective/scores=1.1" in capsys.readouterr().out
    assert main(["compare", str(sweep_root), "--metrics", "nope/metric", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "nope/metric" in err and "objective/scores" in err
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "neither a run folder" in capsys.readouterr().err


def test_report_offline_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["report", "exp"]) == 2
    err = capsys.readouterr().err
    assert "offline" in err and "rlhf compare" in err


def test_runs_that_differ_only_in_paths_are_labelled_by_the_part_that_differs(tmp_path):
    for name in ("eval", "eval_rloo"):
        run = tmp_path / name / "exp" / "eval" if name != "eval" else tmp_path / "eval"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"policy": f"runs/{name}/policy", "seed": 0}))
        score = 1.0 if name == "eval" else 2.0
        (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "_time": 0, "eval/score": score}) + "\n")
    res = compare_runs([str(tmp_path)], ["eval/score"], str(tmp_path / "out"))
    assert res["group_by"] == ["policy"]
    assert res["groups"] == {
        "policy=eval": {"eval/score": (1.0, 0.0)},
        "policy=eval_rloo": {"eval/score": (2.0, 0.0)},
    }


def test_a_field_only_some_runs_set_does_not_merge_the_others(tmp_path):
    """One evaluation made by an experiment (it records its round) and two made by hand (no round):
    the policy, which every run sets, names the groups, not the round."""
    for name, extra in (("ppo", {"round": 1}), ("dpo", {}), ("kto", {})):
        run = tmp_path / name / "eval"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"policy": f"runs/{name}/policy", **extra}))
        (run / "metrics.jsonl").write_text(
            json.dumps({"step": 0, "_time": 0, "eval/score": len(name)}) + "\n"
        )
    res = compare_runs([str(tmp_path)], ["eval/score"], str(tmp_path / "out"))
    assert res["group_by"] == ["policy", "round"] and len(res["groups"]) == 3


# ----------------------------------------------------------------------------- plots a reader takes in at a glance


def make_stage_run(root: Path, folder: str, kind: str, config: dict, rows: list[dict]) -> Path:
    """A run dir as `rlhf experiment run` writes it: ``stage.json`` names the stage and its kind."""
    run = root / folder
    run.mkdir(parents=True)
    (run / "stage.json").write_text(json.dumps({"stage": Path(folder).parts[0], "kind": kind}))
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [json.dumps({"step": i, "_time": 0.0, **row}) for i, row in enumerate(rows)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def ppo_config(**fields) -> dict:
    """A PPO config as the runs write it: many fields, most equal or unset in every run."""
    unset = {f"option_{i}": None for i in range(40)}
    shared = {"experiment": "exp_tiny", "gold": "length:target=6", "response_length": 8, "seed": 0}
    return {**unset, **shared, **fields}


def ppo_rows(final: float) -> list[dict]:
    return [{"objective/scores": final * i / 3, "objective/kl": 0.5 * i} for i in range(4)]


@pytest.fixture
def mixed_root(tmp_path) -> Path:
    """Two PPO runs, three reward-model runs and an RLOO baseline, as one experiment folder holds them."""
    root = tmp_path / "runs" / "exp"
    for name, kl in (("ppo", 0.01), ("ppo_strong", 0.2)):
        make_stage_run(root, name, "ppo", ppo_config(kl_coef=kl), ppo_rows(1.0 if kl == 0.01 else 0.5))
    for seed in range(3):
        make_stage_run(root, f"rm_train_{seed}", "rm_train", {"seed": seed}, [{"train/loss": 0.7}] * 3)
    make_stage_run(root, "rloo/exp/baseline_rloo", "baseline", {"seed": 0}, [{"objective/scores": 0.1}] * 3)
    return root


def test_compare_plots_ppo_by_default_and_only_ppo(mixed_root, tmp_path, capsys):
    res = compare_runs([str(mixed_root)], out=str(tmp_path / "cmp"))
    assert res["stage"] == "ppo" and res["runs"] == 2
    assert set(res["groups"]) == {"kl_coef=0.01", "kl_coef=0.2"}
    out = capsys.readouterr().out
    assert "stage ppo (2 runs)" in out and "rm_train (3)" in out and "--stage" in out
    page = Path(res["html"]).read_text()
    assert page.count("<li>") == 2 and "rm_train" not in page and "stage ppo" in page


def test_without_ppo_the_commonest_stage_kind_is_plotted(mixed_root, tmp_path):
    for name in ("ppo", "ppo_strong"):
        for f in (mixed_root / name).iterdir():
            f.unlink()
        (mixed_root / name).rmdir()
    res = compare_runs([str(mixed_root)], out=str(tmp_path / "cmp"))
    assert res["stage"] == "rm_train" and res["runs"] == 3


def test_stage_matches_the_kind_and_the_stage_name(mixed_root):
    by_kind = find_run_dirs([str(mixed_root)], stage="baseline")
    by_name = find_run_dirs([str(mixed_root)], stage="rloo")
    assert by_kind == by_name == [mixed_root / "rloo" / "exp" / "baseline_rloo"]


def test_labels_name_only_the_fields_that_differ(tmp_path):
    root = tmp_path / "runs" / "exp"
    for kl in (0.01, 0.2):
        for seed in (0, 1):
            extra = {"lora_r": 8} if kl == 0.2 else {}  # set in two runs, unset (None) in the others
            config = ppo_config(kl_coef=kl, seed=seed, **extra)
            make_stage_run(root, f"kl{kl}_s{seed}/ppo", "ppo", config, ppo_rows(kl + seed))
    res = compare_runs([str(root)], out=str(tmp_path / "cmp"), title="{experiment}, gold: {gold}")
    assert set(res["groups"]) == {"kl_coef=0.01", "kl_coef=0.2, lora_r=8"}
    page = Path(res["html"]).read_text()
    assert "kl_coef=0.01, seed=1" in page and "kl_coef=0.2, lora_r=8, seed=0" in page  # each curve's label
    assert "=None" not in page and "option_" not in page and "response_length" not in page
    assert "<h1>exp_tiny, gold: length:target=6</h1>" in page  # placeholders: the runs' config values
    csv_groups = [line.split(",")[0] for line in Path(res["csv"]).read_text().splitlines()[1:]]
    assert csv_groups == ['"kl_coef=0.01"', '"kl_coef=0.2']  # the table uses the same short labels


def test_long_labels_and_paths_are_shortened():
    policies = ["/data/runs/exp/ppo/policy", "/data/runs/exp/rloo/exp/baseline_rloo/policy"]
    assert short_values(policies) == ["ppo", "baseline_rloo"]  # the part that differs, its last folder
    assert short_values(["tiny", "HuggingFaceTB/SmolLM2-135M"]) == ["tiny", "SmolLM2-135M"]
    assert short_values([0.01, None]) == ["0.01", "None"]


def test_legend_lies_inside_the_figure_and_clear_of_the_panels(tmp_path):
    root = tmp_path / "runs" / "exp"
    for kl in (0.01, 0.05, 0.2):
        for seed in (0, 1):
            config = ppo_config(kl_coef=kl, seed=seed, note=f"a rather long description, variant {kl}")
            make_stage_run(root, f"kl{kl}_s{seed}/ppo", "ppo", config, ppo_rows(kl + seed))
    runs = [load_run(d) for d in find_run_dirs([str(root)], stage="ppo")]
    _, groups = group_runs(runs)
    assert all(len(r["series"]) <= LABEL_MAX_CHARS for r in runs)
    metrics = ["objective/scores", "objective/kl"]
    fig = draw_figure(groups, metrics, "step", "a title", "ppo")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1
    assert len(legend.get_texts()) == 6  # one entry per run: group and seed
    for ax in fig.axes:
        assert not box.overlaps(ax.get_tightbbox(renderer))  # below the panels, their tick labels included
        assert ax.get_xlabel() == "PPO update" and "(" in ax.get_ylabel()  # axis labels with units


def test_a_single_evaluation_shows_its_bootstrap_interval_not_a_zero_std():
    from matplotlib.figure import Figure

    from experiments.compare import _bars

    def run(value, low, high):
        summary = {
            "eval/gold_win_rate": value,
            "eval/gold_win_rate_ci_low": low,
            "eval/gold_win_rate_ci_high": high,
        }
        return {"summary": summary, "metrics": []}

    ax = Figure().subplots()
    _bars(
        ax, {"ppo": [run(0.7, 0.6, 0.75)], "dpo": [run(0.6, 0.55, 0.7)]}, "eval/gold_win_rate", ["C0", "C1"]
    )
    caps = sorted(round(float(y), 3) for line in ax.lines for y in line.get_ydata())
    assert caps == [0.55, 0.6, 0.7, 0.75]  # the interval's ends, drawn as the error bars' caps


def test_an_ensemble_reward_is_labelled_by_its_rule_and_size():
    single = "runs/overoptimization/rm_train/model"
    ensemble = f"ensemble:mean_minus_std:{single},runs/o/rm_deep/o/rm_train/model,runs/o/rm_listwise/o/rm_train/model"
    assert short_values([single, ensemble]) == ["rm_train/model", "ensemble(mean_minus_std) of 3"]
