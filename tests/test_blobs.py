"""Blobs: canonical bytes, and every way a stored blob can lie is refused before use."""
import json
import struct

import pytest
import torch

from ledger.errors import IntegrityError, StateError
from ledger.store import blobs


def _t():
    g = torch.Generator().manual_seed(0)
    return {"R": torch.randn(2, 8, generator=g), "b": torch.randn(2, generator=g)}


def _raw(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def test_equal_tensors_give_equal_bytes_and_round_trip():
    a, b = blobs.encode(_t()), blobs.encode(dict(reversed(list(_t().items()))))
    assert a == b
    out = blobs.decode(a, blobs.sha256(a))
    assert all(torch.equal(out[k], v) for k, v in _t().items())


def test_non_finite_values_are_refused_before_commit():
    bad = _t()
    bad["b"][0] = float("nan")
    with pytest.raises(StateError, match="non-finite"):
        blobs.encode(bad)


@pytest.mark.parametrize("data, needle", [
    (b"\x01\x02", "too short"),
    (struct.pack("<Q", 1 << 40) + b"{}", "impossible size"),
    (_raw({"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)[:-1] + b"", "offsets"),
    (_raw({"x": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8), "dtype F64"),
    (_raw({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4), "invalid shape"),
    (_raw({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "offsets"),
    (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8), "gaps"),
    (_raw({"x": {"dtype": "F32"}}, b""), "malformed"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", "unreadable"),
    (_raw({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
          struct.pack("<f", float("inf"))), "non-finite"),
])
def test_malformed_blobs_are_refused(data, needle):
    with pytest.raises(IntegrityError, match=needle):
        blobs.decode(data)


def test_changed_byte_is_refused_by_address():
    data = bytearray(blobs.encode(_t()))
    address = blobs.sha256(bytes(data))
    data[-1] ^= 0x10
    with pytest.raises(IntegrityError, match="does not match its sha256"):
        blobs.decode(bytes(data), address)
