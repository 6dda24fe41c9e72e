"""Read an offline W&B run's records (run, history, summary) for assertions in tests.

wandb >= 0.2x writes offline runs from its Go core and ships no Python reader for the
`run-*.wandb` file. The file is a LevelDB-style log (a 7-byte header, then 32 KiB blocks of
chunks: 4-byte checksum, 2-byte little-endian length, 1-byte type FULL/FIRST/MIDDLE/LAST) of
`wandb_internal_pb2.Record` protobufs, which wandb does ship; this reassembles the chunks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7  # b":W&B", 2 magic bytes, 1 version byte
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(run_file: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file}: not a W&B run file"
    pos, buf, out = HEADER, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            buf = chunk
        elif kind == MIDDLE:
            buf += chunk
        elif kind == LAST:
            out.append(buf + chunk)
    return [pb.Record.FromString(c) for c in out]


def finished_records(run_file: Path, timeout_s: float = 30.0) -> list[Any]:
    """The records once the `exit` record is in: wandb's core process may still be writing
    the file for a moment after `run.finish()` returns (seen here as a missing `run` record)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_records(run_file)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{run_file}: no exit record after {timeout_s} s"
        time.sleep(0.2)


def offline_run(run_dir: Path) -> dict[str, Any]:
    """{'run': RunRecord, 'config': {key: value}, 'history': [{key: value}], 'summary': {...}}
    of the single offline W&B run under <run_dir>/wandb/."""
    found = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(found) == 1, f"expected one offline W&B run in {run_dir}, found {found}"
    out: dict[str, Any] = {"run": None, "config": {}, "history": [], "summary": {}}
    for rec in finished_records(found[0]):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            row = {
                (i.key or ".".join(i.nested_key)): json.loads(i.value_json)
                for i in rec.history.item
            }
            out["history"].append(row)
        elif kind == "summary":
            for i in rec.summary.update:
                out["summary"][i.key or ".".join(i.nested_key)] = json.loads(i.value_json)
    return out
