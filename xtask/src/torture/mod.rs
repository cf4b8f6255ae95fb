//! `cargo xtask torture [--minutes N] [--only A,B] [--seed S]`: the crash, race, fault and fuzz
//! experiments, with real processes on loopback, in one command.
//!
//! Each experiment gets a share of the time budget and reports a [`Tally`]; the command prints
//! one table and fails on any lost or torn commit, double lease holder, wrong result, crash or
//! 5xx. Experiments (names for `--only`):
//!
//! - `writer-kill`: kill -9 of a writer at random moments of its commit loop (rollback journal
//!   and WAL).
//! - `server-kill`: kill -9 of the page store under a writer, restarted on its data directory.
//! - `server-kill-s3`: the same with `--store s3://` on moto's S3 server (from `.venv`), a third
//!   of the restarts on an empty data directory.
//! - `machine-crash`: a crash of the store's machine under a writer: killed, with `store.db`
//!   put back to a backup taken a few commits earlier (what it held when last synced), so every
//!   acknowledged commit after it must come back from the commit log.
//! - `lease-race`: processes racing for the lease to increment one counter.
//! - `stopped-holder`: a lease holder stopped (SIGSTOP) past its lease, resumed, committing.
//! - `lost-replies`: a proxy that loses commits and their replies.
//! - `readers`: readers checking an invariant while a writer commits; `readers-wal`: the same
//!   with the database in WAL mode.
//! - `cache-corruption`: bytes of a process's page cache flipped between runs.
//! - `fuzz-ltx`: mutated LTX files (seeded from the spec's vectors) against a live store.
//! - `fuzz-http`: malformed requests against a live store.

mod experiments;
mod fuzz;
mod support;

use std::time::{Duration, Instant};

use crate::proc::Error;
use crate::setup;
use support::Ctx;

/// What one experiment saw.
#[derive(Default, Debug, Clone)]
pub struct Tally {
    pub trials: u64,
    pub acked: u64,
    pub lost: u64,
    pub torn: u64,
    pub double_holders: u64,
    pub resolved: u64,
    pub unresolved: u64,
    pub crashes: u64,
    pub errors_5xx: u64,
    pub wrong: u64,
    /// What else is worth reading (one line each).
    pub notes: Vec<String>,
}

impl Tally {
    fn failed(&self) -> bool {
        self.lost + self.torn + self.double_holders + self.wrong + self.crashes + self.errors_5xx
            > 0
    }
}

type Experiment = fn(&Ctx, Duration, &mut support::Rng) -> Result<Tally, Error>;

/// Name, share of the budget (weights), function.
const EXPERIMENTS: &[(&str, u32, Experiment)] = &[
    ("writer-kill", 20, experiments::writer_kill),
    ("server-kill", 15, experiments::server_kill),
    ("server-kill-s3", 10, experiments::server_kill_s3),
    ("machine-crash", 8, experiments::machine_crash),
    ("lease-race", 12, experiments::lease_race),
    ("stopped-holder", 8, experiments::stopped_holder),
    ("lost-replies", 10, experiments::lost_replies),
    ("readers", 10, experiments::readers),
    ("readers-wal", 10, experiments::readers_wal),
    ("cache-corruption", 5, experiments::cache_corruption),
    ("fuzz-ltx", 12, fuzz::ltx),
    ("fuzz-http", 8, fuzz::http_requests),
];

fn usage() -> Error {
    Error(format!(
        "usage: cargo xtask torture [--minutes N] [--only NAME,...] [--seed S]\n  experiments: {}",
        EXPERIMENTS
            .iter()
            .map(|e| e.0)
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

pub fn run(args: &[String]) -> Result<(), Error> {
    let mut minutes = 5.0f64;
    let mut only: Option<Vec<String>> = None;
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--minutes" => {
                minutes = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|m: &f64| *m > 0.0)
                    .ok_or_else(usage)?
            }
            "--only" => {
                let list: Vec<String> = it
                    .next()
                    .ok_or_else(usage)?
                    .split(',')
                    .map(str::to_string)
                    .collect();
                if let Some(bad) = list.iter().find(|n| !EXPERIMENTS.iter().any(|e| e.0 == *n)) {
                    return Err(Error(format!("unknown experiment {bad:?}\n{}", usage())));
                }
                only = Some(list);
            }
            "--seed" => seed = it.next().and_then(|v| v.parse().ok()).ok_or_else(usage)?,
            _ => return Err(usage()),
        }
    }
    setup::ensure_system(true)?;
    let art = setup::build_release()?;
    let moto = setup::ensure_venv()?.with_file_name("moto_server");
    let root = setup::root();
    let vectors = root.join("../shared/spec/vectors");
    if !vectors.is_dir() {
        return Err(Error(format!(
            "{} is missing: the LTX fuzzing is seeded from the spec's vectors (../shared beside the repo)",
            vectors.display()
        )));
    }
    let dir = std::env::temp_dir().join(format!("litevfs-torture-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let ctx = Ctx {
        bin: art.bin.clone(),
        ext: art.ext.clone(),
        worker: setup::target_dir().join("release/examples/torture_worker"),
        dir: dir.clone(),
        vectors,
        moto: moto.exists().then_some(moto),
    };
    let chosen: Vec<&(&str, u32, Experiment)> = EXPERIMENTS
        .iter()
        .filter(|e| only.as_ref().is_none_or(|o| o.iter().any(|n| n == e.0)))
        .collect();
    let weights: u32 = chosen.iter().map(|e| e.1).sum();
    let budget = Duration::from_secs_f64(minutes * 60.0);
    println!(
        "==> torture: {} experiment(s) in {:.1} min, seed {seed} (rerun with --seed {seed})",
        chosen.len(),
        minutes
    );
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut rng = support::Rng::new(seed);
    for (name, w, f) in chosen {
        let share = budget.mul_f64(*w as f64 / weights as f64);
        println!("--> {name} ({:.0} s)", share.as_secs_f64());
        let t = Instant::now();
        let tally = match f(&ctx, share, &mut rng) {
            Ok(t) => t,
            Err(e) => Tally {
                crashes: 1,
                notes: vec![format!("the experiment could not run: {e}")],
                ..Tally::default()
            },
        };
        for n in &tally.notes {
            println!("    {n}");
        }
        println!("    done in {:.1} s", t.elapsed().as_secs_f64());
        rows.push((*name, tally));
    }
    print_table(&rows);
    println!(
        "torture: {:.1} min on {} core(s), seed {seed}",
        started.elapsed().as_secs_f64() / 60.0,
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let _ = std::fs::remove_dir_all(&dir);
    let failed: Vec<&str> = rows
        .iter()
        .filter(|(_, t)| t.failed())
        .map(|(n, _)| *n)
        .collect();
    if failed.is_empty() {
        println!("torture: PASSED (no loss, tear, double holder, wrong result, crash or 5xx)");
        Ok(())
    } else {
        Err(Error(format!(
            "torture found defects in: {} (seed {seed})",
            failed.join(", ")
        )))
    }
}

fn print_table(rows: &[(&str, Tally)]) {
    println!();
    println!(
        "| experiment | trials | acked commits | lost | torn | double holders | ambiguous resolved / unresolved | crashes | 5xx | wrong results |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut sum = Tally::default();
    for (name, t) in rows {
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} |",
            t.trials,
            t.acked,
            t.lost,
            t.torn,
            t.double_holders,
            t.resolved,
            t.unresolved,
            t.crashes,
            t.errors_5xx,
            t.wrong
        );
        sum.trials += t.trials;
        sum.acked += t.acked;
        sum.lost += t.lost;
        sum.torn += t.torn;
        sum.double_holders += t.double_holders;
        sum.resolved += t.resolved;
        sum.unresolved += t.unresolved;
        sum.crashes += t.crashes;
        sum.errors_5xx += t.errors_5xx;
        sum.wrong += t.wrong;
    }
    println!(
        "| **total** | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} |",
        sum.trials,
        sum.acked,
        sum.lost,
        sum.torn,
        sum.double_holders,
        sum.resolved,
        sum.unresolved,
        sum.crashes,
        sum.errors_5xx,
        sum.wrong
    );
    println!();
}
