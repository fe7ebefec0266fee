"""The settings of ``rlhf rm train`` (:mod:`reward_models.train`): every field is a command-line flag
and a key of the experiment YAML files, with its help text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from reward_models import losses as L
from rlhf.adapters import LoraFields
from rlhf.config import ConfigError, option
from rlhf.models import MIXED_PRECISION, MIXED_PRECISION_HELP
from rlhf.rewards import parse_ensemble_rule
from rlhf.tracking import RunFields

ANNOTATOR_WEIGHTS = ("none", "reliability")
SOLVERS = ("adam", "lbfgs")


@dataclass
class RMTrainConfig(RunFields, LoraFields):
    # Earlier versions named the LoRA targets differently from the policy stages.
    RENAMED_KEYS: ClassVar[dict[str, str]] = {"lora_targets": "lora_target_modules"}

    rankings: str = option("", help="rankings file (JSONL of the rankings contract, or a dataset dir)")
    eval_rankings: str = option(
        "", help="held-out rankings file; empty = split eval_fraction of the prompts off"
    )
    skip_bad_rows: bool = option(
        False,
        help="leave out rankings that break the rankings contract (counted in data/bad_rows) instead "
        "of stopping with exit 2 and a list of every bad row with its line number",
    )
    eval_fraction: float = option(0.2, help="fraction of prompts held out when eval_rankings is empty")
    val_fraction: float = option(
        0.1,
        help="fraction of the training prompts set aside to choose when to stop and which step to keep "
        "(early stopping); the held-out prompts are scored once, at the end, so the figures "
        "reported on them were not used to pick the model (0 = no validation: train all steps)",
    )
    model: str = option(
        "tiny", help="backbone causal LM: tiny, smollm2-135m-instruct, a local dir or a Hub id"
    )
    loss: str = option(
        "grouped_bt",
        help="bt (pairs weigh equally), grouped_bt (InstructGPT), rao_kupper, "
        "davidson (ties), plackett_luce (listwise, ties as tiers)",
        choices=L.LOSSES,
    )
    margin: float = option(0.0, help="Bradley–Terry margin m in -log σ(r_w - r_l - m) (bt, grouped_bt)")
    theta: float | None = option(
        None,
        help="Rao–Kupper θ (> 1): initial value, or the fixed value when learn_tie_param=false "
        "(null: from the training rankings' tie rate t, θ = (1 + t) / (1 - t))",
    )
    nu: float | None = option(
        None,
        help="Davidson ν (> 0): initial value, or the fixed value when learn_tie_param=false "
        "(null: from the training rankings' tie rate t, ν = 2t / (1 - t))",
    )
    learn_tie_param: bool = option(True, help="learn θ / ν with the model (else keep them fixed)")
    tie_lr: float = option(
        0.02,
        help="AdamW learning rate of the learned θ / ν (one scalar: at the model's lr it would "
        "hardly move from its initial value within a run)",
    )
    center_coef: float = option(0.0, help="reward centring: adds coef · mean(r)² to the loss (0 = off)")
    trainable: str = option(
        "top",
        help="top: only the top_layers decoder layers + head train (lower layers "
        "frozen and cached); full: all weights; lora: LoRA adapters + head",
        choices=("top", "full", "lora"),
    )
    top_layers: int = option(2, help="trainable=top: how many top decoder layers train (0 = head only)")
    layers: int = option(
        0,
        help="keep only the backbone's first N decoder layers (0 = all); the middle layers of a "
        "small model carry more of a response's content than its last ones",
    )
    pooling: str = option(
        "mean",
        help="what the scalar head reads: mean = the mean over the response tokens (a per-token "
        "reward, averaged); last = the last token (InstructGPT)",
        choices=("mean", "last"),
    )
    read_layers: list[int] = option(
        default_factory=list,
        help="the head reads the concatenated response means of the raw states after these layers "
        "(e.g. [0, 2, 4, 6, 8]; 0 = the token embeddings) instead of the final states' mean: early "
        "layers carry the words, later ones more of their meaning. With trainable=top it needs "
        "top_layers 0 (everything below the head frozen, its input computed once); layers 0 then "
        "keeps just the layers up to the deepest one read (docs/reward-models.md)",
    )
    solver: str = option(
        "adam",
        help="adam: the training loop (AdamW, epochs, validation); lbfgs: the head solved exactly, "
        "the loss plus l2 over features standardised on the training candidates, minimised by "
        "L-BFGS in one full batch (needs read_layers and nothing else training: it is convex, so no "
        "initialisation, data order or validation slice is there to be lucky with)",
        choices=SOLVERS,
    )
    l2: float = option(
        10.0,
        help="solver lbfgs: the L2 penalty λ/k·‖w‖² on the head over the standardised features, k the "
        "number of layers read (so λ means the same per layer)",
    )
    l2_search: list[float] = option(
        default_factory=list,
        help="solver lbfgs: candidate values of l2, the one with the least loss in a cv_folds-fold "
        "cross-validation over the training prompts is used (e.g. [1, 3, 10, 30, 100]; empty = l2)",
    )
    length_control: bool = option(
        False,
        help="solver lbfgs: fit the response's token count as one more (unpenalised) column beside the "
        "head and drop it after, so the length preference the rankings show is not learned by the "
        "features that track length (reward_models/exact_head.py)",
    )
    length_discount: str = option(
        "none",
        help="solver lbfgs: attenuation = discount the length the features carry until the reward's length "
        "correlation over the training answers is ρ times its own, ρ its agreement with what the annotators "
        "follow, estimated from prompts ranked twice (reward_models/length_discount.py); none = off",
        choices=("none", "attenuation"),
    )
    cv_folds: int = option(5, help="solver lbfgs with l2_search: folds of training prompts (≥ 2)")
    cache_hidden: bool = option(
        True, help="trainable=top: compute the frozen layers once and reuse them every epoch"
    )
    # LoRA (trainable: lora): the shared block's fields, with a reward model's smaller defaults.
    lora_r: int = option(8, help="LoRA rank (trainable: lora)")
    lora_alpha: int = option(16, help="LoRA alpha, scale = alpha / r (trainable: lora)")
    max_length: int = option(
        256, help="tokens per (prompt, response); longer ones lose the start of the prompt"
    )
    batch_size: int = option(8, help="prompts (ranking groups) per micro-batch")
    grad_accum: int = option(1, help="micro-batches per optimizer step")
    lr: float = option(1e-4, help="AdamW learning rate")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    warmup_steps: int = option(0, help="linear learning-rate warm-up steps")
    epochs: float = option(3.0, help="passes over the training prompts")
    max_steps: int = option(0, help="stop after this many optimizer steps (0 = epochs decide)")
    max_time_s: float = option(0.0, help="stop after this many seconds of training (0 = no limit)")
    eval_every: int = option(
        20, help="evaluate on the validation prompts every N optimizer steps (0 = only at the end)"
    )
    patience: int = option(
        0, help="early stopping: stop after N evaluations without a better validation loss (0 = off)"
    )
    save_every: int = option(0, help="checkpoint every N optimizer steps (0 = off)")
    resume: bool = option(False, help="continue from the latest checkpoint in the run dir")
    normalize: bool = option(True, help="store offset/scale so reference-policy samples score mean 0, std 1")
    norm_policy: str = option(
        "",
        help="reference policy to sample fresh responses from for normalisation "
        "(empty = the candidates of the training rankings)",
    )
    norm_prompts: int = option(64, help="norm_policy: prompts to sample for normalisation")
    norm_max_new_tokens: int = option(48, help="norm_policy: tokens per sampled response")
    score_batch_size: int = option(16, help="sequences per forward pass when scoring without gradients")
    mixed_precision: str = option(
        "auto",
        help="forwards under bf16 autocast (weights, gradients and AdamW stay fp32). " + MIXED_PRECISION_HELP,
        choices=MIXED_PRECISION,
    )
    out: str = option("", help="reward-model dir to write (default: <run_dir>/model)")
    ensemble: int = option(
        1,
        help="train N reward models in this stage, on the same rankings and held-out prompts; they "
        "differ in seed (head and LoRA initialisation, data order) and, with ensemble_layers, in "
        "backbone depth. Members of one depth compute the frozen layers' states once, and a deeper "
        "member starts from a shallower one's. The model "
        "dir then holds member-0..N-1 and rlhf_ensemble.json, and works as a reward anywhere "
        "(docs/reward-models.md, Ensembles)",
    )
    ensemble_layers: list[int] = option(
        default_factory=list,
        help="`layers` of each member, cycled (e.g. [0, 16, 12]; 0 = all): members that differ in "
        "more than the seed disagree more usefully (Eisenstein et al. 2023)",
    )
    ensemble_reward: str = option(
        "mean",
        help="how the ensemble dir scores when named alone as a reward: mean, min or "
        "mean_minus_std[=k]; a reward spec ensemble:RULE:DIR overrides it",
    )
    annotator_weights: str = option(
        "none",
        help="none: every ranking weighs the same; reliability: fit each annotator's reliability to the "
        "training rankings (a Dawid–Skene model with ties, rlhf/reliability.py; the held-out rankings "
        "never enter) and weigh each ranking's loss by its annotator's weight max(0, a - r), so careless "
        "annotators count little and reversed ones not at all (docs/reward-models.md, Annotator reliability)",
        choices=ANNOTATOR_WEIGHTS,
    )
    min_reliability: float = option(
        0.0,
        help="leave out the training rankings of annotators whose fitted expected accuracy (the share "
        "of their pairwise labels that are right) is below this, and report how many (0 = keep all; "
        "with annotator_weights none the reliability is fitted for this alone)",
    )
    seed: int = option(0, help="random seed")

    def validate(self) -> None:
        if not self.rankings:
            raise ConfigError(
                "rm train: rankings is required (a rankings JSONL file, e.g. from `rlhf simulate`)"
            )
        if not 0 < self.eval_fraction < 1 and not self.eval_rankings:
            raise ConfigError(f"eval_fraction must be between 0 and 1, got {self.eval_fraction}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.loss == "rao_kupper" and self.theta is not None and self.theta <= 1:
            raise ConfigError(f"theta must be > 1 for rao_kupper (θ = 1 allows no ties), got {self.theta}")
        if self.loss == "davidson" and self.nu is not None and self.nu <= 0:
            raise ConfigError(f"nu must be > 0 for davidson, got {self.nu}")
        if self.tie_lr <= 0:
            raise ConfigError(f"tie_lr must be > 0, got {self.tie_lr}")
        for name in ("batch_size", "grad_accum", "max_length", "score_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.top_layers < 0:
            raise ConfigError(f"top_layers must be ≥ 0, got {self.top_layers}")
        if self.layers < 0:
            raise ConfigError(f"layers must be ≥ 0 (0 = all), got {self.layers}")
        if self.lr <= 0 or self.epochs <= 0:
            raise ConfigError("lr and epochs must be > 0")
        if self.ensemble < 1:
            raise ConfigError(f"ensemble: {self.ensemble} must be ≥ 1 (1 = one reward model)")
        if any(n < 0 for n in self.ensemble_layers):
            raise ConfigError(f"ensemble_layers: {self.ensemble_layers} must be ≥ 0 each (0 = all)")
        too_shallow = [n for n in self.ensemble_layers if 0 < n < self.top_layers and self.trainable == "top"]
        if too_shallow:
            raise ConfigError(
                f"ensemble_layers: a member of {too_shallow[0]} layers cannot train its top_layers={self.top_layers}"
            )
        parse_ensemble_rule(self.ensemble_reward, "ensemble_reward")
        self._validate_head()
        if not 0 <= self.min_reliability < 1:
            raise ConfigError(
                f"min_reliability must be in [0, 1) (an expected accuracy; 0 = keep every annotator), "
                f"got {self.min_reliability}"
            )

    def _validate_head(self) -> None:
        """``read_layers``, ``solver`` and ``l2`` against each other and the rest of the model."""
        read = self.read_layers
        if any(n < 0 for n in read) or len(set(read)) != len(read):
            raise ConfigError(f"read_layers: {read} must be different layers ≥ 0 (0 = the embeddings)")
        if read and self.pooling != "mean":
            raise ConfigError(f"read_layers: {read} reads response means; it needs pooling: mean")
        if read and self.layers and max(read) > self.layers:
            raise ConfigError(
                f"read_layers: {read} reads layer {max(read)} but layers: {self.layers} keeps fewer"
            )
        if read and self.trainable == "top" and self.top_layers:
            raise ConfigError(
                f"read_layers: {read} with trainable: top reads frozen layers; set top_layers: 0 "
                "(or train with trainable: lora / full)"
            )
        if read and self.ensemble_layers:
            raise ConfigError(
                "ensemble_layers: members read read_layers whatever their depth; set one of the two"
            )
        if self.l2 < 0 or any(lam < 0 for lam in self.l2_search):
            raise ConfigError(f"l2 and l2_search must be ≥ 0, got {self.l2} and {self.l2_search}")
        if self.cv_folds < 2:
            raise ConfigError(f"cv_folds must be ≥ 2, got {self.cv_folds}")
        if self.length_discount != "none" and (self.solver != "lbfgs" or self.length_control):
            raise ConfigError(
                f"length_discount: {self.length_discount} discounts the head the exact solver fits: it needs "
                "solver: lbfgs, and not length_control (which drops length from the head another way)"
            )
        if self.solver != "lbfgs":
            return
        if not read or self.trainable != "top" or self.top_layers or not self.cache_hidden:
            raise ConfigError(
                "solver: lbfgs solves the head alone over fixed features: it needs read_layers, "
                "trainable: top, top_layers: 0 and cache_hidden: true"
            )
        if self.ensemble > 1:
            raise ConfigError(
                f"ensemble: {self.ensemble} with solver: lbfgs would train {self.ensemble} identical models "
                "(the exact solution does not depend on the seed); use solver: adam for an ensemble"
            )
