"""What every entry point shares: the one model loader and provenance records (process groups:
``ringlwm.distributed``).

    device = init_distributed()                       # ringlwm.distributed: torchrun, or a group of one
    model = load_model("runs/demo/hf", device=device, purpose="ringlwm.generate")
    record = {"model": model_fingerprint("runs/demo/hf"), "tokenizer": path_fingerprint("tok.model"), ...}
    resume = check_provenance(previous_record, record, what="needle results", path=out, overwrite=False)

``train``, ``generate``, ``vision.generate`` and the evaluations go through these, so that a checkpoint
of the wrong kind is refused within seconds (naming what was found), and so that a resumable output
(needle results, book QA) knows what produced it and refuses to mix in results of anything else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.distributed as dist

from ringlwm.registry import ringlwm_class, trainable_model_types

# ------------------------------------------------------------------------------------------------
# The model loader
# ------------------------------------------------------------------------------------------------

TEXT_MODEL_TYPES = trainable_model_types(vision=False)
VISION_MODEL_TYPES = trainable_model_types(vision=True)


def read_model_config(path: str | Path, *, vision: bool | None = None, purpose: str = "ringlwm") -> dict:
    """The raw ``config.json`` of a checkpoint directory, after checking that ringlwm can run it.

    vision: True needs an LWM vision-language checkpoint, False a text Llama one, None takes either.
    Raises FileNotFoundError / ValueError naming the path, the model type found and what would work."""
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"{purpose}: no model directory at {str(path)!r}")
    if not config_file.is_file():
        raise FileNotFoundError(f"{purpose}: {str(path)!r} has no config.json; give a Hugging Face checkpoint "
                                "directory (save_pretrained output, or the hf/ folder of a ringlwm run)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{purpose}: {config_file} is not valid JSON ({err})") from None
    model_type = config.get("model_type")
    accepted = {None: TEXT_MODEL_TYPES + VISION_MODEL_TYPES, False: TEXT_MODEL_TYPES,
                True: VISION_MODEL_TYPES}[vision]
    if model_type not in accepted:
        found = f"model_type {model_type!r}"
        if config.get("architectures"):
            found += f" ({', '.join(config['architectures'])})"
        kinds = {"llama": "a Llama checkpoint (model_type 'llama')",
                 "ringlwm_lwm": "an LWM vision-language checkpoint (model_type 'ringlwm_lwm')"}
        raise ValueError(f"{purpose}: {str(path)!r} holds {found}; it needs "
                         f"{' or '.join(kinds[t] for t in accepted)}")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise FileNotFoundError(f"{purpose}: {str(path)!r} has a config.json but no weights (*.safetensors or *.bin)")
    return config


def load_model(path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
               vision: bool | None = None, purpose: str = "ringlwm", config: dict | None = None):
    """Load a checkpoint directory as a ringlwm model, in eval mode on ``device``: a Llama checkpoint as
    ``RingLlamaForCausalLM``, an LWM vision-language one as ``RingLwmForCausalLM``. The checkpoint's type is
    checked from its config.json first (see ``read_model_config``); ``dtype`` None keeps the stored one.
    ``config``: that config.json as ``read_model_config`` returned it, when the caller has read it already."""
    if config is None:
        config = read_model_config(path, vision=vision, purpose=purpose)
    cls = ringlwm_class(config["model_type"])
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return cls.from_pretrained(path, config=cls.config_class.from_dict(config), **kwargs).to(device).eval()


# ------------------------------------------------------------------------------------------------
# Fingerprints and provenance
# ------------------------------------------------------------------------------------------------

_WHOLE_FILE_BYTES = 64 << 20  # files up to this size are hashed whole
_SAMPLE_BYTES = 1 << 20  # larger ones: their size, and 1 MiB at 8 evenly spaced offsets


def _file_digest(path: Path, digest) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}:{size}:".encode())
    with path.open("rb") as f:
        if size <= _WHOLE_FILE_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            return
        # A weight file of many GB: every tensor changes in training, so samples spread over the file tell
        # two checkpoints apart at a fraction of the cost of reading all of it.
        for i in range(8):
            f.seek((size - _SAMPLE_BYTES) * i // 7)
            digest.update(f.read(_SAMPLE_BYTES))


def path_fingerprint(path: str | Path, patterns: Iterable[str] = ("*",)) -> str:
    """A short hash of a file's content, or of the files of a directory matching ``patterns`` (names, sizes
    and content; files over 64 MiB by their size and sampled blocks). Independent of where the files live."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        _file_digest(path, digest)
    elif path.is_dir():
        files = sorted({p for pattern in patterns for p in path.glob(pattern) if p.is_file()})
        if not files:
            raise FileNotFoundError(f"no files matching {list(patterns)} in {path}")
        for file in files:
            _file_digest(file, digest)
    else:
        raise FileNotFoundError(f"nothing to fingerprint at {str(path)!r}")
    return digest.hexdigest()[:16]


TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges*")


def tokenizer_files_fingerprint(path: str | Path) -> str:
    """Hash of a tokenizer file, or of the tokenizer files of a folder (not the model weights beside them)."""
    path = Path(path)
    return path_fingerprint(path, TOKENIZER_FILES) if path.is_dir() else path_fingerprint(path)


def model_fingerprint(path: str | Path) -> dict:
    """What identifies a checkpoint directory: its resolved path, and hashes of its config and its weights."""
    path = Path(path)
    return {"path": str(path.resolve()), "config": path_fingerprint(path / "config.json"),
            "weights": path_fingerprint(path, ("*.safetensors", "*.bin", "*.safetensors.index.json"))}


def text_fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def differing_keys(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two nested mappings (lists compared whole)."""
    keys = []
    for key in sorted(set(old) | set(new), key=str):
        where = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            keys += differing_keys(a, b, where + ".")
        elif a != b:
            keys.append(where)
    return keys


def _lookup(tree: Mapping, dotted: str):
    if dotted in tree:  # a flat {dotted.key: value} mapping
        return tree[dotted]
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return "<absent>"
        node = node[part]
    return node


def describe_differences(old: Mapping, new: Mapping, keys: list[str], limit: int = 8) -> str:
    shown = [f"{k}: {_lookup(old, k)!r} -> {_lookup(new, k)!r}" for k in keys[:limit]]
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return "; ".join(shown) + more


def check_provenance(previous: Mapping | None, current: Mapping, *, what: str, path: str | Path,
                     overwrite: bool) -> bool:
    """Whether earlier results at ``path`` (produced by ``previous``) may be resumed now (``current``).

    True: same producer, resume. False: nothing to resume (none there, or ``overwrite``: start fresh).
    A different producer, or results that recorded none, raise ValueError naming the differing keys."""
    if overwrite or previous is None:
        return False
    if not previous:
        raise ValueError(f"{path} holds {what} that do not record what produced them; "
                         "pass --overwrite to start fresh, or choose another --out")
    keys = differing_keys(previous, current)
    if keys:
        raise ValueError(f"{path} holds {what} produced by different settings ({describe_differences(previous, current, keys)}); "
                         "pass --overwrite to replace them, or choose another --out")
    return True


def agree_on_error(error: Exception | None, what: str) -> None:
    """Raise on every rank when any rank raised: a rank that refused to resume ``what`` must not leave the
    others waiting in the next collective. Re-raises this rank's own error; a rank that had none raises a
    ValueError naming the ranks that did. Outside torch.distributed (or on one rank): raise ``error``."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise error
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flags = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device)
    flags[dist.get_rank()] = error is not None
    dist.all_reduce(flags)
    if error is not None:
        raise error
    if flags.any():
        failed = [r for r, f in enumerate(flags.tolist()) if f]
        raise ValueError(f"rank(s) {failed} stopped {what} (see their error); this rank stops too")
