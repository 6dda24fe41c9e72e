"""The plain VGG-style CNN of the original notes (`seed_cnn`)."""

from __future__ import annotations

from torch import Tensor, nn

from .norm import make_norm2d
from .registry import PipelineModel, TensorParallelPlan, register_model

WIDTHS = (64, 128, 256, 512)


class ConvBlock(nn.Sequential):
    """Two 3x3 conv-norm-ReLU, then 2x2 max-pool (halves H, W), then dropout."""

    def __init__(self, c_in: int, c_out: int, norm: str, groups: int, dropout: float) -> None:
        super().__init__(
            # No conv bias: the norm that follows has its own shift.
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            make_norm2d(norm, c_out, groups),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            make_norm2d(norm, c_out, groups),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Dropout(dropout),
        )


class Classifier(nn.Module):
    """Flatten 512x2x2 -> 1024 -> 512 -> classes, with ReLU and dropout between."""

    def __init__(self, in_features: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, 1024),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(1024, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(512, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SeedCNN(PipelineModel):
    def __init__(self, num_classes: int, norm: str, groups: int, dropout: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        chans = (3, *WIDTHS)
        self.blocks = nn.Sequential(
            *(ConvBlock(chans[i], chans[i + 1], norm, groups, dropout) for i in range(len(WIDTHS)))
        )
        # Four 2x pools take 32x32 inputs to 2x2.
        self.classifier = Classifier(WIDTHS[-1] * 2 * 2, num_classes, dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def pipeline_layers(self) -> list[nn.Module]:
        return [*self.blocks, self.classifier]

    def tensor_parallel_plan(self) -> TensorParallelPlan:
        """Each block's conv pair column/row with the norm between local (the block's output
        norm, pool and dropout see whole tensors); the MLP head's first two linears column/row."""
        plan: TensorParallelPlan = {}
        for i in range(len(self.blocks)):
            p = f"blocks.{i}."
            plan.update({p + "0": "colwise", p + "1": "split_norm", p + "3": "rowwise"})
        plan.update({"classifier.net.1": "colwise", "classifier.net.4": "rowwise"})
        return plan


@register_model("seed_cnn")
def seed_cnn(
    num_classes: int = 10,
    *,
    norm: str = "batch",
    groups: int = 8,
    se: bool = False,
    dropout: float = 0.0,
    drop_path: float = 0.0,
) -> nn.Module:
    """Four conv blocks (64/128/256/512) + 3-layer MLP head; expects 32x32 inputs.

    Applies: norm, groups (with norm="group"), dropout (after each block and each hidden linear).
    Ignored: se, drop_path.
    """
    return SeedCNN(num_classes, norm, groups, dropout)
