"""The coordinator's SuperLink: Flower's ``flower-superlink`` with a longer SQLite lock wait.

Flower 1.41 keeps the SuperLink's state in SQLite and gives a writer 5 s to get the
database lock (``PRAGMA busy_timeout``, ``flwr.supercore.constant.SQLITE_PRAGMAS``); past
that the request fails with HTTP 500 and the SuperNode does not send that reply again.
With 30 site daemons on a 2-core machine, writes queued behind each other for longer than
that, and four sites' replies of a round were lost (the round then waited for its
deadline). This launcher runs the same SuperLink with :data:`BUSY_TIMEOUT_MS`; every
other pragma is Flower's. tests/test_gate.py pins where Flower reads the pragmas.
"""

from __future__ import annotations

BUSY_TIMEOUT_MS = 60_000  # Flower: 5000


def pragmas(flower: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((k, str(BUSY_TIMEOUT_MS) if k == "busy_timeout" else v) for k, v in flower)


def main() -> None:
    from flwr.supercore import sql_mixin
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sql_mixin.SQLITE_PRAGMAS = pragmas(sql_mixin.SQLITE_PRAGMAS)  # type: ignore[assignment]
    flower_superlink()


if __name__ == "__main__":
    main()
