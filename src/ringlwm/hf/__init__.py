"""ringlwm.hf: sequence parallelism over the ring inside a Hugging Face training script.

    parallel.py   setup_sequence_parallel(sp_size, model): dp x sp groups, the model's attention on the ring
    collator.py   RingCollator: packing, positions per document, targets shifted before sharding, zigzag shard,
                  and a fingerprint of each full row (the model checks that its sequence group cut one batch)
    trainer.py    RingTrainer: transformers' Trainer reading per data-parallel rank, exact global-batch loss;
                  RingTrainerMixin: the same for any Trainer subclass
    sft.py        RingSFTTrainer: TRL's SFTTrainer on the ring (imported on first use; needs trl)

See the README's "Hugging Face Trainer" section for a complete script (torchrun, DDP or FSDP2).
"""

from ringlwm.hf.collator import RingCollator
from ringlwm.hf.parallel import SequenceParallel, setup_sequence_parallel
from ringlwm.hf.trainer import RingTrainer, RingTrainerMixin
from ringlwm.ring.agreement import sequence_fingerprint

__all__ = ["RingCollator", "RingSFTTrainer", "RingTrainer", "RingTrainerMixin", "SequenceParallel",
           "sequence_fingerprint", "setup_sequence_parallel"]


def __getattr__(name):
    if name == "RingSFTTrainer":  # TRL is optional: imported when asked for
        from ringlwm.hf.sft import RingSFTTrainer

        return RingSFTTrainer
    raise AttributeError(f"module 'ringlwm.hf' has no attribute {name!r}")
