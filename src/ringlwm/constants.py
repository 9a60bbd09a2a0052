"""The values that several layers must agree on, in one place (imports nothing)."""

IGNORE_INDEX = -100
"""A target without loss (transformers' and PyTorch's cross-entropy convention)."""

PAD_SEGMENT = -1
"""The segment id of padding: padding attends only padding and is attended by nothing."""

VISION_VOCAB_SIZE = 8448
"""LWM's vision vocabulary: 8192 VQGAN codes, then 256 special ids (<eof> 8192, <eov> 8193, ...)."""

FSDP_UNITS = ("layers", "model")
"""``parallel.fsdp_units``: one FSDP2 unit per decoder layer (and the input embeddings, and the root), or the
whole model one unit (ringlwm.parallel.parallelize.apply_fsdp)."""
