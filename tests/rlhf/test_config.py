"""Typed configs: YAML + overrides, unknown keys and wrong types rejected with one clear line."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest

from rlhf.config import (
    ConfigError,
    add_config_arguments,
    build_config,
    config_from_args,
    config_hash,
    exact_div,
    option,
    parse_overrides,
    save_config,
)


@dataclass
class Inner:
    lr: float = option(1e-5, help="learning rate")
    kind: str = option("k1", help="estimator", choices=("k1", "k3"))


@dataclass
class Outer:
    name: str = option("x", help="a name")
    steps: int = option(3, help="steps")
    flag: bool = option(False, help="a flag")
    tags: list[str] = option(default_factory=list, help="tags")
    maybe: int | None = option(None, help="optional")
    inner: Inner = field(default_factory=Inner)


def test_defaults_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 5\ninner:\n  lr: 0.001\n")
    cfg = build_config(Outer, f, ["inner.kind=k3", "--flag", "true", "--tags=[a, b]", "maybe=4"])
    assert (cfg.steps, cfg.inner.lr, cfg.inner.kind, cfg.flag, cfg.tags, cfg.maybe) == (
        5,
        0.001,
        "k3",
        True,
        ["a", "b"],
        4,
    )
    assert cfg.name == "x"


def test_int_widens_to_float_but_not_the_reverse():
    assert build_config(Outer, None, {"inner.lr": 1}).inner.lr == 1.0
    with pytest.raises(ConfigError, match="steps: expected an integer, got 1.5"):
        build_config(Outer, None, {"steps": 1.5})


def test_exponent_without_a_dot_is_a_number():
    """YAML 1.1 reads ``6e-4`` as a string; from the command line or a file it is a float here."""
    assert build_config(Outer, None, ["inner.lr=6e-4"]).inner.lr == pytest.approx(6e-4)
    assert build_config(Outer, None, {"inner.lr": " -2E3 "}).inner.lr == -2000.0
    for bad in ("six", "1e", "nan", "0x10"):
        with pytest.raises(ConfigError, match="inner.lr: expected a number"):
            build_config(Outer, None, {"inner.lr": bad})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"stepz": 1}, "stepz: unknown config key"),
        ({"inner.lrr": 1}, "inner.lrr: unknown config key"),
        ({"flag": "yes please"}, "flag: expected true or false"),
        ({"inner.kind": "k2"}, "inner.kind: 'k2' is not valid; choose one of k1, k3"),
        ({"tags": "a"}, "tags: expected list of str"),
        ({"inner": 3}, "inner: expected a mapping"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        build_config(Outer, None, overrides)


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(Outer, f)
    with pytest.raises(ConfigError, match="config file not found"):
        build_config(Outer, tmp_path / "nope.yaml")
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        build_config(Outer, f)


def test_argparse_glue_and_help():
    p = argparse.ArgumentParser()
    add_config_arguments(p, Outer)
    args, extra = p.parse_known_args(["--inner.lr", "0.5", "steps=7"])
    args.overrides = extra  # what the `rlhf` entry point does with what argparse does not know
    cfg = config_from_args(args, Outer)
    assert cfg.inner.lr == 0.5 and cfg.steps == 7
    text = p.format_help()
    assert "--inner.kind" in text and "choices: k1, k3" in text and "[default: 1e-05]" in text


def test_parse_overrides_forms():
    assert parse_overrides(["a=1", "--b", "x", "--c=null"]) == {"a": 1, "b": "x", "c": None}
    with pytest.raises(ConfigError, match="needs a value"):
        parse_overrides(["--a"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["loose"])


def test_exact_div():
    assert exact_div(64, 8, "batch") == 8
    with pytest.raises(ConfigError, match="batch: 10 is not divisible by 4"):
        exact_div(10, 4, "batch")


def test_hash_and_save_round_trip(tmp_path):
    a = build_config(Outer, None, {"steps": 4})
    b = build_config(Outer, None, {"steps": 4})
    assert config_hash(a) == config_hash(b) != config_hash(build_config(Outer, None, {"steps": 5}))
    path = save_config(a, tmp_path / "r" / "config.yaml")
    assert build_config(Outer, path) == a


def test_the_lora_block_is_shared_and_an_old_key_still_works(tmp_path):
    from reward_models.train_config import RMTrainConfig
    from rlhf.adapters import AdapterFields, LoraFields
    from rlhf.ppo.config import PPOConfig

    for cls in (RMTrainConfig, PPOConfig, AdapterFields):
        assert issubclass(cls, LoraFields)
    rm = RMTrainConfig()
    assert (rm.lora_r, rm.lora_alpha, rm.lora_target_modules) == (
        8,
        16,
        ["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    old = tmp_path / "old.yaml"
    old.write_text("rankings: r.jsonl\nlora_targets: [q_proj, v_proj]\n")
    assert build_config(RMTrainConfig, old).lora_target_modules == ["q_proj", "v_proj"]
    with pytest.raises(
        ConfigError, match="lora_targets: renamed to lora_target_modules, which is also given"
    ):
        build_config(RMTrainConfig, old, ["--lora_target_modules", "[k_proj]"])
