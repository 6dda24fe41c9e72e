"""`cifar-dist train|tune|eval|predict|lr-find|data|compress|ds-consolidate ...` — thin: parse, call library functions, turn known errors into one line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from cifar_dist.compress.cli import add_compress_parser, cmd_compress


def _user_errors() -> tuple[type[BaseException], ...]:
    from cifar_dist.compress import CompressError
    from cifar_dist.config.schema import ConfigError
    from cifar_dist.data.errors import DataError
    from cifar_dist.train.checkpoint import CheckpointError
    from cifar_dist.train.common import NonFiniteError
    from cifar_dist.tune.config import SweepError

    return (
        ConfigError,
        SweepError,
        CompressError,
        DataError,
        CheckpointError,
        NonFiniteError,
        FileNotFoundError,
    )


def _preempted() -> type[BaseException]:
    from cifar_dist.train.common import Preempted

    return Preempted


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from cifar_dist.config.load import load_config
    from cifar_dist.train.fit import fit

    cfg = load_config(args.config, rest)
    if args.print_config:
        print(_config_yaml(cfg), end="")
        return 0
    fit(cfg)
    if "LOCAL_RANK" in os.environ:
        # A launched worker on CPU/gloo (torch DDP or DeepSpeed) now and then aborts in
        # interpreter teardown, after all work is done and the process group is destroyed
        # ("terminate called without an active exception": a native thread destroyed while
        # joinable; seen ~1 run in 8 with DeepSpeed, rarer with DDP). The launcher would report
        # the finished job as failed (or restart it), so leave without running native
        # destructors. Sinks and checkpoints are closed by now; flush what is buffered.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _config_yaml(cfg: object) -> str:
    import yaml

    from cifar_dist.config.load import config_to_dict

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def cmd_tune(args: argparse.Namespace, rest: list[str]) -> int:
    from cifar_dist.tune import SweepError, load_sweep
    from cifar_dist.tune.driver import resume_sweep, run_sweep
    from cifar_dist.tune.summary import describe

    if args.resume:
        if args.config:
            raise SweepError("--resume takes a sweep directory, not -c (its sweep.yaml is used)")
        sweep, outcome = resume_sweep(Path(args.resume), overrides=rest)
    else:
        if not args.config:
            raise SweepError("give a sweep file (-c SWEEP) or a sweep directory (--resume DIR)")
        sweep, base, _ = load_sweep(args.config, rest)
        if args.print_config:
            print(f"# sweep\n{_config_yaml(sweep)}---\n# base run config\n{_config_yaml(base)}")
            return 0
        outcome = run_sweep(sweep, base, Path(args.config))
    print(describe(outcome, sweep), flush=True)
    if outcome.interrupted:
        raise _preempted()(
            f"sweep interrupted; resume with: cifar-dist tune --resume {outcome.sweep_dir}"
        )
    if outcome.best is None:
        raise SweepError(f"no trial finished with a result; see {outcome.sweep_dir}/ray")
    return 0


def cmd_lr_find(args: argparse.Namespace, rest: list[str]) -> int:
    from cifar_dist.config.load import load_config
    from cifar_dist.train.lr_find import lr_find

    cfg = load_config(args.config, rest)
    res = lr_find(cfg, args.start, args.end, args.steps, beta=args.smooth, diverge=args.diverge)
    print(
        f"suggested optim.lr = {res['suggested_lr']:.4g} ({res['lr_units']} units; "
        f"min-loss/10 = {res['min_loss_lr_div10']:.4g}); plot: {res['png']}"
    )
    return 0


def cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    import os

    from cifar_dist.train.eval_checkpoint import evaluate_checkpoint

    res = evaluate_checkpoint(args.checkpoint, rest, use_ema=not args.no_ema)
    if int(os.environ.get("RANK", "0")) == 0:  # the process group is gone by now
        print(json.dumps(res, indent=2), flush=True)
    return 0


def cmd_predict(args: argparse.Namespace, rest: list[str]) -> int:
    from cifar_dist.config.schema import ConfigError
    from cifar_dist.train.predict import predict

    if rest:
        raise ConfigError(f"{rest[0]}: predict takes --checkpoint, --top-k, --no-ema and images")
    preds, errors = predict(args.checkpoint, args.images, args.top_k, use_ema=not args.no_ema)
    for p in preds:
        print(p.line(), flush=True)
    for e in errors:
        print(f"cifar-dist: error: {e}", file=sys.stderr)
    return 2 if errors else 0


def cmd_ds_consolidate(args: argparse.Namespace, rest: list[str]) -> int:
    from cifar_dist.deepspeed.checkpoint import write_consolidated

    out = write_consolidated(Path(args.checkpoint), Path(args.out) if args.out else None, args.tag)
    print(f"wrote {out} (evaluate with: cifar-dist eval --checkpoint {out})")
    return 0


def cmd_data(args: argparse.Namespace, rest: list[str]) -> int:
    from cifar_dist.config.load import load_config
    from cifar_dist.data import prepare_store, verify_store, write_synthetic

    if args.data_cmd == "synth":
        out = write_synthetic(
            Path(args.out), args.dataset, n_train=args.n_train, n_test=args.n_test, seed=args.seed
        )
        print(f"wrote synthetic {args.dataset} files to {out}")
        return 0
    if args.data_cmd == "beton":
        from cifar_dist.data.ffcv_loader import write_betons

        print(write_betons(load_config(args.config, rest).data))
        return 0
    overrides = list(rest)
    if args.data_cmd == "import":
        overrides += [f"--data.source={args.source}"] if args.source else []
    cfg = load_config(args.config, overrides)
    store = prepare_store(cfg.data)
    if args.data_cmd == "import":
        print(f"array store ready: {store}")
    print(verify_store(store))
    return 0


PRINT_HELP = "print the resolved config as YAML and exit"


KEYS_EPILOG = {"<run config keys>": "run", "<sweep config keys>": "sweep"}


class _KeysHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Expands the epilog marker into the key list only when --help prints it (the list is read
    from the schema source with ast: no cost on ordinary runs)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text in KEYS_EPILOG:
            from cifar_dist.config.describe import run_config_help, sweep_help

            text = run_config_help() if KEYS_EPILOG[text] == "run" else sweep_help()
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cifar-dist", description=__doc__)
    # The `deepspeed` launcher inserts --local_rank=N before the subcommand; LOCAL_RANK (which
    # it sets too) is what we read, so the flag is accepted and ignored.
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser(
        "train",
        help="train a model: cifar-dist train -c CONFIG [--section.key=value ...]",
        formatter_class=_KeysHelpFormatter,
        epilog="<run config keys>",
    )
    t.add_argument("-c", "--config", help="YAML config file (may name a `base:` file)")
    t.add_argument("--print-config", action="store_true", help=PRINT_HELP)
    tu = sub.add_parser(
        "tune",
        help="Ray Tune sweep: cifar-dist tune -c SWEEP [--search.num_samples=N] [--data.dir=...]",
        formatter_class=_KeysHelpFormatter,
        epilog="<sweep config keys>",
    )
    tu.add_argument("-c", "--config", help="sweep YAML (configs/tune/*.yaml)")
    tu.add_argument(
        "--resume",
        metavar="SWEEP_DIR",
        help="continue an interrupted sweep (its unfinished and errored trials, from their "
        "checkpoints); runs/tune/<name>",
    )
    tu.add_argument("--print-config", action="store_true", help=PRINT_HELP)
    e = sub.add_parser("eval", help="evaluate a checkpoint on its validation/test splits")
    e.add_argument("--checkpoint", required=True)
    e.add_argument(
        "--no-ema", action="store_true", help="evaluate the raw weights even if EMA weights exist"
    )
    pr = sub.add_parser(
        "predict",
        help="top-k classes of image files: cifar-dist predict --checkpoint PATH IMAGE...",
    )
    pr.add_argument("--checkpoint", required=True, help="a run's checkpoint (.pt or DeepSpeed dir)")
    pr.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    pr.add_argument("--top-k", type=int, default=3, help="classes shown per image")
    pr.add_argument("--no-ema", action="store_true", help="the raw weights even if EMA exists")
    lf = sub.add_parser(
        "lr-find", help="LR range test: cifar-dist lr-find -c CONFIG [--start --end --steps]"
    )
    lf.add_argument("-c", "--config", help="YAML config file")
    lf.add_argument("--start", type=float, default=1e-4, help="first LR (optim.lr units)")
    lf.add_argument("--end", type=float, default=10.0, help="last LR (optim.lr units)")
    lf.add_argument("--steps", type=int, default=100, help="optimiser steps in the sweep")
    lf.add_argument("--smooth", type=float, default=0.9, help="EMA factor of the loss curve")
    lf.add_argument("--diverge", type=float, default=4.0, help="stop above this x min loss")
    d = sub.add_parser("data", help="import, verify, synthesise datasets or write FFCV betons")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    imp = dsub.add_parser(
        "import", help="convert a source (image folder/tars or canonical files) to the array store"
    )
    imp.add_argument(
        "source",
        nargs="?",
        default="",
        help="image-folder dir or tar shards (default: data.source)",
    )
    imp.add_argument("-c", "--config")
    ver = dsub.add_parser("verify", help="check the array store (counts, classes, checksums)")
    ver.add_argument("-c", "--config")
    bet = dsub.add_parser("beton", help="write FFCV .beton files from the array store")
    bet.add_argument("-c", "--config")
    syn = dsub.add_parser(
        "synth", help="write small learnable synthetic files in the canonical format"
    )
    syn.add_argument("--out", required=True)
    syn.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100"])
    syn.add_argument("--n-train", type=int, default=1000)
    syn.add_argument("--n-test", type=int, default=200)
    syn.add_argument("--seed", type=int, default=0)
    ds = sub.add_parser(
        "ds-consolidate",
        help="merge a DeepSpeed checkpoint (ZeRO shards, pipeline layers) into one plain file",
    )
    ds.add_argument(
        "checkpoint", help="<run>/checkpoints (its 'latest' tag) or one step_* tag directory"
    )
    ds.add_argument("--tag", help="tag inside the checkpoint directory (default: latest)")
    ds.add_argument("--out", help="output file (default: <checkpoints>/consolidated-<tag>.pt)")
    add_compress_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    handlers = {
        "train": cmd_train,
        "tune": cmd_tune,
        "eval": cmd_eval,
        "data": cmd_data,
        "compress": cmd_compress,
        "ds-consolidate": cmd_ds_consolidate,
        "lr-find": cmd_lr_find,
        "predict": cmd_predict,
    }
    try:
        return handlers[args.cmd](args, rest)
    except _user_errors() as e:
        # An error every rank meets identically (rank0_only) is printed once, by rank 0.
        if not getattr(e, "rank0_only", False) or os.environ.get("RANK", "0") == "0":
            print(f"cifar-dist: error: {e}", file=sys.stderr)
        return 2
    except _preempted() as e:
        from cifar_dist.train.preemption import PREEMPTED_EXIT_CODE

        print(f"cifar-dist: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except ImportError as e:  # an optional package imported outside the checks: one line too
        from cifar_dist.config.extras import extra_for

        if (msg := extra_for(e)) is None:
            raise
        print(f"cifar-dist: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cifar-dist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
