"""PPO loop on the tiny model: invariances, frozen reference, exact resume after Ctrl-C, validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf.config import ConfigError, build_config
from rlhf.ppo.loop import PPOConfig, run_ppo
from rlhf.ppo.setup import build_models
from tests.rlhf import ppo_helpers

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"

REWARD = "tests.rlhf.ppo_helpers:ascii_fraction"


def _cfg(tmp_path: Path, **over) -> PPOConfig:
    prompts = ppo_helpers.write_prompts(tmp_path / "prompts.jsonl")
    base = dict(
        policy="tiny",
        reward=REWARD,
        prompts=str(prompts),
        num_eval_prompts=0,
        total_episodes=8,
        batch_size=8,
        minibatch_size=8,
        micro_batch_size=8,
        ppo_epochs=1,
        response_length=6,
        learning_rate=1e-3,
        missing_eos_penalty=0.0,
        sample_every=0,
        runs_dir=str(tmp_path / "runs"),
        tracking={"mode": "disabled"},
    )
    base.update(over)
    return build_config(PPOConfig, None, base)


def _metrics(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


def _weights(policy_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(policy_dir) / "model.safetensors"))


def test_names_that_moved_out_of_the_loop_module_stay_importable_from_it():
    from rlhf.ppo import config, loop, metrics, prompts, setup

    assert loop.PPOConfig is config.PPOConfig and loop.num_updates is config.num_updates
    assert loop.RANK_SEED_STRIDE == config.RANK_SEED_STRIDE
    assert loop.prompt_index is prompts.prompt_index
    assert loop._load_prompt_sets is prompts.load_prompt_sets  # rlhf/baselines.py imports it from here
    assert loop._build_models is setup.build_models
    assert loop.score_gain is metrics.score_gain


def test_validation_before_any_model_loads(tmp_path):
    with pytest.raises(ConfigError, match="minibatch_size"):
        _cfg(tmp_path, batch_size=8, minibatch_size=3)
    with pytest.raises(ConfigError, match="micro_batch_size"):
        _cfg(tmp_path, minibatch_size=8, micro_batch_size=3)
    with pytest.raises(ConfigError, match="total_episodes"):
        _cfg(tmp_path, total_episodes=12)
    with pytest.raises(ConfigError, match="does not exist"):
        _cfg(tmp_path, reward=str(tmp_path / "no_such_rm"))
    (tmp_path / "not_rm").mkdir()
    with pytest.raises(ConfigError, match="rlhf_reward.json"):
        _cfg(tmp_path, reward=[{"spec": "vader", "weight": 1.0}, {"spec": str(tmp_path / "not_rm")}])


def test_shipped_ppo_configs_say_what_to_change_under_two_processes(tmp_path):
    for path in sorted(CONFIGS.glob("ppo_*.yaml")):  # every shipped config runs under 2 processes as it is
        build_config(PPOConfig, str(path), {"runs_dir": str(tmp_path)}).validate(world_size=2)
    cfg = _cfg(tmp_path, total_episodes=32, batch_size=32, minibatch_size=16, micro_batch_size=16)
    with pytest.raises(
        ConfigError, match=r"micro_batch_size: 16 does not divide the 8 episodes.*divisor of 8"
    ):
        cfg.validate(world_size=2)


def test_cli_bad_config_exits_2_without_run_dir(tmp_path, capsys):
    from rlhf.cli import main

    prompts = ppo_helpers.write_prompts(tmp_path / "prompts.jsonl")
    rc = main(
        [
            "ppo",
            "--policy",
            "tiny",
            "--prompts",
            str(prompts),
            "--runs_dir",
            str(tmp_path / "runs"),
            "--batch_size",
            "16",
            "--minibatch_size",
            "16",
            "--micro_batch_size",
            "5",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "error[config]" in err and "micro_batch_size: 5 does not divide the 16 episodes" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("lora", [False, True])
def test_update_changes_policy_not_reference(tmp_path, lora):
    from rlhf.ppo import math as pm
    from rlhf.ppo.value import response_logprobs

    cfg = _cfg(tmp_path, lora=lora, value_model="shared" if lora else "critic")
    torch.manual_seed(0)
    policy, ref_model, pv, tok = build_models(cfg)
    q = torch.tensor([[5, 6, 7], [tok.pad_token_id, 8, 9]])
    qm = (q != tok.pad_token_id).long()
    r = torch.tensor([[10, 11, 12], [13, 14, tok.pad_token_id]])
    rm = torch.tensor([[1, 1, 1], [1, 1, 0]])

    def ref_lp():
        if ref_model is not None:
            return response_logprobs(ref_model, q, qm, r, rm, 0.7)
        with policy.disable_adapter():
            return response_logprobs(policy, q, qm, r, rm, 0.7)

    ref_before, pol_before = ref_lp(), response_logprobs(policy, q, qm, r, rm, 0.7)
    before = {k: v.detach().clone() for k, v in pv.named_parameters() if v.requires_grad}
    opt = torch.optim.Adam([p for p in pv.parameters() if p.requires_grad], lr=1e-2, eps=1e-5)
    logits, values = pv(q, qm, r, rm)
    assert torch.equal(values, torch.zeros_like(values))  # zero-initialised value head
    logp = pm.logprobs_from_logits(logits, r, 0.7)
    adv = torch.tensor([[1.0, -1.0, 0.5], [0.3, -0.2, 0.0]])
    loss, _ = pm.policy_loss(logp, logp.detach(), adv, rm.float())
    vloss, _ = pm.value_loss(values, values.detach(), adv, rm.float())
    (loss + 0.1 * vloss).backward()
    opt.step()
    changed = [k for k, v in pv.named_parameters() if v.requires_grad and not torch.equal(v, before[k])]
    assert changed and any("value_head" in k for k in changed) and any("policy" in k for k in changed)
    torch.testing.assert_close(ref_lp(), ref_before, rtol=0, atol=0)  # the reference did not move
    assert not torch.allclose(response_logprobs(policy, q, qm, r, rm, 0.7), pol_before)
    if lora:  # one copy of the weights: base frozen, only adapters + value head train
        assert all(("lora_" in k) or ("value_head" in k) for k in before)


def test_microbatch_accumulation_invariance_and_first_ratio(tmp_path):
    """micro-batch 1 × accumulation 8 gives the same update as 8 × 1; first-minibatch ratio is 1."""
    a = run_ppo(_cfg(tmp_path, micro_batch_size=8, experiment="mb8"))
    b = run_ppo(_cfg(tmp_path, micro_batch_size=1, experiment="mb1"))
    wa, wb = _weights(a["policy_dir"]), _weights(b["policy_dir"])
    init = _weights_of_tiny()
    moved = max(float((wa[k] - init[k]).abs().max()) for k in wa)
    assert moved > 1e-4  # the update really changed the weights
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-6, rtol=1e-4)
    ma, mb = _metrics(a["run_dir"])[-1], _metrics(b["run_dir"])[-1]
    assert ma["loss/policy_avg"] == pytest.approx(mb["loss/policy_avg"], abs=1e-6)
    for m in (ma, mb):
        assert m["val/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-4)
    # every metric name of docs/ppo.md is logged
    for name in (
        "objective/scores",
        "objective/kl",
        "objective/kl_coef",
        "objective/entropy",
        "objective/non_score_reward",
        "objective/rlhf_reward",
        "policy/approxkl_avg",
        "policy/clipfrac_avg",
        "policy/entropy_avg",
        "loss/policy_avg",
        "loss/value_avg",
        "val/clipfrac_avg",
        "val/ratio",
        "val/ratio_var",
        "val/explained_variance",
        "val/num_eos_tokens",
        "response/length_mean",
        "response/eos_rate",
        "time/generate_s",
        "time/score_s",
        "time/train_s",
        "perf/episodes_per_s",
        "perf/tokens_per_s",
    ):
        assert name in ma, name


def _weights_of_tiny() -> dict[str, torch.Tensor]:
    from rlhf.models import resolve_model_path

    return _weights(resolve_model_path("tiny"))


def test_resume_after_ctrl_c_gives_the_same_next_update(tmp_path, monkeypatch):
    spec = "tests.rlhf.ppo_helpers:interrupting_reward"
    over = dict(
        reward=spec,
        total_episodes=24,
        batch_size=8,
        minibatch_size=4,
        micro_batch_size=4,
        ppo_epochs=1,
        value_model="shared",
        adaptive_kl=True,
        kl_target=0.5,
        kl_horizon=100.0,
    )
    full = run_ppo(_cfg(tmp_path, experiment="full", **over))
    assert not full["interrupted"]

    ppo_helpers.reset_calls()
    monkeypatch.setenv("RLHF_TEST_SIGINT_AT", "2")  # Ctrl-C arrives while update 2 is being scored
    cut = run_ppo(_cfg(tmp_path, experiment="cut", **over))
    assert cut["interrupted"] and cut["checkpoint"].endswith("update_000002")
    assert "policy_dir" not in cut
    monkeypatch.delenv("RLHF_TEST_SIGINT_AT")
    resumed = run_ppo(_cfg(tmp_path, experiment="cut", resume="auto", **over))
    assert not resumed["interrupted"]

    m_full = {m["step"]: m for m in _metrics(full["run_dir"])}
    m_res = {m["step"]: m for m in _metrics(resumed["run_dir"])}
    assert set(m_res) == {1, 2, 3}  # the resumed run keeps the metrics of updates 1-2 and adds 3
    assert m_res[2]["objective/scores"] == pytest.approx(m_full[2]["objective/scores"], abs=1e-7)
    for key in (
        "objective/scores",
        "objective/kl",
        "objective/kl_coef",
        "loss/policy_avg",
        "loss/value_avg",
        "policy/approxkl_avg",
        "lr",
    ):
        assert m_res[3][key] == pytest.approx(m_full[3][key], rel=1e-5, abs=1e-6), key
    wf, wr = _weights(full["policy_dir"]), _weights(resumed["policy_dir"])
    for k in wf:
        torch.testing.assert_close(wf[k], wr[k], atol=1e-6, rtol=1e-5)


def test_non_finite_reward_stops_with_clear_error(tmp_path):
    from rlhf.errors import UserError

    with pytest.raises(UserError, match="non-finite"):
        run_ppo(_cfg(tmp_path, reward="tests.rlhf.ppo_helpers:nan_reward", save_every=1))
    assert not (tmp_path / "runs" / "default" / "ppo" / "policy").exists()


def test_merged_lora_sampling_restores_the_reference_exactly(tmp_path):
    from rlhf.ppo.value import merged_lora, response_logprobs

    cfg = _cfg(tmp_path, lora=True, value_model="shared")
    torch.manual_seed(0)
    policy, _, pv, tok = build_models(cfg)
    with torch.no_grad():  # a non-zero adapter, as after some updates
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    base = {k: v.clone() for k, v in policy.named_parameters() if "lora_" not in k}
    q = torch.tensor([[5, 6, 7]])
    qm = torch.ones_like(q)
    r, rm = torch.tensor([[10, 11, 12]]), torch.ones(1, 3, dtype=torch.long)
    unmerged = response_logprobs(policy, q, qm, r, rm, 0.7)
    with merged_lora(policy):
        merged = response_logprobs(policy, q, qm, r, rm, 0.7)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)  # same policy, folded weights
    after = dict(policy.named_parameters())
    assert all(torch.equal(after[k], v) for k, v in base.items())  # bit-identical base = reference
    assert not torch.allclose(response_logprobs(policy, q, qm, r, rm, 0.7), _disabled(policy, q, qm, r, rm))


@pytest.mark.parametrize("lora", [False, True])
def test_frozen_weights_kept_in_bf16_change_nothing_under_autocast(tmp_path, lora):
    """Under bf16 autocast PPO keeps the frozen linear weights (the LoRA base, a frozen reference)
    in bf16 instead of letting autocast cast them at every op: the rollout (adapter merged), the
    logits, values and gradients are the same bit for bit, the tied or trainable layers stay fp32,
    and restore() hands back the very fp32 tensors."""
    from rlhf.models import FrozenLinearsInBF16
    from rlhf.ppo.rollout import sample_rollout
    from rlhf.ppo.value import merged_lora

    cfg = _cfg(tmp_path, lora=lora, value_model="shared")
    torch.manual_seed(0)
    policy, reference, pv, tok = build_models(cfg)
    with torch.no_grad():  # a trained-looking adapter and head
        pv.value_head.weight.normal_(0, 0.3)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    q, qm = torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.long)
    r, rm = torch.tensor([[10, 11, 12]]), torch.ones(1, 3, dtype=torch.long)

    def forward_and_grads():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with merged_lora(policy, frozen):  # the rollout: adapter merged into the fp32 weight
                ro = sample_rollout(
                    policy,
                    q,
                    qm,
                    max_new_tokens=5,
                    temperature=0.7,
                    stop_token_id=-1,
                    pad_token_id=tok.pad_token_id,
                    generator=torch.Generator().manual_seed(1),
                )
            logits, values = pv(q, qm, r, rm)
            ref_logits = reference(q).logits if reference is not None else None
        (logits.float().logsumexp(-1).mean() + values.float().mean()).backward()
        grads = {n: p.grad.clone() for n, p in pv.named_parameters() if p.grad is not None}
        pv.zero_grad(set_to_none=True)
        return logits, values, ref_logits, ro.tokens, ro.logprobs, grads

    def named():
        ref = [(f"reference.{n}", p) for n, p in reference.named_parameters()] if reference else []
        return [*pv.named_parameters(), *ref]

    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in named()}
    frozen = FrozenLinearsInBF16(pv, reference)
    expected = forward_and_grads()
    with frozen:
        cast = {n for n, p in named() if p.dtype == torch.bfloat16}
        got = forward_and_grads()
    assert cast and all(".lora_" not in n and "value_head" not in n and "embed" not in n for n in cast)
    if lora:  # the base layer under every adapter; the adapters and the head stay fp32
        from peft.tuners.tuners_utils import BaseTunerLayer

        adapted = {id(m.get_base_layer()) for m in policy.modules() if isinstance(m, BaseTunerLayer)}
        assert adapted and adapted <= {id(m) for m in frozen.layers}
    else:  # the policy trains whole: only the frozen reference is cast
        assert {id(m) for m in frozen.layers} <= {id(m) for m in reference.modules()}
    for e, g in zip(expected[:5], got[:5]):
        assert e is None or torch.equal(e, g)
    assert expected[5].keys() == got[5].keys() and expected[5]
    assert all(torch.equal(expected[5][n], got[5][n]) for n in expected[5])
    # the very fp32 tensors back (same storage), unchanged
    assert all(p.data_ptr() == before[n][0] and torch.equal(p, before[n][1]) for n, p in named())


def _disabled(policy, q, qm, r, rm):
    from rlhf.ppo.value import response_logprobs

    with policy.disable_adapter():
        return response_logprobs(policy, q, qm, r, rm, 0.7)


@pytest.mark.parametrize("lora", [False, True])
def test_shared_values_from_the_sampler_equal_a_full_forward(tmp_path, lora):
    """The rollout's values (shared head) come from the sampling forwards; a separate pass over
    query + response, as PolicyAndValue computes them in training, gives the same numbers."""
    from rlhf.ppo.rollout import encode_queries, left_pad, sample_rollout
    from rlhf.ppo.value import merged_lora

    cfg = _cfg(tmp_path, lora=lora, value_model="shared")
    torch.manual_seed(0)
    policy, _, pv, tok = build_models(cfg)
    with torch.no_grad():  # a trained-looking head and adapter, not the zero initialisation
        pv.value_head.weight.normal_(0, 0.3)
        pv.value_head.bias.fill_(0.1)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    q, qm = left_pad(encode_queries(tok, ["hi", "a much longer prompt here", "mid"], 64), tok.pad_token_id)
    with merged_lora(policy):
        ro = sample_rollout(
            policy,
            q,
            qm,
            max_new_tokens=12,
            temperature=0.7,
            stop_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            generator=torch.Generator().manual_seed(3),
            value_head=pv.value_head,
        )
        with torch.no_grad():
            _, full = pv(q, qm, ro.tokens, ro.mask, need_logits=False)
    assert ro.values is not None and ro.values.shape == ro.tokens.shape
    assert ro.values.abs().sum() > 0
    torch.testing.assert_close(ro.values, full * ro.mask, atol=1e-4, rtol=1e-4)
    assert torch.all(ro.values[ro.mask == 0] == 0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prefix_forward_equals_the_plain_forward_and_its_gradients(tmp_path, attention):
    """forward_query_response runs the common prompt prefix once; logits, hidden states and the
    gradients of a loss on them equal one plain forward over the concatenated sequences, through
    SDPA and through the eager attention PPO may train with (left padding and the repeated prefix
    cache included)."""
    from rlhf.ppo.rollout import encode_queries, left_pad
    from rlhf.ppo.value import concat_query_response, forward_query_response
    from rlhf.sampling import split_common_prefix

    cfg = _cfg(tmp_path)
    torch.manual_seed(0)
    policy, _, _, tok = build_models(cfg)
    policy.set_attn_implementation(attention)
    q, qm = left_pad(encode_queries(tok, ["hi", "a much longer prompt here", "mid"], 64), tok.pad_token_id)
    assert split_common_prefix(q, qm) is not None
    r = torch.tensor([[10, 11, 12, 13], [14, 15, 2, 0], [16, 2, 0, 0]])
    rm = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    T = r.shape[1]

    def loss_and_grads(fn):
        policy.zero_grad(set_to_none=True)
        out = fn()
        logits, hidden = out.logits[:, -(T + 1) :], out.hidden_states[-1][:, -(T + 1) :]
        loss = (logits.log_softmax(-1)[..., :7].sum(-1) * torch.cat([rm, rm[:, :1]], 1)).sum() + hidden.sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        return logits.detach(), hidden.detach(), grads

    def plain():
        ids, attn, pos = concat_query_response(q, qm, r, rm)
        return policy(input_ids=ids, attention_mask=attn, position_ids=pos, output_hidden_states=True)

    def shared():
        return forward_query_response(policy, q, qm, r, rm, output_hidden_states=True, logits_to_keep=T + 1)

    l1, h1, g1 = loss_and_grads(plain)
    l2, h2, g2 = loss_and_grads(shared)
    torch.testing.assert_close(l2, l1, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h2, h1, atol=1e-4, rtol=1e-4)
    assert g1.keys() == g2.keys() and len(g1) > 10
    for n in g1:
        torch.testing.assert_close(g2[n], g1[n], atol=1e-4, rtol=1e-3)


def test_mixed_precision_is_checked_before_any_model_loads(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="mixed_precision"):
        _cfg(tmp_path, mixed_precision="fp8").validate()
    import rlhf.models

    monkeypatch.setattr(rlhf.models, "bf16_hardware", lambda device: False)
    with pytest.raises(ConfigError, match="bf16 needs bf16 hardware"):
        run_ppo(_cfg(tmp_path, mixed_precision="bf16", experiment="nobf16"))
    assert not (tmp_path / "runs" / "nobf16").exists()


def _attention_timed_faster(implementation: str):
    """A stand-in for rlhf.models.attention_if_faster whose timing always finds ``implementation``
    faster: the tiny model's step is too short for the real one to choose eager attention."""

    def choose(models, device, step):
        for model in models:
            model.set_attn_implementation(implementation)
        return implementation, {"sdpa_s": 1.0, "eager_s": 1.0 if implementation == "sdpa" else 0.5}

    return choose


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("lora", [False, True])
def test_bf16_autocast_updates_with_first_ratio_one(tmp_path, monkeypatch, lora, attention):
    """bf16 autocast: old log-probs come from the training forward (ratio exactly 1 on the first
    minibatch), fp32 weights move, and the first update's KL is 0 (policy = reference), also when
    the run computes through eager attention (the reference then does too)."""
    from rlhf.models import bf16_hardware
    from rlhf.ppo import setup

    if not bf16_hardware("cpu"):
        pytest.skip("this CPU has no bf16 (AVX512-BF16/AMX)")
    monkeypatch.setattr(setup, "attention_if_faster", _attention_timed_faster(attention))
    out = run_ppo(
        _cfg(
            tmp_path,
            mixed_precision="bf16",
            lora=lora,
            value_model="shared",
            experiment=f"bf16{lora}{attention}",
            batch_size=8,
            minibatch_size=4,
            micro_batch_size=2,
            num_eval_prompts=3,
        )
    )
    ms = _metrics(out["run_dir"])
    m = [r for r in ms if "val/ratio_first_minibatch" in r][-1]
    assert m["val/ratio_first_minibatch"] == pytest.approx(1.0, abs=1e-6)
    assert m["objective/kl"] == pytest.approx(0.0, abs=1e-6)
    # held-out KL before any update: the policy is the reference, so exactly 0 in bf16 too
    assert [r for r in ms if "eval/kl" in r][0]["eval/kl"] == pytest.approx(0.0, abs=1e-6)
    summary = json.loads(Path(out["run_dir"], "summary.json").read_text())
    assert summary["perf/eager_attention"] == int(attention == "eager")
    w = _weights(out["policy_dir"])
    assert all(t.dtype == torch.float32 for t in w.values())
    if not lora:
        init = _weights_of_tiny()
        assert max(float((w[k] - init[k]).abs().max()) for k in w) > 1e-4


def test_auto_precision_times_a_step_and_leaves_the_run_as_it_was(tmp_path):
    """mixed_precision auto times one training micro-step before the first update (on a CPU with
    bf16). The tiny model's step is too short for precision to matter, so the run is fp32, and it
    equals a run with mixed_precision no to the last digit: the timing drew no random numbers and
    left no gradients behind."""
    from rlhf.models import bf16_hardware

    auto = run_ppo(_cfg(tmp_path, mixed_precision="auto", experiment="auto"))
    fp32 = run_ppo(_cfg(tmp_path, mixed_precision="no", experiment="fp32"))
    for a, b in zip(_weights(auto["policy_dir"]).items(), _weights(fp32["policy_dir"]).items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1])
    assert [m.get("objective/scores") for m in _metrics(auto["run_dir"])] == [
        m.get("objective/scores") for m in _metrics(fp32["run_dir"])
    ]
    summary = json.loads(Path(auto["run_dir"], "summary.json").read_text())
    assert summary["perf/bf16_autocast"] == 0
    assert ("perf/autocast_probe_fp32_s" in summary) == bf16_hardware("cpu")
