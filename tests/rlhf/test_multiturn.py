"""Multi-turn prompts end to end: an item's prompt is a conversation and its candidates are the next
assistant turn. The rankings contract, `rlhf export` in every format, and a reward model trained
and scored through the real command line on the tiny model (docs/rankings.md "Conversations")."""

from __future__ import annotations

import json

import pytest
import torch

from reward_models.model import score_like_the_lab
from rlhf.cli import main
from rlhf.contracts import load_demonstrations, load_rankings, prompt_text, validate_ranking
from rlhf.datafiles import DataError, write_jsonl
from rlhf.export import build_export, write_export
from rlhf.model_cache import build_tiny_tokenizer
from rlhf.models import format_conversation, format_prompt
from rlhf.reward_model import encode_conversations
from rlhf.rewards import load_reward_fn
from tests.reward_models.rm_data import make_records

CHAT = [
    {"role": "system", "content": "Answer in one sentence."},
    {"role": "user", "content": "What is a prime number?"},
    {"role": "assistant", "content": "A whole number with exactly two divisors."},
    {"role": "user", "content": "Give an example."},
]
SHORT_CHAT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]
# The tiny model's ChatML template (rlhf/model_cache.py) renders CHAT, by hand:
CHAT_RENDERED = (
    "<|im_start|>system\nAnswer in one sentence.<|im_end|>\n"
    "<|im_start|>user\nWhat is a prime number?<|im_end|>\n"
    "<|im_start|>assistant\nA whole number with exactly two divisors.<|im_end|>\n"
    "<|im_start|>user\nGive an example.<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def chat_rankings() -> list[dict]:
    """p1: a strict ranking of three next turns, the best one edited; p2: two tied next turns."""
    return [
        {
            "prompt_id": "p1",
            "prompt": CHAT,
            "candidates": [
                {"label": "A", "text": "9 is prime."},
                {"label": "B", "text": "7 is prime."},
                {"label": "C", "text": "2 is prime."},
            ],
            "ranking": "B > C > A",
            "annotator": "ann1",
            "edit": "7 is a prime number.",
            "edit_of": "B",
        },
        {
            "prompt_id": "p2",
            "prompt": SHORT_CHAT,
            "candidates": [{"label": "A", "text": "Goodbye."}, {"label": "B", "text": "See you."}],
            "ranking": "A = B",
            "annotator": "ann2",
        },
    ]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")]


# ----------------------------------------------------------------------------- the contract


def test_conversation_prompts_pass_the_rankings_contract_unchanged():
    loaded = load_rankings(chat_rankings())
    assert [r["prompt"] for r in loaded] == [CHAT, SHORT_CHAT]
    assert [r["ranking"] for r in loaded] == ["B > C > A", "A = B"]


def test_a_conversation_that_ends_with_the_assistant_is_rejected_with_its_row():
    """The candidates are the next assistant turn: a prompt ending with one has no place for them
    (the chat template's generation prompt follows the last message)."""
    bad = chat_rankings()
    bad[1]["prompt"] = CHAT[:3]
    clean, problems = validate_ranking(bad[1])
    assert clean is None and problems == [
        ("prompt", "ends with an assistant message: a prompt is the conversation before the response")
    ]
    with pytest.raises(DataError) as err:
        load_rankings(bad)
    assert [(e.row, e.field) for e in err.value.errors] == [(2, "prompt")]


# ----------------------------------------------------------------------------- every export format


def export(tmp_path, fmt: str, *extra: str) -> list[dict]:
    """`rlhf export` through the command line; the rows written."""
    source = write_jsonl(tmp_path / "chat_rankings.jsonl", chat_rankings())
    out = tmp_path / f"{fmt}{'-'.join(extra)}.jsonl"
    argv = ["export", "--rankings", str(source), "--format", fmt, "--out", str(out), *extra]
    assert main([*argv, "--runs_dir", str(tmp_path / "runs"), "--tracking.mode", "disabled"]) == 0
    return read_rows(out)


def test_pairs_carry_the_conversation_as_plain_text(tmp_path):
    """Pairs hold the prompt as text (one column type for every file), by the one prompt → text rule."""
    rows = export(tmp_path, "pairs")
    flat = (
        "system: Answer in one sentence.\nuser: What is a prime number?\n"
        "assistant: A whole number with exactly two divisors.\nuser: Give an example."
    )
    assert prompt_text(CHAT) == flat
    assert [(r["prompt"], r["chosen_label"], r["rejected_label"], r["tie"]) for r in rows] == [
        (flat, "B", "C", False),
        (flat, "B", "A", False),
        (flat, "C", "A", False),
        ("user: Hi\nassistant: Hello!\nuser: Bye", "A", "B", True),
    ]
    assert rows[0]["chosen"] == "7 is prime." and rows[0]["rejected"] == "2 is prime."


def test_rankings_keep_the_conversation_in_jsonl_and_parquet(tmp_path):
    rows = export(tmp_path, "rankings")
    assert [r["prompt"] for r in rows] == [CHAT, SHORT_CHAT]
    assert [r["prompt"] for r in load_rankings(tmp_path / "rankings.jsonl")] == [CHAT, SHORT_CHAT]
    path, _ = write_export(build_export(load_rankings(chat_rankings()), "rankings"), tmp_path / "r.parquet")
    back = load_rankings(path)
    assert [r["prompt"] for r in back] == [CHAT, SHORT_CHAT]
    assert [r["tiers"] for r in back] == [[["B"], ["C"], ["A"]], [["A", "B"]]]


def test_trl_conversational_appends_the_assistant_turn_after_the_conversation(tmp_path):
    rows = export(tmp_path, "trl")
    assert [(r["chosen_label"], r["rejected_label"]) for r in rows] == [("B", "C"), ("B", "A"), ("C", "A")]
    first = rows[0]
    assert first["prompt"] == CHAT
    assert first["chosen"] == assistant("7 is prime.") and first["rejected"] == assistant("2 is prime.")
    # TRL renders prompt + chosen as one conversation: the next turn after the last user message,
    # the text the lab's reward model reads (plus the template's newline after EOS).
    tok = build_tiny_tokenizer()
    rendered = tok.apply_chat_template(first["prompt"] + first["chosen"], tokenize=False)
    assert rendered == CHAT_RENDERED + "7 is prime.<|im_end|>\n"
    assert rendered == format_conversation(tok, CHAT, "7 is prime.") + "\n"
    ties = read_rows(tmp_path / "trl.ties.jsonl")
    assert ties == [
        {
            "prompt": SHORT_CHAT,
            "response_a": assistant("Goodbye."),
            "response_b": assistant("See you."),
            "tie": True,
            "prompt_id": "p2",
            "annotator": "ann2",
            "label_a": "A",
            "label_b": "B",
        }
    ]


def test_trl_standard_renders_every_turn_with_the_chat_template(tmp_path):
    rows = export(tmp_path, "trl", "--trl_style", "standard", "--model", "tiny")
    assert rows[0]["prompt"] == CHAT_RENDERED
    assert rows[0]["chosen"] == "7 is prime.<|im_end|>" and rows[0]["rejected"] == "2 is prime.<|im_end|>"
    assert rows[0]["prompt"] == format_prompt(build_tiny_tokenizer(), CHAT)


@pytest.mark.parametrize("style", ["conversational", "standard"])
def test_kto_labels_the_next_turns(tmp_path, style):
    """B > C > A: B desirable, A undesirable, C (the middle) unlabelled; the tied p2 gives none."""
    rows = export(
        tmp_path, "kto", "--trl_style", style, *(["--model", "tiny"] if style == "standard" else [])
    )
    assert [(r["candidate_label"], r["label"]) for r in rows] == [("A", False), ("B", True)]
    if style == "conversational":
        assert rows[1]["prompt"] == CHAT and rows[1]["completion"] == assistant("7 is prime.")
    else:
        assert rows[1]["prompt"] == CHAT_RENDERED and rows[1]["completion"] == "7 is prime.<|im_end|>"


def test_an_edit_of_a_conversation_is_a_chat_demonstration(tmp_path):
    rows = export(tmp_path, "demonstrations")
    assert rows == [
        {
            "prompt": CHAT,
            "completion": assistant("7 is a prime number."),
            "prompt_id": "p1",
            "annotator": "ann1",
            "source": "edit",
            "edit_of": "B",
            "split": None,
        }
    ]
    assert load_demonstrations(tmp_path / "demonstrations.jsonl") == rows


# ----------------------------------------------------------------------------- reward model


def chat_training_rankings(n: int) -> list[dict]:
    """`rm_data`'s learnable rankings, each prompt made a conversation of four turns."""
    records = make_records(n, seed=0)
    for rec in records:
        rec["prompt"] = [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": rec["prompt"]},
            {"role": "assistant", "content": "Which soup?"},
            {"role": "user", "content": "The hot one."},
        ]
    return records


def test_reward_model_trains_and_scores_the_conversation(tmp_path, in_tmp):
    """`rlhf rm train` on conversations (tiny model, two steps), then the model scores a
    conversation through the chat template: every turn in its own role, never str() of the list."""
    source = write_jsonl(tmp_path / "chat_rankings.jsonl", chat_training_rankings(16))
    argv = ["rm", "train", "--rankings", str(source), "--model", "tiny", "--top_layers", "1"]
    argv += ["--max_steps", "2", "--batch_size", "4", "--normalize", "false", "--experiment", "mt"]
    assert main([*argv, "--runs_dir", str(tmp_path / "runs"), "tracking.mode=disabled"]) == 0
    run_dir = tmp_path / "runs" / "mt" / "rm_train"
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["used_rankings"] == 16 and report["bad_rows"] == 0

    model_dir = run_dir / "model"
    reward = load_reward_fn(str(model_dir))
    prompt = chat_training_rankings(1)[0]["prompt"]
    responses = ["soup was great", "soup was awful"]
    enc = encode_conversations(reward.tokenizer, [prompt] * 2, responses, max_length=512)
    shown = reward.tokenizer.decode(enc.ids[0])
    assert shown == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nTell me about soup number 0.<|im_end|>\n"
        "<|im_start|>assistant\nWhich soup?<|im_end|>\n<|im_start|>user\nThe hot one.<|im_end|>\n"
        "<|im_start|>assistant\nsoup was great<|im_end|>"
    )
    lab = reward([prompt] * 2, responses)
    # The same numbers from plain transformers (rlhf.reward_model.score_like_the_lab's own code path)
    assert torch.allclose(
        torch.tensor(score_like_the_lab(model_dir, [prompt] * 2, responses)), lab, atol=1e-4
    )
    # and not those of the list's Python repr as one user turn.
    as_repr = reward([str(prompt)] * 2, responses)
    assert not torch.allclose(as_repr, lab)

    rm_eval = ["rm", "eval", "--reward_model", str(model_dir), "--rankings", str(source)]
    assert main([*rm_eval, "--runs_dir", str(tmp_path / "runs"), "--tracking.mode", "disabled"]) == 0
