"""The parts of ``rlhf experiment run`` (the command itself is :mod:`experiments.runner`).

``experiment_file`` (the YAML file: keys, stage kinds, overrides and presets, ``${stage.key}``
references, sweeps), ``plan`` (the file unrolled into stage instances with their wiring, rounds
included), ``run_context`` (one run of a plan: each stage's config, run dir and W&B run), ``cache``
(stage keys and stored results), ``validation`` (every problem found before the first stage runs),
``internal_stages`` (annotate and the closed loop's prompts / select / collect) and ``execution``
(running a plan, sweeps, summaries).
"""
