"""The parallel report of a run: `<run_dir>/parallel.json` and one line at start (rank 0).

What each rank really holds (local shard sizes: DTensor for TP / channel-TP / FSDP2, the held
stages for a pipeline, DeepSpeed ZeRO-3 partitions), the pipeline's per-stage FLOP shares, the
analytic bytes each rank sends per optimiser step, and, at the end of the run, the peak memory
and optimizer-state bytes of every rank. Gathered with all_gather_object: every rank calls
`start_report` and `finish_report`; rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import resource
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from cifar_dist.parallel import pipeline
from cifar_dist.parallel.mesh import ParallelDims

REPORT_FILE = "parallel.json"


def _ring(n: int) -> float:
    """Fraction of a buffer each rank sends per ring pass (reduce-scatter or all-gather)."""
    return (n - 1) / n


def _sample(model: nn.Module) -> torch.Tensor:
    """One zero image on the model's device and dtype (meta for a shapes-only model)."""
    p = next(model.parameters())
    return torch.zeros(1, 3, 32, 32, device=p.device, dtype=p.dtype)


def local_params(model: nn.Module) -> dict[str, int]:
    """This rank's parameters: total (global sizes), local (what it holds), sharded_local (the
    part of local that is a shard of a split parameter) and the bytes of local."""
    total = local = sharded = nbytes = 0
    for p in model.parameters():
        total += int(getattr(p, "ds_numel", p.numel()))  # ds_numel: ZeRO-3's full size
        if p.is_meta:  # a pipeline layer another stage holds (release_other_layers)
            continue
        if isinstance(p, DTensor):
            t = p.to_local()
            split = any(isinstance(pl, Shard) for pl in p.placements)
        elif hasattr(p, "ds_tensor"):  # DeepSpeed ZeRO-3: the rank's partition
            t, split = p.ds_tensor, True
        else:
            t, split = p, False
        local += t.numel()
        sharded += t.numel() if split else 0
        nbytes += t.numel() * t.element_size()
    return {"total": total, "local": local, "sharded_local": sharded, "local_bytes": nbytes}


def stage_flop_shares(model: nn.Module, bounds: list[range]) -> list[float]:
    """Forward FLOP share of every pipeline stage (layer_flops on one sample, on the meta
    device: counting needs shapes only, and the trainer's copy has other stages on meta)."""
    import copy

    meta = copy.deepcopy(model).to("meta")
    flops = pipeline.layer_flops(meta, _sample(meta))  # type: ignore[arg-type]
    per_stage = [sum(flops[i] for i in r) for r in bounds]
    return [f / max(sum(per_stage), 1) for f in per_stage]


def cnn_tp_elements(model: nn.Module) -> int:
    """Per-sample elements all-reduced by a CNN's tensor-parallel plan in one direction: the
    output of every row-parallel layer (forward) and, as many, the input gradients of the
    column-parallel layers (backward; the same activations: whole tensors between pairs)."""
    sizes: dict[str, int] = {}
    plan = model.tensor_parallel_plan()  # type: ignore[operator]
    hooks = [
        model.get_submodule(fqn).register_forward_hook(
            lambda _m, _i, out, fqn=fqn: sizes.__setitem__(fqn, out[0].numel())
        )
        for fqn, style in plan.items()
        if style.startswith("rowwise")
    ]
    with torch.no_grad():
        model.eval()(_sample(model))
    for h in hooks:
        h.remove()
    return sum(sizes.values())


def comm_bytes(
    model: nn.Module,
    dims: ParallelDims,
    per_rank_batch: float,
    bounds: list[range] | None = None,
    elem: int = 4,
) -> float:
    """Bytes each rank sends per optimiser step (max over ranks), ring collectives, analytic.

    `model` is the whole (unsplit) model, on any device (meta is enough); `bounds` the pipeline
    stages (default: FLOP-balanced as plan_pipeline cuts). Formulas: docs/parallelism.md.
    """
    params = sum(p.numel() for p in model.parameters())
    total = 0.0
    if dims.pp > 1:
        sample = _sample(model)
        if bounds is None:
            bounds = pipeline.stage_bounds(
                model,  # type: ignore[arg-type]
                dims.pp,
                [],
                pipeline.layer_flops(model, sample),  # type: ignore[arg-type]
            )
        acts = pipeline.example_activations(model, bounds, sample)  # type: ignore[arg-type]
        inner = [a.numel() for a in acts[1:-1]]  # per sample, at each stage boundary
        # a middle stage receives one activation and one gradient, and sends as much
        worst = max(x + y for x, y in zip([0, *inner], [*inner, 0]))
        total += worst * per_rank_batch * elem
        layers = model.pipeline_layers()  # type: ignore[operator]
        stage_params = max(
            sum(p.numel() for i in r for p in layers[i].parameters()) for r in bounds
        )
        total += 2 * _ring(dims.dp) * stage_params * elem if dims.dp > 1 else 0.0
    elif dims.tp > 1:
        if hasattr(model, "blocks") and hasattr(model.blocks[0], "attn"):
            tokens, dim = model.embed.pos_embed.shape[1:]
            # 2 all-reduces forward + 2 backward per block (or the same bytes as reduce-scatter
            # + all-gather pairs under sequence parallel)
            total += (
                len(model.blocks) * 4 * 2 * _ring(dims.tp) * per_rank_batch * tokens * dim * elem
            )
        else:  # CNN: one all-reduce forward (row) + one backward (column) per split pair,
            # each sending 2 (tp-1)/tp of the activation (reduce-scatter + all-gather phases)
            total += cnn_tp_elements(model) * 2 * 2 * _ring(dims.tp) * per_rank_batch * elem
        if dims.dp > 1:  # FSDP over dp of this rank's 1/tp of the weights (approx.)
            total += 3 * _ring(dims.dp) * params / dims.tp * elem
    elif dims.dp > 1:
        passes = 3 if dims.dp_mode == "fsdp" else 2  # all-gather x2 + reduce-scatter vs all-reduce
        total += passes * _ring(dims.dp) * params * elem
    return total


def _gather(mine: dict[str, Any]) -> list[dict[str, Any]]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def _mesh(trainer: Any) -> dict[str, Any]:
    dims, cfg = trainer.dims, trainer.cfg
    mesh = {
        "world": dims.world_size,
        "dp": dims.dp,
        "tp": dims.tp,
        "pp": dims.pp,
        "dp_mode": dims.dp_mode,
        "engine": cfg.parallel.engine,
    }
    ds = getattr(trainer.backend, "ds_config", None)
    if isinstance(ds, dict):
        mesh["zero_stage"] = ds.get("zero_optimization", {}).get("stage", 0)
    return mesh


def build_report(trainer: Any, whole: nn.Module) -> dict[str, Any]:
    """The start-of-run report (collective: every rank calls it; all get the same dict).
    `whole` is the unsplit model, shapes only (the caller builds it: parallel never imports
    train)."""
    dims, info, cfg = trainer.dims, trainer.info, trainer.cfg
    counts = local_params(trainer.model)
    held = getattr(
        trainer.backend, "ds_module", trainer.model
    )  # DeepSpeed pipe: this stage's module
    if held is not trainer.model:
        counts.update({k: v for k, v in local_params(held).items() if k != "total"})
    mine = {"rank": info.rank, **dims.coords(info.rank)._asdict(), **counts}
    ranks = _gather(mine)
    plan = getattr(trainer.backend, "plan", None)
    bounds = plan.bounds if plan is not None and dims.pp > 1 else None
    elem = torch.finfo(trainer.dtype).bits // 8 if trainer.dtype.is_floating_point else 4
    per_rank_batch = cfg.data.batch_size / dims.dp
    mesh = _mesh(trainer)
    if mesh.get("zero_stage") == 3:  # ZeRO-3 moves FSDP's bytes: gather x2 + reduce-scatter
        dims = dataclasses.replace(dims, dp_mode="fsdp")
    return {
        "mesh": mesh,
        "params_total": ranks[0]["total"],
        "ranks": ranks,
        "pp_stage_bounds": [[r.start, r.stop] for r in bounds] if bounds else None,
        "pp_stage_flop_share": stage_flop_shares(whole, bounds) if bounds else None,
        "comm_bytes_per_step": comm_bytes(whole, dims, per_rank_batch, bounds, elem),
        "global_batch": cfg.data.batch_size,
        "bytes_per_element": elem,
    }


def summary_line(rep: dict[str, Any]) -> str:
    m, ranks = rep["mesh"], rep["ranks"]
    most = max(r["local"] for r in ranks)
    line = (
        f"parallel: world {m['world']} = dp {m['dp']} x tp {m['tp']} x pp {m['pp']} "
        f"({m['dp_mode']}, {m['engine']}); params/rank max {most:,} of {rep['params_total']:,}; "
        f"comm {rep['comm_bytes_per_step'] / 2**20:.2f} MiB/step/rank"
    )
    if rep["pp_stage_flop_share"]:
        line += "; stage FLOPs " + "/".join(f"{s:.0%}" for s in rep["pp_stage_flop_share"])
    return line


def start_report(trainer: Any, run_dir: Path, whole: nn.Module) -> None:
    """Collective: write parallel.json and print the one-line summary (rank 0)."""
    rep = build_report(trainer, whole)
    if trainer.info.is_main:
        (run_dir / REPORT_FILE).write_text(json.dumps(rep, indent=2))
        print(summary_line(rep), flush=True)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max_memory_allocated (tensors); CPU: the process's peak RSS (ru_maxrss, KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of this rank's optimizer state tensors (local shards for DTensor state)."""
    n = 0
    for state in getattr(optimizer, "state", {}).values():
        for v in state.values() if isinstance(state, dict) else ():
            t = v.to_local() if isinstance(v, DTensor) else v
            if isinstance(t, torch.Tensor) and t.dim() > 0:  # not the step counters
                n += t.numel() * t.element_size()
    return n


def finish_report(trainer: Any, run_dir: Path) -> None:
    """Collective: add every rank's peak memory and optimizer-state bytes to parallel.json."""
    mine = {
        "peak_memory_bytes": peak_memory_bytes(trainer.device),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),
    }
    everyone = _gather(mine)
    path = run_dir / REPORT_FILE
    if trainer.info.is_main and path.exists():
        rep = json.loads(path.read_text())
        for r, extra in zip(rep["ranks"], everyone):
            r.update(extra)
        path.write_text(json.dumps(rep, indent=2))
