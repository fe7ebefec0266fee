"""`rlhf compare` on hand-made run folders: grouping, mean ± std over seeds, PNG + HTML, errors."""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

import pytest
import yaml

from experiments.compare import compare_runs, curve, final_value, mean_std
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
    from experiments.compare import load_run

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


def test_runs_that_differ_only_in_paths_are_labelled_by_folder(tmp_path):
    for name in ("eval", "eval_rloo"):
        run = tmp_path / name / "exp" / "eval" if name != "eval" else tmp_path / "eval"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"policy": f"runs/{name}/policy", "seed": 0}))
        score = 1.0 if name == "eval" else 2.0
        (run / "metrics.jsonl").write_text(json.dumps({"step": 0, "_time": 0, "eval/score": score}) + "\n")
    res = compare_runs([str(tmp_path)], ["eval/score"], str(tmp_path / "out"))
    assert res["group_by"] == []
    assert res["groups"] == {"eval": {"eval/score": (1.0, 0.0)}, "eval_rloo": {"eval/score": (2.0, 0.0)}}
