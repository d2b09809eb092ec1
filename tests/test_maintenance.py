"""Schema state through the library (what `ledger db current` and `ledger db upgrade` call)."""
import sqlite3

import pytest

from ledger.errors import StateError
from ledger.maintenance import db_current, db_upgrade


def test_a_new_ledger_is_at_head_and_upgrading_it_changes_nothing(ledger, db_url):
    state = db_current(db_url)
    assert state.current == state.head and state.to_dict() == {"current": state.head, "head": state.head}
    assert db_upgrade(db_url) == (state.head, state.head)


def test_upgrading_a_database_that_holds_no_ledger_is_refused(tmp_path):
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    assert db_current(f"sqlite:///{path}").current is None
    with pytest.raises(StateError, match="no ledger"):
        db_upgrade(f"sqlite:///{path}")
