"""Leases, commits in every rollback journal mode, ROLLBACK, VACUUM, auto_vacuum, new databases."""

import time

import pytest

from conftest import shell


def series(n, sql):
    """`sql` with a CTE `c(x)` of 1..n (apsw's SQLite has no generate_series)."""
    return f"with recursive c(x) as (select 1 union all select x + 1 from c where x < {n}) {sql}"


def test_writer_and_reader_processes_see_each_commit(server, agent):
    w, r = agent(), agent()
    w.sql("kv", "pragma litevfs_acquire_lease")
    w.sql("kv", "create table kv(k integer primary key, v)")
    for i in range(1, 8):
        w.sql("kv", "insert into kv values (?, ?)", args=[i, f"value {i}"])
        pos = w.one("kv", "pragma litevfs_position")
        assert r.one("kv", "pragma litevfs_sync") == pos
        assert r.sql("kv", "select max(k), count(*) from kv") == [[i, i]]
    assert r.one("kv", "pragma integrity_check") == "ok"
    assert int(r.one("kv", "pragma litevfs_position").split("/")[0], 16) == 8


def test_reader_sees_commits_without_explicit_sync(server, agent):
    w, r = agent(), agent()
    w.sql("poll", "pragma litevfs_acquire_lease")
    w.sql("poll", "create table t(x)")
    assert r.sql("poll", "select count(*) from t") == [[0]]
    w.sql("poll", "insert into t values (1)")
    # The poller (long-poll) brings the change; wait for it without asserting on time.
    deadline = time.monotonic() + 60
    while r.one("poll", "select count(*) from t") != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert r.one("poll", "select count(*) from t") == 1


def test_two_processes_race_for_the_lease(server, agent):
    a, b = agent(), agent()
    a.sql("race", "pragma litevfs_acquire_lease")
    a.sql("race", "create table t(who)")
    ra, rb = a.run("race", "pragma litevfs_acquire_lease"), b.run("race", "pragma litevfs_acquire_lease")
    assert ra["ok"], "the holder may take its own lease again"
    assert not rb["ok"] and rb["code"] & 0xFF == 5, rb  # SQLITE_BUSY
    assert "another client holds the write lease" in rb["error"]
    r = b.run("race", "insert into t values ('b')")
    assert not r["ok"] and "acquire_lease" in b.one("race", "pragma litevfs_last_error")
    a.sql("race", "insert into t values ('a')")
    assert '"held":true' in a.one("race", "pragma litevfs_lease")
    a.sql("race", "pragma litevfs_release_lease")
    assert a.one("race", "pragma litevfs_lease") == '{"held":false}'
    b.sql("race", "pragma litevfs_acquire_lease")
    b.sql("race", "insert into t values ('b')")
    assert b.sql("race", "select who from t order by rowid") == [["a"], ["b"]]


@pytest.mark.parametrize("mode", ["delete", "truncate", "persist", "memory"])
def test_journal_modes_commit_and_roll_back(server, agent, mode):
    w, r = agent(), agent()
    w.sql("j", "pragma litevfs_acquire_lease")
    assert w.one("j", f"pragma journal_mode = {mode}") == mode
    w.sql("j", "create table t(x, pad)")
    for i in range(5):
        w.sql("j", "insert into t values (?, randomblob(3000))", args=[i])
    w.sql("j", "begin; insert into t values (100, 'x'); update t set x = -1")
    w.sql("j", "rollback")
    w.sql("j", "begin; delete from t where x = 0; insert into t values (5, zeroblob(9000)); commit")
    expected = [[1], [2], [3], [4], [5]]
    assert w.sql("j", "select x from t order by x") == expected
    assert w.stats("j")["commits"] == 7
    r.sql("j", "pragma litevfs_sync")
    assert r.sql("j", "select x from t order by x") == expected
    assert r.one("j", "pragma integrity_check") == "ok"


def test_rollback_after_cache_spill_uploads_nothing(server, agent, big_db):
    server.upload("big", big_db)
    w = agent()
    w.sql("big", "pragma litevfs_acquire_lease")
    pos = w.one("big", "pragma litevfs_position")
    w.sql("big", "pragma cache_size = 10")
    w.sql("big", "begin; update t set v = hex(randomblob(120)) where id % 3 = 0")
    w.sql("big", "rollback")
    assert w.one("big", "pragma litevfs_position") == pos
    assert w.stats("big")["commits"] == 0
    assert w.one("big", "pragma integrity_check") == "ok"


def test_vacuum_shrinks_and_round_trips(server, agent):
    w, r = agent(), agent()
    w.sql("vac", "pragma litevfs_acquire_lease")
    w.sql("vac", "create table t(x, pad)")
    w.sql("vac", series(2000, "insert into t select x, randomblob(1000) from c"))
    before = w.one("vac", "pragma page_count")
    w.sql("vac", "delete from t where x > 100")
    w.sql("vac", "vacuum")
    after = w.one("vac", "pragma page_count")
    assert after < before // 5
    r.sql("vac", "pragma litevfs_sync")
    assert r.one("vac", "pragma page_count") == after
    assert r.one("vac", "select count(*) from t") == 100
    assert r.one("vac", "pragma integrity_check") == "ok"


def test_auto_vacuum_database_round_trips(server, agent):
    w, r = agent(), agent()
    w.sql("av", "pragma litevfs_acquire_lease")
    w.sql("av", "pragma auto_vacuum = full")
    w.sql("av", "create table t(x, pad)")
    w.sql("av", series(500, "insert into t select x, randomblob(2000) from c"))
    before = w.one("av", "pragma page_count")
    assert w.one("av", "pragma auto_vacuum") == 1
    w.sql("av", "delete from t where x > 250")
    assert w.one("av", "pragma page_count") < before * 2 // 3
    w.sql("av", "pragma auto_vacuum = incremental")
    w.sql("av", "vacuum")
    w.sql("av", "delete from t where x > 200")
    w.sql("av", "pragma incremental_vacuum")
    r.sql("av", "pragma litevfs_sync")
    assert r.one("av", "pragma auto_vacuum") == 2
    assert r.one("av", "select count(*) from t") == 200
    assert r.one("av", "pragma integrity_check") == "ok"


def test_new_database_is_created_by_the_first_commit(server, env):
    r = shell(".open file:fresh?vfs=litevfs&mode=ro\nselect 1;", env())
    assert "unable to open database" in r.stderr
    assert 'database "fresh" does not exist in the page store at ' + server.url in r.stderr
    r = shell(
        ".open file:fresh?vfs=litevfs\npragma litevfs_acquire_lease;\ncreate table t(x);\n"
        "insert into t values (42);\npragma litevfs_release_lease;",
        env(),
    )
    assert r.returncode == 0, r.stderr
    r = shell(".open file:fresh?vfs=litevfs&mode=ro\nselect x from t;", env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "42"


def test_upload_failure_fails_the_commit_and_caches_nothing(server, agent):
    w = agent()
    w.sql("f", "pragma litevfs_acquire_lease")
    w.sql("f", "create table t(x)")
    w.sql("f", "insert into t values (1)")
    pos = w.one("f", "pragma litevfs_position")
    server.stop()
    r = w.run("f", "insert into t values (2)")
    assert not r["ok"], r
    assert server.url in w.one("f", "pragma litevfs_last_error")
    assert w.one("f", "pragma litevfs_position") == pos
    server.start()
    assert w.sql("f", "select x from t") == [[1]]
    w.sql("f", "pragma litevfs_acquire_lease")
    w.sql("f", "insert into t values (3)")
    assert w.sql("f", "select x from t order by x") == [[1], [3]]
    assert w.one("f", "pragma integrity_check") == "ok"


def test_closing_the_last_connection_releases_the_lease(server, env, agent):
    r = shell(".open file:rel?vfs=litevfs\npragma litevfs_acquire_lease;\ncreate table t(x);", env())
    assert r.returncode == 0, r.stderr
    b = agent()
    b.sql("rel", "pragma litevfs_acquire_lease")
    b.sql("rel", "insert into t values (1)")


def test_connections_of_one_process_share_locks_and_position(server, agent):
    a = agent()
    a.sql("two", "pragma litevfs_acquire_lease")
    a.sql("two", "create table t(x)")
    a.sql("two", "begin immediate; insert into t values (1)")
    # The reader (a second connection in the same process) sees the committed state only.
    assert a.sql("two", "select count(*) from t", ro=True) == [[0]]
    a.sql("two", "commit")
    assert a.sql("two", "select count(*) from t", ro=True) == [[1]]
    assert a.one("two", "pragma integrity_check", ro=True) == "ok"


@pytest.mark.parametrize(
    "setup", ["pragma journal_mode = off", "pragma locking_mode = exclusive", "pragma journal_mode = truncate; pragma locking_mode = exclusive"]
)
def test_other_modes_commit_each_transaction(server, agent, setup):
    w, r = agent(), agent()
    w.sql("m", "pragma litevfs_acquire_lease")
    w.sql("m", setup)
    w.sql("m", "create table t(x)")
    for i in range(3):
        w.sql("m", "insert into t values (?)", args=[i])
        r.sql("m", "pragma litevfs_sync")
        assert r.sql("m", "select count(*) from t") == [[i + 1]]
    assert w.stats("m")["commits"] == 4
    assert r.one("m", "pragma integrity_check") == "ok"
