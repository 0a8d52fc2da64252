"""SafeGRPO: multimodal safety alignment with GRPO and a rule-governed reward."""
__version__ = "0.1.0"
