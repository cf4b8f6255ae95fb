//! `cargo xtask bench [--quick] [--json FILE]`: litevfs measured against plain SQLite on a local
//! file, in the same run (issue 5; how to run and read it: docs/bench.md).
//!
//! Builds the release artifacts, generates the databases in a fresh directory under the temp
//! dir, and runs the workloads in phases, each against a fresh `litevfs serve` on loopback (one
//! data directory, so peak server RSS is per phase): bulk import/export (which also loads the
//! store), warm reads, change visibility and commits, then cold reads without and with the
//! per-request delay, then object storage (`--store s3://` on moto). Prints a table and the
//! targets; writes JSON with `--json`.
//!
//! A workload that cannot be measured (the extension or the server missing or failing) is
//! named with its reason and makes the command exit non-zero; the plain side still runs. An
//! unmet target is reported, never a failure. No timing here is an assertion in a test.

mod bucket;
mod bulk;
mod cold;
mod ctx;
mod driver;
mod live;
mod report;
mod stats;
mod targets;
mod warm;

use std::path::PathBuf;
use std::time::Instant;

use crate::proc::{Error, Server};
use crate::setup;
use ctx::{Ctx, DbFile, Params};
use driver::Driver;
use report::Report;
use stats::Summary;

pub const MEMORY: &str = "6 memory";

struct Opts {
    quick: bool,
    json: Option<PathBuf>,
}

fn parse(args: &[String]) -> Result<Opts, Error> {
    let mut o = Opts {
        quick: false,
        json: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--json" => {
                o.json = Some(
                    it.next()
                        .ok_or_else(|| Error("--json needs a FILE".into()))?
                        .into(),
                )
            }
            other => {
                return Err(Error(format!(
                    "unknown bench option {other:?}; usage: cargo xtask bench [--quick] [--json FILE]"
                )));
            }
        }
    }
    Ok(o)
}

pub fn run(args: &[String]) -> Result<(), Error> {
    let opts = parse(args)?;
    if std::env::var_os("RUST_LOG").is_none() {
        // SAFETY: the xtask is single-threaded here; children inherit a quiet log level.
        unsafe { std::env::set_var("RUST_LOG", "warn") };
    }
    let t0 = Instant::now();
    // Python too: workload 7 runs moto's S3 server from the project's .venv.
    setup::ensure_system(true)?;
    let art = setup::build_release()?;
    let py = setup::ensure_venv()?;
    let drv = Driver {
        bin: setup::target_dir().join("release/examples/bench_driver"),
        ext: art.ext.clone(),
    };
    if !drv.bin.exists() {
        return Err(Error(format!(
            "build did not produce {}",
            drv.bin.display()
        )));
    }
    let work = std::env::temp_dir().join(format!("litevfs-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let p = Params::new(opts.quick);
    let mut rep = Report {
        mode: if opts.quick { "quick" } else { "full" },
        machine: ctx::machine(&work),
        params: p.list(),
        ..Default::default()
    };
    let mut c = Ctx {
        p,
        art,
        drv,
        data: work.join("data"),
        work: work.clone(),
        lv_missing: None,
    };
    let result = phases(&mut c, &mut rep, &py);
    drop(c);
    let _ = std::fs::remove_dir_all(&work);
    let facts = result?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    rep.machine
        .push(("loadavg_at_end".into(), load.trim().to_string()));
    targets::evaluate(&mut rep, &facts);
    rep.duration_s = t0.elapsed().as_secs_f64();
    println!(
        "\n==> results ({} run, {:.0} s, command: cargo xtask bench {})\n",
        rep.mode,
        rep.duration_s,
        args.join(" ")
    );
    let machine: Vec<String> = rep
        .machine
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    println!("machine: {}\n", machine.join("; "));
    print!("{}", rep.table());
    if let Some(path) = &opts.json {
        std::fs::write(path, rep.json())
            .map_err(|e| Error(format!("cannot write {}: {e}", path.display())))?;
        println!("\nJSON written to {}", path.display());
    }
    if rep.failures.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = rep.failures.iter().map(|(w, _)| w.as_str()).collect();
    Err(Error(format!(
        "{} workload(s) could not be measured: {}",
        names.len(),
        names.join(", ")
    )))
}

/// Generates the databases, then runs every phase; returns what the targets need.
fn phases(c: &mut Ctx, rep: &mut Report, py: &std::path::Path) -> Result<targets::Facts, Error> {
    let need = (c.p.big_rows * (c.p.big_payload + 40)) * 6 + (512 << 20);
    let free = ctx::free_bytes(&c.work)?;
    println!(
        "==> disk: {:.1} GB free under {}, about {:.1} GB needed",
        free as f64 / 1e9,
        c.work.display(),
        need as f64 / 1e9
    );
    if free < need {
        return Err(Error(format!(
            "not enough disk space under {}: {free} bytes free, {need} needed",
            c.work.display()
        )));
    }
    println!("==> generating databases (bench_driver gen)");
    let warm = c.generate("warm", c.p.warm_rows, c.p.warm_payload)?;
    let big = c.generate("big", c.p.big_rows, c.p.big_payload)?;
    let vis = c.generate("vis", 1000, 100)?;
    let commits = c.generate("commits", 1000, 100)?;
    let walc = c.generate("walc", 1000, 100)?;
    rep.notes.push(format!(
        "warm db {:.1} MB = {:.0}x SQLite's 2000 KiB page cache; big db {:.1} MB ({:.2} GiB), b-tree depth {}",
        warm.bytes as f64 / 1e6,
        warm.bytes as f64 / (2000.0 * 1024.0),
        big.bytes as f64 / 1e6,
        big.bytes as f64 / (1u64 << 30) as f64,
        big.depth
    ));

    println!("\n==> litevfs side: loading liblitevfs.so (bench_driver probe)");
    if let Err(e) = c.drv.once(&["probe", &c.drv.ext.to_string_lossy()]) {
        c.lv_missing = Some(format!(
            "the VFS extension {} does not load: {}",
            c.drv.ext.display(),
            e.0
        ));
    }
    phase_bulk(
        c,
        rep,
        &[
            (&warm, "warm"),
            (&vis, "vis"),
            (&commits, "commits"),
            (&walc, "walc"),
        ],
        &big,
    )?;
    phase_warm(c, rep, &warm, &vis, (&commits, &walc))?;
    phase_cold(c, rep, &big, 0)?;
    phase_cold(c, rep, &big, c.p.delay_ms)?;
    phase_bucket(c, rep, py, (&vis, &commits, &big));
    Ok(targets::Facts {
        big_depth: big.depth,
        warm_bytes: warm.bytes,
        big_bytes: big.bytes,
        delay_ms: c.p.delay_ms,
    })
}

/// Starts a page store unless the litevfs side is already known to be missing; on failure
/// records why, so every later workload says it.
fn server(c: &mut Ctx, delay: u64) -> Option<Server> {
    if c.lv_missing.is_some() {
        return None;
    }
    match c.server(delay) {
        Ok(s) => Some(s),
        Err(e) => {
            c.lv_missing = Some(e.0);
            None
        }
    }
}

/// Adds a "6 memory" row with the server's peak RSS so far (MiB).
fn server_rss(rep: &mut Report, s: &Option<Server>, metric: &str) {
    if let Some(kb) = s
        .as_ref()
        .and_then(|s| ctx::proc_kb(s.pid(), "VmHWM:").ok())
    {
        rep.row(MEMORY, metric, "MiB", None, Some(Summary::one(kb / 1024.0)));
    }
}

fn phase_bulk(
    c: &mut Ctx,
    rep: &mut Report,
    small: &[(&DbFile, &str)],
    big: &DbFile,
) -> Result<(), Error> {
    println!(
        "\n==> phase 1: page store up, import the small databases; workload 5 (bulk import/export)"
    );
    let s = server(c, 0);
    if let Some(srv) = &s {
        println!("    litevfs serve on {}", srv.url);
        for (db, name) in small {
            if let Err(e) = c.import(name, &db.path, &srv.url) {
                c.lv_missing = Some(format!("cannot load the store: {}", e.0));
                break;
            }
        }
    }
    match (&s, &c.lv_missing) {
        (Some(srv), None) => {
            if !bulk::run(c, big, &srv.url, rep)? {
                c.lv_missing = Some("database `big` could not be imported (see workload 5)".into());
            }
        }
        _ => rep.fail(
            bulk::NAME,
            format!("not run: {}", c.lv_missing.as_deref().unwrap_or("?")),
        ),
    }
    server_rss(rep, &s, "server peak RSS, workload 5 (import+export)");
    Ok(())
}

fn phase_warm(
    c: &mut Ctx,
    rep: &mut Report,
    warm: &DbFile,
    vis: &DbFile,
    (commits, walc): (&DbFile, &DbFile),
) -> Result<(), Error> {
    println!("\n==> phase 2: workload 1 (warm reads), then 3 (change visibility) and 4 (commits)");
    let s = server(c, 0);
    let url = s.as_ref().map(|s| s.url.clone());
    let url = url.as_deref();
    if let Err(e) = warm::run(c, warm, url, rep) {
        rep.fail(warm::NAME, e);
    }
    server_rss(
        rep,
        &s,
        &format!(
            "{} (warm, {:.0} MB db read in full)",
            targets::SERVER_RSS_SMALL,
            warm.bytes as f64 / 1e6
        ),
    );
    println!("    workload 3: change visibility");
    if let Err(e) = live::visibility(c, vis, url, rep) {
        rep.fail(live::VIS, e);
    }
    println!("    workload 4: commits");
    if let Err(e) = live::commits(c, commits, url, rep) {
        rep.fail(live::COMMITS, e);
    }
    println!("    workload 4: commits in WAL mode");
    if let Err(e) = live::commits_wal(c, walc, url, rep) {
        rep.fail(live::COMMITS, e);
    }
    Ok(())
}

fn phase_cold(c: &mut Ctx, rep: &mut Report, big: &DbFile, delay: u64) -> Result<(), Error> {
    println!("\n==> phase: workload 2 (cold reads) with a fresh page store, --delay-ms {delay}");
    let s = server(c, delay);
    let url = s.as_ref().map(|s| s.url.clone());
    if let Err(e) = cold::run(c, big, url.as_deref(), delay, rep) {
        rep.fail(cold::NAME, e);
    }
    if delay == 0 {
        let m = format!(
            "{} (cold + full download, {:.0} MB db)",
            targets::SERVER_RSS_BIG,
            big.bytes as f64 / 1e6
        );
        server_rss(rep, &s, &m);
    }
    Ok(())
}

fn phase_bucket(
    c: &mut Ctx,
    rep: &mut Report,
    py: &std::path::Path,
    dbs: (&DbFile, &DbFile, &DbFile),
) {
    println!("\n==> phase: workload 7 (object storage: --store s3:// on moto, two servers)");
    if let Some(why) = &c.lv_missing {
        rep.fail(bucket::NAME, format!("not run: {why}"));
        return;
    }
    if let Err(e) = bucket::run(c, py, dbs, rep) {
        rep.fail(bucket::NAME, e);
    }
}
