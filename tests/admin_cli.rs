//! The admin subcommands (`litevfs list/import/export/copy/delete/restore`) as a user runs them:
//! the real binary against a real `litevfs serve` on loopback.

mod server_support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use server_support::Server;

fn litevfs(server: &Server, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_litevfs"))
        .args(args)
        .env("LITEFS_CLOUD_HOST", &server.base)
        .env_remove("LITEFS_CLOUD_TOKEN")
        .env_remove("LITEFS_CLOUD_CLUSTER")
        .output()
        .expect("run litevfs")
}

fn ok(server: &Server, args: &[&str]) -> String {
    let out = litevfs(server, args);
    assert!(
        out.status.success(),
        "litevfs {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

fn fails(server: &Server, args: &[&str]) -> String {
    let out = litevfs(server, args);
    assert!(!out.status.success(), "litevfs {args:?} should have failed");
    String::from_utf8(out.stderr).expect("utf-8")
}

/// A real SQLite database made by the sqlite3 shell, `rows` rows.
fn make_db(path: &Path, rows: u32) {
    let sql = format!(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);\
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < {rows}) \
         INSERT INTO t SELECT i, hex(randomblob(40)) FROM n;"
    );
    let st = Command::new("sqlite3")
        .arg(path)
        .arg(sql)
        .status()
        .expect("sqlite3");
    assert!(st.success());
}

fn count_rows(path: &Path) -> String {
    let out = Command::new("sqlite3")
        .arg(path)
        .arg("PRAGMA integrity_check; SELECT count(*) FROM t;")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn import_list_export_copy_restore_delete() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    make_db(&a, 500);
    make_db(&b, 900);

    assert!(
        ok(&server, &["import", "app", a.to_str().unwrap()]).contains("at txid 0000000000000001")
    );
    let list = ok(&server, &["list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("app ") && l.contains("0000000000000001")),
        "{list}"
    );

    // Export is byte-identical to what was imported, and passes integrity_check.
    let out = dir.path().join("out.db");
    ok(&server, &["export", "app", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&a).unwrap());
    assert_eq!(count_rows(&out), "ok\n500\n");
    // Without --force an existing file is left alone.
    assert!(fails(&server, &["export", "app", out.to_str().unwrap()]).contains("--force"));
    // LTX exports are verified snapshots.
    let ltx = dir.path().join("out.ltx");
    ok(
        &server,
        &["export", "app", ltx.to_str().unwrap(), "--format", "ltx"],
    );
    let f = litevfs::ltx::decode(&std::fs::read(&ltx).unwrap()).unwrap();
    assert_eq!(f.header.min_txid, 1);

    // A second import is a new transaction; restore brings the first state back as a third.
    assert!(
        ok(&server, &["import", "app", b.to_str().unwrap()]).contains("at txid 0000000000000002")
    );
    ok(
        &server,
        &["export", "app", out.to_str().unwrap(), "--force"],
    );
    assert_eq!(count_rows(&out), "ok\n900\n");
    assert!(
        ok(&server, &["restore", "app", "--txid", "0000000000000001"])
            .contains("new txid 0000000000000003")
    );
    ok(
        &server,
        &["export", "app", out.to_str().unwrap(), "--force"],
    );
    assert_eq!(count_rows(&out), "ok\n500\n");

    assert!(ok(&server, &["copy", "app", "app-copy"]).contains("copied app to app-copy"));
    let copy = dir.path().join("copy.db");
    ok(&server, &["export", "app-copy", copy.to_str().unwrap()]);
    assert_eq!(count_rows(&copy), "ok\n500\n");

    ok(&server, &["delete", "app"]);
    let err = fails(
        &server,
        &["export", "app", copy.to_str().unwrap(), "--force"],
    );
    assert!(err.contains("ENODB"), "{err}");
    assert!(!ok(&server, &["list"]).contains("app "));
}

#[test]
fn bad_input_gets_clear_errors() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.db");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    let err = fails(&server, &["import", "app", junk.to_str().unwrap()]);
    assert!(err.contains("not a usable SQLite database"), "{err}");

    for bad in ["../etc", "a/b", ".hidden"] {
        let err = fails(&server, &["delete", bad]);
        assert!(err.contains("invalid database name"), "{bad}: {err}");
    }
    let err = fails(&server, &["restore", "app", "--txid", "12"]);
    assert!(err.contains("16 hex digits"), "{err}");
    let err = fails(&server, &["restore", "app", "--timestamp", "yesterday"]);
    assert!(err.contains("RFC 3339"), "{err}");
    let err = fails(&server, &["delete", "nope"]);
    assert!(err.contains("ENODB") && err.contains(&server.base), "{err}");

    // A server that is not there: the error names the host.
    let dead = "http://127.0.0.1:9";
    let out = Command::new(env!("CARGO_BIN_EXE_litevfs"))
        .args(["list", "--host", dead])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot reach the page store at http://127.0.0.1:9")
    );
}

#[test]
fn wrong_token_names_the_variable() {
    let server = Server::start(&[
        "--token",
        "s3cret=default:rw",
        "--token",
        "viewer=default:ro",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.db");
    make_db(&a, 10);
    let run = |token: &str, args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_litevfs"))
            .args(args)
            .env("LITEFS_CLOUD_HOST", &server.base)
            .env("LITEFS_CLOUD_TOKEN", token)
            .output()
            .unwrap()
    };
    let out = run("wrong", &["list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("EINVALIDAUTH") && err.contains("LITEFS_CLOUD_TOKEN"),
        "{err}"
    );
    let out = run("viewer", &["import", "app", a.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("EFORBIDDEN"), "{err}");
    assert!(
        run("s3cret", &["import", "app", a.to_str().unwrap()])
            .status
            .success()
    );
    assert!(run("viewer", &["list"]).status.success());
}

/// A WAL database whose last transactions are only in its `-wal` (its writer still has it open,
/// so nothing was checkpointed) imports with them: the import reads what SQLite reads, from one
/// snapshot, and leaves the source as it was.
#[test]
fn import_reads_a_wal_database_as_sqlite_does() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("w.db");
    let writer = rusqlite::Connection::open(&src).unwrap();
    writer
        .execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
             CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 700)
             INSERT INTO t SELECT i, hex(randomblob(40)) FROM n;",
        )
        .unwrap();
    let wal = dir.path().join("w.db-wal");
    let wal_len = std::fs::metadata(&wal).unwrap().len();
    assert!(wal_len > 0, "the rows are in the -wal only");
    ok(&server, &["import", "w", src.to_str().unwrap()]);
    let out = dir.path().join("out.db");
    ok(&server, &["export", "w", out.to_str().unwrap()]);
    assert_eq!(count_rows(&out), "ok\n700\n");
    // The source was read, not checkpointed.
    assert_eq!(std::fs::metadata(&wal).unwrap().len(), wal_len);
    // A further commit of the open writer is in the next import.
    writer.execute("DELETE FROM t WHERE id > 600", []).unwrap();
    ok(&server, &["import", "w", src.to_str().unwrap()]);
    ok(&server, &["export", "w", out.to_str().unwrap(), "--force"]);
    assert_eq!(count_rows(&out), "ok\n600\n");
}

/// A rollback-journal database that another process keeps writing is imported as one
/// consistent snapshot: SQLite's shared lock holds its commits off while the file streams.
#[test]
fn import_of_a_database_being_written_is_one_snapshot() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("busy.db");
    make_db(&src, 2000);
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = {
        let (src, stop) = (src.clone(), stop.clone());
        std::thread::spawn(move || {
            let c = rusqlite::Connection::open(&src).unwrap();
            c.busy_timeout(Duration::from_secs(30)).unwrap();
            let mut batches = 0;
            while !stop.load(Ordering::SeqCst) {
                c.execute_batch(
                    "BEGIN IMMEDIATE;
                     WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < 100)
                     INSERT INTO t(v) SELECT hex(randomblob(200)) FROM n;
                     DELETE FROM t WHERE id IN (SELECT id FROM t ORDER BY random() LIMIT 100);
                     COMMIT;",
                )
                .unwrap();
                batches += 1;
            }
            batches
        })
    };
    let out = dir.path().join("out.db");
    for _ in 0..5 {
        ok(&server, &["import", "busy", src.to_str().unwrap()]);
        ok(
            &server,
            &["export", "busy", out.to_str().unwrap(), "--force"],
        );
        // Every batch inserts and deletes 100 rows: a snapshot has exactly 2000.
        assert_eq!(count_rows(&out), "ok\n2000\n");
    }
    stop.store(true, Ordering::SeqCst);
    assert!(writer.join().unwrap() > 0, "the writer committed meanwhile");
}
