"""``rlhf rm train``: a reward model from whole rankings with ties.

One batch element is one *prompt*: its K candidates are encoded once, and every ranking of that
prompt (one per annotator) is scored against the same K rewards with the chosen loss
(``reward_models.losses``). So each response is encoded once per prompt whatever the loss,
where a pairs-only trainer encodes it once per pair (K-1 times) per annotator.

The loop, top to bottom (:func:`run_rm_train`):

1. read the rankings, check every record, count and report what was wrong (one candidate,
   all tied, labels that do not match the candidates, empty responses, mixed K, too long);
2. split held-out prompts (by a hash of ``prompt_id``, so a prompt is never on both sides), and a
   validation slice of the training prompts that alone decides when to stop; with
   ``annotator_weights: reliability`` or ``min_reliability`` > 0, fit each annotator's reliability
   to the training and validation rankings (``rlhf.reliability``) and weigh each ranking's loss by
   its annotator's weight, or leave out the rankings of unreliable annotators;
3. format every (prompt, response) with the policy's chat template, tokenize, truncate from the
   prompt side;
4. with frozen lower layers, compute their hidden states once (the cache);
5. (``solver: lbfgs``: the head solved exactly instead, :mod:`reward_models.exact_head`, and steps
   5-6 are one solve) epochs of length-bucketed batches, gradient accumulation, AdamW with warm-up, under
   ``accelerate`` (``accelerate launch --config_file experiments/accelerate/cpu_2proc.yaml`` on
   CPU: each process owns a fixed shard of prompts, gradients are all-reduced);
6. evaluate on the validation prompts every ``eval_every`` steps; keep the best validation loss;
   stop early after ``patience`` evaluations without improvement; score the held-out prompts once
   at the end (never used to choose anything); checkpoint every ``save_every`` steps into
   ``checkpoints/step_NNNNNN/`` (:mod:`rlhf.checkpoint`; ``resume=true`` continues from the latest one);
7. normalise: score reference-policy samples, store offset/scale so they have mean 0, std 1;
8. write the reward-model dir (HF model + tokenizer + ``rlhf_reward.json``) and log it as the
   run's output artifact (the rankings file is the input artifact).

Metrics (``metrics.jsonl`` and W&B): ``train/loss`` (mean ranking loss of the step),
``train/lr``, ``train/tie_theta`` or ``train/tie_nu`` (learned tie parameter), ``train/rankings_per_s``;
``val/loss`` and ``val/pair_accuracy`` (validation prompts, during training), ``eval/loss`` and
``eval/pair_accuracy`` (held-out prompts, at the end: strict pairs ordered correctly, reward ties
count ½); ``data/*`` the input report; ``norm/offset``, ``norm/scale``; with annotator
reliability, ``annotators/*`` and the ``annotators`` table (also ``annotators.json`` in the run dir).

Steps 1-4 use :mod:`reward_models.groups` (records → prompt groups → batches), the loss and its tie
parameter come from :mod:`reward_models.losses`, the model's passes from :mod:`reward_models.scoring`,
the settings from :mod:`reward_models.train_config`; this module runs them in order.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

# The data, loss and scoring names below moved out of this module; they stay importable from here for
# user code (reward_models.dpo and reward_models.evaluate import them from here too).
from reward_models.exact_head import MAX_ITERATIONS, solve_head
from reward_models.groups import (  # noqa: F401  (re-exports)
    Batch,
    DataReport,
    Group,
    build_groups,
    candidates_finished,
    data_hash,
    encode_groups,
    length_batches,
    make_batch,
    ranking_grid,
    read_records,
    split_groups,
)
from reward_models.losses import (  # noqa: F401  (re-exports)
    initial_tie_raw,
    initial_tie_value,
    tie_log_param,
    tie_rate,
    tie_values,
)
from reward_models.scoring import (  # noqa: F401  (re-exports)
    FrozenStates,
    batch_loss,
    batch_rewards,
    evaluate_groups,
    pair_stats,
    reference_scores,
)
from reward_models.train_config import RMTrainConfig  # its home; kept importable from here for user code
from reward_models.train_setup import KEEP_CHECKPOINTS, RMData, Run, Trainee, read_data, set_up
from rlhf.checkpoint import load_state
from rlhf.cli import progress_bar
from rlhf.config import add_config_arguments, config_from_args, to_dict
from rlhf.datafiles import write_jsonl
from rlhf.distributed import require_data_parallel
from rlhf.models import use_bf16
from rlhf.nonfinite import gradient_norm, stop_if_non_finite
from rlhf.reward_model import reward_out_dir, save_ensemble, save_reward_model
from rlhf.tracking import Tracker, claim_run_dir, stage_run_dir, start_stage


def run_rm_train(cfg: RMTrainConfig) -> dict:
    """Train a reward model on rankings, or ``cfg.ensemble`` of them (see the module docstring);
    returns a summary dict."""
    cfg.validate()
    model_dir = reward_out_dir(cfg.out, stage_run_dir(cfg, "rm_train"))  # a bad `out` stops here
    if cfg.ensemble > 1:
        return _train_ensemble(cfg, model_dir)
    return train_one(cfg, split_seed=cfg.seed, stage="rm_train", model_dir=model_dir)


def _train_ensemble(cfg: RMTrainConfig, model_dir: Path) -> dict:
    """``cfg.ensemble`` members trained one after another, each a run of its own
    (``<run_dir>/member-<i>/``), then gathered into one ensemble dir. Every member holds out the
    same prompts (the split follows the stage's seed, not the member's), so their held-out figures
    compare, and none of them trained on another's held-out prompts. The ensemble goes to
    ``model_dir``, each member to its own run dir."""
    run_dir = claim_run_dir(cfg, "rm_train", resuming=cfg.resume)
    members = []
    depths = [
        cfg.ensemble_layers[i % len(cfg.ensemble_layers)] if cfg.ensemble_layers else cfg.layers
        for i in range(cfg.ensemble)
    ]
    # Members differ only in seed and depth, and a shallower member's frozen layers are the first
    # ones of a deeper member's. Those of one depth share the states the first of them computed,
    # kept until the last of them has trained; a deeper member starts from the deepest states
    # computed so far, kept while a later member goes deeper still. At most two depths are held.
    stores: dict[int, FrozenStates] = {}
    below, below_depth = None, -1.0
    for i, layers in enumerate(depths):
        member = dataclasses.replace(cfg, ensemble=1, seed=cfg.seed + i, layers=layers, out="")
        print(
            f"rm train: ensemble member {i + 1}/{cfg.ensemble} (seed {member.seed}, layers {layers or 'all'})",
            flush=True,
        )
        store = stores.setdefault(layers, FrozenStates())
        members.append(train_one(member, cfg.seed, f"rm_train/member-{i}", store, below))
        later = depths[i + 1 :]
        deepest_later = max((_depth(d) for d in later), default=-1.0)
        if below_depth < _depth(layers) < deepest_later:
            below, below_depth = store, _depth(layers)
        if below_depth >= deepest_later:
            below, below_depth = None, -1.0
        if layers not in later:
            del stores[layers]
    manifest = {
        "combine": cfg.ensemble_reward,
        "seeds": [cfg.seed + i for i in range(cfg.ensemble)],
        "metrics": [{k: v for k, v in m.items() if k.startswith("rm/final_")} for m in members],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": to_dict(cfg),
    }
    save_ensemble([m["model_dir"] for m in members], model_dir, manifest)
    accuracies = [m.get("rm/final_pair_accuracy", float("nan")) for m in members]
    print(
        f"rm train: ensemble of {cfg.ensemble} → {model_dir} (scores by {cfg.ensemble_reward} when named "
        f"alone as a reward); members' held-out pair accuracy " + ", ".join(f"{a:.3f}" for a in accuracies),
        flush=True,
    )
    return {
        "run_dir": str(run_dir),
        "model_dir": str(model_dir),
        "eval_rankings": members[0]["eval_rankings"],  # the same prompts for every member
        "rm/members": cfg.ensemble,
        **{f"rm/member_{i}_pair_accuracy": a for i, a in enumerate(accuracies)},
        "rm/train_time_s": round(sum(m["rm/train_time_s"] for m in members), 2),
    }


def _depth(layers: int) -> float:
    """A member's depth for comparisons: ``layers``, 0 (all of them) the deepest."""
    return math.inf if layers == 0 else float(layers)


def train_one(
    cfg: RMTrainConfig,
    split_seed: int,
    stage: str,
    frozen_states: FrozenStates | None = None,
    states_below: FrozenStates | None = None,
    model_dir: Path | None = None,
) -> dict:
    """One reward model; ``split_seed`` picks the held-out and validation prompts, ``stage`` names
    the run (and its dir under the experiment). ``frozen_states``: states of the same frozen layers
    another model computed; ``states_below``: a shallower model's, to start from (:class:`Run`).
    ``model_dir``: where the model goes, already checked (:func:`reward_out_dir`); by default the
    run dir's ``model/``.
    Steps 1-8 of the module docstring, in order."""
    t_start = time.time()
    data = read_data(cfg, split_seed)  # before any model loads, so bad input fails fast

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    require_data_parallel(accelerator, "rm train")
    bf16 = use_bf16(cfg.mixed_precision, accelerator.device)
    torch.manual_seed(cfg.seed)
    tracker = (
        start_stage(cfg, stage, job_type="reward_model") if accelerator.is_main_process else Tracker.noop()
    )
    try:
        tracker.use_artifact(cfg.rankings, "rankings", "dataset")
        run_dir = Path(tracker.run_dir) if tracker.run_dir else stage_run_dir(cfg, stage)
        store = FrozenStates() if frozen_states is None else frozen_states
        run = Run(cfg, accelerator, bf16, tracker, run_dir, t_start, store, states_below)
        if run.main:
            write_jsonl(run.eval_path, [r for g in data.held for r in g.records])
        trainee = set_up(run, data)
        progress = (
            exact_solve(run, trainee, data) if cfg.solver == "lbfgs" else training_loop(run, trainee, data)
        )
        final, norm = finish(run, trainee, progress, data)
        summary = write_outputs(run, trainee, progress, data, final, norm, model_dir or run_dir / "model")
        accelerator.wait_for_everyone()
    finally:
        tracker.finish()
    return summary


# ----------------------------------------------------------------------------- 5-6. the loop


@dataclass
class Progress:
    """Where training stands. ``counters`` and ``best_params`` are what a checkpoint saves."""

    counters: dict[str, Any] = field(
        default_factory=lambda: {
            "step": 0,
            "best_loss": float("inf"),
            "bad_evals": 0,
            "best_step": 0,
            "rankings_seen": 0,
        }
    )
    best_params: dict[str, torch.Tensor] | None = None  # trainable weights at the best validation loss
    last_good: Path | None = None  # the newest checkpoint: where a resume would start
    seen_at_start: int = 0  # rankings seen before this run (a resumed one)
    last_eval: dict[str, float] = field(default_factory=dict)
    stop_reason: str = "done"
    train_time: float = 0.0

    @property
    def step(self) -> int:
        return self.counters["step"]

    @property
    def rankings_this_run(self) -> int:
        return self.counters["rankings_seen"] - self.seen_at_start

    @property
    def throughput(self) -> float:
        return self.rankings_this_run / max(self.train_time, 1e-9)


def training_loop(run: Run, trainee: Trainee, data: RMData) -> Progress:
    """Epochs of length-bucketed micro-batches until ``total_steps`` optimizer steps, early stopping
    or the time budget; the best validation step's weights are loaded back at the end."""
    cfg, accelerator, model = run.cfg, run.accelerator, trainee.model
    progress = _resume(run, trainee)
    counters = progress.counters
    model.train()
    bar = progress_bar(
        trainee.total_steps, f"rm train ({cfg.loss})", "step", enabled=run.main, initial=counters["step"]
    )

    def where(step: int) -> dict[str, Any]:
        """Where a non-finite loss or gradient stopped training, for its error message."""
        return {
            "at": f"step {step}",
            "last_good": progress.last_good,
            "hint": "Try a lower lr.",
            "progress": bar,
        }

    t_train, progress.seen_at_start = time.time(), counters["rankings_seen"]
    micro_per_epoch = trainee.steps_per_epoch * cfg.grad_accum
    micro = counters["step"] * cfg.grad_accum
    while counters["step"] < trainee.total_steps:
        epoch, pos = divmod(micro, micro_per_epoch)
        batches = length_batches(trainee.my_train, cfg.batch_size, random.Random(f"{cfg.seed}:{epoch}"))
        # an epoch is steps_per_epoch whole steps, the same number in every process
        for groups in batches[:micro_per_epoch][pos:]:
            batch = make_batch(groups, trainee.pad_id, trainee.cache)
            with run.amp():
                loss, _, _ = batch_loss(cfg, model, trainee.raw_tie, batch)
            stop_if_non_finite(loss, "loss", **where(counters["step"] + 1))
            micro += 1
            sync = micro % cfg.grad_accum == 0
            if sync or run.world == 1:
                accelerator.backward(loss / cfg.grad_accum)
            else:
                with accelerator.no_sync(model):
                    accelerator.backward(loss / cfg.grad_accum)
            counters["rankings_seen"] += int(batch.tiers.shape[0]) * run.world
            if not sync:
                continue
            trained = [p for group in trainee.optimizer.param_groups for p in group["params"]]
            stop_if_non_finite(gradient_norm(trained), "gradient norm", **where(counters["step"] + 1))
            trainee.optimizer.step()
            trainee.scheduler.step()
            trainee.optimizer.zero_grad(set_to_none=True)
            counters["step"] += 1
            if _after_step(run, trainee, data, progress, float(loss.detach()), bar, t_train):
                break
        else:
            continue
        break
    bar.close()
    progress.train_time = time.time() - t_train
    if progress.best_params is not None and counters["best_step"] != counters["step"]:
        load_trainable(trainee.inner, progress.best_params)  # keep the best validation checkpoint
    return progress


def exact_solve(run: Run, trainee: Trainee, data: RMData) -> Progress:
    """``solver: lbfgs``: the head solved exactly on every training ranking at once
    (:mod:`reward_models.exact_head`); validation prompts, if any, are scored once after."""
    progress = Progress()
    solution = solve_head(
        run.cfg, trainee.inner, trainee.my_train, trainee.pad_id, trainee.cache, run.accelerator
    )
    rankings = sum(len(g.rankings) for g in trainee.my_train) * run.world
    progress.counters.update(step=solution.iterations, best_step=solution.iterations, rankings_seen=rankings)
    progress.train_time = solution.seconds
    chosen = ""
    if solution.cv_loss:
        tried = ", ".join(f"{lam:g}: {loss:.4f}" for lam, loss in solution.cv_loss.items())
        chosen = f", l2 {solution.l2:g} by {run.cfg.cv_folds}-fold cross-validation ({tried})"
    progress.stop_reason = f"solved exactly by L-BFGS in {solution.iterations} iterations{chosen}" + (
        "" if solution.converged else f" (the limit of {MAX_ITERATIONS}: not converged)"
    )
    discount = solution.length_discount
    if discount is not None:
        progress.stop_reason += (
            f"; length discounted: ρ {discount.rho:.3f} (agreement {discount.agreement:.3f} with the labels, "
            f"their reliability {discount.reliability:.3f} on {discount.shared_pairs} pairs ranked twice), "
            f"length corr. of the training answers' out-of-fold scores {discount.corr_before:.3f} → "
            f"{discount.corr_after:.3f}"
        )
    if data.val:
        _validate(run, trainee, progress)
    if run.main:
        logs = {"train/objective": solution.objective, "train/l2": solution.l2, **progress.last_eval}
        logs.update({f"train/cv_loss_l2_{lam:g}": loss for lam, loss in solution.cv_loss.items()})
        if discount is not None:
            logs.update({f"train/length_discount_{k}": v for k, v in vars(discount).items()})
        logs.update({f"train/tie_{k}": v for k, v in tie_values(run.cfg.loss, trainee.raw_tie).items()})
        run.tracker.log(logs, step=progress.step)
    return progress


def _resume(run: Run, trainee: Trainee) -> Progress:
    """A fresh :class:`Progress`, or (``resume=true``) the latest checkpoint's, with its weights,
    optimiser and schedule loaded."""
    progress = Progress(last_good=run.checkpoints.latest())
    if not run.cfg.resume:
        return progress
    if progress.last_good is None:
        if run.main:
            print(f"rm: resume requested but no checkpoint in {run.checkpoints.root}; starting fresh")
        return progress
    saved = load_state(progress.last_good)
    load_trainable(trainee.inner, saved["model"])
    trainee.optimizer.load_state_dict(saved["optimizer"])
    trainee.scheduler.load_state_dict(saved["scheduler"])
    progress.counters.update({k: saved[k] for k in progress.counters if k in saved})
    progress.best_params = saved.get("best_params")
    if run.main:
        print(f"rm: resumed from {progress.last_good} (step {progress.step})", flush=True)
    return progress


def _after_step(
    run: Run, trainee: Trainee, data: RMData, progress: Progress, loss: float, bar, t_train: float
) -> bool:
    """Log the optimizer step just taken, evaluate on the validation prompts when it is time,
    checkpoint, and say whether training stops here (``progress.stop_reason`` says why)."""
    cfg, counters, step = run.cfg, progress.counters, progress.step
    logs = {
        "train/loss": loss,
        "train/lr": trainee.scheduler.get_last_lr()[0],
        "train/rankings_per_s": progress.rankings_this_run / max(time.time() - t_train, 1e-9),
    }
    logs.update({f"train/tie_{k}": v for k, v in tie_values(cfg.loss, trainee.raw_tie).items()})
    bar.update(1)
    bar.set_postfix(
        loss=f"{loss:.4f}", val_acc=f"{progress.last_eval.get('val/pair_accuracy', float('nan')):.3f}"
    )
    out_of_time = bool(cfg.max_time_s) and time.time() - t_train >= cfg.max_time_s
    if cfg.max_time_s and run.world > 1:  # clocks differ: all processes stop after the same step
        flag = torch.tensor([float(out_of_time)], device=run.accelerator.device)
        out_of_time = bool(run.accelerator.reduce(flag, "sum") > 0)
    if data.val and (
        (cfg.eval_every and step % cfg.eval_every == 0) or step == trainee.total_steps or out_of_time
    ):
        _validate(run, trainee, progress)
        logs.update(progress.last_eval)
    if run.main:
        run.tracker.log(logs, step=step)
    if cfg.save_every and step % cfg.save_every == 0:
        if run.main:
            run.checkpoints.save(step, _checkpoint_state(trainee, progress), keep=KEEP_CHECKPOINTS)
        progress.last_good = run.checkpoints.path(step)
    if cfg.patience and counters["bad_evals"] >= cfg.patience:
        progress.stop_reason = f"early stop: no better validation loss in {cfg.patience} evaluations"
        return True
    if out_of_time:
        progress.stop_reason = f"time budget of {cfg.max_time_s:g}s reached"
        return True
    return step >= trainee.total_steps


def _validate(run: Run, trainee: Trainee, progress: Progress) -> None:
    """``val/*`` on this process's validation prompts (summed over processes); a better loss
    than any before keeps these weights, a worse one counts towards ``patience``."""
    measured = _evaluate(run, trainee, trainee.my_val)
    progress.last_eval = {"val/" + k.split("/", 1)[1]: v for k, v in measured.items()}
    counters = progress.counters
    if progress.last_eval["val/loss"] < counters["best_loss"] - 1e-6:
        counters.update(best_loss=progress.last_eval["val/loss"], best_step=progress.step, bad_evals=0)
        progress.best_params = trainee.inner.trainable_state()
    else:
        counters["bad_evals"] += 1


def _evaluate(run: Run, trainee: Trainee, groups: list[Group]) -> dict[str, float]:
    """``eval/loss`` and ``eval/pair_accuracy`` on ``groups`` (this process's share), summed over
    processes."""
    with run.amp():
        return evaluate_groups(
            run.cfg, trainee.model, trainee.raw_tie, groups, trainee.pad_id, trainee.cache, run.accelerator
        )


def load_trainable(model, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable weights (name → tensor) into ``model``."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


def _checkpoint_state(trainee: Trainee, progress: Progress) -> dict[str, Any]:
    """What a resume needs: the trainable weights, optimiser, schedule, counters and best weights."""
    return {
        "model": {n: p.detach() for n, p in trainee.inner.named_parameters() if p.requires_grad},
        "optimizer": trainee.optimizer.state_dict(),
        "scheduler": trainee.scheduler.state_dict(),
        **progress.counters,
        "best_params": progress.best_params,
    }


# ----------------------------------------------------------------------------- 6-8. the end


def finish(run: Run, trainee: Trainee, progress: Progress, data: RMData) -> tuple[dict, dict]:
    """Score the held-out prompts (``eval/*``) and normalise on reference-policy samples."""
    cfg = run.cfg
    final = _evaluate(run, trainee, trainee.my_held) if data.held else {}
    norm = {"offset": 0.0, "scale": 1.0, "n": 0, "source": "none"}
    if cfg.normalize:
        with run.amp():
            scores, source = reference_scores(
                cfg, trainee.inner, trainee.tokenizer, trainee.my_train, trainee.cache, run.main
            )
        if run.world > 1:  # shards differ in size: gather as Python lists
            scores = torch.tensor(gather_object(scores.tolist()))
        std = float(scores.std()) if scores.numel() > 1 else 1.0
        norm = {
            "offset": float(scores.mean()),
            "scale": std if std > 1e-6 else 1.0,
            "n": int(scores.numel()),
            "source": source,
        }
    return final, norm


def write_outputs(
    run: Run, trainee: Trainee, progress: Progress, data: RMData, final: dict, norm: dict, model_dir: Path
) -> dict[str, Any]:
    """The reward-model dir ``model_dir``, logged as the run's output artifact, and the run's summary
    (returned; the main process also logs it and prints the closing line)."""
    cfg, counters = run.cfg, progress.counters
    summary = {
        "run_dir": str(run.run_dir),
        "model_dir": str(model_dir),
        "eval_rankings": str(run.eval_path),
        "data/bad_rows": data.report.bad_rows,  # skipped (skip_bad_rows): in the experiment's summary too
        "rm/steps": counters["step"],
        "rm/best_step": counters["best_step"],
        "rm/stop": progress.stop_reason,
        "rm/train_time_s": round(progress.train_time, 2),
        "rm/cache_time_s": round(trainee.cache_time, 2),
        "rm/rankings_seen": progress.rankings_this_run,
        "rm/rankings_per_s": progress.throughput,
        "rm/train_prompts": len(data.train),
        "rm/bf16": int(run.bf16),
        "rm/eval_prompts": len(data.held),
        "rm/val_prompts": len(data.val),
        **{f"rm/final_{k.split('/')[1]}": v for k, v in final.items()},
        "norm/offset": norm["offset"],
        "norm/scale": norm["scale"],
    }
    if not run.main:
        return summary
    save_reward_model(
        trainee.inner, trainee.tokenizer, model_dir, _reward_meta(cfg, trainee, data, final, norm)
    )
    run.tracker.log(
        {**final, "norm/offset": norm["offset"], "norm/scale": norm["scale"]}, step=counters["step"]
    )
    run.tracker.summary({k: v for k, v in summary.items() if not isinstance(v, str) or k == "rm/stop"})
    run.tracker.log_artifact(
        model_dir,
        f"{cfg.experiment}-reward-model",
        "model",
        metadata={"loss": cfg.loss, "base_model": cfg.model, **final},
    )
    acc = final.get("eval/pair_accuracy", float("nan"))
    print(
        f"rm train: {counters['step']} steps in {progress.train_time:.1f}s ({progress.throughput:.2f} rankings/s; "
        f"{progress.stop_reason}); held-out pair accuracy {acc:.3f} on {len(data.held)} prompts; normalised on "
        f"{norm['source']} (offset {norm['offset']:.3f}, scale {norm['scale']:.3f}) → {model_dir} "
        f"[{time.time() - run.t_start:.1f}s total" + (f", {run.world} processes]" if run.world > 1 else "]"),
        flush=True,
    )
    return summary


def _reward_meta(cfg: RMTrainConfig, trainee: Trainee, data: RMData, final: dict, norm: dict) -> dict:
    """``rlhf_reward.json``: how the model was trained and on what, and how to normalise its scores."""
    return {
        "loss": cfg.loss,
        "base_model": cfg.model,
        "trainable": cfg.trainable,
        "top_layers": cfg.top_layers if cfg.trainable == "top" else None,
        "layers": trainee.inner.n_layers,
        "pooling": cfg.pooling,
        "normalization": norm,
        "chat_template": True,
        "max_length": cfg.max_length,
        "training_data": {
            "path": str(cfg.rankings),
            "hash": data_hash(data.records),
            "rankings": data.report.used_rankings,
            "prompts": len(data.train),
        },
        "margin": cfg.margin,
        "center_coef": cfg.center_coef,
        **tie_values(cfg.loss, trainee.raw_tie),
        "tie_initial": trainee.tie_init,
        "metrics": final,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": to_dict(cfg),
    }


def add_parser(subparsers):
    p = subparsers.add_parser(
        "train", help="train a reward model on rankings with ties", description=__doc__.split("\n\n")[0]
    )
    add_config_arguments(p, RMTrainConfig)
    # trains in every process of a launch (rlhf/distributed.py)
    p.set_defaults(
        func=lambda args: run_rm_train(config_from_args(args, RMTrainConfig)) and 0, across_processes=True
    )
    return p
