//! The environment of one benchmark run: sizes for `--quick` and the full run, the temporary
//! work directory, the generated databases, page-store servers (fresh processes on one data
//! directory, optionally with the per-request delay), the `litevfs` CLI, and /proc readings.
//!
//! Owns every path and process the workloads share; it measures only what the workloads ask
//! for (import and export times, peak RSS).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::driver::{Driver, run_timeout};
use crate::proc::{Error, Server, output_checked};
use crate::setup::Artifacts;

/// Sizes and counts; `quick` keeps the whole run under two minutes on two cores.
pub struct Params {
    pub warm_rows: u64,
    pub warm_payload: u64,
    pub lookups: u64,
    pub reps: usize,
    pub big_rows: u64,
    pub big_payload: u64,
    pub cold_reps: usize,
    /// Repetitions of the cold whole-database walks (full scan, integrity_check).
    pub walk_reps: usize,
    pub vis_commits: u64,
    pub vis_interval_ms: u64,
    pub commit_n: u64,
    pub bulk_reps: usize,
    pub delay_ms: u64,
}

impl Params {
    pub fn new(quick: bool) -> Params {
        if quick {
            Params {
                warm_rows: 40_000,
                warm_payload: 300,
                lookups: 20_000,
                reps: 3,
                big_rows: 64_000,
                big_payload: 1000,
                cold_reps: 3,
                walk_reps: 1,
                vis_commits: 30,
                vis_interval_ms: 30,
                commit_n: 100,
                bulk_reps: 2,
                delay_ms: 20,
            }
        } else {
            Params {
                warm_rows: 200_000,
                warm_payload: 300,
                lookups: 100_000,
                reps: 7,
                // 4 rows of 1000 bytes per 4 KiB page: about 1.1 GiB.
                big_rows: 1_150_000,
                big_payload: 1000,
                cold_reps: 7,
                walk_reps: 2,
                vis_commits: 200,
                vis_interval_ms: 25,
                commit_n: 500,
                bulk_reps: 2,
                delay_ms: 20,
            }
        }
    }

    pub fn list(&self) -> Vec<(String, String)> {
        let kv = |k: &str, v: String| (k.to_string(), v);
        vec![
            kv("warm_rows", self.warm_rows.to_string()),
            kv("warm_payload_bytes", self.warm_payload.to_string()),
            kv("lookups_per_rep", self.lookups.to_string()),
            kv("reps", self.reps.to_string()),
            kv("big_rows", self.big_rows.to_string()),
            kv("big_payload_bytes", self.big_payload.to_string()),
            kv("cold_reps", self.cold_reps.to_string()),
            kv("visibility_commits", self.vis_commits.to_string()),
            kv("visibility_interval_ms", self.vis_interval_ms.to_string()),
            kv("commits_per_rep", self.commit_n.to_string()),
            kv("bulk_reps", self.bulk_reps.to_string()),
            kv("delay_ms", self.delay_ms.to_string()),
            kv(
                "sqlite_cache_size",
                "-2000 (2000 KiB, SQLite's default), both targets".into(),
            ),
        ]
    }
}

/// A generated database file.
pub struct DbFile {
    pub path: PathBuf,
    pub bytes: u64,
    pub pages: u64,
    pub depth: u64,
}

pub struct Ctx {
    pub p: Params,
    pub art: Artifacts,
    pub drv: Driver,
    pub work: PathBuf,
    pub data: PathBuf,
    /// Why the litevfs side cannot run (server or extension missing), if it cannot.
    pub lv_missing: Option<String>,
}

impl Ctx {
    pub fn dir(&self, name: &str) -> PathBuf {
        self.work.join(name)
    }

    /// Generates `name.db` in the work directory with the driver.
    pub fn generate(&self, name: &str, rows: u64, payload: u64) -> Result<DbFile, Error> {
        let path = self.dir(&format!("{name}.db"));
        let t = Instant::now();
        let r = self.drv.once(&[
            "gen",
            &path.to_string_lossy(),
            &rows.to_string(),
            &payload.to_string(),
        ])?;
        let db = DbFile {
            path,
            bytes: r.num("bytes")? as u64,
            pages: r.num("pages")? as u64,
            depth: r.num("depth")? as u64,
        };
        println!(
            "    {name}.db: {rows} rows, {:.1} MB, {} pages, b-tree depth {} ({:.1} s)",
            db.bytes as f64 / 1e6,
            db.pages,
            db.depth,
            t.elapsed().as_secs_f64()
        );
        Ok(db)
    }

    /// A fresh `litevfs serve` on the shared data directory (with `--delay-ms` when non-zero).
    pub fn server(&self, delay_ms: u64) -> Result<Server, Error> {
        let d = delay_ms.to_string();
        let mut extra = vec!["--max-body-size", "16GiB"];
        if delay_ms > 0 {
            extra.extend(["--delay-ms", d.as_str()]);
        }
        Server::start(&self.art.bin, &self.data, &extra).map_err(|e| {
            Error(format!(
                "page store (litevfs serve {}) does not start: {e}",
                extra.join(" ")
            ))
        })
    }

    /// Runs `litevfs ARGS` (an admin subcommand) with a time limit; fails with its stderr.
    fn cli(&self, args: &[&std::ffi::OsStr]) -> Result<(), Error> {
        let what = format!(
            "litevfs {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let out = run_timeout(Command::new(&self.art.bin).args(args), &what, CLI_TIMEOUT)?;
        if !out.status.success() {
            return Err(Error(format!(
                "{what} failed ({}): {}",
                out.status,
                out.stderr.trim()
            )));
        }
        Ok(())
    }

    /// `litevfs import NAME FILE`; returns the seconds it took.
    pub fn import(&self, name: &str, file: &Path, url: &str) -> Result<f64, Error> {
        let t = Instant::now();
        self.cli(&[
            "import".as_ref(),
            name.as_ref(),
            file.as_ref(),
            "--host".as_ref(),
            url.as_ref(),
        ])?;
        Ok(t.elapsed().as_secs_f64())
    }

    /// `litevfs export NAME FILE --force`; returns the seconds it took.
    pub fn export(&self, name: &str, file: &Path, url: &str) -> Result<f64, Error> {
        let t = Instant::now();
        let args = [
            "export".as_ref(),
            name.as_ref(),
            file.as_ref(),
            "--force".as_ref(),
            "--host".as_ref(),
            url.as_ref(),
        ];
        self.cli(&args)?;
        Ok(t.elapsed().as_secs_f64())
    }

    pub fn delete(&self, name: &str, url: &str) -> Result<(), Error> {
        self.cli(&[
            "delete".as_ref(),
            name.as_ref(),
            "--host".as_ref(),
            url.as_ref(),
        ])
    }
}

/// Longest wait for one `litevfs import` or `export` (1.2 GB takes under a minute).
const CLI_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// A field of /proc/PID/status in kB (VmHWM: peak resident set size).
pub fn proc_kb(pid: u32, field: &str) -> Result<f64, Error> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error(format!("no {field} in /proc/{pid}/status")))
}

/// Free bytes on the file system holding `dir` (from `df -Pk`).
pub fn free_bytes(dir: &Path) -> Result<u64, Error> {
    let out = output_checked(Command::new("df").arg("-Pk").arg(dir), "df")?;
    out.lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| Error(format!("cannot read df output: {out}")))
}

/// CPU, memory, kernel and disk of this machine, for the record.
pub fn machine(work: &Path) -> Vec<(String, String)> {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let mem = read("/proc/meminfo")
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .nth(1)
        .unwrap_or("?")
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let disk = output_checked(Command::new("df").arg("-h").arg(work), "df")
        .ok()
        .and_then(|o| {
            o.lines()
                .nth(1)
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_default();
    let mut m = vec![
        ("cpu".to_string(), cpu),
        ("cores".to_string(), cores.to_string()),
        (
            "mem_total_mib".to_string(),
            (mem.parse::<u64>().unwrap_or(0) / 1024).to_string(),
        ),
        (
            "kernel".to_string(),
            read("/proc/sys/kernel/osrelease").trim().to_string(),
        ),
        ("temp_fs".to_string(), disk),
        (
            "loadavg_at_start".to_string(),
            read("/proc/loadavg").trim().to_string(),
        ),
    ];
    if let Ok(v) = output_checked(Command::new("rustc").arg("--version"), "rustc") {
        m.push(("rustc".to_string(), v.trim().to_string()));
    }
    m
}

/// Counters of the page store, from `GET /metrics` (Prometheus text).
#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// HTTP requests answered, all routes but `/metrics`.
    pub requests: f64,
    pub pages: f64,
    pub bytes: f64,
    /// GETs to the object store (whole objects and ranges; `--store` only).
    pub bucket_gets: f64,
    /// Requests by `METHOD route`, all routes but `/metrics`.
    pub routes: std::collections::BTreeMap<String, f64>,
}

impl Metrics {
    /// Requests per route made between `before` and `self`, as `GET /pos 1, GET /db/page 4`.
    pub fn routes_since(&self, before: &Metrics) -> String {
        let mut parts = vec![];
        for (route, n) in &self.routes {
            let d = n - before.routes.get(route).copied().unwrap_or(0.0);
            if d > 0.0 {
                parts.push(format!("{route} {d}"));
            }
        }
        parts.join(", ")
    }
}

/// Reads the page store's counters with a minimal std-only HTTP/1.1 GET.
pub fn metrics(url: &str) -> Result<Metrics, Error> {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let mut s =
        std::net::TcpStream::connect(addr).map_err(|e| Error(format!("GET {url}/metrics: {e}")))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    if !text.starts_with("HTTP/1.1 200") {
        return Err(Error(format!(
            "GET {url}/metrics: {}",
            text.lines().next().unwrap_or("no reply")
        )));
    }
    Ok(parse_metrics(body))
}

/// The value of label `key` in a Prometheus series name.
fn label<'a>(series: &'a str, key: &str) -> &'a str {
    let pat = format!("{key}=\"");
    series
        .split_once(pat.as_str())
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(v, _)| v)
        .unwrap_or("?")
}

fn parse_metrics(body: &str) -> Metrics {
    let mut m = Metrics::default();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, v)) = line.rsplit_once(' ') else {
            continue;
        };
        let v: f64 = v.parse().unwrap_or(0.0);
        if name.starts_with("litevfs_http_requests_total") && !name.contains("route=\"/metrics\"") {
            m.requests += v;
            *m.routes
                .entry(format!(
                    "{} {}",
                    label(name, "method"),
                    label(name, "route")
                ))
                .or_default() += v;
        } else if name == "litevfs_pages_served_total" {
            m.pages = v;
        } else if name == "litevfs_page_bytes_served_total" {
            m.bytes = v;
        } else if name.starts_with("litevfs_bucket_requests_total")
            && matches!(label(name, "op"), "get" | "get_range")
        {
            m.bucket_gets += v;
        }
    }
    m
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_prometheus_counters() {
        let m = super::parse_metrics(
            "# TYPE x counter\nlitevfs_http_requests_total{route=\"/db/page\",method=\"GET\",status=\"200\"} 3\n\
             litevfs_http_requests_total{route=\"/metrics\",method=\"GET\",status=\"200\"} 9\n\
             litevfs_http_requests_total{route=\"/pos\",method=\"GET\",status=\"200\"} 1\n\
             litevfs_pages_served_total 12\nlitevfs_page_bytes_served_total 49152\n\
             litevfs_bucket_requests_total{op=\"get\",result=\"ok\"} 2\n\
             litevfs_bucket_requests_total{op=\"get_range\",result=\"not_found\"} 1\n\
             litevfs_bucket_requests_total{op=\"put_create\",result=\"ok\"} 5\n",
        );
        assert_eq!((m.requests, m.pages, m.bytes), (4.0, 12.0, 49152.0));
        assert_eq!(m.bucket_gets, 3.0);
        assert_eq!(
            m.routes_since(&super::Metrics::default()),
            "GET /db/page 3, GET /pos 1"
        );
    }
}
