"""Long-context generation: the prefill runs over the ring, the KV cache stays sharded across the ranks.

    torchrun --nproc_per_node=2 -m ringlwm.generate --model runs/demo/hf --tokenizer runs/demo/tok.model \\
        --prompt "Once upon a time" --max-new-tokens 32

The engine (ring prefill, sharded-cache decoding) is ``ringlwm.models.decoding``; this module adds text
sampling, stop tokens and stop strings, and the command. Prompts of different lengths are left-padded;
decoding is greedy by default; sampling takes temperature / top-k / top-p. Rank 0 picks each token and
broadcasts it, so the ranks never disagree.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

from ringlwm.models.decoding import cached_decode, pick_token
from ringlwm.ring import sp_world


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
    if stop_strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer to decode the output")
    generator = torch.Generator().manual_seed(seed)
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)

    def pick(_, logits):
        return pick_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    def stop(_, token) -> bool:
        for b, out in enumerate(outputs):
            if finished[b]:
                continue
            out.append(int(token[b]))
            if out[-1] in stop_token_ids or (stop_strings and any(s in tokenizer.decode(out) for s in stop_strings)):
                finished[b] = True
        return all(finished)

    cached_decode(model, prompts, max_new_tokens=max_new_tokens, pick=pick, stop=stop, sp_group=sp_group)
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
    from ringlwm.distributed import close_distributed, init_distributed
    from ringlwm.runtime import load_model

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
    device = init_distributed()
    try:
        model = load_model(args.model, device=device, vision=False, purpose="ringlwm.generate")
        tokenizer = load_tokenizer(args.tokenizer or args.model)
        encoded = [([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + tokenizer.encode(p) for p in prompts]
        stops = (tokenizer.eos_id,) if tokenizer.eos_id is not None else ()
        new = generate(model, encoded, max_new_tokens=args.max_new_tokens, sp_group=group,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_token_ids=stops,
                       stop_strings=tuple(args.stop), tokenizer=tokenizer, seed=args.seed)
        if sp_world(group)[0] == 0:
            for prompt, tokens in zip(prompts, new):
                sys.stdout.write(f"--- prompt ({len(prompt)} chars)\n{tokenizer.decode(tokens)}\n")
    finally:
        close_distributed()


if __name__ == "__main__":
    main()
