"""Small Vision Transformers for 32x32 images, laid out for tensor and pipeline parallelism."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import PipelineModel, TensorParallelPlan, register_model

IMAGE_SIZE = 32
PATCH_SIZE = 4  # 32x32 -> 8x8 = 64 tokens


class DropPath(nn.Module):
    """Stochastic depth per sample. Written here because timm is not a dependency."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep  # rescale so the expected output equals eval mode's


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections.

    Separate column-shardable q, k, v and a row-shardable proj let tensor parallelism split the
    heads across ranks; forward infers the local head count from the (possibly sharded) q width.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        q, k, v = (
            lin(x).view(b, n, -1, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v)
        )
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, -1)))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + mlp(LN(x)), each with DropPath."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, dropout: float, drop_path: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, dropout)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio), dropout)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class Embedding(nn.Module):
    """4x4 patch conv -> tokens, prepend the CLS token, add learned position embeddings."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, PATCH_SIZE, stride=PATCH_SIZE)
        num_tokens = (IMAGE_SIZE // PATCH_SIZE) ** 2 + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.drop = nn.Dropout(dropout)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.patch(images).flatten(2).transpose(1, 2)  # (B, 64, dim)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return self.drop(torch.cat((cls, tokens), dim=1) + self.pos_embed)


class Head(nn.Module):
    """Final LayerNorm -> CLS token -> linear classifier."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.norm(x)[:, 0])


class VisionTransformer(PipelineModel):
    def __init__(
        self,
        num_classes: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed = Embedding(dim, dropout)
        # Stochastic depth rises linearly with depth (as in DeiT): early blocks are kept more.
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.Sequential(
            *(Block(dim, num_heads, mlp_ratio, dropout, rate) for rate in rates)
        )
        self.head = Head(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def pipeline_layers(self) -> list[nn.Module]:
        return [self.embed, *self.blocks, self.head]

    def tensor_parallel_plan(self) -> TensorParallelPlan:
        """Megatron-style: q, k, v and mlp.fc1 column-wise (heads and hidden units split),
        attn.proj and mlp.fc2 row-wise (one all-reduce each). The seq_* entries apply only
        with parallel.sequence_parallel: the residual stream and LayerNorms sharded along the
        tokens, gathered before attention / MLP / head, scattered after the embedding."""
        plan: TensorParallelPlan = {"embed": "seq_scatter", "head": "seq_gather_local"}
        for i in range(len(self.blocks)):
            p = f"blocks.{i}."
            plan.update(
                {
                    p + "attn.q": "colwise",
                    p + "attn.k": "colwise",
                    p + "attn.v": "colwise",
                    p + "attn.proj": "rowwise_seq",
                    p + "mlp.fc1": "colwise",
                    p + "mlp.fc2": "rowwise_seq",
                    p + "norm1": "seq_norm",
                    p + "norm2": "seq_norm",
                    p + "attn": "seq_gather",
                    p + "mlp": "seq_gather",
                }
            )
        return plan

    def tensor_parallel_divisors(self) -> dict[str, int]:
        """Counts tp must divide, besides the widths of the planned layers."""
        return {"the ViT's {} attention heads": self.blocks[0].attn.num_heads}


@register_model("vit_tiny")
def vit_tiny(
    num_classes: int = 10,
    *,
    norm: str = "batch",
    groups: int = 8,
    se: bool = False,
    dropout: float = 0.0,
    drop_path: float = 0.0,
) -> nn.Module:
    """ViT with dim 192, depth 6, 3 heads, MLP 4x, 4x4 patches; expects 32x32 inputs.

    Applies: dropout (embeddings, attention output, MLP), drop_path (stochastic depth rising
    linearly from 0 in the first block to `drop_path` in the last). Ignored: norm, groups
    (LayerNorm throughout), se.
    """
    return VisionTransformer(num_classes, 192, 6, 3, dropout=dropout, drop_path=drop_path)


@register_model("vit_small")
def vit_small(
    num_classes: int = 10,
    *,
    norm: str = "batch",
    groups: int = 8,
    se: bool = False,
    dropout: float = 0.0,
    drop_path: float = 0.0,
) -> nn.Module:
    """ViT with dim 384, depth 6, 6 heads, MLP 4x, 4x4 patches; expects 32x32 inputs.

    Applies: dropout (embeddings, attention output, MLP), drop_path (stochastic depth rising
    linearly from 0 in the first block to `drop_path` in the last). Ignored: norm, groups
    (LayerNorm throughout), se.
    """
    return VisionTransformer(num_classes, 384, 6, 6, dropout=dropout, drop_path=drop_path)


@register_model("vit_nano")
def vit_nano(
    num_classes: int = 10,
    *,
    norm: str = "batch",
    groups: int = 8,
    se: bool = False,
    dropout: float = 0.0,
    drop_path: float = 0.0,
) -> nn.Module:
    """ViT with dim 64, depth 4, 4 heads, MLP 4x, 4x4 patches (~0.2M parameters); for tests and
    smoke runs of the parallel layouts (4 heads split 2 or 4 ways, 6 pipeline layers).

    Applies: dropout, drop_path (as vit_tiny). Ignored: norm, groups (LayerNorm throughout), se.
    """
    return VisionTransformer(num_classes, 64, 4, 4, dropout=dropout, drop_path=drop_path)
