"""`budgetlab ledger sql`: one read-only statement on a ledger file.

Opened with mode=ro and query_only, and an authorizer that allows reads only: writes, DDL,
ATTACH and writable PRAGMAs are refused (tests/faults scenario 8)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from budgetlab.errors import BadInput
from budgetlab.ledger.schema import BUSY_TIMEOUT_S

_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                 getattr(sqlite3, "SQLITE_RECURSIVE", 33)}
_READ_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "foreign_key_list",
                 "integrity_check", "quick_check", "schema_version", "user_version",
                 "page_count", "page_size", "journal_mode", "database_list", "table_list"}
_TABLE_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "foreign_key_list",
                  "integrity_check", "quick_check"}  # their argument names a table, sets nothing


def _authorize(action, arg1, arg2, dbname, source):
    if action in _READ_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and arg1:
        name = arg1.lower()
        if name in _READ_PRAGMAS and (arg2 is None or name in _TABLE_PRAGMAS):
            return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def query_readonly(path: str | Path, sql: str, params=()) -> tuple[list[str], list[tuple]]:
    """Run one read-only statement. Writes, ATTACH and writable PRAGMAs are refused."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no ledger here")
    conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        conn.execute("PRAGMA query_only = 1")
        conn.set_authorizer(_authorize)
        try:
            cur = conn.execute(sql, params)
            rows = cur.fetchall()
        except sqlite3.DatabaseError as e:
            msg = str(e)
            if "not authorized" in msg or "readonly" in msg or "read-only" in msg:
                raise BadInput(f"ledger sql: refused: the ledger is read-only here "
                               f"(only SELECT and read-only PRAGMAs) [{msg}]") from None
            raise BadInput(f"ledger sql: {msg}") from None
        except sqlite3.Warning as e:  # e.g. several statements
            raise BadInput(f"ledger sql: {e}") from None
        cols = [d[0] for d in cur.description] if cur.description else []
        return cols, rows
    finally:
        conn.close()
