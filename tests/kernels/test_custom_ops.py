"""The block ops as torch.library custom ops: opcheck, fullgraph torch.compile, and FakeTensorMode.

``ringlwm::block_attention_forward`` / ``ringlwm::block_attention_backward`` must (1) pass
``torch.library.opcheck`` (schema, registered autograd, fake implementation whose shapes, dtypes and strides
match the real ones, AOT dispatch with dynamic shapes) on both backends; (2) let ``torch.compile(fullgraph=True)``
record attention as op nodes, with results equal to eager; (3) under ``FakeTensorMode`` run the Triton path's
shapes and dtypes with no GPU and no Triton interpreter.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from op_recorder import BACKWARD_OP, FORWARD_OP, RecordOps
from reference import max_err, reference_attention
from ringlwm.kernels import (
    block_attention_backward,
    block_attention_forward,
    blockwise_attention,
    merge_attention,
    resolve_backend,
)
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

GPU = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if GPU else "cpu"


def _device(backend):
    return "cpu" if backend == "cpu" else TRITON_DEVICE


def _inputs(dtype, device, *, batch=2, heads=4, kv_heads=2, seq_q=40, seq_k=40, head_dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seq_q, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, kv_heads, seq_k, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, kv_heads, seq_k, head_dim, generator=gen).to(device, dtype)
    q_seg = torch.randint(0, 3, (batch, seq_q), generator=gen).sort(-1).values.to(device)
    kv_seg = torch.randint(0, 3, (batch, seq_k), generator=gen).sort(-1).values.to(device)
    return q, k, v, q_seg, kv_seg


BACKEND_DTYPES = [  # Triton has no fp64, and the interpreter's bf16 dot is wrong (see the kernel tests)
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.float64, id="cpu-fp64"),
    pytest.param("triton", torch.float32, id="triton-fp32"),
    pytest.param("triton", torch.float16, id="triton-fp16"),
]
MASKS = {  # (causal, segment ids, q_offset, kv_offset)
    "causal": (True, False, 0, 0),
    "ring-step-segments": (True, True, 24, 8),
    "full-segments": (False, True, 0, 0),
}
# Every mask on the CPU backend; the interpreter is slow, so Triton gets the ring step, which has them all.
OPCHECK_CASES = [
    pytest.param(backend, dtype, *MASKS[mask], id=f"{case.id}-{mask}")
    for case in BACKEND_DTYPES
    for backend, dtype in [case.values]
    for mask in (MASKS if backend == "cpu" else ["ring-step-segments"])
]


@pytest.mark.parametrize("backend,dtype,causal,segments,q_offset,kv_offset", OPCHECK_CASES)
def test_opcheck(backend, dtype, causal, segments, q_offset, kv_offset):
    """torch.library.opcheck on both ops. The forward with inputs that require grad exercises the registered
    autograd (and AOT dispatch traces the backward op); the fake implementation is checked against real
    outputs for shapes, dtypes and strides."""
    dev = _device(backend)
    q, k, v, q_seg, kv_seg = _inputs(dtype, dev, seq_q=40, seq_k=24)
    seg = (q_seg, kv_seg) if segments else (None, None)
    options = (causal, 0.25, q_offset, kv_offset, backend)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(FORWARD_OP, (q, k, v, *seg, *options))

    with torch.no_grad():
        out, lse = FORWARD_OP(q, k, v, *seg, *options)
    dout = torch.randn_like(out)
    q, k, v = (t.detach() for t in (q, k, v))
    torch.library.opcheck(BACKWARD_OP, (dout, q, k, v, out, lse, *seg, *options))


def test_ops_check_their_backend_against_the_real_tensors(monkeypatch):
    """Called directly (torch.ops.ringlwm.*), the ops check the backend name as the Python layer does."""
    q, k, v, _, _ = _inputs(torch.float32, "cpu")
    with pytest.raises(ValueError, match="unknown attention backend"):
        FORWARD_OP(q, k, v, None, None, True, 0.25, 0, 0, "nope")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        FORWARD_OP(q, k, v, None, None, True, 0.25, 0, 0, "triton")


def test_top_level_kernels_import_is_ringlwm_kernels(monkeypatch):
    """From the repository root, kernels/ is also importable as top-level ``kernels`` (transformers imports it,
    looking for the kernel-hub package). It must be the same modules, not a second copy that registers the ops
    again and replaces their implementations."""
    import importlib
    from pathlib import Path

    import ringlwm.kernels
    import ringlwm.kernels.blockwise

    monkeypatch.syspath_prepend(str(Path(ringlwm.kernels.__file__).parent.parent))
    assert importlib.import_module("kernels") is ringlwm.kernels
    assert importlib.import_module("kernels.blockwise") is ringlwm.kernels.blockwise


def test_lse_is_not_differentiable():
    """A loss through lse would get no gradient from the op's backward: autograd must refuse it, not give 0."""
    q, k, v, _, _ = _inputs(torch.float64, "cpu")
    q.requires_grad_()
    out, lse = blockwise_attention(q, k, v, causal=True, return_lse=True)
    assert out.requires_grad and not lse.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        lse.sum().backward()


# ------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True)
# ------------------------------------------------------------------------------------------------


def _attention_and_grads(fn, q, k, v, dout, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, return_lse=True, **kw)
    out.backward(dout)
    return [out.detach(), lse, q.grad, k.grad, v.grad]


def _op_targets(graph_module):
    return {node.target for node in graph_module.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES[:3])
def test_compiled_blockwise_attention_is_one_graph_equal_to_eager(backend, dtype):
    """fullgraph compile (aot_eager) of blockwise_attention with packed segments and GQA: one graph whose
    attention is the custom op, and out, lse, dq, dk, dv equal to eager. The compiled graph calls the same
    kernels with the same arguments, so the results are bitwise equal."""
    torch._dynamo.reset()  # compile afresh: a cached graph would leave the counter at 0
    dev = _device(backend)
    q, k, v, seg, _ = _inputs(dtype, dev, seq_q=48, seq_k=48)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
    kw = dict(causal=True, segment_ids=seg, backend=backend)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(blockwise_attention, backend=counter, fullgraph=True)
    got = _attention_and_grads(compiled, q, k, v, dout, **kw)
    want = _attention_and_grads(blockwise_attention, q, k, v, dout, **kw)
    assert counter.frame_count == 1 and FORWARD_OP in _op_targets(counter.graphs[0])
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name}: compiled differs from eager by {max_err(a, b)}"
    if dtype == torch.float64:  # and the eager result is the right one
        ref, _ = reference_attention(q, k, v, causal=True, segment_ids=seg, kv_segment_ids=seg)
        assert max_err(got[0], ref) < 1e-12


def test_compiled_block_functions_as_a_ring_step():
    """The ring's pieces compiled in one graph: a block forward with offsets and two segment ids, the merge,
    and a block backward from the merged statistics."""
    q, k, v, q_seg, kv_seg = _inputs(torch.float64, "cpu", seq_q=32, seq_k=32)

    def step(q, k, v, dout):
        kw = dict(causal=True, segment_ids=q_seg, kv_segment_ids=kv_seg, q_offset=32, kv_offset=0, backend="cpu")
        out, lse = block_attention_forward(q, k, v, **{**kw, "kv_offset": 32})
        blk_out, blk_lse = block_attention_forward(q, k, v, **kw)
        out, lse = merge_attention(out, lse, blk_out, blk_lse)
        return out, lse, block_attention_backward(dout, q, k, v, out, lse, **kw)

    dout = torch.randn_like(q)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    got = torch.compile(step, backend=counter, fullgraph=True)(q, k, v, dout)
    want = step(q, k, v, dout)
    assert counter.frame_count == 1 and {FORWARD_OP, BACKWARD_OP} <= _op_targets(counter.graphs[0])
    for a, b in zip((got[0], got[1], *got[2]), (want[0], want[1], *want[2])):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# FakeTensorMode
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("interpret", ["1", None], ids=["interpreter-set", "no-interpreter"])
def test_fake_cpu_tensors_run_the_triton_path(dtype, interpret, monkeypatch):
    """backend="triton" on fake CPU tensors (a fake-device plan of a GPU run): forward and backward trace
    through the Triton ops' fake implementation, with the shapes and dtypes of a GPU run, whether or not
    TRITON_INTERPRET is set (no kernel runs)."""
    if interpret is None:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    with FakeTensorMode(), RecordOps() as record:
        q = torch.empty(2, 8, 4096, 128, dtype=dtype, requires_grad=True)
        k, v = (torch.empty(2, 2, 4096, 128, dtype=dtype, requires_grad=True) for _ in range(2))
        seg = torch.zeros(2, 4096, dtype=torch.long)
        assert resolve_backend("triton", q)[0] == "triton"
        out, lse = blockwise_attention(q, k, v, causal=True, segment_ids=seg, return_lse=True, backend="triton")
        out.float().sum().backward()
        blk_out, blk_lse = block_attention_forward(q, k[:, :, :1024], v[:, :, :1024], kv_offset=1024,
                                                   backend="triton")
        grads = block_attention_backward(out, q, k[:, :, :1024], v[:, :, :1024], out, lse, backend="triton")
    assert all(isinstance(t, FakeTensor) for t in (out, lse, q.grad, blk_out, *grads))
    assert (out.shape, out.dtype) == (q.shape, dtype) and out.is_contiguous()
    assert (lse.shape, lse.dtype) == ((2, 8, 4096), torch.float32) and not lse.requires_grad
    assert (blk_out.shape, blk_lse.shape) == (q.shape, (2, 8, 4096))
    for t in (q, k, v):
        assert (t.grad.shape, t.grad.dtype) == (t.shape, dtype)
    assert [g.shape for g in grads] == [q.shape, (2, 2, 1024, 128), (2, 2, 1024, 128)]
    assert all(g.dtype == torch.float32 for g in grads)
    assert [backend for _, backend in record.calls] == ["triton"] * 4
    assert [func for func, _ in record.calls] == [FORWARD_OP, BACKWARD_OP, FORWARD_OP, BACKWARD_OP]


def test_fake_tensors_keep_the_backend_checks():
    """Under fake tensors the checks that a real run would fail still raise."""
    with FakeTensorMode():
        q64 = torch.empty(1, 2, 16, 32, dtype=torch.float64)
        q_small = torch.empty(1, 2, 16, 8, dtype=torch.bfloat16)
        q_gpu = torch.empty(1, 2, 16, 32, dtype=torch.bfloat16, device="cuda")
        with pytest.raises(TypeError, match="'triton' backend supports"):
            blockwise_attention(q64, q64, q64, backend="triton")
        with pytest.raises(ValueError, match="head_dim 16..256"):
            blockwise_attention(q_small, q_small, q_small, backend="triton")
        with pytest.raises(ValueError, match="needs CPU tensors"):
            blockwise_attention(q_gpu, q_gpu, q_gpu, backend="cpu")


def test_fake_cuda_tensors_trace_the_default_backend_forward():
    """The default backend on fake cuda tensors is "auto", which is Triton there (the planner's kernel), and its
    forward traces. Forward only, without grad: a CPU-only torch aborts the process (not an exception) when
    autograd meets a cuda tensor, so this runs in a subprocess."""
    script = textwrap.dedent(
        """
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from ringlwm.kernels import blockwise_attention, default_backend, resolve_backend

        with FakeTensorMode():
            q = torch.empty(2, 8, 2048, 128, dtype=torch.bfloat16, device="cuda")
            k = torch.empty(2, 2, 2048, 128, dtype=torch.bfloat16, device="cuda")
            seg = torch.zeros(2, 2048, dtype=torch.long, device="cuda")
            assert default_backend(q.device) == "auto" and resolve_backend(None, q)[0] == "triton"  # no GPU to measure
            out, lse = blockwise_attention(q, k, k, causal=True, segment_ids=seg, return_lse=True)
            print(out.device.type, tuple(out.shape), out.dtype, tuple(lse.shape), lse.dtype)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["cuda", "(2,", "8,", "2048,", "128)", "torch.bfloat16", "(2,", "8,", "2048)",
                                   "torch.float32"]
