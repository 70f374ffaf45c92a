"""Read the records of an offline W&B run (``run-<id>.wandb``) to check what was really logged.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of chunks, each with
a 7-byte header (CRC32, length, type: 1 full, 2 first, 3 middle, 4 last) holding serialized protobuf ``Record``s.
wandb 0.31 no longer ships a Python reader for it, so the tests carry this small one.
"""

from __future__ import annotations

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768


def read_records(path: Path) -> list[pb.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, chunk, records = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if length == 0 and kind == 0:
            break
        chunk += data[pos : pos + length]
        pos += length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def run_file(fold_dir: Path) -> Path:
    files = sorted((fold_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {fold_dir / 'wandb'}"
    return files[-1]


def history(records: list[pb.Record]) -> list[dict[str, str]]:
    return [
        {item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


def summary(records: list[pb.Record]) -> dict[str, str]:
    out: dict[str, str] = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            out.update({u.key or "/".join(u.nested_key): u.value_json for u in r.summary.update})
    return out


def artifacts(records: list[pb.Record]) -> list[pb.ArtifactRecord]:
    return [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
