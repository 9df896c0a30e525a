"""One audit record (or an effect that makes it) waiting for its group-commit batch, and who waits for it.

:class:`~keysteward.audit.group_commit.GroupCommit` takes these from callers, runs them in batches and
answers each; a caller that stopped waiting marks its record ``abandoned`` so no later batch makes it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy import Connection

from keysteward.errors import KeystewardError
from keysteward.store.driver import Fetch

Effect = Callable[[Connection], dict[str, Any]]
"""A change committed together with its audit record: it runs in the batch's transaction (under a
savepoint) and returns the record's fields (or ``{}``: a routine change that needs no record). Raising a
KeystewardError undoes the change and records nothing."""


class Prefetching(Protocol):
    """An effect whose writes may all be one statement, which the batch can send with others ahead of it
    (:meth:`keysteward.audit.batch_effects.lock_heads`)."""

    def __call__(self, conn: Connection) -> dict[str, Any]: ...

    def prefetch(self) -> Fetch | None:
        """That statement and its values, when it is all this effect writes this time; else None."""

    def fetched(self, conn: Connection, rows: list[Any]) -> dict[str, Any]:
        """The effect, run on the rows its statement returned (it runs no statement of its own before them)."""


class Pending:
    """One record waiting for its batch: a thread waits on ``done``; a coroutine gets ``notify`` called."""

    __slots__ = (
        "abandoned",
        "done",
        "effect",
        "error",
        "fetched",
        "fields",
        "first",
        "notify",
        "seq",
        "tenant_id",
        "tries",
        "writes",
    )

    def __init__(
        self,
        tenant_id: str,
        fields: dict[str, Any],
        notify: Callable[[], object] | None = None,
        effect: Effect | None = None,
        *,
        writes: bool = True,
        first: bool = False,
    ) -> None:
        self.tenant_id = tenant_id
        self.writes = writes
        self.first = first
        """True: taken into the next batch before every record that is not (a renewal of a live lease is not
        kept waiting behind a boot storm's new releases)."""
        """False: the effect reads but never writes, so it runs without a savepoint of its own."""
        self.fields = fields
        self.done = threading.Event() if notify is None else None
        """What a waiting thread waits on; a coroutine is woken by ``notify`` and needs none (an Event costs
        more to make than the rest of the record's hand-over)."""
        self.notify = notify
        self.effect = effect
        self.seq = 0
        self.tries = 0
        self.error: KeystewardError | None = None
        self.fetched: list[Any] | None = None
        """The rows of the effect's prefetched statement, in the batch run that sent it."""
        self.abandoned = False
        """Its caller stopped waiting (and was told the request was not carried out): a batch not yet started
        leaves it out."""

    def result(self) -> int:
        if self.error is not None:
            raise self.error
        return self.seq
