"""RingSFTTrainer: TRL's SFTTrainer with sequence parallelism over the ring (needs ``pip install trl``).

    sp = setup_sequence_parallel(sp_size=2, model=model)
    trainer = RingSFTTrainer(model=model, args=SFTConfig(..., max_length=32768), train_dataset=ds,
                             processing_class=tokenizer, sequence_parallel=sp)
    trainer.train()

TRL prepares the dataset as usual (text, conversational "messages" with ``assistant_only_loss``,
prompt-completion with ``completion_only_loss``, LoRA through ``peft_config``): every example becomes
``input_ids`` and ``labels`` with -100 where there is no loss. What changes:
  * Packing is RingCollator's (the default collator here: rows of ``max_length`` tokens, rounded up to a
    multiple of 2 * sp_size, documents kept apart by segment ids and positions restarting per document). TRL's
    own packing and padding-free collator are refused: TRL refuses its packing with a custom collator and with
    context parallelism, and its padding-free batches are not sharded.
  * Data: the sampler is per data-parallel rank (``RingTrainerMixin``), so the ranks of a sequence group cut
    one batch; the model checks it (``sequence_fingerprint``).
  * Loss: TRL's own (its fused LM head scores ``shift_labels`` as given), which is each rank's part of the
    global batch: DDP's average over the world then gives the exact token mean, as in one process. So, unlike
    ``RingTrainer``, no correction by sp_size. Label smoothing and ``compute_loss_func`` read unshifted labels and
    full logits, which a shard does not have: refused at sp_size > 1.
"""

from __future__ import annotations

import trl
from packaging.version import Version
from trl import SFTConfig, SFTTrainer

from ringlwm.hf.collator import RingCollator
from ringlwm.hf.parallel import SequenceParallel
from ringlwm.hf.trainer import RingTrainerMixin

if Version(trl.__version__) < Version("1.16"):
    raise ImportError(f"RingSFTTrainer needs trl >= 1.16 (its fused loss scores pre-shifted shift_labels), found "
                      f"{trl.__version__}: pip install 'trl>=1.16'")


class RingSFTTrainer(RingTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` for a model on the ring (module docstring). sequence_parallel: the groups from
    ``setup_sequence_parallel``. data_collator: default ``RingCollator(sp, seq_len=max_length rounded up to a
    multiple of 2 * sp_size, pad_id=the tokenizer's)``; another must shard as RingCollator does."""

    def __init__(self, model, args: SFTConfig | None = None, data_collator=None, *, sequence_parallel: SequenceParallel,
                 processing_class=None, **kwargs):
        sp = sequence_parallel
        if args is not None and (args.packing or args.padding_free):
            raise ValueError(
                "RingSFTTrainer packs with ringlwm.hf.RingCollator: set SFTConfig(packing=False, padding_free=False). "
                "RingCollator places whole documents into rows of max_length tokens with positions restarting and "
                "segment ids per document (the ring keeps them apart); TRL's packing cannot be combined with a "
                "sharding collator or with sequence parallelism"
            )
        if sp.sequence_size > 1 and args is not None and args.label_smoothing_factor:
            raise ValueError("label smoothing reads full logits with unshifted labels, which a zigzag shard does not "
                             "have: set label_smoothing_factor=0 with sp_size > 1")
        if sp.sequence_size > 1 and kwargs.get("compute_loss_func") is not None:
            raise ValueError("compute_loss_func gets unshifted labels and this rank's logits only: with sp_size > 1 "
                             "use TRL's loss (loss_type 'nll' or 'dft')")
        if data_collator is None:
            pad_id = getattr(processing_class, "pad_token_id", None)
            data_collator = RingCollator(sp, pad_id=0 if pad_id is None else pad_id)
            max_length = None if args is None else args.max_length
            if max_length is not None:
                data_collator = RingCollator(sp, seq_len=-(-max_length // data_collator.unit) * data_collator.unit,
                                             pad_id=data_collator.pad_id)
        super().__init__(model, args, data_collator, processing_class=processing_class, sequence_parallel=sp,
                         **kwargs)
