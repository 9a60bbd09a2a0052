"""VQGAN: LWM's image tokenizer. A 256x256 RGB frame in [-1, 1] <-> 16x16 = 256 codes from 8192 entries.

    vqgan = VQGAN.from_pretrained("vqgan/")                # save_pretrained output, or convert LWM's weights
    codes = vqgan.encode(pixels)     # (batch, 3, 256, 256) -> (batch, 16, 16) int64; videos: (batch, frames, ...)
    pixels = vqgan.decode(codes)     # -> (batch, 3, 256, 256) in [-1, 1]

LWM's weights convert with ``python -m ringlwm.convert.vqgan_flax`` (which holds the Flax name map). The
architecture follows LWM's ``lwm/vqgan.py`` (a taming-transformers style VQGAN), in NCHW:

    encoder: conv_in -> per level i: num_res_blocks ResnetBlocks (hidden * channel_mult[i] channels),
             then a stride-2 downsample except at the last level -> mid (ResnetBlock, [attention], ResnetBlock)
             -> GroupNorm, SiLU, conv_out (z_channels)
    quant_conv (1x1) -> nearest codebook entry -> post_quant_conv (1x1)
    decoder: conv_in -> mid -> per level i, deepest first: num_res_blocks + 1 ResnetBlocks, then a 2x
             nearest upsample + conv except at level 0 -> GroupNorm, SiLU, conv_out (3 channels) -> clip to [-1, 1]

What is easy to get wrong when matching LWM:
- LWM's config has no attention at all (``attn_resolutions=()``, ``no_attn_mid_block=True``). Attention
  blocks are supported here (set those two fields) but the released tokenizer does not use them.
- Downsampling pads one pixel on the bottom and right only, then a 3x3 stride-2 convolution without padding
  (not PyTorch's symmetric ``padding=1``, which shifts the grid by half a pixel).
- GroupNorm: 32 groups, eps 1e-6 (Flax's defaults; PyTorch's default eps is 1e-5).
- Codes are laid out row-major over the 16x16 grid: ``codes.flatten(-2)`` is LWM's per-frame token order.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "ringlwm_vqgan"


@dataclass(kw_only=True)
class VQGANConfig:
    """LWM's defaults (``lwm/vqgan.py``: ``VQGANConfig``). Training-only fields (dropout, commitment cost) are
    left out: this module is for tokenizing and detokenizing."""

    resolution: int = 256
    """Height and width of a frame in pixels."""
    num_channels: int = 3
    """Channels of a frame (RGB)."""
    hidden_channels: int = 128
    """Channels of the first level; level i has hidden_channels * channel_mult[i]."""
    channel_mult: tuple[int, ...] = (1, 2, 2, 4, 6)
    """One entry per level; len(channel_mult) - 1 downsamplings (256 -> 16 for five levels)."""
    num_res_blocks: int = 2
    """ResnetBlocks per encoder level (the decoder has one more per level)."""
    attn_resolutions: tuple[int, ...] = ()
    """Feature-map sizes at which each ResnetBlock is followed by self-attention (LWM: none)."""
    no_attn_mid_block: bool = True
    """No self-attention between the two ResnetBlocks of the mid blocks (LWM: True)."""
    z_channels: int = 64
    """Channels of the encoder output and of the decoder input."""
    num_embeddings: int = 8192
    """Codebook size: codes are in [0, num_embeddings)."""
    quantized_embed_dim: int = 64
    """Dimension of a codebook entry."""
    resample_with_conv: bool = True
    """Strided convolution to downsample and a convolution after upsampling (False: average pool / plain)."""
    num_groups: int = 32
    """GroupNorm groups (Flax's default, which LWM uses)."""
    norm_eps: float = 1e-6
    """GroupNorm epsilon (Flax's default)."""

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        if not self.channel_mult:
            raise ValueError("VQGANConfig.channel_mult needs at least one level")
        for name in ("resolution", "num_channels", "hidden_channels", "num_res_blocks", "z_channels",
                     "num_embeddings", "quantized_embed_dim", "num_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"VQGANConfig.{name} must be positive, got {getattr(self, name)}")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"VQGANConfig.resolution ({self.resolution}) must divide by 2 ** (len(channel_mult) - 1)"
                             f" = {self.downsample_factor}")
        widths = {self.hidden_channels * m for m in self.channel_mult} | {self.z_channels}
        bad = sorted(w for w in widths if w % self.num_groups)
        if bad:
            raise ValueError(f"VQGANConfig: channel counts {bad} do not divide into num_groups={self.num_groups} groups")

    @property
    def num_resolutions(self) -> int:
        return len(self.channel_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_resolution(self) -> int:
        """Side of the code grid (16 for LWM)."""
        return self.resolution // self.downsample_factor

    @property
    def codes_per_frame(self) -> int:
        """Codes per frame (256 for LWM)."""
        return self.latent_resolution**2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VQGANConfig:
        d = {k: v for k, v in d.items() if k != "model_type"}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown VQGANConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)


def _norm(config: VQGANConfig, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(config.num_groups, channels, eps=config.norm_eps)


class ResnetBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, config: VQGANConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(config, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(config, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.shortcut is None else self.shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over the positions of a feature map, with 1x1 conv projections."""

    def __init__(self, config: VQGANConfig, channels: int):
        super().__init__()
        self.norm = _norm(config, channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (proj(y).flatten(2).transpose(1, 2) for proj in (self.q, self.k, self.v))  # (b, h*w, c)
        y = F.scaled_dot_product_attention(q, k, v)  # scale c ** -0.5, as LWM
        y = y.transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(y)


class Downsample(nn.Module):
    def __init__(self, config: VQGANConfig, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2) if config.resample_with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # bottom/right only, as LWM (see the module docstring)


class Upsample(nn.Module):
    def __init__(self, config: VQGANConfig, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if config.resample_with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Level(nn.Module):
    """One resolution level: ResnetBlocks (each followed by attention when the level has it), then an
    optional resampling."""

    def __init__(self, config: VQGANConfig, in_channels: int, out_channels: int, num_blocks: int,
                 resolution: int, resample: type[nn.Module] | None):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResnetBlock(config, in_channels if j == 0 else out_channels, out_channels) for j in range(num_blocks))
        with_attn = resolution in config.attn_resolutions
        self.attns = nn.ModuleList(AttnBlock(config, out_channels) for _ in range(num_blocks if with_attn else 0))
        self.resample = resample(config, out_channels) if resample is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for j, block in enumerate(self.blocks):
            x = block(x)
            if self.attns:
                x = self.attns[j](x)
        return x if self.resample is None else self.resample(x)


class MidBlock(nn.Module):
    def __init__(self, config: VQGANConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(config, channels, channels)
        self.attn = None if config.no_attn_mid_block else AttnBlock(config, channels)
        self.block_2 = ResnetBlock(config, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_1(x)
        if self.attn is not None:
            x = self.attn(x)
        return self.block_2(x)


class Encoder(nn.Module):
    def __init__(self, config: VQGANConfig):
        super().__init__()
        widths = [config.hidden_channels * m for m in config.channel_mult]
        last = config.num_resolutions - 1
        self.conv_in = nn.Conv2d(config.num_channels, config.hidden_channels, 3, padding=1)
        self.down = nn.ModuleList(
            Level(config, config.hidden_channels if i == 0 else widths[i - 1], widths[i], config.num_res_blocks,
                  config.resolution // 2**i, Downsample if i != last else None)
            for i in range(config.num_resolutions))
        self.mid = MidBlock(config, widths[-1])
        self.norm_out = _norm(config, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], config.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.down:
            x = level(x)
        x = self.mid(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Decoder(nn.Module):
    """``up[i]`` is level i (``up[-1]`` is the deepest and runs first), mirroring the encoder's ``down``."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        widths = [config.hidden_channels * m for m in config.channel_mult]
        last = config.num_resolutions - 1
        self.conv_in = nn.Conv2d(config.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(config, widths[-1])
        self.up = nn.ModuleList(
            Level(config, widths[i + 1] if i != last else widths[-1], widths[i], config.num_res_blocks + 1,
                  config.resolution // 2**i, Upsample if i != 0 else None)
            for i in range(config.num_resolutions))
        self.norm_out = _norm(config, widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.num_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(x))
        for level in reversed(self.up):
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VectorQuantizer(nn.Module):
    """The codebook: ``embeddings`` (num_embeddings, dim), nearest entry by Euclidean distance."""

    # Rows of the (rows x num_embeddings) distance matrix computed at once: 4096 x 8192 fp32 is 128 MiB,
    # where a whole batch of 64 frames (16384 rows) at once would be 512 MiB.
    chunk_rows = 4096

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.embeddings = nn.Parameter(torch.empty(num_embeddings, dim).uniform_(-1 / num_embeddings, 1 / num_embeddings))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z: (rows, dim) -> codes (rows,) int64: the nearest entry; ties go to the lowest index (as jnp.argmin).
        Distances in fp32 whatever the module dtype, so codes do not change with the compute dtype."""
        e = self.embeddings.detach().float()
        e_sq = e.square().sum(1)
        codes = []
        for part in z.detach().float().split(self.chunk_rows):
            # ||z||^2 is the same for every entry of a row, so the argmin needs only ||e||^2 - 2 z.e
            codes.append(torch.addmm(e_sq, part, e.t(), alpha=-2.0).argmin(1))
        return torch.cat(codes) if codes else torch.empty(0, dtype=torch.long, device=z.device)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z: (batch, dim, h, w) -> (z_q (batch, dim, h, w), codes (batch, h, w) int64). z_q carries the
        straight-through gradient to z."""
        b, d, h, w = z.shape
        codes = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)
        z_q = self.lookup(codes).to(z.dtype)
        return z + (z_q - z).detach(), codes

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (batch, h, w) -> entries (batch, dim, h, w)."""
        return F.embedding(codes, self.embeddings).permute(0, 3, 1, 2)


class VQGAN(nn.Module):
    """LWM's VQGAN (see the module docstring). Pixels are NCHW in [-1, 1]; codes are int64 in
    [0, num_embeddings)."""

    def __init__(self, config: VQGANConfig | None = None):
        super().__init__()
        self.config = config = config or VQGANConfig()
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.quantized_embed_dim, 1)
        self.quantizer = VectorQuantizer(config.num_embeddings, config.quantized_embed_dim)
        self.post_quant_conv = nn.Conv2d(config.quantized_embed_dim, config.z_channels, 1)
        self.decoder = Decoder(config)

    def _frames(self, x: torch.Tensor, frame_dims: int, what: str) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(batch, [frames,] *frame_shape) -> (batch * frames, *frame_shape) and the leading shape."""
        if x.dim() not in (frame_dims + 1, frame_dims + 2):
            raise ValueError(f"{what} must have {frame_dims + 1} dims (batch, ...) or {frame_dims + 2} (batch, "
                             f"frames, ...), got shape {tuple(x.shape)}")
        lead = tuple(x.shape[: x.dim() - frame_dims])
        return x.reshape(-1, *x.shape[x.dim() - frame_dims:]), lead

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z: (batch, quantized_embed_dim, h, w), the output of ``quant_conv`` -> (z_q, codes (batch, h, w))."""
        return self.quantizer(z)

    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (batch, 3, resolution, resolution) -> pre-quantization latents (batch, dim, h, w)."""
        return self.quant_conv(self.encoder(pixels))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels: (batch, 3, 256, 256) or (batch, frames, 3, 256, 256), values in [-1, 1] ->
        codes (batch, 16, 16) or (batch, frames, 16, 16), int64."""
        c, r = self.config.num_channels, self.config.resolution
        x, lead = self._frames(pixels, 3, "pixels")
        if tuple(x.shape[1:]) != (c, r, r):
            raise ValueError(f"pixels: expected frames of shape ({c}, {r}, {r}) (channels first), got "
                             f"{tuple(x.shape[1:])}; resize and crop with ringlwm.vision.preprocess.preprocess_frame")
        _, codes = self.quantize(self.encode_latents(x.to(self.quant_conv.weight.dtype)))
        return codes.view(*lead, *codes.shape[1:])

    def embed_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (batch, h, w) -> codebook entries (batch, quantized_embed_dim, h, w)."""
        n = self.config.num_embeddings
        if codes.is_floating_point():
            raise TypeError(f"codes must be integers, got {codes.dtype}")
        if codes.numel() and codes.device.type != "meta" and (codes.min() < 0 or codes.max() >= n):
            raise ValueError(f"codes must be in [0, {n}), got values in [{int(codes.min())}, {int(codes.max())}] "
                             "(8192 / 8193 are LWM's <eof> / <eov> markers: strip them before decoding)")
        return self.quantizer.lookup(codes.long())

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes: (batch, h, w) or (batch, frames, h, w) -> pixels (batch, [frames,] 3, H, W), clipped to
        [-1, 1] as LWM does."""
        x, lead = self._frames(codes, 2, "codes")
        pixels = self.decoder(self.post_quant_conv(self.embed_codes(x)))
        return pixels.clamp(-1, 1).view(*lead, *pixels.shape[1:])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Reconstruction: decode(encode(pixels))."""
        return self.decode(self.encode(pixels))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory``; returns the directory."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps({"model_type": MODEL_TYPE, **self.config.to_dict()}, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                  str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None) -> VQGAN:
        """Load a ``save_pretrained`` folder (e.g. written by ``ringlwm.convert.vqgan_flax``), in eval mode."""
        from safetensors.torch import load_file

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for p in (config_path, weights_path):
            if not p.is_file():
                hint = (" (LWM's Flax weights convert with `python -m ringlwm.convert.vqgan_flax --input vqgan "
                        "--out DIR`)")
                raise FileNotFoundError(f"no {p.name} in {directory}: not a VQGAN.save_pretrained folder{hint}")
        raw = json.loads(config_path.read_text())
        if raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
            raise ValueError(f"{config_path} is for a {raw['model_type']!r} model, not {MODEL_TYPE!r}")
        with torch.device("meta"):
            model = cls(VQGANConfig.from_dict(raw))
        state = load_file(str(weights_path))
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        wrong = [f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k].shape)}"
                 for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"{weights_path} does not match its config: missing {missing}, unexpected {unexpected}, "
                             f"shape mismatches {wrong}")
        model.load_state_dict(state, assign=True)
        return model.to(device=device, dtype=dtype).eval()
