"""The serving path: the fused stack's fast forward (in-place gate, transposed R), the batched
blob load behind checkout, and that both give exactly what the plain formulas give."""
import pytest
import torch
from sqlalchemy import select, update

from ledger import Ledger
from ledger.baft import FusedIntervention, InterventionSite
from ledger.baft.layer import BaftBlock, block_delta
from ledger.errors import IntegrityError
from ledger.store import blobs
from ledger.store.schema import Blob, Edit

from support import add_edits, random_blocks


def test_fast_forward_equals_graph_forward_and_the_formula():
    d = 48
    ts = random_blocks(d, [1, 4, 2, 3])
    f = FusedIntervention(ts, d)
    h = torch.randn(2, 5, d) * 3
    ref = sum(block_delta(t, h) for t in ts)
    with torch.no_grad():
        fast = f(h)
    hg = h.clone().requires_grad_(True)
    graph = f(hg)
    assert torch.equal(fast, graph.detach())          # same kernels, same order: bit for bit
    assert (fast - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    assert torch.equal(f.R, torch.cat([t["R"] for t in ts]))
    assert f.R_t.is_contiguous() and f.rank == 10 and f.n_blocks == 4


def test_gradient_through_the_fused_stack_matches_the_formula():
    """Sites below a trained block see h that needs a gradient: the fast path must not run."""
    d = 32
    ts = random_blocks(d, [2, 3], seed=1)
    f = FusedIntervention(ts, d)
    h1 = torch.randn(3, d, requires_grad=True)
    h2 = h1.detach().clone().requires_grad_(True)
    (f(h1) ** 2).sum().backward()
    (sum(block_delta(t, h2) for t in ts) ** 2).sum().backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-5)


def test_site_with_only_a_trainable_block_skips_the_empty_stack():
    d = 16
    blk = BaftBlock(d, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        blk.W.add_(0.5)
    site = InterventionSite(0, FusedIntervention([], d))
    site.trainable.append(blk)
    h = torch.randn(4, d)
    assert torch.equal(site.delta(h), blk(h))
    assert InterventionSite(0, FusedIntervention([], d)).delta(h) is None   # no change: nothing to add


def test_gate_floors_compose_exactly_and_shut_bases_are_skipped():
    d = 48
    ts = random_blocks(d, [2, 4, 3, 1], seed=3)
    ts[0]["floor"] = torch.full((2,), 0.3)
    ts[2]["floor"] = torch.tensor([0.5, 0.2, 0.0])
    f = FusedIntervention(ts, d)                     # floored and unfloored blocks mixed
    assert f.has_floor and "floor" not in ts[1]
    h = torch.randn(3, 6, d) * 3
    ref = sum(block_delta(t, h) for t in ts)
    assert ref.abs().max() > 1e-3
    with torch.no_grad():
        f.SPARSE_SHARE = 0.0
        dense = f(h)
        f.SPARSE_SHARE = 1.0
        sparse = f(h)
    graph = f(h.clone().requires_grad_(True))
    for out in (dense, sparse, graph):
        assert (out - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    # the floored gate really is 0 somewhere and the unfloored blocks' never is
    g = torch.sigmoid(h @ ts[0]["U"].T + ts[0]["c"])
    assert (g < 0.3).any()
    # every gate shut: the site adds nothing at all
    shut = [dict(t, c=torch.full_like(t["c"], -1e4), floor=torch.full_like(t["c"], 0.1)) for t in ts]
    site = InterventionSite(0, FusedIntervention(shut, d))
    assert site.delta(h) is None
    with pytest.raises(ValueError):
        FusedIntervention([dict(ts[0], floor=torch.full((2,), 1.0))], d)


def test_get_many_reads_verified_blobs_and_refuses_missing_or_changed(db_url, tiny_llama):
    with Ledger.init(db_url, model=str(tiny_llama)) as lg:
        add_edits(lg, 7)
        with lg.engine.connect() as conn:
            addresses = [a for (a,) in conn.execute(select(Edit.blob_sha256).order_by(Edit.id))]
            got = blobs.get_many(conn, addresses, chunk=3)
            assert set(got) == set(addresses)
            for a in addresses:
                one = blobs.get(conn, a)
                assert all(torch.equal(one[k], got[a][k]) for k in one)
            with pytest.raises(IntegrityError, match="missing"):
                blobs.get_many(conn, addresses[:2] + ["0" * 64])
        victim = addresses[4]
        with lg.engine.begin() as conn:
            data = bytearray(conn.execute(select(Blob.data).where(Blob.sha256 == victim)).scalar_one())
            data[-1] ^= 0x01
            conn.execute(update(Blob).where(Blob.sha256 == victim).values(data=bytes(data)))
        with lg.engine.connect() as conn:
            with pytest.raises(IntegrityError, match="does not match its sha256"):
                blobs.get_many(conn, addresses)
