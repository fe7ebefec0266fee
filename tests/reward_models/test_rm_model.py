"""The reward model wrapper: last real token, padding invariance, the frozen-layer cache, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from reward_models.model import (
    LoraSettings,
    build_reward_model,
    encode_conversations,
    last_token_index,
    load_reward_model,
    pad_hidden,
    pad_right,
    save_reward_model,
    score_texts,
)

PROMPTS = ["What is soup?", "Hi", "Tell me a long story about a cat who liked soup very much."]
RESPONSES = ["Soup is a warm dish.", "Hello!", "Once upon a time there was a cat."]


@pytest.fixture(scope="module")
def top_model():
    return build_reward_model("tiny", "top", top_layers=1, seed=0)


def test_last_token_index_any_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_same_text_scores_the_same_alone_and_in_a_padded_batch(top_model):
    model, tok = top_model
    enc = encode_conversations(tok, PROMPTS, RESPONSES, max_length=256)
    lengths = [len(i) for i in enc.ids]
    assert len(set(lengths)) == 3  # the batch really is padded
    with torch.no_grad():
        batch = model(*pad_right(enc.ids, tok.pad_token_id))
        alone = torch.stack([model(*pad_right([ids], tok.pad_token_id))[0] for ids in enc.ids])
    assert torch.allclose(batch, alone, atol=1e-5)
    # the score is read at the EOS the conversation ends with, not at padding
    assert all(ids[-1] == tok.eos_token_id for ids in enc.ids)


def test_cached_lower_layers_give_the_same_rewards(top_model):
    model, tok = top_model
    enc = encode_conversations(tok, PROMPTS, RESPONSES, max_length=256)
    ids, mask = pad_right(enc.ids, tok.pad_token_id)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask)
        h = model.lower_hidden(ids, mask)
        # re-pad per-sequence slices, as the training cache does
        hidden, mask2 = pad_hidden([h[i, : len(s)] for i, s in enumerate(enc.ids)])
        cached = model(hidden=hidden, attention_mask=mask2)
    assert torch.allclose(full, cached, atol=1e-5)


def test_top_mode_trains_only_top_layers_and_head(top_model):
    model, _ = top_model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("layers.1." in n for n in trainable) and any("score" in n for n in trainable)
    assert not any("layers.0." in n or "embed_tokens" in n for n in trainable)


def test_truncation_cuts_the_prompt_side_and_counts(top_model):
    _, tok = top_model
    enc = encode_conversations(tok, ["x" * 500, "short"], ["the answer", "ok"], max_length=64)
    assert enc.truncated == 1 and enc.response_truncated == 0
    assert len(enc.ids[0]) == 64 and enc.ids[0][-1] == tok.eos_token_id
    assert tok.decode(enc.ids[0]).endswith("the answer" + tok.eos_token)
    long_resp = encode_conversations(tok, ["q"], ["y" * 300], max_length=64)
    assert long_resp.response_truncated == 1


def test_save_and_load_round_trip(top_model, tmp_path):
    model, tok = top_model
    before, _ = score_texts(model, tok, PROMPTS, RESPONSES, 256)
    out = save_reward_model(
        model,
        tok,
        tmp_path / "rm",
        {"loss": "grouped_bt", "max_length": 256, "normalization": {"offset": 0.0, "scale": 1.0}},
    )
    assert json.loads((out / "rlhf_reward.json").read_text())["loss"] == "grouped_bt"
    loaded, tok2, meta = load_reward_model(out)
    after, _ = score_texts(loaded, tok2, PROMPTS, RESPONSES, 256)
    assert torch.allclose(before, after, atol=1e-5)
    assert not any(p.requires_grad for p in loaded.parameters())


def test_lora_trains_adapters_and_saves_merged(tmp_path):
    model, tok = build_reward_model(
        "tiny", "lora", lora=LoraSettings(r=4, alpha=8, targets=("q_proj", "v_proj"))
    )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "score" in n for n in names)
    enc = encode_conversations(tok, PROMPTS, RESPONSES, 256)
    ids, mask = pad_right(enc.ids, tok.pad_token_id)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    r = model(input_ids=ids, attention_mask=mask)
    (-(r[0] - r[1])).backward()  # push response 0 above response 1
    opt.step()
    with torch.no_grad():
        trained = model(input_ids=ids, attention_mask=mask)
    assert trained[0] - trained[1] > r[0].item() - r[1].item()
    out = save_reward_model(model, tok, tmp_path / "lora_rm", {"loss": "bt", "max_length": 256})
    assert not (out / "adapter_config.json").exists()  # merged into plain weights
    loaded, tok2, _ = load_reward_model(out)
    again, _ = score_texts(loaded, tok2, PROMPTS, RESPONSES, 256)
    assert torch.allclose(trained, again, atol=1e-4)


def test_shared_prefix_scoring_equals_whole_sequences(top_model):
    from reward_models.model import score_ids
    from rlhf.sampling import common_prefix_length

    model, tok = top_model
    system = [{"role": "system", "content": "You judge answers by how helpful and kind they are."}]
    prompts = [system + [{"role": "user", "content": p}] for p in ("hi", "tell me more about it", "why")]
    enc = encode_conversations(tok, prompts * 2, RESPONSES[:3] + ["", "yes", "a longer answer here"], 256)
    assert common_prefix_length(enc.ids) >= 8  # the shared path really runs
    shared = score_ids(model.eval(), enc.ids, tok.pad_token_id, batch_size=4)
    whole = score_ids(model, enc.ids, tok.pad_token_id, batch_size=4, share_prefix=False)
    torch.testing.assert_close(shared, whole, atol=1e-5, rtol=1e-5)
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 1
    assert common_prefix_length([[5, 6], [5, 6]]) == 1 and common_prefix_length([]) == 0


@pytest.fixture(scope="module")
def mean_model():
    return build_reward_model("tiny", "top", top_layers=1, seed=0, pooling="mean")


def test_mean_pooling_is_the_mean_of_a_per_token_reward_over_the_response(mean_model):
    """Hand check: the head applied to every response token's state, averaged, is the reward."""
    from reward_models.model import response_mask

    model, tok = mean_model
    enc = encode_conversations(tok, PROMPTS, RESPONSES, max_length=256)
    ids, mask = pad_right(enc.ids, tok.pad_token_id)
    pool = response_mask(enc.starts, mask)
    with torch.no_grad():
        rewards = model(input_ids=ids, attention_mask=mask, pool_mask=pool)
        h = model.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        per_token = model.head(h).squeeze(-1)
    for i, (seq, start) in enumerate(zip(enc.ids, enc.starts)):
        expected = per_token[i, start : len(seq)].mean()
        torch.testing.assert_close(rewards[i], expected, atol=1e-5, rtol=1e-5)
        # the response starts right after the prompt as the policy saw it
        assert tok.decode(seq[start:]) == RESPONSES[i] + tok.eos_token


def test_mean_pooling_is_padding_and_prefix_invariant(mean_model):
    from reward_models.model import score_ids

    model, tok = mean_model
    system = [{"role": "system", "content": "You judge answers by how helpful and kind they are."}]
    prompts = [system + [{"role": "user", "content": p}] for p in ("hi", "tell me more about it", "why")]
    enc = encode_conversations(tok, prompts * 2, RESPONSES[:3] + ["", "yes", "a longer answer here"], 256)
    batched = score_ids(model.eval(), enc.ids, tok.pad_token_id, batch_size=6, starts=enc.starts)
    whole = score_ids(model, enc.ids, tok.pad_token_id, batch_size=6, share_prefix=False, starts=enc.starts)
    alone = torch.cat(
        [score_ids(model, [i], tok.pad_token_id, starts=[s]) for i, s in zip(enc.ids, enc.starts)]
    )
    torch.testing.assert_close(batched, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_eos_is_appended_only_to_finished_responses(mean_model):
    _, tok = mean_model
    enc = encode_conversations(tok, PROMPTS[:2], RESPONSES[:2], 256, finished=[True, False])
    assert enc.ids[0][-1] == tok.eos_token_id and enc.ids[1][-1] != tok.eos_token_id
    assert tok.decode(enc.ids[1][enc.starts[1] :]) == RESPONSES[1]


def test_truncated_backbone_saves_and_loads_with_its_pooling(tmp_path):
    model, tok = build_reward_model("tiny", "top", top_layers=1, seed=0, pooling="mean", layers=1)
    assert model.n_layers == 1 and model.seq_model.config.num_hidden_layers == 1
    before, _ = score_texts(model, tok, PROMPTS, RESPONSES, 256)
    out = save_reward_model(model, tok, tmp_path / "rm", {"loss": "bt", "max_length": 256, "pooling": "mean"})
    loaded, tok2, _ = load_reward_model(out)
    assert loaded.pooling == "mean" and loaded.n_layers == 1
    after, _ = score_texts(loaded, tok2, PROMPTS, RESPONSES, 256)
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-5)
    with pytest.raises(Exception, match="layers=9"):
        build_reward_model("tiny", "top", top_layers=1, layers=9)
