"""Long-context generation: the prefill runs over the ring, the KV cache stays sharded across the ranks.

    torchrun --nproc_per_node=2 -m ringlwm.generate --model runs/demo/hf --tokenizer runs/demo/tok.model \\
        --prompt "Once upon a time" --max-new-tokens 32

Prompts of different lengths are left-padded to a multiple of 2 * world_size; padding has segment id -1
and is never attended, and each prompt's positions start at 0. Decoding is greedy by default; sampling
takes temperature / top-k / top-p. Rank 0 picks each token and broadcasts it, so the ranks never disagree.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from ringlwm.ring import shard_sequence, sp_world
from ringlwm.ring.decode import ShardedKVCache


def _group_src(group) -> int:
    return 0 if group is None else dist.get_global_rank(group, 0)


def _pick(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """(batch, vocab) -> (batch,) next tokens; greedy when temperature == 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) > top_p  # keep the first token past top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    sp_group: dist.ProcessGroup | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token_ids: tuple[int, ...] = (),
    stop_strings: tuple[str, ...] = (),
    tokenizer=None,
    seed: int = 0,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to ``max_new_tokens`` tokens.

    ``model`` is a RingLlamaForCausalLM (every rank of ``sp_group`` holds the full weights). A row stops
    at a token in ``stop_token_ids`` (kept in the output) or when its decoded continuation contains a
    stop string (needs ``tokenizer``; the output is cut before the string's tokens end). Returns the new
    tokens of each prompt; the same on every rank.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if stop_strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the output")
    rank, world = sp_world(sp_group)
    device = next(model.parameters()).device
    lengths = [len(p) for p in prompts]
    limit = model.config.max_position_embeddings
    if max(lengths) + max_new_tokens > limit:
        raise ValueError(f"prompt ({max(lengths)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_position_embeddings ({limit})")
    chunks = 2 * world
    padded = -(-max(lengths) // chunks) * chunks
    batch = len(prompts)
    ids = torch.zeros(batch, padded, dtype=torch.long)
    pos = torch.zeros(batch, padded, dtype=torch.long)
    seg = torch.full((batch, padded), -1, dtype=torch.long)
    for b, prompt in enumerate(prompts):
        ids[b, padded - len(prompt):] = torch.tensor(prompt)
        pos[b, padded - len(prompt):] = torch.arange(len(prompt))
        seg[b, padded - len(prompt):] = 0
    ids, pos, seg = (shard_sequence(t, dim=1, group=sp_group).to(device) for t in (ids, pos, seg))

    cache = ShardedKVCache(model.config.num_hidden_layers, sp_group)
    cache.prefilling = True
    cache.set_prefill_segments(seg)
    hidden = model.model(input_ids=ids, position_ids=pos, segment_ids=seg, sp_group=sp_group,
                         ringlwm_cache=cache, use_cache=False).last_hidden_state
    cache.prefilling = False
    # The last position of the padded prompt is the end of chunk 2W-1, which rank 0 holds at the end.
    last = hidden[:, -1].contiguous()
    if world > 1:
        dist.broadcast(last, src=_group_src(sp_group), group=sp_group)
    logits = model.lm_head(last)

    generator = torch.Generator().manual_seed(seed)
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * batch
    next_pos = torch.tensor(lengths, device=device)
    for _ in range(max_new_tokens):
        token = _pick(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if world > 1:
            dist.broadcast(token, src=_group_src(sp_group), group=sp_group)
        for b in range(batch):
            if finished[b]:
                continue
            outputs[b].append(int(token[b]))
            if int(token[b]) in stop_token_ids:
                finished[b] = True
            elif stop_strings:
                text = tokenizer.decode(outputs[b])
                if any(s in text for s in stop_strings):
                    finished[b] = True
        if all(finished):
            break
        cache.begin_token(batch, device)
        hidden = model.model(input_ids=token[:, None], position_ids=next_pos[:, None], sp_group=sp_group,
                             ringlwm_cache=cache, use_cache=False).last_hidden_state
        cache.end_token()
        logits = model.lm_head(hidden[:, -1])
        next_pos = next_pos + 1
    if stop_strings:
        outputs = [_cut_at_stop(out, tokenizer, stop_strings) for out in outputs]
    return outputs


def _cut_at_stop(tokens: list[int], tokenizer, stop_strings) -> list[int]:
    """The shortest prefix whose text contains a stop string, minus that string's tokens."""
    for n in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:n])
        if any(s in text for s in stop_strings):
            keep = n
            while keep > 0 and any(s in tokenizer.decode(tokens[:keep]) for s in stop_strings):
                keep -= 1
            return tokens[:keep]
    return tokens


def main(argv=None) -> None:
    from ringlwm.data import load_tokenizer
    from ringlwm.models import RingLlamaForCausalLM

    parser = argparse.ArgumentParser(prog="python -m ringlwm.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a ringlwm or Hugging Face Llama checkpoint directory")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece .model or HF tokenizer dir (default: --model)")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    parser.add_argument("--prompt-file", default=None, help="a text file whose whole content is one prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    prompts = list(args.prompt)
    if args.prompt_file:
        with open(args.prompt_file) as f:
            prompts.append(f.read())
    if not prompts:
        parser.error("give --prompt or --prompt-file")

    group = None
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    model = RingLlamaForCausalLM.from_pretrained(args.model).to(device).eval()
    encoded = [([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(p) for p in prompts]
    stops = (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()
    new = generate(model, encoded, max_new_tokens=args.max_new_tokens, sp_group=group,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_token_ids=stops,
                   stop_strings=tuple(args.stop), tokenizer=tokenizer, seed=args.seed)
    if sp_world(group)[0] == 0:
        for prompt, tokens in zip(prompts, new):
            sys.stdout.write(f"--- prompt ({len(prompt)} chars)\n{tokenizer.decode(tokens)}\n")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
