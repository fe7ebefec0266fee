"""Exports for use outside the lab: TRL's preference format with the ties beside it, exported
rankings with one schema in `datasets`, and a reward-model dir scored with plain transformers
(rlhf/data.py, annotation_app/io.py, reward_models/model.py; docs/architecture.md "Data contracts")."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from annotation_app.io import import_candidates
from annotation_app.store import Store
from reward_models.model import build_reward_model, save_reward_model, score_like_the_lab, score_texts
from rlhf.cli import main
from rlhf.config import ConfigError
from rlhf.data import (
    DataError,
    build_export,
    load_rankings,
    rankings_to_pairs,
    rankings_to_trl,
    write_export,
    write_jsonl,
)
from rlhf.model_cache import build_tiny_model, build_tiny_tokenizer
from rlhf.models import format_conversation, format_prompt
from rlhf.rewards import load_reward_fn

CHAT_PROMPT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Why is the sky blue?"},
]


def ranking(pid: str, text: str, k: int, prompt=None, unfinished: str = "", **extra) -> dict:
    """A rankings record (docs/architecture.md); labels in ``unfinished`` were cut at the length limit."""
    labels = "ABCDEFGHIJ"[:k]
    return {
        "prompt_id": pid,
        "prompt": prompt if prompt is not None else f"question {pid}",
        "candidates": [
            {
                "label": lab,
                "text": f"answer {lab} to {pid}",
                "model": "tiny",
                "gen": {"finished": lab not in unfinished},
            }
            for lab in labels
        ],
        "ranking": text,
        "annotator": "ann",
        "flags": [],
        "created_at": "2026-01-01T00:00:00+00:00",
        **extra,
    }


RANKINGS = [
    ranking("p1", "C > B = D > A", 4),
    ranking("p2", "A = B = C", 3),  # all tied: no preference at all
    ranking("p3", "B > A", 2, prompt=CHAT_PROMPT, unfinished="A"),
]
STRICT = {
    ("p1", "C", "B"),
    ("p1", "C", "D"),
    ("p1", "C", "A"),
    ("p1", "B", "A"),
    ("p1", "D", "A"),
    ("p3", "B", "A"),
}
TIES = {("p1", "B", "D"), ("p2", "A", "B"), ("p2", "A", "C"), ("p2", "B", "C")}


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture()
def rankings_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "rankings.jsonl", RANKINGS)


# ----------------------------------------------------------------------------- format trl


def test_trl_export_holds_strict_pairs_only_and_the_ties_beside_it(rankings_file, in_tmp, capsys):
    args = ["export", "--rankings", str(rankings_file), "--format", "trl", "--out", "prefs.jsonl"]
    assert main([*args, "--tracking.mode", "disabled"]) == 0
    prefs, ties = read_rows(in_tmp / "prefs.jsonl"), read_rows(in_tmp / "prefs.ties.jsonl")

    assert {(r["prompt_id"], r["chosen_label"], r["rejected_label"]) for r in prefs} == STRICT
    assert len(prefs) == len(STRICT) and not any("tie" in r for r in prefs)
    assert {(r["prompt_id"], r["label_a"], r["label_b"]) for r in ties} == TIES
    assert len(ties) == len(TIES) and all(r["tie"] is True and "chosen" not in r for r in ties)
    assert "4 tied pairs" in capsys.readouterr().out

    # TRL's conversational format: the prompt is the conversation the responses were sampled
    # under (a text prompt is one user turn; a chat keeps its system message), each response
    # one assistant message.
    by_prompt = {r["prompt_id"]: r for r in prefs}
    assert by_prompt["p1"]["prompt"] == [{"role": "user", "content": "question p1"}]
    assert by_prompt["p3"]["prompt"] == CHAT_PROMPT
    assert by_prompt["p3"]["chosen"] == [{"role": "assistant", "content": "answer B to p3"}]
    assert by_prompt["p3"]["rejected"] == [{"role": "assistant", "content": "answer A to p3"}]


def test_the_trl_file_trains_reward_trainer_and_dpo_trainer_one_step(rankings_file, tmp_path):
    import datasets
    from transformers import AutoModelForSequenceClassification
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    out, _ = write_export(build_export(load_rankings(rankings_file), "trl"), tmp_path / "trl.jsonl")
    dataset = datasets.load_dataset(
        "json", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf")
    )
    tok = build_tiny_tokenizer()  # has a chat template
    one_step = dict(
        per_device_train_batch_size=2,
        max_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
    )

    config = build_tiny_model(tok).config
    config.num_labels = 1
    torch.manual_seed(0)
    reward_model = AutoModelForSequenceClassification.from_config(config)
    trainer = RewardTrainer(
        model=reward_model,
        args=RewardConfig(output_dir=str(tmp_path / "rm"), **one_step),
        train_dataset=dataset,
        processing_class=tok,
    )
    assert math.isfinite(trainer.train().training_loss) and trainer.state.global_step == 1
    # TRL renders the text the lab's reward model reads (format_conversation), then closes the
    # assistant turn its own way: the template's newline after EOS, and EOS after a cut-off response.
    row = next(r for r in trainer.train_dataset if r["prompt_id"] == "p3")
    lab_chosen = tok(format_conversation(tok, CHAT_PROMPT, "answer B to p3"), add_special_tokens=False)[
        "input_ids"
    ]
    assert row["chosen_ids"][: len(lab_chosen)] == lab_chosen

    trainer = DPOTrainer(
        model=build_tiny_model(tok),
        ref_model=build_tiny_model(tok),
        args=DPOConfig(output_dir=str(tmp_path / "dpo"), **one_step),
        train_dataset=dataset,
        processing_class=tok,
    )
    assert math.isfinite(trainer.train().training_loss) and trainer.state.global_step == 1
    row = next(r for r in trainer.train_dataset if r["prompt_id"] == "p3")
    assert row["prompt_ids"] == tok(format_prompt(tok, CHAT_PROMPT), add_special_tokens=False)["input_ids"]


def test_standard_style_is_the_lab_text_as_strings(rankings_file, in_tmp, capsys):
    tok = build_tiny_tokenizer()
    export = build_export(load_rankings(rankings_file), "trl", trl_style="standard", model="tiny")
    (row,) = [r for r in export.records if r["prompt_id"] == "p3"]
    assert row["prompt"] == format_prompt(tok, CHAT_PROMPT)
    assert row["prompt"] + row["chosen"] == format_conversation(tok, CHAT_PROMPT, "answer B to p3")
    assert row["rejected"] == "answer A to p3"  # cut at the length limit: no EOS, as the lab scores it
    assert {(r["prompt_id"], r["label_a"], r["label_b"]) for r in export.ties} == TIES

    capsys.readouterr()  # the tiny model's build reported its progress
    args = ["export", "--rankings", str(rankings_file), "--format", "trl", "--trl_style", "standard"]
    assert main([*args, "--tracking.mode", "disabled"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs --model" in err and not (in_tmp / "runs").exists()


def test_bad_trl_exports_are_one_clear_error():
    with pytest.raises(DataError) as err:  # only ties: an empty file would fail later, inside TRL
        build_export(load_rankings([ranking("p2", "A = B = C", 3)]), "trl")
    assert err.value.code == "empty" and "all 3 pairs" in str(err.value)
    with pytest.raises(ConfigError) as err:
        rankings_to_trl(load_rankings(RANKINGS), style="sharegpt")
    assert str(err.value) == "unknown TRL style 'sharegpt'; valid styles: conversational, standard"


def test_annotate_export_writes_the_same_trl_rows(tmp_path, capsys):
    db = tmp_path / "lab.db"
    store = Store(db)
    store.add_user("ada", "s3cret-password")
    candidates = {k: v for k, v in ranking("q1", "", 3).items() if k in ("prompt_id", "prompt", "candidates")}
    import_candidates(store, str(write_jsonl(tmp_path / "candidates.jsonl", [candidates])))
    store.submit("ada", store.next_item("ada").prompt_id, "C > A = B")

    args = ["annotate", "export", "--db", str(db), "--format", "trl", "--out", str(tmp_path / "t.jsonl")]
    assert main(args) == 0
    assert "1 tied pairs" in capsys.readouterr().out
    preferences, ties = rankings_to_trl(load_rankings(store.submitted_rankings()))
    assert read_rows(tmp_path / "t.jsonl") == preferences and len(preferences) == 2
    assert read_rows(tmp_path / "t.ties.jsonl") == ties and [(t["label_a"], t["label_b"]) for t in ties] == [
        ("A", "B")
    ]


# ----------------------------------------------------------------------------- exported rankings


def test_exported_rankings_load_in_datasets_with_one_schema(tmp_path, in_tmp):
    """K = 3 simulated rankings with gold, K = 5 human rankings without: one schema."""
    import datasets

    sources = {
        "k3": [
            ranking(f"s{i}", "C > A > B", 3, gold={"A": 0.5, "B": 0.1, "C": 0.9}, gold_scorer="vader")
            for i in range(2)
        ],
        "k5": [ranking(f"h{i}", "E > D > C > B > A", 5) for i in range(2)],
    }
    features: dict[str, dict] = {}
    for name, records in sources.items():
        source = write_jsonl(tmp_path / f"{name}_source.jsonl", records)
        for suffix in ("jsonl", "parquet"):
            out = f"{name}.{suffix}"
            main(
                [
                    "export",
                    "--rankings",
                    str(source),
                    "--format",
                    "rankings",
                    "--out",
                    out,
                    "--tracking.mode",
                    "disabled",
                ]
            )
            builder = "json" if suffix == "jsonl" else "parquet"
            ds = datasets.load_dataset(builder, data_files=out, split="train", cache_dir=str(tmp_path / "hf"))
            features[out] = ds.features

    # Typed files: identical features whatever K and whether or not there is gold.
    assert features["k3.parquet"] == features["k5.parquet"]
    assert features["k3.parquet"]["gold"] == datasets.List(datasets.Value("float64"))
    # JSON Lines: gold is a list for any K (no struct of fields A, B, C); a column null in every
    # row has no type JSON could carry, so only gold and gold_scorer of the gold-less file differ,
    # and casting them (docs/architecture.md) gives one schema.
    assert features["k3.jsonl"]["gold"] == datasets.List(datasets.Value("float64"))
    differ = {c for c in features["k3.jsonl"] if features["k3.jsonl"][c] != features["k5.jsonl"][c]}
    assert set(features["k3.jsonl"]) == set(features["k5.jsonl"]) and differ == {"gold", "gold_scorer"}
    human = datasets.load_dataset(
        "json", data_files="k5.jsonl", split="train", cache_dir=str(tmp_path / "hf")
    )
    human = human.cast_column("gold", datasets.List(datasets.Value("float64")))
    assert human.cast_column("gold_scorer", datasets.Value("string")).features == features["k3.jsonl"]

    # The lab reads the list back as the {label: score} object its readers use, and still
    # reads the object that `rlhf simulate` writes.
    assert [r["gold"] for r in load_rankings("k3.jsonl")] == [{"A": 0.5, "B": 0.1, "C": 0.9}] * 2
    assert load_rankings(tmp_path / "k3_source.jsonl")[0]["gold"] == {"A": 0.5, "B": 0.1, "C": 0.9}
    with pytest.raises(DataError) as err:
        load_rankings([ranking("s", "C > A > B", 3, gold=[0.5, 0.1])])
    assert "gold: has 2 scores for 3 candidates" in str(err.value)


def test_pairs_export_is_unchanged_by_the_trl_format(rankings_file):
    export = build_export(load_rankings(rankings_file), "pairs")
    assert export.ties is None and export.records == rankings_to_pairs(load_rankings(rankings_file))


# ----------------------------------------------------------------------------- reward model outside the lab

PROMPTS = ["Hi", "Say something nice about the weather today.", CHAT_PROMPT]
RESPONSES = ["What a great day!", "It is a day.", "Because of Rayleigh scattering of sunlight."]
FINISHED = [True, False, True]


@pytest.mark.parametrize("pooling, read_layers", [("mean", []), ("last", []), ("mean", [1, 0])])
def test_plain_transformers_scores_like_the_lab(tmp_path, pooling, read_layers):
    """score_like_the_lab (no lab imports inside) gives load_reward_fn's normalised rewards, also
    for a head over several layers' means (its weights drawn here: a new head starts at zero)."""
    top = 0 if read_layers else 1
    model, tok = build_reward_model(
        "tiny", "top", top_layers=top, seed=3, pooling=pooling, layers=1, read_layers=read_layers
    )
    if read_layers:
        torch.nn.init.normal_(model.head.weight, generator=torch.Generator().manual_seed(3))
    max_length = 72  # cuts the longest conversation's prompt side
    raw, enc = score_texts(model, tok, PROMPTS, RESPONSES, max_length, finished=FINISHED)
    assert enc.truncated >= 1
    meta = {
        "loss": "bt",
        "pooling": pooling,
        "max_length": max_length,
        "normalization": {"offset": float(raw.mean()), "scale": float(raw.std())},
    }
    model_dir = save_reward_model(model, tok, tmp_path / "rm", meta)

    lab = load_reward_fn(str(model_dir))(PROMPTS, RESPONSES, FINISHED)
    assert abs(float(lab.mean())) < 1e-4  # the lab applies the stored normalisation
    plain = score_like_the_lab(model_dir, PROMPTS, RESPONSES, FINISHED)
    assert torch.allclose(torch.tensor(plain), lab, atol=1e-4)


def test_rm_eval_reads_gold_from_exported_rankings(tmp_path, in_tmp):
    """`rlhf rm eval` (reward_models/evaluate.py) reads the exported gold list as its gold scores."""
    model, tok = build_reward_model("tiny", "top", top_layers=1, seed=3, pooling="mean", layers=1)
    model_dir = save_reward_model(
        model, tok, tmp_path / "rm", {"loss": "bt", "pooling": "mean", "max_length": 128}
    )
    gold = {"A": 0.5, "B": 0.1, "C": 0.9}
    simulated = [ranking(f"s{i}", "C > A > B", 3, gold=gold, gold_scorer="test") for i in range(3)]
    source = write_jsonl(tmp_path / "simulated.jsonl", simulated)
    export = ["export", "--rankings", str(source), "--format", "rankings", "--out", "exported.jsonl"]
    assert main([*export, "--tracking.mode", "disabled"]) == 0
    assert read_rows(in_tmp / "exported.jsonl")[0]["gold"] == [0.5, 0.1, 0.9]
    rm_eval = ["rm", "eval", "--reward_model", str(model_dir), "--rankings", "exported.jsonl"]
    assert main([*rm_eval, "--tracking.mode", "disabled"]) == 0
    metrics = json.loads((in_tmp / "runs" / "default" / "rm_eval" / "metrics.json").read_text())["metrics"]
    assert metrics["eval/gold_pairs"] == 9 and metrics["eval/annotator_gold_accuracy"] == 1.0
