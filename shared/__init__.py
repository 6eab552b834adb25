"""rlft's core: config, rollout, rewards, advantages, objectives, the RL loop, checkpoints, logging."""
