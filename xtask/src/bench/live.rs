//! Workloads 3 and 4: a writer process committing while others read.
//!
//! Change visibility: a writer process commits single-row transactions `interval` apart and
//! prints the wall-clock time each commit returned; a reader process polls `max(id)` every
//! millisecond and prints the wall-clock time it first saw each row. Both clocks are the same
//! system clock, so the difference is the commit-to-seen latency. Plain SQLite (two processes on
//! one local file) and litevfs (two processes with their own caches, the writer holding the
//! lease) run in alternating rounds.
//!
//! Commits: single-row transactions per second, litevfs under a lease against plain SQLite in
//! DELETE journal mode with `synchronous=FULL` on the same disk, alternating repetitions.

use std::time::Duration;

use super::ctx::{Ctx, DbFile};
use super::driver::{Session, Side};
use super::report::Report;
use super::stats::Summary;
use crate::proc::Error;

pub const VIS: &str = "3 visibility";
pub const COMMITS: &str = "4 commits";
pub const LATENCY: &str = "commit->seen latency";
pub const TPS: &str = "single-row commits";

const PLAIN_DURABLE: &str = "exec PRAGMA journal_mode=DELETE; PRAGMA synchronous=FULL;";

pub fn visibility(
    ctx: &Ctx,
    db: &DbFile,
    url: Option<&str>,
    rep: &mut Report,
) -> Result<(), Error> {
    visibility_as(ctx, db, url.map(|u| (u, u)), rep, VIS, "", 0)
}

/// Change visibility with the writer on one page store and the reader on another (the same
/// one for workload 3); rows go to `group`, their names end with `label`.
pub fn visibility_as(
    ctx: &Ctx,
    db: &DbFile,
    urls: Option<(&str, &str)>,
    rep: &mut Report,
    group: &'static str,
    label: &str,
    ids_from: i64,
) -> Result<(), Error> {
    let url = urls;
    let rounds = 2u64;
    let n = ctx.p.vis_commits / rounds;
    let (mut plain, mut lv) = (vec![], vec![]);
    let mut lv_err = url.is_none().then(|| {
        Error(format!(
            "not run: {}",
            ctx.lv_missing.as_deref().unwrap_or("?")
        ))
    });
    for round in 0..rounds {
        // Row ids of this round: above every id an earlier round (of any workload) wrote.
        let base = ids_from + 1_000_000 * (round as i64 + 1);
        let (mut r, _) = ctx.drv.plain(&db.path)?;
        let (mut w, _) = ctx.drv.plain(&db.path)?;
        w.cmd(PLAIN_DURABLE)?;
        plain.extend(latencies(ctx, &mut r, &mut w, n, base)?);
        if let (Some((wu, ru)), None) = (url, &lv_err) {
            match litevfs_round(ctx, wu, ru, round, n, base) {
                Ok(v) => lv.extend(v),
                Err(e) => lv_err = Some(e),
            }
        }
    }
    let (ps, ls) = (Summary::of(plain), Summary::of(lv));
    let pct = |s: &Option<Summary>, q: f64| s.as_ref().map(|s| Summary::one(s.percentile(q)));
    let max = |s: &Option<Summary>| s.as_ref().map(|s| Summary::one(s.max()));
    rep.row(
        group,
        &format!("{LATENCY} p50{label}"),
        "ms",
        pct(&ps, 50.0),
        pct(&ls, 50.0),
    );
    rep.row(
        group,
        &format!("{LATENCY} p99{label}"),
        "ms",
        pct(&ps, 99.0),
        pct(&ls, 99.0),
    );
    rep.row(
        group,
        &format!("{LATENCY} max{label}"),
        "ms",
        max(&ps),
        max(&ls),
    );
    rep.row(
        group,
        &format!("{LATENCY}, all {} commits{label}", ctx.p.vis_commits),
        "ms",
        ps,
        ls,
    );
    if let Some(e) = lv_err {
        rep.fail(group, format!("litevfs side: {e}"));
    }
    Ok(())
}

fn litevfs_round(
    ctx: &Ctx,
    writer_url: &str,
    reader_url: &str,
    round: u64,
    n: u64,
    base: i64,
) -> Result<Vec<f64>, Error> {
    let (mut r, _) = ctx.drv.litevfs(
        "vis",
        reader_url,
        &ctx.dir(&format!("cache-vis-r{round}-{}", rand_tag(reader_url))),
    )?;
    let (mut w, _) = ctx.drv.litevfs(
        "vis",
        writer_url,
        &ctx.dir(&format!("cache-vis-w{round}-{}", rand_tag(writer_url))),
    )?;
    w.cmd("pragma litevfs_acquire_lease")?;
    let v = latencies(ctx, &mut r, &mut w, n, base)?;
    w.cmd("pragma litevfs_release_lease")?;
    Ok(v)
}

/// Runs one writer/reader round; returns each commit's commit-to-seen latency in ms.
fn latencies(
    ctx: &Ctx,
    reader: &mut Session,
    writer: &mut Session,
    n: u64,
    base: i64,
) -> Result<Vec<f64>, Error> {
    let interval = ctx.p.vis_interval_ms;
    let timeout = Duration::from_millis(n * interval + 30_000);
    reader.send(&format!("watch {n} {base} {} 1000", timeout.as_millis()))?;
    let first = reader.line(timeout)?;
    if first != "started" {
        return Err(Error(format!("reader: {first}")));
    }
    writer.send(&format!("writes {n} {interval} {base}"))?;
    let (committed, _) = writer
        .answer(timeout)
        .map_err(|e| Error(format!("writer: {}", e.0)))?;
    let (seen, _) = reader
        .answer(timeout)
        .map_err(|e| Error(format!("reader: {}", e.0)))?;
    let times = |lines: &[String], tag: &str| -> Vec<(u64, f64)> {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix(tag))
            .filter_map(|l| {
                let r = super::driver::Reply::parse(&format!("ok {l}")).ok()?;
                Some((r.num("k").ok()? as u64, r.num("t_us").ok()?))
            })
            .collect()
    };
    let (c, s) = (times(&committed, "c "), times(&seen, "s "));
    if c.len() as u64 != n || s.len() as u64 != n {
        return Err(Error(format!(
            "{} commits reported, {} seen, {n} expected",
            c.len(),
            s.len()
        )));
    }
    // A reader may see a row a few microseconds before the writer's commit call returns.
    Ok(c.iter()
        .zip(&s)
        .map(|((_, tc), (_, ts))| ((ts - tc) / 1e3).max(0.0))
        .collect())
}

/// A cache directory name part that differs between page stores (their ports).
fn rand_tag(url: &str) -> String {
    url.rsplit(':').next().unwrap_or("0").to_string()
}

pub fn commits(ctx: &Ctx, db: &DbFile, url: Option<&str>, rep: &mut Report) -> Result<(), Error> {
    commits_as(ctx, db, url, rep, COMMITS, "")
}

/// The commit rate in WAL mode (issue 11): litevfs against plain SQLite in WAL mode, at
/// `synchronous = NORMAL` and `FULL`, on a database of its own (`db` is imported as `walc`).
pub fn commits_wal(
    ctx: &Ctx,
    db: &DbFile,
    url: Option<&str>,
    rep: &mut Report,
) -> Result<(), Error> {
    for sync in ["NORMAL", "FULL"] {
        let mode = Mode {
            name: "walc",
            setup: format!("exec PRAGMA journal_mode=WAL; PRAGMA synchronous={sync};"),
            on_litevfs: true,
        };
        let label = format!(", WAL synchronous={sync}");
        commits_in(ctx, db, url, rep, COMMITS, &label, &mode)?;
    }
    Ok(())
}

/// Which store database a commit workload writes, and the SQL that sets its journal mode (on
/// the plain side always; on litevfs when `on_litevfs`).
struct Mode {
    name: &'static str,
    setup: String,
    on_litevfs: bool,
}

/// The commit rate; rows go to `group`, their names end with `label`.
pub fn commits_as(
    ctx: &Ctx,
    db: &DbFile,
    url: Option<&str>,
    rep: &mut Report,
    group: &'static str,
    label: &str,
) -> Result<(), Error> {
    let mode = Mode {
        name: "commits",
        setup: PLAIN_DURABLE.into(),
        on_litevfs: false,
    };
    commits_in(ctx, db, url, rep, group, label, &mode)
}

fn commits_in(
    ctx: &Ctx,
    db: &DbFile,
    url: Option<&str>,
    rep: &mut Report,
    group: &'static str,
    label: &str,
    mode: &Mode,
) -> Result<(), Error> {
    let (mut plain, _) = ctx.drv.plain(&db.path)?;
    plain.cmd(&mode.setup)?;
    let mut lv = match url {
        Some(u) => Side::from(ctx.drv.litevfs(
            mode.name,
            u,
            &ctx.dir(&format!("cache-{}-{}", mode.name, rand_tag(u))),
        )),
        None => Side::off(ctx.lv_missing.as_deref().unwrap_or("?")),
    };
    lv.run(|s| s.cmd("pragma litevfs_acquire_lease"));
    if mode.on_litevfs {
        lv.run(|s| s.cmd(&mode.setup));
    }
    if let Some(j) = lv.run(|s| s.cmd("pragma journal_mode")) {
        rep.notes
            .push(format!("{group}: litevfs journal mode: {}", j.text()));
    }
    plain.cmd("commits 20")?;
    lv.num("commits 20", "tps");
    let n = ctx.p.commit_n;
    let (mut p, mut l) = (vec![], vec![]);
    for i in 0..ctx.p.reps {
        if i % 2 == 1 {
            l.extend(lv.num(&format!("commits {n}"), "tps"));
        }
        p.push(plain.cmd(&format!("commits {n}"))?.num("tps")?);
        if i % 2 == 0 {
            l.extend(lv.num(&format!("commits {n}"), "tps"));
        }
    }
    lv.run(|s| s.cmd("pragma litevfs_release_lease"));
    rep.row(
        group,
        &format!("{TPS} ({n} per rep){label}"),
        "tx/s",
        Summary::of(p),
        Summary::of(l),
    );
    if let Some(e) = lv.err {
        rep.fail(group, format!("litevfs side: {e}"));
    }
    Ok(())
}
