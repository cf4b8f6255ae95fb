//! Workload 5, bulk transfer of the big database: `litevfs import` (POST /db/upload) and
//! `litevfs export` (GET /db/snapshot, verified and fsynced), in MB/s (10^6 bytes per second).
//! The plain column is a local copy of the same file with fsync, a reference for the disk.
//!
//! The first import creates database `big`, which workload 2 reads; further repetitions import
//! under other names and delete them again.

use std::time::Instant;

use super::ctx::{Ctx, DbFile};
use super::report::Report;
use super::stats::Summary;
use crate::proc::Error;

pub const NAME: &str = "5 bulk";
pub const IMPORT: &str = "import (litevfs import)";
pub const EXPORT: &str = "export (litevfs export)";

/// Runs the workload; returns whether database `big` is in the store.
pub fn run(ctx: &Ctx, db: &DbFile, url: &str, rep: &mut Report) -> Result<bool, Error> {
    let mb = db.bytes as f64 / 1e6;
    let copy = ctx.dir("copy.db");
    let (mut cp, mut imp, mut exp) = (vec![], vec![], vec![]);
    let mut err = None;
    for i in 0..ctx.p.bulk_reps {
        cp.push(mb / local_copy(&db.path, &copy)?);
        let _ = std::fs::remove_file(&copy);
        let name = if i == 0 {
            "big".to_string()
        } else {
            format!("big-import-{i}")
        };
        match ctx.import(&name, &db.path, url) {
            Ok(s) => imp.push(mb / s),
            Err(e) => {
                err = Some(e);
                break;
            }
        }
        if i > 0 {
            let _ = ctx.delete(&name, url);
        }
    }
    let imported = !imp.is_empty();
    let out = ctx.dir("export.db");
    for _ in 0..ctx.p.bulk_reps {
        if !imported || err.is_some() {
            break;
        }
        match ctx.export("big", &out, url) {
            Ok(s) => exp.push(mb / s),
            Err(e) => err = Some(e),
        }
        let _ = std::fs::remove_file(&out);
    }
    let metric = |m: &str| format!("{m}, {mb:.0} MB");
    rep.row(
        NAME,
        &metric(IMPORT),
        "MB/s",
        Summary::of(cp.clone()),
        Summary::of(imp),
    );
    rep.row(
        NAME,
        &metric(EXPORT),
        "MB/s",
        Summary::of(cp),
        Summary::of(exp),
    );
    if let Some(e) = err {
        rep.fail(NAME, e);
    }
    Ok(imported)
}

/// Copies `from` to `to` and fsyncs it; returns the seconds it took.
fn local_copy(from: &std::path::Path, to: &std::path::Path) -> Result<f64, Error> {
    let t = Instant::now();
    std::fs::copy(from, to)?;
    std::fs::File::open(to)?.sync_all()?;
    Ok(t.elapsed().as_secs_f64())
}
