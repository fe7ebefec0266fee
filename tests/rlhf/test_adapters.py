"""Adapters beyond LoRA: one field (`adapter`) picks the adapter of SFT, DPO, KTO and PPO; each
trains it, saves, reloads and samples with the lab's sampler, and only the adapter's weights change.
IA3 merges into the weights; prompt and prefix tuning stay adapters, whose forward through the
lab's cache-writing wrapper must equal peft's own."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf.adapters import AdapterFields, VirtualTokenPolicy, with_adapter
from rlhf.cli import main
from rlhf.data import read_jsonl
from rlhf.errors import ConfigError
from rlhf.models import load_policy
from rlhf.ppo.value import forward_query_response
from rlhf.sampling import sample_responses
from tests.reward_models.rm_data import make_records, write_records
from tests.rlhf import ppo_helpers

IA3_TARGETS = ("k_proj", "v_proj", "down_proj")  # peft's IA3 modules for Llama-style models


def _changed(policy_dir) -> list[str]:
    trained, _ = load_policy(str(policy_dir), merged=True)
    base, _ = load_policy("tiny")
    before = base.state_dict()
    return [n for n, p in trained.state_dict().items() if not torch.equal(p, before[n])]


def _run(stage: str, adapter: str, tmp_path, *extra: str):
    runs = tmp_path / "runs"
    args = _stage_args(stage, tmp_path) + [
        "--lora",
        "true",
        "--adapter",
        adapter,
        "--learning_rate" if stage in ("sft", "ppo") else "--lr",
        "0.01",
        *extra,
    ]
    assert main([*args, "--runs_dir", str(runs), "--tracking.mode", "disabled"]) == 0
    return runs, runs / "default" / stage / "policy"


def _samples(runs, policy, tmp_path) -> None:
    out = tmp_path / "candidates.jsonl"
    gen = ["generate", "--model", str(policy), "--limit", "2", "--k", "2", "--max_new_tokens", "4"]
    assert main([*gen, "--out", str(out), "--runs_dir", str(runs), "--tracking.mode", "disabled"]) == 0
    assert [len(r["candidates"]) for r in read_jsonl(out)] == [2, 2]


def _stage_args(stage: str, tmp_path) -> list[str]:
    if stage == "sft":
        demos = ppo_helpers.write_demonstrations(tmp_path / "demos.jsonl")
        return [
            "sft",
            "--model",
            "tiny",
            "--demonstrations",
            str(demos),
            "--max_examples",
            "8",
            "--batch_size",
            "4",
        ]
    if stage == "ppo":
        prompts = ppo_helpers.write_prompts(tmp_path / "prompts.jsonl")
        return [
            "ppo",
            "--policy",
            "tiny",
            "--reward",
            "tests.rlhf.ppo_helpers:ascii_fraction",
            "--prompts",
        ] + [
            str(prompts),
            "--total_episodes",
            "8",
            "--batch_size",
            "8",
            "--minibatch_size",
            "8",
            "--micro_batch_size",
            "8",
            "--response_length",
            "6",
            "--num_eval_prompts",
            "0",
        ]
    rankings = write_records(tmp_path / "rankings.jsonl", make_records(8, seed=1))
    return [stage, "--policy", "tiny", "--rankings", str(rankings), "--max_steps", "2"]


@pytest.mark.parametrize("stage", ["sft", "dpo", "kto", "ppo"])
def test_lora_in_the_last_layers_changes_only_those_layers(stage, tmp_path):
    runs, policy = _run(stage, "lora", tmp_path, "--lora_layers", "1")
    changed = _changed(policy)  # the tiny model has 2 layers: only the second one's projections
    assert changed and all(".layers.1.self_attn." in n for n in changed), changed
    _samples(runs, policy, tmp_path)


def test_lora_layers_are_checked_before_any_training():
    with pytest.raises(ConfigError, match="applies to adapter: lora"):
        AdapterFields(adapter="ia3", lora_layers=1).validate_adapter()
    with pytest.raises(ConfigError, match="must be >= 0"):
        AdapterFields(lora_layers=-1).validate_adapter()
    policy, _ = load_policy("tiny")
    with pytest.raises(ConfigError, match="lora_layers: 3 is more than the model's 2 layers"):
        with_adapter(policy, AdapterFields(lora_layers=3))
    adapted = with_adapter(policy, AdapterFields(lora_layers=1))
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1." in n for n in trainable)


@pytest.mark.parametrize("stage", ["sft", "dpo", "kto", "ppo"])
def test_ia3_trains_saves_reloads_and_samples(stage, tmp_path):
    runs, policy = _run(stage, "ia3", tmp_path)
    if stage == "sft":  # SFT writes the adapter itself; the later stages merge theirs
        assert json.loads((policy / "adapter_config.json").read_text())["peft_type"] == "IA3"
    changed = _changed(policy)
    assert changed and all(any(t in n for t in IA3_TARGETS) for n in changed), changed
    _samples(runs, policy, tmp_path)


@pytest.mark.parametrize("adapter", ["prompt_tuning", "prefix_tuning"])
@pytest.mark.parametrize("stage", ["sft", "dpo", "kto", "ppo"])
def test_virtual_tokens_train_save_reload_and_sample(stage, adapter, tmp_path):
    runs, policy = _run(stage, adapter, tmp_path, "--num_virtual_tokens", "3")
    config = json.loads((policy / "adapter_config.json").read_text())
    assert config["peft_type"] == adapter.upper() and config["num_virtual_tokens"] == 3
    reloaded, _ = load_policy(str(policy), merged=True)
    assert isinstance(reloaded, VirtualTokenPolicy)  # never merged: the virtual tokens are the policy
    base, _ = load_policy("tiny")
    for name, weight in base.state_dict().items():  # the base model is untouched
        assert torch.equal(reloaded.base_model.state_dict()[name], weight), name
    encoder = reloaded.peft_model.prompt_encoder["default"].embedding.weight
    if adapter == "prefix_tuning":  # starts at zero keys and values
        assert encoder.abs().sum() > 0
    else:  # starts as embeddings of vocabulary tokens; trained ones are not
        vocab = base.get_input_embeddings().weight
        assert torch.cdist(encoder, vocab).min(dim=1).values.min() > 1e-4
    _samples(runs, policy, tmp_path)


def _perturbed(adapter: str):
    torch.manual_seed(0)
    base, tokenizer = load_policy("tiny")
    policy = with_adapter(base, AdapterFields(adapter=adapter, num_virtual_tokens=4))
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return policy, tokenizer


@pytest.mark.parametrize("adapter", ["prompt_tuning", "prefix_tuning"])
def test_virtual_token_forward_equals_peft_and_the_sampler(adapter):
    policy, tokenizer = _perturbed(adapter)
    ids = torch.randint(5, 200, (3, 10))
    ones = torch.ones_like(ids)
    theirs = policy.peft_model(input_ids=ids, attention_mask=ones).logits[:, -10:]
    ours = policy(input_ids=ids, attention_mask=ones, position_ids=torch.arange(10).expand(3, -1)).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    with policy.disable_adapter():  # the reference is the base model itself
        torch.testing.assert_close(policy(input_ids=ids).logits, policy.base_model(input_ids=ids).logits)
    assert (ours - policy.base_model(input_ids=ids).logits).abs().max() > 1e-3

    # the KV-cached sampler (shared-prefix prefill, left padding) and the scoring forward agree
    query = torch.cat([torch.full((3, 3), 7), ids[:, :5]], dim=1)  # a common 3-token prefix
    query_mask = torch.ones_like(query)
    query_mask[0, 3:5] = 0  # rows pad on the left after the shared part is split off
    gen = torch.Generator().manual_seed(1)
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    s = sample_responses(
        policy, query, query_mask, max_new_tokens=5, eos_token_id=eos, pad_token_id=pad, generator=gen
    )
    keep = s.tokens.shape[1] + 1
    logits = forward_query_response(
        policy, query, query_mask, s.tokens, s.mask.long(), logits_to_keep=keep
    ).logits
    scored = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, s.tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(scored * s.mask, s.logprobs * s.mask, atol=1e-4, rtol=1e-4)


def test_virtual_token_policy_trains_on_from_a_virtual_token_sft(tmp_path):
    """PPO from a prompt-tuned SFT policy trains the SFT's own virtual tokens (they cannot be
    merged) against a frozen copy; a different adapter kind is refused with one line."""
    runs, sft_policy = _run("sft", "prompt_tuning", tmp_path, "--num_virtual_tokens", "3")
    ppo = _stage_args("ppo", tmp_path)
    ppo[ppo.index("--policy") + 1] = str(sft_policy)
    common = ["--runs_dir", str(runs), "--tracking.mode", "disabled", "--lora", "true"]
    assert main([*ppo, *common, "--adapter", "lora"]) == 2
    kto = _stage_args("kto", tmp_path)
    kto[kto.index("--policy") + 1] = str(sft_policy)
    assert main([*kto, *common, "--adapter", "prompt_tuning"]) == 2  # TRL adds its own adapter
    assert main([*ppo, *common, "--adapter", "prompt_tuning", "--learning_rate", "0.01"]) == 0
    policy = runs / "default" / "ppo" / "policy"
    meta = json.loads((policy / "rlhf_policy.json").read_text())
    assert meta["base"] == json.loads((sft_policy / "rlhf_policy.json").read_text())["base"]
    before = load_policy(str(sft_policy))[0].peft_model.prompt_encoder["default"].embedding.weight
    after = load_policy(str(policy))[0].peft_model.prompt_encoder["default"].embedding.weight
    assert not torch.equal(before, after)
    _samples(runs, policy, tmp_path)
