//! `cargo xtask demo`: the whole system, end to end, on a throwaway store.
//!
//! Starts `litevfs serve` on loopback, imports a sample database of a few megabytes, then drives
//! two real `sqlite3` shells with `.load liblitevfs.so`: a reader that opens the database lazily,
//! and a writer in another process that takes the lease and commits. The reader then sees the
//! writer's rows. Every step prints what it did; a failure names the step.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::proc::{Error, Server, Shell, output_checked};
use crate::setup;

const SAMPLE_ROWS: u32 = 40_000;

struct Step {
    n: usize,
    total: usize,
}

impl Step {
    fn next(&mut self, what: &str) {
        self.n += 1;
        println!("\n[{}/{}] {what}", self.n, self.total);
    }
}

fn in_step<T>(name: &str, r: Result<T, Error>) -> Result<T, Error> {
    r.map_err(|e| Error(format!("step \"{name}\": {e}")))
}

pub fn run() -> Result<(), Error> {
    let mut step = Step { n: 0, total: 7 };
    step.next("set-up: system packages (libclang for the build, the sqlite3 shell)");
    in_step("set-up", setup::ensure_system(false))?;
    println!("    everything needed is installed");

    step.next("build: cargo build --release");
    let art = in_step("build", setup::build_release())?;
    println!("    {}\n    {}", art.bin.display(), art.ext.display());

    let tmp = std::env::temp_dir().join(format!("litevfs-demo-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let result = run_steps(&mut step, &art, &tmp);
    let _ = std::fs::remove_dir_all(&tmp);
    result?;
    println!("\ndemo finished: lazy read, leased write, and the reader saw the write.");
    Ok(())
}

fn run_steps(step: &mut Step, art: &setup::Artifacts, tmp: &Path) -> Result<(), Error> {
    step.next("start the page store: litevfs serve on loopback with a temporary data directory");
    let server = in_step(
        "start server",
        Server::start(&art.bin, &tmp.join("data"), &[]),
    )?;
    println!("    listening on {}", server.url);

    step.next("put a sample database in the store: litevfs import");
    let total_pages = in_step("sample database", import_sample(art, tmp, &server.url))?;

    step.next("reader (sqlite3 process 1): .load liblitevfs.so, open lazily, query");
    let ext = art.ext.to_string_lossy().to_string();
    let env = |cache: &str| -> Vec<(String, String)> {
        vec![
            ("LITEFS_CLOUD_HOST".into(), server.url.clone()),
            (
                "LITEVFS_CACHE_DIR".into(),
                tmp.join(cache).to_string_lossy().into(),
            ),
            ("RUST_LOG".into(), "warn".into()),
        ]
    };
    let mut reader = in_step("reader", Shell::start(&env("cache-reader")))?;
    let out = in_step(
        "reader",
        reader.exec(&format!(
            ".load {ext}\n.open file:demo?vfs=litevfs\n.mode list\n\
             SELECT 'row 31337: ' || id || ' ' || kind FROM events WHERE id = 31337;\n\
             SELECT 'rows with id 100..120: ' || count(*) FROM events WHERE id BETWEEN 100 AND 120;\n\
             PRAGMA litevfs_cache_stats;"
        )),
    )?;
    print_indented(&out);
    let fetched = json_number(&out, "pages_fetched");
    let requests = json_number(&out, "requests");
    match (fetched, requests) {
        (Some(f), Some(r)) => println!(
            "    => lazy open: fetched {f} of {total_pages} pages ({:.1}%) in {r} requests",
            100.0 * f as f64 / total_pages as f64
        ),
        _ => {
            return Err(Error(format!(
                "step \"reader\": no page counts in litevfs_cache_stats: {out}"
            )));
        }
    }

    step.next("writer (sqlite3 process 2): acquire the lease, insert, commit, release");
    let mut writer = in_step("writer", Shell::start(&env("cache-writer")))?;
    let out = in_step(
        "writer",
        writer.exec(&format!(
            ".load {ext}\n.open file:demo?vfs=litevfs\n.mode list\n\
             .print acquire lease:\n\
             PRAGMA litevfs_acquire_lease;\n\
             BEGIN;\n\
             INSERT INTO events(id, ts, kind, payload) VALUES ({a}, 0, 'demo-write', 'hello'), ({b}, 0, 'demo-write', 'from'), ({c}, 0, 'demo-write', 'the writer');\n\
             COMMIT;\n\
             .print committed; position (txid/checksum):\n\
             PRAGMA litevfs_position;\n\
             .print release lease:\n\
             PRAGMA litevfs_release_lease;",
            a = SAMPLE_ROWS + 1,
            b = SAMPLE_ROWS + 2,
            c = SAMPLE_ROWS + 3
        )),
    )?;
    print_indented(&out);
    let committed = Instant::now();
    drop(writer);

    step.next("reader sees the new rows (background change polling, no reopen)");
    let seen = in_step("reader sees write", wait_for_rows(&mut reader))?;
    println!(
        "    reader saw the 3 new rows {} ms after the commit returned",
        seen.duration_since(committed).as_millis()
    );
    let out = in_step(
        "reader sees write",
        reader.exec(&format!(
            "SELECT id, payload FROM events WHERE id > {SAMPLE_ROWS} ORDER BY id;"
        )),
    )?;
    print_indented(&out);
    drop(reader);
    server.stop();
    println!("    page store stopped");
    Ok(())
}

/// Builds the sample database with the sqlite3 shell and imports it; returns its page count.
fn import_sample(art: &setup::Artifacts, tmp: &Path, url: &str) -> Result<u64, Error> {
    let db = tmp.join("sample.db");
    let sql = format!(
        "PRAGMA page_size=4096;\n\
         CREATE TABLE events(id INTEGER PRIMARY KEY, ts INTEGER, kind TEXT, payload TEXT);\n\
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM n WHERE i < {SAMPLE_ROWS})\n\
         INSERT INTO events SELECT i, 1700000000 + i, 'kind-' || (i % 7), hex(randomblob(60)) FROM n;\n\
         CREATE INDEX events_kind ON events(kind);\n\
         SELECT page_count FROM pragma_page_count;"
    );
    let pages = output_checked(
        Command::new("sqlite3").arg(&db).arg(sql),
        "sqlite3 (create sample)",
    )?;
    let pages: u64 = pages
        .trim()
        .parse()
        .map_err(|_| Error(format!("unexpected page count {pages:?}")))?;
    let size = std::fs::metadata(&db)?.len();
    println!(
        "    sample.db: {SAMPLE_ROWS} rows, {:.1} MB, {pages} pages of 4096 bytes",
        size as f64 / 1e6
    );
    let out = output_checked(
        Command::new(&art.bin)
            .args(["import", "demo"])
            .arg(&db)
            .args(["--host", url]),
        "litevfs import",
    )?;
    print_indented(&out);
    let out = output_checked(
        Command::new(&art.bin).args(["list", "--host", url]),
        "litevfs list",
    )?;
    print_indented(&out);
    Ok(pages)
}

/// Polls the reader until it sees the writer's three rows (at most 15 s).
fn wait_for_rows(reader: &mut Shell) -> Result<Instant, Error> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = reader.exec(&format!(
            "SELECT count(*) FROM events WHERE id > {SAMPLE_ROWS};"
        ))?;
        if out.trim() == "3" {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            return Err(Error(format!(
                "after 15 s the reader still sees {} new rows, not 3",
                out.trim()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The integer after `"key":` in a line of JSON, without a JSON parser (xtask is std-only).
fn json_number(s: &str, key: &str) -> Option<u64> {
    let at = s.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = s[at..].chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

fn print_indented(s: &str) {
    for line in s.lines() {
        println!("    | {line}");
    }
}
