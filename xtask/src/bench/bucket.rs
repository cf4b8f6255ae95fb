//! Workload 7, object storage: `litevfs serve --store s3://` on moto's S3 server (from the
//! project's `.venv`, on a free loopback port), two servers on one bucket, against plain SQLite
//! on a local file in the same run.
//!
//! - Commits: single-row transactions under a lease through server A (every commit is one
//!   conditional PUT to the bucket, after one GET of the lease object).
//! - Change visibility across servers: the writer on server A, the reader on server B, which
//!   learns of A's commits from the bucket within `--poll-interval`.
//! - Cold point lookup on a cold server: each repetition starts a server on an empty data
//!   directory (the bucket holds the big database) and a fresh client; time and GETs to the
//!   bucket are counted (the server's `/metrics`).
//! - Polling: GETs per second a server makes for one long-polled database with no commits.
//!
//! moto is a Python server: its latency is neither S3's nor a local disk's, so these rows show
//! the costs per operation and how they compare with plain SQLite on this machine, not S3.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::cold;
use super::ctx::{Ctx, DbFile, metrics};
use super::live;
use super::report::Report;
use super::stats::Summary;
use crate::proc::{Error, Server};

pub const NAME: &str = "7 object storage";
const BUCKET: &str = "litevfs-bench";

/// moto's S3 server, killed on drop.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_moto(py: &std::path::Path) -> Result<Moto, Error> {
    let bin = py.with_file_name("moto_server");
    let mut child = Command::new(&bin)
        .args(["-H", "127.0.0.1", "-p", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error(format!("cannot start {}: {e}", bin.display())))?;
    let mut err = BufReader::new(child.stderr.take().expect("piped"));
    let mut line = String::new();
    let endpoint = loop {
        line.clear();
        if err.read_line(&mut line)? == 0 {
            return Err(Error("moto_server exited before listening".into()));
        }
        if let Some(at) = line.find("Running on http://") {
            break line[at + "Running on ".len()..].trim().to_string();
        }
    };
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = err.read_to_end(&mut sink);
    });
    Ok(Moto { child, endpoint })
}

/// `PUT /BUCKET` on moto (std-only HTTP; moto does not check signatures).
fn create_bucket(endpoint: &str) -> Result<(), Error> {
    let addr = endpoint.trim_start_matches("http://");
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "PUT /{BUCKET} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)?;
    if !reply.starts_with("HTTP/1.1 200") {
        return Err(Error(format!(
            "creating the bucket: {}",
            reply.lines().next().unwrap_or("")
        )));
    }
    Ok(())
}

/// The phase: a bucket on moto, two servers on it, the workloads.
pub fn run(
    c: &Ctx,
    py: &std::path::Path,
    dbs: (&DbFile, &DbFile, &DbFile),
    rep: &mut Report,
) -> Result<(), Error> {
    let moto = start_moto(py)?;
    create_bucket(&moto.endpoint)?;
    for (k, v) in [
        ("AWS_ACCESS_KEY_ID", "bench"),
        ("AWS_SECRET_ACCESS_KEY", "bench"),
        ("AWS_REGION", "us-east-1"),
    ] {
        // SAFETY: set before the servers start; no thread of the xtask reads the environment.
        unsafe { std::env::set_var(k, v) };
    }
    let store = format!("s3://{BUCKET}/bench");
    let start = |dir: PathBuf, extra: &[&str]| -> Result<Server, Error> {
        let mut args = vec![
            "--store",
            &store,
            "--aws-endpoint-url",
            &moto.endpoint,
            "--s3-path-style",
            "--max-body-size",
            "16GiB",
        ];
        args.extend_from_slice(extra);
        Server::start(&c.art.bin, &dir, &args)
    };
    let a = start(c.dir("bucket-a"), &[])?;
    let b = start(c.dir("bucket-b"), &[])?;
    println!(
        "    moto on {}; servers {} and {}",
        moto.endpoint, a.url, b.url
    );
    let (vis, commits, big) = dbs;
    for (db, name) in [(vis, "vis"), (commits, "commits"), (big, "big")] {
        c.import(name, &db.path, &a.url)?;
    }
    println!("    commits through server A");
    live::commits_as(c, commits, Some(&a.url), rep, NAME, ", --store s3://")?;
    println!("    change visibility: writer on server A, reader on server B");
    live::visibility_as(
        c,
        vis,
        Some((&a.url, &b.url)),
        rep,
        NAME,
        ", writer on A, reader on B",
        10_000_000,
    )?;
    println!("    cold point lookups, each on a server with an empty data directory");
    cold_lookups(c, big, &start, rep)?;
    println!("    polling cost of one long-polled database");
    polling(c, &b, rep)?;
    rep.notes.push(format!(
        "workload 7: moto {} on loopback (Python; not S3's latency), two servers on one bucket, \
         default --poll-interval 100ms",
        moto.endpoint
    ));
    Ok(())
}

/// Starts a server on a data directory with extra arguments.
type StartServer<'a> = &'a dyn Fn(PathBuf, &[&str]) -> Result<Server, Error>;

/// Cold point lookups, each on a fresh server (empty data directory, long poll interval so
/// that only the lookup's own GETs are counted) with a fresh client.
fn cold_lookups(c: &Ctx, big: &DbFile, start: StartServer, rep: &mut Report) -> Result<(), Error> {
    let rows = c.p.big_rows;
    let (mut plain, mut cost) = (vec![], cold::Cost::default());
    for i in 0..c.p.cold_reps as u64 {
        let id = 1 + (i * 2_654_435_761 + 12_345) % rows;
        let q = format!("lookup {id}");
        plain.push(cold::plain_once(c, big, &q)?.0);
        let dir = c.dir(&format!("bucket-cold-{i}"));
        let s = start(dir.clone(), &["--poll-interval", "60s"])?;
        let cache = c.dir(&format!("cache-bucket-cold-{i}"));
        cold::litevfs_once(c, &s.url, &cache, &q, &mut cost)?;
        s.stop();
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&cache);
    }
    let one = |v: &Vec<f64>| Summary::of(v.clone());
    rep.row(
        NAME,
        "first point lookup on a cold server (open+query), --store s3://",
        "ms",
        Summary::of(plain),
        one(&cost.ms),
    );
    rep.row(
        NAME,
        &format!(
            "  of which GETs to the bucket (b-tree depth {}, at most depth + 3)",
            big.depth
        ),
        "count",
        None,
        one(&cost.bucket_gets),
    );
    rep.row(
        NAME,
        "  of which requests to the page store",
        "count",
        None,
        one(&cost.requests),
    );
    Ok(())
}

/// GETs per second a server makes to the bucket while one database is long-polled and nobody
/// commits: the price of learning within `--poll-interval` of other servers' commits.
fn polling(c: &Ctx, b: &Server, rep: &mut Report) -> Result<(), Error> {
    let (mut s, _) = c.drv.litevfs("vis", &b.url, &c.dir("cache-bucket-poll"))?;
    s.cmd("exec SELECT count(*) FROM sqlite_master")?;
    std::thread::sleep(Duration::from_millis(500));
    let m0 = metrics(&b.url)?;
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let m1 = metrics(&b.url)?;
    let rate = (m1.bucket_gets - m0.bucket_gets) / t.elapsed().as_secs_f64();
    rep.row(
        NAME,
        "GETs to the bucket per second, one long-polled idle database",
        "GET/s",
        None,
        Some(Summary::one(rate)),
    );
    Ok(())
}
