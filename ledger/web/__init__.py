"""`ledger ui`: a local web view of a ledger, server-rendered (Starlette, Jinja2, uvicorn).

Every page reads through the `ledger.Ledger` facade, as the commands do; nothing here runs
SQL. Pages: history, a revision, an edit, the diff of two revisions, the audit record, the
integrity check, evaluation means over the history (SVG charts drawn by pygal on the
server), and a playground that generates a prompt at two revisions side by side. Read-only
unless created with `allow_writes`: then tag, branch, checkout and revert are forms, each
checked against a token printed at start-up and a CSRF cookie.

The web stack is imported only here: `ledger --help` and the other commands never load it.
"""
from .app import create_app, new_token, serve

__all__ = ["create_app", "new_token", "serve"]
