"""Loading, lazy reads, the cache, prefetch bounds, cache reuse after restart."""

import json
import sqlite3
import urllib.request

import pytest

from conftest import EXT, make_db, shell


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
    # The reply also carries the schema and the interior b-tree pages (LITEVFS_OPEN_PREFETCH).
    assert s["requests"] == 1 and s["pages_fetched"] == s["pages_cached"] > 1, s
    assert r.stdout.splitlines()[-1].startswith("0000000000000001/")
    r = shell(".open file:big?vfs=litevfs\npragma litevfs_cache_stats;", env(LITEVFS_OPEN_PREFETCH=0))
    s = stats_line(r.stdout)
    assert (s["requests"], s["pages_fetched"], s["pages_cached"]) == (1, 1, 1), s
    # Unknown and lease-only databases open with one request too (empty; writable under a lease).
    r = shell(".open file:nothing-here?vfs=litevfs\npragma litevfs_cache_stats;", env())
    assert stats_line(r.stdout)["requests"] == 1, r.stdout


def test_a_cold_point_lookup_costs_two_requests(server, env, tmp_path):
    """The request that opens the database brings the interior pages of every b-tree, so a
    point lookup needs one more request, for its leaf, whatever the b-tree's depth."""
    deep = make_db(
        tmp_path / "deep.db",
        """
        create table t(id integer primary key, v blob);
        with recursive c(x) as (select 1 union all select x + 1 from c where x < 120000)
        insert into t select x, randomblob(300) from c;
        """,
    )
    server.upload("deep", deep)
    depth = None
    for prefetch, want in [("4MiB", 2), ("0", None)]:
        for key in [7, 60_001, 119_999]:
            r = shell(
                f".open file:deep?vfs=litevfs\nselect length(v) from t where id = {key};\n"
                "pragma litevfs_cache_stats;",
                env(LITEVFS_OPEN_PREFETCH=prefetch),
            )
            assert r.stdout.splitlines()[0] == "300", r.stderr
            requests = stats_line(r.stdout)["requests"]
            if want is not None:
                assert requests == want, (prefetch, key, requests)
            else:
                depth = requests - 1
    assert depth >= 3, "without it: one request per b-tree level, plus the open"


def test_a_bad_open_prefetch_is_named_and_the_default_used(server, env, big_db):
    server.upload("big", big_db)
    r = shell(".open file:big?vfs=litevfs\nselect count(*) from t;", env(LITEVFS_OPEN_PREFETCH="1T"))
    assert "invalid LITEVFS_OPEN_PREFETCH" in r.stderr, r.stderr
    assert r.stdout.strip() == "20000"


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
    a = agent(LITEVFS_OPEN_PREFETCH=0)
    assert a.one("big", "pragma litevfs_max_prefetch_pages = 0") == "0"
    a.sql("big", "select v from t where id = 7")
    s = a.stats("big")
    assert s["pages_fetched"] == s["misses"], "without prefetch every request brings one page"


@pytest.fixture
def scan_db(tmp_path):
    """~20 MB in 4 KiB pages: a table of 2000-byte rows (overflow-free) with an index."""
    return make_db(
        tmp_path / "scan.db",
        """
        create table t(id integer primary key, k text, v blob);
        with recursive c(x) as (select 1 union all select x + 1 from c where x < 9000)
        insert into t select x, hex(randomblob(8)), randomblob(2000) from c;
        create index ik on t(k);
        """,
    )


@pytest.mark.parametrize(
    "query",
    ["select sum(length(v)) from t", "pragma integrity_check", "pragma quick_check"],
)
def test_cold_scans_read_ahead_in_few_requests(server, agent, scan_db, query):
    """A full scan, an integrity check (which walks each b-tree from its last child to its
    first) and a quick check on a cold cache: the read-ahead window grows while the pattern
    holds, so requests are far fewer than pages; with growth off they are pages / 33."""
    server.upload("scan", scan_db)
    pages = scan_db.stat().st_size // 4096
    counts = {}
    for readahead in ["4M", "0"]:
        a = agent()
        a.sql("scan", f"pragma litevfs_max_readahead_bytes = '{readahead}'")
        assert a.sql("scan", query)[0][0] is not None
        counts[readahead] = a.stats("scan")["requests"]
        a.kill()
    print(f"{query}: {pages} pages, requests with read-ahead growth / without: {counts}")
    assert counts["4M"] <= pages // 200, (pages, counts)
    assert counts["0"] >= pages // 40, (pages, counts)


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


def test_wal_database_is_readable_and_writable_under_the_lease(server, agent, tmp_path):
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
    assert a.one("wal", "pragma journal_mode") == "wal"
    a.sql("wal", "pragma litevfs_acquire_lease")
    a.sql("wal", "insert into w values (1)")
    assert a.one("wal", "select count(*) from w") == 101


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


@pytest.mark.parametrize("damage", ["zero", "stale"])
def test_a_header_page_count_sqlite_ignores_comes_from_the_store(server, agent, env, tmp_path, damage):
    """Files last written by SQLite before 3.7.0 may have 0 as the in-header page count, or a
    count that version-valid-for marks stale; SQLite then takes the size from the file. Through
    litevfs the size comes from the store, on a cold open and on a warm restart, and writes work."""
    path = make_db(
        tmp_path / "legacy.db",
        """
        create table t(id integer primary key, v text);
        with recursive c(x) as (select 1 union all select x + 1 from c where x < 3000)
        insert into t select x, hex(randomblob(60)) from c;
        create index iv on t(v);
        """,
    )
    b = bytearray(path.read_bytes())
    if damage == "zero":
        b[28:32] = bytes(4)
    else:
        counter = int.from_bytes(b[24:28], "big")
        b[28:32] = (3).to_bytes(4, "big")
        b[92:96] = (counter - 1).to_bytes(4, "big")
    path.write_bytes(b)
    con = sqlite3.connect(path)
    native = list(con.execute("select count(*), sum(length(v)), max(v) from t").fetchone())
    con.close()
    server.upload("legacy", path)

    cache = tmp_path / "reader-cache"
    r = agent(cache_dir=cache)
    assert r.sql("legacy", "select count(*), sum(length(v)), max(v) from t") == [native]
    assert r.one("legacy", "pragma integrity_check") == "ok"
    r.kill()
    # A restart with page 1 in the cache asks the store for the size too.
    r = agent(cache_dir=cache)
    assert r.sql("legacy", "select count(*), sum(length(v)), max(v) from t") == [native]
    out = shell(".open file:legacy?vfs=litevfs\nselect count(*) from t;\npragma integrity_check;", env())
    assert out.stdout.split() == [str(native[0]), "ok"], out.stderr

    w = agent()
    w.sql("legacy", "pragma litevfs_acquire_lease")
    w.sql("legacy", "insert into t(v) values ('written through litevfs')")
    assert w.stats("legacy")["commits"] == 1
    r.sql("legacy", "pragma litevfs_sync")
    assert r.one("legacy", "select count(*) from t") == native[0] + 1
    assert r.one("legacy", "pragma integrity_check") == "ok"
    # The commit carries a page 1 with a valid count, as SQLite writes it.
    with urllib.request.urlopen(f"{server.url}/db/snapshot?db=legacy&format=sqlite") as resp:
        image = resp.read()
    be32 = lambda o: int.from_bytes(image[o:o + 4], "big")  # noqa: E731
    page_size = int.from_bytes(image[16:18], "big")
    assert be32(92) == be32(24) and be32(28) == len(image) // page_size
