//! Workload 1, warm reads: point lookups by primary key and a full-table scan on a database
//! several times larger than SQLite's page cache, with every page already in the litevfs cache
//! (filled with `PRAGMA litevfs_cache_db`, then one warm-up pass on each side).
//!
//! Plain SQLite and litevfs run in two long-lived driver processes, measured alternately (the
//! side that goes first swaps every repetition). Also records the host processes' peak RSS and
//! how many pages litevfs fetched during the measured repetitions (0: every read was a cache
//! hit; the change poller's requests still count as requests).

use super::ctx::{Ctx, DbFile};
use super::driver::Side;
use super::report::Report;
use super::stats::Summary;
use crate::proc::Error;

pub const NAME: &str = "1 warm reads";
pub const LOOKUPS: &str = "point lookups";
pub const SCAN: &str = "full scan";

pub fn run(ctx: &Ctx, db: &DbFile, url: Option<&str>, rep: &mut Report) -> Result<(), Error> {
    let p = &ctx.p;
    let (mut plain, _) = ctx.drv.plain(&db.path)?;
    let mut lv = match url {
        Some(u) => Side::from(ctx.drv.litevfs("warm", u, &ctx.dir("cache-warm"))),
        None => Side::off(ctx.lv_missing.as_deref().unwrap_or("no page store")),
    };
    let lookups = |seed: usize| format!("lookups {} {} {}", p.lookups, seed, p.warm_rows);
    println!("    warm-up: plain scan + lookups; litevfs PRAGMA litevfs_cache_db, scan + lookups");
    let plain_rows = plain.cmd("scan")?.num("rows")?;
    plain.cmd(&lookups(0))?;
    let fill = lv.num("pragma litevfs_cache_db", "ms");
    let lv_rows = lv.num("scan", "rows");
    lv.num(&lookups(0), "ms");
    if let Some(r) = lv_rows.filter(|r| *r != plain_rows) {
        lv.err = Some(Error(format!(
            "litevfs scan saw {r} rows, plain SQLite {plain_rows}"
        )));
        lv.s = None;
    }
    let before = lv.run(|s| s.cmd("pragma litevfs_cache_stats"));

    let (mut pl, mut ll, mut ps, mut ls) = (vec![], vec![], vec![], vec![]);
    for i in 0..p.reps {
        for side in order(i) {
            if side == 0 {
                pl.push(plain.cmd(&lookups(i + 1))?.num("ms")?);
                ps.push(plain.cmd("scan")?.num("ms")?);
            } else {
                ll.extend(lv.num(&lookups(i + 1), "ms"));
                ls.extend(lv.num("scan", "ms"));
            }
        }
    }
    let after = lv.run(|s| s.cmd("pragma litevfs_cache_stats"));
    let mb = db.bytes as f64 / 1e6;
    rep.row(
        NAME,
        &format!("{LOOKUPS} ({}k by primary key)", p.lookups / 1000),
        "ms",
        Summary::of(pl),
        Summary::of(ll),
    );
    rep.row(
        NAME,
        &format!("{SCAN} ({mb:.0} MB, {} rows)", p.warm_rows),
        "ms",
        Summary::of(ps),
        Summary::of(ls),
    );
    if let Some(ms) = fill {
        rep.row(
            NAME,
            "cache fill: PRAGMA litevfs_cache_db",
            "ms",
            None,
            Some(Summary::one(ms)),
        );
    }
    if let (Some(b), Some(a)) = (before, after) {
        let delta = |keys: &[&str]| Some(Summary::one(a.find_num(keys)? - b.find_num(keys)?));
        if let Some(d) = delta(&["pages_fetched", "fetched"]) {
            rep.row(
                NAME,
                "pages fetched during measured reps",
                "count",
                None,
                Some(d),
            );
        }
        if let Some(d) = delta(&["requests", "req"]) {
            rep.row(
                NAME,
                "  remote requests during measured reps",
                "count",
                None,
                Some(d),
            );
        }
        rep.notes.push(format!(
            "litevfs cache stats after workload 1: {}",
            a.text()
        ));
    }
    host_rss(rep, &mut plain, &mut lv, "host peak RSS, workload 1");
    if let Some(e) = lv.err {
        rep.fail(NAME, format!("litevfs side: {e}"));
    }
    Ok(())
}

/// 0 = plain, 1 = litevfs; who goes first alternates.
fn order(i: usize) -> [u8; 2] {
    if i.is_multiple_of(2) { [0, 1] } else { [1, 0] }
}

/// Adds a "6 memory" row with the peak RSS (MiB) of both driver processes.
pub fn host_rss(rep: &mut Report, plain: &mut super::driver::Session, lv: &mut Side, metric: &str) {
    let p = plain.cmd("rss").and_then(|r| r.num("hwm_kb")).ok();
    let l = lv.num("rss", "hwm_kb");
    let mib = |kb: Option<f64>| kb.map(|k| Summary::one(k / 1024.0));
    rep.row(super::MEMORY, metric, "MiB", mib(p), mib(l));
}
