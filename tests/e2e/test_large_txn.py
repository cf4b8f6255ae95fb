"""Write transactions larger than LITEVFS_TXN_MEMORY: their pages, their rollback journal and the
LTX of their commit spill to the cache directory, so memory stays bounded (issue 9, point 4)."""

import hashlib

from conftest import make_db

MiB = 1 << 20


def digest(agent, db):
    """A hash of every row, to compare content across processes."""
    h = hashlib.sha256()
    for row in agent.sql(db, "select id, hex(pad) from t order by id"):
        h.update(repr(row).encode())
    return h.hexdigest()


def test_vacuum_of_a_database_12x_the_bound_runs_in_bounded_memory(server, agent, tmp_path):
    """VACUUM writes every page of the database: without a bound, its dirty pages and its journal
    each hold a whole copy in memory. With LITEVFS_TXN_MEMORY=4MiB the peak grows by far less
    than the database size; the same VACUUM of a copy, with the bound above the size, is the
    comparison."""
    src = make_db(
        tmp_path / "frag.db",
        """
        create table t(id integer primary key, pad blob);
        with recursive c(x) as (select 1 union all select x + 1 from c where x < 26000)
        insert into t select x, randomblob(2000) from c;
        delete from t where id % 2 = 0;
        """,
    )
    size = src.stat().st_size
    assert size >= 12 * 4 * MiB, size
    reader = agent()
    growth, before = {}, None
    for db, bound in [("vac", "4MiB"), ("vac-copy", "1GiB")]:
        server.upload(db, src)
        before = before or digest(reader, db)
        w = agent(LITEVFS_TXN_MEMORY=bound)
        # The same small read-ahead in both runs: a read-ahead reply (up to 4 MiB by default) is
        # held while it is decoded, which is memory of the reads, not of the transaction.
        w.sql(db, "pragma litevfs_max_readahead_bytes = 262144")
        w.sql(db, "pragma litevfs_acquire_lease")
        pages = w.one(db, "pragma page_count")
        _, now = w.rss("reset")
        w.sql(db, "vacuum")
        peak, _ = w.rss()
        growth[bound] = (peak - now) * 1024
        w.sql(db, "pragma litevfs_release_lease")
        assert w.one(db, "pragma integrity_check") == "ok"
        assert w.one(db, "pragma page_count") < pages * 2 // 3
        w.close()
    print(f"database {size / MiB:.0f} MiB; VACUUM peak RSS growth: "
          + ", ".join(f"LITEVFS_TXN_MEMORY={b}: {g / MiB:.1f} MiB" for b, g in growth.items()))
    assert growth["4MiB"] < size / 2, growth
    assert growth["4MiB"] < growth["1GiB"] / 3, growth

    reader.sql("vac", "pragma litevfs_sync")
    assert reader.one("vac", "pragma integrity_check") == "ok"
    assert digest(reader, "vac") == before


def test_large_transactions_commit_and_roll_back_through_spill_files(server, agent):
    w, r = agent(LITEVFS_TXN_MEMORY="256KiB"), agent()
    w.sql("big", "pragma litevfs_acquire_lease")
    w.sql("big", "create table t(id integer primary key, pad blob)")
    # One commit of ~3 MB: its dirty pages and its LTX are well past the bound.
    w.sql("big", "with recursive c(x) as (select 1 union all select x + 1 from c where x < 3000) "
                 "insert into t select x, randomblob(1000) from c")
    committed = digest(w, "big")
    r.sql("big", "pragma litevfs_sync")
    assert digest(r, "big") == committed
    # Every row rewritten, read back inside the transaction (from the spill file), then rolled
    # back: SQLite restores the pages from the journal, which spilled too.
    w.sql("big", "begin; update t set pad = randomblob(1200)")
    assert w.one("big", "select sum(length(pad)) from t") == 3000 * 1200
    w.sql("big", "rollback")
    assert digest(w, "big") == committed
    assert w.stats("big")["commits"] == 2
    # The same rewrite committed, in every rollback journal mode.
    for i, mode in enumerate(["delete", "truncate", "persist", "memory"]):
        assert w.one("big", f"pragma journal_mode = {mode}") == mode
        w.sql("big", f"update t set pad = randomblob({1100 + i})")
        r.sql("big", "pragma litevfs_sync")
        assert r.one("big", "select sum(length(pad)) from t") == 3000 * (1100 + i)
        assert digest(r, "big") == digest(w, "big")
    assert r.one("big", "pragma integrity_check") == "ok"


def test_a_commit_over_the_stores_body_limit_fails_at_once_and_changes_nothing(make_server, agent):
    small = make_server("--max-body-size", "1MiB")
    w = agent(LITEFS_CLOUD_HOST=small.url, LITEVFS_TXN_MEMORY="256KiB")
    w.sql("cap", "pragma litevfs_acquire_lease")
    w.sql("cap", "create table t(id integer primary key, pad blob)")
    r = w.run("cap", "insert into t(pad) select randomblob(3000000)")
    assert not r["ok"] and r["code"] == 13, r  # SQLITE_FULL
    err = w.one("cap", "pragma litevfs_last_error")
    assert "ETOOLARGE" in err and "1048576 bytes" in err, err
    assert w.stats("cap")["lost_replies"] == 0
    assert w.sql("cap", "select count(*) from t") == [[0]]
    w.sql("cap", "insert into t(pad) values (randomblob(1000))")
    assert agent(LITEFS_CLOUD_HOST=small.url).sql("cap", "select length(pad) from t") == [[1000]]
