"""One RL step: experience building (padding, log-probs, KL, advantages), the policy update
(PPO, GRPO, TRPO) and the loop that drives rollout -> score -> advantages -> update -> sync."""
