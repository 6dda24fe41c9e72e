"""Model zoo: every registered model builds, trains a step, and splits into pipeline layers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifar_dist.models import create_model, fit_whitening, list_models, make_norm2d

MODELS = list_models()
CNNS = [name for name in MODELS if not name.startswith("vit")]


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_registry_holds_the_zoo() -> None:
    expected = {"seed_cnn", "resnet18", "preact_resnet18", "airbench_net", "airbench_net_mid"}
    expected |= {"airbench_net_wide", "airbench_net_nano", "vit_tiny", "vit_small", "vit_nano"}
    assert expected <= set(MODELS)


@pytest.mark.parametrize(
    ("name", "widths"),
    [("airbench_net", (64, 256, 256)), ("airbench_net_mid", (96, 320, 320)),
     ("airbench_net_wide", (128, 384, 384)), ("airbench_net_nano", (16, 32, 32))],
)  # fmt: skip
def test_airbench_widths(name: str, widths: tuple[int, ...]) -> None:
    model = create_model(name)
    convs = [m for m in model.blocks.modules() if isinstance(m, nn.Conv2d)]
    assert tuple(conv.out_channels for conv in convs[::2]) == widths
    assert model.head.fc.in_features == widths[-1]


@pytest.mark.parametrize("batch", [3, 8])
@pytest.mark.parametrize("name", MODELS)
def test_forward_backward(name: str, batch: int) -> None:
    num_classes = 100 if batch == 3 else 10  # both class counts covered without doubling the cases
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes).train()
    assert model.num_classes == num_classes
    out = model(_images(batch))
    assert out.shape == (batch, num_classes)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for pname, param in model.named_parameters():
        # A parameter without a gradient would also force DDP's find_unused_parameters.
        assert param.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name}: {pname} has non-finite gradient"
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("norm", ["batch", "sync_batch", "group"])
@pytest.mark.parametrize("name", CNNS)
def test_norm_choice(name: str, norm: str) -> None:
    model = create_model(name, norm=norm, groups=8)
    kinds = {type(m) for m in model.modules()}
    if norm == "group":
        assert nn.GroupNorm in kinds
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    else:
        # sync_batch stays a plain BatchNorm2d until the parallel layer converts it.
        assert nn.BatchNorm2d in kinds
        assert nn.GroupNorm not in kinds
    model.eval()
    with torch.no_grad():
        out = model(_images(2))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS)
def test_pipeline_layers_compose_to_forward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, dropout=0.1, drop_path=0.1).eval()
    layers = model.pipeline_layers()
    assert len(layers) >= 3 and all(isinstance(layer, nn.Module) for layer in layers)
    # Stages must own every parameter exactly once, or a pipeline split would lose/duplicate one.
    layer_params = [id(p) for layer in layers for p in layer.parameters()]
    assert len(layer_params) == len(set(layer_params))
    assert set(layer_params) == {id(p) for p in model.parameters()}
    x = _images(4)
    with torch.no_grad():
        y = x
        for layer in layers:
            y = layer(y)
        expected = model(x)
    assert torch.allclose(y, expected, atol=1e-5, rtol=1e-5)


def test_unknown_model_and_options_raise() -> None:
    with pytest.raises(ValueError, match=r"model\.name: unknown model 'resnet9000'"):
        create_model("resnet9000")
    with pytest.raises(ValueError, match=r"model\.norm"):
        create_model("resnet18", norm="layer")
    with pytest.raises(ValueError, match=r"model\.norm"):
        make_norm2d("instance", 16)
    with pytest.raises(ValueError, match=r"model\.widht"):
        create_model("seed_cnn", widht=2)


@pytest.mark.parametrize(
    ("channels", "groups", "expected"),
    [(64, 8, 8), (24, 16, 12), (12, 8, 6), (7, 8, 7), (64, 1, 1)],
)
def test_group_norm_uses_largest_divisor(channels: int, groups: int, expected: int) -> None:
    norm = make_norm2d("group", channels, groups)
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == expected


def test_se_adds_gates() -> None:
    plain = sum(p.numel() for p in create_model("resnet18").parameters())
    with_se = create_model("resnet18", se=True)
    assert sum(p.numel() for p in with_se.parameters()) > plain
    assert sum(isinstance(m, nn.Sigmoid) for m in with_se.modules()) == 8  # one per block


def _correlated_images(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.5, 0.5, 0.5]])
    images = torch.einsum("oc,nchw->nohw", mix, torch.randn(n, 3, 32, 32, generator=gen))
    # Neighbouring pixels correlate too, so the 2x2 patches are far from white.
    return images + 0.8 * images.roll(1, dims=2) + 0.5 * images.roll(1, dims=3)


def _patch_covariance(stem: nn.Conv2d, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = stem(images)[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double()
    return out.T @ out / out.shape[0]


def test_fit_whitening_whitens_patches() -> None:
    images = _correlated_images(64, seed=0)
    stem = create_model("airbench_net").whiten
    eye = torch.eye(12, dtype=torch.float64)
    assert not torch.allclose(_patch_covariance(stem, images), eye, atol=0.1)  # not white before
    fit_whitening(stem, images, eps=5e-4, chunk_size=16)
    # eps shrinks each variance to lambda / (lambda + eps); here every lambda is > 0.08, so > 0.99.
    assert torch.allclose(_patch_covariance(stem, images), eye, atol=0.01)
    assert torch.equal(stem.weight[12:], -stem.weight[:12])
    assert torch.count_nonzero(stem.bias) == 0
    # Held-out images from the same distribution are whitened too (up to sampling error).
    assert torch.allclose(_patch_covariance(stem, _correlated_images(64, seed=1)), eye, atol=0.1)


def test_fit_whitening_eps_and_order() -> None:
    images = _correlated_images(32, seed=0)
    patches = F.unfold(images.double(), 2).transpose(1, 2).reshape(-1, 12)
    eigenvalues = torch.linalg.eigvalsh(patches.T @ patches / len(patches)).flip(0)
    stem = create_model("airbench_net").whiten
    eps = 0.5  # large enough that the shrinkage, and its ordering, is clearly visible
    fit_whitening(stem, images, eps=eps)
    cov = _patch_covariance(stem, images)
    expected = eigenvalues / (eigenvalues + eps)  # channel 0 = largest eigenvalue
    assert torch.allclose(cov.diagonal(), expected, atol=1e-4)
    assert torch.allclose(cov - torch.diag(cov.diagonal()), torch.zeros_like(cov), atol=1e-4)


@pytest.mark.parametrize("name", ["vit_tiny"])
def test_vit_drop_path_is_stochastic_only_in_training(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, drop_path=0.5)
    x = _images(4)
    with torch.no_grad():
        model.train()
        assert not torch.allclose(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))


def _shard_attention(attn: nn.Module, rank: int, world: int) -> nn.Module:
    """What tensor parallelism leaves on one rank: q/k/v column shards, a proj row shard."""
    shard = copy.deepcopy(attn)
    width = attn.q.out_features // world
    rows = slice(rank * width, (rank + 1) * width)
    with torch.no_grad():
        for name in ("q", "k", "v"):
            full = getattr(attn, name)
            local = nn.Linear(full.in_features, width)
            local.weight.copy_(full.weight[rows])
            local.bias.copy_(full.bias[rows])
            setattr(shard, name, local)
        shard.proj = nn.Linear(width, attn.proj.out_features)
        shard.proj.weight.copy_(attn.proj.weight[:, rows])
        shard.proj.bias.copy_(attn.proj.bias if rank == 0 else torch.zeros_like(attn.proj.bias))
    return shard


def test_vit_attention_works_when_sharded_across_ranks() -> None:
    torch.manual_seed(0)
    attn = create_model("vit_small").eval().blocks[0].attn
    assert attn.num_heads == 6 and attn.head_dim == 64
    assert all(getattr(attn, n).weight.shape == (384, 384) for n in ("q", "k", "v", "proj"))
    x = torch.randn(2, 65, 384)
    with torch.no_grad():
        # Row-parallel proj outputs are summed across ranks (the all-reduce), giving the full result.
        sharded = sum(_shard_attention(attn, rank, 2)(x) for rank in range(2))
        assert torch.allclose(sharded, attn(x), atol=1e-5)
