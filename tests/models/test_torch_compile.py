"""The models under torch.compile(fullgraph=True) and FakeTensorMode, on one process.

Attention is the custom op ``ringlwm::block_attention_forward`` (and ``_backward``), so the whole model is one
graph; the input checks that read values (positions, LWM's id ranges) stay in the graph as asserts instead of
host reads. Compiles use ``aot_eager`` (the graph and its autograd without inductor's code generation), which
keeps these tests fast on CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_recorder import BACKWARD_OP, FORWARD_OP, RecordOps
from reference import max_err
from tiny_models import tiny_llama_config
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from ringlwm.models import RingLlamaForCausalLM
from ringlwm.models.lwm import RingLwmForCausalLM

VOCAB = 64  # tiny_llama_config's


def _model(dtype, **options):
    torch.manual_seed(0)
    model = RingLlamaForCausalLM(tiny_llama_config()).to(dtype)
    model.apply_options(**options)
    return model


def _packed_batch(seqlen=48, seed=1):
    """Two rows of packed documents: positions restart per document, segment ids mark them."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, seqlen), generator=gen)
    lengths = [[13, 20, seqlen - 33], [seqlen - 7, 7]]
    seg = torch.stack([torch.cat([torch.full((n,), d) for d, n in enumerate(row)]) for row in lengths])
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    targets = torch.roll(ids, -1, dims=1)
    targets[torch.roll(seg, -1, dims=1) != seg] = -100
    targets[:, -1] = -100
    return ids, pos, seg, targets


def _loss_and_grads(model, forward, ids, pos, seg, targets):
    """Mean cross-entropy of the logits (fp64) and the parameter gradients."""
    model.zero_grad(set_to_none=True)
    logits = forward(ids, pos, segment_ids=seg, return_logits=True).logits
    loss = F.cross_entropy(logits.flatten(0, 1).double(), targets.flatten(), ignore_index=-100)
    loss.backward()
    return loss.detach(), {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _op_targets(graph_module):
    return {node.target for node in graph_module.graph.nodes if node.op == "call_function"}


def test_compiled_llama_is_one_graph_with_the_eager_loss_and_gradients():
    """fullgraph compile of RingLlamaForCausalLM (packed documents, one process) traces through attention;
    loss and gradients equal eager: in fp64 to 1e-12, in fp32 within 2x eager fp32's own error against fp64
    (the compiled graph may order a few float operations differently)."""
    batch = _packed_batch()
    results = {}
    for dtype in (torch.float64, torch.float32):
        model = _model(dtype)
        torch._dynamo.reset()  # compile afresh: a cached graph would leave the counter at 0
        counter = CompileCounterWithBackend("aot_eager")
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        results[dtype] = (_loss_and_grads(model, compiled, *batch), _loss_and_grads(model, model, *batch))
        assert counter.frame_count == 1, "the model must compile as one graph"
        assert FORWARD_OP in _op_targets(counter.graphs[0]), "attention must be the custom op in the graph"

    (loss64, grads64), (eager_loss64, eager_grads64) = results[torch.float64]
    assert abs(loss64 - eager_loss64) < 1e-12
    for name, grad in grads64.items():
        assert max_err(grad, eager_grads64[name]) < 1e-12, name

    (loss32, grads32), (eager_loss32, eager_grads32) = results[torch.float32]
    assert abs(loss32 - eager_loss32) <= 2 * abs(eager_loss32 - eager_loss64) + 1e-6
    for name, grad in grads32.items():
        baseline = max_err(eager_grads32[name], eager_grads64[name])
        assert max_err(grad, eager_grads32[name]) <= 2 * baseline + 1e-7, name


def test_compiled_llama_with_the_blockwise_loss():
    """The model's own loss path (targets given to forward) under fullgraph compile."""
    ids, pos, seg, targets = _packed_batch()
    model = _model(torch.float64)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    loss = compiled(ids, pos, labels=targets, segment_ids=seg).loss
    loss.backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference = model(ids, pos, labels=targets, segment_ids=seg).loss
    reference.backward()
    assert abs(loss.item() - reference.item()) < 1e-12
    for name, p in model.named_parameters():
        assert (compiled_grads[name] - p.grad).abs().max() < 1e-12, name
    bad = targets.clone()
    bad[0, 3] = model.config.vocab_size  # the label check stays in the graph
    with pytest.raises(RuntimeError, match="labels must lie in"):
        compiled(ids, pos, labels=bad, segment_ids=seg)


def test_position_check_stays_in_the_compiled_graph():
    """Eager raises the ValueError it always did; the compiled graph, which cannot read positions on the host,
    asserts the same condition when it runs (RuntimeError naming the problem) instead of dropping it."""
    ids, pos, seg, _ = _packed_batch()
    model = _model(torch.float32)
    too_far = pos.clone()
    too_far[1, -1] = model.config.max_position_embeddings
    with pytest.raises(ValueError, match="beyond the model's max_position_embeddings"):
        model(ids, too_far, segment_ids=seg)
    negative = pos.clone()
    negative[0, 0] = -1
    with pytest.raises(ValueError, match="non-negative"):
        model(ids, negative, segment_ids=seg)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    compiled(ids, pos, segment_ids=seg)
    for bad in (too_far, negative):
        with pytest.raises(RuntimeError, match=r"position_ids must lie in \[0, max_position_embeddings = 512\)"):
            compiled(ids, bad, segment_ids=seg)


def test_fake_llama_step_runs_the_triton_path_on_fake_cpu_tensors(monkeypatch):
    """A bf16 model with attention_backend="triton" built and run under FakeTensorMode on CPU: forward and
    backward go through the Triton ops' fake implementation (no GPU, no interpreter) and every gradient has
    its parameter's shape and dtype. The position check does not read fake values."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    seqlen = 256
    default_dtype = torch.get_default_dtype()
    with FakeTensorMode():
        # Built in bf16 (Module.to cannot swap fake parameters in place).
        torch.set_default_dtype(torch.bfloat16)
        try:
            model = RingLlamaForCausalLM(tiny_llama_config())
        finally:
            torch.set_default_dtype(default_dtype)
        model.apply_options(attention_backend="triton")
        ids = torch.zeros(2, seqlen, dtype=torch.long)
        pos = torch.arange(seqlen).expand(2, seqlen)
        seg = torch.zeros(2, seqlen, dtype=torch.long)
        with RecordOps() as record:
            logits = model(ids, pos, segment_ids=seg).logits
            F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten()).backward()
    assert isinstance(logits, FakeTensor) and logits.shape == (2, seqlen, VOCAB)
    for name, p in model.named_parameters():
        assert isinstance(p.grad, FakeTensor) and (p.grad.shape, p.grad.dtype) == (p.shape, torch.bfloat16), name
    layers = model.config.num_hidden_layers
    assert sorted(record.calls, key=str) == sorted([(FORWARD_OP, "triton")] * layers
                                                   + [(BACKWARD_OP, "triton")] * layers, key=str)


def test_lwm_id_check_in_eager_fake_and_compiled_runs():
    """RingLwmForCausalLM.embed: eager raises its ValueError with the counts; a fake run does not read values;
    the compiled graph asserts the range."""
    torch.manual_seed(0)
    model = RingLwmForCausalLM(tiny_llama_config(vision_vocab_size=80))
    ids = torch.randint(0, VOCAB, (2, 16))
    vision = torch.zeros(2, 16, dtype=torch.bool)
    vision[:, 8:] = True
    bad = ids.clone()
    bad[0, 0] = VOCAB  # a text id past the text table
    with pytest.raises(ValueError, match="1 text and 0 vision ids are not"):
        model.embed(bad, vision)

    with FakeTensorMode():
        fake_model = RingLwmForCausalLM(tiny_llama_config(vision_vocab_size=80))
        out = fake_model(torch.zeros(2, 16, dtype=torch.long), vision_mask=torch.zeros(2, 16, dtype=torch.bool))
    assert out.logits.shape == (2, 16, VOCAB) and out.vision_logits.shape == (2, 16, 80)

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(ids, vision_mask=vision).logits, model(ids, vision_mask=vision).logits)
    with pytest.raises(RuntimeError, match="input ids out of range"):
        compiled(bad, vision_mask=vision)


@pytest.mark.slow
def test_inductor_compiled_llama_matches_eager():
    """The same model through inductor (C++ code generation on CPU; about 40 s on 2 cores): the custom ops
    run as fallback kernels between generated code, the position assert is lowered, and loss and gradients
    stay within 2x eager fp32's own error against fp64."""
    batch = _packed_batch()
    model64 = _model(torch.float64)
    eager64 = _loss_and_grads(model64, model64, *batch)
    model = _model(torch.float32)
    eager32 = _loss_and_grads(model, model, *batch)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    loss, grads = _loss_and_grads(model, compiled, *batch)
    assert abs(loss - eager32[0]) <= 2 * abs(eager32[0] - eager64[0]) + 1e-6
    for name, grad in grads.items():
        baseline = max_err(eager32[1][name], eager64[1][name])
        assert max_err(grad, eager32[1][name]) <= 2 * baseline + 1e-6, name
    ids, pos, seg, _ = batch
    too_far = pos.clone()
    too_far[0, 0] = model.config.max_position_embeddings
    with pytest.raises(RuntimeError, match="position_ids must lie in"):
        compiled(ids, too_far, segment_ids=seg)
