"""Loading, lazy reads, the cache, prefetch bounds, cache reuse after restart."""

import json

from conftest import EXT, shell


def stats_line(out):
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def test_shell_lazy_open_fetches_only_what_the_query_touches(server, env, big_db):
    server.upload("big", big_db)
    r = shell(
        ".open file:big?vfs=litevfs\nselect length(v) from t where id = 12345;\npragma litevfs_cache_stats;",
        env(),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == "200"
    s = stats_line(r.stdout)
    assert s["db_pages"] > 2000
    # A point query touches a handful of b-tree pages; prefetch adds at most 32 per miss.
    assert s["pages_fetched"] < s["db_pages"] // 10, s
    assert s["pages_cached"] == s["pages_fetched"]
    # The store sends Litevfs-Page-Checksums; every fetched page was checked against it.
    assert s["checksums_verified"] == s["pages_fetched"]


def test_cold_open_is_one_request(server, env, big_db):
    # Page 1 and the position come in one GET /db/page without pos (our extension): opening a
    # database the process has never seen costs one round trip, not a sync plus a page fetch.
    server.upload("big", big_db)
    r = shell(".open file:big?vfs=litevfs\npragma litevfs_cache_stats;\npragma litevfs_position;", env())
    assert r.returncode == 0, r.stderr
    s = stats_line(r.stdout)
    assert (s["requests"], s["pages_fetched"], s["pages_cached"]) == (1, 1, 1), s
    assert r.stdout.splitlines()[-1].startswith("0000000000000001/")
    # Unknown and lease-only databases open with one request too (empty; writable under a lease).
    r = shell(".open file:nothing-here?vfs=litevfs\npragma litevfs_cache_stats;", env())
    assert stats_line(r.stdout)["requests"] == 1, r.stdout


def test_apsw_reads_and_cache_db_loads_everything(server, agent, big_db):
    server.upload("big", big_db)
    a = agent()
    assert a.one("big", "select count(*) from t where id between 100 and 110") == 11
    before = a.stats("big")
    assert before["pages_fetched"] < before["db_pages"] // 10
    pages = int(a.one("big", "pragma litevfs_cache_db"))
    assert pages == before["db_pages"]
    after = a.stats("big")
    assert after["pages_cached"] == pages
    requests = after["requests"]
    assert a.one("big", "pragma integrity_check") == "ok"
    assert a.one("big", "select count(*) from t") == 20000
    final = a.stats("big")
    assert final["pages_fetched"] == after["pages_fetched"], "a fully cached database fetches nothing"
    assert final["requests"] - requests <= 3  # only change polls


def test_max_prefetch_pages_bounds_each_request(server, agent, big_db):
    server.upload("big", big_db)
    a = agent()
    assert a.one("big", "pragma litevfs_max_prefetch_pages = 0") == "0"
    a.sql("big", "select v from t where id = 7")
    s = a.stats("big")
    assert s["pages_fetched"] == s["misses"], "without prefetch every request brings one page"


def test_max_reqs_per_query_fails_with_a_clear_error(server, agent, big_db):
    server.upload("big", big_db)
    a = agent()
    a.sql("big", "pragma litevfs_max_reqs_per_query = 2")
    a.sql("big", "pragma litevfs_max_prefetch_pages = 0")
    r = a.run("big", "select sum(length(v)) from t")
    assert not r["ok"]
    assert r["code"] & 0xFF == 4, r  # SQLITE_ABORT family
    assert "litevfs_max_reqs_per_query" in "".join(a.stderr) + a.one("big", "pragma litevfs_last_error")
    a.sql("big", "pragma litevfs_max_reqs_per_query = 0")
    assert a.one("big", "select count(*) from t") == 20000


def test_cache_reuse_after_restart_drops_what_changed(server, agent, env, tmp_path, big_db):
    server.upload("big", big_db)
    cache = tmp_path / "shared-cache"
    a = agent(cache_dir=cache)
    assert int(a.one("big", "pragma litevfs_cache_db")) > 2000
    a.close()

    b = agent(cache_dir=cache)
    assert b.one("big", "select count(*) from t") == 20000
    s = b.stats("big")
    assert s["pages_fetched"] == 0, s
    assert s["pages_cached"] == s["db_pages"]
    b.close()

    w = agent()
    w.sql("big", "pragma litevfs_acquire_lease")
    w.sql("big", "update t set v = 'changed' where id = 1")
    w.sql("big", "pragma litevfs_release_lease")

    c = agent(cache_dir=cache)
    assert c.one("big", "select v from t where id = 1") == "changed"
    s = c.stats("big")
    assert 0 < s["pages_fetched"] < 10, s


def test_max_cached_pages_evicts_least_recently_used(server, agent, big_db):
    server.upload("big", big_db)
    a = agent()
    assert a.one("big", "pragma litevfs_max_cached_pages = 50") == "50"
    assert a.one("big", "select count(*) from t") == 20000
    s = a.stats("big")
    assert s["pages_cached"] <= 50
    assert s["pages_fetched"] > 50
    assert a.one("big", "select count(*) from t where id = 1") == 1


def test_default_entry_point_makes_litevfs_the_default(server, env, big_db):
    server.upload("big", big_db)
    r = shell(".open big\nselect count(*) from t;", env(), load=f".load {EXT} sqlite3_litevfs_default_init")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "20000"


def test_default_vfs_environment_variable(server, env, big_db):
    server.upload("big", big_db)
    count = ".open big\nselect count(*) from t;"
    for on in ["1", "yes", "ON"]:
        r = shell(count, env(LITEVFS_DEFAULT_VFS=on))
        assert r.returncode == 0 and r.stdout.strip() == "20000", (on, r.stderr)
    # Off leaves the choice to the entry point.
    r = shell(count, env(LITEVFS_DEFAULT_VFS="0"), load=f".load {EXT} sqlite3_litevfs_default_init")
    assert r.returncode == 0 and r.stdout.strip() == "20000", r.stderr
    # .vfslist lists the default VFS first.
    r = shell(".vfslist", env(LITEVFS_DEFAULT_VFS="off"))
    assert r.stdout.split()[:3] == ["vfs.zName", "=", '"unix"'], r.stdout
    # A bad value fails the load with the reason, and registers nothing.
    r = shell(".open file:big?vfs=litevfs\nselect count(*) from t;", env(LITEVFS_DEFAULT_VFS="please"))
    assert 'invalid LITEVFS_DEFAULT_VFS "please": 1, true, yes or on' in r.stderr, r.stderr
    assert "no such vfs: litevfs" in r.stderr, r.stderr
    assert r.stdout == ""


def test_wal_database_is_readable_and_not_writable(server, agent, tmp_path):
    import sqlite3

    path = tmp_path / "wal.db"
    con = sqlite3.connect(path)
    con.execute("pragma journal_mode = wal")
    con.execute("create table w(x)")
    con.executemany("insert into w values (?)", [(i,) for i in range(100)])
    con.commit()
    con.execute("pragma wal_checkpoint(truncate)")
    con.close()
    assert path.read_bytes()[18:20] == b"\x02\x02"
    server.upload("wal", path)
    a = agent()
    assert a.one("wal", "select count(*) from w") == 100
    a.sql("wal", "pragma litevfs_acquire_lease")
    r = a.run("wal", "insert into w values (1)")
    assert not r["ok"]
    assert "WAL" in a.one("wal", "pragma litevfs_last_error")
    r = a.run("wal", "pragma journal_mode = wal")
    assert not r["ok"] and "does not write WAL" in r["error"]


def test_two_processes_with_one_cache_dir_both_work(server, agent, tmp_path, big_db):
    server.upload("big", big_db)
    cache = tmp_path / "one-cache"
    a, b = agent(cache_dir=cache), agent(cache_dir=cache)
    assert a.one("big", "select count(*) from t where id < 100") == 99
    assert b.one("big", "select count(*) from t where id < 100") == 99
    assert b.one("big", "pragma integrity_check") == "ok"
    assert sorted(p.name for p in cache.iterdir()) == ["big.index", "big.lock", "big.pages"]


def test_loading_twice_then_the_default_entry_point(server, env, big_db):
    server.upload("big", big_db)
    load = f".load {EXT}\n.load {EXT}\n.load {EXT} sqlite3_litevfs_default_init"
    r = shell(".open big\nselect count(*) from t;\n.open file:big?vfs=litevfs\nselect count(*) from t;", env(), load=load)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["20000", "20000"]
