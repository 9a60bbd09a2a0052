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
  * Logging: every model on the ring (``RingLlamaForCausalLM``, or a transformers model through
    ``enable_ring``) returns its sequence group's loss, the same number on every rank of the group, so the
    value ``compute_loss`` returns is divided by sp_size (its gradient is not): the Trainer's mean over the
    world is then the true mean loss of the step, in training and in ``evaluate()`` alike.
  * Batch agreement: at sp_size > 1 every batch must come from ``RingCollator`` (it carries
    ``sequence_fingerprint``, which the model compares across the sequence group once per forward).

  * ``train()``: an ``evaluate()`` before it no longer leaves the model without DDP (transformers 5 marks the
    evaluation-prepared model as prepared; see ``_undo_evaluation_prepare``), and FSDP arguments that
    accelerate did not enable (it runs FSDP on accelerators only) are refused instead of training with DDP.

Evaluation uses the same data-parallel loader (unshuffled). ``RingTrainerMixin`` holds all of this but the
loss division, for other Trainer subclasses (``ringlwm.hf.sft.RingSFTTrainer``: TRL's loss is each rank's own
part and needs none).
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers import Trainer

from ringlwm.hf.parallel import SequenceParallel
from ringlwm.models.families import attention_modules, transformers_model
from ringlwm.models.hf_attention import bound_group, bound_ulysses
from ringlwm.ring.agreement import FINGERPRINT_KEY


class _EpochLoader(DataLoader):
    """A DataLoader whose ``set_epoch`` reaches its DistributedSampler (the Trainer calls it per epoch)."""

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


class RingTrainerMixin:
    """What every trainer feeding the ring needs on top of transformers' Trainer (or a subclass of it, such as
    TRL's SFTTrainer): loaders per data-parallel rank, checks that the model's ring is the sequence group's, and
    at sp_size > 1 batches cut by ``RingCollator``. Put it first among the bases; pass ``sequence_parallel``."""

    def __init__(self, *args, sequence_parallel: SequenceParallel, **kwargs):
        super().__init__(*args, **kwargs)
        self._check_ring(sequence_parallel)

    def _check_ring(self, sp: SequenceParallel) -> None:
        self.sequence_parallel = sp
        if sp.world_size != self.args.world_size:
            if self.args.world_size == 1 and not self.args.use_cpu and not torch.cuda.is_available():
                raise ValueError(f"sequence_parallel covers {sp.world_size} processes but the Trainer sees one: on a "
                                 "machine without a GPU, accelerate runs the Trainer as a single process unless "
                                 "TrainingArguments(..., use_cpu=True) is given (then it uses the gloo world that "
                                 "torchrun started)")
            raise ValueError(f"sequence_parallel covers {sp.world_size} ranks (dp {sp.dp_size} x sp {sp.sp_size} x "
                             f"ulysses {sp.ulysses_size}) "
                             f"but the Trainer runs on {self.args.world_size}; build it after TrainingArguments, "
                             "in the same processes")
        if sp.world_size > 1 and not self.args.average_tokens_across_devices:
            raise ValueError(f"{type(self).__name__} needs average_tokens_across_devices=True: the loss divides by "
                             "the target count of the whole step over every rank")
        model = transformers_model(self.accelerator.unwrap_model(self.model))
        if getattr(model.config, "_attn_implementation", None) != "ringlwm_ring":
            raise ValueError("the model's attention is not on the ring: call setup_sequence_parallel(sp_size, "
                             "model=model) or ringlwm.models.enable_ring(model, sp_group=sp.sp_group) first")

        missing = object()
        if any(bound_group(m, missing) is not sp.sp_group or bound_ulysses(m) is not sp.ulysses_group
               for m in attention_modules(model)):
            raise ValueError("the model's ring runs over other groups than sequence_parallel's sp_group and "
                             "ulysses_group; call setup_sequence_parallel(sp_size, model=model, ulysses_size=...) or "
                             "enable_ring with sp.sp_group and sp.ulysses_group")

    def train(self, *args, **kwargs):
        if self.args.fsdp and not self.is_fsdp_enabled:
            raise ValueError(
                f"TrainingArguments ask for FSDP (fsdp={self.args.fsdp!r}) but accelerate did not enable it: it runs "
                f"FSDP on accelerators only (distributed type here: {self.accelerator.distributed_type}), and the "
                "Trainer would silently train with DDP instead. On CPU drop the fsdp arguments (DDP is exact, "
                "unsharded); on GPUs launch with torchrun as usual and accelerate uses FSDP2 (fsdp_config="
                "{'fsdp_version': 2})"
            )
        self._undo_evaluation_prepare()
        return super().train(*args, **kwargs)

    def _undo_evaluation_prepare(self) -> None:
        """transformers 5 (with accelerate 1.x): ``evaluate()`` before ``train()`` prepares the model for
        evaluation (no DDP) and marks it prepared, so ``train()`` never wraps it in DDP and no gradient is reduced
        across ranks: each rank steps on its own part (on the ring, a sequence group's gradients are never summed)
        while the logged loss looks right. Undo that preparation so that ``train()`` wraps the model."""
        model = self.model
        if (self.args.world_size == 1 or self.is_fsdp_enabled or self.is_deepspeed_enabled
                or self.model_wrapped is not model or not getattr(model, "_is_accelerate_prepared", False)):
            return
        del model._is_accelerate_prepared
        if "_original_forward" in model.__dict__:  # the mixed-precision wrapper of the evaluation preparation
            model.forward = model.__dict__.pop("_original_forward")
        self.accelerator._models[:] = [m for m in self.accelerator._models if m is not model]

    def _dp_loader(self, dataset, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
        sp = self.sequence_parallel
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise ValueError(f"{type(self).__name__} reads map-style datasets (it samples them per data-parallel rank); "
                             "materialise an IterableDataset first")
        sampler = DistributedSampler(dataset, num_replicas=sp.dp_size, rank=sp.dp_rank, shuffle=shuffle,
                                     seed=self.args.seed, drop_last=drop_last)
        return _EpochLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=self.data_collator,
                            drop_last=drop_last, num_workers=self.args.dataloader_num_workers,
                            pin_memory=self.args.dataloader_pin_memory)

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError(f"{type(self).__name__}: training requires a train_dataset")
        return self._dp_loader(self.train_dataset, self._train_batch_size, True, self.args.dataloader_drop_last)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(dataset, dict):
            raise ValueError(f"{type(self).__name__} evaluates one dataset at a time")
        if dataset is None:
            raise ValueError(f"{type(self).__name__}: evaluation requires an eval_dataset")
        return self._dp_loader(dataset, self.args.eval_batch_size, False, self.args.dataloader_drop_last)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sp_size = self.sequence_parallel.sequence_size
        if sp_size > 1 and FINGERPRINT_KEY not in inputs:
            raise ValueError(
                f"{type(self).__name__} at sp_size x ulysses_size = {sp_size} got a batch without {FINGERPRINT_KEY!r} (keys: "
                f"{sorted(inputs)}): it was not cut by ringlwm.hf.RingCollator. The ring needs every rank's zigzag "
                "shard of one packed batch with shift_labels, position_ids and segment_ids; a usual Hugging Face "
                "collator gives every rank the whole batch. Pass data_collator=RingCollator(sp, seq_len=...)"
            )
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


class RingTrainer(RingTrainerMixin, Trainer):
    """``transformers.Trainer`` for a model on the ring (module docstring). sequence_parallel: the groups from
    ``setup_sequence_parallel`` (the model's attention must already use its sp group)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sp_size = self.sequence_parallel.sequence_size
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss, outputs = result if return_outputs else (result, None)
        if sp_size > 1:  # the group's loss on each of its ranks (sp x ulysses): the value once, the gradient as it is
            loss = loss + (loss.detach() / sp_size - loss.detach())
        return (loss, outputs) if return_outputs else loss
