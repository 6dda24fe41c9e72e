"""After training: make a trained model smaller and faster, and measure what it costs.

- `fuse`: fold eval-mode BatchNorm into the preceding conv (exact up to float rounding).
- `quantize`: INT8 post-training static quantization (torch.ao FX graph mode, x86 backend) for
  the CNNs; dynamic INT8 quantization of the linears for the ViT.
- `prune`: L2-norm structured filter pruning of block-internal convs, then physical removal of
  the pruned channels (see `prune.py` for which layers and why).
- `finetune`: a short training loop to recover accuracy after pruning.
- `export`: ONNX (checked with onnxruntime) and TorchScript, both with a dynamic batch dim,
  plus weights-only save/load of the float variants.
- `report`: size, latency, throughput and accuracy measurement and a markdown table.
- `cli`: `cifar-dist compress ...`.

Submodules are not imported here so that `import cifar_dist.compress` stays cheap and does not
need the optional ONNX packages.
"""

from __future__ import annotations


class CompressError(RuntimeError):
    """A compression request that cannot be carried out; the message is one line for the CLI."""


__all__ = ["CompressError"]
