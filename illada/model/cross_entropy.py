"""The output layer and its cross entropy in one autograd function, with the logits kept in
the model's dtype and their gradient written over them.

megatron-core's vocab-parallel cross entropy (without Transformer Engine) works on an fp32
copy of the logits and keeps its fp32 softmax for the backward pass: 4 bytes per logit
kept, 6 at the peak, for a [tokens, vocab/TP] tensor that is the largest activation of a
155,136-word model. Here the logits stay as the matmul wrote them (2 bytes in bf16); their
statistics are taken in fp32 a chunk of rows at a time in one pass that writes exp(logit -
row max) over them, and the backward pass turns those into softmax - one-hot, scaled by the
incoming gradient, in one more pass before the two matmuls of a linear layer's backward.
Transformer Engine's Triton cross entropy (megatron's `cross_entropy_fusion_impl="te"`)
keeps the logits' dtype too, on the GPU; this needs only torch.

    loss = lse(h W^T) - (h W^T)[label]      per row, vocabulary sharded over TP
    d loss / d logits = softmax - one_hot

Under tensor parallelism `weight` is this rank's vocabulary shard and `hidden` the whole
input (the caller's `copy_to_tensor_model_parallel_region` all-reduces its gradient);
the row statistics cross ranks in two all-reduces, as in megatron's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

FP32_CHUNK_ELEMENTS = 2**26  # fp32 scratch for a chunk of rows: 256 MiB


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, tp_group, chunk_rows):
        logits = hidden @ weight.t()  # [n, vocab/TP], the model's dtype
        n, shard = logits.shape
        tp_rank, tp_size = (tp_group.rank(), tp_group.size()) if tp_group is not None else (0, 1)
        local = labels - tp_rank * shard
        here = (local >= 0) & (local < shard)
        target_rows, target_cols = torch.arange(n, device=logits.device)[here], local[here]
        label_logit = logits.new_zeros(n, dtype=torch.float32)
        label_logit[target_rows] = logits[target_rows, target_cols].float()

        # One pass: each row's max, and exp(logit - max) written over the logits.
        chunks = [slice(i, i + chunk_rows) for i in range(0, n, chunk_rows)]
        row_max = logits.new_empty(n, dtype=torch.float32)
        sum_exp = torch.empty_like(row_max)
        for c in chunks:
            block = logits[c].float()  # the logits themselves when they are fp32
            row_max[c] = block.max(-1).values
            sum_exp[c] = block.sub_(row_max[c, None]).exp_().sum(-1)
            if logits.dtype != torch.float32:
                logits[c] = block
        lse, max_here = row_max, row_max
        if tp_size > 1:
            lse = row_max.clone()
            dist.all_reduce(lse, op=dist.ReduceOp.MAX, group=tp_group)
            summed = torch.stack([sum_exp * (row_max - lse).exp(), label_logit])
            dist.all_reduce(summed, group=tp_group)
            sum_exp, label_logit = summed
        lse = lse + sum_exp.log()
        # softmax = stored exp(logit - max_here) * exp(max_here - lse), rescaled in backward
        ctx.save_for_backward(hidden, weight, logits, (max_here - lse).exp(), target_rows, target_cols)
        ctx.chunks = chunks
        return lse - label_logit

    @staticmethod
    def backward(ctx, grad_loss):
        # d loss / d logits = softmax - one_hot, each row scaled by its grad_loss, written over
        # the saved exponentials: a second backward (retain_graph) fails autograd's version check.
        hidden, weight, grad_logits, to_softmax, target_rows, target_cols = ctx.saved_tensors
        scale = to_softmax * grad_loss
        for c in ctx.chunks:
            grad_logits[c] = grad_logits[c].float().mul_(scale[c, None])
        at_label = grad_logits[target_rows, target_cols].float() - grad_loss[target_rows]
        grad_logits[target_rows, target_cols] = at_label.to(grad_logits.dtype)
        grad_hidden = grad_logits @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_logits.t() @ hidden if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, tp_group=None, chunk_rows: int | None = None) -> torch.Tensor:
    """Cross entropy [n] (fp32) of rows `hidden` [n, h] under the output weight (this rank's
    vocabulary shard [vocab/TP, h]) against global token ids `labels` [n]. `chunk_rows`
    bounds the fp32 scratch (default: FP32_CHUNK_ELEMENTS per chunk)."""
    rows = chunk_rows or max(1, FP32_CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, labels, tp_group, rows)
