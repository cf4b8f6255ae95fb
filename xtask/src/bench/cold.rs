//! Workload 2, cold reads: the first point lookup and the first small range query on the big
//! database, each in a fresh process with an empty litevfs cache, against one page store (with or
//! without its per-request delay); a cold full scan and a cold `PRAGMA integrity_check` of the
//! whole database (what read-ahead is for); and a full download of the same database at the
//! same delay, for comparison.
//!
//! Requests, pages and bytes are counted by the server (`GET /metrics` before and after, not
//! counting `/metrics` itself) and, when the extension reports them, by `litevfs_cache_stats`.
//! Plain SQLite's "cold" read is a fresh process on a local file (the OS page cache stays warm;
//! dropping it would disturb the rest of the machine).

use super::ctx::{Ctx, DbFile, metrics};
use super::driver::Reply;
use super::report::Report;
use super::stats::Summary;
use crate::proc::Error;

pub const NAME: &str = "2 cold reads";

pub fn lookup_metric(delay: u64) -> String {
    format!("first point lookup (open+query), delay {delay} ms")
}
pub fn requests_metric(delay: u64) -> String {
    format!("  point lookup: requests (server), delay {delay} ms")
}
pub fn page_requests_metric(delay: u64) -> String {
    format!("  point lookup: page requests (GET /db/page), delay {delay} ms")
}
pub fn download_metric(delay: u64) -> String {
    format!("full download (GET /db/snapshot), delay {delay} ms")
}

/// Whole-database walks on a cold cache: (metric name, driver command).
pub const WALKS: [(&str, &str); 2] = [
    ("cold full scan", "scan"),
    ("cold integrity_check", "pragma integrity_check"),
];

pub fn walk_metric(what: &str, delay: u64) -> String {
    format!("{what} of the whole database, delay {delay} ms")
}

/// What one cold query cost on the litevfs side.
#[derive(Default)]
pub struct Cost {
    pub ms: Vec<f64>,
    pub open_ms: Vec<f64>,
    pub requests: Vec<f64>,
    pub page_requests: Vec<f64>,
    pub pages: Vec<f64>,
    pub kib: Vec<f64>,
    pub vfs_requests: Vec<f64>,
    pub hwm_kb: Vec<f64>,
    /// GETs to the object store (`--store` only).
    pub bucket_gets: Vec<f64>,
    /// Requests by route of the first repetition.
    pub routes: String,
}

pub fn run(
    ctx: &Ctx,
    db: &DbFile,
    url: Option<&str>,
    delay: u64,
    rep: &mut Report,
) -> Result<(), Error> {
    let rows = ctx.p.big_rows;
    let (mut pl, mut pr, mut p_hwm) = (vec![], vec![], vec![]);
    let (mut look, mut range) = (Cost::default(), Cost::default());
    let mut lv_err = url.is_none().then(|| {
        Error(format!(
            "not run: {}",
            ctx.lv_missing.as_deref().unwrap_or("?")
        ))
    });
    for i in 0..ctx.p.cold_reps as u64 {
        let id = 1 + (i * 2_654_435_761 + 12_345) % rows;
        let lo = 1 + (i * 40_503 + 777_777) % (rows - 200);
        let queries = [
            (format!("lookup {id}"), &mut pl, &mut look),
            (format!("range {lo} 100"), &mut pr, &mut range),
        ];
        for (q, plain_ms, cost) in queries {
            let (ms, hwm) = plain_once(ctx, db, &q)?;
            plain_ms.push(ms);
            p_hwm.push(hwm);
            if let (Some(u), None) = (url, &lv_err) {
                let cache = ctx.dir(&format!("cache-cold-{delay}-{i}"));
                match litevfs_once(ctx, u, &cache, &q, cost) {
                    Ok(()) => {}
                    Err(e) => lv_err = Some(Error(format!("{q}: {e}"))),
                }
                let _ = std::fs::remove_dir_all(&cache);
            }
        }
    }
    let one = Summary::of;
    rep.row(
        NAME,
        &lookup_metric(delay),
        "ms",
        one(pl),
        one(look.ms.clone()),
    );
    let open_metric = format!("  point lookup: of which opening the database, delay {delay} ms");
    rep.row(NAME, &open_metric, "ms", None, one(look.open_ms.clone()));
    cost_rows(rep, "point lookup", delay, &look, true);
    if !look.routes.is_empty() {
        rep.notes.push(format!(
            "workload 2, delay {delay} ms: requests of a cold point lookup by route: {}",
            look.routes
        ));
        rep.notes.push(format!(
            "workload 2, delay {delay} ms: requests of a cold range query by route: {}",
            range.routes
        ));
    }
    rep.row(
        NAME,
        &format!("first range query (100 rows), delay {delay} ms"),
        "ms",
        one(pr),
        one(range.ms.clone()),
    );
    cost_rows(rep, "range query", delay, &range, false);
    if let (Some(u), None) = (url, &lv_err)
        && let Err(e) = warm_restart(ctx, u, delay, rep)
    {
        lv_err = Some(e);
    }
    let mut walks = Vec::new();
    for (what, q) in WALKS {
        let (mut plain, mut cost) = (vec![], Cost::default());
        for i in 0..ctx.p.walk_reps {
            plain.push(plain_once(ctx, db, q)?.0);
            if let (Some(u), None) = (url, &lv_err) {
                let cache = ctx.dir(&format!("cache-walk-{delay}-{i}"));
                if let Err(e) = litevfs_once(ctx, u, &cache, q, &mut cost) {
                    lv_err = Some(Error(format!("{q}: {e}")));
                }
                let _ = std::fs::remove_dir_all(&cache);
            }
        }
        rep.row(
            NAME,
            &walk_metric(what, delay),
            "ms",
            Summary::of(plain),
            Summary::of(cost.ms.clone()),
        );
        cost_rows(rep, what, delay, &cost, false);
        walks.push((what, cost.ms));
    }
    if let (Some(u), None) = (url, &lv_err) {
        match downloads(ctx, db, u, delay, rep) {
            Ok(full_ms) => {
                for (what, ms) in walks {
                    let ratio: Vec<f64> = ms.iter().map(|m| m / full_ms).collect();
                    rep.row(
                        NAME,
                        &format!("  {what}: time / full download time, delay {delay} ms"),
                        "ratio",
                        None,
                        Summary::of(ratio),
                    );
                }
            }
            Err(e) => lv_err = Some(e),
        }
    }
    let hwm: Vec<f64> = look.hwm_kb.iter().chain(&range.hwm_kb).copied().collect();
    let mib = |v: Vec<f64>| {
        v.into_iter()
            .reduce(f64::max)
            .map(|k| Summary::one(k / 1024.0))
    };
    rep.row(
        super::MEMORY,
        &format!("host peak RSS, workload 2 (delay {delay} ms)"),
        "MiB",
        mib(p_hwm),
        mib(hwm),
    );
    if let Some(e) = lv_err {
        rep.fail(
            &format!("{NAME} (delay {delay} ms)"),
            format!("litevfs side: {e}"),
        );
    }
    Ok(())
}

fn cost_rows(rep: &mut Report, what: &str, delay: u64, c: &Cost, primary: bool) {
    let one = |v: &Vec<f64>| Summary::of(v.clone());
    let req = if primary {
        requests_metric(delay)
    } else {
        format!("  {what}: requests (server), delay {delay} ms")
    };
    rep.row(NAME, &req, "count", None, one(&c.requests));
    let page_req = format!("  {what}: page requests (GET /db/page), delay {delay} ms");
    rep.row(NAME, &page_req, "count", None, one(&c.page_requests));
    rep.row(
        NAME,
        &format!("  {what}: pages fetched (server), delay {delay} ms"),
        "count",
        None,
        one(&c.pages),
    );
    rep.row(
        NAME,
        &format!("  {what}: KiB fetched (server), delay {delay} ms"),
        "KiB",
        None,
        one(&c.kib),
    );
    if !c.vfs_requests.is_empty() {
        rep.row(
            NAME,
            &format!("  {what}: requests (litevfs_cache_stats), delay {delay} ms"),
            "count",
            None,
            one(&c.vfs_requests),
        );
    }
}

/// A fresh plain-SQLite process runs `q` once: (open + query ms, peak RSS kB).
pub fn plain_once(ctx: &Ctx, db: &DbFile, q: &str) -> Result<(f64, f64), Error> {
    let (mut s, open) = ctx.drv.plain(&db.path)?;
    let ms = open.num("open_ms")? + s.cmd(q)?.num("ms")?;
    Ok((ms, s.cmd("rss")?.num("hwm_kb")?))
}

/// A fresh litevfs process with an empty cache runs `q` once; adds what it cost to `c`.
pub fn litevfs_once(
    ctx: &Ctx,
    url: &str,
    cache: &std::path::Path,
    q: &str,
    c: &mut Cost,
) -> Result<(), Error> {
    let _ = std::fs::remove_dir_all(cache);
    let m0 = metrics(url)?;
    let (mut s, open) = ctx.drv.litevfs("big", url, cache)?;
    let r = s.cmd(q)?;
    let m1 = metrics(url)?;
    let stats: Option<Reply> = s.cmd("pragma litevfs_cache_stats").ok();
    c.ms.push(open.num("open_ms")? + r.num("ms")?);
    c.open_ms.push(open.num("open_ms")?);
    c.requests.push(m1.requests - m0.requests);
    let page_reqs = |m: &super::ctx::Metrics| m.routes.get("GET /db/page").copied().unwrap_or(0.0);
    c.page_requests.push(page_reqs(&m1) - page_reqs(&m0));
    if c.routes.is_empty() {
        c.routes = m1.routes_since(&m0);
    }
    c.pages.push(m1.pages - m0.pages);
    c.bucket_gets.push(m1.bucket_gets - m0.bucket_gets);
    c.kib.push((m1.bytes - m0.bytes) / 1024.0);
    if let Some(v) = stats.and_then(|st| st.find_num(&["request", "req"])) {
        c.vfs_requests.push(v);
    }
    c.hwm_kb.push(s.cmd("rss")?.num("hwm_kb")?);
    Ok(())
}

pub fn warm_restart_metric(delay: u64) -> String {
    format!("warm restart: requests of open + the same point lookup (server), delay {delay} ms")
}

/// A process fills a persistent cache (`LITEVFS_CACHE_DIR`) with a point lookup and exits; the
/// next one, on that cache, repeats it: what does revalidating the cache cost?
fn warm_restart(ctx: &Ctx, url: &str, delay: u64, rep: &mut Report) -> Result<(), Error> {
    let cache = ctx.dir(&format!("cache-restart-{delay}"));
    let _ = std::fs::remove_dir_all(&cache);
    let q = "lookup 4242";
    {
        let (mut s, _) = ctx.drv.litevfs("big", url, &cache)?;
        s.cmd(q)?;
    }
    let (mut reqs, mut ms) = (vec![], vec![]);
    for _ in 0..ctx.p.cold_reps.min(3) {
        let m0 = metrics(url)?;
        let (mut s, open) = ctx.drv.litevfs("big", url, &cache)?;
        let r = s.cmd(q)?;
        drop(s);
        reqs.push(metrics(url)?.requests - m0.requests);
        ms.push(open.num("open_ms")? + r.num("ms")?);
    }
    let _ = std::fs::remove_dir_all(&cache);
    rep.row(
        NAME,
        &warm_restart_metric(delay),
        "count",
        None,
        Summary::of(reqs),
    );
    rep.row(
        NAME,
        &format!("  warm restart: open + point lookup, delay {delay} ms"),
        "ms",
        None,
        Summary::of(ms),
    );
    Ok(())
}

/// Full downloads of the database at this delay: time and throughput; returns the median time.
fn downloads(
    ctx: &Ctx,
    db: &DbFile,
    url: &str,
    delay: u64,
    rep: &mut Report,
) -> Result<f64, Error> {
    let out = ctx.dir("download.db");
    let (mut ms, mut mbs) = (vec![], vec![]);
    for _ in 0..ctx.p.cold_reps.min(3) {
        let r = ctx
            .drv
            .once(&["download", url, "big", &out.to_string_lossy()])?;
        let (t, bytes) = (r.num("ms")?, r.num("bytes")?);
        if bytes as u64 != db.bytes {
            return Err(Error(format!(
                "full download returned {bytes} bytes, the database has {}",
                db.bytes
            )));
        }
        ms.push(t);
        mbs.push(bytes / 1e6 / (t / 1e3));
        let _ = std::fs::remove_file(&out);
    }
    let median = Summary::of(ms.clone()).map_or(f64::NAN, |s| s.median());
    rep.row(NAME, &download_metric(delay), "ms", None, Summary::of(ms));
    rep.row(
        NAME,
        &format!("  full download throughput, delay {delay} ms"),
        "MB/s",
        None,
        Summary::of(mbs),
    );
    Ok(median)
}
