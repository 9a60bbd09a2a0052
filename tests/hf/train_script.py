"""A Hugging Face Trainer script with ringlwm.hf, run by the tests under torchrun (or one plain process).

    torchrun --standalone --nproc_per_node 2 tests/hf/train_script.py --sp 2 --ga 2 --out result.json

Tiny random Llama, tiny random dataset of documents of uneven length (or, with --trainer sft, text, chat or
prompt-completion data through TRL's dataset preparation and a character tokenizer). Rank 0 writes the logged
per-step losses and grad norms (and with --eval the eval_loss before and after training); a one-process run
(--reference) also writes the true mean loss of each step's examples (and of each eval batch), computed in fp64
by a plain LlamaForCausalLM (eager) on the step's starting weights, document by document. A run that raises
writes the error message instead ({"error": ...}) and exits 0, so that tests can read what every rank said.

Variants: --trainer ring|stock|sft (RingTrainer, transformers.Trainer, RingSFTTrainer), --collator ring|hf
(RingCollator or transformers' DataCollatorForLanguageModeling), --trainer trl (TRL's own SFTTrainer), --model ring|plain|lora, --bf16 (fp32 master
weights, bf16 autocast), --fsdp (accelerate's FSDP2 through TrainingArguments).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from transformers import LlamaForCausalLM, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for tiny_models
from tiny_models import tiny_chat_tokenizer, tiny_llama_config  # noqa: E402

from ringlwm.hf import RingCollator, RingTrainer, setup_sequence_parallel  # noqa: E402
from ringlwm.models import RingLlamaForCausalLM  # noqa: E402

VOCAB, NUM_EXAMPLES, SFT_VOCAB = 64, 24, 80


def dataset(seed: int = 1, count: int = NUM_EXAMPLES):
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for _ in range(count):
        n = int(torch.randint(5, 30, (1,), generator=gen))
        ids = torch.randint(1, VOCAB, (n,), generator=gen)
        labels = ids.clone()
        labels[: n // 4] = -100  # a prompt without loss
        examples.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return examples


def sft_dataset(kind: str, seed: int = 2, count: int = NUM_EXAMPLES):
    """TRL datasets of random words: "text", conversational "chat" (with a system-free user/assistant turn), or
    "prompt_completion"."""
    from datasets import Dataset

    gen = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"

    def words(lo, hi):
        n = int(torch.randint(lo, hi, (1,), generator=gen))
        return " ".join("".join(letters[int(i)] for i in torch.randint(0, 26, (int(torch.randint(1, 5, (1,),
                        generator=gen)),), generator=gen)) for _ in range(n))

    rows = []
    for _ in range(count):
        question, answer = words(1, 5), words(1, 5)
        if kind == "text":
            rows.append({"text": question + ". " + answer})
        elif kind == "chat":
            rows.append({"messages": [{"role": "user", "content": question},
                                      {"role": "assistant", "content": answer}]})
        else:
            rows.append({"prompt": question, "completion": " " + answer})
    return Dataset.from_list(rows)


def build_model(kind: str, vocab: int):
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=vocab)
    if kind == "ring":
        return RingLlamaForCausalLM(config)
    model = LlamaForCausalLM(config)  # "plain" and "lora": transformers' own model, put on the ring
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                 lora_dropout=0.0, init_lora_weights=False))
    return model


class Record(TrainerCallback):
    def __init__(self):
        self.losses, self.grad_norms, self.eval_losses = [], [], []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])
            self.grad_norms.append(logs.get("grad_norm"))
        if logs and "eval_loss" in logs:
            self.eval_losses.append(logs["eval_loss"])


def true_mean(model, vocab, examples) -> float:
    """The mean target loss of ``examples`` (input_ids, unshifted labels), fp64, eager, document by document."""
    eager = LlamaForCausalLM(tiny_llama_config(vocab_size=vocab)).double()
    state = {k.removeprefix("base_model.model."): v for k, v in _merged_state(model).items()}
    eager.load_state_dict({k: v.double() for k, v in state.items()})
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids = torch.tensor(example["input_ids"])[None]
            labels = torch.tensor(example["labels"])
            logits = eager(input_ids=ids).logits[0, :-1]
            total += F.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum").item()
            count += int((labels[1:] != -100).sum())
    return total / count


def _merged_state(model) -> dict:
    """Plain Llama weights of ``model`` (a PEFT model: its LoRA merged into a copy)."""
    if hasattr(model, "merge_and_unload"):
        import copy

        return copy.deepcopy(model).merge_and_unload().state_dict()
    return model.state_dict()


class TrueLoss(TrainerCallback):
    """The true mean target loss of each step's examples (``true_mean``), in the sampler's order at dp=1."""

    def __init__(self, model, vocab, per_step):
        self.model, self.vocab, self.per_step, self.values, self.data = model, vocab, per_step, [], None

    def on_step_begin(self, args, state, control, **kwargs):
        sampler = DistributedSampler(self.data, num_replicas=1, rank=0, shuffle=True, seed=0)
        sampler.set_epoch(0)
        order = list(sampler)[state.global_step * self.per_step:(state.global_step + 1) * self.per_step]
        self.values.append(true_mean(self.model, self.vocab, [self.data[i] for i in order]))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sp", type=int, default=1)
    parser.add_argument("--ulysses", type=int, default=1)
    parser.add_argument("--ga", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4, help="examples per data-parallel rank per micro-batch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", default="ring", choices=["ring", "plain", "lora"])
    parser.add_argument("--trainer", default="ring", choices=["ring", "stock", "sft", "trl"])
    parser.add_argument("--collator", default="ring", choices=["ring", "hf"])
    parser.add_argument("--data", default="chat", choices=["text", "chat", "prompt_completion"])
    parser.add_argument("--seq-len", type=int, default=None, help="RingCollator's row length (None: per batch)")
    parser.add_argument("--eval", action="store_true")
    parser.add_argument("--padding-free", action="store_true", help="TRL packing (bfd, padding-free; --trainer trl)")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--force-fsdp-on-cpu", action="store_true",
                        help="switch accelerate's state to FSDP2 after the Trainer is built (accelerate runs FSDP on "
                             "accelerators only): its FSDP2 preparation then runs on gloo")
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    try:
        result = run(opts)
    except Exception as exc:  # every rank writes what it raised; the test compares them
        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0 or "error" in result:
        Path(f"{opts.out}.rank{rank}" if "error" in result else opts.out).write_text(json.dumps(result))


def run(opts) -> dict:
    common = dict(output_dir=str(Path(opts.out).parent / "trainer"), per_device_train_batch_size=opts.batch,
                  per_device_eval_batch_size=2, gradient_accumulation_steps=opts.ga, max_steps=opts.steps,
                  learning_rate=5e-3, lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True,
                  save_strategy="no", seed=0, disable_tqdm=True, dataloader_drop_last=True, bf16=opts.bf16)
    if opts.fsdp:
        common.update(fsdp=True, fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                              "cpu_ram_efficient_loading": False})
    if opts.trainer in ("sft", "trl"):
        from trl import SFTConfig

        args = SFTConfig(**common, max_length=64, packing=opts.padding_free, assistant_only_loss=opts.data == "chat",
                         padding_free=opts.padding_free)
    else:
        args = TrainingArguments(**common)
    _ = args.world_size  # brings up torch.distributed under torchrun
    vocab = SFT_VOCAB if opts.trainer in ("sft", "trl") else VOCAB
    model = build_model(opts.model, vocab)
    sp = setup_sequence_parallel(opts.sp, model=model, ulysses_size=opts.ulysses)
    record = Record()
    callbacks = [record]
    true = TrueLoss(model, vocab, opts.batch * opts.ga * sp.dp_size) if opts.reference else None
    if true is not None:
        callbacks.append(true)
    if opts.collator == "ring":
        collator = RingCollator(sp, seq_len=opts.seq_len)
    else:
        from transformers import DataCollatorForLanguageModeling

        # lengths that split into zigzag chunks: the ring would run, on whole batches as if they were shards
        collator = DataCollatorForLanguageModeling(tokenizer=tiny_chat_tokenizer(), mlm=False, pad_to_multiple_of=4)
    eval_data = dataset(seed=7, count=8) if opts.eval else None
    if opts.trainer == "sft":
        from ringlwm.hf import RingSFTTrainer

        data = sft_dataset(opts.data)
        trainer = RingSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_chat_tokenizer(),
                                 sequence_parallel=sp, callbacks=callbacks)
        data = trainer.train_dataset
    elif opts.trainer == "trl":  # TRL's own SFTTrainer, used the obvious way on a model on the ring
        from trl import SFTTrainer

        data = sft_dataset(opts.data)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_chat_tokenizer(),
                             callbacks=callbacks)
    elif opts.trainer == "stock":
        from transformers import Trainer

        data = dataset()
        if opts.collator == "hf":
            data = [{"input_ids": e["input_ids"]} for e in data]
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator, callbacks=callbacks)
    else:
        data = dataset()
        if opts.collator == "hf":  # as a usual script has them: the collator makes labels from input_ids
            data = [{"input_ids": e["input_ids"]} for e in data]
        trainer = RingTrainer(model=model, args=args, train_dataset=data, eval_dataset=eval_data,
                              data_collator=collator, sequence_parallel=sp, callbacks=callbacks)
    if true is not None:
        true.data = data
    if opts.force_fsdp_on_cpu:
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        state = trainer.accelerator.state
        state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                                           cpu_ram_efficient_loading=False)
        state.distributed_type = DistributedType.FSDP
        trainer.is_fsdp_enabled = True
    result = {}
    if opts.eval:
        result["eval_loss_before"] = trainer.evaluate()["eval_loss"]
        if opts.reference:  # eval batches of 2 examples, one packed row each: the mean of the batch means
            batches = [eval_data[i:i + 2] for i in range(0, len(eval_data), 2)]
            result["true_eval_loss"] = sum(true_mean(model, vocab, b) for b in batches) / len(batches)
    trainer.train()
    result.update(losses=record.losses, grad_norms=record.grad_norms, fsdp=bool(trainer.is_fsdp_enabled),
                  model_class=type(trainer.model_wrapped).__name__)
    if opts.eval:
        result["eval_loss_after"] = trainer.evaluate()["eval_loss"]
    if true is not None:
        result["true"] = true.values
    return result


if __name__ == "__main__":
    main()
