"""Vision generation with ``RingLwmForCausalLM``: vision chat (frames + question -> text) and text-to-image /
text-to-video with classifier-free guidance, sequence-parallel with the KV cache sharded across the ranks.

    torchrun --nproc_per_node=2 -m ringlwm.vision.generate chat --model M --tokenizer T --vqgan V \\
        --codes clip.npy --question "What happens?"          # or --media clip.gif (encoded with the VQGAN)
    torchrun --nproc_per_node=2 -m ringlwm.vision.generate image --model M --tokenizer T --vqgan V \\
        --prompt "Fireworks over the city" --out fireworks.png
    torchrun --nproc_per_node=2 -m ringlwm.vision.generate video ... --num-frames 8 --out fireworks.gif

Decoding (``cached_decode``): the prompt (text and vision ids, told apart by a vision mask) is prefilled
over the ring exactly as ``ringlwm.generate`` does (left padding with segment id -1, positions from 0 per
row); each rank keeps its shard of the keys/values in a ``ShardedKVCache`` and every new token attends
the whole sharded cache (``sharded_decode_attention``). Each step has a flag "the next token is vision":
it picks the head that predicts the token (``vision_head`` or ``lm_head``) and the table that embeds it
when it is fed back (``vision_embed_tokens`` or the text table). Rank 0 picks each token and broadcasts it.

Text-to-vision follows LWM's ``lwm/vision_generation.py`` / ``FlaxVideoLLaMAForCausalLM._sample_vision``:
  * conditional prompt ``[BOS] You are a helpful assistant. USER: Generate an image of {prompt} ASSISTANT:``
    then "<vision>"; unconditional prompt ``[BOS]`` then "<vision>". Both run as one batch of 2 and get
    the same sampled token every step;
  * logits = uncond + cfg_scale * (cond - uncond) on the vision head, then temperature and top-k, then a
    sample; every 257th token of a frame is forced (not sampled);
  * a video: the first frame is generated as an image ("Generate an image of ..."), then the other frames
    with "Generate a video of ..." and the first frame (257 tokens) appended to both prompts.
  * defaults from LWM's README scripts: image top_k 8192, cfg 5.0; video top_k 1000, cfg 1.0.
Differences from LWM, deliberate: the frame-end token of the last frame is <eov> (LWM forces <eof> = 8192
everywhere; ringlwm's training data, ``data/vision_tokens.py``, ends a video with <eov>); at code positions
only codes 0..8191 can be sampled (LWM samples the whole 8448-id vision vocabulary); the markers "<vision>"
and the chat text are tokenized apart, as ``data/vision_tokens.py`` encodes training data (LWM tokenizes
the prompt string in one piece).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

from ringlwm.data.chat import CHAT_ASSISTANT, CHAT_SYSTEM, CHAT_USER, vision_chat_record
from ringlwm.data.vision_tokens import (
    CODES_PER_FRAME,
    EOF_TOKEN,
    EOV_TOKEN,
    NUM_CODES,
    TOKENS_PER_FRAME,
    VISION_START,
    encode_vision_example,
)
from ringlwm.models.decoding import cached_decode, pick_token
from ringlwm.ring import sp_world

IMAGE_DEFAULTS = {"cfg_scale": 5.0, "top_k": 8192}  # LWM's scripts/run_sample_image.sh
VIDEO_DEFAULTS = {"cfg_scale": 1.0, "top_k": 1000}  # LWM's scripts/run_sample_video.sh


# --------------------------------------------------------------------------- cached decoding


# --------------------------------------------------------------------------- vision chat


def vision_chat_prompt(tokenizer, frames_codes, question: str, *, system: str = CHAT_SYSTEM,
                       max_frames: int | None = None) -> tuple[list[int], list[bool]]:
    """(ids, vision_mask) of LWM's vision-chat prompt, the layout ringlwm trains on (``vision_chat_record``):
    [BOS] {system} USER: {question}\\n <vision> frames </vision>  ASSISTANT:"""
    record = vision_chat_record(np.asarray(frames_codes), question, "", system=system)
    ids, _, vision = encode_vision_example(record, None, tokenizer, add_eos=False, max_frames=max_frames)
    return ids, vision


@torch.no_grad()
def vision_chat_tokens(model, tokenizer, frames_codes, question: str, *, max_new_tokens: int,
                       sp_group: dist.ProcessGroup | None = None, temperature: float = 0.0,
                       top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                       max_frames: int | None = None) -> list[int]:
    """The answer's text token ids (EOS dropped), decoded with the text head; see ``vision_chat``."""
    ids, vision = vision_chat_prompt(tokenizer, frames_codes, question, max_frames=max_frames)
    generator = torch.Generator().manual_seed(seed)
    eos = tokenizer.eos_id

    def pick(_, logits):
        return pick_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    def stop(_, token):
        return eos is not None and int(token[0]) == eos

    tokens = cached_decode(model, [ids], [vision], max_new_tokens=max_new_tokens, is_vision=lambda _: False,
                           pick=pick, stop=stop, sp_group=sp_group)[0].tolist()
    if eos is not None and tokens and tokens[-1] == eos:
        tokens = tokens[:-1]
    return tokens


def vision_chat(model, tokenizer, frames_codes, question: str, *, max_new_tokens: int,
                sp_group: dist.ProcessGroup | None = None, **kwargs) -> str:
    """Answer ``question`` about an image or a video: frames_codes (frames, 256) VQGAN codes (an image is one
    frame; LWM's flat list of frames * 256 codes works too). Greedy by default (temperature 0); sampling
    with temperature / top_k / top_p / seed; max_frames keeps that many uniformly spaced frames. Stops at
    EOS. The same string on every rank."""
    return tokenizer.decode(vision_chat_tokens(model, tokenizer, frames_codes, question,
                                               max_new_tokens=max_new_tokens, sp_group=sp_group, **kwargs))


# --------------------------------------------------------------------------- text to image / video


def cfg_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance (LWM's ``_sample_vision``): uncond + scale * (cond - uncond). Scale 1 gives
    the conditional logits exactly."""
    if scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)


def frame_end_token(index: int, num_tokens: int) -> int | None:
    """The forced token at generated vision token ``index`` of ``num_tokens`` (whole frames): <eof> at every
    257th, <eov> at the very last; None at a code position (sampled)."""
    if (index + 1) % TOKENS_PER_FRAME:
        return None
    return EOV_TOKEN if index == num_tokens - 1 else EOF_TOKEN


def generation_prompts(tokenizer, prompt_text: str, *, video: bool, system: str = CHAT_SYSTEM
                       ) -> tuple[list[int], list[int]]:
    """(conditional, unconditional) text prompts of LWM's ``vision_generation.py``, both ending in <vision>:
    "[BOS]{system} USER: Generate an image|a video of {prompt} ASSISTANT:" + "<vision>", and "[BOS]<vision>"."""
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    what = "a video" if video else "an image"
    start = tokenizer.encode(VISION_START)
    cond = bos + tokenizer.encode(f"{system}{CHAT_USER}Generate {what} of {prompt_text}{CHAT_ASSISTANT}") + start
    return cond, bos + start


@torch.no_grad()
def sample_vision_tokens(model, cond: tuple[list[int], list[bool]], uncond: tuple[list[int], list[bool]], *,
                         num_frames: int, cfg_scale: float, top_k: int | None, temperature: float,
                         generator: torch.Generator, last_is_end: bool = True,
                         sp_group: dist.ProcessGroup | None = None, record_logits: list | None = None
                         ) -> torch.Tensor:
    """``num_frames`` * 257 vision tokens after the (conditional, unconditional) prompts (ids, vision mask),
    run as a batch of 2 with guidance: codes sampled from the guided vision logits restricted to 0..8191,
    every 257th token forced to <eof> (<eov> for the last when ``last_is_end``). Returns (num_frames * 257,).
    ``record_logits``: a list that receives, per sampled step, (cond, uncond, guided) logits (for tests)."""
    total = num_frames * TOKENS_PER_FRAME

    def pick(i, logits):
        forced = frame_end_token(i, total)
        if forced is not None:
            if forced == EOV_TOKEN and not last_is_end:
                forced = EOF_TOKEN
            return torch.full((2,), forced, dtype=torch.long, device=logits.device)
        guided = cfg_logits(logits[0:1].float(), logits[1:2].float(), cfg_scale)
        guided = guided.clone()
        guided[:, NUM_CODES:] = float("-inf")
        if record_logits is not None:
            record_logits.append((logits[0].float(), logits[1].float(), guided[0]))
        token = pick_token(guided, temperature=temperature, top_k=top_k, top_p=None, generator=generator)
        return token.expand(2)

    tokens = cached_decode(model, [cond[0], uncond[0]], [cond[1], uncond[1]], max_new_tokens=total,
                           is_vision=lambda _: True, pick=pick, sp_group=sp_group)
    return tokens[0]


@torch.no_grad()
def generate_vision(model, tokenizer, prompt_text: str, *, num_frames: int = 1, cfg_scale: float | None = None,
                    top_k: int | None = None, temperature: float = 1.0, seed: int = 0,
                    sp_group: dist.ProcessGroup | None = None, record_logits: list | None = None) -> torch.Tensor:
    """Text to image (num_frames 1) or video: returns codes (num_frames, 256) in [0, 8192), the same on every
    rank. As LWM: frame 0 from the image prompt, then the rest from the video prompt with frame 0 appended
    to both prompts. cfg_scale / top_k default to LWM's (image 5.0 / 8192, video frames 1.0 / 1000); given
    values apply to every frame. temperature 0: the argmax of the guided logits."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    generator = torch.Generator().manual_seed(seed)

    def settings(defaults):
        return (defaults["cfg_scale"] if cfg_scale is None else cfg_scale,
                defaults["top_k"] if top_k is None else top_k)

    cond, uncond = generation_prompts(tokenizer, prompt_text, video=False)
    scale, k = settings(IMAGE_DEFAULTS)
    first = sample_vision_tokens(model, (cond, [False] * len(cond)), (uncond, [False] * len(uncond)), num_frames=1,
                                 cfg_scale=scale, top_k=k, temperature=temperature, generator=generator,
                                 last_is_end=num_frames == 1, sp_group=sp_group, record_logits=record_logits)
    frames = [first[:CODES_PER_FRAME]]
    if num_frames > 1:
        cond, uncond = generation_prompts(tokenizer, prompt_text, video=True)
        frame0 = first.tolist()  # codes + <eof>
        scale, k = settings(VIDEO_DEFAULTS)
        rest = sample_vision_tokens(model, (cond + frame0, [False] * len(cond) + [True] * len(frame0)),
                                    (uncond + frame0, [False] * len(uncond) + [True] * len(frame0)),
                                    num_frames=num_frames - 1, cfg_scale=scale, top_k=k, temperature=temperature,
                                    generator=generator, sp_group=sp_group, record_logits=record_logits)
        frames.extend(rest.view(num_frames - 1, TOKENS_PER_FRAME)[:, :CODES_PER_FRAME])
    return torch.stack(frames).cpu()


# --------------------------------------------------------------------------- pixels and files


@torch.no_grad()
def codes_to_frames(vqgan, codes) -> np.ndarray:
    """codes (frames, 256) (or (frames, 16, 16)) -> uint8 frames (frames, H, W, 3), LWM's (x + 1) * 127.5."""
    codes = torch.as_tensor(np.asarray(codes), dtype=torch.long)
    side = int(round(CODES_PER_FRAME ** 0.5))
    codes = codes.reshape(-1, side, side).to(next(vqgan.parameters()).device)
    pixels = vqgan.decode(codes).float().cpu()  # (frames, 3, H, W) in [-1, 1]
    return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_image(vqgan, codes, path: str | os.PathLike) -> str:
    """Decode one frame of codes ((256,) or (1, 256)) and write it as an image (PNG, by the suffix)."""
    from PIL import Image

    frames = codes_to_frames(vqgan, np.asarray(codes).reshape(-1, CODES_PER_FRAME)[:1])
    Image.fromarray(frames[0]).save(path)
    return str(path)


def save_video(vqgan, codes, path: str | os.PathLike, *, fps: int = 4) -> str:
    """Decode frames of codes (frames, 256) and write an animated GIF (LWM writes 4 fps)."""
    from PIL import Image

    frames = [Image.fromarray(f) for f in codes_to_frames(vqgan, np.asarray(codes).reshape(-1, CODES_PER_FRAME))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=int(round(1000 / fps)), loop=0)
    return str(path)


# --------------------------------------------------------------------------- CLI


def _load_frames(path: str) -> np.ndarray:
    if path.endswith(".npy"):
        return np.load(path)
    with open(path) as f:
        return np.asarray(json.load(f))


def main(argv=None) -> None:
    from ringlwm.data import load_tokenizer
    from ringlwm.distributed import close_distributed, init_distributed
    from ringlwm.models.vqgan import VQGAN
    from ringlwm.runtime import load_model
    from ringlwm.vision.preprocess import encode_frames, read_vision

    parser = argparse.ArgumentParser(prog="python -m ringlwm.vision.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("chat", "image", "video"))
    parser.add_argument("--model", required=True, help="a RingLwmForCausalLM checkpoint directory")
    parser.add_argument("--tokenizer", default=None, help="sentencepiece .model or HF tokenizer dir (default: --model)")
    parser.add_argument("--vqgan", default=None, help="a VQGAN.save_pretrained directory (image/video; chat on media)")
    parser.add_argument("--prompt", default=None, help="image/video: what to generate")
    parser.add_argument("--out", default=None, help="image: .png, video: .gif")
    parser.add_argument("--num-frames", type=int, default=8, help="video: frames to generate")
    parser.add_argument("--cfg-scale", type=float, default=None, help="default: LWM's (image 5, video 1)")
    parser.add_argument("--top-k", type=int, default=None, help="default: LWM's (image 8192, video 1000)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="default: 1 (image/video, as LWM), 0 = greedy (chat; LWM samples at 0.2)")
    parser.add_argument("--question", default=None, help="chat: the question")
    parser.add_argument("--codes", default=None, help="chat: .npy/.json of (frames, 256) VQGAN codes")
    parser.add_argument("--media", default=None, help="chat: an image or GIF, tokenized with --vqgan")
    parser.add_argument("--max-frames", type=int, default=8, help="chat: keep at most this many frames (LWM: 8)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="chat: answer length limit")
    parser.add_argument("--fps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = init_distributed()
    try:
        group = None
        rank = sp_world(group)[0]
        model = load_model(args.model, device=device, vision=True, purpose="ringlwm.vision.generate")
        tokenizer = load_tokenizer(args.tokenizer or args.model)
        vqgan = VQGAN.from_pretrained(args.vqgan, device=device) if args.vqgan else None
        if args.mode == "chat":
            if args.question is None or (args.codes is None) == (args.media is None):
                parser.error("chat needs --question and one of --codes / --media")
            if args.media and vqgan is None:
                parser.error("--media needs --vqgan")
            if args.codes:
                frames = _load_frames(args.codes)
            else:  # LWM's frame preprocessing and uniform frame sampling, as in pre-tokenization
                pixels = read_vision(args.media, args.max_frames, size=vqgan.config.resolution)
                frames = encode_frames(vqgan, pixels).reshape(len(pixels), -1).numpy()
            answer = vision_chat(model, tokenizer, frames, args.question, max_new_tokens=args.max_new_tokens,
                                 sp_group=group, temperature=args.temperature or 0.0, seed=args.seed,
                                 max_frames=args.max_frames)
            if rank == 0:
                sys.stdout.write(answer + "\n")
        else:
            if args.prompt is None or args.out is None or vqgan is None:
                parser.error(f"{args.mode} needs --prompt, --out and --vqgan")
            frames = 1 if args.mode == "image" else args.num_frames
            temperature = 1.0 if args.temperature is None else args.temperature
            codes = generate_vision(model, tokenizer, args.prompt, num_frames=frames, cfg_scale=args.cfg_scale,
                                    top_k=args.top_k, temperature=temperature, seed=args.seed, sp_group=group)
            if rank == 0:
                (save_image(vqgan, codes, args.out) if args.mode == "image"
                 else save_video(vqgan, codes, args.out, fps=args.fps))
                sys.stdout.write(f"wrote {args.out}\n")
    finally:
        close_distributed()


if __name__ == "__main__":
    main()
