//! The client processes of `cargo xtask torture`: a Rust host with a bundled SQLite that loads
//! liblitevfs.so and plays one role against a litevfs database. The xtask starts, kills, stops
//! and judges them; this program only does its role and reports what SQLite told it, one line
//! per event, so the std-only xtask can parse the output with `split`.
//!
//! ```text
//! torture_worker writer NAME EXT ROWS     commit groups of ROWS rows (k, i) until stdin closes:
//!                                         `ack K` after each COMMIT that succeeded, `fail K CODE`
//!                                         after one that failed (the group is retried),
//!                                         `unknown K CODE` for LITEVFS_IOERR_COMMIT_UNKNOWN, then
//!                                         `ack K` or nothing once a read shows whether it landed;
//!                                         at the end `stats JSON` (litevfs_cache_stats)
//! torture_worker check NAME EXT ROWS [FROM]
//!                                         `ok groups=G max=K torn=T dup=D gaps=P integrity=I` of
//!                                         the groups from FROM on (integrity_check only without)
//! torture_worker counter NAME EXT N       N lease-guarded increments of one counter: `hold A B`
//!                                         per committed increment (monotonic ns when the lease
//!                                         was taken / when COMMIT returned), then
//!                                         `done incs=I busy=B fails=F`
//! torture_worker bank NAME EXT init       100 accounts of 1000
//! torture_worker bank NAME EXT transfer   transfers until stdin closes: `done commits=C fails=F`
//! torture_worker bank NAME EXT audit      reads until stdin closes: `done reads=R wrong=W errors=E`
//! torture_worker stopped NAME EXT         takes the lease, writes a row, says `ready`, commits
//!                                         after a line on stdin: `committed` or `fail CODE`
//! torture_worker digest NAME EXT          `ok rows=N digest=HEX` of table g, or `err ...`
//! torture_worker query NAME EXT SQL       `ok VALUE`: the first column of the first row
//! ```
//!
//! Environment: LITEFS_CLOUD_HOST, LITEVFS_CACHE_DIR (as for any litevfs host);
//! TORTURE_JOURNAL_MODE (`delete`, `wal`, ...): `writer` and `bank transfer` set that journal
//! mode first.

use std::io::BufRead;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, LoadExtensionGuard, OpenFlags};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// `LITEVFS_IOERR_COMMIT_UNKNOWN`: the commit's reply was lost and the store stayed unreachable.
const COMMIT_UNKNOWN: i32 = 0x554E4B0A;
const SQLITE_READONLY: i32 = 8;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match a.as_slice() {
        ["writer", name, ext, rows] => writer(name, ext, rows.parse().unwrap_or(10)),
        ["check", name, ext, rows] => check(name, ext, rows.parse().unwrap_or(10), 0),
        ["check", name, ext, rows, from] => check(
            name,
            ext,
            rows.parse().unwrap_or(10),
            from.parse().unwrap_or(0),
        ),
        ["counter", name, ext, n] => counter(name, ext, n.parse().unwrap_or(10)),
        ["bank", name, ext, role] => bank(name, ext, role),
        ["stopped", name, ext] => stopped(name, ext),
        ["digest", name, ext] => digest(name, ext),
        ["query", name, ext, sql] => query(name, ext, sql),
        _ => Err(
            "usage: torture_worker writer|check|counter|bank|stopped|digest ... (see the source)"
                .into(),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("err {}", e.to_string().replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

/// Loads the extension; the returned connection must stay open while litevfs is used.
fn load(ext: &str) -> Res<Connection> {
    let loader = Connection::open_in_memory()?;
    // SAFETY: we load our own extension, built from this repository.
    unsafe {
        let _guard = LoadExtensionGuard::new(&loader)?;
        loader.load_extension(ext, None::<&str>)?;
    }
    Ok(loader)
}

fn open(name: &str) -> Res<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_URI;
    let c = Connection::open_with_flags_and_vfs(name, flags, c"litevfs")?;
    c.busy_timeout(Duration::from_secs(5))?;
    Ok(c)
}

/// The extended result code of an SQLite error (0 if it is not one).
fn code(e: &rusqlite::Error) -> i32 {
    match e {
        rusqlite::Error::SqliteFailure(f, _) => f.extended_code,
        _ => 0,
    }
}

fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::DatabaseBusy)
}

/// Takes the write lease, waiting while another process holds it (at most `patience`).
fn acquire(c: &Connection, patience: Duration) -> Res<u64> {
    let deadline = Instant::now() + patience;
    let mut busy = 0;
    loop {
        match c.query_row("PRAGMA litevfs_acquire_lease", [], |_| Ok(())) {
            Ok(()) => return Ok(busy),
            Err(e) if is_busy(&e) && Instant::now() < deadline => {
                busy += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) if Instant::now() < deadline && code(&e) != 0 && !is_busy(&e) => {
                // The store is restarting: try again shortly.
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("cannot take the lease: {e}").into()),
        }
    }
}

/// A flag that turns true when stdin closes (the xtask's way to end a role).
fn stdin_closed() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            if line.is_err() {
                break;
            }
        }
        f.store(true, Ordering::SeqCst);
    });
    flag
}

fn group_count(c: &Connection, k: i64) -> rusqlite::Result<i64> {
    c.query_row("SELECT count(*) FROM g WHERE k = ?1", [k], |r| r.get(0))
}

fn writer(name: &str, ext: &str, rows: i64) -> Res<()> {
    let _loader = load(ext)?;
    let c = open(name)?;
    acquire(&c, Duration::from_secs(60))?;
    set_journal_mode(&c)?;
    c.execute_batch("CREATE TABLE IF NOT EXISTS g(k INTEGER, i INTEGER, pad BLOB)")?;
    let mut k: i64 = c.query_row("SELECT coalesce(max(k), 0) + 1 FROM g", [], |r| r.get(0))?;
    let stop = stdin_closed();
    while !stop.load(Ordering::SeqCst) {
        let r = c.execute_batch(&format!(
            "BEGIN IMMEDIATE;
             WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {rows})
             INSERT INTO g SELECT {k}, i, randomblob(300) FROM s;
             COMMIT;"
        ));
        match r {
            Ok(()) => {
                println!("ack {k}");
                k += 1;
            }
            Err(e) => {
                let _ = c.execute_batch("ROLLBACK");
                let code = code(&e);
                if code == COMMIT_UNKNOWN {
                    println!("unknown {k} {code}");
                    // As an application must: look before retrying.
                    loop {
                        match group_count(&c, k) {
                            Ok(n) if n == rows => {
                                println!("ack {k}");
                                k += 1;
                                break;
                            }
                            Ok(_) => break,
                            Err(_) => std::thread::sleep(Duration::from_millis(100)),
                        }
                    }
                } else {
                    println!("fail {k} {code}");
                    std::thread::sleep(Duration::from_millis(20));
                }
                if (code & 0xff == SQLITE_READONLY || !holds_lease(&c))
                    && acquire(&c, Duration::from_secs(60)).is_err()
                {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
    let stats: String = c.query_row("PRAGMA litevfs_cache_stats", [], |r| r.get(0))?;
    println!("stats {stats}");
    let _ = c.query_row("PRAGMA litevfs_release_lease", [], |_| Ok(()));
    Ok(())
}

fn holds_lease(c: &Connection) -> bool {
    c.query_row("PRAGMA litevfs_lease", [], |r| r.get::<_, String>(0))
        .map(|s| s.contains("\"held\":true"))
        .unwrap_or(false)
}

fn check(name: &str, ext: &str, rows: i64, from: i64) -> Res<()> {
    let _loader = load(ext)?;
    let c = open(name)?;
    let integrity: String = if from == 0 {
        c.query_row("PRAGMA integrity_check", [], |r| r.get(0))?
    } else {
        "ok".into()
    };
    let from = from.max(1);
    let mut st = c.prepare("SELECT k, count(*) FROM g WHERE k >= ?1 GROUP BY k ORDER BY k")?;
    let groups: Vec<(i64, i64)> = st
        .query_map([from], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let torn = groups.iter().filter(|(_, n)| *n % rows != 0).count();
    let dup = groups.iter().filter(|(_, n)| *n > rows).count();
    let max = groups.last().map_or(from - 1, |g| g.0);
    let gaps = ((max - from + 1).max(0) as usize).saturating_sub(groups.len());
    println!(
        "ok groups={} max={max} torn={torn} dup={dup} gaps={gaps} integrity={}",
        groups.len(),
        integrity.replace(' ', "_")
    );
    Ok(())
}

/// Monotonic nanoseconds, comparable between processes of one host.
fn mono_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

fn counter(name: &str, ext: &str, n: u64) -> Res<()> {
    let _loader = load(ext)?;
    let c = open(name)?;
    let (mut incs, mut busy, mut fails) = (0u64, 0u64, 0u64);
    for _ in 0..n {
        busy += acquire(&c, Duration::from_secs(120))?;
        let held = mono_ns();
        let r = c.execute_batch(
            "BEGIN IMMEDIATE;
             CREATE TABLE IF NOT EXISTS c(id INTEGER PRIMARY KEY, v INTEGER);
             INSERT OR IGNORE INTO c VALUES (1, 0);
             UPDATE c SET v = v + 1 WHERE id = 1;
             COMMIT;",
        );
        match r {
            Ok(()) => {
                incs += 1;
                // The interval this process relied on the lease: two such intervals of
                // different processes must never overlap.
                println!("hold {held} {}", mono_ns());
            }
            Err(_) => {
                let _ = c.execute_batch("ROLLBACK");
                fails += 1;
            }
        }
        c.query_row("PRAGMA litevfs_release_lease", [], |_| Ok(()))?;
    }
    println!("done incs={incs} busy={busy} fails={fails}");
    Ok(())
}

const ACCOUNTS: i64 = 100;
const BALANCE: i64 = 1000;

fn bank(name: &str, ext: &str, role: &str) -> Res<()> {
    let _loader = load(ext)?;
    let c = open(name)?;
    match role {
        "init" => {
            acquire(&c, Duration::from_secs(60))?;
            c.execute_batch(&format!(
                "CREATE TABLE acct(id INTEGER PRIMARY KEY, bal INTEGER NOT NULL, pad BLOB);
                 WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {ACCOUNTS})
                 INSERT INTO acct SELECT i, {BALANCE}, randomblob(2000) FROM s;"
            ))?;
            c.query_row("PRAGMA litevfs_release_lease", [], |_| Ok(()))?;
            println!("ok");
        }
        "transfer" => {
            acquire(&c, Duration::from_secs(60))?;
            set_journal_mode(&c)?;
            let stop = stdin_closed();
            let (mut commits, mut fails, mut seed) = (0u64, 0u64, 0x9E37_79B9_7F4A_7C15u64);
            while !stop.load(Ordering::SeqCst) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let a = (seed % ACCOUNTS as u64) as i64 + 1;
                let b = ((seed >> 20) % ACCOUNTS as u64) as i64 + 1;
                let amount = ((seed >> 40) % 50) as i64;
                let r = c.execute_batch(&format!(
                    "BEGIN IMMEDIATE;
                     UPDATE acct SET bal = bal - {amount}, pad = randomblob(2000) WHERE id = {a};
                     UPDATE acct SET bal = bal + {amount}, pad = randomblob(2000) WHERE id = {b};
                     COMMIT;"
                ));
                match r {
                    Ok(()) => commits += 1,
                    Err(_) => {
                        let _ = c.execute_batch("ROLLBACK");
                        fails += 1;
                    }
                }
            }
            println!("done commits={commits} fails={fails}");
        }
        "audit" => {
            let stop = stdin_closed();
            let (mut reads, mut wrong, mut errors) = (0u64, 0u64, 0u64);
            while !stop.load(Ordering::SeqCst) {
                let r = c.query_row("SELECT count(*), sum(bal) FROM acct", [], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?))
                });
                match r {
                    Ok((n, sum)) if n == ACCOUNTS && sum == ACCOUNTS * BALANCE => reads += 1,
                    Ok(_) => wrong += 1,
                    Err(_) => errors += 1,
                }
            }
            println!("done reads={reads} wrong={wrong} errors={errors}");
        }
        _ => return Err(format!("unknown bank role {role}").into()),
    }
    Ok(())
}

/// `PRAGMA journal_mode = $TORTURE_JOURNAL_MODE`, when set.
fn set_journal_mode(c: &Connection) -> Res<()> {
    if let Ok(mode) = std::env::var("TORTURE_JOURNAL_MODE") {
        c.query_row(&format!("PRAGMA journal_mode = {mode}"), [], |_| Ok(()))?;
    }
    Ok(())
}

fn stopped(name: &str, ext: &str) -> Res<()> {
    let _loader = load(ext)?;
    let c = open(name)?;
    acquire(&c, Duration::from_secs(60))?;
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS s(who TEXT);
         BEGIN IMMEDIATE;
         INSERT INTO s VALUES ('stopped');",
    )?;
    println!("ready");
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    match c.execute_batch("COMMIT") {
        Ok(()) => println!("committed"),
        Err(e) => {
            let _ = c.execute_batch("ROLLBACK");
            println!("fail {}", code(&e));
        }
    }
    Ok(())
}

fn query(name: &str, ext: &str, sql: &str) -> Res<()> {
    let _loader = load(ext)?;
    let c = open(name)?;
    let v: rusqlite::types::Value = c.query_row(sql, [], |r| r.get(0))?;
    match v {
        rusqlite::types::Value::Integer(i) => println!("ok {i}"),
        rusqlite::types::Value::Text(t) => println!("ok {}", t.replace(' ', "_")),
        other => println!("ok {other:?}"),
    }
    Ok(())
}

fn digest(name: &str, ext: &str) -> Res<()> {
    let _loader = load(ext)?;
    let c = open(name)?;
    let mut st = c.prepare("SELECT k, i, pad FROM g ORDER BY k, i")?;
    let mut rows = st.query([])?;
    // FNV-1a over every value: equal content, equal digest.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut n = 0u64;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
    };
    while let Some(r) = rows.next()? {
        feed(&r.get::<_, i64>(0)?.to_le_bytes());
        feed(&r.get::<_, i64>(1)?.to_le_bytes());
        feed(&r.get::<_, Vec<u8>>(2)?);
        n += 1;
    }
    println!("ok rows={n} digest={h:016x}");
    Ok(())
}
