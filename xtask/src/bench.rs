//! `cargo xtask bench`: litevfs measured against plain SQLite on a local file, in the same run.

use crate::proc::Error;

pub fn run(_args: &[String]) -> Result<(), Error> {
    Err(Error("the benchmark harness is not built yet".into()))
}
