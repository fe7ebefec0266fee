"""The `rlhf arena` command: judges and simulated annotators as voters; end to end through the real
command line on two tiny policies built in code, into the app's store and back."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from experiments.arena import judge_votes, policy_name_and_path, simulated_votes
from rlhf.cli import main
from rlhf.contracts import load_rankings
from tests.rlhf.test_arena import _pair


def test_a_judge_votes_for_the_higher_score_and_ties_close_ones():
    # length:target=10 scores -|len - 10| / 10 (rlhf/scorers.py): 10 chars 0, 5 chars -0.5, 9 chars -0.1
    pairs = [_pair("x" * 10, "x" * 5), _pair("x" * 5, "x" * 10), _pair("x" * 10, "x" * 9)]
    votes = judge_votes(pairs, "length:target=10,unit=chars", tie_threshold=0.15)
    assert [v["ranking"] for v in votes] == ["A > B", "B > A", "A = B"]
    assert all(v["voter"] == "length:target=10,unit=chars" for v in votes)
    assert load_rankings_roundtrip(votes)  # votes are valid rankings: preference data as they are


def load_rankings_roundtrip(records: list[dict], tmp: Path | None = None) -> bool:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "votes.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        back = load_rankings(str(path))
    return [r["ranking"] for r in back] == [r["ranking"] for r in records]


def test_noiseless_simulated_annotators_vote_as_the_judge():
    pairs = [_pair("x" * 10, "x" * 5), _pair("x" * 5, "x" * 10), _pair("x" * 10, "x" * 9)]
    sim = simulated_votes(
        pairs,
        "length:target=10,unit=chars",
        n_annotators=2,
        votes_per_pair=1,
        temperature=0.0,
        tie_threshold=0.15,
        seed=0,
    )
    assert [v["ranking"] for v in sim] == ["A > B", "B > A", "A = B"]
    assert {v["voter"] for v in sim} == {"simulated:length:target=10,unit=chars"}
    noisy = simulated_votes(
        pairs * 50,
        "length:target=10,unit=chars",
        n_annotators=3,
        votes_per_pair=2,
        temperature=1.0,
        tie_threshold=0.0,
        seed=0,
    )
    assert len(noisy) == 300 and {"A > B", "B > A"} == {v["ranking"] for v in noisy}  # noise flips some


def test_policy_names_come_from_run_dirs(tmp_path):
    (tmp_path / "ppo" / "policy").mkdir(parents=True)
    assert policy_name_and_path(str(tmp_path / "ppo")) == ("ppo", str(tmp_path / "ppo" / "policy"))
    assert policy_name_and_path(str(tmp_path / "ppo" / "policy")) == ("ppo", str(tmp_path / "ppo" / "policy"))
    assert policy_name_and_path("base=smollm2-135m-instruct") == ("base", "smollm2-135m-instruct")
    assert policy_name_and_path("tiny") == ("tiny", "tiny")


def _other_tiny_policy(run_dir: Path) -> None:
    """A second tiny policy: the tiny model with its output layer perturbed, as a run dir."""
    from rlhf.model_cache import build_tiny_model, build_tiny_tokenizer
    from rlhf.models import write_policy_dir

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape, generator=gen) * 0.5)
    write_policy_dir(model, tok, run_dir / "policy", {"base": "tiny", "stage": "test"})


def _prompts_file(path: Path, n: int) -> Path:
    """``n`` one-line prompts ``q0``, ``q1``, ... as a prompts JSONL file."""
    lines = (
        json.dumps({"prompt_id": f"q{i}", "prompt": f"Say something about {w}."})
        for i, w in enumerate("abcdefghijkl"[:n])
    )
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_arena_run_import_vote_in_the_store_and_fit(in_tmp, monkeypatch):
    from annotation_app.store import Store

    monkeypatch.setenv("WANDB_MODE", "offline")
    _other_tiny_policy(in_tmp / "runs" / "other")
    prompts = _prompts_file(in_tmp / "prompts.jsonl", 12)
    rc = main(
        [
            "arena",
            "run",
            "--policies",
            "[tiny, runs/other]",
            "--prompts",
            str(prompts),
            "--split",
            "null",
            "--gold",
            "length:target=3",
            "--max_new_tokens",
            "12",
            "--n_boot",
            "50",
            "--experiment",
            "arena_e2e",
        ]
    )
    assert rc == 0
    out = in_tmp / "runs" / "arena_e2e" / "arena"
    for name in (
        "responses.jsonl",
        "pairs.jsonl",
        "votes.jsonl",
        "leaderboard.json",
        "leaderboard.png",
        "config.yaml",
    ):
        assert (out / name).is_file(), name
    boards = json.loads((out / "leaderboard.json").read_text())
    assert [b["voter"] for b in boards] == ["simulated:length:target=3", "length:target=3"]
    assert all(b["n_votes"] == 12 and b["baseline"] == "tiny" for b in boards)
    assert {m["model"] for m in boards[0]["models"]} == {"tiny", "other"}
    votes = load_rankings(str(out / "votes.jsonl"))  # preference data in the rankings contract
    assert len(votes) == 24
    assert main(["export", "--rankings", str(out / "votes.jsonl"), "--out", "prefs.jsonl"]) == 0
    assert (in_tmp / "prefs.jsonl").stat().st_size > 0

    # People vote in the app: import, vote through the store (as the Arena tab does), fit.
    db = in_tmp / "lab.db"
    assert main(["arena", "import", "--pairs", str(out / "pairs.jsonl"), "--db", str(db)]) == 0
    store = Store(db)
    store.add_user("ann", "a-long-password")
    assert store.next_item("ann") is None  # the ranking screen never serves an arena pair
    for n in range(12):
        item = store.next_item("ann", kind="arena")
        assert [c.keys() for c in item.candidates] == [{"label", "text"}] * 2  # blind: no model
        store.submit("ann", item.prompt_id, ("A > B", "A = B", "B > A")[n % 3])
    assert store.next_item("ann", kind="arena") is None
    store.close()
    assert main(["arena", "fit", "--db", str(db), "--votes", f"[{out / 'votes.jsonl'}]", "--n_boot", "50",
                 "--experiment", "arena_e2e"]) == 0  # fmt: skip
    fitted = json.loads((in_tmp / "runs" / "arena_e2e" / "arena_fit" / "leaderboard.json").read_text())
    assert [b["voter"] for b in fitted] == ["simulated:length:target=3", "length:target=3", "human"]
    assert fitted[2]["n_votes"] == 12


def test_policies_that_answer_alike_end_the_stage_with_the_reason(in_tmp, monkeypatch, capsys):
    # A PPO run that did not move its policy: every vote is a tie and no rating exists. The stage
    # still ends, its votes written and the reason said, instead of failing the whole experiment.
    monkeypatch.setenv("WANDB_MODE", "offline")
    prompts = _prompts_file(in_tmp / "prompts.jsonl", 6)
    run = ["arena", "run", "--policies", "[sft=tiny, ppo=tiny]", "--prompts", str(prompts), "--split", "null",
           "--gold", "length:target=3", "--max_new_tokens", "8", "--n_boot", "20", "--experiment", "alike"]  # fmt: skip
    assert main(run) == 0
    out = in_tmp / "runs" / "alike" / "arena"
    votes = load_rankings(str(out / "votes.jsonl"))
    assert len(votes) == 12 and {v["ranking"] for v in votes} == {"A = B"}
    summary = json.loads((out / "summary.json").read_text())
    reasons = {k: v for k, v in summary.items() if k.startswith("arena/unrated/")}
    assert set(reasons) == {"arena/unrated/simulated:length:target=3", "arena/unrated/length:target=3"}
    assert all("every vote is a tie" in r for r in reasons.values())
    assert "arena: set aside: length:target=3: the votes cannot rate the models" in capsys.readouterr().out
    assert not (out / "leaderboard.png").exists()
    # Fitting those votes alone has nothing to publish: one line, exit 2, no run dir.
    assert main(["arena", "fit", "--votes", f"[{out / 'votes.jsonl'}]", "--experiment", "alike_fit"]) == 2
    assert "the votes cannot rate the models: every vote is a tie" in capsys.readouterr().err
    assert not (in_tmp / "runs" / "alike_fit").exists()


def test_the_arena_judges_the_answers_eval_sampled_instead_of_sampling_again(in_tmp, monkeypatch, capsys):
    """`rlhf eval` writes its answers; an arena with the same sampling settings on the first of its
    prompts judges those answers (nothing sampled), and samples again, saying why, wherever a
    setting, the prompts or a policy's files differ."""
    import experiments.arena as arena_module
    from rlhf.held_out_answers import FILE

    _other_tiny_policy(in_tmp / "runs" / "other")
    prompts = _prompts_file(in_tmp / "prompts.jsonl", 8)
    common = ["--prompts", str(prompts), "--split", "null", "--max_new_tokens", "8", "--batch_size", "3",
              "--tracking.mode", "disabled"]  # fmt: skip
    assert main(["eval", "--policy", "runs/other/policy", "--reference", "tiny", "--reward", "length:target=3",
                 "--num_prompts", "8", "--experiment", "e", *common]) == 0  # fmt: skip
    eval_dir = in_tmp / "runs" / "e" / "eval"
    written = json.loads((eval_dir / FILE).read_text())
    assert [r["prompt_id"] for r in written["rows"]] == [f"q{i}" for i in range(8)]

    def arena(*extra: str) -> list[dict]:
        run = ["arena", "run", "--policies", "[base=tiny, other=runs/other/policy]", "--gold", "length:target=3",
               "--num_prompts", "5", "--n_boot", "20", "--responses_from", str(eval_dir), "--experiment", "a",
               *common, *extra]  # fmt: skip
        assert main(run) == 0
        return [json.loads(line) for line in (in_tmp / "runs" / "a" / "arena" / "responses.jsonl").open()]

    def no_sampling(*args, **kwargs):
        raise AssertionError("the arena sampled a policy eval had sampled")

    with monkeypatch.context() as patch:
        patch.setattr(arena_module, "sample_policy_responses", no_sampling)
        judged = arena("--batch_size", "2")  # batching decides no answer: still reused
    by_path = {"base": "tiny", "other": str(in_tmp / "runs" / "other" / "policy")}
    for row, eval_row in zip(judged, written["rows"][:5], strict=True):
        assert {n: a["text"] for n, a in row["responses"].items()} == {
            n: eval_row["responses"][p]["text"] for n, p in by_path.items()
        }
    assert "arena: base, other: the answers eval sampled" in capsys.readouterr().out

    arena("--max_new_tokens", "6")
    assert "arena: sampling again: " in (out := capsys.readouterr().out) and "max_new_tokens 8, not 6" in out
    (in_tmp / "runs" / "other" / "policy" / "rlhf_policy.json").touch()  # the policy written again
    arena()
    out = capsys.readouterr().out
    assert "arena: base: the answers eval sampled" in out
    assert "sampling again: other: runs/other/policy changed since" in out
    prompts.write_text(json.dumps({"prompt_id": "q0", "prompt": "Another prompt."}) + "\n", encoding="utf-8")
    arena()
    assert "does not begin with the arena's prompts" in capsys.readouterr().out


def test_bad_arena_input_gets_one_line_before_any_work(in_tmp, capsys):
    assert main(["arena", "run", "--policies", "[tiny]"]) == 2
    assert "two or more policies" in capsys.readouterr().err
    assert main(["arena", "run", "--policies", "[tiny, no/such/dir]"]) == 2
    assert "no/such/dir" in capsys.readouterr().err
    assert main(["arena", "run", "--policies", "[tiny, b=tiny]", "--voters", "[nonsense-scorer]"]) == 2
    assert "nonsense-scorer" in capsys.readouterr().err
    voters = "[keywords:good=thanks,bad=sorry]"  # the list splits the spec at its comma
    assert main(["arena", "run", "--policies", "[tiny, b=tiny]", "--voters", voters]) == 2
    assert """'["keywords:good=thanks,bad=sorry"]'""" in capsys.readouterr().err
    assert main(["arena", "run", "--policies", "[a=tiny, b=tiny]", "--baseline", "c"]) == 2
    assert "baseline" in capsys.readouterr().err
    assert main(["arena", "run", "--policies", "[a=tiny, b=tiny]", "--gold", "null"]) == 2
    assert "no voter" in capsys.readouterr().err
    assert main(["arena", "fit"]) == 2
    assert "--votes" in capsys.readouterr().err
    assert not (in_tmp / "runs").exists()
