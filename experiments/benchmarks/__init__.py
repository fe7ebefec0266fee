"""Benchmark scripts, each run from the repository root as ``.venv/bin/python -m
experiments.benchmarks.<name>``: the rollout sampler against ``model.generate``
(``bench_generation``), reward models (``bench_rm_learning``, ``bench_rm_vs_trl``) and PPO
(``bench_ppo_vs_trl``) against TRL, and the annotation app under load and crashes
(``bench_annotation_load``, ``bench_annotation_crash``). ``experiments/README.md`` has their results.
"""
