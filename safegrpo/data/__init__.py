"""Records and their loaders, SafeTag-Synth, Text-Safety, the tiny model and its tokenizer,
and the samplers that draw training prompts."""
