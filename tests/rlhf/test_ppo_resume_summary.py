"""A PPO run stopped by Ctrl-C and resumed writes the same ``summary.json`` as one that never stopped.

Both runs use the same run directory (the uninterrupted one is moved aside first), so even the
paths they record agree; only timing and throughput may differ.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rlhf.config import build_config
from rlhf.ppo.loop import PPOConfig, run_ppo
from tests.rlhf import ppo_helpers

# 8 updates of 4 episodes: enough for ppo/score_gain (it needs ≥ 8 updates); held-out evaluation
# at update 0, every 3 updates and at the end; sample tables; an adaptive KL controller.
UPDATES, STOP_AFTER = 8, 4
# The reward function's calls before update 4 is scored: the reference policy's evaluation,
# evaluation at update 0, updates 1-3 and the evaluation after update 3.
SIGINT_AT_CALL = 7


def _is_timing(key: str) -> bool:
    return key.startswith(("time/", "perf/")) or key in ("_time", "_runtime") or "seconds" in key


def _cfg(runs_dir: Path, prompts: Path, **over) -> PPOConfig:
    base = dict(
        policy="tiny",
        reward="tests.rlhf.ppo_helpers:interrupting_reward",
        gold="tests.rlhf.ppo_helpers:lowercase_fraction",
        prompts=str(prompts),
        prompts_split=None,
        eval_split=None,
        num_eval_prompts=4,
        eval_every=3,
        total_episodes=UPDATES * 4,
        batch_size=4,
        minibatch_size=4,
        micro_batch_size=4,
        ppo_epochs=1,
        response_length=6,
        learning_rate=1e-3,
        adaptive_kl=True,
        kl_target=0.5,
        kl_horizon=100.0,
        sample_every=2,
        num_samples=2,
        runs_dir=str(runs_dir),
        experiment="resume_summary",
        tracking={"mode": "disabled"},
    )
    base.update(over)
    return build_config(PPOConfig, None, base)


def test_resumed_run_writes_the_same_summary(tmp_path, monkeypatch):
    prompts = ppo_helpers.write_prompts(tmp_path / "prompts.jsonl")
    runs = tmp_path / "runs"

    ppo_helpers.reset_calls()
    full = run_ppo(_cfg(runs, prompts))
    assert not full["interrupted"]
    summary_full = json.loads(Path(full["run_dir"], "summary.json").read_text())
    logged_full = _logged(Path(full["run_dir"]))
    shutil.rmtree(runs)  # the interrupted run writes to the very same paths

    ppo_helpers.reset_calls()
    monkeypatch.setenv("RLHF_TEST_SIGINT_AT", str(SIGINT_AT_CALL))
    cut = run_ppo(_cfg(runs, prompts))
    assert cut["interrupted"] and cut["checkpoint"].endswith(f"update_{STOP_AFTER:06d}")
    monkeypatch.delenv("RLHF_TEST_SIGINT_AT")
    resumed = run_ppo(_cfg(runs, prompts, resume="auto"))
    assert not resumed["interrupted"]
    summary_resumed = json.loads(Path(resumed["run_dir"], "summary.json").read_text())

    assert "ppo/score_gain" in summary_full and "eval/reference_score" in summary_full
    compared = sorted(k for k in summary_full.keys() | summary_resumed.keys() if not _is_timing(k))
    differ = {
        k: (summary_full.get(k, "<missing>"), summary_resumed.get(k, "<missing>"))
        for k in compared
        if summary_full.get(k, "<missing>") != summary_resumed.get(k, "<missing>")
    }
    assert not differ, differ
    # the metrics and sample tables on disk too: the updates before the checkpoint are kept, once
    logged_resumed = _logged(Path(resumed["run_dir"]))
    assert sorted(logged_full) == sorted(logged_resumed) == ["metrics.jsonl", "table_samples.jsonl"]
    assert [r["step"] for r in logged_resumed["table_samples.jsonl"]] == [1, 1, 2, 2, 4, 4, 6, 6, 8, 8]
    for name, rows in logged_full.items():
        assert rows == logged_resumed[name], name


def _logged(run_dir: Path) -> dict[str, list[dict]]:
    """The metrics and table files of a run, without timing and without the lines only a resumed run
    writes (the "resumed from" notice)."""
    out = {}
    for path in [run_dir / "metrics.jsonl", *sorted(run_dir.glob("table_*.jsonl"))]:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[path.name] = [{k: v for k, v in r.items() if not _is_timing(k)} for r in rows]
    return out
