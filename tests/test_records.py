"""An edit's record is a pure function of the fact, the trained tensors, stats and metrics."""
import json

import torch

from ledger import BaftConfig, Fact
from ledger.records import build_record, tensor_norm
from ledger.store import blobs


def _record(**over):
    args = dict(fact=Fact(prompt="Alice lives in", target_new="Rome", subject="Alice"),
                tensors={"R": torch.ones(2, 4), "W": torch.zeros(2, 4)}, stats={"steps": 3},
                metrics={"reliability": 1.0}, cfg=BaftConfig(rank=2), layer=1, trained_on=1, author="t",
                versions={"ledger": "x"}, created_at="2026-01-01T00:00:00.000000Z")
    args.update(over)
    return build_record(args.pop("fact"), args.pop("tensors"), args.pop("stats"), args.pop("metrics"),
                        args.pop("cfg"), args.pop("layer"), **args)


def test_the_same_inputs_give_the_same_record():
    a, b = _record(), _record()
    assert a == b
    assert a.columns["blob_sha256"] == blobs.sha256(a.blob)
    assert blobs.decode(a.blob, a.columns["blob_sha256"])["R"].equal(torch.ones(2, 4))


def test_the_record_holds_the_layer_in_its_config_and_the_norm_in_its_stats():
    r = _record()
    assert json.loads(r.columns["config_json"])["layer"] == 1 and r.columns["rank"] == 2
    stats = json.loads(r.columns["stats_json"])
    assert stats["steps"] == 3 and stats["tensor_norm"] == tensor_norm({"R": torch.ones(2, 4)}) == 8 ** 0.5
    assert r.columns["subject"] == "Alice" and r.columns["trained_on"] == 1
    assert "id" not in r.columns and "content_hash" not in r.columns
