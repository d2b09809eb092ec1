"""Synthetic BaFT edits for the serving and checkout benchmarks: random tensors with the real
shapes (rank r, hidden size d) and a BaFT-like form (R with orthonormal rows, W near R, a
small input gate U and a gate bias c mostly shut), spread over layers the way `ledger add`
spreads them (most at the default layer, the rest a few layers around it), written into a
real ledger through the same storage code as `ledger add` (blobs.put, the edits table,
revisions.append), one revision per edit.
"""
from __future__ import annotations

import json
import random

import torch

from ledger import names
from ledger.store import edits, refs, revisions as revs
from ledger.records import tensor_norm
from ledger.baft import default_layer
from ledger.store import blobs
from ledger.store.engine import write_transaction
from ledger.store.schema import Edit

# Share of edits at the default layer; the rest sit uniformly within +-SPREAD layers of it.
AT_DEFAULT = 0.7
SPREAD = 4


def block_tensors(d: int, rank: int, g: torch.Generator, *, floor: float = 0.0,
                  always_open: bool = False) -> dict[str, torch.Tensor]:
    """One block. `floor`: its gate floor (0: none, the blob of an edit made without one).
    `always_open`: a gate bias that keeps the gate open on every token (c = +4), to stand for
    an edit that leaks onto unrelated text."""
    q, _ = torch.linalg.qr(torch.randn(d, rank, generator=g))
    R = q.T.contiguous()                                              # orthonormal rows
    # Scaled like trained edits: a small change per edit, gates mostly shut on unrelated text
    # (SmolLM2's residual stream has a norm in the hundreds, so U and W - R are small).
    t = {"R": R, "W": R + torch.randn(rank, d, generator=g) / d,
         "b": 0.1 * torch.randn(rank, generator=g),
         "U": torch.randn(rank, d, generator=g) / d,
         "c": (4.0 if always_open else -4.0) + torch.randn(rank, generator=g)}
    if floor > 0:
        t["floor"] = torch.full((rank,), float(floor))
    return t


def layer_of(i: int, n_layers: int, seed: int = 0) -> int:
    rng = random.Random(seed * 1_000_003 + i)
    home = default_layer(n_layers)
    if rng.random() < AT_DEFAULT:
        return home
    return min(n_layers - 1, max(0, home + rng.randint(-SPREAD, SPREAD)))


def blocks(n: int, d: int, n_layers: int, rank: int = 4, seed: int = 0, *, floor: float = 0.0,
           open_share: float = 0.0):
    """n (edit_id, layer, tensors) triples, ids 1..n; every round(1 / open_share)-th edit has
    a gate open on every token."""
    from ledger.compose import Block
    g = torch.Generator().manual_seed(seed)
    every = round(1 / open_share) if open_share > 0 else 0
    return [Block(i + 1, layer_of(i, n_layers, seed),
                  block_tensors(d, rank, g, floor=floor, always_open=bool(every) and i % every == 0))
            for i in range(n)]


def write_edits(engine, n: int, d: int, n_layers: int, *, rank: int = 4, seed: int = 0,
                branch: str = "main", batch: int = 500) -> int:
    """Append n edits to `branch`, one `add` revision each; return the last revision id."""
    g = torch.Generator().manual_seed(seed)
    with engine.connect() as conn:
        parent = refs.resolve(conn, branch)
        active = revs.active_set(conn, parent)
    done = 0
    while done < n:
        with write_transaction(engine) as conn:
            for _ in range(min(batch, n - done)):
                t = block_tensors(d, rank, g)
                address = blobs.put(conn, blobs.encode(t))
                subj = f"Subject {seed}-{done}"
                e = Edit(fact_json=json.dumps({"prompt": f"{subj} lives in", "target_new": "Rome",
                                               "subject": subj}), subject=subj, relation="{} lives in",
                         method="baft", layer=layer_of(done, n_layers, seed), rank=rank,
                         config_json=json.dumps({"rank": rank}), blob_sha256=address,
                         metrics_json='{"reliability": 1.0}',
                         stats_json=json.dumps({"tensor_norm": tensor_norm(t)}), versions_json="{}",
                         trained_on=parent, author="bench", created_at=blobs.now(), content_hash="")
                eid = conn.execute(Edit.__table__.insert().values(
                    {c.name: getattr(e, c.name) for c in Edit.__table__.columns
                     if c.name != "id" and getattr(e, c.name) is not None})).inserted_primary_key[0]
                e.id = eid
                conn.execute(Edit.__table__.update().where(Edit.id == eid).values(content_hash=edits.edit_hash(e)))
                rev = revs.append(conn, parent_id=parent, operation="add", author="bench",
                                  message=f"add {names.edit_name(eid)}", changes=[(eid, "add")],
                                  parent_active=active)
                active.add(eid)
                parent = rev.id
                done += 1
            refs.set_ref(conn, branch, "branch", parent, "bench", "bench")
    return parent
