"""How much time an ensemble saves by sharing its frozen layers' states between members.

``rlhf rm train --ensemble N`` trains N members one after another (``reward_models.train``,
``FrozenStates``). Members of one depth have the same frozen layers, so the first of them runs
every sequence through those layers and the others reuse the states. With ``--ensemble_layers``,
a deeper member starts from the deepest states computed so far and runs only the layers above
them. The baseline is the stage as it was before: the same members, with the same seeds on the
same split, each computing its own states from the token ids. Both run here, one after the other,
on the same rankings; the script prints each one's time, the ratio, and whether every member came
out with the same weights both ways (it exits 1 if not)::

    .venv/bin/python -m experiments.benchmarks.bench_rm_ensemble_cache \\
        --rankings runs/quickstart/simulate/rankings.jsonl --members 4
    .venv/bin/python -m experiments.benchmarks.bench_rm_ensemble_cache \\
        --rankings runs/quickstart/simulate/rankings.jsonl --members 4 --ensemble_layers 4,8,12,16
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from reward_models.train import RMTrainConfig, run_rm_train, train_one
from rlhf.config import build_config
from rlhf.rewards import load_reward_fn

PRESET = Path(__file__).resolve().parents[1] / "configs" / "rm_smollm2.yaml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rankings", required=True, help="rankings JSONL, e.g. the quickstart's simulate output")
    ap.add_argument("--config", default=str(PRESET), help="reward-model config (default: the SmolLM2 preset)")
    ap.add_argument("--members", type=int, default=4, help="ensemble members")
    ap.add_argument(
        "--ensemble_layers",
        default="",
        help="each member's depth, cycled, comma-separated (e.g. 4,8,12,16; 0 = all layers); "
        "default: every member at the config's depth",
    )
    args = ap.parse_args(argv)
    if args.members < 2:
        ap.error(f"--members {args.members}: an ensemble needs at least 2 members to share anything")
    try:
        depths = [int(d) for d in args.ensemble_layers.split(",")] if args.ensemble_layers else []
    except ValueError:
        ap.error(
            f"--ensemble_layers {args.ensemble_layers!r}: give whole numbers separated by commas, e.g. 4,8,12"
        )

    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(
            RMTrainConfig,
            args.config,
            {
                "rankings": args.rankings,
                "ensemble": args.members,
                "ensemble_layers": depths,
                "runs_dir": tmp,
                "tracking": {"mode": "disabled"},
            },
        )
        t0 = time.perf_counter()
        shared_dirs = _member_dirs(run_rm_train(cfg)["model_dir"], args.members)
        shared_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        own_dirs = []
        for i in range(args.members):
            layers = depths[i % len(depths)] if depths else cfg.layers
            member = dataclasses.replace(cfg, ensemble=1, seed=cfg.seed + i, layers=layers, out="")
            own_dirs.append(train_one(member, cfg.seed, f"baseline/member-{i}")["model_dir"])
        own_s = time.perf_counter() - t0

        same = all(_same_weights(a, b) for a, b in zip(shared_dirs, own_dirs, strict=True))
    print(f"\nensemble of {args.members}, members share the frozen states: {shared_s:7.1f} s")
    print(f"the same members, each computing its own:         {own_s:7.1f} s")
    print(
        f"ratio {own_s / shared_s:.2f}x; every member's weights identical both ways: {'yes' if same else 'NO'}"
    )
    return 0 if same else 1


def _member_dirs(ensemble_dir: str, members: int) -> list[str]:
    return [str(Path(ensemble_dir) / f"member-{i}") for i in range(members)]


def _same_weights(dir_a: str, dir_b: str) -> bool:
    a, b = (load_reward_fn(d).model.state_dict() for d in (dir_a, dir_b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


if __name__ == "__main__":
    raise SystemExit(main())
