"""PPO for RLHF: the math (:mod:`rlhf.ppo.math`), the loop (:mod:`rlhf.ppo.loop`), checkpoints, the value model."""
