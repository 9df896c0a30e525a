"""Several key manager URLs, and when a client moves from one to the next (docs/ha.md).

keysteward's servers are stateless and share one database: any server answers any request, a nonce
issued by one is spent at another, and a lease made by one is renewed at another. A client given a
list (``--kms https://a:8443,https://b:8443``, ``KEYSTEWARD_URL``, a config file's ``url``) keeps using
the URL that last answered, and moves on when a request fails in a way that says so
(:attr:`~keysteward.errors.KeystewardError.failover`, set where the error enters,
:mod:`keysteward.api_errors`):

    NOT_SENT   no connection (refused, connect timeout): the request never left; always tried elsewhere
    REFUSED    503 (sealed, database_unavailable, audit_unavailable): the server did not carry it out
    LOST       sent, but no answer (the server died mid-request) or another 5xx

REFUSED and LOST are tried elsewhere only for requests that are safe to repeat (``safe=True``: reads, a
release, a renewal, the end of a lease: the same holder asking again supersedes its own lease); a
creation is repeated only when it was NOT_SENT. After each full round over the list the client waits a
jittered, growing delay; after :data:`ROUNDS` rounds the last error is raised. A single URL is tried once,
as before.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Final, TypeVar
from urllib.parse import urlsplit

from keysteward.errors import BadRequest, KeystewardError

NOT_SENT: Final = "not_sent"
REFUSED: Final = "refused"
LOST: Final = "lost"
ROUNDS: Final = 3
BASE_DELAY: Final = 0.2
MAX_DELAY: Final = 2.0
MAX_URLS: Final = 16

T = TypeVar("T")


def split_urls(value: str | Sequence[str], *, what: str = "key manager URL") -> tuple[str, ...]:
    """``"https://a:8443, https://b:8443/"`` (or a list of them) -> ``("https://a:8443", "https://b:8443")``."""
    items = value.split(",") if isinstance(value, str) else [u for v in value for u in str(v).split(",")]
    urls = tuple(u.strip().rstrip("/") for u in items)
    if not urls or any(not u for u in urls):
        raise BadRequest(f"an empty {what} in the list", code="kms_url_invalid")
    if len(urls) > MAX_URLS:
        raise BadRequest(f"more than {MAX_URLS} {what}s", code="kms_url_invalid")
    for url in urls:
        if not url.startswith(("https://", "http://")) or any(c.isspace() for c in url):
            raise BadRequest(f"{url[:60]!r} is not an http(s) {what}", code="kms_url_invalid")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises on a port that is not a number in 0..65535
        except ValueError:
            raise BadRequest(f"{url[:60]!r} has a port that is not a number", code="kms_url_invalid") from None
        if not parts.hostname:
            raise BadRequest(f"{url[:60]!r} names no host", code="kms_url_invalid")
    return urls


def jitter(round_: int, rng: Callable[[], float] = random.random) -> float:
    """The wait after full round ``round_`` (0, 1, ...): half to all of ``BASE_DELAY * 2**round_``, capped."""
    return float(min(MAX_DELAY, BASE_DELAY * 2**round_) * (0.5 + 0.5 * rng()))


class Failover:
    """The list, the URL in use, and :meth:`run` (see the module doc)."""

    def __init__(self, urls: Sequence[str], *, sleep: Callable[[float], None] = time.sleep) -> None:
        if not urls:
            raise BadRequest("no key manager URL", code="kms_url_invalid")
        self.urls = tuple(urls)
        self._at = 0
        self._sleep = sleep

    @property
    def current(self) -> str:
        return self.urls[self._at]

    def run(self, op: Callable[[str], T], *, safe: bool) -> T:
        """``op(url)`` on the URL in use, moving along the list on failures that allow it."""
        attempts = len(self.urls) * ROUNDS if len(self.urls) > 1 else 1
        for attempt in range(attempts):
            try:
                return op(self.current)
            except KeystewardError as exc:
                kind = exc.failover
                again = kind == NOT_SENT or (safe and kind in (REFUSED, LOST))
                if not again or attempt == attempts - 1:
                    raise
                self._at = (self._at + 1) % len(self.urls)
                if (attempt + 1) % len(self.urls) == 0:
                    self._sleep(jitter((attempt + 1) // len(self.urls) - 1))
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises
