"""The composer: blocks fuse per layer in edit-id order, composing attaches sites without
touching the base weights and clearing detaches them, and a checkout of many edits gives
exactly the model their stored blobs describe."""
import pytest
import torch
from sqlalchemy import select, update

from ledger import Ledger
from ledger.baft.layer import block_delta
from ledger.compose import Block, ComposedModel, fuse
from ledger.errors import IntegrityError
from ledger.models import load_base
from ledger.store import blobs
from ledger.store.schema import Blob, Edit

from support import add_edits, random_blocks

def test_fuse_groups_by_layer_in_edit_order():
    d = 24
    ts = random_blocks(d, [2, 2, 2], seed=2)
    blocks = [Block(3, 1, ts[0]), Block(1, 1, ts[1]), Block(2, 0, ts[2])]
    sites = fuse(blocks, d)
    assert sorted(sites) == [0, 1]
    assert torch.equal(sites[1].fused.R, torch.cat([ts[1]["R"], ts[0]["R"]]))
    h = torch.randn(3, d)
    with torch.no_grad():
        assert (sites[1].fused(h) - block_delta(ts[1], h) - block_delta(ts[0], h)).abs().max() < 1e-5



def test_compose_and_clear_leave_the_base_weights_as_they_were(tiny_llama):
    base = load_base(str(tiny_llama))
    weights = {k: v.clone() for k, v in base.model.state_dict().items()}
    composed = ComposedModel(base)
    plain = composed.logits("Alice lives in")
    tensors = random_blocks(base.hidden_size, [2, 1, 3])
    blocks = [Block(1, 0, tensors[0]), Block(2, 2, tensors[1]), Block(3, 0, tensors[2])]
    composed.compose(blocks, 7)
    assert sorted(composed.sites) == [0, 2] and composed.revision == 7
    edited = composed.logits("Alice lives in")
    assert not torch.equal(edited, plain)
    sites = composed.sites
    composed.compose(list(reversed(blocks)), 8)           # the same edits: nothing to rebuild
    assert composed.sites is sites and composed.revision == 8
    assert torch.equal(composed.logits("Alice lives in"), edited)
    with pytest.raises(ValueError, match="layer 3"):
        composed.compose([Block(9, 3, blocks[0].tensors)], 9)
    assert composed.sites is sites                        # a refused composition changes nothing
    composed.clear()
    assert composed.sites == {} and composed.revision is None
    assert torch.equal(composed.logits("Alice lives in"), plain)
    assert all(torch.equal(v, weights[k]) for k, v in base.model.state_dict().items())


def test_checkout_of_many_edits_composes_exactly_what_the_blobs_hold(db_url, tiny_llama):
    """The batched load gives the same model as decoding each edit's blob on its own, and a
    changed blob stops the composition."""
    with Ledger.init(db_url, model=str(tiny_llama)) as lg:
        add_edits(lg, 12)
        prompt = "Subject 4 lives in"   # edited at layer 1: the change reaches its last position
        last = lg.resolve("HEAD")
        got = lg.model_at().logits(prompt)
        with lg.engine.connect() as conn:
            rows = conn.execute(select(Edit.id, Edit.layer, Edit.blob_sha256)).all()
            one_by_one = [Block(e, layer, blobs.get(conn, a)) for e, layer, a in rows]
        assert len({b.layer for b in one_by_one}) > 1
        lg._composed.clear()
        lg._composed.compose(one_by_one, last)
        assert torch.equal(lg._composed.logits(prompt), got)
        lg._composed.clear()
        assert not torch.equal(lg._composed.logits(prompt), got)   # the edits did something
    with lg.engine.begin() as conn:
        conn.execute(update(Blob).where(Blob.sha256 == rows[7][2]).values(data=blobs.encode(
            {k: v + 1 for k, v in one_by_one[7].tensors.items()})))
    with Ledger.open(db_url) as lg2:
        with pytest.raises(IntegrityError):
            lg2.model_at()
