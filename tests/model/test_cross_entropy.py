"""linear_cross_entropy against torch's own linear + cross entropy (tensor parallelism is
checked through the model in test_model.py, against megatron's cross entropy)."""

import pytest
import torch
import torch.nn.functional as F

from illada.model.cross_entropy import linear_cross_entropy

N, H, V = 11, 8, 37


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    scale = torch.linspace(0.5, 2.0, N)
    return hidden, weight, labels, scale


def _torch_reference(hidden, weight, labels, scale):
    hidden, weight = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    loss = F.cross_entropy(hidden @ weight.t(), labels, reduction="none")
    (loss * scale).sum().backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_rows", [None, 1, 4], ids=["one-chunk", "row-by-row", "uneven-chunks"])
def test_values_and_gradients_equal_torchs_linear_and_cross_entropy(chunk_rows):
    hidden, weight, labels, scale = _inputs()
    loss = linear_cross_entropy(hidden, weight, labels, chunk_rows=chunk_rows)
    (loss * scale).sum().backward()
    ref_loss, ref_hidden, ref_weight = _torch_reference(hidden, weight, labels, scale)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(hidden.grad, ref_hidden)
    torch.testing.assert_close(weight.grad, ref_weight)


def test_bf16_keeps_bf16_gradients_close_to_an_fp32_computation():
    hidden, weight, labels, scale = _inputs(torch.bfloat16)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_rows=4)
    (loss * scale).sum().backward()
    assert loss.dtype == torch.float32 and hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    ref_loss, ref_hidden, ref_weight = _torch_reference(hidden, weight, labels, scale)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=5e-2)  # the logits themselves are bf16
    torch.testing.assert_close(hidden.grad.float(), ref_hidden, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(weight.grad.float(), ref_weight, rtol=2e-2, atol=5e-2)


def test_no_rows_and_no_grad_work_and_a_second_backward_is_refused():
    hidden, weight, labels, _ = _inputs()
    empty = linear_cross_entropy(hidden[:0], weight, labels[:0])
    empty.sum().backward()
    assert empty.shape == (0,) and (weight.grad == 0).all()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, labels), F.cross_entropy(hidden @ weight.t(), labels, reduction="none"))
    loss = linear_cross_entropy(hidden, weight, labels).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_the_planner_counts_the_scratch_this_module_uses():
    from illada.model.cross_entropy import FP32_CHUNK_ELEMENTS
    from illada.train.plan import FUSED_CE_CHUNK_ELEMENTS

    assert FUSED_CE_CHUNK_ELEMENTS == FP32_CHUNK_ELEMENTS


def test_bf16_keeps_2_bytes_per_logit_for_the_backward_pass():
    hidden, weight, labels, _ = _inputs(torch.bfloat16)
    saved = {}

    def keep(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        linear_cross_entropy(hidden, weight, labels)
    inputs = {hidden.untyped_storage().data_ptr(), weight.untyped_storage().data_ptr()}
    per_row = 4 + 8 + 8  # a row's softmax factor and its label's row and column
    assert sum(n for ptr, n in saved.items() if ptr not in inputs) == N * V * 2 + N * per_row
