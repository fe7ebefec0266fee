"""The reward model's passes over prompt groups during training: the loss of a micro-batch, the
validation / held-out figures, the cache of the frozen lower layers, and the scores that
normalisation reads. :mod:`reward_models.train` runs them; the optimisation loop itself is there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from reward_models import losses as L
from reward_models.groups import Batch, Group, make_batch, ranking_grid
from reward_models.train_config import RMTrainConfig
from rlhf.cli import progress_bar
from rlhf.generation import generate_candidates
from rlhf.models import load_policy
from rlhf.reward_model import batch_with_prefix, pad_hidden, pad_right, score_texts


def flat_rewards(model, batch: Batch) -> torch.Tensor:
    """Rewards ``[N]`` of the batch's sequences, from whichever input it carries (token ids, cached
    frozen-layer states or cached head features)."""
    return model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        hidden=batch.hidden,
        pool_mask=batch.pool_mask,
        features=batch.features,
    )


def batch_rewards(model, batch: Batch) -> torch.Tensor:
    """Rewards of every ranking's candidates ``[R, Kmax]`` (padding slots hold 0)."""
    return ranking_grid(flat_rewards(model, batch), batch)


def batch_loss(cfg: RMTrainConfig, model, raw_tie, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The training loss of ``batch`` (``cfg.loss`` plus reward centring), the rewards ``[R, Kmax]``
    and how many rankings carried evidence for the loss. ``raw_tie``: the model's raw tie
    parameter (None for losses without one). Rankings weigh ``batch.weights`` when the batch has
    them (``annotator_weights: reliability``)."""
    rewards = batch_rewards(model, batch)
    loss, used = L.ranking_loss(
        cfg.loss,
        rewards,
        batch.tiers,
        margin=cfg.margin,
        tie_param=L.tie_log_param(cfg.loss, raw_tie),
        weights=batch.weights,
    )
    loss = loss + L.reward_centering(rewards, batch.tiers, cfg.center_coef)
    return loss, rewards, used


def pair_stats(rewards: torch.Tensor, tiers: torch.Tensor) -> tuple[float, int]:
    """(correct strict pairs, strict pairs): reward ties count ½. ``rewards``/``tiers`` ``[R, K]``."""
    beats, _ = L.pair_masks(tiers)
    d = rewards[:, :, None] - rewards[:, None, :]
    correct = ((d > 0).float() + 0.5 * (d == 0).float())[beats].sum()
    return float(correct), int(beats.sum())


@dataclass
class FrozenStates:
    """Hidden states after a backbone's first ``layers`` frozen layers, by sequence (its token ids
    as a tuple). ``layers`` is None until :func:`build_cache` first fills it."""

    layers: int | None = None
    by_ids: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    def starts(self, layers: int) -> bool:
        """Whether a model of ``layers`` frozen layers can start from these states: they passed
        fewer of the same layers."""
        return self.layers is not None and self.layers < layers


@torch.no_grad()
def build_cache(
    model,
    groups: list[Group],
    pad_id: int,
    batch_size: int,
    progress: bool,
    store: FrozenStates | None = None,
    below: FrozenStates | None = None,
) -> dict:
    """Lower-layer hidden states ``[T_i, H]`` of every sequence, keyed by group (computed once).

    ``store`` holds states of ``model``'s frozen layers computed before: those sequences are not
    computed again, and the ones computed are added to it. An answer sampled twice for a prompt is
    computed once, and an ensemble's members of one depth share their states through it.
    ``below``: states of fewer frozen layers of the same backbone (a shallower ensemble member);
    the sequences found there only run the layers above them.

    A model whose head reads several layers' means with nothing below it training
    (``model.caches_features``) caches each sequence's whole input to the head ``[F]`` instead."""
    store = FrozenStates() if store is None else store
    if store.layers not in (None, model.frozen_layers):
        raise ValueError(
            f"states of {store.layers} frozen layers given to a model with {model.frozen_layers}"
        )
    store.layers = model.frozen_layers
    start = below.by_ids if below is not None and below.starts(store.layers) else {}
    todo = list(dict.fromkeys(tuple(ids) for g in groups for ids in g.ids if tuple(ids) not in store.by_ids))
    todo.sort(key=len)  # stable: without repeats, the same batches as one sequence per slot
    response_start = {tuple(ids): first for g in groups for ids, first in zip(g.ids, g.starts)}
    bar = progress_bar(len(todo), "rm: caching frozen layers", "seq", enabled=progress)
    for s in range(0, len(todo), batch_size):
        chunk = todo[s : s + batch_size]
        if model.caches_features:
            # laid out as the scoring passes lay theirs (the shared system prompt run once), so the
            # features the head trains on are computed as the ones it will score
            starts = [response_start[seq] for seq in chunk]
            states = model.batch_features(
                batch_with_prefix([list(seq) for seq in chunk], starts, pad_id, "mean")
            )
        else:
            ids, mask = pad_right([list(seq) for seq in chunk], pad_id)
            if start and all(seq in start for seq in chunk):
                h = model.lower_hidden(ids, mask, pad_hidden([start[seq] for seq in chunk])[0], below.layers)
            else:
                h = model.lower_hidden(ids, mask)
            states = [h[j, : len(seq)] for j, seq in enumerate(chunk)]
        store.by_ids.update((seq, state.clone()) for seq, state in zip(chunk, states))
        bar.update(len(chunk))
    bar.close()
    return {id(g): [store.by_ids[tuple(ids)] for ids in g.ids] for g in groups}


def evaluate_groups(
    cfg: RMTrainConfig, model, raw_tie, groups: list[Group], pad_id: int, cache: dict | None, accelerator=None
) -> dict[str, float]:
    """Held-out loss (mean over groups) and strict-pair accuracy, summed across processes.

    Groups that carry ranking weights (the validation prompts under ``annotator_weights:
    reliability``) give each batch's weighted loss, so the step kept is the one that best fits the
    reliable annotators; the held-out prompts carry none and are scored unweighted. The accuracy
    counts every ranking's pairs.

    The forwards go through the unwrapped model: each DDP forward is a collective (it broadcasts
    the module's buffers), and processes whose shards hold different numbers of groups would wait
    on each other forever. Only the sums are reduced."""
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    was = model.training
    model.eval()
    tot = torch.zeros(4, dtype=torch.float64)  # loss·groups, groups, correct, pairs
    with torch.no_grad():
        for s in range(0, len(groups), cfg.batch_size):
            batch = make_batch(groups[s : s + cfg.batch_size], pad_id, cache)
            loss, rewards, used = batch_loss(cfg, model, raw_tie, batch)
            c, n = pair_stats(rewards, batch.tiers)
            tot += torch.tensor([float(loss) * used, used, c, n], dtype=torch.float64)
    model.train(was)
    if accelerator is not None and accelerator.num_processes > 1:
        tot = accelerator.reduce(tot, reduction="sum")
    return {
        "eval/loss": float(tot[0] / max(tot[1], 1)),
        "eval/pair_accuracy": float(tot[2] / tot[3]) if tot[3] > 0 else float("nan"),
    }


def reference_scores(
    cfg: RMTrainConfig, model, tokenizer, groups: list[Group], cache: dict | None, progress: bool
) -> tuple[torch.Tensor, str]:
    """Raw rewards of reference-policy samples: fresh samples from ``norm_policy``, or the training
    candidates (they were sampled from the policy the rankings were collected on)."""
    if cfg.norm_policy:
        policy, ptok = load_policy(cfg.norm_policy)
        prompts = [{"prompt_id": g.prompt_id, "prompt": g.prompt} for g in groups[: cfg.norm_prompts]]
        cands = generate_candidates(
            policy,
            ptok,
            prompts,
            k=1,
            max_new_tokens=cfg.norm_max_new_tokens,
            seed=cfg.seed,
            model_name=cfg.norm_policy,
            progress=progress,
        )
        texts = [(c["prompt"], x["text"], x["gen"]["finished"]) for c in cands for x in c["candidates"]]
        scores, _ = score_texts(
            model,
            tokenizer,
            [p for p, _, _ in texts],
            [t for _, t, _ in texts],
            cfg.max_length,
            cfg.score_batch_size,
            finished=[f for _, _, f in texts],
        )
        return scores, f"samples of {cfg.norm_policy} on {len(prompts)} training prompts"
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(groups), cfg.batch_size):
            chunk = groups[s : s + cfg.batch_size]
            out.append(flat_rewards(model, make_batch(chunk, tokenizer.pad_token_id, cache)))
    return torch.cat(out).float(), f"the {sum(g.k for g in groups)} training candidates"
