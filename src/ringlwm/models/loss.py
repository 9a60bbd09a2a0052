"""Blockwise cross-entropy: the language-model head and its loss without (tokens x vocab) logits.

``linear_cross_entropy`` walks the tokens in chunks. For each chunk it computes the logits (fp32), the
summed cross-entropy, and right away the gradients with respect to the chunk's hidden states and the head
weight (softmax minus one-hot), then drops the logits. Peak memory is (chunk x vocab) instead of
(tokens x vocab): at 1M tokens and a 32K vocabulary the full logits would be 128 GB in fp32.

``sequence_parallel_loss`` turns the local sums into the mean over every valid token of the sequence
group: the same value on every rank, with gradients that sum over the ranks to the single-process ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensor

from ringlwm.constants import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "can_read_values", "items_loss", "linear_cross_entropy", "sequence_parallel_loss"]



def can_read_values(*tensors: torch.Tensor) -> bool:
    """Whether an input check may read tensor values on the host (``bool(t.any())``): not while torch.compile
    traces (a host read breaks the graph, an error under fullgraph), and not on meta or fake tensors
    (FakeTensorMode), which hold no values. Where it may not, a check goes into the graph as
    ``torch._assert_async`` instead (RuntimeError on CPU, a device-side assert on GPU, nothing on fakes)."""
    if torch.compiler.is_compiling():
        return False
    return not any(t.device.type == "meta" or isinstance(t, FakeTensor) for t in tensors)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(hidden_i @ weight.T, label_i) over tokens with label != IGNORE_INDEX.

    hidden: (tokens, hidden_size); weight: (vocab, hidden_size); labels: (tokens,) int;
    loss_weights: (tokens,) float. The gradients are computed in the forward, chunk by chunk, and
    scaled by the incoming gradient in the backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, loss_weights, chunk_size):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 logits and sums; fp64 stays fp64
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            h, y, w = hidden[start:end], labels[start:end], loss_weights[start:end].to(acc)
            valid = y != IGNORE_INDEX
            w = torch.where(valid, w, 0.0)
            y = torch.where(valid, y, 0)
            # One fused pass (max, exp, sum, log) from the 16-bit logits straight to fp32 log-probabilities.
            logp = torch.log_softmax(h @ weight.t(), dim=-1, dtype=acc)
            total -= (logp.gather(1, y[:, None]).squeeze(1) * w).sum()
            if need_hidden or need_weight:
                # d/dlogits of w * CE = w * (softmax - onehot), formed in place in the log-probabilities' memory.
                grad_logits = logp.exp_()
                grad_logits[torch.arange(end - start, device=y.device), y] -= 1.0
                grad_logits *= w[:, None]
                if need_hidden:
                    grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_weight:
                    grad_weight += grad_logits.t() @ h.to(acc)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_total.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_weights: torch.Tensor | None = None,
    chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted cross-entropy sum of ``hidden @ weight.T`` against ``labels``, in chunks of tokens.

    hidden: (..., hidden_size); labels: (...) with IGNORE_INDEX (-100) for no loss; loss_weights: (...)
    or None (1 for every token). Returns (loss_sum, weight_sum): the differentiable sum of w_i * CE_i and
    the sum of w_i over the tokens with a label (no grad). Their ratio is the weighted mean.
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden states {tuple(hidden.shape[:-1])}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    labels1d = labels.reshape(-1)
    if loss_weights is None:
        loss_weights1d = torch.ones(labels1d.shape, dtype=torch.float32, device=labels.device)
    else:
        if loss_weights.shape != labels.shape:
            raise ValueError(f"loss_weights {tuple(loss_weights.shape)} must match labels {tuple(labels.shape)}")
        loss_weights1d = loss_weights.reshape(-1)
    bad = (labels1d >= weight.shape[0]) | ((labels1d < 0) & (labels1d != IGNORE_INDEX))
    message = f"labels must lie in [0, vocab size {weight.shape[0]}) or be {IGNORE_INDEX} (no loss)"
    if not can_read_values(labels1d):
        torch._assert_async(~bad.any(), message)  # in the compiled graph, no host read; nothing on fake tensors
    elif labels1d.numel() and bad.any():
        raise ValueError(message)
    loss_sum = _LinearCrossEntropy.apply(hidden2d, weight, labels1d, loss_weights1d, int(chunk_size))
    weight_sum = torch.where(labels1d != IGNORE_INDEX, loss_weights1d.to(loss_sum.dtype), 0.0).sum()
    return loss_sum, weight_sum


def sequence_parallel_loss(
    loss_sum: torch.Tensor, weight_sum: torch.Tensor, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Mean over the whole sequence group from per-rank sums.

    The value is sum(all ranks' loss_sum) / sum(all ranks' weight_sum), identical on every rank. The
    gradient flows only through the local ``loss_sum`` (divided by the global weight), so the ranks'
    gradients add up to the gradient of the single-process mean. A group with no valid token gives 0.
    """
    totals = torch.stack([loss_sum.detach().float(), weight_sum.detach().float()])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(totals, group=group)
    global_loss, global_weight = totals[0], totals[1]
    denominator = torch.clamp(global_weight, min=torch.finfo(torch.float32).tiny)
    return (loss_sum + (global_loss - loss_sum.detach())) / denominator


def items_loss(loss_sum: torch.Tensor, num_items_in_batch, sp_group) -> torch.Tensor:
    """transformers' gradient-accumulation loss: the weighted loss sum of the whole sequence group's
    micro-batch divided by ``num_items_in_batch`` (the target count of the whole accumulated batch). The value
    is the same on every rank of the group; the gradient flows through the local sum only, so the ranks'
    gradients add up to the single-process one."""
    total = loss_sum.detach().float().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(sp_group) > 1:
        dist.all_reduce(total, group=sp_group)
    items = torch.as_tensor(num_items_in_batch, device=loss_sum.device).to(loss_sum.dtype)
    return (loss_sum + (total.to(loss_sum.dtype) - loss_sum.detach())) / items


def reduce_head_losses(sums: list[torch.Tensor], weights: list[torch.Tensor], coefficients: list[float], *,
                       reduction: str, sp_group, num_items_in_batch=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The loss contract of every ringlwm model, from this rank's per-head weighted loss sums and weights
    (0-d tensors, in ``loss_heads`` order). Returns (loss, per-head values):

    - ``"mean"``: each head's weighted mean over the whole sequence group (``sequence_parallel_loss``), the same
      on every rank; with ``num_items_in_batch`` (transformers' gradient accumulation) each head's group sum
      divided by it instead (``items_loss``);
    - ``"sum"``: each head's raw sum on this rank, for a trainer that divides by the weight of a larger batch.

    In both, ``loss = sum_h coefficient_h * value_h``: "sum" means the same for every model."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {reduction!r}")
    if reduction == "sum":
        if num_items_in_batch is not None:
            raise ValueError("num_items_in_batch divides the loss; loss_reduction='sum' returns raw sums: "
                             "give one or the other")
        values = list(sums)
    elif num_items_in_batch is not None:
        values = [items_loss(s, num_items_in_batch, sp_group) for s in sums]
    else:
        values = [sequence_parallel_loss(s, w, sp_group) for s, w in zip(sums, weights)]
    loss = values[0] if coefficients == [1.0] else coefficients[0] * values[0]
    for c, v in zip(coefficients[1:], values[1:]):
        loss = loss + c * v
    return loss, values
