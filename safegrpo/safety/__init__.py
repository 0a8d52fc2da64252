"""The SafeGRPO task: the rule reward (pure Python), refusal judges, the step-guided prompt."""
