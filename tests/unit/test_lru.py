"""The bounded LRU map behind the policy engine's and key uses' memos."""

from __future__ import annotations

import threading

from keysteward.lru import Lru


def test_the_least_recently_used_entry_goes_first() -> None:
    lru: Lru[str, int] = Lru(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1  # a is now the most recent
    lru.put("c", 3)
    assert (lru.get("a"), lru.get("b"), lru.get("c")) == (1, None, 3) and len(lru) == 2


def test_get_or_make_makes_once_and_stays_bounded_under_many_threads() -> None:
    lru: Lru[int, int] = Lru(64)
    made: list[int] = []

    def make(key: int) -> int:
        made.append(key)
        return key

    def work() -> None:
        for n in range(1000):
            assert lru.get_or_make(n % 100, lambda key=n % 100: make(key)) == n % 100

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(lru) == 64 and made
