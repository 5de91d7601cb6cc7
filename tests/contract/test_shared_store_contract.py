"""Store verbs for several daemons on one database (issue 8), on every backend."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import asyncpg
import pytest
from structlog.testing import capture_logs

from dispatcher.errors import EX_TEMPFAIL, LeaseLost, SchemaBehind, StoreError
from dispatcher.models import AttemptStatus, DispatchStatus, Instance, NewDispatch
from dispatcher.store.base import Store, load_migrations
from dispatcher.store.postgres import PostgresStore
from dispatcher.store.sql import statements
from dispatcher.store.sqlite import SQLiteStore
from dispatcher.testing import FakeClock, InMemoryStore

from .conftest import Reserve, all_slot_rows

LIVE = "instance-live"
DEAD = "instance-dead"
ME = "instance-me"
POSTGRES = "dispatcher.store.postgres"


def _instance(instance_id: str, clock: FakeClock) -> Instance:
    now = clock.now()
    return Instance(instance_id, "host", 1, "0", now, now, None)


async def test_try_take_slot_grants_only_below_capacity(store: Store, clock: FakeClock) -> None:
    first = await store.try_take_slot("global", "a", ME, 2, clock.now())
    second = await store.try_take_slot("global", "b", LIVE, 2, clock.now())
    refused = await store.try_take_slot("global", "c", ME, 2, clock.now())
    other_gate = await store.try_take_slot("runner:shell", "c", ME, 1, clock.now())

    assert first is not None and second is not None and other_gate is not None
    assert refused is None
    held = await store.held_slots()
    assert [(r.gate, r.holder) for r in held] == [
        ("global", "a"),
        ("global", "b"),
        ("runner:shell", "c"),
    ]
    assert await store.close_slot(first, clock.now())
    assert await store.try_take_slot("global", "c", ME, 2, clock.now()) is not None


async def test_a_claim_takes_its_places_with_it_never_beyond_the_cap(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    ids = [(await reserve()).id for _ in range(5)]
    assert await store.try_take_slot("global", "elsewhere", LIVE, 4, clock.now()) is not None

    first = await store.claim_with_slots(ME, clock.now(), (), 2, "global", 4)
    second = await store.claim_with_slots(ME, clock.now(), (), 5, "global", 4)
    full = await store.claim_with_slots(ME, clock.now(), (), 5, "global", 4)

    assert [d.id for d, _ in first.claimed] == ids[:2] and first.room == 3
    assert [d.id for d, _ in second.claimed] == ids[2:3] and second.room == 1
    assert full.claimed == [] and full.room == 0
    held = {(row.holder, row.id) for row in await store.held_slots() if row.gate == "global"}
    mine = {(f"dispatch:{d.id}", row_id) for d, row_id in first.claimed + second.claimed}
    assert mine < held and len(held) == 4
    assert all(d.status is DispatchStatus.PLANNING for d, _ in first.claimed)
    assert all(d.instance_id == ME for d, _ in second.claimed)

    # A row whose release is still queued counts as free: the place was given back.
    (_dispatch, row_id) = first.claimed[0]
    store.mirror_close(row_id, clock.now())
    again = await store.claim_with_slots(ME, clock.now(), (), 5, "global", 4)
    assert [d.id for d, _ in again.claimed] == ids[3:4]
    assert len([r for r in await store.held_slots() if r.gate == "global"]) == 4


async def test_a_refused_write_leaves_its_batch_neighbours_landed_and_tells_its_caller(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    if isinstance(store, InMemoryStore):
        pytest.skip("the in-memory store checks no foreign key")
    dispatch_id = (await reserve()).id
    assert await store.claim_next(ME, clock.now(), ()) is not None
    await store.start_attempt(dispatch_id, 0, "warm", "shell", 1, ME, clock.now())
    await store.flush()  # row ids at hand: the three below are queued in one turn
    now = clock.now()

    async def finish() -> None:  # queued in the same turn as the three starts
        store.finish_dispatch(dispatch_id, DispatchStatus.SUCCEEDED, now)

    with capture_logs() as logged:
        answers = await asyncio.gather(
            store.start_attempt(dispatch_id, 1, "a", "shell", 1, ME, now),
            store.start_attempt(404_404, 0, "x", "shell", 1, ME, now, durable=True),
            store.start_attempt(dispatch_id, 2, "b", "shell", 1, ME, now, durable=True),
            finish(),
            return_exceptions=True,
        )

    assert isinstance(answers[1], StoreError)  # the caller of the refused write is told
    assert not any(isinstance(a, BaseException) for a in (answers[0], answers[2], answers[3]))
    steps = sorted(a.step for a in await store.list_attempts(dispatch_id))
    assert steps == ["a", "b", "warm"]  # its neighbours landed
    final = await store.get_dispatch(dispatch_id)
    assert final is not None and final.status is DispatchStatus.SUCCEEDED
    assert [e["statement"] for e in logged if e["event"] == "store_write_refused"] == [
        "insert_attempt"
    ]


async def test_reap_releases_what_silent_instances_hold_and_spares_live_ones(
    store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    for instance_id in (LIVE, DEAD, ME):
        await store.register_instance(_instance(instance_id, clock))
    mine, live, dead = (await reserve()).id, (await reserve()).id, (await reserve()).id
    for instance_id, dispatch_id in ((ME, mine), (LIVE, live), (DEAD, dead)):
        assert await store.claim_next(instance_id, clock.now(), ()) is not None
        await store.start_attempt(dispatch_id, 0, "s", "shell", 1, instance_id, clock.now())
        await store.open_slot("global", f"dispatch:{dispatch_id}", instance_id, clock.now())
    clock.advance(20)
    await store.heartbeat(LIVE, clock.now())
    clock.advance(20)

    report = await store.reap_dead_instances(ME, clock.now(), ttl=30)

    assert (report.slots_released, report.attempts_interrupted, report.dispatches_requeued) == (
        1,
        1,
        1,
    )
    statuses = {i: getattr(await store.get_dispatch(i), "status", None) for i in (mine, live, dead)}
    assert statuses == {
        mine: DispatchStatus.PLANNING,
        live: DispatchStatus.PLANNING,
        dead: DispatchStatus.QUEUED,
    }
    assert [a.status for a in await store.list_attempts(dead)] == [AttemptStatus.INTERRUPTED]
    assert [a.status for a in await store.list_attempts(live)] == [AttemptStatus.RUNNING]
    held = {row.holder for row in await store.held_slots()}
    assert held == {f"dispatch:{mine}", f"dispatch:{live}"}
    recovered = [row for row in await all_slot_rows(store) if row.recovered]
    assert [row.holder for row in recovered] == [f"dispatch:{dead}"]
    live_ids = {i.id for i in await store.live_instances(clock.now() - timedelta(days=1))}
    assert live_ids == {LIVE, ME}
    again = await store.reap_dead_instances(ME, clock.now(), ttl=30)
    assert again.slots_released == again.dispatches_requeued == 0


async def test_maintenance_lock_is_granted_to_one_holder(store: Store) -> None:
    async with store.maintenance_lock("purge") as mine:
        assert mine


# -- PostgreSQL only: two daemons' stores on one database ------------------------------


async def test_two_stores_never_claim_the_same_dispatch(
    pg_url: str, store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    if not isinstance(store, PostgresStore):
        return
    ids = {(await reserve()).id for _ in range(60)}
    other = await PostgresStore.open(pg_url)
    try:

        async def drain(s: Store, name: str) -> list[int]:
            taken: list[int] = []
            while claimed := await s.claim_many(name, clock.now(), (), 3):
                taken += [d.id for d in claimed]
            return taken

        a, b = await asyncio.gather(drain(store, "a"), drain(other, "b"))
    finally:
        await other.close()
    assert sorted(a + b) == sorted(ids)


async def test_concurrent_slot_takers_never_oversubscribe(
    pg_url: str, store: Store, clock: FakeClock
) -> None:
    if not isinstance(store, PostgresStore):
        return
    others = [await PostgresStore.open(pg_url) for _ in range(3)]
    try:
        stores = [store, *others]
        answers = await asyncio.gather(
            *(
                s.try_take_slot("global", f"h{i}", f"i{n}", 4, clock.now())
                for n, s in enumerate(stores)
                for i in range(10)
            )
        )
    finally:
        for other in others:
            await other.close()
    assert sum(answer is not None for answer in answers) == 4
    assert len(await store.held_slots()) == 4


async def test_concurrent_claims_with_places_never_oversubscribe(
    pg_url: str, store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    if not isinstance(store, PostgresStore):
        return
    for _ in range(30):
        await reserve()
    others = [await PostgresStore.open(pg_url) for _ in range(3)]
    try:
        stores = [store, *others]
        granted = await asyncio.gather(
            *(
                s.claim_with_slots(f"i{n}", clock.now(), (), 3, "global", 5)
                for n, s in enumerate(stores)
                for _ in range(3)
            )
        )
    finally:
        for other in others:
            await other.close()
    claimed = [d.id for g in granted for d, _ in g.claimed]
    assert len(claimed) == 5 == len(set(claimed))
    assert len(await store.held_slots()) == 5


async def test_a_submission_elsewhere_wakes_a_subscriber(
    store: Store, reserve: Reserve, request: pytest.FixtureRequest
) -> None:
    """PostgreSQL: LISTEN/NOTIFY; SQLite: the wake-up datagram (`dispatcher.wake`)."""
    if isinstance(store, InMemoryStore):
        pytest.skip("a store of one process: no other process to be woken by")
    woken = asyncio.Event()
    if isinstance(store, PostgresStore):
        listener: Store = await PostgresStore.open(request.getfixturevalue("pg_url"))
    else:
        assert isinstance(store, SQLiteStore)
        listener = await SQLiteStore.open(store.path)
    try:
        await listener.subscribe(woken.set)
        await reserve()  # through the other store: another process, as far as it can tell
        await asyncio.wait_for(woken.wait(), 10)
    finally:
        await listener.close()


async def test_a_lost_listening_connection_is_opened_again(pg_url: str, clock: FakeClock) -> None:
    """A PostgreSQL restart (here: the listener's backend terminated) must not leave the
    daemon on polling for good: it listens again, and says so."""
    woken = asyncio.Event()
    listener = await PostgresStore.open(pg_url)
    other = await PostgresStore.open(pg_url)
    try:
        with capture_logs() as events:
            await listener.subscribe(woken.set)
            assert listener._listener is not None
            lost = listener._listener.server_pid()
            async with other._pool.acquire() as con:
                assert await con.fetchval("SELECT pg_terminate_backend($1)", lost)
            await asyncio.wait_for(woken.wait(), 15)  # once back: look for what was missed
            woken.clear()
            assert listener._listener.server_pid() != lost
            await other.check_and_reserve(NewDispatch(task="t", params={}), clock.now())
            await asyncio.wait_for(woken.wait(), 10)  # NOTIFY reaches it again
    finally:
        await other.close()
        await listener.close()
    assert [e["event"] for e in events if e["event"].startswith("listen_")] == [
        "listen_lost",
        "listen_restored",
    ]


async def test_concurrent_starters_migrate_a_new_database_once(
    pg_url: str, pg_database: str
) -> None:
    """Four daemons start at once on a new database. Each waits for the migration lock
    (held here until all four wait for it); then one applies the migrations and the
    others find nothing left to do: every version is recorded once, and the schema is
    the one a lone starter makes (on `pg_url`)."""
    holder = await asyncpg.connect(pg_database)
    try:
        async with holder.transaction():
            await holder.execute(statements(POSTGRES)["migrations_lock"])
            starting = [asyncio.create_task(PostgresStore.open(pg_database)) for _ in range(4)]
            await _until_waiting_for_the_lock(holder, starting)
        stores = await asyncio.gather(*starting)
    finally:
        await holder.close()
    for opened in stores:
        await opened.close()
    alone = await PostgresStore.open(pg_url)  # migrated by one starter (if not already)
    await alone.close()

    versions = [migration.version for migration in load_migrations(POSTGRES)]
    recorded = await _fetch(pg_database, "SELECT version FROM schema_migrations ORDER BY 1")
    assert [row["version"] for row in recorded] == versions
    assert await _schema(pg_database) == await _schema(pg_url)


async def test_a_read_only_opening_refuses_a_schema_older_than_the_code(pg_database: str) -> None:
    """PostgreSQL's side of the SQLite test: read commands migrate nothing, so one met
    before the daemon upgraded the database says so instead of reading rows without
    the columns it expects."""
    store = await PostgresStore.open(pg_database)
    await store.close()
    newest = load_migrations(POSTGRES)[-1].version
    await _fetch(pg_database, f"DELETE FROM schema_migrations WHERE version = {newest}")

    with pytest.raises(SchemaBehind, match="older than this dispatcher's") as caught:
        await PostgresStore.open(pg_database, read_only=True)

    assert caught.value.exit_code == EX_TEMPFAIL
    left = await _fetch(pg_database, "SELECT MAX(version) AS v FROM schema_migrations")
    assert left[0]["v"] < newest  # nothing was migrated


async def _until_waiting_for_the_lock(
    con: asyncpg.Connection, starting: list[asyncio.Task[PostgresStore]]
) -> None:
    """Until every starter waits for an advisory lock; none may have gone on."""
    waiting = 0
    for _ in range(500):
        done = [task for task in starting if task.done()]
        assert not done, f"a starter went on without the migration lock: {done[0]}"
        waiting = await con.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
        if waiting == len(starting):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{waiting} of {len(starting)} starters wait for the migration lock")


async def _fetch(url: str, query: str) -> list[asyncpg.Record]:
    con = await asyncpg.connect(url)
    try:
        return list(await con.fetch(query))
    finally:
        await con.close()


async def _schema(url: str) -> list[tuple[str, ...]]:
    """Tables, columns, indexes and triggers of the `public` schema."""
    rows = await _fetch(
        url,
        """
        SELECT 'column', table_name, column_name, data_type, is_nullable,
               coalesce(column_default, '')
          FROM information_schema.columns WHERE table_schema = 'public'
        UNION ALL
        SELECT 'index', tablename, indexname, indexdef, '', ''
          FROM pg_indexes WHERE schemaname = 'public'
        UNION ALL
        SELECT 'trigger', event_object_table, trigger_name, event_manipulation,
               action_timing, action_statement
          FROM information_schema.triggers WHERE trigger_schema = 'public'
        ORDER BY 1, 2, 3, 4
        """,
    )
    return [tuple(row) for row in rows]


# -- leases and fencing (PostgreSQL) ---------------------------------------------------------


async def test_a_reaped_instance_cannot_write_about_work_it_no_longer_owns(
    pg_url: str, store: Store, clock: FakeClock, reserve: Reserve
) -> None:
    """Daemon A froze past the TTL and B reaped it, then claimed A's dispatch. When A
    resumes, every write it makes about that work is refused, it learns that it lost
    its lease, and nothing of B's is touched."""
    if not isinstance(store, PostgresStore):
        return
    a, b = store, await PostgresStore.open(pg_url)
    lost: list[str] = []
    a.on_lease_lost = lambda exc: lost.append(str(exc))
    try:
        for s, name in ((a, "A"), (b, "B")):
            await s.register_instance(_instance(name, clock))
            s.lease = name
        taken, other = (await reserve()).id, (await reserve()).id
        assert len(await a.claim_many("A", clock.now(), (), 2)) == 2
        attempt = await a.start_attempt(taken, 0, "s", "shell", 1, "A", clock.now())
        await a.flush()

        clock.advance(40)
        await b.heartbeat("B", clock.now())
        report = await b.reap_dead_instances("B", clock.now(), ttl=30)
        assert report.dispatches_requeued == 2
        assert [d.id for d in await b.claim_many("B", clock.now(), (), 1)] == [taken]

        with capture_logs() as logged:  # A resumes, not knowing
            a.finish_attempt(attempt, AttemptStatus.SUCCEEDED, clock.now())
            await a.advance(taken, 1, clock.now())
            a.finish_dispatch(taken, DispatchStatus.SUCCEEDED, clock.now())
            await a.mirror_open("global", f"dispatch:{taken}", "A", clock.now())
            with pytest.raises(LeaseLost):  # a step waiting for its start must not run
                await a.flush()
            await a.requeue(taken, clock.now())
            claimed = await a.claim_many("A", clock.now(), (), 5)
            with pytest.raises(LeaseLost):
                await a.heartbeat("A", clock.now())
            with pytest.raises(LeaseLost):
                await a.try_take_slot("global", "x", "A", 10, clock.now())

        assert claimed == []  # `other` is queued, but A's claim is fenced
        assert lost and "reaped" in lost[0]
        assert "store_writes_fenced" in [e["event"] for e in logged]
        now_b = await b.get_dispatch(taken)
        assert now_b is not None
        assert (now_b.status, now_b.instance_id, now_b.current_step) == (
            DispatchStatus.PLANNING,
            "B",
            0,
        )
        again = await b.get_dispatch(other)
        assert again is not None and again.status is DispatchStatus.QUEUED
        assert [x.status for x in await b.list_attempts(taken)] == [AttemptStatus.INTERRUPTED]
        assert await b.held_slots() == []
        assert {i.id for i in await b.live_instances(clock.now() - timedelta(days=1))} == {"B"}
    finally:
        await b.close()
