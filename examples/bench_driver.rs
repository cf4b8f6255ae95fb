//! The measuring process of `cargo xtask bench`: one Rust host with a bundled (statically linked)
//! SQLite that runs the same queries on a plain local file or, after loading liblitevfs.so, on a
//! litevfs database.
//!
//! It owns the timing of each operation and nothing else: the xtask decides what to run, in
//! which order, against which server, and computes the statistics. Every answer is one line,
//! `ok key=value ...` or `err MESSAGE`, so the std-only xtask parses it with `split`; values never
//! contain spaces. Streaming commands print event lines before their final `ok`.
//!
//! ```text
//! bench_driver gen PATH ROWS PAYLOAD_BYTES   create table t(id, k, payload) with ROWS rows
//! bench_driver depth PATH                    b-tree depth of table t (pages from root to leaf)
//! bench_driver probe EXT                     load the extension; report SQLite's version
//! bench_driver download URL NAME OUT         GET /db/snapshot of NAME into OUT (a full download)
//! bench_driver session plain PATH            then commands on stdin, one answer each (below)
//! bench_driver session litevfs NAME EXT      env: LITEFS_CLOUD_HOST, LITEVFS_CACHE_DIR
//! ```
//!
//! Session commands: `lookups N SEED MAXID`, `lookup ID`, `range LO N`, `scan`,
//! `pragma TEXT`, `exec SQL`, `commits N`, `writes N INTERVAL_MS BASE`,
//! `watch N BASE TIMEOUT_MS POLL_US`, `rss`, `quit`. A session first answers
//! `ok open_ms=.. sqlite_version=..` once its database is open.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rusqlite::types::ValueRef;
use rusqlite::{Connection, LoadExtensionGuard, OpenFlags};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match a.as_slice() {
        ["gen", path, rows, payload] => gen_db(path, rows, payload),
        ["depth", path] => depth(path, "t").map(|d| format!("depth={d}")),
        ["probe", ext] => probe(ext),
        ["download", url, name, out] => download(url, name, out),
        ["session", "plain", path] => session(Target::Plain, path, None),
        ["session", "litevfs", name, ext] => session(Target::Litevfs, name, Some(ext)),
        _ => {
            Err("usage: bench_driver gen|depth|probe|download|session ... (see the source)".into())
        }
    };
    match result {
        Ok(line) if line.is_empty() => ExitCode::SUCCESS,
        Ok(line) => {
            println!("ok {line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("err {}", one_line(&e.to_string()));
            ExitCode::FAILURE
        }
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn ms(since: Instant) -> String {
    format!("{:.3}", since.elapsed().as_secs_f64() * 1e3)
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0)
}

/// splitmix64: a deterministic key sequence, identical for both targets.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Creates a rollback-journal database with `rows` rows of incompressible payload.
fn gen_db(path: &str, rows: &str, payload: &str) -> Res<String> {
    let (rows, payload): (u64, u64) = (rows.parse()?, payload.parse()?);
    let _ = std::fs::remove_file(path);
    let c = Connection::open(path)?;
    c.execute_batch(
        "PRAGMA page_size=4096; PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;
         CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER NOT NULL, payload BLOB NOT NULL);",
    )?;
    c.execute_batch("BEGIN")?;
    {
        let mut st = c.prepare("INSERT INTO t(id, k, payload) VALUES (?1, ?2, randomblob(?3))")?;
        let mut rng = Rng(rows);
        for id in 1..=rows {
            st.execute((id as i64, (rng.next() >> 1) as i64, payload as i64))?;
        }
    }
    c.execute_batch("COMMIT; PRAGMA journal_mode=DELETE;")?;
    let pages: i64 = c.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    drop(c);
    let bytes = std::fs::metadata(path)?.len();
    Ok(format!(
        "bytes={bytes} pages={pages} depth={}",
        depth(path, "t")?
    ))
}

/// Number of b-tree levels of `table`, read from the file: root to leftmost... rightmost leaf.
fn depth(path: &str, table: &str) -> Res<u32> {
    let c = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let root: i64 = c.query_row(
        "SELECT rootpage FROM sqlite_schema WHERE name=?1",
        [table],
        |r| r.get(0),
    )?;
    let page_size: i64 = c.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    let (root, page_size) = (root as u64, page_size as u64);
    drop(c);
    let data = std::fs::File::open(path)?;
    let (mut page, mut levels) = (root, 0u32);
    loop {
        let mut buf = vec![0u8; page_size as usize];
        std::os::unix::fs::FileExt::read_exact_at(&data, &mut buf, (page - 1) * page_size)?;
        let hdr = if page == 1 { 100 } else { 0 };
        levels += 1;
        match buf[hdr] {
            0x05 | 0x02 => page = u32::from_be_bytes(buf[hdr + 8..hdr + 12].try_into()?) as u64,
            0x0D | 0x0A => return Ok(levels),
            t => return Err(format!("page {page}: unexpected b-tree page type {t:#x}").into()),
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Plain,
    Litevfs,
}

/// Loads liblitevfs.so into this process's SQLite. The returned connection must stay open: the
/// library is unloaded when the connection that loaded it closes.
fn load_ext(ext: &str) -> Res<Connection> {
    let loader = Connection::open_in_memory()?;
    // SAFETY: we load our own extension, built from this repository.
    unsafe {
        let _guard = LoadExtensionGuard::new(&loader)?;
        loader.load_extension(ext, None::<&str>)?;
    }
    Ok(loader)
}

fn probe(ext: &str) -> Res<String> {
    let _loader = load_ext(ext)?;
    Ok(format!("sqlite_version={}", rusqlite::version()))
}

fn download(url: &str, name: &str, out: &str) -> Res<String> {
    let http = reqwest::blocking::Client::builder().timeout(None).build()?;
    let t = Instant::now();
    let mut resp = http
        .get(format!("{}/db/snapshot", url.trim_end_matches('/')))
        .query(&[("db", name), ("format", "sqlite")])
        .send()?;
    if !resp.status().is_success() {
        return Err(format!(
            "HTTP {}: {}",
            resp.status(),
            resp.text().unwrap_or_default()
        )
        .into());
    }
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(out)?);
    let bytes = resp.copy_to(&mut f)?;
    f.flush()?;
    Ok(format!("ms={} bytes={bytes}", ms(t)))
}

/// Opens the database and answers commands from stdin until `quit` or EOF.
fn session(target: Target, db: &str, ext: Option<&str>) -> Res<String> {
    let _loader = ext.map(load_ext).transpose()?;
    let t = Instant::now();
    let rw = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_URI;
    let c = match target {
        Target::Plain => Connection::open_with_flags(db, rw | OpenFlags::SQLITE_OPEN_CREATE)?,
        Target::Litevfs => Connection::open_with_flags_and_vfs(db, rw, c"litevfs")?,
    };
    // Same SQLite page cache (the default 2000 KiB) for both targets, set explicitly.
    c.execute_batch("PRAGMA cache_size=-2000; PRAGMA busy_timeout=10000;")?;
    println!(
        "ok open_ms={} sqlite_version={}",
        ms(t),
        rusqlite::version()
    );
    let mut out = std::io::stdout();
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.trim() == "quit" {
            break;
        }
        match command(&c, &line) {
            Ok(r) => writeln!(out, "ok {r}")?,
            Err(e) => writeln!(out, "err {}", one_line(&e.to_string()))?,
        }
        out.flush()?;
    }
    Ok(String::new())
}

fn arg<T: std::str::FromStr>(a: &[&str], i: usize) -> Res<T> {
    let s = a.get(i).ok_or_else(|| format!("missing argument {i}"))?;
    s.parse().map_err(|_| format!("bad argument {s:?}").into())
}

fn command(c: &Connection, line: &str) -> Res<String> {
    let a: Vec<&str> = line.split_whitespace().collect();
    match a.first().copied().unwrap_or("") {
        "lookups" => lookups(c, arg(&a, 1)?, arg(&a, 2)?, arg(&a, 3)?),
        "lookup" => {
            let t = Instant::now();
            let n: i64 = c.query_row(
                "SELECT count(*) FROM t WHERE id=?1",
                [arg::<i64>(&a, 1)?],
                |r| r.get(0),
            )?;
            Ok(format!("ms={} rows={n}", ms(t)))
        }
        "range" => range(c, arg(&a, 1)?, arg(&a, 2)?),
        "scan" => {
            let t = Instant::now();
            let (n, s): (i64, i64) =
                c.query_row("SELECT count(*), total(k % 1000) FROM t", [], |r| {
                    Ok((r.get(0)?, r.get::<_, f64>(1)? as i64))
                })?;
            Ok(format!("ms={} rows={n} sum={s}", ms(t)))
        }
        "pragma" => pragma(c, line.trim_start()["pragma".len()..].trim()),
        "exec" => {
            let t = Instant::now();
            c.execute_batch(line.trim_start()["exec".len()..].trim())?;
            Ok(format!("ms={}", ms(t)))
        }
        "commits" => commits(c, arg(&a, 1)?),
        "writes" => writes(c, arg(&a, 1)?, arg(&a, 2)?, arg(&a, 3)?),
        "watch" => watch(c, arg(&a, 1)?, arg(&a, 2)?, arg(&a, 3)?, arg(&a, 4)?),
        "rss" => rss(),
        other => Err(format!("unknown command {other:?}").into()),
    }
}

/// `n` point lookups by primary key on keys drawn from 1..=max_id.
fn lookups(c: &Connection, n: u64, seed: u64, max_id: u64) -> Res<String> {
    let mut st = c.prepare_cached("SELECT k, length(payload) FROM t WHERE id=?1")?;
    let mut rng = Rng(seed);
    let (t, mut found) = (Instant::now(), 0u64);
    for _ in 0..n {
        let id = 1 + rng.next() % max_id;
        let mut rows = st.query([id as i64])?;
        if rows.next()?.is_some() {
            found += 1;
        }
    }
    Ok(format!("ms={} found={found}", ms(t)))
}

fn range(c: &Connection, lo: i64, n: i64) -> Res<String> {
    let t = Instant::now();
    let mut st =
        c.prepare("SELECT id, length(payload) FROM t WHERE id >= ?1 ORDER BY id LIMIT ?2")?;
    let rows = st.query_map([lo, n], |r| r.get::<_, i64>(0))?.count();
    Ok(format!("ms={} rows={rows}", ms(t)))
}

/// Runs `PRAGMA text` and flattens whatever it returns into key=value pairs.
fn pragma(c: &Connection, text: &str) -> Res<String> {
    let t = Instant::now();
    let mut st = c.prepare(&format!("PRAGMA {text}"))?;
    let names: Vec<String> = st.column_names().map(|s| s.to_string()).collect();
    let mut pairs = Vec::new();
    let mut rows = st.query([])?;
    while let Some(row) = rows.next()? {
        let vals: Vec<String> = (0..names.len())
            .map(|i| value_text(row.get_ref(i)))
            .collect();
        if vals.len() == 2 && vals[0].parse::<f64>().is_err() {
            pairs.push((vals[0].clone(), vals[1].clone()));
        } else {
            pairs.extend(names.iter().cloned().zip(vals));
        }
    }
    let mut out = String::new();
    for (k, v) in pairs {
        out.push_str(&expand(&k, &v));
    }
    Ok(format!("ms={}{out}", ms(t)))
}

fn value_text(v: rusqlite::Result<ValueRef<'_>>) -> String {
    match v {
        Ok(ValueRef::Null) => "NULL".into(),
        Ok(ValueRef::Integer(n)) => n.to_string(),
        Ok(ValueRef::Real(f)) => f.to_string(),
        Ok(ValueRef::Text(t)) => String::from_utf8_lossy(t).into_owned(),
        Ok(ValueRef::Blob(b)) => format!("<{}bytes>", b.len()),
        Err(e) => format!("<{e}>"),
    }
}

/// ` key=value`, or the pairs inside a value that is itself `a=1 b=2`, `a: 1, b: 2` or flat JSON.
fn expand(key: &str, value: &str) -> String {
    let v = value.trim().trim_start_matches('{').trim_end_matches('}');
    let parts: Vec<(String, String)> = v
        .split([',', ' ', '\n', ';'])
        .filter_map(|p| p.split_once(['=', ':']))
        .map(|(k, v)| (clean(k), clean(v)))
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .collect();
    if parts.is_empty() {
        return format!(" {}={}", clean(key), clean(value));
    }
    parts.iter().map(|(k, v)| format!(" {k}={v}")).collect()
}

fn clean(s: &str) -> String {
    let s = s.trim().trim_matches('"');
    s.chars()
        .map(|c| {
            if c.is_whitespace() || c == '=' {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// `n` single-row transactions (autocommit inserts); reports their rate.
fn commits(c: &Connection, n: u64) -> Res<String> {
    let mut st = c.prepare_cached("INSERT INTO t(k, payload) VALUES (?1, randomblob(100))")?;
    let t = Instant::now();
    for i in 0..n {
        st.execute([i as i64])?;
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(format!(
        "ms={:.3} n={n} tps={:.1}",
        secs * 1e3,
        n as f64 / secs
    ))
}

/// Commits row `base + k` for k in 1..=n, one transaction each, `interval_ms` apart; prints
/// `c k=K t_us=T` with the wall-clock time at which each commit returned.
fn writes(c: &Connection, n: u64, interval_ms: u64, base: i64) -> Res<String> {
    let mut st = c.prepare_cached("INSERT INTO t(id, k, payload) VALUES (?1, ?2, x'00')")?;
    let mut commit_ms = Vec::new();
    for k in 1..=n as i64 {
        let t = Instant::now();
        st.execute([base + k, k])?;
        let done = now_us();
        commit_ms.push(t.elapsed().as_secs_f64() * 1e3);
        println!("c k={k} t_us={done}");
        std::io::stdout().flush()?;
        std::thread::sleep(Duration::from_millis(interval_ms));
    }
    commit_ms.sort_by(f64::total_cmp);
    Ok(format!(
        "n={n} commit_p50_ms={:.3}",
        commit_ms.get(commit_ms.len() / 2).unwrap_or(&0.0)
    ))
}

/// Polls `max(id)` every `poll_us` until row `base + n` is visible; prints `s k=K t_us=T` with
/// the wall-clock time at which row `base + K` was first seen. Prints `started` first.
fn watch(c: &Connection, n: i64, base: i64, timeout_ms: u64, poll_us: u64) -> Res<String> {
    let mut st = c.prepare_cached("SELECT coalesce(max(id), 0) FROM t")?;
    let mut last: i64 = st.query_row([], |r| r.get(0))?;
    if last > base {
        return Err(format!("rows above {base} already exist (max id {last})").into());
    }
    last = base;
    println!("started");
    std::io::stdout().flush()?;
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    let (mut polls, mut busy) = (0u64, 0u64);
    // A busy database is polled again, not waited for: SQLite's busy handler sleeps for
    // milliseconds and would add that to the latency measured.
    c.busy_timeout(Duration::ZERO)?;
    while last < base + n {
        if Instant::now() > deadline {
            return Err(format!("timed out: saw {} of {n} commits", last - base).into());
        }
        polls += 1;
        let m: i64 = match st.query_row([], |r| r.get(0)) {
            Ok(m) => m,
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy =>
            {
                busy += 1;
                std::thread::sleep(Duration::from_micros(poll_us));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if m > last {
            let t = now_us();
            for id in last + 1..=m.min(base + n) {
                println!("s k={} t_us={t}", id - base);
            }
            std::io::stdout().flush()?;
            last = m;
        }
        std::thread::sleep(Duration::from_micros(poll_us));
    }
    c.busy_timeout(Duration::from_secs(10))?;
    Ok(format!("polls={polls} busy={busy}"))
}

/// Peak and current resident set size of this process, from /proc/self/status.
fn rss() -> Res<String> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("0")
            .to_string()
    };
    Ok(format!(
        "hwm_kb={} rss_kb={}",
        field("VmHWM:"),
        field("VmRSS:")
    ))
}
