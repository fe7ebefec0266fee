"""``rlhf arena``: policies judged blind, two at a time, rated with ties and intervals (docs/arena.md).

- ``rlhf arena run``: every policy answers the same prompts (one response each, the same random
  stream per prompt); every pair of policies' answers to a prompt becomes an *arena pair*, shown in
  a random order as responses A and B; automated voters vote on every pair; a leaderboard per voter
  is fitted and written as ``leaderboard.json``, ``leaderboard.png`` and a W&B run.
- ``rlhf arena import``: the pairs into the annotation app as an arena project, where people vote
  in the *Arena* tab without seeing which policy wrote what.
- ``rlhf arena fit``: the leaderboard of any votes (the app's, files of votes, or both side by side).

Voters: the gold scorer twice (``--gold``: as simulated annotators and as a judge), a reward model
(``--reward``), and any others (``--voters``, a list):

- ``SPEC``, a **judge**: a gold scorer (``vader``, ``length:target=40``, ...) or a reward-model dir
  scores both responses; the higher wins, a difference of at most ``tie_threshold`` is a tie;
- ``simulated:SPEC``, **simulated annotators**: the lab's annotator model (``rlhf simulate``) that
  follows the scorer with Bradley–Terry noise and ties near equal scores, ``votes_per_pair`` of a
  pool of ``n_annotators`` on each pair: a stand-in for people, noisy the way people are.

Votes are ranking records of two responses (the rankings contract, ``A > B``, ``A = B`` or
``B > A``; each response names its ``model``), so ``votes.jsonl`` *is* preference data:
``rlhf export`` and ``rlhf rm train`` read it as they read any rankings. An arena pair's
``prompt_id`` is opaque (``<prompt_id>-p<n>``); votes are grouped by prompt text for the bootstrap,
so every pair of one prompt is resampled together.

The leaderboard, per voter: Bradley–Terry–Davidson ratings on an Elo-like scale with 95 %
intervals from a bootstrap over prompts, the tie parameter, and each policy's raw and
length-controlled win rate against ``baseline`` (:mod:`rlhf.arena_fit`).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from annotation_app.database import is_url
from annotation_app.io import import_candidates
from annotation_app.store import Store
from reward_models.simulate import simulate_rankings
from rlhf.arena import (
    LABELS,
    Leaderboard,
    arena_pairs,
    format_leaderboards,
    leaderboard_metrics,
    leaderboard_table,
    leaderboards_by_voter,
    people_votes,
    write_leaderboard_png,
)
from rlhf.config import ConfigError, add_config_arguments, config_from_args, option
from rlhf.contracts import load_rankings
from rlhf.datafiles import write_jsonl
from rlhf.errors import UserError
from rlhf.evaluate import HeldOutSampling, load_eval_prompts, resolve_stop_token, sample_one_each
from rlhf.held_out_answers import answer_records, reusable_answers
from rlhf.models import check_model_name, load_sampling_policy
from rlhf.ppo.rollout import encode_queries, left_pad
from rlhf.rankings import parse_ranking
from rlhf.rewards import check_reward_spec, load_reward_fn, reward_model_dirs, score_candidates
from rlhf.scorers import get_scorer
from rlhf.tracking import RunFields, start_stage

SIMULATED = "simulated:"
# A voter that starts `key=` with no scorer name is the tail of a spec the list split at its comma.
SPEC_TAIL = re.compile(r"^\w+=")


# ----------------------------------------------------------------------------- policies


def policy_name_and_path(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` → (NAME, PATH); a bare PATH is named after its run dir (``runs/x/ppo`` and
    ``runs/x/ppo/policy`` → ``ppo``) or is its own name (an alias). A run dir stands for its
    ``policy/`` folder."""
    name, sep, path = spec.partition("=")
    if not sep:
        name, path = "", spec
    path = path.strip()
    folder = Path(path)
    if (folder / "policy").is_dir():
        folder = folder / "policy"
        path = str(folder)
    if not name:
        name = folder.parent.name if folder.name == "policy" else folder.name or path
    return name.strip(), path


def sample_policy_responses(
    path: str, prompts: Sequence[Any], sampling: HeldOutSampling, label: str
) -> list[dict]:
    """One response per prompt from the policy at ``path``: ``[{text, n_tokens, finished}]``.

    The eval sampler (:func:`rlhf.evaluate.sample_one_each`) with ``rlhf eval``'s settings: prompt
    ``i`` draws from the stream seeded ``seed, i`` whatever the policy, so two policies differ by
    what they are, not by luck."""
    policy, tokenizer, _ = load_sampling_policy(path, sampling.mixed_precision)
    query, query_mask = left_pad(
        encode_queries(tokenizer, list(prompts), sampling.max_prompt_tokens), tokenizer.pad_token_id
    )
    rollout, texts = sample_one_each(
        policy,
        tokenizer,
        query,
        query_mask,
        max_new_tokens=sampling.max_new_tokens,
        temperature=sampling.temperature,
        stop_token_id=resolve_stop_token(tokenizer, sampling.stop_token),
        batch_size=sampling.batch_size,
        seed=sampling.seed,
        progress=f"arena: {label}",
    )
    return answer_records(rollout, texts)


def reused_answers(
    cfg: ArenaConfig, records: Sequence[Mapping], policies: Sequence[tuple[str, str]]
) -> dict[str, list[dict]]:
    """The answers of ``cfg.responses_from`` that stand for sampling these policies again
    (:func:`rlhf.held_out_answers.reusable_answers`); each policy left out is named with the reason."""
    if not cfg.responses_from:
        return {}
    reused, reasons = reusable_answers(cfg.responses_from, cfg, records, policies)
    if reused:
        print(f"arena: {', '.join(reused)}: the answers eval sampled ({cfg.responses_from})")
    for reason in reasons:
        print(f"arena: sampling again: {reason}")
    return reused


# ----------------------------------------------------------------------------- voters


def _scores(spec: str, pairs: Sequence[Mapping]) -> list[tuple[float, float]]:
    """Both responses of every pair scored by a reward spec (scorer or reward-model dir)."""
    return [
        (a, b) for a, b in score_candidates(load_reward_fn(spec), pairs, progress=f"arena: {spec} judging")
    ]


def judge_votes(pairs: Sequence[Mapping], spec: str, tie_threshold: float) -> list[dict]:
    """A judge's vote on every pair: the higher score wins, within ``tie_threshold`` a tie."""
    votes = []
    for pair, (a, b) in zip(pairs, _scores(spec, pairs)):
        text = "A = B" if abs(a - b) <= tie_threshold else ("A > B" if a > b else "B > A")
        votes.append(_vote_record(pair, text, annotator=spec, voter=spec, gold={"A": a, "B": b}))
    return votes


def simulated_votes(
    pairs: Sequence[Mapping],
    spec: str,
    *,
    n_annotators: int,
    votes_per_pair: int,
    temperature: float,
    tie_threshold: float,
    seed: int,
) -> list[dict]:
    """Votes of simulated annotators following the scorer ``spec`` (:mod:`reward_models.simulate`)."""
    # Scored here rather than by simulate_rankings: a reward model must know which responses ended
    # with EOS. simulate_rankings asks for the responses in the pairs' order, A then B.
    flat = [s for pair_scores in _scores(spec, pairs) for s in pair_scores]

    def scorer(_prompts, texts):
        assert len(texts) == len(flat)
        return flat

    rankings = simulate_rankings(
        pairs,
        scorer,
        n_annotators=n_annotators,
        temperature=temperature,
        tie_threshold=tie_threshold,
        seed=seed,
        per_prompt=votes_per_pair,
        scorer_name=spec,
    )
    voter = SIMULATED + spec
    return [{**r, "voter": voter} for r in rankings]


def _vote_record(
    pair: Mapping, ranking: str, *, annotator: str, voter: str, gold: dict | None = None
) -> dict:
    parsed = parse_ranking(ranking, list(LABELS))
    rec = {
        "prompt_id": pair["prompt_id"],
        "prompt": pair["prompt"],
        "candidates": pair["candidates"],
        "ranking": str(parsed),
        "tiers": [list(t) for t in parsed.tiers],
        "annotator": annotator,
        "flags": ["all_tied"] if parsed.all_tied else [],
        "voter": voter,
    }
    if gold is not None:
        rec["gold"], rec["gold_scorer"] = gold, voter
    return rec


def parse_voter(spec: str) -> str:
    """A voter spec, checked without loading anything (bad specs fail before any sampling)."""
    spec = str(spec).strip()
    reward = spec[len(SIMULATED) :] if spec.startswith(SIMULATED) else spec
    check_reward_spec(reward)
    if not reward_model_dirs(reward) and not reward.startswith("ensemble:"):
        get_scorer(reward)  # a scorer spec is read now: a typo fails before any sampling
    return spec


# ----------------------------------------------------------------------------- `rlhf arena run`


@dataclass
class ArenaConfig(RunFields, HeldOutSampling):
    policies: list[str] = option(
        default_factory=list,
        help="two or more policies, each NAME=PATH or PATH: a run dir (runs/x/ppo), a policy or model "
        "dir, or an alias; e.g. [sft=runs/quickstart/sft, ppo=runs/quickstart/ppo]",
    )
    num_prompts: int = option(100, help="at most this many held-out prompts (0 = all)")
    gold: str | None = option(
        "vader",
        help="gold scorer; it votes twice: as simulated annotators (simulated:GOLD, the stand-in for "
        "people) and as a judge (GOLD); null = neither",
    )
    reward: str = option(
        "", help="a reward model (or any reward spec) that judges too, e.g. the one PPO optimised"
    )
    voters: list[str] = option(
        default_factory=list,
        help="further voters: SPEC (a judge: scorer spec or reward-model dir) or simulated:SPEC "
        "(simulated annotators following SPEC with noise and ties); quote a spec that has a comma, "
        "or the list splits it: '[\"keywords:good=thanks,bad=sorry\"]'",
    )
    baseline: str = option("", help="the policy win rates are measured against (default: the first policy)")
    tie_threshold: float = option(0.05, help="judges and simulated annotators tie scores this close")
    n_annotators: int = option(5, help="simulated voters: size of the pool")
    votes_per_pair: int = option(1, help="simulated voters: annotators voting on each pair")
    annotator_temperature: float = option(
        0.2, help="simulated voters: Bradley–Terry noise temperature on the scorer's scale (0 = noiseless)"
    )
    n_boot: int = option(1000, help="bootstrap replicates over prompts for every interval")
    responses_from: str = option(
        "",
        help="an `rlhf eval` run dir (or its responses.json): a policy it sampled with these settings, "
        "on prompts these begin, answers from there instead of being sampled again, so the arena "
        "judges the answers eval measured (the experiment runner wires the eval stage's)",
    )

    def validate(self) -> None:
        if len(self.policies) < 2:
            raise ConfigError(f"policies: an arena needs two or more policies, got {self.policies!r}")
        names = [policy_name_and_path(p)[0] for p in self.policies]
        if len(set(names)) != len(names):
            raise ConfigError(f"policies: two policies share a name ({names}); name them NAME=PATH")
        if self.baseline and self.baseline not in names:
            raise ConfigError(f"baseline: {self.baseline!r} is not a policy; policies: {', '.join(names)}")
        if not self.all_voters():
            raise ConfigError("voters: no voter; give gold, reward or voters (e.g. simulated:vader)")
        for before, voter in zip(self.voters, self.voters[1:]):
            if SPEC_TAIL.match(voter):  # `bad=sorry` alone: the list split a spec at its comma
                raise ConfigError(
                    f"voters: {voter!r} looks like the end of {before!r}, split at a comma by the list; "
                    f"quote the whole spec: '[\"{before},{voter}\"]'"
                )
        self.validate_sampling()
        if self.n_boot < 0:
            raise ConfigError(f"n_boot: {self.n_boot} must be ≥ 0")
        for name in ("n_annotators", "votes_per_pair"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: {getattr(self, name)} must be ≥ 1")
        if self.votes_per_pair > self.n_annotators:
            raise ConfigError(
                f"votes_per_pair: {self.votes_per_pair} must be ≤ n_annotators ({self.n_annotators})"
            )
        if self.tie_threshold < 0 or self.annotator_temperature < 0:
            raise ConfigError("tie_threshold and annotator_temperature must be ≥ 0")

    def all_voters(self) -> list[str]:
        """Every voter, in leaderboard order: the simulated annotators and the gold judge, the
        reward model, then ``voters``; each once."""
        gold = [SIMULATED + self.gold, self.gold] if self.gold else []
        return list(dict.fromkeys(gold + ([self.reward] if self.reward else []) + list(self.voters)))


def run_arena(cfg: ArenaConfig) -> dict[str, Any]:
    """Sample, pair, vote and rate (module docstring); returns the files written and the boards."""
    cfg.validate()
    policies = [policy_name_and_path(p) for p in cfg.policies]
    for _, path in policies:
        check_model_name(path)  # an unknown policy fails here, before anything is sampled
    voters = [parse_voter(v) for v in cfg.all_voters()]
    records = load_eval_prompts(cfg.prompts, cfg.split, cfg.num_prompts)
    baseline = cfg.baseline or policies[0][0]
    tracker = start_stage(cfg, "arena")
    try:
        for name, path in policies:  # lineage: the arena judged these policies
            if Path(path).exists():
                tracker.use_artifact(path, f"{name}-policy", "model")
        out = Path(tracker.run_dir)
        prompts = [r["prompt"] for r in records]
        sampled = reused_answers(cfg, records, policies)
        for name, path in policies:
            if name not in sampled:
                sampled[name] = sample_policy_responses(path, prompts, cfg, name)
        responses = [
            {
                "prompt_id": r["prompt_id"],
                "prompt": r["prompt"],
                "responses": {name: sampled[name][i] for name, _ in policies},
            }
            for i, r in enumerate(records)
        ]
        write_jsonl(out / "responses.jsonl", responses)
        pairs = arena_pairs(responses, cfg.seed)
        write_jsonl(out / "pairs.jsonl", pairs)
        votes = []
        for voter in voters:
            if voter.startswith(SIMULATED):
                votes += simulated_votes(
                    pairs,
                    voter[len(SIMULATED) :],
                    n_annotators=cfg.n_annotators,
                    votes_per_pair=cfg.votes_per_pair,
                    temperature=cfg.annotator_temperature,
                    tie_threshold=cfg.tie_threshold,
                    seed=cfg.seed,
                )
            else:
                votes += judge_votes(pairs, voter, cfg.tie_threshold)
        write_jsonl(out / "votes.jsonl", votes)
        boards, unrated = leaderboards_by_voter(votes, baseline, n_boot=cfg.n_boot, seed=cfg.seed)
        # Policies that answer alike (a PPO run that did not move its policy) get only ties: the
        # stage still ends, with the votes written and the reason, rather than failing the experiment.
        report = publish_leaderboards(boards, out, tracker) if boards else {}
        tracker.log_artifact(out / "votes.jsonl", name=f"{cfg.experiment}-arena-votes", type="dataset")
        sizes = {"arena/prompts": len(records), "arena/pairs": len(pairs), "arena/votes": len(votes)}
        sizes |= {
            f"arena/{name}/length_tokens": sum(s["n_tokens"] for s in sampled[name]) / len(records)
            for name, _ in policies
        }
        tracker.log(sizes)
        tracker.summary(sizes | {f"arena/unrated/{voter}": reason for voter, reason in unrated.items()})
        print(
            f"arena: {len(records)} prompts × {len(policies)} policies → {len(pairs)} pairs, {len(votes)} votes"
        )
        if boards:
            print(format_leaderboards(boards))
        for reason in unrated.values():
            print(f"arena: set aside: {reason}")
        print(
            f"arena: leaderboard {report.get('png', 'none')}; votes (preference data) {out / 'votes.jsonl'}"
        )
        return {
            "run_dir": str(out),
            "pairs": str(out / "pairs.jsonl"),
            "votes": str(out / "votes.jsonl"),
            **report,
            **sizes,
            "arena/baseline": baseline,
            "arena/unrated": unrated,
        }
    finally:
        tracker.finish()


def publish_leaderboards(boards: Sequence[Leaderboard], out: Path, tracker) -> dict[str, Any]:
    """``leaderboard.json``, ``leaderboard.png`` and the W&B table, image and summary."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "leaderboard.json").write_text(
        json.dumps([b.as_dict() for b in boards], indent=2), encoding="utf-8"
    )
    write_leaderboard_png(boards, out / "leaderboard.png")
    columns, rows = leaderboard_table(boards)
    tracker.log_table("arena/leaderboard", columns, rows)
    tracker.log_image("arena/leaderboard", out / "leaderboard.png")
    summary = leaderboard_metrics(boards)
    tracker.log(summary)
    tracker.summary(summary)
    return {"leaderboard": str(out / "leaderboard.json"), "png": str(out / "leaderboard.png"), **summary}


# ----------------------------------------------------------------------------- `rlhf arena fit`


@dataclass
class ArenaFitConfig(RunFields):
    votes: list[str] = option(
        default_factory=list,
        help="vote files (rankings JSONL of two responses naming their model: `rlhf arena run`'s "
        "votes.jsonl, an app export); each record's `voter` (default human) is its leaderboard",
    )
    db: str = option("", help="the annotation database: the arena project's votes, as voter `human`")
    project: str = option("", help="with --db: the arena project (default: every arena project)")
    baseline: str = option("", help="the policy win rates are measured against (default: the lowest rated)")
    n_boot: int = option(1000, help="bootstrap replicates over prompts for every interval")
    seed: int = option(0, help="bootstrap seed")

    def validate(self) -> None:
        if not self.votes and not self.db:
            raise ConfigError("arena fit: give --votes FILE(S) or --db DB (or both)")
        if self.n_boot < 0:
            raise ConfigError(f"n_boot: {self.n_boot} must be ≥ 0")


def app_votes(db: str, project: str | None) -> list[dict]:
    """The submitted votes of the app's arena projects, as vote records of voter ``human``."""
    store = Store(db)
    try:
        return people_votes(store.submitted_rankings(project or None, kind="arena"))
    finally:
        store.close()


def run_arena_fit(cfg: ArenaFitConfig) -> dict[str, Any]:
    cfg.validate()
    records: list[dict] = []
    for path in cfg.votes:
        records += load_rankings(path)
    if cfg.db:
        if not is_url(cfg.db) and not Path(cfg.db).is_file():
            raise UserError(f"no annotation database at {cfg.db}", code="not_found")
        records += app_votes(cfg.db, cfg.project)
    boards, unrated = leaderboards_by_voter(records, cfg.baseline or None, n_boot=cfg.n_boot, seed=cfg.seed)
    if not boards:  # nothing to publish: the first voter's reason, as one line
        raise UserError(next(iter(unrated.values())), code="no_rating")
    tracker = start_stage(cfg, "arena_fit")
    try:
        out = Path(tracker.run_dir)
        write_jsonl(out / "votes.jsonl", records)
        report = publish_leaderboards(boards, out, tracker)
        print(format_leaderboards(boards))
        for reason in unrated.values():
            print(f"arena fit: set aside: {reason}")
        print(f"arena fit: leaderboard {report['png']}; votes (preference data) {out / 'votes.jsonl'}")
        return {
            "run_dir": str(out),
            "votes": str(out / "votes.jsonl"),
            **report,
        }
    finally:
        tracker.finish()


# ----------------------------------------------------------------------------- `rlhf arena import`


def import_pairs(pairs_file: str, db: str, project: str, quorum: int, guidelines: str = "") -> dict:
    """The arena's pairs into the annotation database as an ``arena`` project (created if new)."""
    store = Store(db)
    try:
        store.migrate()
        store.upsert_project(project, quorum=quorum, guidelines=guidelines or None, kind="arena")
        result = import_candidates(store, pairs_file, project=project)
    finally:
        store.close()
    return result


ARENA_GUIDELINES = (
    "Two answers to the same prompt, from two models you are not told. Vote for the better answer, "
    "or Tie when neither is better. Keys: A or 1 (A is better), T, = or 2 (tie), B or 3 (B is better)."
)


def _cmd_run(args) -> int:
    run_arena(config_from_args(args, ArenaConfig))
    return 0


def _cmd_fit(args) -> int:
    run_arena_fit(config_from_args(args, ArenaFitConfig))
    return 0


def _cmd_import(args) -> int:
    if not Path(args.pairs).exists():
        raise UserError(f"no pairs file at {args.pairs}", code="not_found")
    result = import_pairs(args.pairs, args.db, args.project, args.quorum, args.guidelines or ARENA_GUIDELINES)
    print(
        f"arena import: {result.get('added', 0)} pairs added, {result.get('unchanged', 0)} unchanged "
        f"(project {args.project!r}, arena; {args.quorum} vote(s) each)"
    )
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "arena",
        help="blind pairwise arena of policies: sample, vote (people or automated), rate with intervals",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="arena_command", metavar="{run,import,fit}", required=True)
    p = sub.add_parser(
        "run",
        help="sample every policy, pair the answers blind, let automated voters vote, fit the leaderboard",
        description="Sample every policy on the same prompts, pair the answers blind in random order, "
        "let automated voters vote and fit one leaderboard per voter (leaderboard.json/.png, W&B).",
    )
    add_config_arguments(p, ArenaConfig)
    p.set_defaults(func=_cmd_run)
    p = sub.add_parser(
        "import",
        help="put an arena's pairs into the annotation app (its Arena tab)",
        description="Import pairs.jsonl of `rlhf arena run` into the annotation database as an arena "
        "project: annotators vote on them in the app's Arena tab, blind.",
    )
    p.add_argument("--pairs", required=True, help="pairs.jsonl written by `rlhf arena run`")
    p.add_argument("--db", required=True, help="annotation database (SQLite path or postgresql:// URL)")
    p.add_argument("--project", default="arena", help="arena project name (default: arena)")
    p.add_argument("--quorum", type=int, default=1, help="votes wanted per pair (default 1)")
    p.add_argument("--guidelines", default="", help="text shown above the pairs (default: how to vote)")
    p.set_defaults(func=_cmd_import)
    p = sub.add_parser(
        "fit",
        help="the leaderboard of votes: the app's (--db), files, or both side by side",
        description="Fit one leaderboard per voter from vote files and/or the app's arena votes, "
        "write leaderboard.json/.png and the votes as preference data (votes.jsonl), log to W&B.",
    )
    add_config_arguments(p, ArenaFitConfig)
    p.set_defaults(func=_cmd_fit)
    return parser
