"""Unit tests of the record-recipe options: whitening, dirac, norms, lr units, Muon, Lookahead,
triangle schedule, multi-view TTA, alternating flip, auto batch size."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifar_dist.config import load_config
from cifar_dist.config.schema import ConfigError
from cifar_dist.models import create_model
from cifar_dist.models.airbench import fit_whitening
from cifar_dist.train.auto_batch import cpu_step_bytes, cpu_step_fits, largest_fitting
from cifar_dist.train.lookahead import Lookahead
from cifar_dist.train.metrics import tta_logits
from cifar_dist.train.model_init import apply_model_options, dirac_init_
from cifar_dist.train.muon import MuonSGD, orthogonalize
from cifar_dist.train.optim import build_optimizer, build_scheduler


def correlated_images(n: int = 64, seed: int = 0) -> torch.Tensor:
    """Smooth, colour-correlated images: neighbouring pixels and channels strongly correlated,
    like natural images, so whitening has a far-from-identity covariance to undo."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, 36, 36, generator=g)
    base = F.avg_pool2d(base, 5, stride=1)  # spatial correlation -> (n, 1, 32, 32)
    mix = torch.tensor([[1.0], [0.8], [0.6]]).view(1, 3, 1, 1)
    return base * mix + 0.1 * torch.randn(n, 3, 32, 32, generator=g)


def test_whitening_stem_whitens_the_patches_it_was_fitted_on() -> None:
    """First half of the stem maps the patches to covariance diag(l / (l + eps)) (~ identity),
    the second half is its negation, and the bias is zero."""
    images, eps = correlated_images(), 5e-4
    model = create_model("airbench_net")
    fit_whitening(model.whiten, images, eps=eps)
    with torch.no_grad():
        out = model.whiten(images.double().float())  # (n, 24, 31, 31)
    half = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov_out = half.T @ half / len(half)
    patches = F.unfold(images.double(), 2).transpose(1, 2).reshape(-1, 12)
    eig = torch.linalg.eigvalsh(patches.T @ patches / len(patches)).flip(0)
    torch.testing.assert_close(cov_out, torch.diag(eig / (eig + eps)), atol=2e-4, rtol=1e-3)
    raw = patches.T @ patches / len(patches)
    corr = raw / torch.sqrt(raw.diag()[:, None] * raw.diag()[None, :])
    assert (corr - torch.eye(12)).abs().max() > 0.5  # the input patches were far from white
    torch.testing.assert_close(out[:, 12:], -out[:, :12])
    assert torch.count_nonzero(model.whiten.bias) == 0


def test_dirac_init_makes_odd_convs_identity_on_their_first_channels() -> None:
    conv, shortcut = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.Conv2d(4, 6, 1, bias=False)
    stem = nn.Conv2d(3, 12, 2)
    model = nn.Sequential(stem, nn.Conv2d(12, 4, 1), conv, shortcut)
    before = {id(m): m.weight.clone() for m in (stem, shortcut)}
    assert dirac_init_(model) == 1
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(conv(x)[:, :4], x)  # identity on the first c_in filters
    assert not torch.equal(conv(x)[:, 4:], torch.zeros_like(conv(x)[:, 4:]))  # rest default
    for m in (stem, shortcut):  # even and 1x1 kernels untouched
        assert torch.equal(m.weight, before[id(m)])


def test_norm_options_bias_only_batchnorm_is_frozen_and_excluded() -> None:
    cfg = load_config(
        None,
        ["--model.norm_weight=false", "--model.norm_momentum=0.4", "--model.norm_eps=1e-12"],
    )
    model = apply_model_options(create_model("airbench_net"), cfg.model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.4 and m.eps == 1e-12 for m in bns)
    assert all(not m.weight.requires_grad and m.bias.requires_grad for m in bns)
    opt = build_optimizer(model, cfg.optim, 128)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(m.weight) in in_opt for m in bns)
    assert all(id(m.bias) in in_opt for m in bns)


def _groups(model: nn.Module, batch: int, *args: str) -> dict[str, dict]:
    cfg = load_config(None, list(args))
    opt = build_optimizer(model, cfg.optim, batch)
    return {g["kind"]: g for g in opt.param_groups}


def test_per_1024_units_and_norm_bias_multiplier() -> None:
    """airbench94's numbers: lr 11.5 and wd 0.0153 per 1024 examples, momentum 0.85, bias x64."""
    model = create_model("airbench_net")
    args = [
        "--optim.lr_units=per_1024",
        "--optim.lr=11.5",
        "--optim.momentum=0.85",
        "--optim.weight_decay=0.0153",
        "--optim.decay_vectors=true",
        "--optim.norm_bias_lr_scale=64",
    ]
    scale = 1 + 1 / (1 - 0.85)
    g = _groups(model, 1024, *args)
    assert g["weights"]["lr"] == pytest.approx(11.5 / scale)  # = 1.5 for a mean loss
    assert g["norm_bias"]["lr"] == pytest.approx(64 * 11.5 / scale)
    for kind in ("weights", "vectors", "norm_bias"):  # same decay per step whatever the lr
        assert g[kind]["lr"] * g[kind]["weight_decay"] == pytest.approx(0.0153 / scale)
    half = _groups(model, 512, *args)  # half the batch: half the lr and decay per step
    assert half["weights"]["lr"] == pytest.approx(g["weights"]["lr"] / 2)
    w = half["weights"]
    assert w["lr"] * w["weight_decay"] == pytest.approx(0.0153 / scale / 2)


def test_triangle_schedule_shape() -> None:
    cfg = load_config(None, ["--schedule.name=triangle", "--schedule.pct_start=0.25"])
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=2.0)
    sched = build_scheduler(opt, cfg.schedule, steps_per_epoch=10, epochs=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.0 * 0.2)
    assert max(range(100), key=lrs.__getitem__) == 25 and lrs[25] == pytest.approx(2.0)
    assert lrs[-1] == pytest.approx(2.0 * (1 - 0.93 * 74 / 75), rel=1e-6)  # -> 0.07 at step 100
    assert all(a < b for a, b in zip(lrs[:25], lrs[1:26]))
    assert all(a > b for a, b in zip(lrs[25:], lrs[26:]))


@pytest.mark.parametrize("shape", [(64, 24, 3, 3), (256, 64, 3, 3), (128, 64, 1, 1), (10, 256)])
def test_muon_orthogonalization_is_near_orthogonal(shape: tuple[int, ...]) -> None:
    """Newton-Schulz output ~ U V^T of the input's SVD: singular values in Muon's documented
    [0.5, 1.5] band (the input's differ by up to ~20x), the same singular vectors."""
    g = torch.Generator().manual_seed(0)
    rows = shape[0]
    a = torch.randn(rows, math.prod(shape[1:]), generator=g)
    a = 3.0 * a * torch.logspace(-1, 0, a.shape[1])  # unequal column scales, arbitrary norm
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    o = orthogonalize(a.reshape(shape), ns_steps=5).float().reshape(rows, -1)
    sv = torch.linalg.svdvals(o)
    assert sv.min() > 0.5 and sv.max() < 1.5, sv
    assert (sv.max() / sv.min()) < (s.max() / s.min()) or s.max() / s.min() < 2
    assert torch.linalg.matrix_norm(o - u @ vh, ord=2) < 0.5  # U V^T up to the band
    inner = u.T @ o @ vh.T  # ~ diagonal: the singular vectors are kept
    assert (inner - torch.diag(inner.diag())).abs().max() < 0.05


@pytest.mark.parametrize("rows_cols", [(64, 216), (300, 64)])
def test_fp32_newton_schulz_is_torchs_iteration(rows_cols: tuple[int, int]) -> None:
    """The float32 path (CPUs without native bf16) computes what torch's bf16 iteration does,
    up to bf16 rounding, for wide and tall (transposed) matrices."""
    from cifar_dist.train.muon import NS_COEFFICIENTS, NS_EPS, _newton_schulz, _newton_schulz_fp32

    m = torch.randn(*rows_cols, generator=torch.Generator().manual_seed(0))
    ours = _newton_schulz_fp32(m, 5)
    theirs = _newton_schulz(m, NS_COEFFICIENTS, 5, NS_EPS).float()
    assert ours.dtype == torch.float32 and ours.shape == m.shape
    assert torch.linalg.norm(ours - theirs) / torch.linalg.norm(theirs) < 0.02


def test_muon_sgd_steps_filters_with_muon_and_the_rest_like_torch_sgd() -> None:
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(3, 8, 3), nn.Linear(8, 4)
    ref_lin = nn.Linear(8, 4)
    ref_lin.load_state_dict(lin.state_dict())
    w0 = conv.weight.detach().clone()
    opt = MuonSGD(
        [
            {"params": list(lin.parameters()), "weight_decay": 1e-2},
            {"params": [conv.weight], "muon": True, "lr": 0.1, "momentum": 0.6},
        ],
        lr=0.05,
        momentum=0.9,
        nesterov=True,
        ns_steps=3,
    )
    ref = torch.optim.SGD(
        ref_lin.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2
    )
    grads = [torch.randn(8, 3, 3, 3) for _ in range(2)]
    for step in range(2):
        for p, q in zip(lin.parameters(), ref_lin.parameters()):
            p.grad = torch.full_like(p, 0.1 * (step + 1))
            q.grad = p.grad.clone()
        conv.weight.grad = grads[step]
        opt.step()
        ref.step()
        if step == 0:  # first Muon step: buf = g, nesterov update g + 0.6 g, weight renormalised
            w_norm = w0 * math.sqrt(8) / w0.norm()
            expected = w_norm - 0.1 * orthogonalize(1.6 * grads[0], 3).float()
            torch.testing.assert_close(conv.weight.detach(), expected, atol=1e-6, rtol=0)
    for p, q in zip(lin.parameters(), ref_lin.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
    state = opt.state_dict()  # momentum buffers of both kinds are checkpointed
    assert len(state["state"]) == 3


def test_lookahead_matches_its_formula() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    la = Lookahead(model, every=2, total_steps=10, decay=0.9, pow=2.0, start_step=2)
    rng = torch.Generator().manual_seed(1)
    slow: dict[str, torch.Tensor] | None = None
    for step in range(1, 11):
        with torch.no_grad():  # a fake optimiser step moves the fast weights and BN statistics
            for v in model.state_dict().values():
                if v.is_floating_point():
                    v.add_(torch.randn(v.shape, generator=rng))
            model[1].num_batches_tracked += 1
        fast = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
        averaged = la.step(model, step)
        assert averaged == (step > 2 and step % 2 == 0)
        if not averaged:
            continue
        if slow is None:
            slow = fast
        else:
            rho = 0.9**2 * (step / 10) ** 2
            slow = {k: rho * slow[k] + (1 - rho) * fast[k] for k in fast}
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                torch.testing.assert_close(v, slow[k], msg=k)  # fast reset to slow
    assert int(model[1].num_batches_tracked) == 10  # integer buffers are never averaged
    with torch.no_grad():
        model[0].weight.add_(1.0)
    la.sync(model)
    torch.testing.assert_close(model[0].weight, slow["0.weight"])
    other = Lookahead(model, every=2, total_steps=10)
    other.load_state_dict(la.state_dict())
    assert other.slow is not None and la.slow is not None
    assert all(torch.equal(other.slow[k], la.slow[k]) for k in la.slow)


def _reflect_shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """out[i, j] = x[r(i + dy), r(j + dx)] with mirror indexing r(-1) = 1, r(n) = n - 2."""
    h, w = x.shape[-2:]

    def r(i: int, n: int) -> int:
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    rows = torch.tensor([r(i + dy, h) for i in range(h)])
    cols = torch.tensor([r(j + dx, w) for j in range(w)])
    return x[..., rows[:, None], cols[None, :]]


def test_multiview_tta_weights_six_views() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5)).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model(x)

        def pair(v: torch.Tensor) -> torch.Tensor:
            return 0.5 * (model(v) + model(v.flip(-1)))

        expected = 0.5 * pair(x) + 0.25 * (
            pair(_reflect_shift(x, -1, -1)) + pair(_reflect_shift(x, 1, 1))
        )
        torch.testing.assert_close(tta_logits(model, x, True, translate=1), expected)
        torch.testing.assert_close(tta_logits(model, x, True), pair(x))
        torch.testing.assert_close(tta_logits(model, x, False, translate=1), model(x))


@dataclass
class _Split:
    images: np.ndarray
    labels: np.ndarray


def test_alternating_flip_mirrors_every_image_in_every_other_epoch() -> None:
    """Loader output, not just the plan: sample i's image in epoch e+1 is the mirror of epoch e."""
    from cifar_dist.config.schema import DataConfig
    from cifar_dist.data.device_loader import build_device_loaders

    n = 64
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    split = _Split(images, np.arange(n, dtype=np.int64))  # label = sample index
    cfg = DataConfig(loader="device", batch_size=16, crop_padding=0, flip_mode="alternating")
    train, _ = build_device_loaders(
        cfg, {"train": split}, micro_batch=16, eval_batch=16, rank=0, world_size=1, seed=0,
        num_classes=n, device=torch.device("cpu"),
    )  # fmt: skip
    seen = []
    for e in range(3):
        train.set_epoch(e)
        by_label = {}
        for x, y in train:
            by_label.update({int(label): img for label, img in zip(y, x)})
        seen.append(by_label)
    flipped = 0
    for i in range(n):
        torch.testing.assert_close(seen[1][i], seen[0][i].flip(-1))
        torch.testing.assert_close(seen[2][i], seen[0][i])
        flipped += not torch.allclose(seen[0][i], _normalised(images[i]), atol=1e-5)
    assert 0 < flipped < n  # epoch 0 itself mirrors a random half


def _normalised(img: np.ndarray) -> torch.Tensor:
    from cifar_dist.data.augment import mean_std

    mean, std = (torch.tensor(v).view(3, 1, 1) for v in mean_std("cifar10"))
    return (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - mean) / std


def test_largest_fitting_power_of_two() -> None:
    assert largest_fitting(lambda b: b <= 300, 8, 4096) == 256
    assert largest_fitting(lambda b: True, 8, 100) == 64  # capped
    assert largest_fitting(lambda b: False, 8, 100) is None


def test_cpu_memory_estimate_grows_with_batch_and_fails_without_ram(monkeypatch) -> None:
    import cifar_dist.train.auto_batch as ab

    cfg = load_config(None, ["--model.name=airbench_net"])
    params, per_image = cpu_step_bytes(cfg)
    assert params == 4 * sum(p.numel() for p in create_model("airbench_net").parameters())
    # airbench_net keeps ~0.4 MB of fp32 activations per image for backward; be loose
    assert 1e5 < per_image < 5e6
    monkeypatch.setattr(ab, "available_ram", lambda: 4 * params + 2 * per_image * 100)
    assert cpu_step_fits(64, 0.0, params, per_image) and not cpu_step_fits(
        128, 0.0, params, per_image
    )


def test_config_errors_name_the_key() -> None:
    cases = {
        "train.tta_translate": ["--train.tta_translate=1"],
        "model.whiten_bias_epochs": ["--model.whiten_bias_epochs=3"],
        "optim.lr_units": ["--optim.name=adamw", "--optim.lr_units=per_1024"],
        "data.batch_size": ["--data.batch_size=big"],
        "schedule.start_factor": ["--schedule.start_factor=0"],
    }
    for key, args in cases.items():
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, args)
