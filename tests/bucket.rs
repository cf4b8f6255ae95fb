//! `litevfs serve --store`: what only object storage adds. The bucket is the source of truth
//! (an empty data directory serves everything), several servers share one bucket (leases,
//! racing commits, long-poll readers), compaction bounds what a reader opens, retention
//! deletes, and faults of the bucket lose nothing. Each test runs on `file://` and on `s3://`
//! (moto, started by the tests on loopback); the API conformance suites run on every backend in
//! their own files.

#[macro_use]
mod server_support;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use litevfs::wire::{Changes, Lease, Pos};
use server_support::{Api, Backend, Model, Server, backend, bucket_objects, page};

/// Waits up to `secs` for `cond`.
fn eventually(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cond()
}

/// A commit of `n` changed pages, some new bytes in each.
fn changes(m: &Model, n: u32, salt: u32) -> (u32, Vec<(u32, Vec<u8>)>) {
    let size = m.commit.max(n).max(4);
    let pages: Vec<(u32, Vec<u8>)> = (0..n)
        .map(|i| {
            let p = 1 + (salt * 7 + i * 3) % size;
            (p, page(m.page_size, (salt * 31 + i) as u8))
        })
        .collect::<BTreeMap<_, _>>()
        .into_iter()
        .collect();
    let grown: Vec<(u32, Vec<u8>)> = (m.commit + 1..=size)
        .map(|p| (p, page(m.page_size, p as u8)))
        .collect();
    let mut all: BTreeMap<u32, Vec<u8>> = grown.into_iter().collect();
    all.extend(pages);
    (size, all.into_iter().collect())
}

/// Every page of `m` at its position, read through `api`, equals the model.
fn assert_pages(api: &Api, db: &str, m: &Model) {
    let list = (1..=m.commit)
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    if m.commit == 0 {
        return;
    }
    let r: litevfs::wire::PagesResponse = api
        .get(
            "/db/page",
            &[("db", db), ("pos", &m.pos.to_string()), ("pgno", &list)],
        )
        .ok()
        .json();
    // Hints may be left out; whatever is served must be right, and the first page always is.
    assert_eq!(r.pages.first().map(|p| p.pgno), Some(1));
    for p in r.pages {
        assert_eq!(p.data, m.pages[&p.pgno], "page {} at {}", p.pgno, m.pos);
    }
    for pgno in 1..=m.commit {
        let r: litevfs::wire::PagesResponse = api
            .get(
                "/db/page",
                &[
                    ("db", db),
                    ("pos", &m.pos.to_string()),
                    ("pgno", &pgno.to_string()),
                ],
            )
            .ok()
            .json();
        assert_eq!(r.pages[0].data, m.pages[&pgno], "page {pgno} at {}", m.pos);
    }
}

/// Deleting the data directory loses nothing: a server started on an empty one serves every
/// database at its latest position, with its retained history, snapshots and change sets.
fn an_empty_data_dir_serves_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = Server::start_in(&data, &[]);
    let api = s.api();
    let mut m = Model::new(4096);
    let mut history = Vec::new();
    for i in 0..12 {
        let (size, ch) = changes(&m, 3, i);
        m.commit(&api, "h", size, &ch);
        history.push(m.clone());
    }
    // One commit too large for a single conditional PUT (a body plus a pointer).
    let big: Vec<(u32, Vec<u8>)> = (1..=2600)
        .map(|p| (p, page(4096, p as u8 ^ 0x5a)))
        .collect();
    m.commit(&api, "h", 2600, &big);
    history.push(m.clone());
    let mut small = Model::new(512);
    small.commit(&api, "other", 2, &[(1, page(512, 1)), (2, page(512, 2))]);
    let snap = api.snapshot("h");
    s.kill9();
    std::fs::remove_dir_all(&data).unwrap();
    let s = Server::start_in(&data, &[]);
    let api = s.api();
    assert_eq!(api.pos("h"), Some(m.pos));
    assert_eq!(api.pos("other"), Some(small.pos));
    assert_eq!(api.snapshot("h"), snap);
    for old in history.iter().step_by(3).chain(std::iter::once(&m)) {
        assert_pages(&api, "h", old);
    }
    let c: Changes = api
        .get(
            "/db/sync",
            &[("db", "h"), ("pos", &history[0].pos.to_string())],
        )
        .ok()
        .json();
    assert_eq!(c.all, Some(false), "history after a restart is precise");
    // Writing goes on from where the bucket is.
    let (size, ch) = changes(&m, 2, 99);
    m.commit(&api, "h", size, &ch);
    assert_eq!(api.pos("h"), Some(m.pos));
}

/// Compaction merges commit objects, so a server that knows nothing reads a bounded number of
/// objects to open a database with hundreds of commits, and still serves every retained
/// position exactly.
fn compaction_bounds_what_a_reader_opens() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("a");
    let a = Server::start_in(
        &data,
        &["--retention", "1h", "--compaction-interval", "100ms"],
    );
    let api = a.api();
    let mut m = Model::new(512);
    let mut history = Vec::new();
    // Bursts of commits, each merged into a level-1 segment before the next: nine of them make
    // eight level-1 segments merge into a level-2 one.
    const BURSTS: u32 = 12;
    const PER_BURST: u32 = 10;
    for burst in 0..BURSTS {
        for i in 0..PER_BURST {
            let (size, ch) = changes(&m, 2, burst * PER_BURST + i);
            m.commit(&api, "c", size, &ch);
            history.push(m.clone());
        }
        let want = u64::from(burst) + 1;
        assert!(
            eventually(60, || api.metric("litevfs_bucket_segments_written_total")
                >= want),
            "compaction merges burst {burst}"
        );
    }
    let manifest = server_support::bucket_object(&data, "litevfs/v1/c/default/c/manifest");
    let manifest: serde_json::Value = serde_json::from_slice(&manifest.unwrap()).unwrap();
    let levels: Vec<u64> = manifest["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["level"].as_u64().unwrap())
        .collect();
    assert!(
        levels.contains(&2),
        "eight level-1 segments became one of level 2: {levels:?}"
    );
    let b = Server::start_with_bucket_of(&tmp.path().join("b"), &data, &[]);
    let before = b.api().bucket_gets();
    let r: litevfs::wire::PagesResponse = b
        .api()
        .get("/db/page", &[("db", "c"), ("pgno", "1")])
        .ok()
        .json();
    assert_eq!(r.pages[0].data, m.pages[&1]);
    let opened = b.api().bucket_gets() - before;
    // The manifest, the base, at most 7 segments per level (3 levels), at most 7 commit
    // objects, and one probe past the head: far fewer than one per commit.
    let commits = u64::from(BURSTS * PER_BURST);
    assert!(opened <= 1 + 1 + 3 * 7 + 7 + 1, "{opened} GETs to open");
    assert!(
        opened < commits / 4,
        "{opened} GETs to open {commits} commits"
    );
    for old in history.iter().step_by(17).chain(std::iter::once(&m)) {
        assert_pages(&b.api(), "c", old);
    }
}

/// Superseded objects are deleted after the retention and the grace; a deleted database's
/// objects go too (its tombstone manifest and lease stay).
fn retention_deletes_superseded_objects() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let s = Server::start_in(&data, &["--retention", "1s", "--gc-grace", "30s"]);
    let api = s.api();
    let mut m = Model::new(512);
    for i in 0..40 {
        let (size, ch) = changes(&m, 2, i);
        m.commit(&api, "r", size, &ch);
    }
    let mut gone = Model::new(512);
    gone.commit(&api, "gone", 1, &[(1, page(512, 1))]);
    let peak = bucket_objects(&data).len();
    assert!(peak >= 40, "{peak} objects");
    api.delete("/db", &[("db", "gone")]).ok();
    assert!(
        eventually(90, || {
            let objs = bucket_objects(&data);
            let r = objs.iter().filter(|k| k.contains("/r/")).count();
            let g = objs.iter().filter(|k| k.contains("/gone/")).count();
            // r: manifest and one image; gone: its tombstone manifest and lease.
            r <= 2 && g <= 2
        }),
        "objects left: {:?}",
        bucket_objects(&data)
    );
    // The counter moves when the cleanup pass that deleted the objects ends, a moment after
    // they are gone.
    assert!(eventually(60, || api
        .metric("litevfs_bucket_objects_deleted_total")
        >= 40));
    assert!(api.metric("litevfs_bucket_images_written_total") >= 1);
    assert_eq!(api.pos("r"), Some(m.pos));
    assert_pages(&api, "r", &m);
    assert_eq!(api.pos("gone"), None);
    // The name can be used again, from scratch.
    let mut again = Model::new(1024);
    again.commit(&api, "gone", 1, &[(1, page(1024, 9))]);
    assert_eq!(api.pos("gone"), Some(again.pos));
}

fn acquire(api: &Api, db: &str) -> Lease {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = api.post("/lease", &[("db", db), ("duration", "5000")], vec![]);
        if r.status == 200 {
            return r.json();
        }
        r.err(409, "ELEASEEXISTS");
        assert!(Instant::now() < deadline, "lease never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn tx_with(api: &Api, db: &str, lease: Option<&str>, body: Vec<u8>) -> server_support::Resp {
    let mut rb = api.req(reqwest::Method::POST, "/db/tx", &[("db", db)]);
    if let Some(id) = lease {
        rb = rb.header("Lfsc-Lease-Id", id);
    }
    api.send(rb.body(body))
}

/// Two servers on one bucket behind "a load balancer": writers alternate between them through
/// leases (each commit going to either server), unleased writers race at one position, readers
/// long-poll on both. Every acknowledged commit is there exactly once, in order; no TXID is
/// taken twice; readers on either server see the other's commits.
fn two_servers_agree_on_one_history() {
    let tmp = tempfile::tempdir().unwrap();
    let bucket = tmp.path().join("a");
    let a = Server::start_in(&bucket, &[]);
    let b = Server::start_with_bucket_of(&tmp.path().join("b"), &bucket, &[]);
    let apis = [a.api(), b.api()];
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Vec<Pos>>>> = Arc::new(Mutex::new(vec![Vec::new(), Vec::new()]));
    let readers: Vec<_> = (0..2)
        .map(|i| {
            let (api, stop, seen) = (apis[i].clone(), stop.clone(), seen.clone());
            std::thread::spawn(move || {
                let mut pos = Pos::ZERO;
                while !stop.load(Ordering::SeqCst) {
                    let body = format!(
                        r#"{{"positions":{{"lb":{}}}}}"#,
                        serde_json::to_string(&pos).unwrap()
                    );
                    let r = api.send(
                        api.req(reqwest::Method::POST, "/sync", &[("wait", "1000")])
                            .body(body),
                    );
                    let got: litevfs::wire::SyncResponse = r.ok().json();
                    if let Some(c) = got.changes.get("lb")
                        && c.pos != pos
                    {
                        pos = c.pos;
                        seen.lock().unwrap()[i].push(pos);
                    }
                }
            })
        })
        .collect();
    let mut m = Model::new(512);
    let mut acked: Vec<Model> = Vec::new();
    for round in 0..10usize {
        let lease = acquire(&apis[round % 2], "lb");
        for i in 0..6usize {
            let (size, ch) = changes(&m, 2, (round * 10 + i) as u32);
            let (bytes, next) = m.tx(size, &ch);
            // Any commit may land on either server: the lease is the bucket's.
            tx_with(&apis[(round + i) % 2], "lb", Some(&lease.id), bytes).ok();
            m = next;
            acked.push(m.clone());
        }
        // The other server refuses a second holder and unleased commits meanwhile.
        apis[(round + 1) % 2]
            .post("/lease", &[("db", "lb")], vec![])
            .err(409, "ELEASEEXISTS");
        let (bytes, _) = m.tx(m.commit, &[(1, page(512, 0xee))]);
        tx_with(&apis[(round + 1) % 2], "lb", None, bytes).err(409, "ELEASEEXISTS");
        apis[(round + 1) % 2]
            .delete("/lease", &[("db", "lb"), ("id", &lease.id)])
            .ok();
    }
    // Unleased writers (LiteFS style) racing at one position on both servers: one wins.
    for race in 0..10u32 {
        let bodies: Vec<(Vec<u8>, Model)> = (0..2)
            .map(|w| m.tx(m.commit, &[(1 + race % 3, page(512, (race * 2 + w) as u8))]))
            .collect();
        let handles: Vec<_> = bodies
            .iter()
            .enumerate()
            .map(|(w, (body, _))| {
                let (api, body) = (apis[w].clone(), body.clone());
                std::thread::spawn(move || tx_with(&api, "lb", None, body).status)
            })
            .collect();
        let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let winners: Vec<usize> = (0..2).filter(|&w| statuses[w] == 200).collect();
        assert_eq!(winners.len(), 1, "statuses {statuses:?}");
        assert!(
            statuses.contains(&409),
            "the loser gets EPOSMISMATCH: {statuses:?}"
        );
        m = bodies[winners[0]].1.clone();
        acked.push(m.clone());
    }
    // Readers on both servers reach the head.
    assert!(eventually(20, || seen
        .lock()
        .unwrap()
        .iter()
        .all(|s| s.last() == Some(&m.pos))));
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        r.join().unwrap();
    }
    for s in seen.lock().unwrap().iter() {
        let known: Vec<Pos> = acked.iter().map(|a| a.pos).collect();
        assert!(
            s.iter().all(|p| known.contains(p)),
            "a reader saw a position nobody committed"
        );
        assert!(
            s.windows(2).all(|w| w[0].txid < w[1].txid),
            "positions go forward"
        );
    }
    // One TXID after another, each exactly once, and every position readable on both servers.
    let txids: Vec<u64> = acked.iter().map(|a| a.pos.txid.0).collect();
    assert_eq!(txids, (1..=acked.len() as u64).collect::<Vec<_>>());
    for api in &apis {
        assert_eq!(api.pos("lb"), Some(m.pos));
        for old in acked.iter().step_by(7) {
            assert_pages(api, "lb", old);
        }
        let snap = api.snapshot("lb");
        assert_eq!(snap.trailer.post_apply_checksum, m.checksum());
    }
}

/// A lease is the bucket's: every server agrees on the holder, a restart keeps it, its epoch
/// grows with every acquisition, and a holder that lost it is refused everywhere.
fn leases_are_shared_by_every_server() {
    let tmp = tempfile::tempdir().unwrap();
    let bucket = tmp.path().join("a");
    let a = Server::start_in(&bucket, &[]);
    let bdir = tmp.path().join("b");
    let b = Server::start_with_bucket_of(&bdir, &bucket, &[]);
    let l1 = acquire(&a.api(), "l");
    b.api()
        .post("/lease", &[("db", "l")], vec![])
        .err(409, "ELEASEEXISTS");
    let r: Lease = b
        .api()
        .post(
            "/lease",
            &[("db", "l"), ("id", &l1.id), ("duration", "5000")],
            vec![],
        )
        .ok()
        .json();
    assert_eq!(r.id, l1.id);
    let mut m = Model::new(512);
    let (bytes, next) = m.tx(1, &[(1, page(512, 1))]);
    tx_with(&b.api(), "l", Some(&l1.id), bytes).ok();
    m = next;
    // A restart of B keeps the lease.
    b.kill9();
    let b = Server::start_with_bucket_of(&bdir, &bucket, &[]);
    let (bytes, next) = m.tx(1, &[(1, page(512, 2))]);
    tx_with(&b.api(), "l", Some(&l1.id), bytes).ok();
    m = next;
    b.api()
        .delete("/lease", &[("db", "l"), ("id", &l1.id)])
        .ok();
    let l2 = acquire(&a.api(), "l");
    let epoch = |l: &Lease| u64::from_str_radix(&l.id[..16], 16).unwrap();
    assert_eq!(
        epoch(&l2),
        epoch(&l1) + 1,
        "each acquisition is a new epoch"
    );
    let (bytes, _) = m.tx(1, &[(1, page(512, 3))]);
    tx_with(&b.api(), "l", Some(&l1.id), bytes.clone()).err(422, "ELEASEMISMATCH");
    tx_with(&a.api(), "l", Some(&l1.id), bytes.clone()).err(422, "ELEASEMISMATCH");
    tx_with(&b.api(), "l", Some(&l2.id), bytes).ok();
}

/// A data directory holding a local store is never opened as a cache (its databases would be
/// lost), nor a cache as a local store; bad `--store` settings stop the start with a clear
/// message.
fn modes_and_settings_are_checked_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_litevfs"))
            .arg("serve")
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .envs(envs.iter().copied())
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let local = tmp.path().join("local");
    let bucket_dir = tmp.path().join("bucket-owner");
    let (store, env) = server_support::store_args(&bucket_dir);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    {
        let s = Server::spawn(
            {
                let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_litevfs"));
                c.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
                    .arg(&local);
                c
            },
            &local,
        );
        let mut m = Model::new(512);
        m.commit(&s.api(), "keep", 1, &[(1, page(512, 1))]);
    }
    let mut args: Vec<&str> = vec!["--data-dir", local.to_str().unwrap()];
    args.extend(store.iter().map(String::as_str));
    let err = run(&args, &env);
    assert!(err.contains("local store with 1 database"), "{err}");
    let cache = tmp.path().join("cache");
    drop(Server::start_with_bucket_of(&cache, &bucket_dir, &[]));
    let err = run(&["--data-dir", cache.to_str().unwrap()], &[]);
    assert!(err.contains("cache of the object store"), "{err}");
    let d = tmp.path().join("d");
    let d = d.to_str().unwrap();
    for (bad, why) in [
        ("http://x/y", "use s3://BUCKET/PREFIX or file://DIR"),
        ("s3://", "no bucket name"),
        ("s3://b/../x", "may not contain"),
    ] {
        let err = run(&["--data-dir", d, "--store", bad], &[]);
        assert!(err.contains(why), "{bad}: {err}");
    }
    let mut args = vec!["--data-dir", d];
    args.extend(store.iter().map(String::as_str));
    args.extend(["--gc-grace", "1s"]);
    assert!(run(&args, &env).contains("--gc-grace must be at least"));
    if backend() == Backend::S3 {
        // Unreachable, and a bucket that does not exist: the start fails and says where.
        let m = server_support::moto();
        let err = run(
            &[
                "--data-dir",
                d,
                "--store",
                "s3://nope/x",
                "--aws-endpoint-url",
                "http://127.0.0.1:1",
                "--s3-path-style",
            ],
            &[],
        );
        assert!(
            err.contains("opening the object store s3://nope/x"),
            "{err}"
        );
        let err = run(
            &[
                "--data-dir",
                d,
                "--store",
                "s3://no-such-bucket/x",
                "--aws-endpoint-url",
                &m.endpoint,
                "--s3-path-style",
            ],
            &[],
        );
        assert!(err.contains("no-such-bucket"), "{err}");
    }
}

/// Bytes of the files in `dir` (not recursive: the data directory's own files).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// `--cache-size` bounds the data directory however large the databases are: a server that
/// reads every page of two databases of three times the bound keeps its data directory under
/// it, evicting pages (and, past that, whole databases' indexes), and still serves every page
/// right, fetching evicted ones again.
fn the_cache_stays_under_its_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let owner = tmp.path().join("owner");
    let a = Server::start_in(&owner, &[]);
    let pages = 12_288u32; // 48 MiB each
    let images = [server_support::fake_sqlite(pages), {
        let mut b = server_support::fake_sqlite(pages);
        for p in 1..pages as usize {
            b[p * 4096 + 100] ^= 0xff;
        }
        b
    }];
    for (i, img) in images.iter().enumerate() {
        a.api()
            .post("/db/upload", &[("db", &format!("big{i}"))], img.clone())
            .ok();
    }
    let reader = tmp.path().join("reader");
    let bound = 16u64 << 20;
    let b = Server::start_with_bucket_of(&reader, &owner, &["--cache-size", "16MiB"]);
    let api = b.api();
    let mut peak = 0;
    for round in 0..2 {
        for (i, img) in images.iter().enumerate() {
            let db = format!("big{i}");
            let mut pgno = 1;
            while pgno <= pages {
                let last = (pgno + 127).min(pages);
                let list = (pgno..=last)
                    .map(|p| p.to_string())
                    .collect::<Vec<_>>()
                    .join(",");
                let r = api.send(
                    api.req(
                        reqwest::Method::GET,
                        "/db/page",
                        &[("db", &db), ("pgno", &list)],
                    )
                    .header("Accept", litevfs::wire::MEDIA_PAGE_FRAMES),
                );
                let frames = litevfs::wire::decode_page_frames(&r.ok().body).unwrap();
                for f in &frames {
                    let at = (f.pgno as usize - 1) * 4096;
                    assert_eq!(
                        f.data,
                        img[at..at + 4096],
                        "{db} page {} round {round}",
                        f.pgno
                    );
                }
                pgno += frames.len() as u32;
                peak = peak.max(dir_bytes(&reader));
            }
        }
    }
    // The bound holds between requests, up to one batch of pages being written.
    assert!(
        peak <= bound + (bound / 8) + (1 << 20),
        "data dir peaked at {peak} bytes"
    );
    assert!(dir_bytes(&reader) <= bound, "{} bytes", dir_bytes(&reader));
    assert!(api.metric("litevfs_cache_evicted_pages_total") > 0);
}

/// An object's index is read in pieces when it is larger than the first GET: a commit of
/// 21,829 page versions puts the index's CRC across the end of the first 256 KiB read, and a
/// server that learns of it from the bucket must still read it (it once panicked).
fn indexes_across_read_boundaries_load() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("a");
    let a = Server::start_in(&data, &[]);
    let n = 21_829u32;
    let mut m = Model::new(512);
    let all = |b: u8| {
        (1..=n)
            .map(|p| (p, page(512, b ^ p as u8)))
            .collect::<Vec<_>>()
    };
    m.commit(&a.api(), "wide", n, &all(1));
    m.commit(&a.api(), "wide", n, &all(2));
    let b = Server::start_with_bucket_of(&tmp.path().join("b"), &data, &[]);
    assert_eq!(b.api().pos("wide"), Some(m.pos));
    for pgno in [1, n / 2, n] {
        let r: litevfs::wire::PagesResponse = b
            .api()
            .get(
                "/db/page",
                &[
                    ("db", "wide"),
                    ("pos", &m.pos.to_string()),
                    ("pgno", &pgno.to_string()),
                ],
            )
            .ok()
            .json();
        assert_eq!(r.pages[0].data, m.pages[&pgno]);
    }
}

/// A database deleted and created again through one server: a commit that another server
/// receives for the old incarnation right after is refused, never acknowledged into the dead
/// generation (whose objects are garbage); readers of either server see only the new one.
fn commits_never_land_in_a_deleted_generation() {
    let tmp = tempfile::tempdir().unwrap();
    let bucket = tmp.path().join("a");
    let a = Server::start_in(&bucket, &[]);
    let b = Server::start_with_bucket_of(&tmp.path().join("b"), &bucket, &[]);
    let mut old = Model::new(512);
    for i in 0..3 {
        old.commit(&a.api(), "g", 2, &[(1, page(512, i)), (2, page(512, 9))]);
    }
    assert_eq!(
        a.api().pos("g"),
        Some(old.pos),
        "A has a fresh view of the old incarnation"
    );
    b.api().delete("/db", &[("db", "g")]).ok();
    let mut new = Model::new(512);
    for i in 0..4 {
        new.commit(
            &b.api(),
            "g",
            2,
            &[(1, page(512, 100 + i)), (2, page(512, 7))],
        );
    }
    // A stale client of the old incarnation commits through A at once.
    let (bytes, _) = old.tx(2, &[(1, page(512, 55))]);
    a.api().tx("g", bytes).err(409, "EPOSMISMATCH");
    for api in [a.api(), b.api()] {
        assert_eq!(api.pos("g"), Some(new.pos));
        assert_pages(&api, "g", &new);
    }
}

/// A database emptied by a commit of size 0 and filled again with another page size: its
/// segments have one page size each, and compaction keeps merging (it once stopped for good).
fn compaction_goes_on_across_page_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("a");
    let a = Server::start_in(
        &data,
        &["--retention", "1h", "--compaction-interval", "100ms"],
    );
    let api = a.api();
    let mut m = Model::new(512);
    for i in 0..10 {
        let (size, ch) = changes(&m, 2, i);
        m.commit(&api, "ps", size, &ch);
    }
    m.commit(&api, "ps", 0, &[]);
    // Compaction merges runs of at least L0_FANIN (8) commits of one page size, whenever its
    // pass finds them: how many segments a run becomes depends on timing (under load it keeps
    // up with the commits), so the test counts progress from before the page size changes.
    let segments = || api.metric("litevfs_bucket_segments_written_total");
    assert!(
        eventually(120, || segments() >= 1),
        "the 512-byte run was never compacted"
    );
    let before = segments();
    let mut big = Model {
        page_size: 1024,
        commit: 0,
        pages: Default::default(),
        pos: m.pos,
    };
    for i in 0..20 {
        let (size, ch) = changes(&big, 3, i);
        big.commit(&api, "ps", size, &ch);
    }
    // 20 commits of 1024-byte pages cannot join a 512-byte segment: at least one more segment.
    assert!(
        eventually(120, || segments() > before),
        "compaction stopped at the page size change"
    );
    let fresh = Server::start_with_bucket_of(&tmp.path().join("b"), &data, &[]);
    assert_eq!(fresh.api().pos("ps"), Some(big.pos));
    assert_pages(&fresh.api(), "ps", &big);
}

/// Garbage-collection work that only a killed server knew of is still done: a database is
/// deleted through server A, which is killed at once; server B, started afterwards on another
/// data directory, finds the dead generation by sweeping the bucket and deletes it after the
/// grace.
fn garbage_is_collected_across_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("a");
    let args = [
        "--retention",
        "1s",
        "--gc-grace",
        "30s",
        "--compaction-interval",
        "200ms",
    ];
    let a = Server::start_in(&data, &args);
    let mut m = Model::new(512);
    for i in 0..5 {
        m.commit(&a.api(), "doomed", 1, &[(1, page(512, i))]);
    }
    let objects = || {
        bucket_objects(&data)
            .into_iter()
            .filter(|k| {
                k.contains("/doomed/") && !k.ends_with("/manifest") && !k.ends_with("/lease")
            })
            .count()
    };
    assert!(objects() >= 5);
    a.api().delete("/db", &[("db", "doomed")]).ok();
    a.kill9();
    let b = Server::start_with_bucket_of(&tmp.path().join("b"), &data, &args);
    assert!(
        eventually(90, || objects() == 0),
        "{} objects left",
        objects()
    );
    // The pass that deleted them adds to the counter once it ends, a moment after.
    assert!(
        eventually(30, || b
            .api()
            .metric("litevfs_bucket_objects_deleted_total")
            >= 5),
        "deleted objects not counted"
    );
}

/// The longest database name the API allows (256 bytes) works on `s3://`; on `file://`, where
/// a name is a directory name, it is refused with a clear 400 and changes nothing.
fn longest_names() {
    let s = Server::start(&[]);
    let api = s.api();
    let name = "n".repeat(256);
    let mut m = Model::new(512);
    let (bytes, next) = m.tx(1, &[(1, page(512, 1))]);
    match backend() {
        Backend::File => {
            let e = api.tx(&name, bytes).err(400, "EBADINPUT");
            assert!(e.error.contains("255 bytes"), "{}", e.error);
            api.post("/lease", &[("db", &name)], vec![])
                .err(400, "EBADINPUT");
            assert!(api.positions().is_empty());
        }
        _ => {
            api.tx(&name, bytes).ok();
            m = next;
            assert_eq!(api.pos(&name), Some(m.pos));
        }
    }
}

/// `litevfs restore` by TXID and by timestamp, on a server that knows nothing but the bucket:
/// the retained history comes from the bucket's objects, with the times their commits landed.
fn restore_from_the_bucket_by_txid_and_timestamp() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("a");
    let a = Server::start_in(&data, &[]);
    let mut history = Vec::new();
    let mut times = Vec::new();
    let mut m = Model::new(512);
    for i in 0..4u8 {
        m.commit(
            &a.api(),
            "r",
            2,
            &[(1, page(512, 10 + i)), (2, page(512, 20 + i))],
        );
        history.push(m.clone());
        std::thread::sleep(Duration::from_millis(30));
        times.push(time::OffsetDateTime::now_utc());
        std::thread::sleep(Duration::from_millis(30));
    }
    drop(a);
    let b = Server::start_with_bucket_of(&tmp.path().join("b"), &data, &[]);
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_litevfs"))
            .args(args)
            .args(["--host", &b.base])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let pages_now = |b: &Server| -> Vec<Vec<u8>> {
        let pos = b.api().pos("r").unwrap().to_string();
        let r: litevfs::wire::PagesResponse = b
            .api()
            .get("/db/page", &[("db", "r"), ("pos", &pos), ("pgno", "1,2")])
            .ok()
            .json();
        r.pages.into_iter().map(|p| p.data).collect()
    };
    // Back to what was current just after the second commit, by time.
    let at = times[1]
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    cli(&["restore", "r", "--timestamp", &at]);
    assert_eq!(
        pages_now(&b),
        vec![history[1].pages[&1].clone(), history[1].pages[&2].clone()]
    );
    // And to the first commit, by TXID.
    cli(&["restore", "r", "--txid", &history[0].pos.txid.to_string()]);
    assert_eq!(
        pages_now(&b),
        vec![history[0].pages[&1].clone(), history[0].pages[&2].clone()]
    );
    assert_eq!(
        b.api().pos("r").unwrap().txid.0,
        6,
        "each restore is a new transaction"
    );
}

on_bucket_backends!(
    restore_from_the_bucket_by_txid_and_timestamp,
    longest_names,
    garbage_is_collected_across_restarts,
    commits_never_land_in_a_deleted_generation,
    compaction_goes_on_across_page_sizes,
    indexes_across_read_boundaries_load,
    the_cache_stays_under_its_bound,
    an_empty_data_dir_serves_everything,
    compaction_bounds_what_a_reader_opens,
    retention_deletes_superseded_objects,
    two_servers_agree_on_one_history,
    leases_are_shared_by_every_server,
    modes_and_settings_are_checked_at_start,
    kill_9_of_either_server_loses_nothing,
);

/// The bucket unreachable: commits fail with `EUNAVAILABLE` and change nothing, pages this
/// server has cached keep being served, and everything resumes by itself. Replies lost after a
/// commit landed: the commit is reported committed, once. (S3 only: the proxy sits on HTTP.)
#[test]
fn bucket_faults_lose_nothing() {
    use server_support::proxy::{Mode, Proxy};
    server_support::with_backend(Backend::S3, || {
        let m0 = server_support::moto();
        let proxy = Proxy::start(m0.endpoint.strip_prefix("http://").unwrap());
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let s = Server::start_via(&data, &data, Some(&proxy.url()), &[]);
        let api = s.api();
        let mut m = Model::new(512);
        for i in 0..3 {
            let (size, ch) = changes(&m, 2, i);
            m.commit(&api, "f", size, &ch);
        }
        assert_pages(&api, "f", &m);
        proxy.set(Mode::Refuse);
        let (size, ch) = changes(&m, 2, 7);
        let (bytes, next) = m.tx(size, &ch);
        let e = api.tx("f", bytes.clone()).err(503, "EUNAVAILABLE");
        assert!(e.error.contains("nothing was"), "{}", e.error);
        // Cached pages at a known position are still served.
        assert_pages(&api, "f", &m);
        api.post("/lease", &[("db", "f")], vec![])
            .err(503, "EUNAVAILABLE");
        proxy.set(Mode::Up);
        assert_eq!(
            api.pos("f"),
            Some(m.pos),
            "the refused commit changed nothing"
        );
        api.tx("f", bytes).ok();
        m = next;
        // Replies lost for a while: the commit lands, its reply does not, and the server
        // settles it by retrying and reading back what holds the key.
        let (size, ch) = changes(&m, 2, 8);
        let (bytes, next) = m.tx(size, &ch);
        proxy.set(Mode::LoseCommitReplies);
        let committing = {
            let api = api.clone();
            std::thread::spawn(move || api.tx("f", bytes))
        };
        std::thread::sleep(Duration::from_millis(1500));
        proxy.set(Mode::Up);
        committing.join().unwrap().ok();
        m = next;
        let text = api.get("/metrics", &[]).ok().text();
        assert!(
            text.contains("litevfs_bucket_requests_total{op=\"put_create\",result=\"conflict\"}"),
            "the commit was settled by finding its own object under the key"
        );
        assert_eq!(api.pos("f"), Some(m.pos));
        assert_pages(&api, "f", &m);
        // A server on an empty data directory agrees.
        let fresh = Server::start_with_bucket_of(&tmp.path().join("fresh"), &data, &[]);
        assert_eq!(fresh.api().pos("f"), Some(m.pos));
        assert_pages(&fresh.api(), "f", &m);
    });
}

/// Resolves a commit whose reply never came, by asking `api` (another server) where the
/// database is: `Some(true)` if it landed.
fn landed(api: &Api, db: &str, before: Pos, after: Pos) -> Option<bool> {
    let r = api
        .try_send(api.req(reqwest::Method::GET, "/pos", &[]))
        .ok()?;
    if r.status != 200 {
        return None;
    }
    let pos: BTreeMap<String, Pos> = r.json();
    match pos.get(db).copied().unwrap_or(Pos::ZERO) {
        p if p == after => Some(true),
        p if p == before => Some(false),
        p => panic!("the store is at {p}, neither {before} nor {after}"),
    }
}

/// kill -9 of either of two servers on one bucket, in the middle of commits, 50 times (half
/// the restarts on an empty data directory): no acknowledged commit is lost, none is applied
/// twice, and the database verifies at the end. Each kill waits for a commit acknowledged
/// since the one before, so every round has commits in flight however slow the machine.
fn kill_9_of_either_server_loses_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let bucket = tmp.path().join("a");
    let dirs = [bucket.clone(), tmp.path().join("b")];
    let start = |i: usize| Server::start_with_bucket_of(&dirs[i], &bucket, &["--retention", "2s"]);
    let servers: Arc<Mutex<Vec<Option<Server>>>> =
        Arc::new(Mutex::new(vec![Some(start(0)), Some(start(1))]));
    let bases: Vec<String> = servers
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.as_ref().unwrap().base.clone())
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU64::new(0));
    let writer = {
        let stop = stop.clone();
        let progress = progress.clone();
        let servers = servers.clone();
        std::thread::spawn(move || {
            let api_of = |i: usize| -> Api {
                let s = servers.lock().unwrap();
                s[i].as_ref()
                    .map_or_else(|| Api::new(&bases[i], None), |s| s.api())
            };
            let mut m = Model::new(4096);
            let mut acked = 0u64;
            let mut n = 0u32;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                let (size, ch) = changes(&m, 1 + n % 5, n);
                let (bytes, next) = m.tx(size, &ch);
                let mut via = (n % 2) as usize;
                loop {
                    let api = api_of(via);
                    let rb = api.req(reqwest::Method::POST, "/db/tx", &[("db", "k")]);
                    if let Ok(r) = api.try_send(rb.body(bytes.clone()))
                        && r.status == 200
                    {
                        break;
                    }
                    // No success reply (a killed server, a lost reply, or EPOSMISMATCH because
                    // an earlier attempt landed): learn from either server where the store is,
                    // and send again only if the commit is known not to have landed.
                    let outcome = loop {
                        if let Some(o) =
                            (0..2).find_map(|i| landed(&api_of(i), "k", m.pos, next.pos))
                        {
                            break o;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    };
                    if outcome {
                        break;
                    }
                    via = 1 - via;
                }
                m = next;
                acked += 1;
                progress.store(acked, Ordering::SeqCst);
            }
            (m, acked)
        })
    };
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for round in 0..50usize {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        std::thread::sleep(Duration::from_millis(40 + rng % 120));
        let waited = Instant::now();
        while progress.load(Ordering::SeqCst) <= round as u64 {
            assert!(
                waited.elapsed() < Duration::from_secs(60),
                "no commit acknowledged for 60 s in round {round}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let victim = round % 2;
        let s = servers.lock().unwrap()[victim].take().unwrap();
        s.kill9();
        if round % 4 >= 2 {
            std::fs::remove_dir_all(&dirs[victim]).unwrap();
        }
        let s = start(victim);
        servers.lock().unwrap()[victim] = Some(s);
    }
    stop.store(true, Ordering::SeqCst);
    let (m, acked) = writer.join().unwrap();
    assert!(acked >= 50, "only {acked} commits");
    let fresh = Server::start_with_bucket_of(&tmp.path().join("fresh"), &bucket, &[]);
    assert_eq!(fresh.api().pos("k"), Some(m.pos));
    assert_eq!(m.pos.txid.0, acked, "every commit exactly once");
    let snap = fresh.api().snapshot("k");
    assert_eq!(snap.trailer.post_apply_checksum, m.checksum());
}

/// An S3-compatible service that ignores conditional writes would let two servers both commit
/// one TXID: the server checks at start and refuses to run on one. (S3 only: the proxy strips
/// the conditions from the requests.)
#[test]
fn a_store_without_conditional_writes_is_refused() {
    use server_support::proxy::{Mode, Proxy};
    server_support::with_backend(Backend::S3, || {
        let m0 = server_support::moto();
        let proxy = Proxy::start(m0.endpoint.strip_prefix("http://").unwrap());
        proxy.set(Mode::StripConditions);
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        let (store, env) = server_support::store_args_via(&data, Some(&proxy.url()));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_litevfs"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .args(&store)
            .envs(env)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("does not honour create-if-absent"), "{err}");
    });
}
