"""Gradient norm and clipping across DTensor layouts and pipeline stages.

torch.nn.utils.clip_grad_norm_ cannot mix plain and DTensor gradients (`_foreach_norm` refuses
the mix) and knows nothing of pipeline stages, whose parameters live on other ranks. So: the
norm of each group of same-layout gradients via torch.nn.utils.get_total_norm (DTensor turns a
sharded norm into one small collective), squared and summed, all-reduced over the pipeline
group, and the gradients scaled with torch's clipping rule.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.utils import get_total_norm


def global_grad_norm(
    params: list[nn.Parameter], pp_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """L2 norm of the whole model's gradient (each element counted once), as a float64 scalar."""
    grads = [p.grad for p in params if p.grad is not None]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else ()
        groups.setdefault(key, []).append(g)
    device = grads[0].device if grads else torch.device("cpu")
    sq = torch.zeros((), dtype=torch.float64, device=device)
    for key in sorted(groups, key=repr):  # the same order on every rank: collectives inside
        norm = get_total_norm(groups[key], 2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        sq += norm.double() ** 2
    if pp_group is not None:
        dist.all_reduce(sq, group=pp_group)
    return sq.sqrt()


def clip_grad_norm(
    params: list[nn.Parameter], max_norm: float, pp_group: dist.ProcessGroup | None = None
) -> float:
    """Clip to `max_norm` with torch's rule (coef = max_norm / (norm + 1e-6), at most 1);
    returns the norm before clipping."""
    norm = float(global_grad_norm(params, pp_group))
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm
