//! The admin subcommands (`litevfs list/import/export/copy/delete/restore`) as a user runs them:
//! the real binary against a real `litevfs serve` on loopback.

mod server_support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use server_support::{Server, free_space, same_files};

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

/// A SQLite database of about `bytes` bytes (random 4000-byte rows, so nothing compresses).
fn make_sized_db(path: &Path, bytes: u64) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch(&format!(
        "PRAGMA journal_mode = DELETE; PRAGMA synchronous = OFF;
         CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < {})
         INSERT INTO t SELECT i, randomblob(4000) FROM n;",
        bytes / 4096
    ))
    .unwrap();
}

/// Runs the CLI as `token` (none if empty) against `host`.
fn as_user(host: &str, token: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_litevfs"));
    cmd.args(args)
        .env("LITEFS_CLOUD_HOST", host)
        .env_remove("LITEFS_CLOUD_CLUSTER")
        .env_remove("RUST_BACKTRACE");
    match token {
        "" => cmd.env_remove("LITEFS_CLOUD_TOKEN"),
        t => cmd.env("LITEFS_CLOUD_TOKEN", t),
    };
    cmd.output().expect("run litevfs")
}

/// `--max-body-size` bounds transactions, not imports: a database many times larger imports
/// and exports byte for byte.
#[test]
fn an_import_is_not_subject_to_the_body_size_limit() {
    let server = Server::start(&["--max-body-size", "1MiB"]);
    let dir = tempfile::tempdir().unwrap();
    let (src, out) = (dir.path().join("src.db"), dir.path().join("out.db"));
    make_sized_db(&src, 24 << 20);
    ok(&server, &["import", "app", src.to_str().unwrap()]);
    ok(&server, &["export", "app", out.to_str().unwrap()]);
    assert!(same_files(&src, &out));
}

/// Every refusal of an import names the server's code and message, including those that come
/// while the database is still being sent: the server reads (and discards) at most 64 MiB of a
/// refused body, so with a larger database the connection breaks under the client, which must
/// still report the reply and not the broken connection ("receiver is gone").
#[test]
fn every_refusal_of_an_import_prints_the_servers_code_and_message() {
    let server = Server::start(&[
        "--token",
        "s3cret=default:rw",
        "--token",
        "viewer=default:ro",
        "--token",
        "admin=*:rw",
    ]);
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.db");
    make_sized_db(&big, 96 << 20);
    let file = big.to_str().unwrap();
    let cases: [(&str, &[&str], &str); 3] = [
        ("wrong", &[], "EINVALIDAUTH: invalid token"),
        ("viewer", &[], "EFORBIDDEN: read-only token"),
        (
            "admin",
            &["--cluster", "no/slash"],
            "EBADCLUSTER: invalid cluster",
        ),
    ];
    for (token, extra, want) in cases {
        let mut args = vec!["import", "app", file];
        args.extend_from_slice(extra);
        let out = as_user(&server.base, token, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{token}: {err}");
        assert!(
            err.contains(want) && err.contains(&server.base),
            "{token}: {err}"
        );
    }

    // A database larger than the server's free disk space (a sparse file: it takes no room
    // here) is refused with the server's 413.
    let huge = dir.path().join("huge.db");
    make_db(&huge, 10);
    let size = (free_space(dir.path()) * 2 + (1 << 30)) / 4096 * 4096;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&huge)
        .unwrap()
        .set_len(size)
        .unwrap();
    let out = as_user(
        &server.base,
        "s3cret",
        &["import", "huge", huge.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("ETOOLARGE: the server has no room for a body of"),
        "{err}"
    );

    let list = String::from_utf8(as_user(&server.base, "s3cret", &["list"]).stdout).unwrap();
    assert_eq!(list.lines().count(), 1, "nothing was imported: {list}");
    assert!(
        as_user(&server.base, "s3cret", &["import", "app", file])
            .status
            .success()
    );
}

/// A store that cannot be reached, and one whose connection breaks mid-upload without a
/// reply: both say so, with the host, and that nothing was imported.
#[test]
fn an_unreachable_or_vanishing_store_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db");
    make_sized_db(&db, 8 << 20);
    let file = db.to_str().unwrap();

    let out = as_user("http://127.0.0.1:9", "", &["import", "app", file]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot reach the page store at http://127.0.0.1:9"),
        "{err}"
    );

    // A "store" that reads 1 MiB of the request and hangs up.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = format!("http://{}", listener.local_addr().unwrap());
    let cut = std::thread::spawn(move || {
        use std::io::Read;
        let (mut sock, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0;
        while got < 1 << 20 {
            match sock.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    });
    let out = as_user(&host, "", &["import", "app", file]);
    cut.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "the connection to the page store at {host} broke after"
        )) && err.contains("nothing was imported"),
        "{err}"
    );
}

/// Runs `cmd` with its stderr on a new pseudo-terminal; returns its exit status, its stdout
/// and what it wrote to the terminal.
fn on_terminal(mut cmd: Command) -> (std::process::ExitStatus, String, String) {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes the two descriptors it opens; the optional arguments are null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: both descriptors were just opened by openpty and are owned by nothing else.
    let (master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            OwnedFd::from_raw_fd(slave),
        )
    };
    cmd.stderr(std::process::Stdio::from(slave))
        .stdout(std::process::Stdio::piped());
    let child = cmd.spawn().expect("run litevfs");
    // The terminal reads end (EIO) once no process holds its other side: drop ours.
    drop(cmd);
    let reader = std::thread::spawn(move || {
        let mut master = master;
        let mut out = Vec::new();
        let _ = master.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    });
    let out = child.wait_with_output().unwrap();
    let term = reader.join().unwrap();
    (out.status, String::from_utf8(out.stdout).unwrap(), term)
}

/// The progress line appears on a terminal, never with --quiet, never on a pipe; the result
/// line goes to stdout either way.
#[test]
fn progress_only_on_a_terminal_and_never_with_quiet() {
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("a.db");
    make_sized_db(&db, 4 << 20);
    let out = dir.path().join("out.db");
    let cmd = |args: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_litevfs"));
        c.args(args)
            .env("LITEFS_CLOUD_HOST", &server.base)
            .env_remove("LITEFS_CLOUD_TOKEN")
            .env_remove("LITEFS_CLOUD_CLUSTER");
        c
    };
    let (db_s, out_s) = (db.to_str().unwrap(), out.to_str().unwrap());

    let (st, stdout, term) = on_terminal(cmd(&["import", "app", db_s]));
    assert!(
        st.success() && stdout.starts_with("imported "),
        "{stdout}{term}"
    );
    assert!(
        term.contains("import app: 4.0") && term.contains("the store is committing it"),
        "{term:?}"
    );
    let (st, stdout, term) = on_terminal(cmd(&["export", "app", out_s, "--force"]));
    assert!(
        st.success() && stdout.starts_with("exported "),
        "{stdout}{term}"
    );
    assert!(term.contains("export app: 4.0"), "{term:?}");
    let (st, stdout, term) = on_terminal(cmd(&["copy", "app", "app2"]));
    assert!(
        st.success() && stdout.starts_with("copied "),
        "{stdout}{term}"
    );
    assert!(
        term.contains("export app: ") && term.contains("import app2: "),
        "{term:?}"
    );

    for args in [
        &["import", "app", db_s, "--quiet"][..],
        &["export", "app", out_s, "--force", "-q"],
        &["copy", "app", "app3", "--quiet"],
    ] {
        let (st, stdout, term) = on_terminal(cmd(args));
        assert!(
            st.success() && !stdout.is_empty(),
            "{args:?}: {stdout}{term}"
        );
        assert_eq!(term, "", "{args:?}");
    }
    for args in [
        &["import", "app", db_s][..],
        &["export", "app", out_s, "--force"],
        &["copy", "app", "app4"],
    ] {
        let out = cmd(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(out.stderr.is_empty(), "{args:?}: {:?}", out.stderr);
    }
}

fn repack(dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_litevfs"))
        .args(["repack", "--data-dir", dir.to_str().unwrap()])
        .env_remove("LITEVFS_DATA_DIR")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run litevfs repack")
}

fn store_bytes(data: &Path) -> u64 {
    ["store.db", "store.db-wal"]
        .iter()
        .map(|f| std::fs::metadata(data.join(f)).map_or(0, |m| m.len()))
        .sum()
}

/// A store created with 8 KiB store pages (as every store was before 32 KiB ones) holds about
/// twice its data; `litevfs repack` rewrites it while the server is stopped, refuses while it
/// runs, and keeps every database, position and retained state.
#[test]
fn repack_rewrites_an_old_store_compactly_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    {
        let c = rusqlite::Connection::open(data.join("store.db")).unwrap();
        c.pragma_update(None, "page_size", 8192).unwrap();
        let mode: String = c
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    // Under 8 MiB each: a larger upload keeps its pages in a file of `objects/`, which a repack
    // leaves as it is.
    make_sized_db(&a, 6 << 20);
    make_db(&b, 900);
    let data_bytes =
        std::fs::metadata(&a).unwrap().len() * 2 + std::fs::metadata(&b).unwrap().len();

    let server = Server::start_in(&data, &[]);
    ok(&server, &["import", "app", a.to_str().unwrap()]);
    ok(&server, &["import", "app", b.to_str().unwrap()]);
    ok(&server, &["import", "other", a.to_str().unwrap()]);
    let list = ok(&server, &["list"]);

    let err = String::from_utf8(repack(&data).stderr).unwrap();
    assert!(
        err.contains("in use by another litevfs serve"),
        "a running server's store is left alone: {err}"
    );
    server.kill9();
    let before = store_bytes(&data);
    assert!(
        before > data_bytes * 17 / 10,
        "8 KiB store pages hold one 4 KiB page each: {before} bytes for {data_bytes}"
    );

    let out = repack(&data);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("8192 -> 32768"), "{stdout}");
    let after = store_bytes(&data);
    assert!(
        after < data_bytes * 5 / 4,
        "repacked: {after} bytes for {data_bytes} of data"
    );
    assert!(!data.join("store.db-wal").exists());
    assert!(!data.join("store.db.repack").exists());
    let page_size: u32 = rusqlite::Connection::open(data.join("store.db"))
        .unwrap()
        .pragma_query_value(None, "page_size", |r| r.get(0))
        .unwrap();
    assert_eq!(page_size, 32768);

    // Everything is there: positions, content, history. A partial copy an interrupted repack
    // left is removed at start.
    std::fs::write(data.join("store.db.repack"), b"a copy cut short").unwrap();
    let server = Server::start_in(&data, &[]);
    assert!(!data.join("store.db.repack").exists());
    assert_eq!(ok(&server, &["list"]), list);
    let out = dir.path().join("out.db");
    ok(&server, &["export", "app", out.to_str().unwrap()]);
    assert!(same_files(&out, &b));
    ok(
        &server,
        &["export", "other", out.to_str().unwrap(), "--force"],
    );
    assert!(same_files(&out, &a));
    ok(&server, &["restore", "app", "--txid", "0000000000000001"]);
    ok(
        &server,
        &["export", "app", out.to_str().unwrap(), "--force"],
    );
    assert!(same_files(&out, &a));
    drop(server);

    // Bad input: no store there.
    let none = repack(&dir.path().join("nothing"));
    assert!(!none.status.success());
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(err.contains("holds no store"), "{err}");
}

fn backup(data: &Path, dest: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_litevfs"))
        .args(["backup", "--data-dir", data.to_str().unwrap()])
        .arg(dest)
        .env_remove("LITEVFS_DATA_DIR")
        .output()
        .expect("run litevfs backup")
}

/// `litevfs backup` copies a local store while its server runs and commits, as one committed
/// state: store.db and the object files it names. The copy serves every database it holds.
#[test]
fn backup_of_a_running_store_is_consistent_and_serves() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
    // Over 8 MiB: kept in an object file; under: rows of store.db.
    make_sized_db(&a, 12 << 20);
    make_db(&b, 900);
    let flags = ["--retention", "200ms", "--compaction-interval", "100ms"];
    let server = Server::start_in(&data, &flags);
    ok(&server, &["import", "big", a.to_str().unwrap()]);
    ok(&server, &["import", "small", b.to_str().unwrap()]);
    ok(&server, &["import", "gone", a.to_str().unwrap()]);
    ok(&server, &["delete", "gone"]);
    // Imports keep landing (and retention keeps dropping versions) while the backup runs.
    let stop = AtomicBool::new(false);
    let dest = dir.path().join("copy");
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) || n < 3 {
                let f = if n % 2 == 0 { &a } else { &b };
                ok(&server, &["import", "busy", f.to_str().unwrap()]);
                n += 1;
            }
            n
        });
        std::thread::sleep(Duration::from_millis(300));
        let out = backup(&data, &dest);
        stop.store(true, Ordering::Relaxed);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("object file(s)"), "{stdout}");
        assert!(writer.join().unwrap() >= 3);
    });
    // Into a directory that is not empty, or from one without a store: refused, nothing written.
    let again = backup(&data, &dest);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("not empty"), "{err}");
    let none = backup(&dir.path().join("nothing"), &dir.path().join("c2"));
    let err = String::from_utf8_lossy(&none.stderr);
    assert!(
        !none.status.success() && err.contains("holds no store"),
        "{err}"
    );
    assert!(!dir.path().join("c2").exists());
    drop(server);

    let copy = Server::start_in(&dest, &[]);
    let list = ok(&copy, &["list"]);
    assert!(list.contains("big") && list.contains("small") && list.contains("busy"));
    assert!(!list.contains("gone"), "{list}");
    let out = dir.path().join("out.db");
    ok(&copy, &["export", "big", out.to_str().unwrap()]);
    assert!(same_files(&out, &a));
    ok(
        &copy,
        &["export", "small", out.to_str().unwrap(), "--force"],
    );
    assert!(same_files(&out, &b));
    ok(&copy, &["export", "busy", out.to_str().unwrap(), "--force"]);
    assert!(same_files(&out, &a) || same_files(&out, &b));
}
