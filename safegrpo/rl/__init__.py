"""The generic GRPO engine: the math (grpo.py), fused log-probs, the prompt-once forward, the
lean decode step, the rollout and its sampler. Nothing here knows about safety."""
