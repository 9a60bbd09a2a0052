"""A Hugging Face Trainer script with ringlwm.hf, run by the tests under torchrun (or one plain process).

    torchrun --standalone --nproc_per_node 2 tests/hf/train_script.py --sp 2 --ga 2 --out result.json

Tiny random Llama, tiny random dataset of documents of uneven length. Rank 0 writes the logged per-step
losses and grad norms; a one-process run (--reference) also writes the true mean loss of each step's
examples, computed by a plain LlamaForCausalLM (eager) on the step's starting weights, document by document.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler
from transformers import LlamaForCausalLM, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for tiny_models
from tiny_models import tiny_llama_config  # noqa: E402

from ringlwm.hf import RingCollator, RingTrainer, setup_sequence_parallel  # noqa: E402
from ringlwm.models import RingLlamaForCausalLM  # noqa: E402

VOCAB, NUM_EXAMPLES = 64, 24


def dataset():
    gen = torch.Generator().manual_seed(1)
    examples = []
    for _ in range(NUM_EXAMPLES):
        n = int(torch.randint(5, 30, (1,), generator=gen))
        ids = torch.randint(1, VOCAB, (n,), generator=gen)
        labels = ids.clone()
        labels[: n // 4] = -100  # a prompt without loss
        examples.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return examples


def build_model(kind: str):
    torch.manual_seed(0)
    config = tiny_llama_config(vocab_size=VOCAB)
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
        self.losses, self.grad_norms = [], []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])
            self.grad_norms.append(logs.get("grad_norm"))


class TrueLoss(TrainerCallback):
    """The true mean target loss of each step's examples, by an eager LlamaForCausalLM, document by document."""

    def __init__(self, data, model, per_step):
        self.data, self.model, self.per_step, self.values = data, model, per_step, []
        sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
        sampler.set_epoch(0)
        self.order = list(sampler)

    def on_step_begin(self, args, state, control, **kwargs):
        eager = LlamaForCausalLM(tiny_llama_config(vocab_size=VOCAB))
        eager.load_state_dict(self.model.state_dict())
        total, count = 0.0, 0
        with torch.no_grad():
            for i in self.order[state.global_step * self.per_step:(state.global_step + 1) * self.per_step]:
                ids = torch.tensor(self.data[i]["input_ids"])[None]
                labels = torch.tensor(self.data[i]["labels"])
                logits = eager(input_ids=ids).logits[0, :-1]
                total += F.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum").item()
                count += int((labels[1:] != -100).sum())
        self.values.append(total / count)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sp", type=int, default=1)
    parser.add_argument("--ga", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4, help="examples per data-parallel rank per micro-batch")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", default="ring", choices=["ring", "plain", "lora"])
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    args = TrainingArguments(output_dir=str(Path(opts.out).parent / "trainer"), per_device_train_batch_size=opts.batch,
                             gradient_accumulation_steps=opts.ga, max_steps=opts.steps, learning_rate=5e-3,
                             lr_scheduler_type="constant", logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no", seed=0, disable_tqdm=True, dataloader_drop_last=True)
    _ = args.world_size  # brings up torch.distributed under torchrun
    model = build_model(opts.model)
    sp = setup_sequence_parallel(opts.sp, model=model)
    data = dataset()
    record = Record()
    callbacks = [record]
    if opts.reference:
        callbacks.append(TrueLoss(data, model, opts.batch * opts.ga * sp.dp_size))
    trainer = RingTrainer(model=model, args=args, train_dataset=data, data_collator=RingCollator(sp, seq_len=None),
                          sequence_parallel=sp, callbacks=callbacks)
    trainer.train()
    if args.process_index == 0:
        result = {"losses": record.losses, "grad_norms": record.grad_norms}
        if opts.reference:
            result["true"] = callbacks[1].values
        Path(opts.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
