"""After training: BN fusion, INT8, structured pruning, ONNX/TorchScript export, the CLI."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cifar_dist.compress import CompressError
from cifar_dist.compress.export import (
    export_onnx,
    export_torchscript,
    load_float_model,
    load_torchscript,
    save_float_model,
)
from cifar_dist.compress.fuse import fuse_bn
from cifar_dist.compress.prune import prune_model, prune_sites
from cifar_dist.compress.quantize import quantize_dynamic, quantize_int8, quantize_static
from cifar_dist.compress.report import state_dict_bytes
from cifar_dist.config import load_config
from cifar_dist.config.load import config_to_dict
from cifar_dist.models import create_model

CNNS = ["airbench_net", "preact_resnet18", "resnet18", "seed_cnn"]
# conv+BN pairs each CNN can fold, and the BNs that must stay (preact: 8 norm1 + head norm).
EXPECTED_PAIRS = {"airbench_net": 6, "preact_resnet18": 8, "resnet18": 20, "seed_cnn": 8}
EXPECTED_BN_LEFT = {"airbench_net": 0, "preact_resnet18": 9, "resnet18": 0, "seed_cnn": 0}


def _bns(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def _eval_model(name: str, negative_scales: bool = False, seed: int = 0) -> nn.Module:
    """Random weights, random BN affine params, running stats from a few train-mode passes."""
    torch.manual_seed(seed)
    model = create_model(name)
    for bn in _bns(model):
        scale = torch.empty(bn.num_features).uniform_(0.5, 1.5)
        if negative_scales:
            scale[::3] *= -1  # every third channel flips sign
        bn.weight.data.copy_(scale)
        bn.bias.data.normal_(0, 0.5)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32) * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize("name", CNNS)
def test_fused_matches_unfused(name: str) -> None:
    model = _eval_model(name)
    assert all(bn.num_batches_tracked == 3 for bn in _bns(model))
    assert any(bn.running_var.sub(1).abs().max() > 0.05 for bn in _bns(model))  # non-trivial
    fused, pairs = fuse_bn(model)
    assert len(pairs) == EXPECTED_PAIRS[name]
    assert len(_bns(fused)) == EXPECTED_BN_LEFT[name]
    assert len(_bns(model)) > EXPECTED_BN_LEFT[name]  # the original is untouched
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert ref.abs().max() > 1e-2  # logits large enough for the tolerance to mean something
    assert (ref - out).abs().max().item() <= 1e-4


def test_fuse_through_maxpool_only_with_positive_scales() -> None:
    """airbench's conv -> maxpool -> BN folds only if every BN scale is > 0 (max commutes)."""
    model = _eval_model("airbench_net", negative_scales=True)
    fused, pairs = fuse_bn(model)
    assert len(pairs) == 3  # only the adjacent conv -> BN pairs
    assert all(bn.endswith(".5") for _, bn in pairs)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - fused(x)).abs().max().item() <= 1e-4


def test_fuse_refuses_training_mode_and_models_without_bn() -> None:
    model = _eval_model("seed_cnn")
    with pytest.raises(CompressError, match="training mode"):
        fuse_bn(model.train())
    model.eval()
    model.blocks[1].train()  # one submodule left in training mode is refused too
    with pytest.raises(CompressError, match=r"training mode \(blocks.1\)"):
        fuse_bn(model)
    with pytest.raises(CompressError, match="no BatchNorm2d"):
        fuse_bn(create_model("vit_tiny").eval())
    with pytest.raises(CompressError, match="no BatchNorm2d"):
        fuse_bn(create_model("resnet18", norm="group").eval())


def test_fused_and_pruned_save_load_round_trip(tmp_path: Path) -> None:
    model = _eval_model("resnet18")
    pruned, layers = prune_model(model, 0.25)
    fused, pairs = fuse_bn(pruned)
    config = config_to_dict(load_config(None, {"model.name": "resnet18"}))
    widths = {name: w["after"] for name, w in layers.items()}
    path = save_float_model(tmp_path / "m.pt", fused, config, widths, pairs)
    loaded = load_float_model(path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fused(x), rtol=0, atol=1e-6)


# ----- INT8 ---------------------------------------------------------------------------------
RES = 16  # airbench's adaptive head takes 16x16 inputs: 4x cheaper to train than 32x32


def _learnable(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Class prototype + noise: learnable in a few steps, not trivially separable."""
    protos = torch.randn(10, 3, RES, RES, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    return protos[labels] + 1.6 * torch.randn(n, 3, RES, RES, generator=g), labels


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, Tensor, Tensor, Tensor, Tensor]:
    """airbench_net after 20 Adam steps: (model, train images, train labels, val images, val labels)."""
    torch.manual_seed(0)
    model = create_model("airbench_net")
    images, labels = _learnable(512, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for step in range(20):
        idx = torch.arange(32) + 32 * (step % 16)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for bn in _bns(model):  # exact population statistics, so eval mode matches training
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        for chunk in images.split(128):
            model(chunk)
    val_images, val_labels = _learnable(256, seed=2)
    return model.eval(), images, labels, val_images, val_labels


def test_int8_static_is_small_and_agrees(trained: tuple) -> None:
    model, images, _, val_images, val_labels = trained
    calib = [images[i : i + 32] for i in range(0, 128, 32)]
    qmodel, mode = quantize_int8(model, calib, images[:2])
    assert mode == "static"
    kinds = {type(m).__module__ for m in qmodel.modules()}
    assert any(k.startswith("torch.ao.nn.quantized") for k in kinds), kinds  # real int8 modules
    with torch.no_grad():
        ref, out = model(val_images), qmodel(val_images)
    fp32_acc = (ref.argmax(1) == val_labels).float().mean().item()
    assert fp32_acc >= 0.8, fp32_acc  # the model learned something: its top-1 is meaningful
    agreement = (ref.argmax(1) == out.argmax(1)).float().mean().item()
    assert agreement >= 0.95, agreement
    # Size = bytes of torch.save(state_dict): int8 packed weights vs fp32 weights.
    ratio = state_dict_bytes(model) / state_dict_bytes(qmodel)
    assert ratio >= 3.0, ratio


def test_int8_vit_is_dynamic_and_static_refused() -> None:
    torch.manual_seed(0)
    vit = create_model("vit_tiny").eval()
    with pytest.raises(CompressError, match="static quantization does not support"):
        quantize_static(vit, [torch.randn(2, 3, 32, 32)], torch.randn(2, 3, 32, 32))
    qvit = quantize_dynamic(vit)
    assert not any(type(m) is nn.Linear for m in qvit.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert qvit(x).shape == (2, 10)
        assert (qvit(x) - vit(x)).abs().max() < 0.1
    assert state_dict_bytes(vit) / state_dict_bytes(qvit) >= 3.0


# ----- pruning ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CNNS)
def test_prune_half_removes_channels(name: str) -> None:
    model = _eval_model(name)
    pruned, layers = prune_model(model, 0.5)
    assert layers and all(w["after"] * 2 == w["before"] for w in layers.values())
    for site in prune_sites(pruned):
        conv, norm = pruned.get_submodule(site.conv), pruned.get_submodule(site.norm)
        before = model.get_submodule(site.conv).out_channels
        assert conv.out_channels == conv.weight.shape[0] == before // 2
        assert norm.num_features == norm.running_mean.numel() == before // 2
        assert pruned.get_submodule(site.next_conv).weight.shape[1] == before // 2
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in pruned.parameters()) < n_params
    # The surgery is exact: it equals the original with the removed channels' contribution to
    # the next conv zeroed, which fails if the wrong channels or slices were taken.
    reference = _eval_model(name)
    for site in prune_sites(reference):
        conv = reference.get_submodule(site.conv)
        norms = conv.weight.detach().flatten(1).norm(dim=1)
        removed = norms.argsort()[: conv.out_channels // 2]  # lowest L2 norms go
        reference.get_submodule(site.next_conv).weight.data[:, removed] = 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out, ref = pruned(x), reference(x)
    assert out.shape == model(x).shape == (2, 10)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_prune_refuses_unsupported_models() -> None:
    with pytest.raises(CompressError, match="no prunable conv blocks"):
        prune_model(create_model("vit_tiny"), 0.5)
    with pytest.raises(CompressError, match="norm=batch"):
        prune_model(create_model("seed_cnn", norm="group"), 0.5)
    with pytest.raises(CompressError, match="amount"):
        prune_model(create_model("seed_cnn"), 1.0)


def test_finetune_step_runs_on_pruned_model(trained: tuple) -> None:
    from cifar_dist.compress.finetune import finetune

    model, images, labels, _, _ = trained
    pruned, _ = prune_model(model, 0.5)
    loader = [(images[i : i + 32], labels[i : i + 32]) for i in range(0, 96, 32)]
    cfg = load_config(None, {"optim.lr": 0.05, "schedule.name": "constant", "data.batch_size": 32})
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    history = finetune(pruned, loader, cfg, epochs=1, max_steps=2)
    assert history[0]["steps"] == 2 and torch.isfinite(torch.tensor(history[0]["loss"]))
    assert not pruned.training
    moved = [k for k, v in pruned.state_dict().items() if v.is_floating_point()]
    assert any((pruned.state_dict()[k] - before[k]).abs().max() > 0 for k in moved)


# ----- export -------------------------------------------------------------------------------
def test_onnx_matches_pytorch_with_dynamic_batch(trained: tuple, tmp_path: Path) -> None:
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
    pytest.importorskip("onnxruntime", reason="the ONNX check runs the graph in onnxruntime")
    from cifar_dist.compress.export import OrtModel

    model, _, _, val_images, _ = trained
    path = export_onnx(model, tmp_path / "model.onnx", val_images[:2])  # one export
    ort_model = OrtModel(path)
    assert isinstance(ort_model.session.get_inputs()[0].shape[0], str)  # symbolic batch dim
    for batch in (1, 7):
        x = val_images[10 : 10 + batch]
        with torch.no_grad():
            ref = model(x)
        assert ref.abs().max() > 0.1
        assert (ort_model(x) - ref).abs().max().item() <= 1e-4


def test_torchscript_matches_pytorch_with_dynamic_batch(trained: tuple, tmp_path: Path) -> None:
    model, _, _, val_images, _ = trained
    loaded = load_torchscript(export_torchscript(model, tmp_path / "model.ts", val_images[:2]))
    for batch in (1, 7):
        x = val_images[20 : 20 + batch]
        with torch.no_grad():
            assert (loaded(x) - model(x)).abs().max().item() <= 1e-4


def test_accuracy_counts_top1_for_modules_without_parameters() -> None:
    from cifar_dist.compress.report import accuracy

    class Fixed(nn.Module):  # like an ONNX Runtime session: no parameters at all
        def forward(self, images: Tensor) -> Tensor:
            return F.one_hot(images[:, 0, 0, 0].long(), 10).float()

    predicted = torch.tensor([1, 2, 3, 4])
    images = predicted.float().view(4, 1, 1, 1).expand(4, 3, 2, 2)
    loader = [(images, torch.tensor([1, 2, 0, 0])), (images, torch.tensor([1, 0, 0, 0]))]
    assert accuracy(Fixed(), loader)["acc"] == 3 / 8
    assert accuracy(Fixed(), loader, max_batches=1)["acc"] == 2 / 4


# ----- CLI ----------------------------------------------------------------------------------
def _cli_args(*argv: str) -> tuple[argparse.Namespace, list[str]]:
    from cifar_dist.compress.cli import add_compress_parser

    parser = argparse.ArgumentParser(prog="cifar-dist")
    add_compress_parser(parser.add_subparsers(dest="cmd", required=True))
    return parser.parse_known_args(["compress", *argv])


def test_cli_end_to_end(synth_cifar10: Path, tmp_path: Path) -> None:
    import json

    from cifar_dist.compress.cli import cmd_compress
    from cifar_dist.train.checkpoint import atomic_save

    cfg = load_config(None, {"model.name": "airbench_net", "data.dir": str(synth_cifar10)})
    torch.manual_seed(0)
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    state = {"model": create_model("airbench_net").state_dict(), "ema": None}
    atomic_save({**state, "config": config_to_dict(cfg)}, ckpt)
    data = ["--data.val_size=64", "--data.subset=64", "--data.batch_size=32"]
    data += ["--data.eval_batch_size=32", "--data.num_workers=0"]
    fast = ["--calib-batches=1", "--finetune-epochs=1", "--latency-iters=1", "--eval-batches=1"]
    args, rest = _cli_args(
        f"--checkpoint={ckpt}", "--fuse", "--int8", "--prune=0.5", "--export=torchscript",
        *fast, *data,
    )  # fmt: skip
    assert cmd_compress(args, rest) == 0
    out = tmp_path / "run" / "compressed"  # the default --out
    report = json.loads((out / "compress_report.json").read_text())
    names = [v["variant"] for v in report["variants"]]
    assert names == ["fp32", "pruned", "pruned+fused", "pruned+int8"]
    assert report["fuse"]["real_max_abs_diff"] <= 1e-4
    assert report["export"]["torchscript"]["random_b7_max_abs_diff"] <= 1e-4
    for f in ("model_pruned.pt", "model_fused.pt", "model_int8.ts", "model.ts"):
        assert (out / f).is_file(), f
    assert "| pruned+int8 |" in (out / "compress_report.md").read_text()
    _assert_model_artifacts(out)


def _assert_model_artifacts(out: Path) -> None:
    """W&B is on (WANDB_MODE=offline in conftest): each variant file is a model artifact."""
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    from tests.test_wandb_sink import offline_run_part

    parts = list(out.glob("wandb/offline-run-*"))
    assert len(parts) == 1
    rec = offline_run_part(parts[0])
    assert rec["run"].job_type == "compress"
    arts = {a.name: a for a in rec["artifacts"] if a.type == "model"}
    expected = {
        "airbench_net-pruned": "model_pruned.pt",
        "airbench_net-pruned-fused": "model_fused.pt",
        "airbench_net-pruned-int8": "model_int8.ts",
        "airbench_net-torchscript": "model.ts",
    }
    assert set(arts) == set(expected)
    for name, file in expected.items():
        assert name.removeprefix("airbench_net-") in arts[name].aliases
        assert [f.path for f in arts[name].manifest.contents] == [file]


def test_load_trained_prefers_ema_weights(tmp_path: Path) -> None:
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from cifar_dist.compress.cli import load_trained
    from cifar_dist.train.checkpoint import atomic_save

    raw, averaged = _eval_model("seed_cnn", seed=0), _eval_model("seed_cnn", seed=1)
    ema = AveragedModel(averaged, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    cfg = config_to_dict(load_config(None, {"model.name": "seed_cnn"}))
    ckpt = tmp_path / "last.pt"
    atomic_save({"model": raw.state_dict(), "ema": ema.state_dict(), "config": cfg}, ckpt)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for use_ema, source in ((True, averaged), (False, raw)):
            model, loaded_cfg = load_trained(ckpt, ["--data.dir=/elsewhere"], use_ema=use_ema)
            torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
            assert loaded_cfg.data.dir == "/elsewhere" and not model.training


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cifar_dist.compress.cli import cmd_compress
    from cifar_dist.train.checkpoint import atomic_save

    assert cmd_compress(*_cli_args(f"--checkpoint={tmp_path}/missing.pt", "--fuse")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cifar-dist compress: error:") and "not found" in err
    assert "\n" not in err
    # A ViT cannot be fused: refused up front, before any data is loaded or measured.
    cfg = config_to_dict(load_config(None, {"model.name": "vit_tiny", "data.dir": "/nonexistent"}))
    ckpt = tmp_path / "vit.pt"
    atomic_save({"model": create_model("vit_tiny").state_dict(), "ema": None, "config": cfg}, ckpt)
    assert cmd_compress(*_cli_args(f"--checkpoint={ckpt}", "--fuse")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cifar-dist compress: error: fuse:") and "no BatchNorm2d" in err
