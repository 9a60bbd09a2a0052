"""ringlwm.eval: long-context evaluation (needle in a haystack; lm-evaluation-harness through HF)."""
