//! `cargo xtask`: the project's two front doors and its benchmark harness.
//!
//! - `cargo xtask demo`: installs what is missing, builds, and shows the whole system working.
//! - `cargo xtask test [--large]`: installs what is missing, builds, and runs every test
//!   (`--large`: also the multi-gigabyte import and export tests).
//! - `cargo xtask bench [--quick] [--json FILE]`: measures litevfs against plain SQLite.
//! - `cargo xtask torture [--minutes N]`: the crash, race, fault and fuzz experiments.
//!
//! Depends on nothing but std, so it builds in seconds on a fresh machine, before libclang (which
//! the main crate's build needs) is installed.

mod bench;
mod demo;
mod proc;
mod setup;
mod test;
mod torture;

use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!(
        "usage: cargo xtask <demo | test [--large] | bench [--quick] [--json FILE] | torture [--minutes N] [--only A,B] [--seed S]>\n\
         \n  demo   build everything and run a demo of the whole system\
         \n  test   build everything and run every test (unit, conformance, end-to-end, examples;\
         \n         --large: also import and export 3 GiB databases, measuring peak memory)\
         \n  bench  measure litevfs against plain SQLite (--quick: small version; --json FILE: write results)\
         \n  torture  crash, race, fault and fuzz experiments on loopback (default 5 minutes)"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo::run(),
        Some("test") => test::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("torture") => torture::run(&args[1..]),
        _ => return usage(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nxtask: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}
