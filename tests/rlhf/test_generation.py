"""The rollout sampler and ``rlhf generate`` on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf.generation import generate_candidates
from rlhf.models import format_prompt, load_policy
from rlhf.ppo.rollout import decode_responses
from rlhf.sampling import Samples, filter_logits, response_text, sample_from_logits, sample_responses

PROMPTS = [
    {"prompt_id": "p1", "prompt": "Hi"},
    {"prompt_id": "p2", "prompt": "Tell me something nice about the weather today."},
    {
        "prompt_id": "p3",
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}],
    },
]


@pytest.fixture(scope="module")
def tiny():
    return load_policy("tiny")


def _batch(tok, texts):
    enc = tok(
        [format_prompt(tok, t) for t in texts], return_tensors="pt", padding=True, add_special_tokens=False
    )
    return enc.input_ids, enc.attention_mask


def _forward_logprobs(model, query, qmask, s: Samples, temperature: float) -> torch.Tensor:
    """Log-probs of the sampled tokens from one full forward over query + response."""
    ids = torch.cat([query, s.tokens], dim=1)
    mask = torch.cat([qmask, s.mask.long()], dim=1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    logits = logits[:, query.shape[1] - 1 : -1] / temperature
    return logits.log_softmax(-1).gather(2, s.tokens[..., None]).squeeze(2) * s.mask


# ----------------------------------------------------------------------------- pure sampling pieces


def test_filter_logits_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.equal(filter_logits(logits), logits)
    k2 = filter_logits(logits, top_k=2)
    assert torch.isinf(k2[0, [0, 3]]).all() and torch.equal(k2[0, [1, 2]], logits[0, [1, 2]])
    # probs ≈ [0.087, 0.644, 0.237, 0.032]: top_p=0.7 keeps the 2 tokens whose prefix mass < 0.7
    p = filter_logits(logits, top_p=0.7)
    assert torch.isfinite(p[0, [1, 2]]).all() and torch.isinf(p[0, [0, 3]]).all()
    assert torch.isfinite(filter_logits(logits, top_p=0.5)[0, 1]) and torch.isinf(
        filter_logits(logits, top_p=0.5)[0, 2]
    )


def test_sample_from_logits_matches_the_softmax_distribution():
    logits = torch.tensor([0.5, -1.0, 2.0, 0.0, -3.0]).repeat(40_000, 1)
    gen = torch.Generator().manual_seed(0)
    tok, logp = sample_from_logits(logits, temperature=1.5, generator=gen)
    want = torch.softmax(logits[0] / 1.5, -1)
    freq = torch.bincount(tok, minlength=5).float() / len(tok)
    assert torch.allclose(freq, want, atol=0.01)
    assert torch.allclose(logp, torch.log_softmax(logits[0] / 1.5, -1)[tok], atol=1e-6)
    tok1, _ = sample_from_logits(logits[:100], top_k=1, generator=gen)
    assert torch.all(tok1 == 2)
    tok2, lp2 = sample_from_logits(logits[:2000], top_k=2, generator=gen)
    assert set(tok2.tolist()) == {0, 2}
    # the returned log-prob is of the unfiltered distribution (what a training pass computes)
    assert torch.allclose(lp2, torch.log_softmax(logits[0], -1)[tok2], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.7, 0), (1.0, 3)])
def test_a_sampling_workspace_changes_no_draw(dtype, temperature, top_k):
    """A loop's shrinking batches through one workspace draw exactly what fresh tensors draw, bit for
    bit, while the buffers are allocated once; fp32 logits are read in place and never written."""
    from rlhf.sampling import SamplingWorkspace

    logits = (torch.randn(6, 50, generator=torch.Generator().manual_seed(3)) * 3).to(dtype)
    workspace = SamplingWorkspace()
    storage = set()
    for rows in (6, 6, 4, 1):  # rows leave the batch as they finish
        step = logits[:rows].clone()
        kept = step.clone()
        u = torch.rand(rows, generator=torch.Generator().manual_seed(rows))
        fresh = sample_from_logits(step, temperature, top_k, uniform=u)
        reused = sample_from_logits(step, temperature, top_k, uniform=u, workspace=workspace)
        assert torch.equal(fresh[0], reused[0]) and torch.equal(fresh[1], reused[1])
        assert torch.equal(step, kept)
        storage.add(workspace.buffer("unnorm", step).data_ptr())
    assert len(storage) == 1


# ----------------------------------------------------------------------------- the sampler


def test_sampler_logprobs_equal_a_full_forward(tiny):
    model, tok = tiny
    query, qmask = _batch(tok, ["a", "a much longer prompt than the others", "mid length"])
    for temperature in (1.0, 0.7):
        s = sample_responses(
            model,
            query,
            qmask,
            max_new_tokens=24,
            temperature=temperature,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            generator=torch.Generator().manual_seed(1),
        )
        assert s.tokens.shape == s.logprobs.shape == (3, s.tokens.shape[1])
        ref = _forward_logprobs(model, query, qmask, s, temperature)
        assert torch.allclose(s.logprobs, ref, atol=1e-4)
        assert torch.all(s.logprobs[~s.mask] == 0)


def test_near_greedy_sampling_equals_greedy_generate(tiny):
    model, tok = tiny
    query, qmask = _batch(tok, ["x", "hello world, longer", "abc"])
    s = sample_responses(
        model,
        query,
        qmask,
        max_new_tokens=16,
        temperature=1e-5,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=query,
            attention_mask=qmask,
            do_sample=False,
            max_new_tokens=16,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    greedy = out[:, query.shape[1] :]
    assert torch.equal(s.tokens, greedy[:, : s.tokens.shape[1]])


def test_truncation_after_eos_and_batch_shrinking(tiny):
    model, tok = tiny
    query, qmask = _batch(tok, ["x", "hello world, longer", "abc"])
    kw = dict(max_new_tokens=16, temperature=1e-5, pad_token_id=tok.pad_token_id)
    # Greedy continuation with an EOS that never occurs, then declare row 0's 4th token the EOS.
    free = sample_responses(model, query, qmask, eos_token_id=-1, **kw)
    stop = int(free.tokens[0, 3])
    s = sample_responses(model, query, qmask, eos_token_id=stop, **kw)
    first = [(row == stop).nonzero()[0].item() + 1 if (row == stop).any() else 16 for row in free.tokens]
    assert s.lengths.tolist() == first
    assert int(s.lengths[0]) <= 4
    for i, n in enumerate(first):
        assert torch.equal(s.tokens[i, :n], free.tokens[i, :n]), "shrinking the batch must not change rows"
        assert torch.all(s.tokens[i, n:] == tok.pad_token_id)
        assert torch.all(s.logprobs[i, n:] == 0)
        assert bool(s.finished[i]) == (n < 16 or bool(free.tokens[i, 15] == stop))
    assert torch.equal(s.mask, torch.arange(s.tokens.shape[1])[None] < s.lengths[:, None])


@pytest.mark.parametrize("shrink_at", [0.5, 1.01])
def test_finished_rows_left_in_the_batch_change_no_sample(tiny, monkeypatch, shrink_at):
    """Finished rows leave the batch (and its KV cache, a copy of the whole cache) only once a
    share SHRINK_AT of it has finished; until then they ride along with a pad token and their
    outputs go unread. The samples, their log-probs and values are those of a batch that drops
    every finished row at once (SHRINK_AT 0), and the random numbers are drawn for live rows only."""
    import rlhf.sampling as sampling

    model, tok = tiny
    query, qmask = _batch(tok, ["x", "hello world, longer", "abc", "a b c d", "why?", "ok"])
    head = torch.nn.Linear(model.config.hidden_size, 1)
    free = sample_responses(
        model,
        query,
        qmask,
        max_new_tokens=30,
        eos_token_id=-1,
        pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(0),
        temperature=0.3,
        num_samples=2,
    )
    stop = int(free.tokens.flatten().mode().values)  # the most frequent token: rows end at many steps
    shrinks = []
    layer = sampling._preallocated_layer_class()
    select = layer.batch_select_indices
    monkeypatch.setattr(
        layer, "batch_select_indices", lambda self, i: (shrinks.append(len(i)), select(self, i))
    )

    def run(share: float):
        monkeypatch.setattr(sampling, "SHRINK_AT", share)
        shrinks.clear()
        s = sample_responses(
            model,
            query,
            qmask,
            max_new_tokens=30,
            eos_token_id=stop,
            pad_token_id=tok.pad_token_id,
            generator=torch.Generator().manual_seed(0),
            temperature=0.3,
            num_samples=2,
            value_head=head,
        )
        return s, list(shrinks)

    every, every_shrinks = run(0.0)
    lazy, lazy_shrinks = run(shrink_at)
    assert len(set(every.lengths.tolist())) > 2 and every.finished.sum() > 3  # rows end at several steps
    assert len(lazy_shrinks) < len(every_shrinks) and (shrink_at < 1 or not lazy_shrinks)
    for a, b in zip(
        (every.tokens, every.lengths, every.finished, every.logprobs, every.values),
        (lazy.tokens, lazy.lengths, lazy.finished, lazy.logprobs, lazy.values),
    ):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_stops_when_every_row_has_ended(tiny):
    model, tok = tiny
    query, qmask = _batch(tok, ["x", "x"])
    free = sample_responses(
        model,
        query,
        qmask,
        max_new_tokens=3,
        temperature=1e-5,
        eos_token_id=-1,
        pad_token_id=tok.pad_token_id,
    )
    # both rows' first greedy token is the stop token: the loop ends after one step
    stop = int(free.tokens[0, 0])
    s = sample_responses(
        model,
        query,
        qmask,
        max_new_tokens=10,
        temperature=1e-5,
        eos_token_id=stop,
        pad_token_id=tok.pad_token_id,
    )
    assert s.tokens.shape == (2, 1) and s.finished.all() and s.lengths.tolist() == [1, 1]


def test_sampler_first_token_distribution_matches_the_model(tiny):
    model, tok = tiny
    query, qmask = _batch(tok, ["Hi"])
    n = 4000
    s = sample_responses(
        model,
        query,
        qmask,
        max_new_tokens=1,
        temperature=1.0,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(0),
        num_samples=n,
    )
    with torch.no_grad():
        probs = model(input_ids=query, attention_mask=qmask).logits[0, -1].softmax(-1)
    freq = torch.bincount(s.tokens[:, 0], minlength=probs.shape[0]).float() / n
    assert 0.5 * (freq - probs).abs().sum() < 0.08  # total variation (sampling noise ≈ 0.05 here)


def test_num_samples_shares_one_prefill(tiny):
    model, tok = tiny
    query, qmask = _batch(tok, ["one", "a second prompt"])
    s = sample_responses(
        model,
        query,
        qmask,
        max_new_tokens=12,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(3),
        num_samples=3,
    )
    assert s.tokens.shape[0] == 6
    rq, rm = query.repeat_interleave(3, 0), qmask.repeat_interleave(3, 0)
    assert torch.allclose(s.logprobs, _forward_logprobs(model, rq, rm, s, 1.0), atol=1e-4)


# ----------------------------------------------------------------------------- candidates


def test_generate_candidates_contract_and_seed(tiny):
    model, tok = tiny
    kw = dict(k=4, max_new_tokens=10, batch_size=8, model_name="tiny", progress=False)
    a = generate_candidates(model, tok, PROMPTS, seed=0, **kw)
    b = generate_candidates(model, tok, PROMPTS, seed=0, **kw)
    c = generate_candidates(model, tok, PROMPTS, seed=1, **kw)
    assert a == b
    assert a != c
    assert [r["prompt_id"] for r in a] == ["p1", "p2", "p3"]
    assert a[2]["prompt"] == PROMPTS[2]["prompt"]
    for rec in a:
        assert [c["label"] for c in rec["candidates"]] == ["A", "B", "C", "D"]
        for cand in rec["candidates"]:
            assert cand["model"] == "tiny" and isinstance(cand["text"], str)
            g = cand["gen"]
            assert set(g) == {"temperature", "max_new_tokens", "seed", "finished", "n_tokens"}
            assert 1 <= g["n_tokens"] <= 10 and (g["finished"] or g["n_tokens"] == 10)
    from rlhf.data import validate_candidates

    for rec in a:
        clean, problems = validate_candidates(json.loads(json.dumps(rec)))
        assert problems == []


# ----------------------------------------------------------------------------- `rlhf generate`


def _prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def test_generate_command_end_to_end(in_tmp, capsys):
    from rlhf.cli import main

    prompts = _prompts_file(in_tmp)
    args = [
        "generate",
        "--model",
        "tiny",
        "--prompts",
        str(prompts),
        "--k",
        "3",
        "--max_new_tokens",
        "8",
        "--tracking.mode",
        "disabled",
        "--experiment",
        "t",
        "seed=5",
    ]
    assert main(args) == 0
    out = in_tmp / "runs" / "t" / "generate" / "candidates.jsonl"
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_id"] for r in recs] == ["p1", "p2", "p3"]
    assert all(len(r["candidates"]) == 3 and r["candidates"][0]["gen"]["seed"] == 5 for r in recs)
    metrics = [json.loads(line) for line in (out.parent / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["gen/tokens_per_s"] > 0 and metrics[0]["gen/n_candidates"] == 9
    assert (out.parent / "config.yaml").is_file()
    # the same seed through the command line gives the same file
    first = out.read_text()
    assert main(args + ["--out", str(in_tmp / "again.jsonl")]) == 0
    assert (in_tmp / "again.jsonl").read_text() == first


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        (["--k", "1"], "config"),
        (["--k", "27"], "config"),
        (["--temperature", "0"], "config"),
        (["--top_p", "1.5"], "config"),
        (["--max_new_tokens", "abc"], "config"),
    ],
)
def test_generate_bad_config_is_one_line_and_writes_nothing(in_tmp, capsys, extra, code):
    from rlhf.cli import main

    prompts = _prompts_file(in_tmp)
    rc = main(
        ["generate", "--model", "tiny", "--prompts", str(prompts), "--tracking.mode", "disabled", *extra]
    )
    err = capsys.readouterr().err
    assert rc == 2 and f"error[{code}]" in err and len(err.strip().splitlines()) == 1
    assert not (in_tmp / "runs").exists()


def test_generate_bad_inputs_write_nothing(in_tmp, capsys):
    from rlhf.cli import main

    rc = main(
        [
            "generate",
            "--model",
            "tiny",
            "--prompts",
            str(in_tmp / "missing.jsonl"),
            "--tracking.mode",
            "disabled",
        ]
    )
    assert rc == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    bad = in_tmp / "bad.jsonl"
    bad.write_text('{"prompt_id": "a", "prompt": ""}\n')
    assert main(["generate", "--model", "tiny", "--prompts", str(bad), "--tracking.mode", "disabled"]) == 2
    rc = main(
        [
            "generate",
            "--model",
            str(in_tmp / "no" / "model" / "here"),
            "--prompts",
            str(_prompts_file(in_tmp)),
            "--tracking.mode",
            "disabled",
        ]
    )
    assert rc == 2 and "error[model_not_found]" in capsys.readouterr().err
    assert not (in_tmp / "runs").exists()


def test_preallocated_cache_matches_transformers_dynamic_cache(tiny, monkeypatch):
    from transformers import DynamicCache

    from rlhf import sampling

    model, tok = tiny
    query, qmask = _batch(tok, ["one", "a second, longer prompt", "3"])
    assert type(sampling._new_cache(model, 8).layers[0]).__name__ == "PreallocatedLayer"
    kw = dict(
        max_new_tokens=20,
        temperature=0.8,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        num_samples=2,
    )
    ours = sample_responses(model, query, qmask, generator=torch.Generator().manual_seed(4), **kw)
    monkeypatch.setattr(sampling, "_new_cache", lambda model, capacity: DynamicCache(config=model.config))
    plain = sample_responses(model, query, qmask, generator=torch.Generator().manual_seed(4), **kw)
    assert torch.equal(ours.tokens, plain.tokens)
    assert torch.allclose(ours.logprobs, plain.logprobs, atol=1e-5)


def test_samples_can_feed_a_training_pass(tiny):
    model, tok = tiny
    query, qmask = _batch(tok, ["grad"])
    s = sample_responses(
        model,
        query,
        qmask,
        max_new_tokens=5,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(0),
    )
    assert not s.tokens.is_inference() and not s.logprobs.is_inference()
    model.train()
    try:
        ids = torch.cat([query, s.tokens], 1)
        logits = model(input_ids=ids).logits[:, query.shape[1] - 1 : -1]
        logp = logits.log_softmax(-1).gather(2, s.tokens[..., None]).squeeze(2)
        ((logp - s.logprobs).exp() * s.mask).sum().backward()  # a PPO-style ratio
        assert model.lm_head.weight.grad is not None
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_split_common_prefix_by_hand():
    from rlhf.sampling import split_common_prefix

    q = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [5, 6, 7, 8, 1, 2, 3], [0, 5, 6, 7, 8, 4, 4]])
    m = (q != 0).long()
    prefix, rest, rest_mask = split_common_prefix(q, m, min_len=3)
    assert prefix.tolist() == [[5, 6, 7, 8]]
    assert rest_mask.tolist() == [[0, 0, 1], [1, 1, 1], [0, 1, 1]]
    assert rest[rest_mask.bool()].tolist() == [9, 1, 2, 3, 4, 4]
    # every row keeps at least one token; too short a prefix or a single row: no split
    same = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    prefix, rest, _ = split_common_prefix(same, torch.ones_like(same), min_len=2)
    assert prefix.tolist() == [[5, 6, 7]] and rest.tolist() == [[8], [8]]
    assert split_common_prefix(q, m, min_len=5) is None
    assert split_common_prefix(q[:1], m[:1], min_len=1) is None


def test_shared_prefix_prefill_gives_the_same_logprobs(tiny):
    """Prompts sharing a long prefix (a system prompt): prefill once, then the rest; the sampled
    tokens' log-probs equal a full forward's, and equal the unshared path on the same tokens."""
    model, tok = tiny
    system = [{"role": "system", "content": "You are a careful assistant who answers briefly."}]
    texts = [system + [{"role": "user", "content": u}] for u in ("hi", "a longer question here", "why")]
    query, qmask = _batch(tok, texts)
    from rlhf.sampling import split_common_prefix

    assert split_common_prefix(query, qmask) is not None  # the shared path really runs
    kw = dict(
        max_new_tokens=16, temperature=0.8, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    shared = sample_responses(model, query, qmask, generator=torch.Generator().manual_seed(5), **kw)
    ref = _forward_logprobs(model, query, qmask, shared, 0.8)
    assert torch.allclose(shared.logprobs, ref, atol=1e-4)
    plain = sample_responses(
        model, query, qmask, generator=torch.Generator().manual_seed(5), share_prefix=False, **kw
    )
    assert torch.equal(plain.tokens, shared.tokens)  # same logits up to rounding → same draws


def test_rollouts_and_candidates_decode_to_the_same_bytes(tiny):
    """PPO's reward sees what the reward model trained on: the stop token of a finished response
    dropped, special tokens sampled mid-response kept, a cut response whole."""
    _, tok = tiny
    eos, words = tok.eos_token_id, tok.encode("hello there", add_special_tokens=False)
    special = tok.convert_tokens_to_ids(tok.all_special_tokens[0])
    finished = [*words, special, *words, eos]
    cut = [*words, *words, special]
    tokens = torch.tensor([finished, [*cut, tok.pad_token_id]])
    mask = torch.tensor([[1] * len(finished), [1] * len(cut) + [0]])
    texts = decode_responses(tok, tokens, mask, torch.tensor([True, False]))

    assert texts == [response_text(tok, finished, True), response_text(tok, cut, False)]
    assert texts[0] == tok.decode(finished[:-1], skip_special_tokens=False)  # EOS dropped, special kept
    assert tok.decode([special], skip_special_tokens=False) in texts[0]
    assert texts[1] == tok.decode(cut, skip_special_tokens=False)


# ----------------------------------------------------------------------------- decoding attention


class _GroupedAttention(torch.nn.Module):
    """What transformers' attention functions read off a Llama attention module."""

    num_key_value_groups = 3
    is_causal = True


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_decode_attention_equals_sdpa(mask_kind):
    """One query per head against a cache: the lab's grouped matmuls give SDPA's output (fp32), with
    no mask (a batch without padding), a boolean mask and an additive one; several queries go to SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from rlhf.sampling import _decode_attention

    g = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, kv_len, dim = 5, 6, 2, 11, 8
    query = torch.randn(batch, heads, 1, dim, generator=g)
    key = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    value = torch.randn(batch, kv_heads, kv_len, dim, generator=g)
    keep = torch.ones(batch, 1, 1, kv_len, dtype=torch.bool)
    keep[1, ..., :4] = False  # a left-padded row
    keep[3, ..., :7] = False
    mask = {"none": None, "bool": keep, "additive": torch.zeros(keep.shape).masked_fill(~keep, -1e9)}[
        mask_kind
    ]
    module = _GroupedAttention()
    ours, _ = _decode_attention(module, query, key, value, mask, scaling=dim**-0.5)
    ref, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=dim**-0.5)
    assert ours.shape == ref.shape == (batch, 1, heads, dim)
    assert torch.allclose(ours, ref, atol=1e-5)
    if mask_kind != "none":  # the padded positions really are left out
        moved = value.clone()
        moved[1, :, :4] += 100.0
        assert torch.allclose(_decode_attention(module, query, key, moved, mask, scaling=dim**-0.5)[0], ours)
    prefill = torch.randn(batch, heads, 4, dim, generator=g)
    assert torch.equal(
        _decode_attention(module, prefill, key, value, None, scaling=dim**-0.5)[0],
        sdpa_attention_forward(module, prefill, key, value, None, scaling=dim**-0.5)[0],
    )


def test_sampler_uses_the_decode_attention_and_gives_sdpa_back(tiny, monkeypatch):
    """Prompts of one length (no padding: the path transformers sends to SDPA's grouped kernel):
    the sampler's log-probs equal a full forward's, its draws equal plain SDPA decoding's, and the
    model runs SDPA again afterwards, also after an error inside the loop."""
    from rlhf import sampling

    model, tok = tiny
    query, qmask = _batch(tok, ["same", "size", "text"])
    assert bool(qmask.all()) and model.config._attn_implementation == "sdpa"
    kw = dict(
        max_new_tokens=16, temperature=0.9, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    calls = []
    real = sampling._decode_attention
    monkeypatch.setattr(sampling, "_decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    sampling._register_decode_attention.cache_clear()
    ours = sample_responses(model, query, qmask, generator=torch.Generator().manual_seed(2), **kw)
    assert calls and model.config._attn_implementation == "sdpa"
    assert torch.allclose(ours.logprobs, _forward_logprobs(model, query, qmask, ours, 0.9), atol=1e-4)
    used = len(calls)
    with sampling.transformers_decoding():
        plain = sample_responses(model, query, qmask, generator=torch.Generator().manual_seed(2), **kw)
    assert len(calls) == used  # the baseline really decoded with transformers' SDPA
    assert torch.equal(ours.tokens, plain.tokens)
    assert torch.allclose(ours.logprobs, plain.logprobs, atol=1e-5)
    monkeypatch.undo()
    sampling._register_decode_attention.cache_clear()
    with pytest.raises(ValueError), sampling._decode_attention_for(model):
        assert model.config._attn_implementation == "rlhf_decode"
        raise ValueError("inside the loop")
    assert model.config._attn_implementation == "sdpa"


def test_a_model_set_to_eager_attention_samples_as_it_does_through_sdpa(tiny):
    """PPO may train through eager attention (rlhf.models.attention_if_faster); the sampler decodes
    such a model with its own attention too, and its prefill through SDPA, so the draws and log-probs
    are the ones the SDPA model gives, and the model is left on eager attention."""
    model, tok = tiny
    query, qmask = _batch(tok, ["a short one", "and a longer prompt", "mid"])
    kw = dict(
        max_new_tokens=12, temperature=0.9, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    through_sdpa = sample_responses(model, query, qmask, generator=torch.Generator().manual_seed(3), **kw)
    model.set_attn_implementation("eager")
    try:
        through_eager = sample_responses(
            model, query, qmask, generator=torch.Generator().manual_seed(3), **kw
        )
        assert model.config._attn_implementation == "eager"
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(through_eager.tokens, through_sdpa.tokens)
    assert torch.equal(through_eager.logprobs, through_sdpa.logprobs)
