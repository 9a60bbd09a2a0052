"""Ring blocks on FlashAttention kernels from libraries: torch's own FlashAttention-2 and cuDNN attention (ATen
ops of every CUDA build of torch) and the flash-attn package, as block backends beside "triton" and "cpu".

    torch_flash  aten._flash_attention_forward / _backward (torch's FlashAttention-2): sm80+, fp16/bf16,
                 head_dim <= 256 and a multiple of 8; GQA natively; packed documents through varlen
                 (cum_seq_q / cum_seq_k)
    cudnn        aten._scaled_dot_product_cudnn_attention / _backward: sm80+, cuDNN 9, fp16/bf16,
                 head_dim <= 128 and a multiple of 8; K/V heads repeated for GQA (a copy: the op's grouped-head
                 support is not verified); one document per block row (no varlen)
    flash_attn   the flash-attn package when installed: FlashAttention-4 (``flash_attn.cute``, sm90+) or else
                 FlashAttention-2 (``flash_attn.flash_attn_interface``, sm80+); fp16/bf16, head_dim <= 256 and a
                 multiple of 8; GQA natively; packed documents through varlen

What a ring block asks for (query i sees key j when ``q_offset + i >= kv_offset + j`` if causal, and when both
are in one document if segment ids are given) and how it is expressed (``block_mask``):
  full      not causal, or every key at or before every query: no mask
  diagonal  causal, q_offset == kv_offset and as many queries as keys: the library's causal flag (for a square
            block its bottom-right alignment is the top-left one)
  empty     every key after every query: out 0, lse -inf, no kernel
  offset    anything else: not expressed (the libraries align a non-square causal mask to the bottom right);
            such a block goes to the next backend (``FALLBACK``). The ring's steps are full or diagonal.
Packed documents: each document a contiguous run of the row, the documents that both sides hold in one order
(``packed_documents``): what the packer produces. A document that one side lacks is a zero-length sequence
there; query rows whose document has no key in the block get out 0 and lse -inf (the libraries give +inf).

Rounding: these kernels return the block's ``out`` and its gradients in the inputs' dtype. The ring merges
blocks in fp32, so with bf16 inputs each ring step's out and dq/dk/dv are rounded to bf16 once before the fp32
sum (the Triton and CPU backends hand over fp32 gradients). ``make gpu-check`` measures the end-to-end error
against fp64.

Each backend's library calls go through a ``FlashOps`` (two functions with one contract), so a test can run the
adapters on CPU against an emulation of the same contract; nothing here imports flash-attn or touches a GPU
before a block runs on one.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

LIBRARY_BACKENDS = ("torch_flash", "cudnn", "flash_attn")
FALLBACK = {"flash_attn": "torch_flash", "cudnn": "torch_flash", "torch_flash": "triton"}
"""Where a block goes when a backend cannot express it (one notice per backend, target and reason)."""
HALF_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = {"torch_flash": 256, "cudnn": 128, "flash_attn": 256}


class Unsupported(ValueError):
    """A block that a library backend cannot express (the selection should have sent it elsewhere)."""


def block_mask(seq_q: int, seq_k: int, causal: bool, q_offset: int, kv_offset: int) -> str:
    """"full", "diagonal", "empty" or "offset": the module docstring's table."""
    if not causal or q_offset >= kv_offset + seq_k - 1:
        return "full"
    if q_offset + seq_q - 1 < kv_offset:
        return "empty"
    if q_offset == kv_offset and seq_q == seq_k:
        return "diagonal"
    return "offset"


# ------------------------------------------------------------------------------------------------
# Packed documents as varlen sequences
# ------------------------------------------------------------------------------------------------

class Documents(NamedTuple):
    """A block's documents as varlen sequences, batch rows one after another: the cumulative query and key
    lengths (int32, on the block's device), the longest of each, and the query rows (batch * seq_q) whose
    document has no key in the block (None when every one has)."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    max_q: int
    max_k: int
    keyless: torch.Tensor | None


def _runs(row: torch.Tensor) -> list[tuple[int, int]]:
    ids, counts = torch.unique_consecutive(row, return_counts=True)
    return list(zip(ids.tolist(), counts.tolist()))


def document_lengths(segment_ids: torch.Tensor, kv_segment_ids: torch.Tensor) -> tuple[list[int], list[int]] | str:
    """Per varlen sequence (batch rows one after another), its query and key lengths; or the reason the ids are
    not contiguous documents in one order. One copy of the ids to the host."""
    q_ids, k_ids = segment_ids.detach().cpu(), kv_segment_ids.detach().cpu()
    lengths_q, lengths_k = [], []
    for b in range(q_ids.shape[0]):
        q_runs, k_runs = _runs(q_ids[b]), _runs(k_ids[b])
        for side, runs in (("query", q_runs), ("key", k_runs)):
            if len({i for i, _ in runs}) < len(runs):
                return f"a document is split into pieces on the {side} side (row {b}): ids are not contiguous runs"
        common = {i for i, _ in q_runs} & {i for i, _ in k_runs}
        if [i for i, _ in q_runs if i in common] != [i for i, _ in k_runs if i in common]:
            return f"the documents of row {b} come in different orders on the query and key sides"
        a = c = 0
        while a < len(q_runs) or c < len(k_runs):
            q_id = q_runs[a][0] if a < len(q_runs) else None
            k_id = k_runs[c][0] if c < len(k_runs) else None
            if q_id is not None and q_id == k_id:
                lengths_q.append(q_runs[a][1])
                lengths_k.append(k_runs[c][1])
                a, c = a + 1, c + 1
            elif q_id is not None and q_id not in common:
                lengths_q.append(q_runs[a][1])
                lengths_k.append(0)
                a += 1
            else:
                lengths_q.append(0)
                lengths_k.append(k_runs[c][1])
                c += 1
    return lengths_q, lengths_k


_DOCUMENTS: OrderedDict = OrderedDict()
DOCUMENTS_CACHE = 16
"""Blocks whose ``Documents`` are kept: the selection and the kernel call of one block, and a ring's steps (the
same id tensors in every layer and in the backward) read the ids from the host once."""


def packed_documents(segment_ids: torch.Tensor, kv_segment_ids: torch.Tensor, causal: bool = False) -> Documents | str:
    """The block's ``Documents``, or the reason they cannot be varlen sequences (with ``causal``: a diagonal
    block, so each document must have as many queries as keys). Cached by the id tensors' identity and version
    (the cache holds them, so an identity is not reused while cached)."""
    key = (id(segment_ids), segment_ids._version, id(kv_segment_ids), kv_segment_ids._version, causal)
    if key in _DOCUMENTS:
        _DOCUMENTS.move_to_end(key)
        return _DOCUMENTS[key][2]
    result = _packed_documents(segment_ids, kv_segment_ids, causal)
    _DOCUMENTS[key] = (segment_ids, kv_segment_ids, result)
    while len(_DOCUMENTS) > DOCUMENTS_CACHE:
        _DOCUMENTS.popitem(last=False)
    return result


def _packed_documents(segment_ids, kv_segment_ids, causal):
    lengths = document_lengths(segment_ids, kv_segment_ids)
    if isinstance(lengths, str):
        return lengths
    lengths_q, lengths_k = lengths
    if causal and lengths_q != lengths_k:
        return "a causal block whose query and key documents differ in length"
    device = segment_ids.device
    cu_q = torch.tensor([0] + lengths_q, dtype=torch.int64).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lengths_k, dtype=torch.int64).cumsum(0).to(torch.int32)
    keyless = None
    if any(n_q and not n_k for n_q, n_k in zip(lengths_q, lengths_k)):
        empty = torch.tensor([n_k == 0 for n_k in lengths_k])
        keyless = empty.repeat_interleave(torch.tensor(lengths_q)).to(device)
    return Documents(cu_q.to(device), cu_k.to(device), max(lengths_q), max(lengths_k), keyless)


def one_document(segment_ids: torch.Tensor, kv_segment_ids: torch.Tensor) -> str | None:
    """"same" when every row's queries and keys are all in one and the same document, "disjoint" when no row's
    queries share a document with its keys and each side is one document, None otherwise."""
    first_q, first_k = segment_ids[:, :1], kv_segment_ids[:, :1]
    if not bool((segment_ids == first_q).all()) or not bool((kv_segment_ids == first_k).all()):
        return None
    same = first_q == first_k
    if bool(same.all()):
        return "same"
    return "disjoint" if not bool(same.any()) else None


# ------------------------------------------------------------------------------------------------
# The library calls, behind one contract
# ------------------------------------------------------------------------------------------------

class FlashOps(NamedTuple):
    """One library's FlashAttention calls in the flash-attn layout.

    forward(q, k, v, docs, causal, scale) -> (out, lse): without documents q is (batch, seq_q, heads, d), k/v
    (batch, seq_k, kv_heads, d) (views, last dim contiguous) and lse (batch, heads, seq_q); with ``docs``
    (``Documents``) they are tokens (total, heads, d) and lse (heads, total_q). ``causal`` is the library's
    causal flag (bottom-right aligned). out is in q's dtype; a row with no key gets out 0 and lse +inf or
    -inf (either).
    backward(dout, q, k, v, out, lse, docs, causal, scale) -> (dq, dk, dv) in those layouts; ``lse`` never
    -inf (rows with no key anywhere carry +inf, whose probabilities are 0).
    """

    forward: Callable
    backward: Callable


def _aten_flash_forward(q, k, v, docs, causal, scale):
    if docs is None:
        result = torch.ops.aten._flash_attention_forward(q, k, v, None, None, q.shape[1], k.shape[1], 0.0, causal,
                                                         False, scale=scale)
    else:
        result = torch.ops.aten._flash_attention_forward(q, k, v, docs.cu_q, docs.cu_k, docs.max_q, docs.max_k,
                                                         0.0, causal, False, scale=scale)
    return result[0], result[1]


def _aten_flash_backward(dout, q, k, v, out, lse, docs, causal, scale):
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)  # no dropout: never read
    unused = torch.zeros((), dtype=torch.uint64, device=q.device)
    if docs is None:
        return torch.ops.aten._flash_attention_backward(dout, q, k, v, out, lse, None, None, q.shape[1], k.shape[1],
                                                        0.0, causal, rng_state, unused, scale=scale)
    return torch.ops.aten._flash_attention_backward(dout, q, k, v, out, lse, docs.cu_q, docs.cu_k, docs.max_q,
                                                    docs.max_k, 0.0, causal, rng_state, unused, scale=scale)


TORCH_FLASH_OPS = FlashOps(_aten_flash_forward, _aten_flash_backward)


def _aten_cudnn_forward(q, k, v, causal, scale):
    """(batch, heads, seq, d) in and out; lse (batch, heads, seq)."""
    result = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return result[0], result[1].reshape(q.shape[:3])


def _aten_cudnn_backward(dout, q, k, v, out, lse, causal, scale):
    seed = torch.zeros((), dtype=torch.int64, device=q.device)  # no dropout: never read
    offset = torch.zeros((), dtype=torch.int64, device=q.device)
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse.unsqueeze(-1).contiguous(), seed, offset, None, None, None, q.shape[2], k.shape[2],
        0.0, causal, scale=scale)


class CudnnOps(NamedTuple):
    """cuDNN attention's calls in the (batch, heads, seq, d) layout, K/V with as many heads as Q."""

    forward: Callable
    backward: Callable


CUDNN_OPS = CudnnOps(_aten_cudnn_forward, _aten_cudnn_backward)


def _keywords(fn: Callable, **wanted) -> dict:
    """The arguments among ``wanted`` that ``fn`` takes, by name (flash-attn's private functions change their
    signatures between releases: window sizes as a pair or two numbers, softcap, alibi slopes)."""
    params = inspect.signature(fn).parameters
    if "window_size" in params:
        wanted["window_size"] = (-1, -1)
    missing = [name for name, p in params.items()
               if p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD and p.kind is not p.VAR_POSITIONAL
               and name not in wanted]
    if missing:
        raise RuntimeError(f"flash-attn's {fn.__name__} wants arguments ringlwm does not know: {missing}; the "
                           "flash_attn backend supports flash-attn 2.4-2.8 and flash-attn-4")
    return {name: value for name, value in wanted.items() if name in params}


def _flash_attn2_ops() -> FlashOps:
    fa = importlib.import_module("flash_attn.flash_attn_interface")
    common = dict(dropout_p=0.0, window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None)

    def forward(q, k, v, docs, causal, scale):
        if docs is None:
            fn = fa._flash_attn_forward
            args = dict(q=q, k=k, v=v, softmax_scale=scale, causal=causal, return_softmax=False, **common)
        else:
            fn = fa._flash_attn_varlen_forward
            args = dict(q=q, k=k, v=v, cu_seqlens_q=docs.cu_q, cu_seqlens_k=docs.cu_k, max_seqlen_q=docs.max_q,
                        max_seqlen_k=docs.max_k, softmax_scale=scale, causal=causal, return_softmax=False,
                        block_table=None, **common)
        result = fn(**_keywords(fn, **args))
        # flash-attn >= 2.6: (out, lse, S_dmask, rng_state); before: (out, q, k, v, out_padded, lse, ...)
        return (result[0], result[1]) if len(result) == 4 else (result[0], result[5])

    def backward(dout, q, k, v, out, lse, docs, causal, scale):
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        args = dict(dout=dout.contiguous(), q=q, k=k, v=v, out=out.contiguous(), softmax_lse=lse, dq=dq, dk=dk,
                    dv=dv, softmax_scale=scale, causal=causal, deterministic=False, rng_state=None, **common)
        if docs is None:
            fn = fa._flash_attn_backward
        else:
            fn = fa._flash_attn_varlen_backward
            args.update(cu_seqlens_q=docs.cu_q, cu_seqlens_k=docs.cu_k, max_seqlen_q=docs.max_q,
                        max_seqlen_k=docs.max_k)
        fn(**_keywords(fn, **args))
        return dq, dk, dv

    return FlashOps(forward, backward)


def _flash_attn4_ops() -> FlashOps:
    fa = importlib.import_module("flash_attn.cute.interface")

    def varlen(docs):
        return {} if docs is None else dict(cu_seqlens_q=docs.cu_q, cu_seqlens_k=docs.cu_k, max_seqlen_q=docs.max_q,
                                            max_seqlen_k=docs.max_k)

    def forward(q, k, v, docs, causal, scale):
        result = fa._flash_attn_fwd(q.contiguous(), k.contiguous(), v.contiguous(), softmax_scale=scale,
                                    causal=causal, return_lse=True, **varlen(docs))
        return result[0], result[1]

    def backward(dout, q, k, v, out, lse, docs, causal, scale):
        result = fa._flash_attn_bwd(q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(),
                                    dout.contiguous(), lse.contiguous(), softmax_scale=scale, causal=causal,
                                    **varlen(docs))
        return result[0], result[1], result[2]

    return FlashOps(forward, backward)


@functools.cache
def _installed(module: str) -> bool:
    """Whether ``module`` (a package, or a pure-Python submodule of a regular package) can be imported, found
    without importing it or its parents (``find_spec`` of a submodule would import the package); once per
    process, since the selection asks for every block."""
    top, _, rest = module.partition(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not rest:
        return spec is not None
    for folder in spec.submodule_search_locations or ():
        path = Path(folder, *rest.split("."))
        if (path / "__init__.py").is_file() or path.with_suffix(".py").is_file():
            return True
    return False


def flash_attn_flavour(device: torch.device | None = None) -> str | None:
    """"flash-attn-4" (sm90+ with ``flash_attn.cute``), "flash-attn-2", or None when flash-attn is not installed
    (found without importing it)."""
    if not _installed("flash_attn"):
        return None
    if device_capability(device) >= (9, 0) and _installed("flash_attn.cute"):
        return "flash-attn-4"
    if _installed("flash_attn.flash_attn_interface"):
        return "flash-attn-2"
    return None


_FLASH_ATTN_OPS: dict[str, FlashOps] = {}


def flash_attn_ops(device: torch.device | None = None) -> FlashOps:
    flavour = flash_attn_flavour(device)
    if flavour is None:
        raise ImportError("the 'flash_attn' backend needs the flash-attn package: pip install flash-attn "
                          "(FlashAttention-2, compiled for your CUDA) or flash-attn-4 (Hopper and newer)")
    if flavour not in _FLASH_ATTN_OPS:
        _FLASH_ATTN_OPS[flavour] = _flash_attn4_ops() if flavour == "flash-attn-4" else _flash_attn2_ops()
    return _FLASH_ATTN_OPS[flavour]


# ------------------------------------------------------------------------------------------------
# The adapters: ringlwm's block contract on top of the library calls
# ------------------------------------------------------------------------------------------------

def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _empty_block(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros_like(q), torch.full(q.shape[:3], float("-inf"), dtype=_stat_dtype(q.dtype), device=q.device)


def _empty_gradients(q, k, v) -> tuple[torch.Tensor, ...]:
    return tuple(torch.zeros(t.shape, dtype=_stat_dtype(q.dtype), device=q.device) for t in (q, k, v))


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, d) -> (batch * seq, heads, d): a strided view for one batch row (a ring's usual case: the
    kernels take any token and head strides, the last dim contiguous), a copy for more."""
    b, h, s, d = t.shape
    if b == 1 and t.stride(-1) == 1:
        return t[0].transpose(0, 1)
    return t.transpose(1, 2).reshape(b * s, h, d)


def _untokens(t: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch * seq, heads, d) -> (batch, heads, seq, d), a view."""
    total, h, d = t.shape
    return t.view(batch, total // batch, h, d).transpose(1, 2)


def _expressed_mask(q, k, causal, q_offset, kv_offset) -> str:
    """``block_mask`` of this block: "full", "diagonal" or "empty"; an "offset" block raises ``Unsupported``."""
    mask = block_mask(q.shape[2], k.shape[2], causal, q_offset, kv_offset)
    if mask == "offset":
        raise Unsupported("a causal block with offsets other than a square diagonal; the selection sends it to "
                          "another backend")
    return mask


def _block_documents(segment_ids, kv_segment_ids, mask):
    docs = packed_documents(segment_ids, kv_segment_ids, causal=mask == "diagonal")
    if isinstance(docs, str):  # only when the choice was made without reading the ids (a torch.compile trace)
        raise Unsupported(f"{docs}: these segment ids need another attention backend (e.g. 'triton'), chosen "
                          "outside torch.compile or named in the model's attention_backend")
    return docs


def flash_forward(ops: FlashOps, q, k, v, *, causal, scale, segment_ids=None, kv_segment_ids=None, q_offset=0,
                  kv_offset=0):
    """One block's (out, lse) through ``ops`` (``FlashOps``) with ringlwm's contract."""
    mask = _expressed_mask(q, k, causal, q_offset, kv_offset)
    if mask == "empty":
        return _empty_block(q)
    flag = mask == "diagonal"
    if segment_ids is None:
        out, lse = ops.forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, flag, scale)
        return out.transpose(1, 2), lse.to(_stat_dtype(q.dtype))
    batch, heads, seq_q, _ = q.shape
    docs = _block_documents(segment_ids, kv_segment_ids, mask)
    out, lse = ops.forward(_tokens(q), _tokens(k), _tokens(v), docs, flag, scale)
    out = _untokens(out, batch)
    lse = lse.to(_stat_dtype(q.dtype)).view(heads, batch, seq_q).transpose(0, 1)
    if docs.keyless is not None:
        rows = docs.keyless.view(batch, 1, seq_q)
        out = out.masked_fill(rows.unsqueeze(-1), 0.0)
        lse = lse.masked_fill(rows, float("-inf"))
    return out, lse.where(lse != float("inf"), float("-inf"))


def flash_backward(ops: FlashOps, dout, q, k, v, out, lse, *, causal, scale, segment_ids=None, kv_segment_ids=None,
                   q_offset=0, kv_offset=0):
    """One block's fp32 (dq, dk, dv) through ``ops`` from the ring's merged (out, lse)."""
    mask = _expressed_mask(q, k, causal, q_offset, kv_offset)
    if mask == "empty":
        return _empty_gradients(q, k, v)
    flag = mask == "diagonal"
    stat = _stat_dtype(q.dtype)
    lse = lse.to(stat).where(lse != float("-inf"), float("inf"))  # the libraries' "no key" is +inf
    if segment_ids is None:
        grads = ops.backward(dout.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                             out.transpose(1, 2), lse.contiguous(), None, flag, scale)
        return tuple(g.transpose(1, 2).to(stat) for g in grads)
    batch, heads, seq_q, _ = q.shape
    docs = _block_documents(segment_ids, kv_segment_ids, mask)
    grads = ops.backward(_tokens(dout), _tokens(q), _tokens(k), _tokens(v), _tokens(out),
                         lse.transpose(0, 1).reshape(heads, batch * seq_q), docs, flag, scale)
    return tuple(_untokens(g, batch).to(stat) for g in grads)


def _cudnn_inputs(q, k, v, segment_ids, kv_segment_ids):
    """K/V with Q's heads (repeated for GQA) and whether the block is empty by its documents."""
    if segment_ids is not None:
        documents = one_document(segment_ids, kv_segment_ids)
        if documents is None:
            raise Unsupported("cuDNN attention here takes one document per block row")
        if documents == "disjoint":
            return None, None
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    return k, v


def cudnn_forward(q, k, v, *, causal, scale, segment_ids=None, kv_segment_ids=None, q_offset=0, kv_offset=0,
                  ops: CudnnOps | None = None):
    ops = ops or CUDNN_OPS
    mask = _expressed_mask(q, k, causal, q_offset, kv_offset)
    k, v = _cudnn_inputs(q, k, v, segment_ids, kv_segment_ids)
    if mask == "empty" or k is None:
        return _empty_block(q)
    out, lse = ops.forward(q, k, v, mask == "diagonal", scale)
    return out, lse.to(_stat_dtype(q.dtype))


def cudnn_backward(dout, q, k, v, out, lse, *, causal, scale, segment_ids=None, kv_segment_ids=None, q_offset=0,
                   kv_offset=0, ops: CudnnOps | None = None):
    ops = ops or CUDNN_OPS
    mask = _expressed_mask(q, k, causal, q_offset, kv_offset)
    kv_heads = k.shape[1]
    k_full, v_full = _cudnn_inputs(q, k, v, segment_ids, kv_segment_ids)
    if mask == "empty" or k_full is None:
        return _empty_gradients(q, k, v)
    stat = _stat_dtype(q.dtype)
    lse = lse.to(stat).where(lse != float("-inf"), float("inf"))
    dq, dk, dv = ops.backward(dout.contiguous(), q, k_full, v_full, out.contiguous(), lse, mask == "diagonal", scale)
    b, h, s, d = dk.shape
    dk, dv = (g.to(stat).view(b, kv_heads, h // kv_heads, s, d).sum(2) for g in (dk, dv))
    return dq.to(stat), dk, dv


def torch_flash_forward(q, k, v, **kwargs):
    return flash_forward(TORCH_FLASH_OPS, q, k, v, **kwargs)


def torch_flash_backward(dout, q, k, v, out, lse, **kwargs):
    return flash_backward(TORCH_FLASH_OPS, dout, q, k, v, out, lse, **kwargs)


def flash_attn_forward(q, k, v, **kwargs):
    return flash_forward(flash_attn_ops(q.device), q, k, v, **kwargs)


def flash_attn_backward(dout, q, k, v, out, lse, **kwargs):
    return flash_backward(flash_attn_ops(q.device), dout, q, k, v, out, lse, **kwargs)


# ------------------------------------------------------------------------------------------------
# What a device offers and what a block asks
# ------------------------------------------------------------------------------------------------

def device_capability(device: torch.device | None) -> tuple[int, int]:
    """The CUDA compute capability of ``device`` ((0, 0) without a GPU). Tests replace it."""
    if device is not None and device.type != "cuda":
        return (0, 0)
    try:
        return tuple(torch.cuda.get_device_capability(device))
    except (AssertionError, RuntimeError):  # a CPU-only torch, or no GPU
        return (0, 0)


def device_name(device: torch.device | None) -> str:
    """The GPU's name as torch reports it ("NVIDIA H200"); "" without one. Tests replace it."""
    try:
        return torch.cuda.get_device_name(device)
    except (AssertionError, RuntimeError):
        return ""


def unavailable(name: str, device: torch.device) -> str | None:
    """Why the library backend ``name`` cannot run on ``device`` (None: it can)."""
    if device.type != "cuda":
        return f"the {name!r} backend needs CUDA tensors, got tensors on {device}"
    capability = device_capability(device)
    if capability < (8, 0):
        return f"the {name!r} backend needs compute capability 8.0 or newer, the GPU has {capability}"
    if name == "cudnn":
        version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        if not version or version < 90000:
            return f"the 'cudnn' backend needs cuDNN 9 or newer, torch has {version}"
    if name == "flash_attn" and flash_attn_flavour(device) is None:
        return ("the 'flash_attn' backend needs the flash-attn package: pip install flash-attn (FlashAttention-2) "
                "or flash-attn-4 (Hopper and newer)")
    return None


def unsupported(name: str, q, k, causal, segment_ids, kv_segment_ids, q_offset, kv_offset, *,
                read_ids: bool = True) -> str | None:
    """Why the library backend ``name`` cannot express this block (None: it can). ``read_ids``: look at the
    segment ids' values (a host copy); off for tensors without data."""
    if q.dtype not in HALF_DTYPES:
        return f"{q.dtype} inputs (the library kernels take float16 and bfloat16)"
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > MAX_HEAD_DIM[name]:
        return f"head_dim {head_dim} (this kernel takes multiples of 8 up to {MAX_HEAD_DIM[name]})"
    mask = block_mask(q.shape[2], k.shape[2], causal, q_offset, kv_offset)
    if mask == "offset":
        return (f"a causal block with offsets ({q.shape[2]} queries at {q_offset}, {k.shape[2]} keys at {kv_offset}; "
                "only full and square diagonal blocks are expressed)")
    if segment_ids is None or mask == "empty" or not read_ids:
        return None
    if name == "cudnn":
        return None if one_document(segment_ids, kv_segment_ids) else "packed documents (cuDNN takes one per row here)"
    docs = packed_documents(segment_ids, kv_segment_ids, causal=mask == "diagonal")
    return docs if isinstance(docs, str) else None


# ------------------------------------------------------------------------------------------------
# "auto": the fastest backend measured on this GPU
# ------------------------------------------------------------------------------------------------

TABLE_ENV = "RINGLWM_ATTENTION_TABLE"
UNMEASURED_DEFAULT = "torch_flash"
"""auto's choice on a GPU with no measurement (sm80+; older GPUs get "triton"): torch's FlashAttention-2 ships
with every CUDA build of torch and is the kernel the peers' rings run."""


def table_path() -> Path:
    """Where ``make gpu-check`` writes the measured table and "auto" reads it: $RINGLWM_ATTENTION_TABLE, or
    ~/.cache/ringlwm/attention_backends.json."""
    return Path(os.environ.get(TABLE_ENV) or Path.home() / ".cache" / "ringlwm" / "attention_backends.json")


def measured_backend(table: dict, gpu: str, head_dim: int) -> str | None:
    """The fastest backend that ``table`` records for ``gpu`` at ``head_dim`` (the nearest measured head_dim when
    that one was not measured); None when the GPU is not in it.

    The table (``bench.gpu_check`` writes it): {"version": 1, "gpus": {"NVIDIA H200": {"fastest": {"64":
    "torch_flash", "128": "cudnn"}, "torch": "2.13.0", "date": ...}}}."""
    fastest = table.get("gpus", {}).get(gpu, {}).get("fastest", {})
    if not fastest:
        return None
    nearest = min(fastest, key=lambda d: (abs(int(d) - head_dim), -int(d)))
    return fastest[nearest]


_TABLE: dict[Path, dict] = {}


def read_table(path: Path | None = None) -> dict:
    """The measured table at ``path`` (``table_path()``), read once per process; {} when there is none. A table
    that is not valid JSON or not version 1 is refused (a stale choice would look measured)."""
    path = path or table_path()
    if path not in _TABLE:
        if not path.is_file():
            _TABLE[path] = {}
        else:
            try:
                table = json.loads(path.read_text())
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} is not a valid attention backend table ({error}); rerun make gpu-check "
                                 f"or remove it") from None
            if table.get("version") != 1:
                raise ValueError(f"{path} has table version {table.get('version')!r}, this ringlwm reads 1; rerun "
                                 "make gpu-check")
            _TABLE[path] = table
    return _TABLE[path]


def auto_backend(q: torch.Tensor, holds_no_data: bool = False) -> str:
    """What "auto" runs ``q``'s blocks on: on CPU tensors the fused CPU kernel; on a GPU the fastest backend
    measured there (``measured_backend``) when it can run, else ``UNMEASURED_DEFAULT`` (sm80+) or "triton",
    with a one-time notice saying how to measure. Tensors without data (fake GPUs) have no GPU to measure:
    "triton", the kernel the planner models."""
    if q.device.type != "cuda":
        return "cpu"
    if holds_no_data:
        return "triton"
    gpu = device_name(q.device)
    choice = measured_backend(read_table(), gpu, q.shape[-1])
    if choice is not None and (choice not in LIBRARY_BACKENDS or unavailable(choice, q.device) is None):
        return choice
    fallback = UNMEASURED_DEFAULT if device_capability(q.device) >= (8, 0) else "triton"
    why = "is not in" if choice is None else f"names {choice!r}, which cannot run here, in"
    notice_once(f"attention backend 'auto': {gpu or 'this GPU'} {why} the measured table ({table_path()}); using "
                f"{fallback!r}. make gpu-check measures the backends and writes the table.")
    return fallback


_NOTICES: set[str] = set()


def notice_once(message: str) -> None:
    """A warning logged once per process (``ringlwm.kernels`` logger)."""
    if message not in _NOTICES:
        _NOTICES.add(message)
        logging.getLogger("ringlwm.kernels").warning(message)
