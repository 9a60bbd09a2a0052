"""RingTrainer: transformers' Trainer with sequence parallelism over the ring.

    sp = setup_sequence_parallel(sp_size=2, model=model)
    trainer = RingTrainer(model=model, args=args, train_dataset=ds, data_collator=RingCollator(sp, seq_len=4096),
                          sequence_parallel=sp)
    trainer.train()

What it changes, and why (everything else is the stock Trainer, DDP included):
  * Data: the ranks of one sequence group must read the same examples (each keeps its zigzag shard, cut
    by the collator); the stock loader gives every rank of the world different ones. Here a
    ``DistributedSampler`` over the *data-parallel* ranks (shuffled with ``args.seed``, reshuffled per epoch).
  * Loss and gradients, as transformers computes them with gradient accumulation: each micro-batch's loss
    is its weighted target sum over ``num_items_in_batch``, the target count of the whole step over every
    rank (the Trainer gathers it; ``average_tokens_across_devices`` must stay True), times the world size;
    DDP averages the gradients over the world. The update is the gradient of the exact token mean of the
    global batch, whatever the dp/sp/accumulation split.
  * Logging: a ringlwm model's loss is the same number on every rank of its sequence group (the group's
    sum), so the logged value is divided by sp_size: the Trainer's mean over the world is then the true
    mean loss of the step. A plain transformers model (``enable_ring``) returns each rank's own part and
    needs no correction.

Evaluation uses the same data-parallel loader (unshuffled). FSDP through accelerate is not covered here
(see the README: CPU runs use DDP).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers import Trainer

from ringlwm.hf.parallel import SequenceParallel


class _EpochLoader(DataLoader):
    """A DataLoader whose ``set_epoch`` reaches its DistributedSampler (the Trainer calls it per epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


class RingTrainer(Trainer):
    """``transformers.Trainer`` for a model on the ring (module docstring). sequence_parallel: the groups from
    ``setup_sequence_parallel`` (the model's attention must already use its sp group)."""

    def __init__(self, *args, sequence_parallel: SequenceParallel, **kwargs):
        super().__init__(*args, **kwargs)
        self.sequence_parallel = sp = sequence_parallel
        if sp.world_size != self.args.world_size:
            raise ValueError(f"sequence_parallel covers {sp.world_size} ranks (dp {sp.dp_size} x sp {sp.sp_size}) "
                             f"but the Trainer runs on {self.args.world_size}; build it after TrainingArguments, "
                             "in the same processes")
        if sp.world_size > 1 and not self.args.average_tokens_across_devices:
            raise ValueError("RingTrainer needs average_tokens_across_devices=True: the loss divides by the target "
                             "count of the whole step over every rank")
        model = self._unwrapped()
        if getattr(model.config, "_attn_implementation", None) != "ringlwm_ring":
            raise ValueError("the model's attention is not on the ring: call setup_sequence_parallel(sp_size, "
                             "model=model) or ringlwm.models.enable_ring(model, sp_group=sp.sp_group) first")
        from ringlwm.models import RingLlamaForCausalLM
        from ringlwm.models.families import attention_modules

        if any(getattr(m, "ringlwm_sp_group", None) is not sp.sp_group for m in attention_modules(model)):
            raise ValueError("the model's ring runs over another group than sequence_parallel.sp_group; call "
                             "setup_sequence_parallel(sp_size, model=model) or enable_ring with sp.sp_group")
        # A ringlwm model's loss is its whole sequence group's (see the module docstring).
        self._group_loss = isinstance(model, RingLlamaForCausalLM)

    def _unwrapped(self):
        model = self.accelerator.unwrap_model(self.model)
        base = getattr(model, "base_model", None)  # PEFT: PeftModel -> LoraModel -> the transformers model
        return getattr(base, "model", model) if base is not None and base is not model else model

    def _dp_loader(self, dataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        sp = self.sequence_parallel
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise ValueError("RingTrainer reads map-style datasets (it samples them per data-parallel rank); "
                             "materialise an IterableDataset first")
        sampler = DistributedSampler(dataset, num_replicas=sp.dp_size, rank=sp.dp_rank, shuffle=shuffle,
                                     seed=self.args.seed, drop_last=drop_last)
        return _EpochLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=self.data_collator,
                            drop_last=drop_last, num_workers=self.args.dataloader_num_workers,
                            pin_memory=self.args.dataloader_pin_memory)

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("RingTrainer: training requires a train_dataset")
        return self._dp_loader(self.train_dataset, self._train_batch_size, True, self.args.dataloader_drop_last)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, dict):
            raise ValueError("RingTrainer evaluates one dataset at a time")
        if dataset is None:
            raise ValueError("RingTrainer: evaluation requires an eval_dataset")
        return self._dp_loader(dataset, self.args.eval_batch_size, False, self.args.dataloader_drop_last)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        return loss / self.sequence_parallel.sp_size if self._group_loss else loss
