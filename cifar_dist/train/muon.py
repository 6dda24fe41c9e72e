"""Muon for conv filters, SGD for everything else, as one torch Optimizer.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks",
https://kellerjordan.github.io/posts/muon/) replaces a weight matrix's momentum update by its
nearest semi-orthogonal matrix, computed with a few quintic Newton-Schulz iterations. airbench94_muon
(the 2.59 s CIFAR-10 record) applies it to every conv filter bank viewed as a (c_out, c_in*k*k)
matrix, renormalises each filter bank to Frobenius norm sqrt(c_out) before the step (the BatchNorm
after each conv makes the scale irrelevant, so this fixes the effective step size), and trains the
remaining parameters with Nesterov SGD.

Why not torch.optim.Muon directly: torch >= 2.9 ships Muon, but it refuses parameters that are not
2-D, and the trainer, scheduler and checkpoint code expect one Optimizer object. So this class
reuses torch's Newton-Schulz iteration and torch's functional SGD, and adds only the filter
reshaping, the weight renormalisation and the group routing.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.sgd import sgd as sgd_functional

from cifar_dist.config.schema import ConfigError

try:  # torch >= 2.9; private, so imported defensively
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C
    from torch.optim._muon import _zeropower_via_newtonschulz as _newton_schulz
except ImportError:  # pragma: no cover - depends on the installed torch
    _newton_schulz = None
    DEFAULT_A, DEFAULT_B, DEFAULT_C = 3.4445, -4.7750, 2.0315

NS_COEFFICIENTS = (DEFAULT_A, DEFAULT_B, DEFAULT_C)
NS_EPS = 1e-7


def orthogonalize(update: Tensor, ns_steps: int = 5) -> Tensor:
    """Approximately U V^T of `update`'s SVD (as a (rows, -1) matrix), in `update`'s shape.

    torch's quintic Newton-Schulz iteration (computed in bfloat16): singular values land
    roughly in [0.5, 1.5] rather than exactly 1, which Muon's authors found not to matter.
    """
    if _newton_schulz is None:  # pragma: no cover
        raise ConfigError("optim.name: muon needs torch >= 2.9 (torch.optim.Muon)")
    matrix = update.reshape(update.shape[0], -1)
    if not _native_bf16(update.device.type):
        return _newton_schulz_fp32(matrix, ns_steps).reshape(update.shape)
    return _newton_schulz(matrix, NS_COEFFICIENTS, ns_steps, NS_EPS).reshape(update.shape)


@functools.cache
def _native_bf16(device_type: str) -> bool:
    from cifar_dist.train.common import native_bf16

    return native_bf16(torch.device(device_type))


def _newton_schulz_fp32(matrix: Tensor, ns_steps: int) -> Tensor:
    """torch's iteration line for line, in float32. torch's casts to bfloat16, which a CPU
    without AVX-512 BF16 / AMX emulates: the optimiser step then costs more than the model's."""
    a, b, c = NS_COEFFICIENTS
    x = matrix.float()
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=NS_EPS)
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class MuonSGD(torch.optim.Optimizer):
    """Groups with "muon": True get Muon (filters); the others Nesterov/momentum SGD.

    Muon group keys: lr, momentum, nesterov, ns_steps, normalize (renormalise each parameter to
    norm sqrt(rows) before stepping), weight_decay (decoupled, lr * wd per step). SGD groups use
    torch.optim.sgd's functional update with the group's lr, momentum, nesterov, weight_decay.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        nesterov: bool = True,
        ns_steps: int = 5,
        normalize: bool = True,
    ) -> None:
        if _newton_schulz is None:  # pragma: no cover
            raise ConfigError("optim.name: muon needs torch >= 2.9 (torch.optim.Muon)")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": 0.0,
            "ns_steps": ns_steps,
            "normalize": normalize,
            "muon": False,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("MuonSGD: a muon group holds a parameter with fewer than 2 dims")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self._muon_step(group, params)
            else:
                self._sgd_step(group, params)
        return loss

    def _muon_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        lr, mom = group["lr"], group["momentum"]
        for p in params:
            g = p.grad
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g)
            buf = state["momentum_buffer"]
            buf.mul_(mom).add_(g)
            update = g.add(buf, alpha=mom) if group["nesterov"] else buf
            if group["normalize"]:
                p.mul_(math.sqrt(p.shape[0]) / p.norm().clamp_min(NS_EPS))
            if group["weight_decay"]:
                p.mul_(1 - lr * group["weight_decay"])
            p.add_(orthogonalize(update, group["ns_steps"]).to(p.dtype), alpha=-lr)

    def _sgd_step(self, group: dict[str, Any], params: list[Tensor]) -> None:
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        sgd_functional(
            params,
            [p.grad for p in params],
            bufs,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=0.0,
            nesterov=group["nesterov"],
            maximize=False,
        )
        if group["momentum"] != 0:  # the functional form creates the buffers on first use
            for p, buf in zip(params, bufs):
                self.state[p]["momentum_buffer"] = buf
