"""The store's queries as SQL text, run on whichever connection the caller holds.

A query is written once, as text with `:name` parameters, and runs unchanged on three kinds of
connection: a plain `sqlite3` connection or a plain `psycopg` connection (what the reading
commands open, so that `ledger log` never imports SQLAlchemy, whose import alone costs more
than the whole command may), or a SQLAlchemy Connection (what the write paths and the rest of
the library hold). Each kind turns `:name` into its driver's parameter style once per query
and hands the very same text to the driver, SQLAlchemy through `exec_driver_sql`, which
processes neither statement nor values: every kind gives the same rows.

Rows come back as named tuples, read by position or by column name (`row.id`).
"""
from __future__ import annotations

import json
import re
from collections import namedtuple
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Iterable

from ..errors import StateError

if TYPE_CHECKING:
    from sqlalchemy import Connection

_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class DatabaseError(StateError):
    """A driver error on a plain connection, as one line: `database: <the driver's first line>`
    (what the command line prints for the same error met through SQLAlchemy). `orig` is the
    driver's exception."""

    def __init__(self, orig: BaseException):
        self.orig = orig
        lines = str(orig).strip().splitlines()
        self.first_line = lines[0] if lines else type(orig).__name__
        super().__init__(f"database: {self.first_line}")


@lru_cache(maxsize=None)
def _pyformat(sql: str) -> str:
    """`:name` as psycopg's `%(name)s`."""
    return _PARAM.sub(r"%(\1)s", sql)


@lru_cache(maxsize=None)
def _record(names: tuple[str, ...]) -> type:
    return namedtuple("Record", names, rename=True)


class Conn:
    """One open connection as the store's queries use it. `dialect` is "sqlite" or "postgresql"."""

    dialect: str

    def _run(self, sql: str, params: dict[str, Any]) -> tuple[list[str], list[Any]]:
        raise NotImplementedError

    def _text(self, sql: str) -> str:
        return _pyformat(sql) if self.dialect == "postgresql" else sql

    def rows(self, sql: str, /, **params: Any) -> list[Any]:
        """Every row, as named tuples."""
        names, data = self._run(self._text(sql), params)
        record = _record(tuple(names))
        return [record._make(r) for r in data]

    def first(self, sql: str, /, **params: Any) -> Any:
        """The first row, or None when there is none."""
        rows = self.rows(sql, **params)
        return rows[0] if rows else None

    def column(self, sql: str, /, **params: Any) -> list[Any]:
        """The first value of every row."""
        return [r[0] for r in self._run(self._text(sql), params)[1]]

    def scalar(self, sql: str, /, **params: Any) -> Any:
        """The first value of the first row, or None when there is no row."""
        values = self.column(sql, **params)
        return values[0] if values else None

    def among(self, column: str, ids: Iterable[int], name: str = "ids") -> tuple[str, Any]:
        """(`column IN ids` as SQL with ONE parameter `name`, that parameter's value), whatever
        the number of ids: PostgreSQL plans a 10,000-item IN list slowly, and SQLite caps the
        number of parameters."""
        ids = sorted(int(i) for i in ids)
        if self.dialect == "postgresql":
            return f"{column} = ANY(:{name})", ids
        return f"{column} IN (SELECT value FROM json_each(:{name}))", json.dumps(ids)


class DriverConn(Conn):
    """A plain sqlite3 or psycopg connection; a driver error becomes a DatabaseError."""

    def __init__(self, raw: Any, dialect: str, errors: type[BaseException]):
        self.raw = raw
        self.dialect = dialect
        self.errors = errors

    def _run(self, sql: str, params: dict[str, Any]) -> tuple[list[str], list[Any]]:
        try:
            cur = self.raw.cursor()
            try:
                cur.execute(sql, params) if params else cur.execute(sql)
                return [d[0] for d in cur.description], cur.fetchall()
            finally:
                cur.close()
        except self.errors as e:
            raise DatabaseError(e) from None


class AlchemyConn(Conn):
    """A SQLAlchemy Connection: the same text through `exec_driver_sql`, inside the
    connection's own transaction; errors stay SQLAlchemy's."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.dialect = conn.dialect.name

    def _run(self, sql: str, params: dict[str, Any]) -> tuple[list[str], list[Any]]:
        result = self.conn.exec_driver_sql(sql, params) if params else self.conn.exec_driver_sql(sql)
        return list(result.keys()), result.all()


def on(conn: Conn | Connection) -> Conn:
    """The connection as a Conn: itself, or a SQLAlchemy Connection wrapped."""
    return conn if isinstance(conn, Conn) else AlchemyConn(conn)
