//! Whole databases through `litevfs import` and `litevfs export` in bounded memory: the peak
//! resident memory of the CLI (its rusage) and of the server (VmHWM, reset before each step)
//! stays under [`BOUND_KIB`] for databases several times that size, on every backend.
//!
//! The default suite moves 256 MiB databases. The ignored tests move at least 3 GiB on the
//! local store and on `--store file://` (`LITEVFS_LARGE_BYTES` sets the size); they take minutes
//! and about eight times the size in free space under TMPDIR, and run with
//! `cargo xtask test --large`. Each step prints its size, time, rate and peaks; nothing here
//! asserts a duration.

#[macro_use]
mod server_support;

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

use server_support::{Server, free_space, same_files};

/// The bound on the peak resident memory of the CLI and of the server, in KiB.
const BOUND_KIB: u64 = 64 << 10;

/// Size of the databases of the default suite.
const DEFAULT_BYTES: u64 = 256 << 20;

/// A SQLite database of about `bytes` bytes: 4000-byte random rows, one per 4 KiB page.
fn make_db(path: &Path, bytes: u64) {
    let c = rusqlite::Connection::open(path).unwrap();
    c.execute_batch(&format!(
        "PRAGMA journal_mode = DELETE; PRAGMA synchronous = OFF; PRAGMA cache_size = -16384;
         CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < {})
         INSERT INTO t SELECT i, randomblob(4000) FROM n;",
        bytes / 4096
    ))
    .unwrap();
}

/// The command line (separated by U+001F) that [`measure_child`] runs, and the file it reports to.
const SPAWN_ENV: &str = "LITEVFS_TEST_MEASURE";
const REPORT_ENV: &str = "LITEVFS_TEST_MEASURE_REPORT";

/// Runs the CLI to completion against `host`; returns its exit status, its stderr and its peak
/// resident memory in KiB.
///
/// The kernel's peak for a process that was spawned (vfork, then exec) counts the memory of
/// the process that spawned it, so this test process (tens of MiB) would be counted in the
/// CLI's peak. A small process spawns it instead: this test binary run again, for
/// [`measure_child`] only.
fn run_measured(host: &str, args: &[&str]) -> (ExitStatus, String, u64) {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report");
    let mut spec = vec![env!("CARGO_BIN_EXE_litevfs")];
    spec.extend_from_slice(args);
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "measure_child",
            "--ignored",
            "--test-threads",
            "1",
        ])
        .env(SPAWN_ENV, spec.join("\u{1f}"))
        .env(REPORT_ENV, &report)
        .env("LITEFS_CLOUD_HOST", host)
        .env_remove("LITEFS_CLOUD_TOKEN")
        .env_remove("LITEFS_CLOUD_CLUSTER")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run the measuring helper");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let text = std::fs::read_to_string(&report)
        .unwrap_or_else(|e| panic!("the measuring helper reported nothing ({e}): {stderr}"));
    let (status, kib) = text.trim().split_once(' ').expect("status and peak");
    let status =
        <ExitStatus as std::os::unix::process::ExitStatusExt>::from_raw(status.parse().unwrap());
    (status, stderr, kib.parse().unwrap())
}

/// Not a test: the small process [`run_measured`] starts. It runs the command line it is given
/// (its output goes to this process's stdout and stderr), reaps it with `wait4` and writes
/// its raw wait status and peak resident memory (KiB) to the report file.
#[test]
#[ignore = "a helper process of run_measured, not a test"]
fn measure_child() {
    let (Ok(spec), Ok(report)) = (std::env::var(SPAWN_ENV), std::env::var(REPORT_ENV)) else {
        return;
    };
    let args: Vec<&str> = spec.split('\u{1f}').collect();
    // Reaped by wait4 below, which `Child::wait` cannot do (it drops the resource usage).
    #[allow(clippy::zombie_processes)]
    let child = Command::new(args[0])
        .args(&args[1..])
        .spawn()
        .expect("run the command");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to overwrite; `pid` is our child, not
    // yet reaped (the `Child` is never waited on).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4: {}", std::io::Error::last_os_error());
    std::fs::write(report, format!("{status} {}", usage.ru_maxrss)).unwrap();
}

/// The server's peak resident memory since its last reset, in KiB.
fn server_peak(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Resets the server's peak resident memory to its current size.
fn reset_peak(pid: u32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

/// Imports a database of about `bytes` bytes, exports it as SQLite (byte for byte the same)
/// and as LTX (verified by the CLI), and checks every peak against the bound.
fn round_trip_in_bounded_memory(bytes: u64) {
    let dir = tempfile::tempdir().unwrap();
    let need = bytes * 8;
    let free = free_space(dir.path());
    assert!(
        free >= need,
        "moving {bytes} bytes needs about {need} bytes free under {} (the source, the \
         server's spool and store, the exports); {free} are",
        dir.path().display()
    );
    let src = dir.path().join("src.db");
    make_db(&src, bytes);
    let size = std::fs::metadata(&src).unwrap().len();
    let server = Server::start_in(&dir.path().join("data"), &[]);
    let (out_db, out_ltx) = (dir.path().join("out.db"), dir.path().join("out.ltx"));
    let steps: [(&str, Vec<&str>); 3] = [
        ("import", vec!["import", "big", src.to_str().unwrap()]),
        (
            "export sqlite",
            vec!["export", "big", out_db.to_str().unwrap()],
        ),
        (
            "export ltx",
            vec![
                "export",
                "big",
                out_ltx.to_str().unwrap(),
                "--format",
                "ltx",
            ],
        ),
    ];
    let backend = server_support::backend();
    for (step, args) in steps {
        reset_peak(server.pid());
        let started = Instant::now();
        let (status, stderr, client_kib) = run_measured(&server.base, &args);
        let secs = started.elapsed().as_secs_f64();
        let server_kib = server_peak(server.pid());
        assert!(status.success(), "{step}: {stderr}");
        println!(
            "{backend:?} {step}: {size} bytes in {secs:.1} s ({:.0} MB/s); peak RSS: client \
             {client_kib} KiB, server {server_kib} KiB",
            size as f64 / secs / 1e6
        );
        assert!(
            client_kib < BOUND_KIB,
            "{step}: the CLI peaked at {client_kib} KiB moving {size} bytes"
        );
        assert!(
            server_kib < BOUND_KIB,
            "{step}: the server peaked at {server_kib} KiB moving {size} bytes"
        );
        if step == "export sqlite" {
            assert!(
                same_files(&src, &out_db),
                "the export differs from the source"
            );
            std::fs::remove_file(&out_db).unwrap();
        }
    }
}

fn bounded_memory() {
    round_trip_in_bounded_memory(DEFAULT_BYTES);
}

on_every_backend!(bounded_memory);

/// Size of the large tests: `LITEVFS_LARGE_BYTES`, else 3 GiB and a little more.
fn large_bytes() -> u64 {
    std::env::var("LITEVFS_LARGE_BYTES")
        .map(|s| s.parse().expect("LITEVFS_LARGE_BYTES is a number of bytes"))
        .unwrap_or((3 << 30) + (16 << 20))
}

#[test]
#[ignore = "minutes and gigabytes: run by `cargo xtask test --large`"]
fn large_local() {
    server_support::with_backend(server_support::Backend::Local, || {
        round_trip_in_bounded_memory(large_bytes())
    });
}

#[test]
#[ignore = "minutes and gigabytes: run by `cargo xtask test --large`"]
fn large_file() {
    server_support::with_backend(server_support::Backend::File, || {
        round_trip_in_bounded_memory(large_bytes())
    });
}
