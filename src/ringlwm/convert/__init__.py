"""ringlwm.convert: converters from the original LWM (JAX/Flax) checkpoints to ringlwm's PyTorch modules."""
