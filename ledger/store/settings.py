"""Ledger-wide settings fixed at init (base model, its fingerprint and shape), on one Connection."""
from __future__ import annotations

from sqlalchemy import Connection, select

from .schema import Setting


def read(conn: Connection) -> dict[str, str]:
    return dict(conn.execute(select(Setting.key, Setting.value)).all())


def write(conn: Connection, values: dict[str, str]) -> None:
    conn.execute(Setting.__table__.insert(), [{"key": k, "value": v} for k, v in values.items()])
