"""Server down, wrong token, bad names, bad pragma values, kill -9 of a writer."""

import os
import subprocess
import sys
import time

import pytest

from conftest import HANG_GUARD, shell


def test_server_down_cached_pages_read_uncached_fail_naming_the_host(server, agent, big_db):
    server.upload("big", big_db)
    a = agent()
    a.sql("big", "pragma litevfs_cache_sync_period = 0")
    assert a.one("big", "select count(*) from t where id = 10") == 1
    server.stop()
    assert a.one("big", "select count(*) from t where id = 10") == 1, "cached pages still read"
    r = a.run("big", "select sum(length(v)) from t")
    assert not r["ok"]
    assert r["code"] & 0xFF == 10, r  # SQLITE_IOERR
    msg = a.one("big", "pragma litevfs_last_error")
    assert f"cannot reach the page store at {server.url}" in msg
    assert server.url in a.stderr_with(server.url)


def test_open_with_the_store_down_fails_naming_the_host(server, env):
    url = server.url
    server.stop()
    r = shell(".open file:any?vfs=litevfs\nselect 1;", env())
    assert "unable to open database" in r.stderr
    assert f"cannot reach the page store at {url}" in r.stderr


def test_wrong_token_names_litefs_cloud_token(make_server, tmp_path):
    s = make_server("--token", "secret-token=default:rw")
    base = {"LITEFS_CLOUD_HOST": s.url, "LITEVFS_CACHE_DIR": str(tmp_path / "c")}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("LITEFS_", "LITEVFS_"))}, **base}
    r = shell(".open file:db?vfs=litevfs\nselect 1;", {**env, "LITEFS_CLOUD_TOKEN": "wrong"})
    assert "LITEFS_CLOUD_TOKEN" in r.stderr
    assert "authorization denied" in r.stderr or "unable to open" in r.stderr
    r = shell(
        ".open file:db?vfs=litevfs\npragma litevfs_acquire_lease;\ncreate table t(x);\nselect count(*) from t;",
        {**env, "LITEFS_CLOUD_TOKEN": "secret-token"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "0"


def test_path_like_names_are_refused(server, env):
    for name in ["/tmp/x.db", "../x", "a/b", ".hidden"]:
        r = shell(f".open file:{name}?vfs=litevfs\nselect 1;", env())
        assert "unable to open database" in r.stderr, name
        assert "invalid database name" in r.stderr, name


def test_pragmas_read_defaults_and_refuse_bad_values(server, env):
    r = shell(
        ".open file:p?vfs=litevfs\n"
        "pragma litevfs_cache_sync_period;\npragma litevfs_max_cached_pages;\n"
        "pragma litevfs_min_available_space;\npragma litevfs_max_reqs_per_query;\n"
        "pragma litevfs_max_prefetch_pages;\npragma litevfs_max_readahead_bytes;\n"
        "pragma litevfs_position;\npragma litevfs_lease;\n"
        "pragma litevfs_cache_sync_period = '250ms';\npragma litevfs_cache_sync_period;",
        env(),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [
        "1s", "262144", "10485760", "0", "32", "4194304",
        "0000000000000000/0000000000000000", '{"held":false}', "250ms", "250ms",
    ]
    bad = {
        "litevfs_cache_sync_period = 'soon'": "'500ms'",
        "litevfs_max_cached_pages = -1": "a number of pages from 0",
        "litevfs_min_available_space = 'lots'": "K, M or G suffix",
        "litevfs_max_reqs_per_query = 'x'": "a number of requests",
        "litevfs_max_prefetch_pages = 5000": "from 0 to 1024",
        "litevfs_max_readahead_bytes = '1G'": "up to 64M",
        "litevfs_sync = 1": "takes none",
    }
    for pragma, allowed in bad.items():
        r = shell(f".open file:p?vfs=litevfs\npragma {pragma};", env())
        assert "bad value" in r.stderr and allowed in r.stderr, (pragma, r.stderr)


WRITER = """
import apsw, os, sys
loader = apsw.Connection(":memory:"); loader.enable_load_extension(True)
loader.load_extension(os.environ["LITEVFS_EXT"])
c = apsw.Connection("file:k9?vfs=litevfs", flags=apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_READWRITE
                    | apsw.SQLITE_OPEN_CREATE, statementcachesize=0)
c.setbusytimeout(5000)
while True:
    try:
        c.execute("pragma litevfs_acquire_lease")
        break
    except apsw.BusyError:
        pass  # the killed writer's lease has not expired yet
c.execute("create table if not exists t(txn integer, i integer, pad blob)")
txn = c.execute("select coalesce(max(txn), 0) from t").fetchall()[0][0]
while True:
    txn += 1
    c.execute("begin")
    c.execute("with recursive s(i) as (select 1 union all select i + 1 from s where i < 20) "
              "insert into t select ?, i, randomblob(700) from s", (txn,))
    c.execute("update t set pad = randomblob(300) where txn = ? and i = 1", (txn - 1,))
    c.execute("commit")
    print(txn, flush=True)
"""


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_kill_9_of_a_writer_in_a_loop_of_transactions(server, env, agent, mode):
    writer = WRITER
    if mode == "wal":
        # In WAL mode each commit is uploaded at its commit frame (issue 11, point 5).
        writer = WRITER.replace('c.execute("create table', 'c.execute("pragma journal_mode = wal")\nc.execute("create table', 1)
        assert writer != WRITER
    for round_ in range(3):
        w = subprocess.Popen([sys.executable, "-c", writer], env=env(), stdout=subprocess.PIPE, text=True)
        committed = 0
        deadline = time.monotonic() + HANG_GUARD
        while committed < 5 + 3 * round_ and time.monotonic() < deadline:
            line = w.stdout.readline()
            assert line, "writer died"
            committed = int(line)
        w.kill()
        w.wait()
        # The writer went on committing between our last read and the kill: every line it
        # printed before dying is an acknowledged commit.
        for line in w.stdout:
            committed = int(line)
        r = agent()
        assert r.one("k9", "pragma journal_mode") == mode
        assert r.one("k9", "pragma integrity_check") == "ok"
        groups = r.sql("k9", "select txn, count(*) from t group by txn order by txn")
        assert all(n == 20 for _, n in groups), "a transaction is all there or not at all"
        txns = [t for t, _ in groups]
        assert txns == list(range(1, len(txns) + 1))
        assert committed <= len(txns) <= committed + 1
        r.kill()


def test_no_hot_journal_survives_a_kill(server, env, agent):
    a = agent()
    a.sql("hj", "pragma litevfs_acquire_lease")
    a.sql("hj", "create table t(x)")
    a.sql("hj", "begin; insert into t values (1)")
    a.kill()
    r = agent()
    assert r.sql("hj", "select count(*) from t") == [[0]]
    assert r.one("hj", "pragma integrity_check") == "ok"


def test_cluster_and_log_file_from_the_environment(server, env, tmp_path, big_db):
    import urllib.request

    req = urllib.request.Request(
        f"{server.url}/db/upload?db=inc1&cluster=c1", data=big_db.read_bytes(), method="POST"
    )
    urllib.request.urlopen(req, timeout=HANG_GUARD).read()
    log = tmp_path / "litevfs.log"
    r = shell(".open file:inc1?vfs=litevfs\nselect count(*) from t;", env(LITEFS_CLOUD_CLUSTER="c1"))
    assert r.returncode == 0 and r.stdout.strip() == "20000", r.stderr
    r = shell(".open file:inc1?vfs=litevfs&mode=ro\nselect 1;", env(LITEVFS_LOG_FILE=log))
    assert "does not exist" in log.read_text()
    assert "does not exist" not in r.stderr


def test_pruned_position_fails_the_statement_with_the_extended_code(make_server, env, agent, big_db):
    import time as _time

    s = make_server("--retention", "100ms")
    s.upload("big", big_db)
    env.server = s
    r, w = agent(), agent()
    r.sql("big", "pragma litevfs_max_prefetch_pages = 0")
    r.sql("big", "begin")
    assert r.one("big", "select count(*) from t where id = 1") == 1
    old = r.one("big", "pragma litevfs_position")
    w.sql("big", "pragma litevfs_acquire_lease")
    w.sql("big", "update t set v = hex(randomblob(100))")
    w.sql("big", "insert into t values (20001, 'x')")
    failure = None
    for i in range(2, 20000, 25):
        res = r.run("big", "select v from t where id = ?", args=[i])
        if not res["ok"]:
            failure = res
            break
        _time.sleep(0.05)
    assert failure is not None, "the store kept serving a pruned position"
    assert failure["code"] == 1347375882, failure  # SQLITE_IOERR | (0x504F53 << 8)
    assert "changed in the page store under this transaction" in r.one("big", "pragma litevfs_last_error")
    r.run("big", "rollback")
    assert r.one("big", "select count(*) from t") == 20001
    assert r.one("big", "pragma litevfs_position") != old


def test_a_store_that_never_answers_fails_the_read_instead_of_hanging(server, agent, big_db):
    import socket
    import threading

    server.upload("big", big_db)
    a = agent()
    assert a.one("big", "select count(*) from t where id = 10") == 1
    server.stop()
    hole = socket.socket()
    hole.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hole.bind(("127.0.0.1", server.port))
    hole.listen(64)
    held = []
    stop = threading.Event()

    def accept():
        hole.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(hole.accept()[0])  # accepted, never answered
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        assert a.one("big", "select count(*) from t where id = 10") == 1, "cached pages still read"
        r = a.run("big", "select sum(length(v)) from t")  # returns: the request times out
        assert not r["ok"]
        msg = a.one("big", "pragma litevfs_last_error")
        assert server.url in msg and "timed out" in msg, msg
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        hole.close()


LITEVFS_IOERR_COMMIT_UNKNOWN = 0x554E4B0A  # SQLITE_IOERR | (0x554E4B << 8)


@pytest.mark.parametrize("txn_memory", [None, "64KiB"])
def test_a_commit_whose_reply_is_lost_is_settled_exactly_once(server, lossy, agent, tmp_path, txn_memory):
    """The reply to a commit is lost after it landed, or the commit never arrives: either way
    COMMIT succeeds and the row is in the store exactly once. With a small LITEVFS_TXN_MEMORY
    each commit's LTX is in a spill file, which is sent again from its first byte."""
    extra = {"LITEVFS_TXN_MEMORY": txn_memory} if txn_memory else {}
    pad = 300_000 if txn_memory else 0
    w = agent(LITEFS_CLOUD_HOST=lossy.url, **extra)
    w.sql("lost", "pragma litevfs_acquire_lease")
    w.sql("lost", "create table t(id integer primary key, v text, pad blob)")
    for i, how in enumerate(["reply", "request", "reply", "request"]):
        lossy.lose(1, how)
        w.sql("lost", "insert into t(v, pad) values (?, randomblob(?))", args=[f"row{i}", pad])
    assert lossy.lost == 4
    s = w.stats("lost")
    assert (s["lost_replies"], s["lost_replies_landed"], s["commits_unknown"]) == (4, 4, 0), s
    # A reader straight on the store sees each row once, and the writer goes on writing.
    w.sql("lost", "insert into t(v) values ('after')")
    r = agent()
    assert r.sql("lost", "select v from t order by id") == [["row0"], ["row1"], ["row2"], ["row3"], ["after"]]
    assert r.sql("lost", "select sum(length(pad)) from t") == [[4 * max(pad, 1)]]  # randomblob(0) is 1 byte
    assert r.one("lost", "pragma integrity_check") == "ok"


def test_a_commit_with_the_store_gone_past_the_deadline_is_reported_unknown(server, lossy, agent):
    w = agent(LITEFS_CLOUD_HOST=lossy.url, LITEVFS_COMMIT_DEADLINE=2)
    w.sql("unk", "pragma litevfs_acquire_lease")
    w.sql("unk", "create table t(v)")
    lossy.lose(1, "reply-then-down")
    r = w.run("unk", "insert into t values ('landed')")
    assert not r["ok"] and r["code"] == LITEVFS_IOERR_COMMIT_UNKNOWN, r
    msg = w.one("unk", "pragma litevfs_last_error")
    assert "outcome of this commit" in msg and "LITEVFS_COMMIT_DEADLINE (2s)" in msg, msg
    assert w.stats("unk")["commits_unknown"] == 1
    # While the store is away, a read cannot tell whether the commit landed: it fails the same
    # way instead of answering from the position before the commit.
    r = w.run("unk", "select count(*) from t")
    assert not r["ok"] and r["code"] == LITEVFS_IOERR_COMMIT_UNKNOWN, r
    assert "still unknown" in w.one("unk", "pragma litevfs_last_error")
    # The store is back: the writer learns that the commit did land, and writes on from there.
    lossy.up()
    assert w.sql("unk", "select v from t") == [["landed"]]
    w.sql("unk", "insert into t values ('next')")
    assert agent().sql("unk", "select v from t order by rowid") == [["landed"], ["next"]]


def test_a_bad_commit_deadline_is_named_and_the_default_used(server, env):
    out = shell("select 1;", env(LITEVFS_COMMIT_DEADLINE="soon"))
    assert "invalid LITEVFS_COMMIT_DEADLINE" in out.stderr, out.stderr
    assert out.stdout.strip() == "1"


def test_a_bad_txn_memory_is_named_and_the_default_used(server, env):
    out = shell("select 1;", env(LITEVFS_TXN_MEMORY="lots"))
    assert "invalid LITEVFS_TXN_MEMORY" in out.stderr, out.stderr
    assert out.stdout.strip() == "1"


def test_a_commit_refused_for_a_lost_lease_fails_readonly(server, agent):
    w = agent()
    w.sql("ll", "pragma litevfs_acquire_lease")
    w.sql("ll", "create table t(v)")
    w.sql("ll", "begin")
    w.sql("ll", "insert into t values ('lost')")
    # A local-mode store forgets its leases when it restarts.
    server.stop()
    server.start()
    r = w.run("ll", "commit")
    assert not r["ok"] and r["code"] & 0xFF == 8, r  # SQLITE_READONLY
    w.run("ll", "rollback")
    assert w.sql("ll", "select count(*) from t") == [[0]]
    w.sql("ll", "pragma litevfs_acquire_lease")
    w.sql("ll", "insert into t values ('kept')")
    assert agent().sql("ll", "select v from t") == [["kept"]]


def metric(server, name):
    import urllib.request

    text = urllib.request.urlopen(f"{server.url}/metrics", timeout=HANG_GUARD).read().decode()
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name))


def test_a_killed_lease_holder_does_not_block_the_next_writer(server, agent):
    """The lease (5 s) of a holder killed with kill -9 is released when the kernel closes its
    connections, so another process takes it at once instead of getting SQLITE_BUSY."""
    for round_ in range(3):
        a = agent()
        a.sql("hk", "pragma litevfs_acquire_lease")
        a.sql("hk", f"create table if not exists t(v); insert into t values ({round_})")
        # Wait (guard only) until the holder thread holds a refresh open at the store.
        deadline = time.monotonic() + HANG_GUARD
        while metric(server, 'litevfs_lease_events_total{event="refresh"}') < round_ + 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = metric(server, 'litevfs_lease_events_total{event="release_on_disconnect"}')
        a.kill()
        while metric(server, 'litevfs_lease_events_total{event="release_on_disconnect"}') == before:
            assert time.monotonic() < deadline, "the store never noticed the holder die"
            time.sleep(0.02)
        b = agent()
        r = b.run("hk", "pragma litevfs_acquire_lease")
        assert r["ok"], r
        assert b.sql("hk", "select count(*) from t") == [[round_ + 1]]
        b.sql("hk", "pragma litevfs_release_lease")
        b.kill()


def test_a_gracefully_released_lease_is_not_released_twice(server, agent):
    a = agent()
    a.sql("hr", "pragma litevfs_acquire_lease")
    a.sql("hr", "create table t(v)")
    a.sql("hr", "pragma litevfs_release_lease")
    b = agent()
    b.sql("hr", "pragma litevfs_acquire_lease")
    # The first process goes away while its last held refresh may still be open: the lease
    # the second one holds stays.
    a.kill()
    time.sleep(0.3)
    b.sql("hr", "insert into t values (1)")
    assert b.sql("hr", "select count(*) from t") == [[1]]
