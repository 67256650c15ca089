"""LARS (You et al. 2017) as MAE's linear probe uses it, written from its definition."""
import torch


class LARS(torch.optim.Optimizer):
    """A weight's update g + wd p is scaled to eta ||p||, so its first step is lr * eta of its norm
    whatever g's size (6.4e-3 at MAE's lr 6.4), up to 10x with momentum 0.9; 1-D params take g."""

    def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

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
