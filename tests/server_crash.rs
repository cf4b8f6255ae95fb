//! Crash safety: kill -9 the server in the middle of a stream of commits, restart it on the same
//! data directory, and check that every acknowledged commit survived, that the database is at
//! the acknowledged position or at the one commit that was in flight (never between), and that
//! every snapshot verifies. A short retention keeps compaction running during the commits, so
//! kills also land in the middle of compaction passes.

#[macro_use]
mod server_support;

use std::collections::BTreeMap;
use std::time::Duration;

use litevfs::ltx;
use litevfs::wire::Pos;
use server_support::{Api, Model, Server, page};

const ROUNDS: u32 = 8;
const DBS: [&str; 2] = ["alpha", "beta"];

/// Deterministic changes for commit number `n` of a database: rewrite a few pages, sometimes
/// grow, sometimes shrink.
fn changes(m: &Model, n: u64) -> (u32, Vec<(u32, Vec<u8>)>) {
    let mut commit = m.commit.max(1);
    if n % 7 == 0 {
        commit += 3;
    } else if n % 13 == 0 && commit > 4 {
        commit -= 2;
    }
    let mut pages: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
    for p in m.commit + 1..=commit {
        pages.insert(p, page(512, (n as u8).wrapping_add(p as u8)));
    }
    for k in 0..3u64 {
        let p = ((n * 31 + k * 17) % u64::from(commit)) as u32 + 1;
        pages.insert(p, page(512, (n as u8) ^ (k as u8 * 85)));
    }
    (commit, pages.into_iter().collect())
}

/// Commits until the server goes away; returns the last acknowledged model and the one in flight.
fn write_until_killed(api: Api, db: &str, mut m: Model) -> (Model, Option<Model>) {
    for n in m.pos.txid.0 + 1.. {
        let (commit, ch) = changes(&m, n);
        let (bytes, next) = m.tx(commit, &ch);
        match api.try_send(
            api.req(reqwest::Method::POST, "/db/tx", &[("db", db)])
                .body(bytes),
        ) {
            Ok(r) => {
                assert_eq!(r.status, 200, "{}", r.text());
                m = next;
            }
            Err(_) => return (m, Some(next)),
        }
    }
    unreachable!()
}

/// The model of `db` as the server has it now, after checking the snapshot verifies.
fn model_from_server(api: &Api, db: &str) -> Model {
    let Some(pos) = api.pos(db) else {
        return Model::new(512);
    };
    let r = api.get("/db/snapshot", &[("db", db)]).ok();
    let snap = ltx::decode(&r.body).expect("snapshot verifies after a crash");
    assert_eq!(
        Pos::new(snap.header.max_txid, snap.trailer.post_apply_checksum),
        pos
    );
    let pages = snap.pages.into_iter().collect();
    Model {
        page_size: 512,
        commit: snap.header.commit,
        pages,
        pos,
    }
}

fn kill_9_never_loses_an_acknowledged_commit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut models: Vec<Model> = DBS.iter().map(|_| Model::new(512)).collect();
    for round in 0..ROUNDS {
        let server = Server::start_in(&data, &["--retention", "300ms"]);
        let api = server.api();
        let writers: Vec<_> = DBS
            .iter()
            .zip(models.clone())
            .map(|(db, m)| {
                let api = api.clone();
                std::thread::spawn(move || write_until_killed(api, db, m))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(150 + u64::from(round) * 40));
        server.kill9();
        let results: Vec<(Model, Option<Model>)> =
            writers.into_iter().map(|w| w.join().unwrap()).collect();
        let server = Server::start_in(&data, &["--retention", "300ms"]);
        let api = server.api();
        for ((db, (acked, in_flight)), model) in DBS.iter().zip(results).zip(models.iter_mut()) {
            let now = model_from_server(&api, db);
            let at_acked = now.pos == acked.pos;
            let at_flight = in_flight.as_ref().is_some_and(|f| f.pos == now.pos);
            assert!(
                at_acked || at_flight,
                "round {round} {db}: server at {} acked {}",
                now.pos,
                acked.pos
            );
            let expected = if at_acked {
                &acked
            } else {
                in_flight.as_ref().unwrap()
            };
            assert_eq!(now.image(), expected.image(), "round {round} {db}: content");
            *model = now;
        }
        server.kill9();
    }
    for (db, m) in DBS.iter().zip(&models) {
        eprintln!("{db}: {} commits, {} pages", m.pos.txid.0, m.commit);
        assert!(
            m.pos.txid.0 >= u64::from(ROUNDS),
            "{db}: too few commits to mean anything"
        );
    }
}

/// Image number `n` of the uploaded database: 2,400 pages of 4 KiB (over the 8 MiB a local
/// store keeps in memory, so each upload is received into an object file), a different 1 in 40
/// pages changed each time.
fn upload_image(n: u64) -> Vec<u8> {
    let mut img = server_support::fake_sqlite(2_400);
    for p in 2..=2_400u64 {
        if (p + n) % 40 == 0 {
            let at = (p as usize - 1) * 4096;
            img[at..at + 4096]
                .iter_mut()
                .for_each(|b| *b ^= n as u8 | 1);
        }
    }
    img
}

/// Local store: kill -9 in the middle of large uploads (received straight into files of
/// `objects/`) and of the compaction passes that punch and remove those files. After each
/// restart the database is at the acknowledged upload or the one in flight, every file in
/// `objects/` is named by the store and every file the store names is there.
#[test]
fn kill_9_during_uploads_keeps_objects_and_index_in_step() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let flags = ["--retention", "200ms", "--compaction-interval", "50ms"];
    let mut acked: Option<u64> = None;
    let mut next = 1u64;
    for round in 0..6u64 {
        let server = Server::start_in(&data, &flags);
        let api = server.api();
        let writer = {
            let api = api.clone();
            std::thread::spawn(move || {
                let mut last = acked;
                for n in next.. {
                    let req = api
                        .req(reqwest::Method::POST, "/db/upload", &[("db", "up")])
                        .body(upload_image(n));
                    match api.try_send(req) {
                        Ok(r) => {
                            assert_eq!(r.status, 200, "{}", r.text());
                            last = Some(n);
                        }
                        Err(_) => return (last, n),
                    }
                }
                unreachable!()
            })
        };
        std::thread::sleep(Duration::from_millis(400 + round * 150));
        server.kill9();
        let (last, in_flight) = writer.join().unwrap();
        let server = Server::start_in(&data, &flags);
        let api = server.api();
        let snap = api
            .get("/db/snapshot", &[("db", "up"), ("format", "sqlite")])
            .ok()
            .body;
        let at = [last, Some(in_flight)]
            .into_iter()
            .flatten()
            .find(|&n| upload_image(n) == snap);
        assert!(
            at.is_some(),
            "round {round}: the database is neither at upload {last:?} nor at {in_flight}"
        );
        acked = at;
        next = in_flight + 1;
        drop(api);
        server.kill9();
        // The store (stopped) and its directory agree.
        let conn = rusqlite::Connection::open(data.join("store.db")).unwrap();
        let mut named: Vec<String> = conn
            .prepare("SELECT key FROM objects")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        named.sort();
        let mut files: Vec<String> = std::fs::read_dir(data.join("objects"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|f| !f.starts_with("in-"))
            .collect();
        files.sort();
        // A crash may leave a file whose row is gone or never came; the next start removes it.
        assert!(
            named.iter().all(|k| files.contains(k)),
            "round {round}: rows name missing files: {named:?} vs {files:?}"
        );
    }
    eprintln!("up: {} uploads over 6 kills", next - 1);
    assert!(next > 6, "too few uploads to mean anything: {next}");
    let server = Server::start_in(&data, &flags);
    let conn = rusqlite::Connection::open(data.join("store.db")).unwrap();
    let named: i64 = conn
        .query_row("SELECT COUNT(*) FROM objects", [], |r| r.get(0))
        .unwrap();
    let files = std::fs::read_dir(data.join("objects")).unwrap().count() as i64;
    assert_eq!(
        named, files,
        "the start removed every file the store does not name"
    );
    drop(server);
}

/// A crash of the machine, not only of the process, loses what the store had written but not
/// synced; small commits are synced only in the store's commit log, and every acknowledged one
/// must come back from it. Simulated with the real server: a backup of the store taken in the
/// middle of a stream of small commits is what the disk can hold of `store.db` after such a
/// crash (a committed state no later than the last sync: nothing after the backup syncs
/// `store.db`, as only small commits follow it). The server is killed, `store.db` is replaced
/// with the backup's, and the restarted server must be at the last acknowledged commit.
#[test]
fn a_crash_of_the_machine_loses_no_acknowledged_commit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut models: Vec<Model> = DBS.iter().map(|_| Model::new(512)).collect();
    for round in 0..3u64 {
        let server = Server::start_in(&data, &[]);
        let api = server.api();
        // Before the backup: small commits, and one over the commit log's 1 MiB, which is synced
        // in `store.db` itself.
        for (db, m) in DBS.iter().zip(models.iter_mut()) {
            for _ in 0..5 {
                let (commit, ch) = changes(m, m.pos.txid.0 + 1);
                m.commit(&api, db, commit, &ch);
            }
        }
        let big = 2200 + round as u32;
        let m = &mut models[0];
        let ch: Vec<(u32, Vec<u8>)> = (1..=big).map(|p| (p, page(512, p as u8 ^ 0x5a))).collect();
        m.commit(&api, DBS[0], big, &ch);
        let backup = dir.path().join(format!("backup{round}"));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_litevfs"))
            .arg("backup")
            .arg("--data-dir")
            .arg(&data)
            .arg(&backup)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // After it: 30 more small commits, all acknowledged.
        for n in 0..30 {
            let i = n % DBS.len();
            let m = &mut models[i];
            let (commit, ch) = changes(m, m.pos.txid.0 + 1);
            m.commit(&api, DBS[i], commit, &ch);
        }
        server.kill9();
        for ext in ["", "-wal", "-shm"] {
            let f = data.join(format!("store.db{ext}"));
            if f.exists() {
                std::fs::remove_file(f).unwrap();
            }
        }
        std::fs::copy(backup.join("store.db"), data.join("store.db")).unwrap();
        let server = Server::start_in(&data, &[]);
        let api = server.api();
        for (db, m) in DBS.iter().zip(&models) {
            let now = model_from_server(&api, db);
            assert_eq!(now.pos, m.pos, "round {round} {db}: position");
            assert_eq!(now.image(), m.image(), "round {round} {db}: content");
        }
        server.kill9();
    }
}

// Every test above that is not a `#[test]` itself runs once per backend: local store.db,
// `--store file://`, `--store s3://` on moto.
on_every_backend!(kill_9_never_loses_an_acknowledged_commit,);
