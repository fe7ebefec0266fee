"""The held-out answers file: written by `rlhf eval`, reused by `rlhf arena` only where nothing that
decides an answer differs (end to end through the command line: tests/experiments/test_arena_command.py)."""

from __future__ import annotations

from rlhf.evaluate import HeldOutSampling
from rlhf.held_out_answers import FILE, policy_fingerprint, reusable_answers, write_answers

RECORDS = [{"prompt_id": f"p{i}", "prompt": f"prompt {i}"} for i in range(3)]


def _answers(tag: str) -> list[dict]:
    return [{"text": f"{tag} {i}", "n_tokens": i + 1, "finished": i % 2 == 0} for i in range(3)]


def test_answers_round_trip_for_the_first_prompts_and_name_what_is_missing(tmp_path):
    policy = tmp_path / "policy"
    policy.mkdir()
    (policy / "model.safetensors").write_bytes(b"weights")
    written = write_answers(
        tmp_path, HeldOutSampling(), RECORDS, {str(policy): _answers("a"), "tiny": _answers("t")}
    )
    assert written == tmp_path / FILE
    reused, reasons = reusable_answers(
        str(tmp_path), HeldOutSampling(batch_size=5, num_prompts=2), RECORDS[:2],
        [("ours", str(policy)), ("alias", "tiny"), ("new", "smollm2-135m-instruct")],
    )  # fmt: skip
    assert reused == {"ours": _answers("a")[:2], "alias": _answers("t")[:2]}
    assert reasons == [f"new: not among the policies of {written}"]
    assert reusable_answers(
        str(tmp_path / "nowhere"), HeldOutSampling(), RECORDS, [("ours", str(policy))]
    ) == (
        {},
        [f"no answers to reuse at {tmp_path / 'nowhere'} ({FILE} not found)"],
    )
    _, [why] = reusable_answers(str(written), HeldOutSampling(seed=1), RECORDS, [("ours", str(policy))])
    assert why == f"{written} was sampled with seed 0, not 1"


def test_a_policy_fingerprint_changes_when_its_files_do(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"1")
    before = policy_fingerprint(str(tmp_path))
    assert policy_fingerprint(str(tmp_path)) == before
    (tmp_path / "a.bin").write_bytes(b"12")
    assert policy_fingerprint(str(tmp_path)) != before
    assert policy_fingerprint("tiny") == "tiny"  # an alias is its own name
