"""Building a reward model to train: a new scalar head on a causal-LM backbone, its lower layers
frozen, truncated or LoRA-adapted.

The reward model itself, its directory format and its scoring live in the core,
:mod:`rlhf.reward_model`, because PPO, evaluation and the baselines read reward models too; this
package trains them. The names below that moved there stay importable from here for user code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rlhf.errors import UserError
from rlhf.models import load_tokenizer, resolve_model_path
from rlhf.reward_model import (  # noqa: F401  (kept importable from here for user code)
    ENSEMBLE_FILE,
    META_FILE,
    POOLING,
    TRAINABLE,
    Encoded,
    RewardModel,
    _load_seq_model,
    encode_conversations,
    is_ensemble_dir,
    last_token_index,
    load_reward_model,
    pad_hidden,
    pad_right,
    prompt_as_text,
    read_ensemble,
    read_meta,
    response_mask,
    save_ensemble,
    save_reward_model,
    score_ids,
    score_like_the_lab,
    score_texts,
)


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


def build_reward_model(
    base: str,
    trainable: str = "top",
    top_layers: int = 2,
    lora: LoraSettings | None = None,
    tie_param: float | None = None,
    learn_tie_param: bool = True,
    seed: int = 0,
    pooling: str = "last",
    layers: int = 0,
    read_layers: tuple[int, ...] | list[int] = (),
):
    """``(RewardModel, tokenizer)`` on the causal LM ``base`` (alias, dir or Hub id) with a new head.

    The head is initialised with std ``1/sqrt(hidden+1)`` (OpenAI lm-human-preferences'
    reward head), so initial rewards are O(1) whatever the backbone's ``initializer_range``.
    ``layers > 0`` keeps only the backbone's first ``layers`` decoder layers (the rest are
    dropped, also from the saved model): middle layers carry more of a response's content than the
    last ones, which specialise in predicting the next token, and a shallower model scores faster.
    ``read_layers``: the head reads these layers' response means (:class:`RewardModel`); with
    ``layers`` 0 the backbone keeps just the layers up to the deepest one read.
    """

    if trainable not in TRAINABLE:
        raise UserError(f"trainable={trainable!r}; choose one of {', '.join(TRAINABLE)}", code="config")
    path = resolve_model_path(base)
    tokenizer = load_tokenizer(path, padding_side="right")
    seq_model = _load_seq_model(path, tokenizer)
    if read_layers and not layers:
        layers = max(1, *read_layers)  # nothing above the deepest layer read is ever run
    if layers:
        truncate_layers(seq_model, layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        hidden = seq_model.score.weight.shape[1]
        nn.init.normal_(seq_model.score.weight, std=1.0 / math.sqrt(hidden + 1))
        if getattr(seq_model.score, "bias", None) is not None:
            nn.init.zeros_(seq_model.score.bias)
    if trainable == "lora":
        from peft import LoraConfig, get_peft_model

        lora = lora or LoraSettings()
        present = {n.rsplit(".", 1)[-1] for n, _ in seq_model.named_modules()}
        targets = [t for t in lora.targets if t in present]
        if not targets:
            raise UserError(f"LoRA targets {list(lora.targets)} match no module of {base!r}", code="config")
        seq_model = get_peft_model(
            seq_model,
            LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets),
        )
    model = RewardModel(seq_model, trainable, top_layers, tie_param, learn_tie_param, pooling, read_layers)
    return model, tokenizer


def truncate_layers(seq_model: nn.Module, n: int) -> None:
    """Keep the first ``n`` decoder layers of a sequence-classification model, config included."""
    backbone = getattr(seq_model, seq_model.base_model_prefix)
    total = len(backbone.layers)
    if not 1 <= n <= total:
        raise UserError(
            f"layers={n} but the model has {total} layers (choose 1..{total}, 0 = all)", code="config"
        )
    backbone.layers = nn.ModuleList(list(backbone.layers)[:n])
    seq_model.config.num_hidden_layers = n
    if isinstance(getattr(seq_model.config, "layer_types", None), list):
        seq_model.config.layer_types = seq_model.config.layer_types[:n]
