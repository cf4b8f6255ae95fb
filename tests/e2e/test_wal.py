"""WAL-mode databases: written under the lease, each commit uploaded at its commit frame,
checkpoints local, readers in one process on their snapshots, other processes as with a
rollback journal. (The kill -9 loop runs in WAL mode too: test_robustness.py.)"""

import json
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import BIN, HANG_GUARD, shell


def export(env, name, path):
    """Exports NAME, checks it, and returns (count, sum) of table t. Also reads the stored pages
    the way readers without WAL support do (the original LiteVFS serves page 1 with bytes 18
    and 19 set to 1, so SQLite reads the database in rollback-journal mode): the same rows, and
    the same check passes."""
    r = subprocess.run([BIN, "export", "--force", "-q", name, str(path)], env=env, capture_output=True,
                       text=True, timeout=HANG_GUARD)
    assert r.returncode == 0, r.stderr
    rows = []
    data = bytearray(path.read_bytes())
    rollback = path.with_name(path.name + ".rollback")
    data[18] = data[19] = 1
    rollback.write_bytes(bytes(data))
    for f in (path, rollback):
        con = sqlite3.connect(f)
        try:
            assert con.execute("pragma integrity_check").fetchall() == [("ok",)]
            rows.append(con.execute("select count(*), sum(x) from t").fetchone())
        finally:
            con.close()
    assert rows[0] == rows[1], rows
    return rows[0]


def test_wal_in_the_shell_seen_by_another_process_and_back_to_delete(server, env, agent, tmp_path):
    e = env()
    r = shell(
        ".open file:sw?vfs=litevfs\n"
        "pragma litevfs_acquire_lease;\n"
        "create table t(x);\n"
        "insert into t values (1);\n"
        "pragma journal_mode = wal;\n"
        "insert into t values (2);\n"
        "begin; insert into t values (3); insert into t select x + 10 from t; commit;\n"
        "pragma wal_checkpoint;\n"
        "insert into t values (100);\n"
        "select count(*), sum(x) from t;\n",
        e,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-1] == "7|142", r.stdout
    assert "wal" in r.stdout.split()
    # Another process: sees every commit, in WAL mode too (the stored header says so).
    a = agent()
    assert a.sql("sw", "select count(*), sum(x) from t") == [[7, 142]]
    assert a.one("sw", "pragma journal_mode") == "wal"
    assert a.one("sw", "pragma integrity_check") == "ok"
    # Six commits: create, insert, the switch to WAL, then three WAL transactions; the
    # checkpoint uploaded nothing.
    assert int(a.one("sw", "pragma litevfs_position").split("/")[0], 16) == 6
    assert export(e, "sw", tmp_path / "sw.db") == (7, 142)
    # Back to DELETE, in the other process, under the lease.
    a.sql("sw", "pragma litevfs_acquire_lease")
    assert a.one("sw", "pragma journal_mode = delete") == "delete"
    a.sql("sw", "insert into t values (1000)")
    a.sql("sw", "pragma litevfs_release_lease")
    r = shell(".open file:sw?vfs=litevfs\npragma journal_mode;\nselect count(*), sum(x) from t;", env())
    assert r.stdout.split() == ["delete", "8|1142"], (r.stdout, r.stderr)
    assert export(e, "sw", tmp_path / "sw2.db") == (8, 1142)


def test_an_imported_wal_database_is_writable(server, env, agent, tmp_path):
    path = tmp_path / "wal.db"
    con = sqlite3.connect(path)
    con.execute("pragma journal_mode = wal")
    con.execute("create table t(x)")
    con.executemany("insert into t values (?)", [(i,) for i in range(100)])
    con.commit()
    con.close()
    r = subprocess.run([BIN, "import", "-q", "iw", str(path)], env=env(), capture_output=True, text=True,
                       timeout=HANG_GUARD)
    assert r.returncode == 0, r.stderr
    w, reader = agent(), agent()
    assert reader.one("iw", "pragma journal_mode") == "wal"
    assert reader.sql("iw", "select count(*), sum(x) from t") == [[100, 4950]]  # in its page cache now
    assert w.one("iw", "select count(*) from t") == 100
    r = w.run("iw", "insert into t values (1)")
    assert not r["ok"] and r["code"] & 0xFF == 8, r  # SQLITE_READONLY: no lease yet
    assert "acquire_lease" in w.one("iw", "pragma litevfs_last_error")
    w.sql("iw", "pragma litevfs_acquire_lease")
    for i in range(5):
        w.sql("iw", "insert into t values (?)", args=[1000 + i])
    pos = w.one("iw", "pragma litevfs_position")
    # The reader, in WAL mode with its connection open, follows.
    assert reader.one("iw", "pragma litevfs_sync") == pos
    assert reader.sql("iw", "select count(*), sum(x) from t") == [[105, 4950 + 5010]]
    assert reader.one("iw", "pragma integrity_check") == "ok"
    assert export(env(), "iw", tmp_path / "iw.db") == (105, 4950 + 5010)


def test_readers_of_one_process_keep_their_snapshot(server, agent):
    a = agent()
    a.sql("snap", "pragma litevfs_acquire_lease")
    a.sql("snap", "pragma journal_mode = wal")
    a.sql("snap", "create table t(x)")
    a.sql("snap", "insert into t values (1)")
    # The read-only connection opens a read transaction and keeps it.
    assert a.sql("snap", "begin; select count(*) from t", ro=True) == [[1]]
    for i in range(3):
        a.sql("snap", "insert into t values (?)", args=[i])
    assert a.sql("snap", "select count(*) from t", ro=True) == [[1]]
    a.sql("snap", "commit", ro=True)
    assert a.sql("snap", "select count(*) from t", ro=True) == [[4]]
    assert a.stats("snap")["commits"] == 6


def test_a_failed_wal_commit_leaves_no_trace(server, agent):
    w = agent(LITEVFS_COMMIT_DEADLINE=1)
    w.sql("f", "pragma litevfs_acquire_lease")
    w.sql("f", "pragma journal_mode = wal")
    w.sql("f", "create table t(x)")
    w.sql("f", "insert into t values (1)")
    pos = w.one("f", "pragma litevfs_position")
    server.stop()
    r = w.run("f", "insert into t values (2)")
    assert not r["ok"], r
    assert w.one("f", "pragma litevfs_position") == pos
    # The outcome was unknown (no store): reads wait for the store to answer.
    server.start()
    assert w.sql("f", "select x from t") == [[1]]
    assert w.sql("f", "select x from t", ro=True) == [[1]]
    assert w.one("f", "pragma litevfs_position") == pos
    w.sql("f", "pragma litevfs_acquire_lease")
    w.sql("f", "insert into t values (3)")
    assert w.sql("f", "select x from t order by x") == [[1], [3]]
    # Every connection of the process, and a recovery of the WAL, agree.
    w.close_db("f")
    assert w.sql("f", "select x from t order by x", ro=True) == [[1], [3]]
    assert w.one("f", "pragma integrity_check") == "ok"


def test_large_transactions_vacuum_and_truncating_checkpoints(server, agent):
    w = agent(LITEVFS_TXN_MEMORY="64KiB")
    w.sql("big", "pragma litevfs_acquire_lease")
    w.sql("big", "pragma journal_mode = wal")
    w.sql("big", "create table t(x, pad)")
    w.sql("big", "with recursive c(i) as (select 1 union all select i + 1 from c where i < 2000) "
                 "insert into t select i, randomblob(1000) from c")
    w.sql("big", "pragma wal_checkpoint(truncate)")
    w.sql("big", "delete from t where x > 100")
    w.sql("big", "vacuum")
    w.sql("big", "pragma wal_checkpoint(truncate)")
    w.sql("big", "insert into t values (5000, 'x')")
    r = agent()
    assert r.sql("big", "select count(*), sum(x) from t") == [[101, 5050 + 5000]]
    assert r.one("big", "pragma integrity_check") == "ok"
    assert r.one("big", "pragma page_count") == w.one("big", "pragma page_count")


CONCURRENCY = """
import apsw, json, os, sys, threading, time
loader = apsw.Connection(":memory:"); loader.enable_load_extension(True)
loader.load_extension(os.environ["LITEVFS_EXT"])
def conn():
    c = apsw.Connection("file:conc?vfs=litevfs", flags=apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READWRITE
                        | apsw.SQLITE_OPEN_CREATE, statementcachesize=0)
    c.setbusytimeout(5000)
    return c
w = conn()
w.execute("pragma litevfs_acquire_lease")
w.execute("pragma journal_mode = wal")
w.execute("create table t(id integer primary key, v)")
w.execute("with recursive c(i) as (select 1 union all select i + 1 from c where i < 1000) "
          "insert into t(v) select hex(randomblob(50)) from c")
TXNS = int(sys.argv[1])
errors, odd, backwards = [], [], []
def reader(stop, out, i):
    c = conn()
    n, last = 0, 0
    while not stop.is_set():
        try:
            # The same work whatever the table's size (a fixed key range), and the newest row,
            # which is even after every committed transaction of two rows.
            (count, _), = c.execute("select (select max(id) from t), "
                                    "(select sum(length(v)) from t where id <= 1000)").fetchall()
            if count % 2:
                odd.append(count)
            if count < last:
                backwards.append((last, count))
            last = count
            n += 1
        except Exception as e:
            errors.append(repr(e))
    out[i] = n
def phase(txns=0, seconds=None):
    stop, out = threading.Event(), [0] * 4
    threads = [threading.Thread(target=reader, args=(stop, out, i), daemon=True) for i in range(4)]
    for t in threads: t.start()
    t0 = time.monotonic()
    try:
        for i in range(txns):
            w.execute("begin; insert into t(v) values (hex(randomblob(50))); "
                      "insert into t(v) values (hex(randomblob(50))); commit")
        if seconds:
            time.sleep(seconds)
    finally:
        stop.set()
    took = time.monotonic() - t0
    for t in threads: t.join()
    return sum(out), took
# Rounds that alternate: a writer's share of the transactions with the readers, then the readers
# alone as long, so that a change of the machine's load hits both sides alike.
ROUNDS = 5
reads_w = secs_w = reads_0 = secs_0 = 0
for r in range(ROUNDS):
    n, took = phase(txns=TXNS // ROUNDS)
    reads_w, secs_w = reads_w + n, secs_w + took
    n, took0 = phase(seconds=took)
    reads_0, secs_0 = reads_0 + n, secs_0 + took0
with_writes, without = reads_w / secs_w, reads_0 / secs_0
print(json.dumps({"errors": errors[:5], "n_errors": len(errors), "odd": odd[:5], "backwards": backwards[:5],
                  "commits": TXNS, "write_seconds": secs_w, "reads_per_s_with_writes": with_writes,
                  "reads_per_s_without": without, "ratio": with_writes / without}))
"""


def test_readers_go_on_while_a_writer_commits(server, env):
    """4 reader threads of one apsw process query in a loop while a writer commits 1,000
    transactions of two rows: no reader ever fails or sees half a transaction or goes back.
    The throughput ratio (5 rounds of 200 commits, each followed by as long without writes) is
    printed, not asserted (it is a benchmark figure)."""
    r = subprocess.run([sys.executable, "-c", CONCURRENCY, "1000"], env=env(), capture_output=True, text=True,
                       timeout=10 * HANG_GUARD)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\nWAL concurrency: {out}")
    assert out["n_errors"] == 0, out
    assert out["odd"] == [] and out["backwards"] == [], out


def test_wal_in_exclusive_locking_mode(server, env):
    """With locking_mode = EXCLUSIVE SQLite keeps the wal-index in its heap: commits still go
    up at their commit frame, a reader needs no lease, and leaving WAL works."""
    r = shell(
        ".open file:xw?vfs=litevfs\n"
        "pragma litevfs_acquire_lease;\n"
        "create table t(x);\n"
        "insert into t values (1);\n"
        "pragma locking_mode = exclusive;\n"
        "pragma journal_mode = wal;\n"
        "insert into t values (2);\n"
        "pragma wal_checkpoint;\n"
        "insert into t values (3);\n"
        "select count(*), sum(x) from t;\n",
        env(),
    )
    assert r.returncode == 0 and r.stdout.split()[-1] == "3|6", (r.stdout, r.stderr)
    r = shell(
        ".open file:xw?vfs=litevfs\n"
        "pragma locking_mode = exclusive;\n"
        "select count(*), sum(x) from t;\n"
        "pragma litevfs_acquire_lease;\n"
        "pragma journal_mode = delete;\n"
        "insert into t values (4);\n",
        env(),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[1] == "3|6" and r.stdout.split()[-1] == "delete", r.stdout
    r = shell(".open file:xw?vfs=litevfs\npragma journal_mode;\nselect count(*), sum(x) from t;\n"
              "pragma integrity_check;", env())
    assert r.stdout.split() == ["delete", "4|10", "ok"], (r.stdout, r.stderr)


def test_a_process_with_its_own_wal_commits_follows_another_writer(server, agent):
    """Process A commits in WAL mode (frames not yet checkpointed), gives the lease up; B
    writes; A, its connections still open, drops its WAL, reads B's commits and writes again."""
    a, b = agent(), agent()
    a.sql("hand", "pragma litevfs_acquire_lease")
    a.sql("hand", "pragma journal_mode = wal")
    a.sql("hand", "pragma wal_autocheckpoint = 0")
    a.sql("hand", "create table t(x integer primary key, pad)")
    for i in range(1, 21):
        a.sql("hand", "insert into t values (?, randomblob(2000))", args=[i])
    a.sql("hand", "pragma wal_checkpoint(passive)")
    for i in range(21, 31):
        a.sql("hand", "update t set pad = randomblob(2000) where x = ?", args=[i - 20])
        a.sql("hand", "insert into t values (?, randomblob(2000))", args=[i])
    assert a.sql("hand", "select count(*) from t", ro=True) == [[30]]
    a.sql("hand", "pragma litevfs_release_lease")
    b.sql("hand", "pragma litevfs_acquire_lease")
    assert b.sql("hand", "select count(*) from t") == [[30]]
    b.sql("hand", "delete from t where x % 3 = 0")
    b.sql("hand", "insert into t values (100, 'b')")
    b.sql("hand", "pragma litevfs_release_lease")
    pos = b.one("hand", "pragma litevfs_position")
    deadline = time.monotonic() + 60
    while a.one("hand", "pragma litevfs_position") != pos and time.monotonic() < deadline:
        time.sleep(0.01)  # the poller brings it (no explicit sync)
    want = [[21, 100]]
    assert a.sql("hand", "select count(*), max(x) from t") == want
    assert a.sql("hand", "select count(*), max(x) from t", ro=True) == want
    assert a.one("hand", "pragma integrity_check") == "ok"
    a.sql("hand", "pragma litevfs_acquire_lease")
    a.sql("hand", "insert into t values (200, 'a')")
    b.sql("hand", "pragma litevfs_sync")
    assert b.sql("hand", "select count(*), max(x) from t") == [[22, 200]]
    assert b.one("hand", "pragma integrity_check") == "ok"


def test_a_restart_on_the_same_cache_dir_after_wal_commits(server, env, agent, tmp_path):
    cache = tmp_path / "shared-cache"
    a = agent(cache_dir=cache)
    a.sql("rc", "pragma litevfs_acquire_lease")
    a.sql("rc", "pragma journal_mode = wal")
    a.sql("rc", "create table t(x integer primary key, pad)")
    for i in range(1, 40):
        a.sql("rc", "insert into t values (?, randomblob(1500))", args=[i])
        if i == 20:
            a.sql("rc", "pragma wal_checkpoint(passive)")
    a.kill()
    r = agent(cache_dir=cache)
    assert r.sql("rc", "select count(*), sum(x) from t") == [[39, 780]]
    assert r.one("rc", "pragma integrity_check") == "ok"
    deadline = time.monotonic() + 60
    while not r.run("rc", "pragma litevfs_acquire_lease")["ok"] and time.monotonic() < deadline:
        time.sleep(0.05)  # the killed holder's lease goes when the store sees its connection close
    r.sql("rc", "insert into t values (40, 'x')")
    assert r.sql("rc", "select count(*) from t") == [[40]]


def test_spilled_frames_overwritten_frames_and_savepoints(server, agent):
    """A page cache of 5 pages makes SQLite write frames before the commit and overwrite them in
    place (then rewrite their checksums after the commit frame); savepoints roll frames back.
    Only what COMMIT committed reaches the store."""
    w = agent()
    w.sql("sp", "pragma litevfs_acquire_lease")
    w.sql("sp", "pragma journal_mode = wal")
    w.sql("sp", "pragma cache_size = 5")
    w.sql("sp", "create table t(x integer primary key, pad)")
    w.sql("sp", "begin")
    w.sql("sp", "with recursive c(i) as (select 1 union all select i + 1 from c where i < 300) "
                "insert into t select i, randomblob(900) from c")
    w.sql("sp", "update t set pad = randomblob(900) where x % 2 = 0")
    w.sql("sp", "savepoint s")
    w.sql("sp", "delete from t where x > 100")
    w.sql("sp", "rollback to s")
    w.sql("sp", "release s")
    w.sql("sp", "update t set pad = zeroblob(10) where x > 250")
    w.sql("sp", "commit")
    w.sql("sp", "begin; insert into t values (1000, 'y'); savepoint a; insert into t values (1001, 'n'); "
                "rollback to a; commit")
    want = [[301, sum(range(1, 301)) + 1000]]
    assert w.sql("sp", "select count(*), sum(x) from t") == want
    pos = w.one("sp", "pragma litevfs_position")
    # The switch to WAL, the create table, then each transaction its own commit (the first one's
    # frames were rewritten with their checksums after its commit frame); nothing of the
    # rolled-back savepoints, nothing for the spilled frames on their own.
    assert int(pos.split("/")[0], 16) == 4
    # Closing every connection checkpoints and deletes the WAL: the main file becomes the head.
    w.close_db("sp")
    assert w.sql("sp", "select count(*), sum(x) from t", ro=True) == want
    assert w.one("sp", "pragma integrity_check") == "ok"
    r = agent()
    assert r.sql("sp", "select count(*), sum(x) from t") == want
    assert r.one("sp", "pragma integrity_check") == "ok"


@pytest.mark.parametrize("sync", ["off", "normal", "full", "extra"])
def test_every_commit_is_in_the_store_whatever_synchronous_says(server, agent, sync):
    w, r = agent(), agent()
    w.sql("sy", "pragma litevfs_acquire_lease")
    w.sql("sy", "pragma journal_mode = wal")
    w.sql("sy", f"pragma synchronous = {sync}")
    w.sql("sy", "create table t(x)")
    for i in range(1, 6):
        w.sql("sy", "insert into t values (?)", args=[i])
        # Acknowledged means in the store: another process finds it at once.
        assert r.one("sy", "pragma litevfs_sync") == w.one("sy", "pragma litevfs_position")
        assert r.sql("sy", "select count(*) from t") == [[i]]
