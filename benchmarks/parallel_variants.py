"""DDP vs PP vs TP vs DP x TP (and DP x PP, FSDP) at the same global batch: step time, peak
memory per rank, and the communication volume per step each layout implies.

    .venv/bin/python benchmarks/parallel_variants.py                  # vit_small, 2 and 4 ranks, CPU
    .venv/bin/python benchmarks/parallel_variants.py --model vit_nano --steps 3 --warmup 1  # smoke
    .venv/bin/python benchmarks/parallel_variants.py --cnn    # CNN channel-split TP, resnet18 PP

Each variant is one `torchrun --standalone` job on synthetic data running `fit()` for
--warmup + --steps optimiser steps; this script re-launches itself as the worker. Measured:
- step time: wall time of `train_step` (data, forward, backward, communication, optimiser),
  median over the steps after --warmup, slowest rank;
- memory: peak resident set size of each rank (`resource.getrusage(RUSAGE_SELF).ru_maxrss`,
  whole process: interpreter, torch, data, model, activations) and that peak minus the RSS
  just before `fit()` (after imports), reported as max over ranks. tracemalloc would miss
  torch's C++ allocations.
Communication volume is analytic (bytes each rank sends per step with ring collectives and
fp32 = 4 bytes/element; see docs/parallelism.md for the formulas), computed from the model:
parameter counts per stage and activation sizes at stage boundaries and in the ViT blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the worker runs as a script under torchrun

# name -> (ranks, parallel overrides); dp is whatever is left of the world size.
PARAM_SPLIT = "bench.param_split"  # not a config key: cut the stages by parameter counts
VARIANTS: dict[str, tuple[int, dict[str, object]]] = {
    "single": (1, {}),
    "ddp2": (2, {}),
    "fsdp2": (2, {"parallel.dp_mode": "fsdp"}),
    "pp2-gpipe": (2, {"parallel.pp": 2, "parallel.pp_schedule": "gpipe"}),
    "pp2-1f1b": (2, {"parallel.pp": 2, "parallel.pp_schedule": "1f1b"}),
    "tp2": (2, {"parallel.tp": 2}),
    "tp2-sp": (2, {"parallel.tp": 2, "parallel.sequence_parallel": True}),
    "ddp4": (4, {}),
    "pp4-1f1b": (4, {"parallel.pp": 4, "parallel.pp_schedule": "1f1b"}),
    # the split before compute balancing (parameter counts), for comparison with pp*-1f1b
    "pp2-1f1b-params": (2, {"parallel.pp": 2, "parallel.pp_schedule": "1f1b", PARAM_SPLIT: 1}),
    "pp4-1f1b-params": (4, {"parallel.pp": 4, "parallel.pp_schedule": "1f1b", PARAM_SPLIT: 1}),
    "dp2xpp2": (4, {"parallel.pp": 2, "parallel.pp_schedule": "1f1b"}),
    "dp2xtp2": (4, {"parallel.tp": 2}),
}

# --cnn: channel-split tensor parallel against one process and DDP for airbench_net and
# resnet18, and the pipeline layouts of resnet18.
CNN_ROWS = [
    (m, v) for m in ("airbench_net", "resnet18") for v in ("single", "ddp2", "tp2", "dp2xtp2")
] + [("resnet18", v) for v in ("pp2-1f1b", "pp2-1f1b-params", "pp4-1f1b", "pp4-1f1b-params")]
VARIANTS_DEFAULT = [v for v in VARIANTS if not v.endswith("-params")]


def _whole(model_name: str):  # noqa: ANN202 - an nn.Module, imported lazily
    from cifar_dist.models import create_model

    return create_model(model_name, norm="group")


def split_points(model_name: str, variant: str) -> list[int]:
    """[] = the trainer's FLOP-balanced cut; for *-params variants the parameter-count cut."""
    from cifar_dist.parallel.pipeline import balanced_split

    _, par = VARIANTS[variant]
    if not par.get(PARAM_SPLIT):
        return []
    layers = _whole(model_name).pipeline_layers()
    return balanced_split(
        [sum(p.numel() for p in m.parameters()) for m in layers], par["parallel.pp"]
    )


def bounds(model_name: str, variant: str) -> list[range] | None:
    import torch

    from cifar_dist.parallel import pipeline

    _, par = VARIANTS[variant]
    pp = int(par.get("parallel.pp", 1))  # type: ignore[call-overload]
    if pp == 1:
        return None
    model = _whole(model_name)
    sample = torch.zeros(1, 3, 32, 32)  # one CIFAR image
    points = split_points(model_name, variant)
    weights = None if points else pipeline.layer_flops(model, sample)
    return pipeline.stage_bounds(model, pp, points, weights)


def overrides(args: argparse.Namespace, variant: str, data: Path, runs: Path) -> list[str]:
    ranks, par = VARIANTS[variant]
    over = {
        "data.dir": data,
        "data.val_size": 100,
        "data.batch_size": args.batch,
        "data.eval_batch_size": 100,
        "data.num_workers": 0,
        "model.name": args.model,
        "model.norm": "group",
        "optim.name": "adamw",
        "optim.lr": 1e-3,
        "schedule.name": "constant",
        "schedule.warmup_epochs": 0.0,
        "train.max_steps": args.warmup + args.steps,
        "train.epochs": 1,
        "train.device": args.device,
        "train.progress": False,
        "log.plots": False,
        "log.wandb.mode": "disabled",
        "log.every_steps": 1000,
        "log.dir": runs,
        "log.name": f"{args.model}-{variant}",
        "parallel.microbatches": args.microbatches,
        **{k: v for k, v in par.items() if k != PARAM_SPLIT},
    }
    points = split_points(args.model, variant)
    if points:
        over["parallel.split_points"] = "[" + ",".join(map(str, points)) + "]"
    return [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in over.items()]


# ----- worker (one rank of one variant) ---------------------------------------------------------
def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(argv: list[str]) -> None:
    import torch.distributed as dist

    from cifar_dist.config import load_config
    from cifar_dist.train import fit as fit_mod
    from cifar_dist.train.trainer import Trainer
    from cifar_dist.utils.dist import distributed_session

    times: list[float] = []
    untimed = Trainer.train_step

    def timed_step(self, batches):  # noqa: ANN001, ANN202 - Trainer.train_step's signature
        t0 = time.perf_counter()
        out = untimed(self, batches)
        times.append(time.perf_counter() - t0)
        return out

    Trainer.train_step = timed_step  # benchmark-only instrumentation of the step
    warmup = int(os.environ["BENCH_WARMUP"])
    cfg = load_config(None, argv)
    with distributed_session(cfg.train.device, cfg.parallel.backend) as info:
        base_rss = rss_mib()
        fit_mod.fit(cfg)  # the session is ours, so fit() leaves the process group up
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        mine = {"step_s": statistics.median(times[warmup:]), "peak_mib": peak, "base_mib": base_rss}
        everyone = [mine]
        if info.distributed:
            everyone = [None] * info.world_size
            dist.all_gather_object(everyone, mine)
        if info.is_main:
            print("BENCH " + json.dumps(everyone), flush=True)


# ----- analytic communication ------------------------------------------------------------------
def comm_mib(model_name: str, variant: str, batch: int) -> float:
    """Bytes each rank sends per optimiser step (max over ranks), MiB; fp32. The formulas are
    the run report's (cifar_dist/parallel/report.py), so the table and parallel.json agree."""
    from cifar_dist.config.schema import ParallelConfig
    from cifar_dist.parallel.mesh import ParallelDims
    from cifar_dist.parallel.report import comm_bytes

    ranks, par = VARIANTS[variant]
    pcfg = ParallelConfig(**{k.split(".")[1]: v for k, v in par.items() if k != PARAM_SPLIT})
    dims = ParallelDims.from_config(pcfg, ranks)
    return (
        comm_bytes(_whole(model_name), dims, batch / dims.dp, bounds(model_name, variant)) / 2**20
    )


def flop_shares(model_name: str, variant: str) -> str:
    """The pipeline stages' forward FLOP shares, e.g. "52/48" ("" without pp)."""
    from cifar_dist.parallel.report import stage_flop_shares

    b = bounds(model_name, variant)
    return "/".join(f"{100 * x:.0f}" for x in stage_flop_shares(_whole(model_name), b)) if b else ""


# ----- driver ----------------------------------------------------------------------------------
def run_variant(args: argparse.Namespace, variant: str, data: Path, runs: Path) -> list[dict]:
    ranks, _ = VARIANTS[variant]
    threads = max(1, (os.cpu_count() or 1) // ranks)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "BENCH_WARMUP": str(args.warmup),
        "PYTHONPATH": str(REPO),
        "WANDB_MODE": "disabled",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={ranks}", __file__, "--worker"]
    proc = subprocess.run(
        cmd + overrides(args, variant, data, runs), env=env, capture_output=True, text=True
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("BENCH ") :])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="vit_small")
    ap.add_argument("--cnn", action="store_true", help="run CNN_ROWS instead (--model ignored)")
    ap.add_argument(
        "--batch", type=int, default=64, help="global batch, the same for every variant"
    )
    ap.add_argument("--microbatches", type=int, default=4, help="pipeline micro-batches per rank")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4], help="world sizes to run")
    ap.add_argument("--variants", nargs="*", default=VARIANTS_DEFAULT, choices=list(VARIANTS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from cifar_dist.data import write_synthetic

        data = Path(tmp) / "data"
        write_synthetic(
            data, "cifar10", n_train=100 + args.batch * (args.warmup + args.steps + 1), n_test=100
        )
        todo = CNN_ROWS if args.cnn else [(args.model, v) for v in args.variants]
        for model, v in todo:
            ranks = VARIANTS[v][0]
            if ranks != 1 and ranks not in args.ranks:
                continue
            args.model = model
            per_rank = run_variant(args, v, data, Path(tmp) / "runs")
            rows.append(
                {
                    "model": model,
                    "variant": v,
                    "ranks": ranks,
                    "step_ms": 1000 * max(r["step_s"] for r in per_rank),
                    "peak_mib": max(r["peak_mib"] for r in per_rank),
                    "delta_mib": max(r["peak_mib"] - r["base_mib"] for r in per_rank),
                    "comm_mib": comm_mib(args.model, v, args.batch),
                    "stage_flops_pct": flop_shares(args.model, v),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"\nglobal batch {args.batch}, {args.microbatches} micro-batches, {args.device}\n")
    print(
        "| model | variant | ranks | step (ms) | peak RSS / rank (MiB) | peak - start (MiB) "
        "| comm / rank / step (MiB) | stage FLOPs (%) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['variant']} | {r['ranks']} | {r['step_ms']:.1f} | {r['peak_mib']:.0f} | "
            f"{r['delta_mib']:.0f} | {r['comm_mib']:.2f} | {r['stage_flops_pct']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    else:
        sys.exit(main())
