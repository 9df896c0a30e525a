"""The audit writer signs the last link of each tenant's lot in a batch, not every link: the signature covers
the links before it through the chain. Played on SQLite and PostgreSQL with the real AuditLog: the chains
verify with a signed head, and an attacker with database access (without the audit key) who rewrites an
unsigned link of a batch, and every hash after it, is caught at the batch's signed link."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, select, update

from keysteward.audit import chain
from keysteward.audit.log import ROWS_PER_INSERT, AuditLog, prepare
from keysteward.audit.pending import Effect
from keysteward.errors import Conflict
from keysteward.store.db import Database
from keysteward.store.models import AuditRecord

pytestmark = pytest.mark.integration


def _fields(n: int) -> dict[str, object]:
    return {"actor": "xks:AKID", "action": "xks.decrypt", "target": "key:k", "details": {"n": n}}


@pytest.fixture(params=["sqlite", "postgresql"])
def signed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Database, AuditLog, Ed25519PrivateKey]]:
    """A migrated database of each engine and its audit log with a signing key."""
    url = f"sqlite:///{tmp_path / 'k.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    db = Database(url)
    db.migrate()
    key = Ed25519PrivateKey.generate()
    log = AuditLog(db)
    log.set_signer(key)
    try:
        yield db, log, key
    finally:
        log.close()
        db.dispose()


def test_a_batch_is_signed_at_its_last_link_and_a_rewrite_inside_it_is_caught(
    signed: tuple[Database, AuditLog, Ed25519PrivateKey],
) -> None:
    db, log, key = signed
    with db.write() as conn:  # two batches; the first interleaves two tenants' records
        first = log.append_many(conn, [("t1", _fields(1)), ("t2", _fields(1)), ("t1", _fields(2)),
                                       ("t1", _fields(3)), ("t2", _fields(2))])  # fmt: skip
    with db.write() as conn:
        second = log.append_many(conn, [("t1", _fields(4)), ("t1", _fields(5))])
    assert (first, second) == ([1, 1, 2, 3, 2], [4, 5])
    t1, t2 = log.links("t1"), log.links("t2")
    assert [link.signature is not None for link in t1] == [False, False, True, False, True]
    assert [link.signature is not None for link in t2] == [False, True]
    for links, tenant in ((t1, "t1"), (t2, "t2")):
        report = chain.verify(links, key.public_key(), tenant_id=tenant)
        chain.require_signed_head(report)
        assert (report.records, report.unsigned_tail) == (len(links), 0)
    assert [json.loads(link.body)["details"]["n"] for link in t1] == [1, 2, 3, 4, 5]

    # the attacker rewrites record 2 of t1 (unsigned, inside the first batch) and rehashes 2 and 3 so the
    # chain links up again; he cannot sign, so record 3 keeps the signature of the hash it had
    forged, prev = [], t1[0].hash
    for link in t1[1:3]:
        body = json.loads(link.body)
        body.update(prev=prev, **({"actor": "nobody"} if link.seq == 2 else {}))
        text = chain.canonical(body)
        forged.append(dataclasses.replace(link, body=text, hash=chain.link_hash(text)))
        prev = forged[-1].hash
    with db.write() as conn:
        for link in forged:
            conn.execute(
                update(AuditRecord)
                .where(AuditRecord.tenant_id == "t1", AuditRecord.seq == link.seq)
                .values(body=link.body, hash=link.hash)
            )
    with db.read() as conn:
        assert conn.execute(select(AuditRecord.hash).where(AuditRecord.seq == 2, AuditRecord.tenant_id == "t1")
                            ).scalar_one() == forged[0].hash  # fmt: skip
    with pytest.raises(chain.ChainBroken) as caught:
        chain.verify(log.links("t1"), key.public_key(), tenant_id="t1")
    assert caught.value.seq == 3 and "signature" in caught.value.message


def test_an_append_undone_with_its_effect_leaves_no_gap_in_the_chain(
    signed: tuple[Database, AuditLog, Ed25519PrivateKey],
) -> None:
    """An effect that appends a record in the batch's transaction and is then refused is undone by its
    savepoint, its record too: the heads the batch locked (and remembers) must not keep the undone move."""
    _, log, key = signed
    holding, release = threading.Event(), threading.Event()

    def hold(conn: Connection) -> dict[str, Any]:
        holding.set()
        assert release.wait(10)
        return {"actor": "test", "action": "held"}

    def plain(n: int) -> Effect:
        return lambda conn: {"actor": "test", "action": f"plain.{n}"}

    def appends_then_refuses(conn: Connection) -> dict[str, Any]:
        log.append(conn, "t1", actor="test", action="inner.append")
        raise Conflict("refused after its append", code="refused")

    outcomes: dict[str, Any] = {}

    def run(name: str, effect: Effect) -> None:
        try:
            outcomes[name] = log.commit("t1", effect)
        except Conflict as exc:
            outcomes[name] = exc

    log.record("t1", actor="test", action="first")
    held = threading.Thread(target=run, args=("held", hold))
    held.start()
    assert holding.wait(10)  # the writer is inside a batch: the next three wait for one batch together
    threads = [threading.Thread(target=run, args=item) for item in
               (("p1", plain(1)), ("refused", appends_then_refuses), ("p2", plain(2)))]  # fmt: skip
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    release.set()
    for thread in [held, *threads]:
        thread.join(30)
    assert isinstance(outcomes["refused"], Conflict)
    links = log.links("t1")
    report = chain.verify(links, key.public_key(), tenant_id="t1")
    chain.require_signed_head(report)
    actions = [json.loads(link.body)["action"] for link in links]
    assert sorted(actions) == ["first", "held", "plain.1", "plain.2"] and report.records == 4
    assert sorted([outcomes["p1"], outcomes["p2"]]) == [3, 4]


def test_a_batch_larger_than_one_insert_statement_links_in_order_and_records_made_early_keep_their_place(
    signed: tuple[Database, AuditLog, Ed25519PrivateKey],
) -> None:
    """SQLite inserts a lot in statements of :data:`ROWS_PER_INSERT` rows; records whose body parts were made
    before the transaction (the group commit's ``prepare``) are joined to the chain where the lock puts them."""
    db, log, key = signed
    n = 2 * ROWS_PER_INSERT + 7
    entries = [("t1", _fields(i)) for i in range(n)]
    for _, fields in entries[::3]:  # a third made early, as the writer does before it takes the lock
        prepare(fields)
    with db.write() as conn:
        seqs = log.append_many(conn, entries)
    assert seqs == list(range(1, n + 1))
    links = log.links("t1", limit=n + 1)
    report = chain.verify(links, key.public_key(), tenant_id="t1")
    chain.require_signed_head(report)
    assert [json.loads(link.body)["details"]["n"] for link in links] == list(range(n))
    assert all(chain.canonical(json.loads(link.body)) == link.body for link in links)
