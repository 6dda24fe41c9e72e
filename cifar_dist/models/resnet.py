"""CIFAR ResNet-18 and pre-activation ResNet-18, with optional squeeze-and-excitation."""

from __future__ import annotations

from torch import Tensor, nn

from .norm import make_norm2d
from .registry import PipelineModel, TensorParallelPlan, register_model

STAGES = ((64, 1), (128, 2), (256, 2), (512, 2))  # (width, stride of the stage's first block)
BLOCKS_PER_STAGE = 2


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class SqueezeExcite(nn.Module):
    """Channel gates from globally pooled features (Hu et al. 2018)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate(x)


class BasicBlock(nn.Module):
    """conv-norm-ReLU-conv-norm (+SE), added to the shortcut, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, groups: int, se: bool):
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.norm1 = make_norm2d(norm, c_out, groups)
        self.conv2 = conv3x3(c_out, c_out)
        self.norm2 = make_norm2d(norm, c_out, groups)
        self.se = SqueezeExcite(c_out) if se else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                make_norm2d(norm, c_out, groups),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.se(self.norm2(self.conv2(out)))
        return self.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """norm-ReLU-conv-norm-ReLU-conv (+SE), added to the shortcut (He et al. 2016b)."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, groups: int, se: bool):
        super().__init__()
        self.norm1 = make_norm2d(norm, c_in, groups)
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.norm2 = make_norm2d(norm, c_out, groups)
        self.conv2 = conv3x3(c_out, c_out)
        self.se = SqueezeExcite(c_out) if se else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.norm1(x))
        # A projection sees the pre-activated input, as in the paper; identity sees raw x.
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.se(self.conv2(self.relu(self.norm2(out))))
        return out + shortcut


class Head(nn.Module):
    """[norm-ReLU for pre-activation nets] -> global average pool -> dropout -> linear."""

    def __init__(self, channels: int, num_classes: int, dropout: float, pre: nn.Module) -> None:
        super().__init__()
        self.pre = pre
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(self.pool(self.pre(x)).flatten(1)))


class ResNet(PipelineModel):
    def __init__(
        self, num_classes: int, preact: bool, norm: str, groups: int, se: bool, dropout: float
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.preact = preact
        # CIFAR stem: one 3x3 conv and no max-pool, so the first stage runs at 32x32.
        stem: list[nn.Module] = [conv3x3(3, 64)]
        if not preact:  # pre-activation blocks normalise their own input
            stem += [make_norm2d(norm, 64, groups), nn.ReLU(inplace=True)]
        self.stem = nn.Sequential(*stem)
        block = PreActBlock if preact else BasicBlock
        blocks: list[nn.Module] = []
        c_in = 64
        for width, stride in STAGES:
            for i in range(BLOCKS_PER_STAGE):
                blocks.append(block(c_in, width, stride if i == 0 else 1, norm, groups, se))
                c_in = width
        self.blocks = nn.Sequential(*blocks)
        # Pre-activation nets end un-normalised, so the head adds the final norm-ReLU.
        pre = nn.Sequential(make_norm2d(norm, c_in, groups), nn.ReLU()) if preact else nn.Identity()
        self.head = Head(c_in, num_classes, dropout, pre)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def pipeline_layers(self) -> list[nn.Module]:
        return [self.stem, *self.blocks, self.head]

    def tensor_parallel_plan(self) -> TensorParallelPlan:
        """conv1 column / conv2 row in every block, with the norm between them local
        (norm2 for pre-activation blocks, norm1 for post-activation ones); the stem, the
        shortcuts, SE and the residual adds see whole tensors; the head splits its features."""
        between = "norm2" if self.preact else "norm1"
        plan: TensorParallelPlan = {}
        for i in range(len(self.blocks)):
            p = f"blocks.{i}."
            plan.update({p + "conv1": "colwise", p + between: "split_norm", p + "conv2": "rowwise"})
        plan["head.fc"] = "rowwise_whole"
        return plan


@register_model("resnet18")
def resnet18(
    num_classes: int = 10,
    *,
    norm: str = "batch",
    groups: int = 8,
    se: bool = False,
    dropout: float = 0.0,
    drop_path: float = 0.0,
) -> nn.Module:
    """CIFAR ResNet-18 (3x3 stem, no max-pool, [2,2,2,2] BasicBlocks of 64/128/256/512).

    Applies: norm, groups (with norm="group"), se (reduction 16 in every block), dropout (before
    the final linear). Ignored: drop_path.
    """
    return ResNet(num_classes, False, norm, groups, se, dropout)


@register_model("preact_resnet18")
def preact_resnet18(
    num_classes: int = 10,
    *,
    norm: str = "batch",
    groups: int = 8,
    se: bool = False,
    dropout: float = 0.0,
    drop_path: float = 0.0,
) -> nn.Module:
    """Pre-activation CIFAR ResNet-18 (same layout as resnet18, norm-ReLU before each conv).

    Applies: norm, groups (with norm="group"), se (reduction 16 in every block), dropout (before
    the final linear). Ignored: drop_path.
    """
    return ResNet(num_classes, True, norm, groups, se, dropout)
