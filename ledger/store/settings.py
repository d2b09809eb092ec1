"""Ledger-wide settings fixed at init (base model, its fingerprint and shape), on one Connection."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .sql import Conn, on

if TYPE_CHECKING:
    from sqlalchemy import Connection


def read(conn: Conn | Connection) -> dict[str, str]:
    return dict(on(conn).rows("SELECT key, value FROM settings"))


def write(conn: Connection, values: dict[str, str]) -> None:
    from .schema import Setting
    conn.execute(Setting.__table__.insert(), [{"key": k, "value": v} for k, v in values.items()])
