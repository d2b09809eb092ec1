"""Alembic migrations of the ledger schema, packaged so an installed `ledger` can migrate."""
