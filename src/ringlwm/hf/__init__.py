"""ringlwm.hf: sequence parallelism over the ring inside a Hugging Face training script.

    parallel.py   setup_sequence_parallel(sp_size, model): dp x sp groups, the model's attention on the ring
    collator.py   RingCollator: packing, positions per document, targets shifted before sharding, zigzag shard
    trainer.py    RingTrainer: transformers' Trainer reading per data-parallel rank, exact global-batch loss

See the README's "Hugging Face Trainer" section for a complete script (torchrun, DDP).
"""

from ringlwm.hf.collator import RingCollator
from ringlwm.hf.parallel import SequenceParallel, setup_sequence_parallel
from ringlwm.hf.trainer import RingTrainer

__all__ = ["RingCollator", "RingTrainer", "SequenceParallel", "setup_sequence_parallel"]
