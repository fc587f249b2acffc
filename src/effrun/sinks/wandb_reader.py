"""Read the history rows of an offline wandb run file (*.wandb, a LevelDB-style record log).

wandb has no public reader for these files; tests and `effrun report` use this to check what an
offline run holds without a server.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Iterator, List

BLOCK = 32768
HEADER = struct.Struct("<4sHB")  # ":W&B", magic 0xBEE1, version
RECORD = struct.Struct("<IHB")  # crc32, length, type (1 full, 2 first, 3 middle, 4 last)


def _records(data: bytes) -> Iterator[bytes]:
    ident, magic, _ = HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError("not a wandb run file")
    pos, buf = HEADER.size, b""
    while pos + RECORD.size <= len(data):
        left = BLOCK - pos % BLOCK
        if left < RECORD.size:  # block trailer padding
            pos += left
            continue
        _, length, kind = RECORD.unpack_from(data, pos)
        pos += RECORD.size
        chunk = data[pos:pos + length]
        pos += length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
            buf = b""


def history(path) -> List[Dict]:
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for raw in _records(Path(path).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


def run_info(path) -> Dict:
    """The run record of an offline run file: id, project, group, job_type, name, tags."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in _records(Path(path).read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "run":
            r = rec.run
            return {"id": r.run_id, "project": r.project, "group": r.run_group, "job_type": r.job_type,
                    "name": r.display_name, "tags": list(r.tags)}
    raise ValueError(f"no run record in {path}")
