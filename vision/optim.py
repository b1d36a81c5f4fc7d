"""Muon for hidden weight matrices and AdamW for everything else, as one ``torch.optim.Optimizer``.

Papers
- Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024, kellerjordan.github.io/
  posts/muon): momentum SGD whose update is orthogonalised by a quintic Newton-Schulz iteration.
- Liu et al., "Muon is Scalable for LLM Training" (Moonlight, arXiv 2502.16982): decoupled weight decay
  and an update scale ``0.2 * sqrt(max(A, B))`` that matches AdamW's update RMS, so Muon reuses the
  learning rate and weight decay tuned for AdamW.

Update of a Muon matrix W (A x B) with gradient g (the equations of ``torch.optim.Muon``):

    B_t = mu B_{t-1} + (1 - mu) g_t                 (momentum buffer, ``lerp`` form)
    M_t = (1 - mu) g_t + mu B_t                      (Nesterov)
    O_t = NS5(M_t)                                   (approximately U V^T of M_t = U S V^T)
    W  <- W - lr * wd * W - lr * 0.2 * sqrt(max(A, B)) * O_t

``NS5``: ``X = M / max(||M||_F, eps)`` on the wide orientation (rows <= cols), then five times
``X <- a X + (b G + c G^2) X`` with ``G = X X^T`` and ``(a, b, c) = (3.4445, -4.7750, 2.0315)``.
A convolution filter (out, in, kh, kw) is orthogonalised as the (out, in*kh*kw) matrix of its flattened
kernels, as in Keller Jordan's CIFAR-10 speedruns (``TokenizerModule(optimizer="muon")`` uses this).
``ns_dtype`` picks its precision: fp32 by default, bf16 as in ``torch.optim.Muon`` and Keller Jordan's reference
where bf16 matmuls are fast (the result only sets a direction; ``GPTModule`` follows the trainer's precision);
with ``ns_dtype=torch.bfloat16`` the two optimizers agree (``tests/test_optim.py``). The iteration is batched
over every matrix of one shape (one ``baddbmm`` chain instead of one per matrix). A group's ``split = k`` orthogonalises a
fused weight such as LlamaGen's ``wqkv`` (3C x C) as k row blocks of (A/k x B), i.e. q, k and v separately.

Groups without ``muon=True`` take the AdamW update of ``torch.optim.AdamW`` (bias-corrected moments,
decoupled weight decay): embeddings, output heads, norms and biases belong there. One optimizer means one
LR scheduler and Lightning's automatic optimisation and gradient clipping work unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz5(m: torch.Tensor, steps: int = 5, eps: float = 1e-7,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthogonalise the last two dims of ``m`` (..., A, B) by ``steps`` quintic Newton-Schulz iterations."""
    a, b, c = NS_COEFFICIENTS
    shape = m.shape
    x = m.to(dtype).reshape(-1, shape[-2], shape[-1])  # (n, A, B)
    transposed = x.shape[-2] > x.shape[-1]
    if transposed:
        x = x.mT  # (n, B, A): iterate on the Gram matrix of the short side
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT  # (n, A', A'), A' = min(A, B)
        # the fused multiply-adds of torch.optim.Muon: x <- a x + (b G + c G^2) x
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if transposed else x).reshape(shape)


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the parameter groups marked ``muon=True`` (weights of >= 2 dims), AdamW on the others.

    Group options: ``lr``, ``weight_decay``; Muon groups ``momentum`` (0.95), ``nesterov`` (True),
    ``ns_steps`` (5), ``split`` (1); AdamW groups ``betas`` (0.9, 0.95) and ``eps`` (1e-8).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, ns_dtype: torch.dtype = torch.float32):
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"MuonAdamW: lr ({lr}) and weight_decay ({weight_decay}) must be >= 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, ns_steps=ns_steps, muon=False, split=1)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for index, group in enumerate(self.param_groups):
            if not group["muon"]:
                continue
            for p in group["params"]:
                if p.dim() < 2:
                    raise ValueError(f"MuonAdamW: param group {index} (muon=True) holds a {p.dim()}-D tensor "
                                     f"{tuple(p.shape)}; Muon takes weight matrices or conv filters (>= 2-D)")
                if p.shape[0] % group["split"]:
                    raise ValueError(f"MuonAdamW: param group {index}: {p.shape[0]} rows do not split into "
                                     f"split={group['split']} blocks")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon(group, params)
            else:
                self._adamw(group, params)
        return loss

    def _muon(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, wd, mu, k = group["lr"], group["weight_decay"], group["momentum"], group["split"]
        by_shape: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - mu)
            update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
            # a conv filter (out, in, kh, kw) as the matrix (out, in * kh * kw)
            by_shape.setdefault((p.shape[0], p[0].numel()), []).append((p, update.reshape(p.shape[0], -1)))
        for (rows, cols), items in by_shape.items():
            # every matrix of one shape in one batched iteration: (n * k, A/k, B)
            blocks = torch.stack([u for _, u in items]).reshape(len(items) * k, rows // k, cols)
            ortho = newton_schulz5(blocks, group["ns_steps"], dtype=self.ns_dtype).reshape(len(items), rows, cols)
            scale = 0.2 * math.sqrt(max(rows // k, cols))
            for (p, _), o in zip(items, ortho):
                p.mul_(1 - lr * wd)
                p.add_(o.reshape(p.shape).to(p.dtype), alpha=-lr * scale)

    def _adamw(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in params:
            grad = p.grad
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = float(state["step"])
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
            p.mul_(1 - lr * wd)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))
