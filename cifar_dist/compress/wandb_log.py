"""The files `cifar-dist compress` wrote, logged as W&B model artifacts (job_type "compress").

One artifact per variant file, named <model>-<variant> and aliased by variant, so the pruned,
fused, INT8 and exported models of successive compress runs are versions of the same names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cifar_dist.compress.report import VariantResult


def _slug(name: str) -> str:
    """'onnxruntime (pruned+fused)' -> 'onnxruntime-pruned-fused': W&B names/aliases allow only
    letters, digits, '-', '_' and '.'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


def variant_files(out: Path, rows: list[VariantResult]) -> dict[str, Path]:
    """{variant: file} for every variant with a file in `out`, plus a TorchScript export
    (model.ts, which is checked but not measured, so it has no row)."""
    files = {_slug(r.variant): out / r.artifact for r in rows if r.artifact}
    if (out / "model.ts").is_file():
        files["torchscript"] = out / "model.ts"
    return {k: p for k, p in files.items() if p.is_file()}


def log_compressed(out: Path, rows: list[VariantResult], cfg: Any, report: dict) -> str | None:
    """Log the variant files to a new W&B run (when W&B is on for this command); its id."""
    from cifar_dist.logging.wandb_sink import resolve_mode, resolve_settings

    settings = resolve_settings(cfg.log.wandb)
    if settings["mode"] == "disabled" or not variant_files(out, rows):
        return None
    try:
        import wandb
    except ImportError:
        print("[compress] wandb: not installed (pip install 'cifar-dist[wandb]'); no artifacts")
        return None
    run = wandb.init(
        mode=resolve_mode(str(settings["mode"])),
        project=settings["project"],
        entity=settings["entity"],
        job_type="compress",
        group=cfg.log.wandb.group or None,
        name=f"compress-{cfg.log.name or cfg.model.name}",
        config={"compress": {k: v for k, v in report.items() if k != "variants"}},
        dir=str(out),
        reinit="finish_previous",
    )
    by_variant = {_slug(r.variant): r.to_dict() for r in rows}
    for variant, path in variant_files(out, rows).items():
        art = wandb.Artifact(
            _slug(f"{cfg.model.name}-{variant}"), type="model", metadata=by_variant.get(variant)
        )
        art.add_file(str(path))
        run.log_artifact(art, aliases=[variant, "latest"])
    columns = [c for c in rows[0].to_dict() if c != "extra"]  # extra: a dict, no table cell
    data = [[r.to_dict()[c] for c in columns] for r in rows]
    run.log({"compress/variants": wandb.Table(columns=columns, data=data)})
    run_id, mode = run.id, run.settings.mode
    run.finish()
    names = ", ".join(f"{cfg.model.name}-{v}" for v in variant_files(out, rows))
    where = f"offline: wandb sync {out / 'wandb'}" if mode == "offline" else "online"
    print(f"[compress] wandb: run {run_id} (job_type compress), model artifacts: {names} ({where})")
    return run_id
