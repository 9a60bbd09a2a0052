"""Images and videos -> LWM frames -> VQGAN codes, and the pre-tokenization command that writes them as JSONL.

    python -m ringlwm.vision.preprocess --vqgan vqgan_torch/ --input FOLDER_OR_JSONL --out vision.jsonl \\
        [--max-frames 8] [--batch-size 16] [--path-field path] [--on-error raise|skip] [--device cuda]

Frames (as LWM's ``vision_chat.py``): RGB; the short side resized to 256 (bicubic, the long side truncated
to an integer), a centre 256x256 crop, ``value / 127.5 - 1``: float32 (3, 256, 256) in [-1, 1]. Videos:
all frames when there are at most ``max_frames``, else ``max_frames`` frames at
``numpy.linspace(0, num_frames - 1, max_frames)`` rounded down. Decoded with PyAV. Deliberate difference:
EXIF orientation is applied to photos (LWM reads them as stored).

Output: one JSON object per line, appended in input order; a run that stops can be started again with the
same command and skips every path already in the output (a half-written last line is dropped):

    {"path": "clips/a.mp4", "num_frames": 2, "vision": [[256 codes of frame 0], [256 codes of frame 1]]}

Codes are ints in [0, 8192), row-major over each frame's 16x16 grid. A JSONL input keeps its other fields
(captions, questions, a "fields" spec); its relative paths are read relative to the JSONL file's folder,
and "path" is written as given. The records are the input of ``ringlwm.data.vision_tokens``, which turns
each frame into 257 model tokens (256 codes, then <eof> 8192, or <eov> 8193 after the last frame) between
the text markers <vision> ... </vision>. LWM's own training data held the same codes flattened
(``sum(record["vision"], [])``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ringlwm.data.vision_tokens import sample_frame_indices
from ringlwm.log import logger

FRAME_SIZE = 256
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif"})


def preprocess_frame(image: Image.Image, size: int = FRAME_SIZE) -> torch.Tensor:
    """A PIL image of any mode and size -> float32 (3, size, size) in [-1, 1], as LWM prepares frames."""
    image = image.convert("RGB")  # drops alpha, replicates grayscale
    width, height = image.size
    if width < height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
    # Same float box as LWM: PIL rounds it, and both edges of a 256 crop round the same way.
    left, top = (new_width - size) / 2, (new_height - size) / 2
    image = image.crop((left, top, left + size, top + size))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def read_image(path: str | os.PathLike, size: int = FRAME_SIZE) -> torch.Tensor:
    """An image file -> frames (1, 3, size, size)."""
    with Image.open(path) as image:
        return preprocess_frame(ImageOps.exif_transpose(image), size)[None]


def _count_frames(path: str | os.PathLike) -> int:
    """Frames of the first video stream: its header's count, else the number of video packets (no decoding)."""
    import av

    with av.open(os.fspath(path)) as container:
        stream = container.streams.video[0]
        if stream.frames > 0:
            return stream.frames
        return sum(1 for packet in container.demux(stream) if packet.size)


def _decode_frames(path: str | os.PathLike, wanted: list[int]) -> tuple[dict[int, Image.Image], int]:
    """Decode up to the last wanted frame -> ({index: RGB image}, frames decoded)."""
    import av

    want, last = set(wanted), max(wanted, default=-1)
    frames, count = {}, 0
    with av.open(os.fspath(path)) as container:
        for count, frame in enumerate(container.decode(video=0), start=1):
            if count - 1 in want:
                frames[count - 1] = frame.to_image()
            if count - 1 >= last:
                break
    return frames, count


def read_video(path: str | os.PathLike, max_frames: int = 8, size: int = FRAME_SIZE) -> torch.Tensor:
    """A video file -> frames (num_sampled, 3, size, size), sampled uniformly (``sample_frame_indices``)."""
    try:
        import av  # noqa: F401
    except ImportError as e:
        raise ImportError("reading videos needs PyAV: pip install av") from e
    num_frames = _count_frames(path)
    indices = sample_frame_indices(num_frames, max_frames)
    frames, decoded = _decode_frames(path, indices)
    if len(frames) < len(indices):
        # The header overstated the length: sample again over the frames that really decode.
        indices = sample_frame_indices(decoded, max_frames)
        frames, decoded = _decode_frames(path, indices)
    if not frames:
        raise ValueError(f"{path}: no video frames could be decoded")
    return torch.stack([preprocess_frame(frames[i], size) for i in indices])


def read_vision(path: str | os.PathLike, max_frames: int = 8, size: int = FRAME_SIZE) -> torch.Tensor:
    """An image or video file -> frames (num_frames, 3, size, size), by file extension."""
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return read_image(path, size)
    if suffix in VIDEO_EXTENSIONS:
        return read_video(path, max_frames, size)
    raise ValueError(f"{path}: unknown extension {suffix!r}; images: {sorted(IMAGE_EXTENSIONS)}, videos: "
                     f"{sorted(VIDEO_EXTENSIONS)}")


@torch.inference_mode()
def encode_frames(vqgan, frames: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """frames: (num_frames, 3, 256, 256) on any device -> codes (num_frames, 16, 16) int64 on the CPU,
    ``batch_size`` frames per VQGAN call."""
    device = next(vqgan.parameters()).device
    parts = [vqgan.encode(chunk.to(device)).cpu() for chunk in frames.split(batch_size)]
    return torch.cat(parts)


# ---------------------------------------------------------------------------------------------- the command


def list_inputs(source: str | os.PathLike, path_field: str = "path") -> Iterator[tuple[dict, Path]]:
    """A folder (every image and video below it, sorted) or a JSONL file with a ``path_field`` on each line
    -> (record to write, file to read)."""
    source = Path(source)
    if source.is_dir():
        for file in sorted(source.rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS | VIDEO_EXTENSIONS:
                yield {"path": str(file)}, file
        return
    if not source.is_file():
        raise FileNotFoundError(f"--input {source}: no such folder or JSONL file")
    with source.open() as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}:{line_no}: not JSON ({e})") from e
            if not isinstance(record, dict) or path_field not in record:
                raise ValueError(f"{source}:{line_no}: no {path_field!r} field (set it with --path-field)")
            file = Path(record[path_field])
            yield {**record, "path": str(record[path_field])}, file if file.is_absolute() else source.parent / file


def done_paths(out: Path) -> set[str]:
    """Paths already in ``out``; a last line cut short by a crash is removed from the file."""
    if not out.exists():
        return set()
    paths, good_end = set(), 0
    with out.open("rb") as f:
        for line in f:
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("no newline")
                paths.add(json.loads(line)["path"])
            except (ValueError, KeyError, TypeError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                break
            good_end += len(line)
        rest = f.read()
    if good_end < out.stat().st_size:
        logger.warning(f"{out}: dropping an unfinished last record ({out.stat().st_size - good_end} bytes)"
                       + (" and what follows it" if rest else ""))
        with out.open("r+b") as f:
            f.truncate(good_end)
    return paths


def pretokenize(vqgan, source: str | os.PathLike, out: str | os.PathLike, *, max_frames: int = 8,
                batch_size: int = 16, path_field: str = "path", on_error: str = "raise") -> dict[str, int]:
    """Encode every image/video of ``source`` (folder or JSONL) and append records to ``out`` (see the module
    docstring). Frames of several files share a VQGAN batch. Returns counts: written, skipped (already in
    ``out``), failed (unreadable, with ``on_error="skip"``), frames."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = done_paths(out)
    stats = {"written": 0, "skipped": 0, "failed": 0, "frames": 0}
    pending: list[tuple[dict, torch.Tensor]] = []

    with out.open("a") as f:

        def flush():
            codes = encode_frames(vqgan, torch.cat([frames for _, frames in pending]), batch_size)
            for (record, frames), frame_codes in zip(pending, codes.split([len(fr) for _, fr in pending])):
                record = {**record, "num_frames": len(frames), "vision": frame_codes.flatten(1).tolist()}
                f.write(json.dumps(record) + "\n")
                stats["written"] += 1
                stats["frames"] += len(frames)
            f.flush()  # a record is either whole on disk or dropped on resume
            pending.clear()

        for record, file in list_inputs(source, path_field):
            if record["path"] in done:
                stats["skipped"] += 1
                continue
            try:
                frames = read_vision(file, max_frames)
            except Exception as e:
                if on_error == "raise":
                    raise RuntimeError(f"could not read {file}: {e} (use --on-error skip to go on)") from e
                logger.warning(f"skipping {file}: {e}")
                stats["failed"] += 1
                continue
            done.add(record["path"])  # a path listed twice is written once
            pending.append((record, frames))
            if sum(len(fr) for _, fr in pending) >= batch_size:
                flush()
        if pending:
            flush()
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m ringlwm.vision.preprocess", description=__doc__.split("\n")[0])
    parser.add_argument("--vqgan", required=True, help="VQGAN folder (VQGAN.save_pretrained / ringlwm.convert.vqgan_flax)")
    parser.add_argument("--input", required=True, help="a folder of images/videos, or a JSONL with a path field")
    parser.add_argument("--out", required=True, help="output JSONL (appended to; paths already there are skipped)")
    parser.add_argument("--max-frames", type=int, default=8, help="frames sampled per video (LWM's chat default: 8)")
    parser.add_argument("--batch-size", type=int, default=16, help="frames per VQGAN call")
    parser.add_argument("--path-field", default="path", help="JSONL input: the field holding the file path")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="unreadable files")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.max_frames < 1 or args.batch_size < 1:
        parser.error("--max-frames and --batch-size must be at least 1")

    from ringlwm.models.vqgan import VQGAN

    vqgan = VQGAN.from_pretrained(args.vqgan, device=args.device)
    start = time.perf_counter()
    stats = pretokenize(vqgan, args.input, args.out, max_frames=args.max_frames, batch_size=args.batch_size,
                        path_field=args.path_field, on_error=args.on_error)
    seconds = time.perf_counter() - start
    print(f"{args.out}: wrote {stats['written']} records ({stats['frames']} frames, "
          f"{stats['frames'] / max(seconds, 1e-9):.1f} frames/s), skipped {stats['skipped']} already done, "
          f"{stats['failed']} failed")


if __name__ == "__main__":
    main()
