//! `cargo xtask test [--large] [-- PYTEST ARGS]`: every test the project has, in one command.
//!
//! Order: system set-up, release build (the tests use release artifacts so that dependencies
//! compile once), the Rust tests of the workspace (unit tests, the page-store conformance and
//! crash suites, the admin CLI), then the Python end-to-end suite (tests/e2e, examples included)
//! that loads `liblitevfs.so` into real hosts (the Debian sqlite3 shell, apsw from PyPI) and runs
//! the examples. The Node, Go and PHP examples run where their toolchain is installed: which run
//! and which are skipped (and why) is printed before the suite, and pytest lists the skips again
//! at its end. `LITEVFS_EXAMPLES_REQUIRED=node,go,php` turns those skips into failures.
//! With `--large`, then the large tests: imports and exports of at least 3 GiB with their peak
//! memory measured (tests/large_transfers.rs; minutes, and about 25 GiB free under TMPDIR).

use std::process::Command;

use crate::proc::{Error, run_checked};
use crate::setup;

pub fn run(args: &[String]) -> Result<(), Error> {
    let ours: Vec<&String> = args.iter().take_while(|a| *a != "--").collect();
    let pytest_args: Vec<&String> = args.iter().skip_while(|a| *a != "--").skip(1).collect();
    let mut large = false;
    for a in ours {
        match a.as_str() {
            "--large" => large = true,
            other => {
                return Err(Error(format!(
                    "unknown option {other:?}; usage: cargo xtask test [--large] [-- PYTEST ARGS]"
                )));
            }
        }
    }
    setup::ensure_system(true)?;
    let art = setup::build_release()?;
    let root = setup::root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    // The Rust suites start moto's S3 server from .venv, so the venv comes first.
    let py = setup::ensure_venv()?;
    println!("==> Rust tests: cargo test --release --workspace");
    run_checked(
        Command::new(&cargo)
            .current_dir(&root)
            .args(["test", "--release", "--workspace"]),
        "cargo test",
    )?;

    println!("==> examples in other languages (their toolchains on this machine)");
    // Only informs: a required example that cannot run fails in pytest, with the others run.
    let _ = Command::new(&py)
        .current_dir(&root)
        .arg("tests/e2e/toolchains.py")
        .status();

    println!("==> end-to-end tests and examples: pytest tests/e2e");
    run_checked(
        Command::new(&py)
            .current_dir(&root)
            // -rs: the summary lists every skipped test with its reason.
            .args([
                "-m",
                "pytest",
                "-q",
                "-rs",
                "-p",
                "no:cacheprovider",
                "tests/e2e",
            ])
            .args(&pytest_args)
            .env("LITEVFS_BIN", &art.bin)
            .env("LITEVFS_EXT", &art.ext)
            .env(
                "LITEVFS_EXAMPLES_DIR",
                setup::target_dir().join("release/examples"),
            ),
        "pytest tests/e2e",
    )?;

    if large {
        // One at a time: each moves gigabytes through the disk.
        println!("==> large tests: cargo test --release --test large_transfers -- --ignored");
        run_checked(
            Command::new(&cargo).current_dir(&root).args([
                "test",
                "--release",
                "--test",
                "large_transfers",
                "--",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ]),
            "large tests",
        )?;
    }
    Ok(())
}
