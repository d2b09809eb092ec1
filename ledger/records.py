"""An edit's record: the row a trained edit is stored as, built from the fact, the trainer's
output and the measured metrics by pure functions (no database, no model)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from .baft import BaftConfig
from .facts import Fact
from .store import blobs


def tensor_norm(tensors: dict[str, torch.Tensor]) -> float:
    """Frobenius norm of all of an edit's tensors together, as reported by diff."""
    return math.sqrt(math.fsum(float(v.double().pow(2).sum()) for v in tensors.values()))


@dataclass(frozen=True)
class EditRecord:
    """One edit as it is stored: its blob's bytes and every column of its row but the id and
    the content hash (the store assigns both when it writes the row)."""

    blob: bytes
    columns: dict[str, Any]


def build_record(fact: Fact, tensors: dict[str, torch.Tensor], stats: dict[str, Any], metrics: dict[str, float],
                 cfg: BaftConfig, layer: int, *, trained_on: int, author: str, versions: dict[str, str],
                 created_at: str) -> EditRecord:
    """The stored form of one trained edit; its blob is addressed by the sha256 of its bytes."""
    blob = blobs.encode(tensors)
    return EditRecord(blob=blob, columns={
        "fact_json": json.dumps(fact.to_dict(), sort_keys=True, ensure_ascii=False),
        "subject": fact.subject, "relation": fact.relation, "method": cfg.method, "layer": layer,
        "rank": cfg.rank, "config_json": json.dumps({**cfg.to_dict(), "layer": layer}, sort_keys=True),
        "blob_sha256": blobs.sha256(blob),
        "metrics_json": json.dumps(metrics, sort_keys=True),
        "stats_json": json.dumps({**stats, "tensor_norm": tensor_norm(tensors)}, sort_keys=True),
        "versions_json": json.dumps(versions, sort_keys=True),
        "trained_on": trained_on, "author": author, "created_at": created_at})
