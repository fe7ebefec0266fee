"""Benchmark: the lab's PPO against TRL's last PPOTrainer (``trl==1.12.0``, ``trl.experimental.ppo``).

Same SmolLM2-135M-Instruct policy, same reward model, same prompts (``lab:prompts`` train split,
SmolLM2 chat template), batch 16, 24-token responses, 1 PPO epoch, one minibatch of 16 as two
micro-batches of 8, fp32 on both sides, missing-EOS penalty 1, β = 0.05 (k1). Three runs:

1. TRL 1.12 PPOTrainer: full fine-tuning, separate value model (initialised from the reward model);
2. ours at identical algorithmic settings (full fine-tuning, separate critic from the reward model);
3. ours in the lab's recommended CPU configuration (LoRA policy, value head on the policy backbone).

Where the CPU has bf16 (AVX512-BF16 or AMX; ``rlhf.models.bf16_hardware``) a fourth run is ours
as in 3 with ``mixed_precision: bf16``. ``--only trl_bf16`` adds TRL with ``bf16=True`` (its own
default), and the bf16 row is then compared with it. On this CPU that run's scores were
bit-identical to TRL's fp32 run, so TRL's flag changes nothing there and the default compares
the bf16 row with TRL fp32.

Prints episodes/s of each (wall time of the training loop, model loading excluded), the ratios to
TRL in the same precision, and each run's mean reward-model score over its first and last update.

TRL 1.12 lives in its own virtual environment (TRL 1.16, which the lab uses, removed PPO). It is
created once, sharing the lab's other packages::

    python3 -m venv .venv-trl112
    echo "$PWD/.venv/lib/python3.11/site-packages" > .venv-trl112/lib/python3.11/site-packages/_lab_venv.pth
    .venv-trl112/bin/pip install --no-deps trl==1.12.0

Run (a few minutes per update on 2 CPU cores; keep the machine otherwise idle)::

    .venv/bin/python -m experiments.benchmarks.bench_ppo_vs_trl --updates 3 [--reward-model runs/quickstart/rm_train/model]

Without ``--reward-model`` an untrained SmolLM2 reward model (random head) is built once: the
throughput is the same; the reward gains are then meaningless, so pass a trained one for those.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rlhf.offline import set_offline_defaults  # imports nothing heavy

# Set before the imports below: the Hugging Face libraries read them when first imported.
set_offline_defaults()

# (none of these imports TRL: the TRL worker runs this file in .venv-trl112, under TRL 1.12)
from reward_models.model import build_reward_model  # noqa: E402
from rlhf.config import build_config  # noqa: E402
from rlhf.data import load_prompts  # noqa: E402
from rlhf.models import bf16_hardware, format_prompt, load_policy  # noqa: E402
from rlhf.ppo.loop import PPOConfig, run_ppo  # noqa: E402
from rlhf.reward_model import save_reward_model  # noqa: E402
from rlhf.tracking import read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TRL_VENV = ROOT / ".venv-trl112"
BATCH, MICRO, RESPONSE_LENGTH = 16, 8, 24
SETUP = (
    'python3 -m venv .venv-trl112 && echo "$PWD/.venv/lib/python3.11/site-packages" > '
    ".venv-trl112/lib/python3.11/site-packages/_lab_venv.pth && .venv-trl112/bin/pip install --no-deps trl==1.12.0"
)


def ensure_reward_model(out: Path) -> Path:
    if (out / "rlhf_reward.json").exists():
        return out
    print(f"building an untrained SmolLM2 reward model in {out} (throughput only)", flush=True)
    model, tok = build_reward_model("smollm2-135m-instruct", trainable="full", seed=0)
    save_reward_model(
        model,
        tok,
        out,
        {
            "normalization": {"offset": 0.0, "scale": 1.0},
            "max_length": 256,
            "base": "smollm2-135m-instruct",
            "loss": "untrained",
        },
    )
    return out


def trl_worker(rm_dir: str, updates: int, out_json: str, bf16: bool = False) -> None:
    """Runs inside .venv-trl112: TRL 1.12's PPOTrainer; writes timings and scores as JSON."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    # TRL 1.12 exists only in that venv, and PPOConfig here is TRL's, not the lab's
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig as TRLPPOConfig
    from trl.experimental.ppo import PPOTrainer

    assert trl.__version__ == "1.12.0", trl.__version__
    torch.manual_seed(0)
    policy, tok = load_policy("smollm2-135m-instruct")
    ref, _ = load_policy("smollm2-135m-instruct")
    value = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, dtype=torch.float32)
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id
    prompts = load_prompts("lab:prompts", split="train")
    ids = [tok(format_prompt(tok, p["prompt"]), add_special_tokens=False)["input_ids"] for p in prompts]
    ds = Dataset.from_dict({"input_ids": ids})
    args = TRLPPOConfig(
        output_dir=str(Path(out_json).parent / "trl_out"),
        total_episodes=updates * BATCH,
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=BATCH // MICRO,
        num_mini_batches=1,
        num_ppo_epochs=1,
        response_length=RESPONSE_LENGTH,
        temperature=0.7,
        stop_token="eos",
        missing_eos_penalty=1.0,
        kl_coef=0.05,
        learning_rate=3e-6,
        local_rollout_forward_batch_size=BATCH,
        bf16=bf16,  # TRL's default is True; the bench states it either way
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        num_sample_generations=0,
        seed=0,
        dataloader_num_workers=0,
    )
    scores: list[float] = []

    class Scores(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "objective/scores" in logs:
                scores.append(float(logs["objective/scores"]))

    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        train_dataset=ds,
        value_model=value,
        callbacks=[Scores()],
    )
    t0 = time.time()
    trainer.train()
    wall = time.time() - t0
    Path(out_json).write_text(json.dumps({"episodes": updates * BATCH, "wall_s": wall, "scores": scores}))


def run_trl(rm_dir: Path, updates: int, work: Path, bf16: bool = False) -> dict | None:
    py = TRL_VENV / "bin" / "python"
    if not py.exists():
        print(f"TRL 1.12 venv missing; create it with:\n  {SETUP}")
        return None
    out = work / ("trl_bf16.json" if bf16 else "trl.json")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    subprocess.run(
        [
            str(py),
            __file__,
            "--trl-worker",
            "--reward-model",
            str(rm_dir),
            "--updates",
            str(updates),
            "--out",
            str(out),
            *(["--bf16"] if bf16 else []),
        ],
        check=True,
        env=env,
    )
    return json.loads(out.read_text())


def run_ours(rm_dir: Path, updates: int, work: Path, name: str, **over) -> dict:
    base = dict(
        policy="smollm2-135m-instruct",
        reward=str(rm_dir),
        prompts="lab:prompts",
        num_eval_prompts=0,
        total_episodes=updates * BATCH,
        batch_size=BATCH,
        minibatch_size=BATCH,
        micro_batch_size=MICRO,
        ppo_epochs=1,
        response_length=RESPONSE_LENGTH,
        temperature=0.7,
        missing_eos_penalty=1.0,
        kl_coef=0.05,
        learning_rate=3e-6,
        sample_every=0,
        runs_dir=str(work / "runs"),
        experiment=name,
        tracking={"mode": "disabled"},
        seed=0,
    )
    base.update(over)
    cfg = build_config(PPOConfig, None, base)
    run_ppo(cfg)
    lines = read_metrics(work / "runs" / name / "ppo")
    ups = [m for m in lines if "objective/scores" in m]
    wall = ups[-1]["_time"] - ups[0]["_time"] + BATCH / ups[0]["perf/episodes_per_s"]  # first update included
    return {
        "episodes": len(ups) * BATCH,
        "wall_s": wall,
        "scores": [m["objective/scores"] for m in ups],
        "generate_s": sum(m["time/generate_s"] for m in ups),
        "train_s": sum(m["time/train_s"] for m in ups),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--updates", type=int, default=3, help="PPO updates per run (16 episodes each)")
    ap.add_argument(
        "--reward-model", default="", help="reward-model dir (default: an untrained one, built once)"
    )
    ap.add_argument("--work", default="runs/bench_ppo_vs_trl", help="scratch folder")
    ap.add_argument(
        "--only",
        choices=("trl", "ours", "ours_lora", "trl_bf16", "ours_lora_bf16"),
        action="append",
        help="run only these (ours_lora_bf16 is on by default where the CPU has bf16; trl_bf16 only when asked)",
    )
    ap.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.trl_worker:
        trl_worker(a.reward_model, a.updates, a.out, bf16=a.bf16)
        return 0
    print(f"TRL 1.12 venv: {SETUP}")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    rm_dir = Path(a.reward_model) if a.reward_model else ensure_reward_model(work / "rm_untrained")
    # TRL's bf16=True run is not in the default set: on a CPU it computed exactly what its fp32
    # run did (bit-identical scores), so it would repeat minutes of work; `--only trl_bf16` runs it.
    todo = a.only or ["trl", "ours", "ours_lora"] + (["ours_lora_bf16"] if bf16_hardware("cpu") else [])
    results: dict[str, dict] = {}
    if "trl" in todo:
        r = run_trl(rm_dir, a.updates, work)
        if r:
            results["TRL 1.12 PPOTrainer (full FT, separate critic)"] = r
    if "ours" in todo:
        results["lab PPO (full FT, separate critic)"] = run_ours(
            rm_dir, a.updates, work, "ours_full", value_model="critic", critic_init="reward"
        )
    cpu_config = dict(lora=True, value_model="shared", learning_rate=3e-4)  # the lab's CPU configuration
    if "ours_lora" in todo:
        results["lab PPO (LoRA, shared value head)"] = run_ours(
            rm_dir, a.updates, work, "ours_lora", **cpu_config
        )
    # bf16 autocast (fp32 weights) on both sides, where the CPU has bf16: TRL's own default
    if "trl_bf16" in todo:
        r = run_trl(rm_dir, a.updates, work, bf16=True)
        if r:
            results["TRL 1.12 PPOTrainer, bf16 (full FT, critic)"] = r
    if "ours_lora_bf16" in todo:
        results["lab PPO, bf16 (LoRA, shared value head)"] = run_ours(
            rm_dir, a.updates, work, "ours_lora_bf16", mixed_precision="bf16", **cpu_config
        )
    # each run against TRL in the same precision (bf16 rows against TRL bf16, the rest against fp32)
    trl_eps: dict[bool, float] = {}
    for name, r in results.items():
        if name.startswith("TRL"):
            trl_eps["bf16" in name] = r["episodes"] / r["wall_s"]
    # Ours logs normalised scores ((raw - offset) / scale), TRL raw reward-model outputs; both
    # subtract the same missing-EOS penalty afterwards. Gains are put in raw units (× scale).
    meta = json.loads((rm_dir / "rlhf_reward.json").read_text())
    scale = float(meta.get("normalization", {}).get("scale", 1.0))
    print(
        f"\n{'run':<50} {'episodes/s':>10} {'× TRL':>7} {'score first → last':>22} {'gain, raw RM units':>20}"
    )
    for name, r in results.items():
        eps = r["episodes"] / r["wall_s"]
        base = trl_eps.get("bf16" in name) or trl_eps.get(False)  # bf16 rows: TRL bf16, else TRL fp32
        ratio = f"{eps / base:7.2f}" if base and not name.startswith("TRL") else "      -"
        sc = r["scores"]
        k = max(1, len(sc) // 3)  # mean of the last third of the updates minus the first third's
        gain = (
            (sum(sc[-k:]) - sum(sc[:k])) / k * (1.0 if name.startswith("TRL") else scale)
            if sc
            else float("nan")
        )
        r["gain_raw"] = gain
        print(
            f"{name:<50} {eps:10.3f} {ratio} {sc[0]:10.3f} → {sc[-1]:8.3f} {gain:20.3f}"
            if sc
            else f"{name:<50} {eps:10.3f} {ratio}"
        )
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nraw results: {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
