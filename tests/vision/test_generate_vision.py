"""Vision generation: cached sequence-parallel decoding equals recomputation (mixed text/vision), guidance,
frame-boundary forcing, vision chat, and PNG/GIF output through a tiny VQGAN."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from byte_tokenizer import ByteTokenizer
from dist_utils import run_distributed
from PIL import Image

from ringlwm.data.vision_tokens import EOF_TOKEN, EOV_TOKEN, NUM_CODES, TOKENS_PER_FRAME
from ringlwm.models.lwm import LwmConfig, RingLwmForCausalLM
from ringlwm.models.vqgan import VQGAN, VQGANConfig
from ringlwm.vision.generate import (
    cached_decode,
    cfg_logits,
    codes_to_frames,
    generate_vision,
    save_image,
    save_video,
    vision_chat,
    vision_chat_prompt,
    vision_chat_tokens,
)


class _Tok(ByteTokenizer):
    def decode(self, ids):  # random models emit invalid UTF-8
        return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


TOK = _Tok()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared machine
    yield
    torch.set_num_threads(threads)


def tiny_model(seed=0, dtype=torch.float64):
    config = LwmConfig(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       attention_dropout=0.0, tie_word_embeddings=False, initializer_range=0.3)
    torch.manual_seed(seed)
    return RingLwmForCausalLM(config).to(dtype).eval()


# Two prompts of different lengths mixing text and vision ids; each step's modality follows SCHEDULE.
PROMPTS = [[1, 40, 50, 60, 7000, 12, 8192, 33, 44, 1234], [1, 77, 5, 300, 8000, 91, 8193]]
MASKS = [[False, False, False, False, True, True, True, False, False, True],
         [False, False, False, True, True, True, True]]
SCHEDULE = [True, True, False, True, False, False, True, True, False, True]


def _greedy(_, logits):
    return logits.argmax(-1)


def _ours(rank, world_size):
    import torch.distributed as dist

    model = tiny_model()
    group = dist.group.WORLD if world_size > 1 else None
    out = cached_decode(model, PROMPTS, MASKS, max_new_tokens=len(SCHEDULE), is_vision=lambda i: SCHEDULE[i],
                        pick=_greedy, sp_group=group)
    frames = np.arange(512).reshape(2, 256) * 13 % NUM_CODES
    chat = vision_chat_tokens(model, TOK, frames, "Why?", max_new_tokens=6, sp_group=group)
    image = generate_vision(model, TOK, "sun", num_frames=1, top_k=50, seed=4, sp_group=group)
    return out.tolist(), chat, image.tolist()


def _recomputed():
    """Full forward over the growing sequence, one row at a time, argmax of the step's head."""
    model = tiny_model()
    outs = []
    for ids, mask in zip(PROMPTS, MASKS):
        ids, mask, new = list(ids), list(mask), []
        for vision in SCHEDULE:
            pad = len(ids) % 2  # the model's forward wants an even length: left padding, never attended
            x = torch.tensor([[0] * pad + ids])
            vm = torch.tensor([[False] * pad + mask])
            pos = torch.tensor([[0] * pad + list(range(len(ids)))])
            seg = torch.tensor([[-1] * pad + [0] * len(ids)])
            with torch.no_grad():
                out = model(x, pos, segment_ids=seg, vision_mask=vm, return_logits=True)
            logits = out.vision_logits if vision else out.logits
            token = int(logits[0, -1].argmax())
            new.append(token)
            ids.append(token)
            mask.append(vision)
        outs.append(new)
    return outs


def test_cached_decode_equals_recomputation_single_and_sp2():
    expected = _recomputed()
    single = _ours(0, 1)
    assert single[0] == expected
    assert any(t >= TOK.vocab_size for row in expected for t in row), "vision ids beyond the text vocabulary"
    for got in run_distributed(_ours, 2):  # and chat / guided image sampling agree with one process
        assert got == single


def test_cfg_combination_and_scale_one():
    gen = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 50, generator=gen), torch.randn(3, 50, generator=gen)
    assert torch.equal(cfg_logits(cond, uncond, 1.0), cond)
    torch.testing.assert_close(cfg_logits(cond, uncond, 5.0), uncond + 5.0 * (cond - uncond))
    torch.testing.assert_close(cfg_logits(cond, uncond, 0.0), uncond)

    model = tiny_model(dtype=torch.float32)
    for scale in (1.0, 3.0):
        record = []
        generate_vision(model, TOK, "a red cat", num_frames=1, cfg_scale=scale, top_k=50, seed=0,
                        record_logits=record)
        assert len(record) == 256
        for c, u, g in record[:5]:
            want = cfg_logits(c, u, scale)[:NUM_CODES]
            torch.testing.assert_close(g[:NUM_CODES], want)
            assert torch.isneginf(g[NUM_CODES:]).all()
            if scale == 1.0:
                assert torch.equal(g[:NUM_CODES], c[:NUM_CODES])
            else:
                assert not torch.equal(c, u)


def test_frame_boundaries_and_codes_only():
    model = tiny_model(dtype=torch.float32)
    record = []
    tokens_seen = []

    import ringlwm.vision.generate as gv

    original = gv.cached_decode

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        tokens_seen.append(out)
        return out

    gv.cached_decode = spy
    try:
        codes = generate_vision(model, TOK, "waves", num_frames=2, cfg_scale=2.0, top_k=8192, seed=3,
                                record_logits=record)
    finally:
        gv.cached_decode = original
    assert codes.shape == (2, 256) and len(record) == 2 * 256
    assert int(codes.min()) >= 0 and int(codes.max()) < NUM_CODES
    first, rest = tokens_seen[0][0], tokens_seen[1][0]
    assert torch.equal(tokens_seen[0][0], tokens_seen[0][1]), "both guidance rows get the same token"
    assert first.shape == (TOKENS_PER_FRAME,) and int(first[-1]) == EOF_TOKEN  # frame 0 of a video: <eof>
    assert rest.shape == (TOKENS_PER_FRAME,) and int(rest[-1]) == EOV_TOKEN  # the last frame ends with <eov>
    for row in (first, rest):
        frames = row.view(-1, TOKENS_PER_FRAME)
        assert (frames[:, :-1] < NUM_CODES).all()
    assert torch.equal(codes[0], first[:256]) and torch.equal(codes[1], rest[:256])
    # an image is a video's first frame (same prompt, settings and seed): sampling is reproducible
    image = generate_vision(model, TOK, "waves", num_frames=1, cfg_scale=2.0, top_k=8192, seed=3)
    assert torch.equal(image, codes[:1])


def test_vision_chat_text_only():
    model = tiny_model()
    frames = np.random.default_rng(0).integers(0, NUM_CODES, (2, 256))
    ids, mask = vision_chat_prompt(TOK, frames, "What is shown?")
    assert sum(mask) == 2 * TOKENS_PER_FRAME and ids[0] == TOK.bos_id and not mask[-1]
    assert TOK.decode([i for i, m in zip(ids, mask) if not m]).endswith("</vision> ASSISTANT:")
    tokens = vision_chat_tokens(model, TOK, frames, "What is shown?", max_new_tokens=8)
    assert 0 < len(tokens) <= 8 and all(0 <= t < TOK.vocab_size for t in tokens)
    # greedy chat is the cached decode of the text head
    ref = cached_decode(model, [ids], [mask], max_new_tokens=len(tokens), is_vision=lambda _: False,
                        pick=_greedy)[0].tolist()
    assert ref[: len(tokens)] == tokens
    text = vision_chat(model, TOK, frames, "What is shown?", max_new_tokens=8)
    assert isinstance(text, str) and text == TOK.decode(tokens)
    sampled = vision_chat_tokens(model, TOK, frames[0], "Describe.", max_new_tokens=6, temperature=1.0, top_k=5, seed=2)
    assert all(0 <= t < TOK.vocab_size for t in sampled)


def test_png_and_gif_files(tmp_path):
    torch.manual_seed(0)
    vqgan = VQGAN(VQGANConfig(resolution=64, hidden_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1,
                              z_channels=8, num_embeddings=8192, quantized_embed_dim=4, num_groups=4)).eval()
    codes = torch.randint(0, NUM_CODES, (3, 256))
    frames = codes_to_frames(vqgan, codes)
    assert frames.shape == (3, 64, 64, 3) and frames.dtype == np.uint8
    png = save_image(vqgan, codes[:1], tmp_path / "x.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (64, 64)
        written = np.asarray(im.convert("RGB")).astype(int)
        assert np.abs(written - frames[0]).max() <= 1  # decoded alone vs in a batch: rounding only
    gif = save_video(vqgan, codes, tmp_path / "x.gif")
    with Image.open(gif) as im:
        assert im.format == "GIF" and im.size == (64, 64) and im.n_frames == 3
    with pytest.raises(ValueError, match="codes must be in"):
        codes_to_frames(vqgan, torch.full((1, 256), EOF_TOKEN))


def test_cli_image_video_chat(tmp_path, monkeypatch, capsys):
    import json

    import ringlwm.data
    from ringlwm.vision.generate import main

    model_dir, vqgan_dir = tmp_path / "lwm", tmp_path / "vqgan"
    tiny_model(dtype=torch.float32).save_pretrained(model_dir)
    torch.manual_seed(0)
    VQGAN(VQGANConfig(resolution=64, hidden_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, z_channels=8,
                      num_embeddings=8192, quantized_embed_dim=4, num_groups=4)).save_pretrained(vqgan_dir)
    monkeypatch.setattr(ringlwm.data, "load_tokenizer", lambda _: TOK)
    common = ["--model", str(model_dir), "--tokenizer", "tok", "--vqgan", str(vqgan_dir)]
    main(["image", *common, "--prompt", "a cat", "--out", str(tmp_path / "cat.png"), "--top-k", "20"])
    main(["video", *common, "--prompt", "a cat", "--out", str(tmp_path / "cat.gif"), "--num-frames", "2"])
    with Image.open(tmp_path / "cat.png") as im:
        assert im.size == (64, 64)
    with Image.open(tmp_path / "cat.gif") as im:
        assert im.size == (64, 64) and im.n_frames == 2
    codes = tmp_path / "codes.json"
    codes.write_text(json.dumps((np.arange(256) * 7 % NUM_CODES).tolist()))
    capsys.readouterr()
    main(["chat", *common, "--codes", str(codes), "--question", "What?", "--max-new-tokens", "4"])
    main(["chat", *common, "--media", str(tmp_path / "cat.gif"), "--question", "What?", "--max-new-tokens", "4"])
    assert capsys.readouterr().out.count("\n") >= 2  # one answer line each (answers may hold newlines)
