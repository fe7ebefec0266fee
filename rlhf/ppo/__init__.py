"""PPO for RLHF: the loop (:mod:`rlhf.ppo.loop`), its set-up, config, prompts and metrics, the math
(:mod:`rlhf.ppo.math`), rollouts, the value model and checkpoints."""
