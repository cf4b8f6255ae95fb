//! The process-level experiments: kills, races, stops, lost replies, readers, cache corruption.
//! Each runs until its share of the budget is spent (at least one trial) and judges the store
//! afterwards with fresh processes.

use std::time::{Duration, Instant};

use super::Tally;
use super::support::{Ctx, LossyProxy, Rng, Store, Worker, field, json_field, run_worker};
use crate::proc::Error;

/// Rows per committed group of the writer role.
const ROWS: &str = "10";
const LONG: Duration = Duration::from_secs(120);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn acks(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("ack ")?.parse().ok())
        .collect()
}

/// What `check` says about the groups in database `db`.
struct Check {
    groups: u64,
    max: u64,
    torn: u64,
    dup: u64,
    gaps: u64,
    integrity_ok: bool,
}

/// Checks the groups of `db` from group `from` on (all of them, and `integrity_check`, for 0),
/// from a process with its own cache directory, kept between checks.
fn check(ctx: &Ctx, url: &str, db: &str, from: u64) -> Result<Check, Error> {
    let cache = ctx.dir.join(format!("{db}-check"));
    std::fs::create_dir_all(&cache)?;
    let from = from.to_string();
    let line = run_worker(ctx, url, &cache, &["check", db, ROWS, &from])?;
    let get = |k| field(&line, k).ok_or_else(|| Error(format!("check {db}: {line}")));
    Ok(Check {
        groups: get("groups")?,
        max: get("max")?,
        torn: get("torn")?,
        dup: get("dup")?,
        gaps: get("gaps")?,
        integrity_ok: line.contains("integrity=ok"),
    })
}

/// Judges the groups of `db` against the highest acknowledged group: every acknowledged group
/// there once and whole, at most one unacknowledged group (the one in flight) past it.
fn judge(t: &mut Tally, c: &Check, last_ack: u64, db: &str) {
    if c.max < last_ack {
        t.lost += last_ack - c.max;
        t.notes.push(format!(
            "{db}: acknowledged up to {last_ack}, the store has {}",
            c.max
        ));
    }
    if c.gaps > 0 {
        t.lost += c.gaps;
        t.notes
            .push(format!("{db}: {} groups missing below {}", c.gaps, c.max));
    }
    if c.torn > 0 {
        t.torn += c.torn;
        t.notes.push(format!("{db}: {} torn groups", c.torn));
    }
    if c.dup > 0 {
        t.wrong += c.dup;
        t.notes.push(format!(
            "{db}: {} groups applied twice (a COMMIT reported failed had landed)",
            c.dup
        ));
    }
    if c.max > last_ack + 1 {
        t.wrong += 1;
        t.notes.push(format!(
            "{db}: {} unacknowledged groups landed past {last_ack}",
            c.max - last_ack
        ));
    }
    if !c.integrity_ok {
        t.wrong += 1;
        t.notes.push(format!("{db}: integrity_check failed"));
    }
}

/// Ends a writer role and counts what it reported: acknowledged groups, and lost replies
/// settled or left unknown (from its closing `stats` line). Returns its lines, its acks and
/// that line.
fn finish_writer(t: &mut Tally, w: Worker) -> (Vec<String>, Vec<u64>, String) {
    let (lines, status) = w.finish(LONG);
    if !status.is_some_and(|s| s.success()) {
        t.crashes += 1;
        t.notes.push(format!("the writer ended with {status:?}"));
    }
    let a = acks(&lines);
    t.acked = a.len() as u64;
    let stats = lines
        .iter()
        .find(|l| l.starts_with("stats "))
        .cloned()
        .unwrap_or_default();
    t.resolved =
        json_field(&stats, "lost_replies_landed") + json_field(&stats, "lost_replies_failed");
    t.unresolved = json_field(&stats, "commits_unknown");
    (lines, a, stats)
}

fn crashed(t: &mut Tally, store: &mut Store) -> Result<(), Error> {
    if let Some(status) = store.crashed() {
        t.crashes += 1;
        t.notes
            .push(format!("the page store died by itself: {status}"));
        store.restart()?;
    }
    Ok(())
}

/// kill -9 of a writer at a random moment of its commit loop, over and over; each next writer
/// continues on the same cache directory. Every other writer runs with `LITEVFS_TXN_MEMORY=0`,
/// so the kill also lands in spilled transactions.
pub fn writer_kill(ctx: &Ctx, budget: Duration, rng: &mut Rng) -> Result<Tally, Error> {
    let mut t = Tally::default();
    let mut store = Store::start(ctx, "writer-kill", &[])?;
    let url = store.url();
    let cache = ctx.subdir("writer-kill-cache");
    let deadline = Instant::now() + budget;
    let mut last_ack = 0;
    while t.trials == 0 || Instant::now() < deadline {
        let first = last_ack;
        // Every other writer keeps nothing of its transactions in memory: its pages, journal
        // (or WAL) and LTX live in spill files when it is killed. Every other pair of writers
        // runs in WAL mode (issue 11), so the database also goes back and forth.
        let spill = if t.trials % 2 == 1 { "0" } else { "16MiB" };
        let mode = if (t.trials / 2) % 2 == 1 {
            "wal"
        } else {
            "delete"
        };
        let env = [
            ("LITEVFS_TXN_MEMORY", spill),
            ("TORTURE_JOURNAL_MODE", mode),
        ];
        let mut w = Worker::spawn_with(ctx, &url, &cache, &["writer", "wk", ROWS], &env)?;
        if w.expect("ack ", LONG).is_none() {
            t.notes
                .push(format!("a writer never committed: {:?}", w.seen.last()));
        }
        std::thread::sleep(ms(rng.range(0, 300)));
        let lines = w.kill9();
        let a = acks(&lines);
        t.acked += a.len() as u64;
        last_ack = a.iter().copied().max().unwrap_or(0).max(last_ack);
        t.trials += 1;
        // The groups this writer may have touched; everything, with integrity_check, every
        // 100 trials.
        let from = if t.trials % 100 == 0 {
            0
        } else {
            first.saturating_sub(1).max(1)
        };
        let c = check(ctx, &url, "wk", from)?;
        judge(&mut t, &c, last_ack, "wk");
        // A group that landed without its ack is the next writer's base.
        last_ack = last_ack.max(c.max);
        crashed(&mut t, &mut store)?;
    }
    let c = check(ctx, &url, "wk", 0)?;
    judge(&mut t, &c, last_ack, "wk");
    t.errors_5xx += store.count_5xx();
    Ok(t)
}

/// kill -9 of the page store at random moments under a writer; restarted on its data directory
/// and address, sometimes at once, sometimes after a pause.
pub fn server_kill(ctx: &Ctx, budget: Duration, rng: &mut Rng) -> Result<Tally, Error> {
    let store = Store::start(ctx, "server-kill", &[])?;
    server_kill_on(ctx, store, budget, rng, false)
}

/// A crash of the machine under a writer: what the store wrote but had not synced is lost, and
/// every acknowledged commit must come back from its commit log. Simulated with real processes:
/// after some acknowledged commits the store is backed up with `litevfs backup` (a committed
/// state of `store.db`), more commits are acknowledged, the store is killed, and its `store.db`
/// is replaced with the backup's before the restart. That is a state a crash can leave only if
/// nothing synced `store.db` after the backup: the writer's small commits never do, and the
/// commit log, which starts over at each start, holds hundreds of them before it fills (the
/// commit that fills it is synced). So the writer is stopped (SIGSTOP) while the backup runs and
/// before the kill, and a trial ends after at most [`MC_MAX_COMMITS`] commits since the start.
pub fn machine_crash(ctx: &Ctx, budget: Duration, rng: &mut Rng) -> Result<Tally, Error> {
    let mut t = Tally::default();
    let mut store = Store::start(ctx, "machine-crash", &[])?;
    let url = store.url();
    let cache = ctx.subdir("machine-crash-cache");
    let mut w = Worker::spawn(ctx, &url, &cache, &["writer", "mc", ROWS])?;
    let deadline = Instant::now() + budget;
    while t.trials == 0 || Instant::now() < deadline {
        // Commits since this start: acknowledged, plus one in flight at each stop.
        let mut since = 2;
        let mut backup = None;
        for phase in 0..2 {
            for _ in 0..rng.range(1, MC_MAX_COMMITS / 2 - 10) {
                if w.expect("ack ", LONG).is_none() {
                    return Err(Error("machine-crash: the writer stopped committing".into()));
                }
                since += 1;
            }
            since += stop_and_count(&mut w);
            if phase == 0 {
                let dir = ctx.subdir(&format!("machine-crash-backup{}", t.trials));
                store.backup(&dir)?;
                backup = Some(dir);
                w.signal("-CONT");
            }
        }
        t.errors_5xx += store.count_5xx();
        crashed(&mut t, &mut store)?;
        if since > MC_MAX_COMMITS {
            return Err(Error(format!(
                "machine-crash: {since} commits in one trial, more than the commit log is known \
                 to hold without a sync"
            )));
        }
        store.kill9();
        let backup = backup.expect("taken in the first phase");
        store.lose_unsynced(&backup)?;
        let _ = std::fs::remove_dir_all(&backup);
        w.signal("-CONT");
        t.trials += 1;
        store.restart()?;
    }
    if w.expect("ack ", LONG).is_none() {
        t.notes
            .push("the writer did not commit again after the last restart".into());
        t.wrong += 1;
    }
    let (_, a, _) = finish_writer(&mut t, w);
    t.notes.push(format!(
        "each restart brought back from the commit log what the backup lacked; {} lost replies \
         settled",
        t.resolved
    ));
    let c = check(ctx, &url, "mc", 0)?;
    judge(&mut t, &c, a.iter().copied().max().unwrap_or(0), "mc");
    t.errors_5xx += store.count_5xx();
    Ok(t)
}

/// Most commits of one machine-crash trial: the writer's commits are a few KiB, so the 8 MiB
/// commit log holds several hundred.
const MC_MAX_COMMITS: u64 = 140;

/// Stops `w` (SIGSTOP) and reads what it printed until then; returns the acknowledgements in it.
fn stop_and_count(w: &mut Worker) -> u64 {
    w.signal("-STOP");
    let mut acks = 0;
    while let Some(l) = w.line(ms(200)) {
        if l.starts_with("ack ") {
            acks += 1;
        }
    }
    acks
}

/// The same on object storage (moto's S3 server from `.venv`, on loopback): a third of the
/// restarts also lose the data directory, which is only a cache of the bucket.
pub fn server_kill_s3(ctx: &Ctx, budget: Duration, rng: &mut Rng) -> Result<Tally, Error> {
    let moto = super::support::Moto::start(ctx)?;
    let bucket = moto.bucket("torture")?;
    let store = Store::start(
        ctx,
        "server-kill-s3",
        &[
            "--store",
            &format!("s3://{bucket}/litevfs"),
            "--aws-endpoint-url",
            &moto.endpoint,
            "--s3-path-style",
            "--aws-access-key-id",
            "test",
            "--aws-secret-access-key",
            "test",
            "--aws-region",
            "us-east-1",
        ],
    )?;
    let t = server_kill_on(ctx, store, budget, rng, true);
    drop(moto);
    t
}

fn server_kill_on(
    ctx: &Ctx,
    mut store: Store,
    budget: Duration,
    rng: &mut Rng,
    wipe: bool,
) -> Result<Tally, Error> {
    let mut t = Tally::default();
    let url = store.url();
    let cache = ctx.subdir("server-kill-cache");
    let mut w = Worker::spawn(ctx, &url, &cache, &["writer", "sk", ROWS])?;
    w.expect("ack ", LONG)
        .ok_or_else(|| Error("the writer never committed".into()))?;
    let deadline = Instant::now() + budget;
    while t.trials == 0 || Instant::now() < deadline {
        std::thread::sleep(ms(rng.range(100, 1000)));
        t.errors_5xx += store.count_5xx();
        crashed(&mut t, &mut store)?;
        store.kill9();
        t.trials += 1;
        if rng.chance(50) {
            std::thread::sleep(ms(rng.range(0, 500)));
        }
        if wipe && rng.chance(33) {
            let _ = std::fs::remove_dir_all(&store.data);
        }
        store.restart()?;
    }
    // The writer recovers by itself: one more commit after the last restart.
    if w.expect("ack ", LONG).is_none() {
        t.notes
            .push("the writer did not commit again after the last restart".into());
        t.wrong += 1;
    }
    let (lines, a, _) = finish_writer(&mut t, w);
    let fails = lines.iter().filter(|l| l.starts_with("fail ")).count();
    t.notes.push(format!(
        "{} commits failed while the store was down (reported failed, retried); {} lost replies settled",
        fails, t.resolved
    ));
    let c = check(ctx, &url, "sk", 0)?;
    judge(&mut t, &c, a.iter().copied().max().unwrap_or(0), "sk");
    if wipe {
        t.notes
            .push("a third of the restarts started on an empty data directory".into());
    }
    t.errors_5xx += store.count_5xx();
    Ok(t)
}

/// Processes racing for the lease, each incrementing one counter under it: no two rely on it at
/// once (from taking the lease to their COMMIT returning, on the host's monotonic clock, the
/// intervals of different processes never overlap) and the counter equals the increments
/// acknowledged. Trials: lease acquisitions that committed.
pub fn lease_race(ctx: &Ctx, budget: Duration, _rng: &mut Rng) -> Result<Tally, Error> {
    const PROCS: usize = 4;
    let mut t = Tally::default();
    let store = Store::start(ctx, "lease-race", &[])?;
    let url = store.url();
    let caches: Vec<_> = (0..PROCS)
        .map(|i| ctx.subdir(&format!("lease-race-cache{i}")))
        .collect();
    let deadline = Instant::now() + budget;
    let mut intervals: Vec<(u128, u128, usize)> = Vec::new();
    let mut rounds = 0;
    while rounds == 0 || Instant::now() < deadline {
        rounds += 1;
        let workers: Vec<Worker> = caches
            .iter()
            .map(|c| Worker::spawn(ctx, &url, c, &["counter", "lr", "25"]))
            .collect::<Result<_, _>>()?;
        for (i, w) in workers.into_iter().enumerate() {
            let (lines, status) = w.finish(Duration::from_secs(600));
            if !status.is_some_and(|s| s.success()) {
                t.crashes += 1;
                t.notes
                    .push(format!("a racer ended with {status:?}: {:?}", lines.last()));
            }
            for l in &lines {
                let mut p = l.split_whitespace();
                if p.next() == Some("hold") {
                    let a = p.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                    let b = p.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                    intervals.push((a, b, i));
                }
                if l.starts_with("done ") {
                    t.acked += field(l, "incs").unwrap_or(0);
                }
            }
        }
    }
    t.trials = intervals.len() as u64;
    intervals.sort();
    let mut reach: Option<(u128, usize)> = None;
    for &(a, b, who) in &intervals {
        if let Some((end, holder)) = reach
            && a < end
            && holder != who
        {
            t.double_holders += 1;
        }
        if reach.is_none_or(|(end, _)| b > end) {
            reach = Some((b, who));
        }
    }
    let cache = ctx.subdir("lease-race-judge");
    let v = run_worker(
        ctx,
        &url,
        &cache,
        &["query", "lr", "SELECT v FROM c WHERE id = 1"],
    )?;
    let v: u64 = v
        .strip_prefix("ok ")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error(format!("lease-race: {v}")))?;
    if v < t.acked {
        t.lost += t.acked - v;
    } else if v > t.acked {
        t.wrong += v - t.acked;
        t.notes
            .push(format!("counter {v} > {} acknowledged increments", t.acked));
    }
    t.notes.push(format!(
        "{PROCS} processes, {rounds} rounds: {} lease acquisitions, counter {v}",
        t.trials
    ));
    t.errors_5xx += store.count_5xx();
    Ok(t)
}

/// A holder stopped with SIGSTOP past its lease while another process takes the lease and
/// commits; resumed, its commit must fail and leave nothing.
pub fn stopped_holder(ctx: &Ctx, budget: Duration, _rng: &mut Rng) -> Result<Tally, Error> {
    let mut t = Tally::default();
    let store = Store::start(ctx, "stopped-holder", &[])?;
    let url = store.url();
    let deadline = Instant::now() + budget;
    let mut committed = 0;
    while t.trials == 0 || Instant::now() + Duration::from_secs(8) < deadline {
        let ca = ctx.subdir("stopped-a");
        let mut a = Worker::spawn(ctx, &url, &ca, &["stopped", "sh"])?;
        a.expect("ready", LONG)
            .ok_or_else(|| Error(format!("the holder never got ready: {:?}", a.seen)))?;
        a.signal("-STOP");
        let cb = ctx.subdir("stopped-b");
        let b = run_worker(ctx, &url, &cb, &["counter", "sh", "1"])?;
        a.signal("-CONT");
        a.send("commit");
        let got = a.expect("", LONG).unwrap_or_default();
        t.trials += 1;
        if field(&b, "incs") == Some(1) {
            t.acked += 1;
        } else {
            t.notes
                .push(format!("the second writer did not commit: {b}"));
        }
        if got == "committed" {
            committed += 1;
            t.double_holders += 1;
            t.notes
                .push("a holder stopped past its lease committed after another took it".into());
        }
        drop(a);
    }
    let cache = ctx.subdir("stopped-judge");
    let n = run_worker(
        ctx,
        &url,
        &cache,
        &[
            "query",
            "sh",
            "SELECT count(*) FROM s WHERE who = 'stopped'",
        ],
    )?;
    if n != format!("ok {committed}") {
        t.wrong += 1;
        t.notes.push(format!(
            "rows of the stopped holders: {n}, expected {committed}"
        ));
    }
    t.errors_5xx += store.count_5xx();
    Ok(t)
}

/// A writer behind a proxy that loses 30% of commits: half before the store sees them, half
/// after (the reply). Every COMMIT must end as it really ended.
pub fn lost_replies(ctx: &Ctx, budget: Duration, rng: &mut Rng) -> Result<Tally, Error> {
    let mut t = Tally::default();
    let store = Store::start(ctx, "lost-replies", &[])?;
    let proxy = LossyProxy::start(&store.addr, 30, rng.next())?;
    let via = format!("http://{}", proxy.addr);
    let cache = ctx.subdir("lost-replies-cache");
    let mut w = Worker::spawn(ctx, &via, &cache, &["writer", "lp", ROWS])?;
    w.expect("ack ", LONG)
        .ok_or_else(|| Error(format!("the writer never committed: {:?}", w.seen)))?;
    std::thread::sleep(budget);
    let (lines, a, stats) = finish_writer(&mut t, w);
    t.trials = t.acked + lines.iter().filter(|l| l.starts_with("fail ")).count() as u64;
    t.notes.push(format!(
        "proxy lost {} commits before the store and {} replies after it; the writer settled {} \
         ({} had landed)",
        proxy
            .lost_requests
            .load(std::sync::atomic::Ordering::SeqCst),
        proxy.lost_replies.load(std::sync::atomic::Ordering::SeqCst),
        t.resolved,
        json_field(&stats, "lost_replies_landed")
    ));
    let c = check(ctx, &store.url(), "lp", 0)?;
    judge(&mut t, &c, a.iter().copied().max().unwrap_or(0), "lp");
    if c.groups != a.len() as u64 && c.groups != a.len() as u64 + 1 {
        t.notes.push(format!(
            "{} groups stored, {} acknowledged",
            c.groups,
            a.len()
        ));
    }
    t.errors_5xx += store.count_5xx();
    Ok(t)
}

/// Four readers check an invariant (100 accounts, constant total) in a loop while a writer
/// commits transfers.
pub fn readers(ctx: &Ctx, budget: Duration, _rng: &mut Rng) -> Result<Tally, Error> {
    readers_in(ctx, budget, "readers", "delete")
}

/// [`readers`] with the writer switching the database to WAL first (issue 11): the readers, in
/// other processes, follow it into WAL mode and read each commit from there.
pub fn readers_wal(ctx: &Ctx, budget: Duration, _rng: &mut Rng) -> Result<Tally, Error> {
    readers_in(ctx, budget, "readers-wal", "wal")
}

fn readers_in(ctx: &Ctx, budget: Duration, name: &str, mode: &str) -> Result<Tally, Error> {
    let mut t = Tally::default();
    let store = Store::start(ctx, name, &[])?;
    let url = store.url();
    let init = run_worker(
        ctx,
        &url,
        &ctx.subdir(&format!("{name}-init")),
        &["bank", "bk", "init"],
    )?;
    if init != "ok" {
        return Err(Error(format!("bank init: {init}")));
    }
    let writer = Worker::spawn_with(
        ctx,
        &url,
        &ctx.subdir(&format!("{name}-w")),
        &["bank", "bk", "transfer"],
        &[("TORTURE_JOURNAL_MODE", mode)],
    )?;
    let audits: Vec<Worker> = (0..4)
        .map(|i| {
            Worker::spawn(
                ctx,
                &url,
                &ctx.subdir(&format!("{name}-r{i}")),
                &["bank", "bk", "audit"],
            )
        })
        .collect::<Result<_, _>>()?;
    std::thread::sleep(budget);
    let mut errors = 0;
    for a in audits {
        let (lines, status) = a.finish(LONG);
        if !status.is_some_and(|s| s.success()) {
            t.crashes += 1;
        }
        if let Some(d) = lines.iter().find(|l| l.starts_with("done ")) {
            t.trials += field(d, "reads").unwrap_or(0);
            t.wrong += field(d, "wrong").unwrap_or(0);
            errors += field(d, "errors").unwrap_or(0);
        }
    }
    let (lines, status) = writer.finish(LONG);
    if !status.is_some_and(|s| s.success()) {
        t.crashes += 1;
    }
    if let Some(d) = lines.iter().find(|l| l.starts_with("done ")) {
        t.acked = field(d, "commits").unwrap_or(0);
    }
    t.notes.push(format!(
        "{} consistent reads by 4 readers during {} commits; {errors} reads failed with an error",
        t.trials, t.acked
    ));
    if errors > 0 {
        t.wrong += errors;
    }
    t.errors_5xx += store.count_5xx();
    Ok(t)
}

/// Flips random bytes in a process's page cache between runs: every run must read the data
/// exactly, or fail, never return other data.
pub fn cache_corruption(ctx: &Ctx, budget: Duration, rng: &mut Rng) -> Result<Tally, Error> {
    let mut t = Tally::default();
    let store = Store::start(ctx, "cache-corruption", &[])?;
    let url = store.url();
    let mut w = Worker::spawn(ctx, &url, &ctx.subdir("cc-w"), &["writer", "cc", ROWS])?;
    for _ in 0..30 {
        w.expect("ack ", LONG);
    }
    let (lines, _) = w.finish(LONG);
    t.acked = acks(&lines).len() as u64;
    let reference = run_worker(ctx, &url, &ctx.subdir("cc-ref"), &["digest", "cc"])?;
    if !reference.starts_with("ok ") {
        return Err(Error(format!("digest: {reference}")));
    }
    let cache = ctx.subdir("cc-cache");
    let first = run_worker(ctx, &url, &cache, &["digest", "cc"])?;
    if first != reference {
        t.wrong += 1;
    }
    let deadline = Instant::now() + budget;
    let mut failed_reads = 0;
    while t.trials == 0 || Instant::now() < deadline {
        let flipped = corrupt(&cache, rng)?;
        let got = run_worker(ctx, &url, &cache, &["digest", "cc"])?;
        t.trials += 1;
        if got.starts_with("ok ") && got != reference {
            t.wrong += 1;
            t.notes.push(format!(
                "after {flipped} flipped bytes: {got}, expected {reference}"
            ));
        } else if !got.starts_with("ok ") {
            failed_reads += 1;
        }
    }
    t.notes.push(format!(
        "{} runs over a corrupted cache: {} read the data exactly, {failed_reads} failed cleanly",
        t.trials,
        t.trials - failed_reads - t.wrong
    ));
    t.errors_5xx += store.count_5xx();
    Ok(t)
}

/// Flips 1-16 random bytes in each file under `dir`; returns how many.
fn corrupt(dir: &std::path::Path, rng: &mut Rng) -> Result<u64, Error> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut n = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            let len = std::fs::metadata(&p)?.len();
            if len == 0 {
                continue;
            }
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)?;
            for _ in 0..rng.range(1, 17) {
                let at = rng.range(0, len);
                let mut b = [0u8];
                f.seek(SeekFrom::Start(at))?;
                f.read_exact(&mut b)?;
                b[0] ^= 1 << rng.range(0, 8);
                f.seek(SeekFrom::Start(at))?;
                f.write_all(&b)?;
                n += 1;
            }
        }
    }
    Ok(n)
}
