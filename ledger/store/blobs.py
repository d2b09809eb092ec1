"""Tensor blobs: safetensors bytes, content-addressed, verified on every read.

Never pickle: tensors are written with safetensors only, and before safetensors parses any
stored bytes the sha256 is checked against the address and the header against what a ledger
blob may contain (float32 only, sane shapes, offsets that tile the buffer exactly).
"""
from __future__ import annotations

import hashlib
import json
import struct
from datetime import datetime, timezone

from typing import TYPE_CHECKING

from ..errors import IntegrityError, StateError
from .sql import Conn, on

# Reads are SQL text (sql.py), on a plain driver connection or a SQLAlchemy Connection alike;
# writes go through SQLAlchemy's table.
if TYPE_CHECKING:
    import torch
    from sqlalchemy import Connection

MAX_HEADER = 1 << 20
_ITEMSIZE = {"F32": 4, "I64": 8}


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode(tensors: dict[str, torch.Tensor]) -> bytes:
    """Canonical bytes: float32, contiguous, CPU, no metadata; safetensors orders the header
    itself, so equal tensors always give equal bytes and so equal addresses."""
    import torch   # here, not at the top: the reading commands never load torch
    from safetensors.torch import save as st_save
    clean = {}
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        if not torch.isfinite(t).all():
            raise StateError(f"refusing to store non-finite values in tensor {name!r}")
        clean[name] = t
    return st_save(clean)


def check_header(data: bytes, what: str = "blob") -> dict:
    """Validate a safetensors header without trusting it: returns {name: (dtype, shape)}."""
    if len(data) < 8:
        raise IntegrityError(f"{what} is too short to be safetensors")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > len(data):
        raise IntegrityError(f"{what} has a safetensors header of impossible size {n}")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise IntegrityError(f"{what} has an unreadable safetensors header") from None
    if not isinstance(header, dict):
        raise IntegrityError(f"{what} has a malformed safetensors header")
    header.pop("__metadata__", None)
    body = len(data) - 8 - n
    spans, out = [], {}
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise IntegrityError(f"{what}: tensor {name!r} has a malformed header entry") from None
        if dtype not in _ITEMSIZE:
            raise IntegrityError(f"{what}: tensor {name!r} has dtype {dtype}, not allowed here")
        if not (isinstance(shape, list) and len(shape) <= 4
                and all(isinstance(s, int) and 0 <= s <= 1 << 24 for s in shape)):
            raise IntegrityError(f"{what}: tensor {name!r} has an invalid shape {shape!r}")
        count = 1
        for s in shape:
            count *= s
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= body
                and end - start == count * _ITEMSIZE[dtype]):
            raise IntegrityError(f"{what}: tensor {name!r} has offsets that do not match its shape")
        spans.append((start, end))
        out[name] = (dtype, shape)
    pos = 0
    for start, end in sorted(spans):
        if start != pos:
            raise IntegrityError(f"{what}: tensor data overlaps or leaves gaps")
        pos = end
    if pos != body:
        raise IntegrityError(f"{what}: tensor data does not fill the buffer")
    return out


def decode(data: bytes, address: str | None = None, *, what: str = "blob") -> dict[str, torch.Tensor]:
    """Verify the hash (when an address is given) and the header, then load and check values."""
    from safetensors.torch import load as st_load
    all_finite = _checked(data, address, what)
    tensors = st_load(data)
    if not all_finite:   # mixed dtypes, or a non-finite value somewhere: find and name it
        _name_non_finite(tensors, what)
    return tensors


def check(data: bytes, address: str | None = None, *, what: str = "blob") -> None:
    """What `decode` verifies (hash, header, finite values), without torch: `verify` checks
    every blob and stays a light command."""
    if not _checked(data, address, what):
        from safetensors.numpy import load as np_load
        _name_non_finite(np_load(data), what)


def norm(data: bytes, address: str | None = None, *, what: str = "blob") -> float:
    """Frobenius norm of all of a blob's tensors together (records.tensor_norm), without torch."""
    import math

    import numpy as np
    from safetensors.numpy import load as np_load
    check(data, address, what=what)
    return math.sqrt(math.fsum(float(np.square(a.astype(np.float64)).sum()) for a in np_load(data).values()))


def tensor_norms(data: bytes, address: str | None = None, *, what: str = "blob") -> dict[str, dict]:
    """Each of a blob's tensors by name: its shape and Frobenius norm, without torch."""
    import math

    import numpy as np
    from safetensors.numpy import load as np_load
    check(data, address, what=what)
    return {name: {"shape": list(a.shape), "norm": math.sqrt(float(np.square(a.astype(np.float64)).sum()))}
            for name, a in sorted(np_load(data).items())}


def _checked(data: bytes, address: str | None, what: str) -> bool:
    """Check the hash and the header; True when every tensor is float32 and every value finite
    (False leaves the values to be checked tensor by tensor)."""
    if address is not None and sha256(data) != address:
        raise IntegrityError(f"blob {address[:12]} does not match its sha256: stored bytes were changed")
    header = check_header(data, what)
    # The common case, all float32: one finiteness pass over the whole tensor data (the header
    # check proved the data tiles the buffer after the header) instead of one per tensor.
    if not all(dtype == "F32" for dtype, _ in header.values()):
        return False
    import numpy as np
    (n,) = struct.unpack("<Q", data[:8])
    return bool(np.isfinite(np.frombuffer(data, dtype="<f4", offset=8 + n)).all())


def _name_non_finite(tensors: dict, what: str) -> None:
    """Raise for the first floating tensor (torch or numpy) that holds a non-finite value."""
    import numpy as np
    for name, t in tensors.items():
        a = t.numpy() if hasattr(t, "numpy") else t
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise IntegrityError(f"{what}: tensor {name!r} holds non-finite values")


def put(conn: Connection, data: bytes) -> str:
    """Store bytes under their sha256 (a no-op when already there); return the address."""
    from .schema import Blob
    address = sha256(data)
    table = Blob.__table__
    values = {"sha256": address, "size": len(data), "data": data, "created_at": now()}
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        stmt = pg_insert(table).values(**values).on_conflict_do_nothing(index_elements=["sha256"])
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert
        stmt = sqlite_insert(table).values(**values).on_conflict_do_nothing(index_elements=["sha256"])
    conn.execute(stmt)
    return address


def get_many(conn: Conn | Connection, addresses, *, chunk: int = 500) -> dict[str, dict[str, torch.Tensor]]:
    """Many blobs in a few queries (one per `chunk` addresses), each verified as `get` does."""
    q = on(conn)
    wanted = sorted(set(addresses))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for i in range(0, len(wanted), chunk):
        part = {f"a{j}": a for j, a in enumerate(wanted[i : i + chunk])}
        for address, data in q.rows(f"SELECT sha256, data FROM blobs WHERE sha256 IN "
                                    f"({', '.join(':' + name for name in part)})", **part):
            out[address] = decode(bytes(data), address)
    for address in wanted:
        if address not in out:
            raise IntegrityError(f"blob {address[:12]} is missing from the database")
    return out


def get(conn: Connection, address: str) -> dict[str, torch.Tensor]:
    return decode(_fetch(conn, address), address)


def get_norm(conn: Connection, address: str) -> float:
    """The norm of a stored blob's tensors, verified as `get` does, without torch."""
    return norm(_fetch(conn, address), address)


def get_tensor_norms(conn: Connection, address: str) -> dict[str, dict]:
    """tensor_norms of a stored blob, verified as `get` does."""
    return tensor_norms(_fetch(conn, address), address)


def _fetch(conn: Conn | Connection, address: str) -> bytes:
    data = on(conn).scalar("SELECT data FROM blobs WHERE sha256 = :address", address=address)
    if data is None:
        raise IntegrityError(f"blob {address[:12]} is missing from the database")
    return bytes(data)


def orphans(conn: Conn | Connection) -> list[tuple[str, int]]:
    """(address, size) of every blob no edit refers to."""
    return [tuple(r) for r in on(conn).rows(
        "SELECT sha256, size FROM blobs WHERE sha256 NOT IN (SELECT blob_sha256 FROM edits)")]


def remove(conn: Connection, addresses: list[str]) -> None:
    from .schema import Blob
    conn.execute(Blob.__table__.delete().where(Blob.sha256.in_(addresses)))
