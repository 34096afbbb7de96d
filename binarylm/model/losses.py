"""Cross-entropy fused with the output head, computed a chunk of rows at a time.

The plain route, `F.cross_entropy(x @ W^T, targets)`, materialises the (N, V)
logits (2048 x 8192 floats = 64 MB for a batch of 8 x 256) and then several
more tensors of that size: log-softmax, its gradient, the loss's gradient.
On a CPU each is a fresh allocation and a full pass through memory.

Here rows are taken `chunk` at a time. The gradient of the summed loss with
respect to a row of logits is softmax(logits) - onehot(target), known as soon
as the chunk's logits are; so the forward turns each chunk's logits into that
gradient in place and pushes it through the head's two backward matmuls at
once. The backward pass then only scales the stored gradients. Same FLOPs,
no (N, V) tensor. Measured in benchmarks/train_throughput.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, chunk: int, ignore_index: int):
        """x (N, C), weight (V, C), targets (N,) -> mean loss over the rows not ignored."""
        n = x.shape[0]
        valid = targets != ignore_index  # (N,)
        count = valid.sum().clamp(min=1).to(x.dtype)
        safe_targets = torch.where(valid, targets, 0)
        any_ignored = bool((~valid).any())
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None  # (N, C)
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None  # (V, C)
        total = x.new_zeros(())
        buffer = x.new_empty(min(chunk, n), weight.shape[0])  # (chunk, V), reused
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            xc, tc = x[start:end], safe_targets[start:end]
            z = torch.mm(xc, weight.t(), out=buffer[: end - start])  # (c, V) logits
            picked = z.gather(1, tc[:, None]).squeeze(1)  # (c,) the targets' logits
            top = z.amax(dim=1, keepdim=True)  # (c, 1) for a stable exp
            z.sub_(top).exp_()
            sums = z.sum(dim=1, keepdim=True)  # (c, 1)
            losses = (top + sums.log()).squeeze(1) - picked  # logsumexp - target logit
            if any_ignored:
                losses = losses * valid[start:end]
            total += losses.sum()
            if grad_x is None and grad_w is None:
                continue
            z.div_(sums)  # softmax
            z[torch.arange(end - start, device=z.device), tc] -= 1.0  # softmax - onehot
            if any_ignored:
                z.mul_(valid[start:end, None])
            if grad_x is not None:
                torch.mm(z, weight, out=grad_x[start:end])
            if grad_w is not None:  # the first chunk writes grad_w, later ones add to it
                torch.mm(z.t(), xc, out=grad_w) if start == 0 else grad_w.addmm_(z.t(), xc)
        ctx.save_for_backward(grad_x, grad_w, count)
        return total / count

    @staticmethod
    def backward(ctx, grad_output):
        grad_x, grad_w, count = ctx.saved_tensors
        scale = grad_output / count
        return (None if grad_x is None else grad_x * scale, None if grad_w is None else grad_w * scale,
                None, None, None)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 512, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross_entropy(x @ weight^T, targets) over rows not ignored, without the (N, V) logits.

    x (N, C), weight (V, C), targets (N,). Under autocast (mixed precision) this
    takes the plain route, which autocast already handles.
    """
    if torch.is_autocast_enabled(x.device.type):
        return F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=ignore_index)
    if not torch.is_grad_enabled():  # evaluation: the loss only, still chunked
        x, weight = x.detach(), weight.detach()
    return _LinearCrossEntropy.apply(x, weight, targets, chunk, ignore_index)
