"""Vision data: LWM's frame preprocessing, uniform video sampling with PyAV, and the pre-tokenization
command (folder and JSONL inputs, batching across files, resuming)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ringlwm.models.vqgan import VQGAN, VQGANConfig
from ringlwm.vision.preprocess import (
    main,
    preprocess_frame,
    read_image,
    read_video,
    read_vision,
)

av = pytest.importorskip("av")

# 256x256 frames -> 16x16 = 256 codes, as LWM's tokenizer, in a model small enough for tests.
SMALL_256 = VQGANConfig(hidden_channels=8, channel_mult=(1, 1, 1, 1, 1), num_res_blocks=1, z_channels=8,
                        quantized_embed_dim=8, num_groups=4)


def stripes(width, height):
    """Red, green and blue vertical thirds."""
    image = np.zeros((height, width, 3), np.uint8)
    for c in range(3):
        image[:, c * width // 3:(c + 1) * width // 3, c] = 255
    return Image.fromarray(image)


def write_video(path, num_frames=10, size=(64, 48)):
    """Frame i is a flat grey of brightness 25 * i, so a decoded frame tells which frame it was."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
        stream.options = {"qscale": "2"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), 25 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_ids(frames):
    return [round(float((f.mean() + 1) * 127.5 / 25)) for f in frames]


def test_preprocess_wide_image_short_side_and_center_crop():
    image = stripes(300, 200)  # resized to 384x256, crop columns 64..320: red 0..64, green 64..192, blue 192..
    frame = preprocess_frame(image)
    assert frame.shape == (3, 256, 256) and frame.dtype == torch.float32
    assert -1 <= frame.min() and frame.max() <= 1
    want = np.asarray(image.resize((384, 256), Image.Resampling.BICUBIC).crop((64, 0, 320, 256)), np.float32)
    np.testing.assert_allclose(frame.permute(1, 2, 0).numpy(), want / 127.5 - 1, atol=1e-6)
    for col, rgb in ((10, (1, -1, -1)), (128, (-1, 1, -1)), (250, (-1, -1, 1))):
        np.testing.assert_allclose(frame[:, 128, col].numpy(), rgb, atol=1e-6)


def test_preprocess_tall_and_odd_sizes():
    tall = preprocess_frame(stripes(200, 300).rotate(90, expand=True))  # 200 wide, 300 high
    assert tall.shape == (3, 256, 256)
    for size in [(257, 200), (199, 613), (256, 256), (1, 1)]:
        assert preprocess_frame(Image.new("RGB", size, (255, 0, 0))).shape == (3, 256, 256)


def test_preprocess_modes_to_rgb():
    rgba = preprocess_frame(Image.new("RGBA", (64, 64), (255, 0, 0, 0)))  # alpha dropped, as LWM's convert("RGB")
    np.testing.assert_allclose(rgba[:, 5, 5].numpy(), [1, -1, -1])
    gray = preprocess_frame(Image.new("L", (80, 40), 0))
    assert gray.shape == (3, 256, 256) and torch.equal(gray[0], gray[2]) and gray.max() == -1


def test_read_image_file(tmp_path):
    stripes(300, 200).save(tmp_path / "a.png")
    frames = read_vision(tmp_path / "a.png")
    assert frames.shape == (1, 3, 256, 256)
    torch.testing.assert_close(frames[0], preprocess_frame(stripes(300, 200)))
    with pytest.raises(ValueError, match="unknown extension '.txt'"):
        read_vision(tmp_path / "a.txt")
    # a photo stored sideways with an EXIF orientation is read upright (LWM would read it as stored)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stripes(300, 200).save(tmp_path / "turned.png", exif=exif)
    upright = stripes(300, 200).transpose(Image.Transpose.ROTATE_270)
    torch.testing.assert_close(read_image(tmp_path / "turned.png")[0], preprocess_frame(upright))


@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])  # .mkv stores no frame count: packets are counted
def test_read_video_samples_uniformly(tmp_path, suffix):
    path = write_video(tmp_path / f"clip{suffix}")
    frames = read_video(path, max_frames=4)
    assert frames.shape == (4, 3, 256, 256) and frames.dtype == torch.float32
    assert frame_ids(frames) == [0, 3, 6, 9]
    assert frame_ids(read_video(path, max_frames=20)) == list(range(10))


def test_pretokenize_command(tmp_path, capsys):
    data = tmp_path / "data"
    (data / "clips").mkdir(parents=True)
    stripes(300, 200).save(data / "a.png")
    Image.new("L", (90, 120), 77).save(data / "b.jpg")
    write_video(data / "clips" / "c.mp4", num_frames=5)
    torch.manual_seed(0)
    vqgan = VQGAN(SMALL_256).eval()
    vqgan.save_pretrained(tmp_path / "vqgan")
    out = tmp_path / "out.jsonl"

    main(["--vqgan", str(tmp_path / "vqgan"), "--input", str(data), "--out", str(out), "--max-frames", "3",
          "--batch-size", "2"])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["path"] for r in records] == [str(data / "a.png"), str(data / "b.jpg"), str(data / "clips" / "c.mp4")]
    assert [r["num_frames"] for r in records] == [1, 1, 3]
    for r in records:
        assert len(r["vision"]) == r["num_frames"] and all(len(codes) == 256 for codes in r["vision"])
        assert all(0 <= c < 8192 for codes in r["vision"] for c in codes)
        # batches of 2 frames mixed files (a+b, then the video's 3 frames): codes are still each file's own
        with torch.inference_mode():
            want = vqgan.encode(read_vision(r["path"], max_frames=3)).flatten(1).tolist()
        assert r["vision"] == want

    # resuming: nothing to do; then a record cut short by a crash is dropped and written again
    text = out.read_text()
    main(["--vqgan", str(tmp_path / "vqgan"), "--input", str(data), "--out", str(out)])
    assert out.read_text() == text and "skipped 3 already done" in capsys.readouterr().out
    out.write_text(text[: len(text) - 100])
    main(["--vqgan", str(tmp_path / "vqgan"), "--input", str(data), "--out", str(out), "--max-frames", "3"])
    assert out.read_text() == text

    # JSONL input: relative paths from the JSONL's folder, other fields kept, unreadable files skipped on request
    (data / "broken.png").write_bytes(b"not a png")
    listing = data / "list.jsonl"
    listing.write_text("\n".join(json.dumps(r) for r in [{"file": "a.png", "caption": "stripes"},
                                                         {"file": "broken.png", "caption": "?"}]) + "\n")
    out2 = tmp_path / "out2.jsonl"
    with pytest.raises(RuntimeError, match="broken.png"):
        main(["--vqgan", str(tmp_path / "vqgan"), "--input", str(listing), "--out", str(out2), "--path-field", "file"])
    main(["--vqgan", str(tmp_path / "vqgan"), "--input", str(listing), "--out", str(out2), "--path-field", "file",
          "--on-error", "skip"])
    (record,) = [json.loads(line) for line in out2.read_text().splitlines()]
    assert (record["path"], record["file"], record["caption"]) == ("a.png", "a.png", "stripes")
    assert record["vision"] == records[0]["vision"]
    assert "1 failed" in capsys.readouterr().out
