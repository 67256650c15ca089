"""LARS (You et al. 2017) as MAE's linear probe uses it, written from its definition."""
import torch


class LARS(torch.optim.Optimizer):
    """Per step, for each parameter p with gradient g:
        ndim > 1 (weights):  u = g + wd p;  u <- u * eta ||p|| / ||u||  (when both norms > 0)
        1-D (biases, BN):    u = g          (no decay, no trust ratio)
        m <- momentum m + u;  p <- p - lr m
    So a weight matrix's step is a fraction of its norm whatever the gradient's size: lr * eta
    at the first step (zero momentum: 6.4e-3 at MAE's lr 6.4), then with momentum 0.9 up to
    lr * eta / (1 - 0.9) when successive gradients align and lr * eta / sqrt(1 - 0.9^2) (~2.3x)
    when they are uncorrelated. Biases move by lr * |g|, untouched by the trust ratio."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                        trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    p_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    trust = group["trust_coefficient"] * p_norm / u_norm
                    update = update * torch.where((p_norm > 0) & (u_norm > 0), trust, 1.0)
                momentum = self.state[p].setdefault("mu", torch.zeros_like(p))
                momentum.mul_(group["momentum"]).add_(update)
                p.add_(momentum, alpha=-group["lr"])
