//! Page-store behaviour over time: change feeds and long-poll, leases and races, snapshots at
//! older positions, restore, upload round trips, retention. Real server on loopback.

#[macro_use]
mod server_support;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use litevfs::ltx;
use litevfs::wire::{Changes, Lease, Pos, SyncResponse, TxidResponse};
use server_support::{Api, Model, Server, fake_sqlite, page};

fn sync_body(entries: &[(&str, Pos)]) -> Vec<u8> {
    let positions: std::collections::BTreeMap<String, Pos> =
        entries.iter().map(|(n, p)| (n.to_string(), *p)).collect();
    serde_json::to_vec(&litevfs::wire::SyncRequest { positions }).unwrap()
}

fn db_sync(api: &Api, db: &str, pos: Option<Pos>, wait: Option<&str>) -> Changes {
    let ps = pos.map(|p| p.to_string());
    let mut q = vec![("db", db)];
    if let Some(p) = &ps {
        q.push(("pos", p));
    }
    if let Some(w) = wait {
        q.push(("wait", w));
    }
    api.get("/db/sync", &q).ok().json()
}

fn sync_reports_changes() {
    let s = Server::start(&[]);
    let api = s.api();
    let mut m = Model::new(512);
    m.commit(
        &api,
        "s",
        3,
        &[(1, page(512, 1)), (2, page(512, 2)), (3, page(512, 3))],
    );
    let p1 = m.pos;
    m.commit(&api, "s", 3, &[(1, page(512, 11)), (3, page(512, 33))]);
    m.commit(&api, "s", 4, &[(4, page(512, 4)), (1, page(512, 1))]);
    let all = db_sync(&api, "s", None, None);
    assert_eq!((all.pos, all.all), (m.pos, Some(true)));
    let since = db_sync(&api, "s", Some(p1), None);
    assert_eq!(
        (since.drops_all(), since.pos, since.pgnos),
        (false, m.pos, Some(vec![1, 3, 4]))
    );
    let none = db_sync(&api, "s", Some(m.pos), None);
    assert!(!none.drops_all() && none.pgnos.unwrap_or_default().is_empty());
    for unknown in [
        Pos::new(2, 0x8000000000000009),
        Pos::new(99, 0x8000000000000009),
    ] {
        assert!(db_sync(&api, "s", Some(unknown), None).drops_all());
    }
    api.get("/db/sync", &[("db", "nope")]).err(404, "ENODB");
    api.get("/db/sync", &[("db", "s"), ("pos", "junk")])
        .err(400, "EBADPOS");
    // Batched: an entry for every requested database that exists, none for the others.
    let body = sync_body(&[("s", p1), ("ghost", Pos::ZERO)]);
    let r: SyncResponse = api.post("/sync", &[], body).ok().json();
    assert_eq!(r.changes.keys().collect::<Vec<_>>(), vec!["s"]);
    assert_eq!(r.changes["s"].pgnos, Some(vec![1, 3, 4]));
    let r: SyncResponse = api
        .post("/sync", &[], sync_body(&[("s", Pos::ZERO)]))
        .ok()
        .json();
    assert!(r.changes["s"].drops_all());
}

fn long_poll_wakes_on_commit_and_times_out_quietly() {
    let s = Server::start(&[]);
    let api = s.api();
    let mut m = Model::new(512);
    m.commit(&api, "w", 1, &[(1, page(512, 1))]);
    let start = m.pos;
    // Nothing happens: the plain "no changes" reply after the wait.
    let r: SyncResponse = api
        .post("/sync", &[("wait", "300")], sync_body(&[("w", start)]))
        .ok()
        .json();
    assert_eq!(r.changes["w"].pos, start);
    assert!(
        !r.changes["w"].drops_all() && r.changes["w"].pgnos.clone().unwrap_or_default().is_empty()
    );
    let c = db_sync(&api, "w", Some(start), Some("200"));
    assert_eq!(c.pos, start);
    // A commit wakes both kinds of long-poll before the (maximal) wait ends.
    let waiters: Vec<_> = (0..2)
        .map(|i| {
            let api = api.clone();
            std::thread::spawn(move || {
                let t = Instant::now();
                let c = if i == 0 {
                    let r: SyncResponse = api
                        .post("/sync", &[("wait", "30000")], sync_body(&[("w", start)]))
                        .ok()
                        .json();
                    r.changes["w"].clone()
                } else {
                    db_sync(&api, "w", Some(start), Some("30000"))
                };
                (c, t.elapsed())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    m.commit(&api, "w", 1, &[(1, page(512, 2))]);
    for w in waiters {
        let (c, elapsed) = w.join().unwrap();
        assert_eq!((c.pos, c.pgnos), (m.pos, Some(vec![1])));
        assert!(
            elapsed < Duration::from_secs(30),
            "returned only when the wait ended"
        );
    }
    // Creation of a requested database also wakes a long-poll.
    let api2 = api.clone();
    let t = std::thread::spawn(move || {
        let r: SyncResponse = api2
            .post(
                "/sync",
                &[("wait", "30000")],
                sync_body(&[("new", Pos::ZERO)]),
            )
            .ok()
            .json();
        r
    });
    std::thread::sleep(Duration::from_millis(200));
    Model::new(512).commit(&api, "new", 1, &[(1, page(512, 1))]);
    assert!(t.join().unwrap().changes["new"].drops_all());
}

fn lease_lifecycle() {
    let s = Server::start(&[]);
    let api = s.api();
    let lease: Lease = api
        .post("/lease", &[("db", "l"), ("duration", "600000")], vec![])
        .ok()
        .json();
    assert!(lease.expires_at > time::OffsetDateTime::now_utc());
    let raw = api.post("/lease", &[("db", "other")], vec![]).ok().text();
    assert!(
        raw.contains("\"expires_at\":\"") && raw.contains("\"id\":\""),
        "{raw}"
    );
    assert_eq!(
        api.pos("l"),
        Some(Pos::ZERO),
        "a lease creates the database at the zero pos"
    );
    api.post("/lease", &[("db", "l")], vec![])
        .err(409, "ELEASEEXISTS");
    let refreshed: Lease = api
        .post(
            "/lease",
            &[("db", "l"), ("id", &lease.id), ("duration", "600000")],
            vec![],
        )
        .ok()
        .json();
    assert_eq!(refreshed.id, lease.id);
    // A held refresh answers after the hold with the same lease; bad holds are refused.
    let held: Lease = api
        .post(
            "/lease",
            &[
                ("db", "l"),
                ("id", &lease.id),
                ("duration", "600000"),
                ("hold", "50"),
            ],
            vec![],
        )
        .ok()
        .json();
    assert_eq!(held.id, lease.id);
    for bad in ["0", "x", "30001", "600000"] {
        let q = [
            ("db", "l"),
            ("id", lease.id.as_str()),
            ("duration", "600000"),
            ("hold", bad),
        ];
        let e = api.post("/lease", &q, vec![]).err(400, "EBADINPUT");
        assert!(e.error.contains("invalid hold"), "{bad}: {}", e.error);
    }
    api.post("/lease", &[("db", "l"), ("id", "someone-else")], vec![])
        .err(422, "ELEASEMISMATCH");
    api.delete("/lease", &[("db", "l"), ("id", "someone-else")])
        .err(422, "ELEASEMISMATCH");
    // Transactions: the live lease, a wrong lease, no lease header.
    let m = Model::new(512);
    let (bytes, next) = m.tx(1, &[(1, page(512, 1))]);
    let with = |id: &str| {
        api.send(
            api.req(reqwest::Method::POST, "/db/tx", &[("db", "l")])
                .header("Lfsc-Lease-Id", id)
                .body(bytes.clone()),
        )
    };
    with("someone-else").err(422, "ELEASEMISMATCH");
    api.tx("l", bytes.clone()).err(409, "ELEASEEXISTS");
    with(&lease.id).ok();
    assert_eq!(api.pos("l"), Some(next.pos));
    api.delete("/lease", &[("db", "l"), ("id", &lease.id)]).ok();
    api.delete("/lease", &[("db", "l"), ("id", &lease.id)])
        .err(404, "ENOLEASE");
    api.post("/lease", &[("db", "l"), ("id", &lease.id)], vec![])
        .err(404, "ENOLEASE");
    let (b2, _) = next.tx(1, &[(1, page(512, 2))]);
    api.send(
        api.req(reqwest::Method::POST, "/db/tx", &[("db", "l")])
            .header("Lfsc-Lease-Id", &lease.id)
            .body(b2.clone()),
    )
    .err(404, "ENOLEASE");
    api.tx("l", b2).ok();
    // Expiry frees the database; bounds on duration. With --store, another client may take
    // an expired lease only after the clock-skew margin too (--max-clock-skew, 500 ms).
    let short: Lease = api
        .post("/lease", &[("db", "e"), ("duration", "100")], vec![])
        .ok()
        .json();
    std::thread::sleep(Duration::from_millis(700));
    api.post("/lease", &[("db", "e"), ("id", &short.id)], vec![])
        .err(404, "ENOLEASE");
    api.post("/lease", &[("db", "e")], vec![]).ok();
    for bad in ["99", "600001", "x", "-5"] {
        api.post("/lease", &[("db", "f"), ("duration", bad)], vec![])
            .err(400, "EBADINPUT");
    }
    api.delete("/lease", &[("db", "f")]).err(400, "EBADINPUT");
}

/// Runs `f` on `n` threads released together; returns the statuses.
fn race(n: usize, f: impl Fn(usize) -> u16 + Send + Sync + 'static) -> Vec<u16> {
    let barrier = Arc::new(Barrier::new(n));
    let f = Arc::new(f);
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (b, f) = (barrier.clone(), f.clone());
            std::thread::spawn(move || {
                b.wait();
                f(i)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn lease_race_has_one_winner() {
    let s = Server::start(&[]);
    let api = s.api();
    for round in 0..3 {
        let db = format!("race{round}");
        let a = api.clone();
        let statuses = race(16, move |_| {
            a.post("/lease", &[("db", &db), ("duration", "600000")], vec![])
                .status
        });
        assert_eq!(
            statuses.iter().filter(|s| **s == 200).count(),
            1,
            "{statuses:?}"
        );
        assert!(
            statuses.iter().all(|s| *s == 200 || *s == 409),
            "{statuses:?}"
        );
    }
}

fn tx_race_at_one_position_has_one_winner() {
    let s = Server::start(&[]);
    let api = s.api();
    let mut m = Model::new(512);
    m.commit(&api, "r", 2, &[(1, page(512, 1)), (2, page(512, 2))]);
    for round in 0..3u8 {
        let files: Vec<(Vec<u8>, Model)> = (0..16u8)
            .map(|i| m.tx(2, &[(2, page(512, 100 + i + round))]))
            .collect();
        let bodies: Vec<Vec<u8>> = files.iter().map(|(b, _)| b.clone()).collect();
        let a = api.clone();
        let statuses = race(16, move |i| a.tx("r", bodies[i].clone()).status);
        let winners: Vec<usize> = (0..16).filter(|i| statuses[*i] == 200).collect();
        assert_eq!(winners.len(), 1, "{statuses:?}");
        assert!(
            statuses.iter().all(|s| *s == 200 || *s == 409),
            "{statuses:?}"
        );
        m = files[winners[0]].1.clone();
        assert_eq!(api.pos("r"), Some(m.pos));
        assert_eq!(api.snapshot("r").pages[1].1, m.pages[&2]);
    }
}

fn snapshots_at_positions_and_restore() {
    let s = Server::start(&[]);
    let api = s.api();
    let mut m = Model::new(512);
    let mut history = Vec::new();
    for i in 1..=4u8 {
        let mut changes = vec![(1, page(512, 10 + i))];
        if i > 1 {
            changes.push((u32::from(i), page(512, i)));
        }
        m.commit(&api, "h", u32::from(i), &changes);
        history.push(m.clone());
    }
    let at = |txid: &str| api.get("/db/snapshot", &[("db", "h"), ("txid", txid)]);
    let snap = ltx::decode(&at("0000000000000002").ok().body).unwrap();
    assert_eq!((snap.header.max_txid, snap.header.commit), (2, 2));
    assert_eq!(snap.trailer.post_apply_checksum, history[1].pos.checksum.0);
    at("0000000000000009").err(404, "ENOTXID");
    at("2").err(400, "EBADINPUT");
    let sqlite = api
        .get("/db/snapshot", &[("db", "h"), ("format", "sqlite")])
        .ok();
    assert_eq!(sqlite.body, m.image());
    assert_eq!(sqlite.header("Litevfs-Pos"), Some(m.pos.to_string()));
    // Restore to TXID 2: a new transaction 5 with TXID 2's content.
    let r: TxidResponse = api
        .post(
            "/db/restore",
            &[("db", "h"), ("txid", "0000000000000002")],
            vec![],
        )
        .ok()
        .json();
    assert_eq!(r.txid.0, 5);
    let restored = api.snapshot("h");
    assert_eq!(restored.header.max_txid, 5);
    assert_eq!(
        restored.trailer.post_apply_checksum,
        history[1].pos.checksum.0
    );
    let page_now: Changes = db_sync(&api, "h", Some(m.pos), None);
    assert_eq!(
        page_now.pgnos,
        Some(vec![1, 3, 4]),
        "changed and truncated pages listed"
    );
    let head: TxidResponse = api
        .post(
            "/db/restore",
            &[("db", "h"), ("txid", "0000000000000005")],
            vec![],
        )
        .ok()
        .json();
    assert_eq!(head.txid.0, 5);
    api.post(
        "/db/restore",
        &[("db", "h"), ("txid", "0000000000000006")],
        vec![],
    )
    .err(404, "ENOTXID");
    api.post("/db/restore", &[("db", "h")], vec![])
        .err(400, "EBADINPUT");
    let both = [
        ("db", "h"),
        ("txid", "0000000000000001"),
        ("timestamp", "2024-01-01T00:00:00Z"),
    ];
    api.post("/db/restore", &both, vec![]).err(400, "EBADINPUT");
    api.post(
        "/db/restore",
        &[("db", "h"), ("timestamp", "yesterday")],
        vec![],
    )
    .err(400, "EBADINPUT");
    api.post(
        "/db/restore",
        &[("db", "h"), ("timestamp", "2001-01-01T00:00:00Z")],
        vec![],
    )
    .err(404, "ENOTIMESTAMP");
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let same: TxidResponse = api
        .post("/db/restore", &[("db", "h"), ("timestamp", &now)], vec![])
        .ok()
        .json();
    assert_eq!(same.txid.0, 5);
    api.post(
        "/db/restore",
        &[("db", "zz"), ("txid", "0000000000000001")],
        vec![],
    )
    .err(404, "ENODB");
    // A database with a lease but no data has no snapshot.
    api.post("/lease", &[("db", "empty")], vec![]).ok();
    api.get("/db/snapshot", &[("db", "empty")])
        .err(404, "ENOTXID");
    // Delete.
    api.delete("/db", &[("db", "h")]).ok();
    assert_eq!(api.pos("h"), None);
    api.delete("/db", &[("db", "h")]).err(404, "ENODB");
    api.get("/db/snapshot", &[("db", "h")]).err(404, "ENODB");
}

fn sqlite3(args: &[&str]) -> String {
    let out = std::process::Command::new("sqlite3")
        .args(args)
        .output()
        .expect("sqlite3 shell");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn upload_round_trip_is_byte_identical() {
    let s = Server::start(&[]);
    let api = s.api();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.db");
    {
        let conn = rusqlite::Connection::open(&src).unwrap();
        conn.execute_batch(
            "PRAGMA page_size=1024; CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
             CREATE INDEX t_v ON t(v);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 2000)
             INSERT INTO t(v) SELECT printf('row %d %s', i, hex(randomblob(20))) FROM n;",
        )
        .unwrap();
    }
    let bytes = std::fs::read(&src).unwrap();
    let r: TxidResponse = api
        .post("/db/upload", &[("db", "up")], bytes.clone())
        .ok()
        .json();
    assert_eq!(r.txid.0, 1);
    let out = api
        .get("/db/snapshot", &[("db", "up"), ("format", "sqlite")])
        .ok()
        .body;
    assert_eq!(out.len(), bytes.len());
    assert!(out == bytes, "exported file differs from the upload");
    let dst = dir.path().join("dst.db");
    std::fs::write(&dst, &out).unwrap();
    assert_eq!(
        sqlite3(&[dst.to_str().unwrap(), "PRAGMA integrity_check"]),
        "ok"
    );
    assert_eq!(
        sqlite3(&[dst.to_str().unwrap(), "SELECT count(*) FROM t"]),
        "2000"
    );
    // The LTX snapshot verifies, pages are readable at the new position, re-upload appends.
    let snap = api.snapshot("up");
    assert_eq!(snap.header.page_size, 1024);
    let pos = api.pos("up").unwrap();
    let first: litevfs::wire::PagesResponse = api
        .get(
            "/db/page",
            &[("db", "up"), ("pos", &pos.to_string()), ("pgno", "1")],
        )
        .ok()
        .json();
    assert_eq!(first.pages[0].data, bytes[..1024]);
    let again: TxidResponse = api
        .post("/db/upload", &[("db", "up")], bytes.clone())
        .ok()
        .json();
    assert_eq!(again.txid.0, 2);
    assert_eq!(
        db_sync(&api, "up", Some(pos), None).pgnos,
        Some(vec![]),
        "identical pages not rewritten"
    );
    // Garbage and page size mismatch.
    api.post("/db/upload", &[("db", "up")], b"hello".to_vec())
        .err(422, "EBADHEADER");
    api.post("/db/upload", &[("db", "bad")], vec![0; 4096])
        .err(422, "EBADHEADER");
    let mut odd = bytes.clone();
    odd.truncate(bytes.len() - 10);
    api.post("/db/upload", &[("db", "up")], odd)
        .err(422, "EBADHEADER");
    let mut other = vec![0u8; 4096];
    other[..100].copy_from_slice(&bytes[..100]);
    other[16..18].copy_from_slice(&4096u16.to_be_bytes());
    api.post("/db/upload", &[("db", "up")], other)
        .err(422, "EBADHEADER");
    assert_eq!(api.pos("up").unwrap().txid.0, 2);
}

fn upload_of_large_file_is_spooled() {
    let s = Server::start(&[]);
    let api = s.api();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("big.db");
    let p = src.to_str().unwrap();
    sqlite3(&[
        p,
        "CREATE TABLE b(x BLOB); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 3000) INSERT INTO b SELECT randomblob(4000) FROM n;",
    ]);
    let bytes = std::fs::read(&src).unwrap();
    assert!(bytes.len() > 9 << 20);
    api.post("/db/upload", &[("db", "big")], bytes.clone()).ok();
    let out = api
        .get("/db/snapshot", &[("db", "big"), ("format", "sqlite")])
        .ok()
        .body;
    assert!(out == bytes);
}

fn metric(api: &Api, name: &str) -> u64 {
    let text = api.get("/metrics", &[]).ok().text();
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.parse().unwrap())
        .unwrap()
}

fn retention_compacts_history() {
    let s = Server::start(&["--retention", "1s"]);
    let api = s.api();
    let mut m = Model::new(512);
    m.commit(
        &api,
        "g",
        4,
        &(1..=4).map(|p| (p, page(512, p as u8))).collect::<Vec<_>>(),
    );
    let first = m.pos;
    for i in 0..150u32 {
        m.commit(
            &api,
            "g",
            4,
            &[
                (1 + i % 2, page(512, (i % 250) as u8)),
                (3, page(512, i as u8 ^ 0x55)),
            ],
        );
    }
    assert!(metric(&api, "litevfs_commit_pages_total") >= 300);
    // Passes run every retention/2 = 500 ms; the fourth pass from now starts more than the
    // retention after the last commit, so it compacts everything but the current image.
    let passes = metric(&api, "litevfs_compactions_total");
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&api, "litevfs_compactions_total") < passes + 4 {
        assert!(Instant::now() < deadline, "compaction does not run");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        metric(&api, "litevfs_page_versions"),
        4,
        "one version per page left"
    );
    assert!(metric(&api, "litevfs_compacted_page_versions_total") >= 300);
    let e = api
        .get(
            "/db/page",
            &[("db", "g"), ("pos", &first.to_string()), ("pgno", "1")],
        )
        .err(409, "EPOSMISMATCH");
    assert_eq!(e.pos, Some(m.pos));
    assert!(db_sync(&api, "g", Some(first), None).drops_all());
    let snap = api.snapshot("g");
    assert_eq!(snap.trailer.post_apply_checksum, m.checksum());
    let pages: litevfs::wire::PagesResponse = api
        .get(
            "/db/page",
            &[
                ("db", "g"),
                ("pos", &m.pos.to_string()),
                ("pgno", "1,2,3,4"),
            ],
        )
        .ok()
        .json();
    for p in pages.pages {
        assert_eq!(p.data, m.pages[&p.pgno]);
    }
    // Restoring to a compacted position is refused; writing continues normally.
    api.post(
        "/db/restore",
        &[("db", "g"), ("txid", &first.txid.to_string())],
        vec![],
    )
    .err(404, "ENOTXID");
    m.commit(&api, "g", 2, &[(1, page(512, 1))]);
}

/// Polls `cond` until it holds (true) or a generous deadline passes (false). Not a timing
/// assertion: it only bounds how long a broken server can hang the test.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Whether a TRUNCATE checkpoint of the store can run now, i.e. no read transaction is open.
fn store_checkpoints(dir: &std::path::Path) -> bool {
    let conn = rusqlite::Connection::open(dir.join("store.db")).unwrap();
    conn.busy_timeout(Duration::ZERO).unwrap();
    let busy: i64 = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
        .unwrap_or(1);
    busy == 0
}

/// A snapshot reader that stops reading (a frozen Lambda, a hung consumer) must not keep its
/// read transaction, and so the whole write-ahead log, pinned forever: after the stall timeout
/// the transfer is aborted and the store can checkpoint again.
#[test]
fn stalled_snapshot_reader_is_dropped() {
    use std::io::{Read, Write};
    let s = Server::start(&["--stall-timeout", "1s"]);
    let api = s.api();
    api.post("/db/upload", &[("db", "big")], fake_sqlite(10_000))
        .ok();
    let addr = s.base.strip_prefix("http://").unwrap();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    write!(
        sock,
        "GET /db/snapshot?db=big&format=sqlite HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .unwrap();
    // Read the status line, so the snapshot has started, then never read again.
    let mut first = [0u8; 12];
    sock.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    // A commit after the snapshot began: the log can only be checkpointed past it once the
    // snapshot's read transaction is over.
    let mut next = fake_sqlite(10_000);
    next[8192] ^= 1;
    api.post("/db/upload", &[("db", "big")], next).ok();
    assert!(
        eventually(|| store_checkpoints(&s.dir)),
        "a stalled snapshot reader pins the store's read transaction"
    );
    api.get("/healthz", &[]).ok();
    drop(sock);
}

/// A client that starts a body and never finishes it gets an error instead of holding the
/// connection (and up to 8 MiB of buffered body) forever.
#[test]
fn stalled_request_body_is_refused() {
    use std::io::{Read, Write};
    let s = Server::start(&["--stall-timeout", "1s"]);
    let addr = s.base.strip_prefix("http://").unwrap();
    for path in ["/db/tx?db=x", "/db/upload?db=x", "/sync"] {
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            sock,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789"
        )
        .unwrap();
        let mut reply = Vec::new();
        let _ = sock.read_to_end(&mut reply);
        let reply = String::from_utf8_lossy(&reply);
        assert!(
            reply.starts_with("HTTP/1.1 400") && reply.contains("EBADINPUT"),
            "{path}: {reply:?}"
        );
        // Answered as the stall timeout ends, not after another wait to drain the body.
        assert!(reply.contains("connection: close"), "{path}: {reply:?}");
    }
    assert!(s.api().positions().is_empty());
}

/// Reads one HTTP reply head (and what came with it) from a raw socket.
fn raw_exchange(addr: &str, request: &str) -> String {
    use std::io::{Read, Write};
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    sock.write_all(request.as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        match sock.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// A body declared larger than --max-body-size, from a client waiting for `100 Continue`, is
/// refused at once: the client is never asked to send it. An upload (a whole database) is not
/// subject to that limit, only to the room the server has: one larger than its free disk space
/// is refused the same way.
#[test]
fn oversized_body_is_refused_before_100_continue() {
    let s = Server::start(&["--max-body-size", "1MiB"]);
    let addr = s.base.strip_prefix("http://").unwrap();
    for (path, len) in [
        ("/db/tx?db=x", 2_000_000u64),
        ("/sync", 2_000_000),
        ("/db/upload?db=x", 1 << 62),
    ] {
        let reply = raw_exchange(
            addr,
            &format!(
                "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\
                 Expect: 100-continue\r\n\r\n"
            ),
        );
        assert!(
            reply.starts_with("HTTP/1.1 413") && reply.contains("ETOOLARGE"),
            "{path}: {reply:?}"
        );
    }
    let reply = raw_exchange(
        addr,
        "POST /db/upload?db=x HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\n\
         Expect: 100-continue\r\n\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 100"), "{reply:?}");
    assert!(s.api().positions().is_empty());
}

/// Ambiguous requests: a body with both Content-Length and chunked encoding is read by its
/// chunks and the connection closed after one reply, so nothing is smuggled behind it; a query
/// parameter given twice is refused (which of the two a server would use is a guess).
#[test]
fn ambiguous_requests_are_refused() {
    use std::io::{Read, Write};
    let s = Server::start(&[]);
    let addr = s.base.strip_prefix("http://").unwrap();
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // By Content-Length the body is "0\r\n\r\n" and a DELETE follows; by chunks the body is
    // empty and "DELETE ..." would be a second request. Neither may run.
    write!(
        sock,
        "POST /lease?db=x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\
         Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
         DELETE /db?db=x HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .unwrap();
    let mut reply = Vec::new();
    sock.read_to_end(&mut reply).expect("closed by the server");
    let reply = String::from_utf8_lossy(&reply);
    assert_eq!(reply.matches("HTTP/1.1 ").count(), 1, "{reply:?}");
    assert!(reply.contains("connection: close"), "{reply:?}");
    assert!(
        s.api().positions().contains_key("x"),
        "the DELETE did not run"
    );
    let api = s.api();
    for q in [
        &[("db", "a"), ("db", "../x"), ("pgno", "1")][..],
        &[
            ("db", "a"),
            ("pgno", "1"),
            ("pos", "0000000000000001/0000000000000000"),
            ("pos", "x"),
        ],
        &[
            ("db", "a"),
            ("cluster", "c"),
            ("cluster", "d"),
            ("pgno", "1"),
        ],
    ] {
        let e = api.get("/db/page", q).err(400, "EBADINPUT");
        assert!(e.error.contains("more than once"), "{q:?}: {}", e.error);
    }
    let e = api
        .send(api.req(reqwest::Method::POST, "/lease", &[("db", "a"), ("db", "b")]))
        .err(400, "EBADINPUT");
    assert!(e.error.contains("\"db\""), "{}", e.error);
    assert_eq!(api.positions().keys().collect::<Vec<_>>(), ["x"]);
}

/// A client that opens connections and never finishes a request head (slowloris), or leaves
/// them idle, is disconnected after --header-timeout; healthy clients are served meanwhile.
#[test]
fn connections_without_a_request_head_are_closed() {
    use std::io::{Read, Write};
    let s = Server::start(&["--header-timeout", "1s"]);
    let addr = s.base.strip_prefix("http://").unwrap();
    let mut idle = std::net::TcpStream::connect(addr).unwrap();
    let mut partial = std::net::TcpStream::connect(addr).unwrap();
    write!(partial, "GET /pos HTTP/1.1\r\nHost: x\r\n").unwrap();
    assert!(
        s.api().positions().is_empty(),
        "others are served meanwhile"
    );
    for sock in [&mut idle, &mut partial] {
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut buf = Vec::new();
        // The server closes the connection (EOF) instead of waiting forever.
        let n = sock
            .read_to_end(&mut buf)
            .expect("closed by the server, not timed out");
        let reply = String::from_utf8_lossy(&buf[..n]);
        assert!(
            reply.is_empty() || reply.starts_with("HTTP/1.1 408"),
            "{reply:?}"
        );
    }
}

/// A SQLite file cut short (its valid header counts more pages than it has) is corrupt: SQLite
/// refuses it. The upload must refuse it too instead of storing a database nobody can open.
fn upload_of_truncated_sqlite_file_is_refused() {
    let s = Server::start(&[]);
    let api = s.api();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.db");
    let p = src.to_str().unwrap();
    sqlite3(&[
        p,
        "PRAGMA page_size=1024; CREATE TABLE t(x); WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 200) INSERT INTO t SELECT randomblob(500) FROM n;",
    ]);
    let bytes = std::fs::read(&src).unwrap();
    let pages = u32::from_be_bytes(bytes[28..32].try_into().unwrap());
    assert_eq!(pages as usize * 1024, bytes.len());
    let cut = bytes[..(pages as usize / 2) * 1024].to_vec();
    let half = dir.path().join("half.db");
    std::fs::write(&half, &cut).unwrap();
    let check = std::process::Command::new("sqlite3")
        .args([half.to_str().unwrap(), "PRAGMA integrity_check"])
        .output()
        .expect("sqlite3 shell");
    assert!(
        !check.status.success() || String::from_utf8_lossy(&check.stdout).trim() != "ok",
        "sqlite itself refuses the cut file"
    );
    let e = api.post("/db/upload", &[("db", "cut")], cut.clone());
    e.err(422, "EBADHEADER");
    assert_eq!(api.pos("cut"), None, "a refused upload changes nothing");
    // On an existing database too, and the whole file is still accepted afterwards.
    api.post("/db/upload", &[("db", "cut")], bytes.clone()).ok();
    let before = api.pos("cut");
    api.post("/db/upload", &[("db", "cut")], cut)
        .err(422, "EBADHEADER");
    assert_eq!(api.pos("cut"), before);
}

/// One large transaction (a big commit, a compaction) grows the write-ahead log to its size;
/// later transactions must bring it back down instead of keeping that much disk forever.
#[test]
fn write_ahead_log_shrinks_after_a_large_transaction() {
    let s = Server::start(&[]);
    let api = s.api();
    // 24.6 MB of pages in one LTX file (an upload no longer goes through the log).
    let mut big = Model::new(4096);
    let pages: Vec<(u32, Vec<u8>)> = (1..=6_000u32)
        .map(|p| (p, fake_sqlite(1).iter().map(|b| b ^ p as u8).collect()))
        .collect();
    big.commit(&api, "big", 6_000, &pages);
    let wal = s.dir.join("store.db-wal");
    let size = || std::fs::metadata(&wal).map_or(0, |m| m.len());
    assert!(size() > 20 << 20, "the commit went through the log");
    let mut m = Model::new(512);
    let mut i = 0u8;
    let shrunk = eventually(|| {
        i = i.wrapping_add(1);
        m.commit(&api, "small", 1, &[(1, page(512, i))]);
        size() <= 16 << 20
    });
    assert!(shrunk, "the log keeps {} bytes", size());
    // And the store holds the data in about its size (32 KiB store pages fit seven 4 KiB page
    // versions; 8 KiB ones held one each, twice the data). The log was checkpointed into
    // store.db before it was cut, so store.db has it all.
    let data = 6_000u64 * 4096;
    let stored = std::fs::metadata(s.dir.join("store.db")).unwrap().len();
    assert!(
        stored < data * 5 / 4,
        "{stored} bytes on disk for {data} bytes of pages"
    );
}

/// The object files of a local store: (file name, length, bytes allocated on disk).
fn object_files(dir: &std::path::Path) -> Vec<(String, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let mut out: Vec<_> = std::fs::read_dir(dir.join("objects"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (
                e.file_name().into_string().unwrap(),
                m.len(),
                m.blocks() * 512,
            )
        })
        .collect();
    out.sort();
    out
}

/// An image whose pages differ from `fake_sqlite(n)`'s where `changed` says so (page 1 past
/// its header).
fn edited(n: u32, changed: impl Fn(u32) -> bool, salt: u8) -> Vec<u8> {
    let mut img = fake_sqlite(n);
    for p in 1..=n {
        if changed(p) {
            let at = (p as usize - 1) * 4096 + if p == 1 { 100 } else { 0 };
            let end = p as usize * 4096;
            img[at..end].iter_mut().for_each(|b| *b ^= salt);
        }
    }
    img
}

/// Local store: a whole-database upload over the memory limit keeps its pages in the file it
/// was received into (written once); `store.db` gets only index rows. Pages equal to their
/// previous version, and versions retention drops, are punched out of the file; a file no
/// version needs any more is removed, as are the files of a deleted database.
#[test]
fn uploads_keep_their_pages_in_object_files_and_give_space_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let flags = ["--retention", "200ms", "--compaction-interval", "100ms"];
    let s = Server::start_in(&dir, &flags);
    let api = s.api();
    let n = 6_000u32;
    let size = u64::from(n) * 4096;
    let first = fake_sqlite(n);
    api.post("/db/upload", &[("db", "big")], first.clone()).ok();
    let files = object_files(&s.dir);
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(files[0].1, size);
    let index = std::fs::metadata(s.dir.join("store.db")).unwrap().len()
        + std::fs::metadata(s.dir.join("store.db-wal")).map_or(0, |m| m.len());
    assert!(
        index < size / 4,
        "store.db and its log hold {index} bytes for {size} bytes of pages in a file"
    );
    let snap = |db: &str| {
        api.get("/db/snapshot", &[("db", db), ("format", "sqlite")])
            .ok()
            .body
    };
    assert!(snap("big") == first);
    let p = api
        .get("/db/page", &[("db", "big"), ("pgno", "3000,3001,3002")])
        .ok();
    assert_eq!(p.status, 200);
    // A refused upload (not a SQLite file) leaves no file behind.
    api.post("/db/upload", &[("db", "big")], vec![7u8; 9 << 20])
        .err(422, "EBADHEADER");
    assert_eq!(object_files(&s.dir).len(), 1);
    // The same file again stores nothing, and keeps no file.
    let before = api.pos("big");
    api.post("/db/upload", &[("db", "big")], first.clone()).ok();
    assert_ne!(api.pos("big"), before, "a new position all the same");
    assert_eq!(object_files(&s.dir).len(), 1);
    // Ten pages changed: a second file, all but those ten pages punched out of it, and the
    // ten versions they replace punched out of the first once retention drops them.
    let second = edited(n, |p| p % 600 == 0, 0x5a);
    api.post("/db/upload", &[("db", "big")], second.clone())
        .ok();
    assert!(snap("big") == second);
    let punched = eventually(|| {
        let f = object_files(&s.dir);
        f.len() == 2
            && f.iter()
                .any(|(_, len, used)| *len == size && *used < 1 << 20)
    });
    assert!(punched, "{:?}", object_files(&s.dir));
    assert!(snap("big") == second);
    // Every page changed: once retention drops the older versions, the first two files hold
    // nothing any position needs and are removed.
    let third = edited(n, |_| true, 0xa5);
    api.post("/db/upload", &[("db", "big")], third.clone()).ok();
    let removed = eventually(|| object_files(&s.dir).len() == 1);
    assert!(removed, "{:?}", object_files(&s.dir));
    assert!(snap("big") == third);
    // A small commit on top compares against, and leaves, the pages in the file.
    let mut m = Model::new(4096);
    m.pos = api.pos("big").unwrap();
    m.commit = n;
    m.pages = (1..=n)
        .map(|p| {
            (
                p,
                third[(p as usize - 1) * 4096..p as usize * 4096].to_vec(),
            )
        })
        .collect();
    let mut p2 = third[4096..8192].to_vec();
    p2[100] ^= 1;
    m.commit(&api, "big", n, &[(2, p2.clone())]);
    let mut fourth = third.clone();
    fourth[4096..8192].copy_from_slice(&p2);
    assert!(snap("big") == fourth);
    // A restart keeps the file and serves the same bytes; leftovers of a crash are removed.
    drop(api);
    s.kill9();
    std::fs::write(dir.join("objects/in-0123456789abcdef"), b"cut short").unwrap();
    std::fs::write(dir.join("objects/999-0123456789abcdef"), b"never committed").unwrap();
    let s = Server::start_in(&dir, &flags);
    let api = s.api();
    assert_eq!(object_files(&dir).len(), 1, "{:?}", object_files(&dir));
    assert!(
        api.get("/db/snapshot", &[("db", "big"), ("format", "sqlite")])
            .ok()
            .body
            == fourth
    );
    // A deleted database's files go with it.
    api.delete("/db", &[("db", "big")]).ok();
    assert!(eventually(|| object_files(&dir).is_empty()));
}

/// A page whose bytes in an object file were damaged is never served: the read fails with
/// the page named.
#[test]
fn a_damaged_object_file_fails_reads_instead_of_serving_bad_pages() {
    use std::os::unix::fs::FileExt;
    let s = Server::start(&[]);
    let api = s.api();
    api.post("/db/upload", &[("db", "d")], fake_sqlite(3_000))
        .ok();
    let files = object_files(&s.dir);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(s.dir.join("objects").join(&files[0].0))
        .unwrap();
    f.write_all_at(b"garbage", 1999 * 4096 + 10).unwrap();
    let r = api.get("/db/page", &[("db", "d"), ("pgno", "2000")]);
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.text().contains("page 2000"), "{}", r.text());
    api.get("/db/page", &[("db", "d"), ("pgno", "1999")]).ok();
}

// Every test above that is not a `#[test]` itself runs once per backend: local store.db,
// `--store file://`, `--store s3://` on moto. Timeouts of the HTTP layer and the size of store.db's log are tested on the local store only.
on_every_backend!(
    retention_compacts_history,
    sync_reports_changes,
    long_poll_wakes_on_commit_and_times_out_quietly,
    lease_lifecycle,
    lease_race_has_one_winner,
    tx_race_at_one_position_has_one_winner,
    snapshots_at_positions_and_restore,
    upload_round_trip_is_byte_identical,
    upload_of_large_file_is_spooled,
    upload_of_truncated_sqlite_file_is_refused,
);
