"""The plan: an experiment unrolled into an ordered list of stage instances (rounds appended after
round 1), each with the default wiring of its inputs to the outputs of earlier stages."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from experiments.pipeline.experiment_file import LIBRARY_STAGES, REF, Experiment, stage_kind
from rlhf.config import did_you_mean
from rlhf.errors import ConfigError


@dataclass
class Node:
    """One stage instance of the plan: a stage of the file, or its copy for a later round."""

    name: str  # instance name, unique in the plan ("ppo", "ppo@2", "rm_ens1@2")
    kind: str
    section: dict  # fields of the stage (``${}`` refs allowed)
    wired: dict[str, Any]  # field → "${inst.key}" default wiring (a list of them for arena.policies)
    round: int = 1
    folder: str = ""  # sub-folder under the run prefix ("" = the standard runs/<exp>/<kind>/)

    def refs(self) -> set[str]:
        text = json.dumps([self.section, self.wired])
        return {m.group(1) for m in REF.finditer(text)}


RANKINGS_PRODUCERS = ("simulate", "annotate", "collect")


def default_wiring(kind: str, latest: dict[str, str]) -> dict[str, Any]:
    """Quickstart's wiring: each input field ← the latest earlier stage that produces it."""

    def ref(stage: str, key: str) -> str | None:
        return f"${{{latest[stage]}.{key}}}" if stage in latest else None

    rankings = next((f"${{{latest[k]}.rankings}}" for k in ("_rankings",) if k in latest), None)
    wires: dict[str, str | None] = {}
    if kind == "generate":
        # InstructGPT's order: comparisons are sampled from the SFT policy that PPO will start from,
        # so the reward model is trained on the distribution it will score
        wires["model"] = ref("sft", "policy_dir")
    elif kind in ("simulate", "annotate"):
        wires["candidates"] = ref("_candidates", "candidates")
    elif kind in ("export", "rm_train"):
        wires["rankings"] = rankings
    elif kind == "rm_eval":
        wires = {"reward_model": ref("rm_train", "model_dir"), "rankings": ref("rm_train", "eval_rankings")}
    elif kind in ("ppo", "baseline"):
        wires = {"policy": ref("sft", "policy_dir"), "reward": ref("rm_train", "model_dir")}
    elif kind in ("dpo", "kto"):
        wires = {"policy": ref("sft", "policy_dir"), "rankings": rankings}
    elif kind == "eval":
        trained = ("ppo", "baseline", "dpo", "kto")
        policy = next((ref(k, "policy_dir") for k in trained if k in latest), None)
        wires = {
            "policy": policy,
            "reference": ref("sft", "policy_dir"),
            "reward": ref("rm_train", "model_dir"),
        }
    elif kind == "arena":
        # the starting policy against every trained one, judged blind; the reward model judges too
        trained = [k for k in ("ppo", "baseline", "dpo", "kto") if k in latest]
        policies = [f"{k}={ref(k, 'policy_dir')}" for k in ["sft", *trained] if k in latest]
        wires = {
            "policies": policies if len(policies) >= 2 else None,
            "reward": ref("rm_train", "model_dir"),
            # the answers eval sampled from the same policies, judged instead of sampled again (its
            # run dir, not its responses file: an eval cached before it wrote one has none to offer)
            "responses_from": ref("eval", "run_dir"),
        }
    return {k: v for k, v in wires.items() if v is not None}


def _track_latest(latest: dict[str, str], node: Node) -> None:
    latest[node.kind] = node.name
    if node.kind in ("generate", "select"):
        latest["_candidates"] = node.name
    if node.kind in RANKINGS_PRODUCERS:
        latest["_rankings"] = node.name


def _add(plan: list[Node], latest: dict[str, str], node: Node) -> Node:
    node.wired = {k: v for k, v in default_wiring(node.kind, latest).items() if k not in node.section}
    plan.append(node)
    _track_latest(latest, node)
    return node


def _round_section(section: dict, r: int, names: set[str]) -> dict:
    """A round-1 section copied for round ``r``: ``${x.key}`` → ``${x@r.key}`` where round r has ``x``."""
    text = json.dumps(section)

    def sub(m: re.Match) -> str:
        target = f"{m.group(1)}@{r}"
        return f"${{{target}.{m.group(2)}}}" if target in names else m.group(0)

    return json.loads(REF.sub(sub, text))


def build_plan(exp: Experiment) -> list[Node]:
    """Unroll the experiment into an ordered list of stage instances (rounds appended after round 1)."""
    plan: list[Node] = []
    latest: dict[str, str] = {}
    for name, section in exp.stages.items():
        folder = "" if name == stage_kind(name, section) else name
        _add(plan, latest, Node(name, stage_kind(name, section), dict(section), {}, 1, folder))
    kinds = {n.kind: n for n in plan}
    per_round = int(exp.round.get("prompts_per_round", 0) or 0)
    select = exp.round.get("select", "next")
    ensemble = int(exp.round.get("ensemble", 2))
    gen1 = kinds.get("generate")
    all_rankings = [f"${{{latest['_rankings']}.rankings}}"] if "_rankings" in latest else []
    for r in range(2, exp.rounds + 1):
        names_r = {f"{n.name}@{r}" for n in plan if n.round == 1} | {
            f"{k}@{r}" for k in ("prompts", "select", "collect")
        }
        folder = f"round{r}"
        gen_sec = dict(gen1.section)
        # 1. prompts not used in earlier rounds (the rankings so far name them)
        prompts = Node(
            f"prompts@{r}",
            "prompts",
            {
                "source": gen_sec.get("prompts", "lab:prompts"),
                "split": gen_sec.get("split", "train"),
                "exclude": list(all_rankings),
                "n": (
                    exp.round.get("pool", 4 * per_round if per_round else 0)
                    if select == "uncertainty"
                    else per_round
                )
                or int(gen_sec.get("limit") or 0),
            },
            {},
            r,
            folder,
        )
        _add(plan, latest, prompts)
        # 2. candidates from the latest policy
        gen = {
            **_round_section(gen_sec, r, names_r),
            "prompts": f"${{prompts@{r}.prompts}}",
            "split": None,
            "limit": None,
            "model": f"${{{latest['ppo']}.policy_dir}}",
        }
        _add(plan, latest, Node(f"{gen1.name}@{r}", "generate", gen, {}, r, folder))
        if select == "uncertainty":
            members = [f"${{{latest['rm_train']}.model_dir}}"]
            rm1 = kinds["rm_train"]
            for i in range(1, ensemble):
                sec = {
                    **_round_section(rm1.section, r, names_r),
                    "rankings": f"${{{latest['_rankings']}.rankings}}",
                    "seed": int(rm1.section.get("seed", exp.seed)) + 1000 * i,
                }
                node = Node(f"rm_ens{i}@{r}", "rm_train", sec, {}, r, f"{folder}_ens{i}")
                plan.append(node)  # not the loop's reward model: do not update `latest`
                members.append(f"${{{node.name}.model_dir}}")
            _add(
                plan,
                latest,
                Node(
                    f"select@{r}",
                    "select",
                    {
                        "candidates": f"${{{gen1.name}@{r}.candidates}}",
                        "reward_models": members,
                        "n": per_round or 0,
                    },
                    {},
                    r,
                    folder,
                ),
            )
        # 3. the rest of round 1's stages after generate, in order, with rankings merged before training
        for n in [n for n in plan if n.round == 1 and n.kind not in ("generate", "sft")]:
            sec = _round_section(n.section, r, names_r)
            if n.kind == "rm_train":
                collect = Node(f"collect@{r}", "collect", {"rankings": list(all_rankings)}, {}, r, folder)
                _add(plan, latest, collect)
            if n.kind in ("ppo", "baseline"):
                sec["policy"] = f"${{{latest[n.kind]}.policy_dir}}"  # always continue from the last policy
            node = _add(
                plan,
                latest,
                Node(f"{n.name}@{r}", n.kind, sec, {}, r, folder if not n.folder else f"{folder}_{n.folder}"),
            )
            if n.kind in ("simulate", "annotate"):
                all_rankings.append(f"${{{node.name}.rankings}}")
        # collect lists every round's rankings so far (including this round's)
        for node in plan:
            if node.name == f"collect@{r}":
                node.section["rankings"] = list(all_rankings)
    names = {n.name for n in plan}
    for node in plan:
        for ref in node.refs():
            if ref not in names:
                raise ConfigError(
                    f"stages.{node.name}: reference ${{{ref}.…}} names no stage{did_you_mean(ref, names)}; "
                    f"stages: {', '.join(names)}"
                )
    return plan


def upstream_of(plan: list[Node], name: str) -> list[Node]:
    """The nodes of ``plan`` that ``name`` needs (itself included), in plan order."""
    by_name = {n.name: n for n in plan}
    needed: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current not in needed:
            needed.add(current)
            todo.extend(by_name[current].refs())
    return [n for n in plan if n.name in needed]


def node_fields(node: Node) -> dict:
    """A stage's fields: its default wiring, overridden by what its own section sets."""
    return {**node.wired, **node.section}


# ----------------------------------------------------------------------------- what a sweep's values reach


def stage_fingerprints(exp: Experiment) -> dict[str, str]:
    """Stage instance → a digest of what its result is made of: its kind, its fields (W&B settings
    aside), its seed and the digests of the stages it reads. It is what :func:`stage_key` covers,
    known before anything runs (defaults and input file sizes aside: every sweep point has the same)."""
    prints: dict[str, str] = {}
    for node in build_plan(exp):
        fields = {k: v for k, v in node_fields(node).items() if k != "tracking"}
        seed = fields.get("seed", exp.seed) if node.kind in LIBRARY_STAGES else exp.seed
        inputs = {ref: prints.get(ref) for ref in sorted(node.refs())}
        blob = json.dumps(
            {"kind": node.kind, "fields": fields, "seed": seed, "inputs": inputs}, sort_keys=True, default=str
        )
        prints[node.name] = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return prints


def sweep_dependencies(
    variant: Callable[[dict], Experiment], values: dict, points: list[dict]
) -> tuple[dict[str, dict], set[str]]:
    """For the sweep point ``values``: the swept values each of its stages depends on, and the stages it
    shares with another point of ``points`` (``variant(values)`` is the experiment at a point).

    A stage depends on a swept key when giving that key another of its swept values changes what the
    stage is made of (:func:`stage_fingerprints`). A stage is shared when another point has the same
    values for every key it depends on: the cache hands that point the same run.
    """
    mine = stage_fingerprints(variant(values))
    depends: dict[str, dict] = {name: {} for name in mine}
    for key, value in values.items():
        other = next((p[key] for p in points if key in p and p[key] != value), None)
        if other is None:
            continue  # one value in the whole sweep: no stage differs by it
        changed = stage_fingerprints(variant({**values, key: other}))
        for name, fingerprint in mine.items():
            if changed.get(name) != fingerprint:
                depends[name][key] = value
    shared = {
        name
        for name, own in depends.items()
        if any(p != values and all(p.get(k) == v for k, v in own.items()) for p in points)
    }
    return depends, shared
