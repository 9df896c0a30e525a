"""The workers' connection board (keysteward/server/accept_balance.py): each worker's slot, who holds the
fewest, and a board that does not fit the worker (a bad descriptor's size or slot) refused at start."""

from __future__ import annotations

import os

import pytest

from keysteward.server.accept_balance import SLOT, Board, new_board


def test_the_worker_holding_the_fewest_accepts() -> None:
    fd = new_board(3)
    try:
        first, second, third = Board(fd, 0), Board(fd, 1), Board(fd, 2)
        assert first.fewest() and second.fewest() and third.fewest()  # all at zero: any may take the next
        first.set(5)
        second.set(4)
        third.set(4)
        assert not first.fewest()
        assert second.fewest() and third.fewest()
        third.set(3)
        assert not second.fewest() and third.fewest()
        first.set(0)
        assert first.fewest() and not third.fewest()
    finally:
        os.close(fd)


def test_the_supervisor_gives_a_zeroed_slot_per_worker() -> None:
    fd = new_board(2)
    try:
        assert os.fstat(fd).st_size == 2 * SLOT
        assert os.pread(fd, 2 * SLOT, 0) == bytes(2 * SLOT)
    finally:
        os.close(fd)


@pytest.mark.parametrize(("size", "index"), [(0, 0), (2 * SLOT, 2), (2 * SLOT, -1), (SLOT + 3, 0)])
def test_a_board_without_the_workers_slot_is_refused(size: int, index: int) -> None:
    fd = os.memfd_create("board")
    try:
        os.ftruncate(fd, size)
        with pytest.raises(ValueError, match="worker board"):
            Board(fd, index)
    finally:
        os.close(fd)
