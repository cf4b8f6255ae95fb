//! What the torture experiments are built from: a seeded random source, the worker processes
//! (examples/torture_worker.rs), the page store restarted on its own port and data directory,
//! raw HTTP over loopback, and a proxy that loses replies.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use crate::proc::{Error, Server};

/// xorshift64*: reproducible from `--seed`.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// Paths every experiment needs.
pub struct Ctx {
    pub bin: PathBuf,
    pub ext: PathBuf,
    pub worker: PathBuf,
    /// Scratch directory of this run (removed at the end).
    pub dir: PathBuf,
    pub vectors: PathBuf,
    /// moto's S3 server, when `.venv` has it.
    pub moto: Option<PathBuf>,
}

impl Ctx {
    /// A fresh directory under the run's scratch directory.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let d = self.dir.join(name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("scratch dir");
        d
    }
}

/// A page store that can be killed and restarted on the same address and data directory.
pub struct Store {
    bin: PathBuf,
    pub data: PathBuf,
    pub addr: String,
    extra: Vec<String>,
    log: PathBuf,
    server: Option<Server>,
}

impl Store {
    pub fn start(ctx: &Ctx, name: &str, extra: &[&str]) -> Result<Store, Error> {
        let data = ctx.subdir(name);
        let log = ctx.dir.join(format!("{name}.log"));
        let mut s = Store {
            bin: ctx.bin.clone(),
            data: data.join("data"),
            addr: "127.0.0.1:0".into(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            log,
            server: None,
        };
        s.restart()?;
        Ok(s)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// (Re)starts the server; the first start picks a free port, later ones reuse it.
    pub fn restart(&mut self) -> Result<(), Error> {
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)?;
            match Server::start_at(&self.bin, &self.data, &self.addr, &extra, log.into()) {
                Ok(s) => {
                    self.addr = s.url.trim_start_matches("http://").to_string();
                    self.server = Some(s);
                    return Ok(());
                }
                // The port may linger for a moment after a kill.
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub fn kill9(&mut self) {
        if let Some(s) = self.server.take() {
            s.stop();
        }
    }

    /// `litevfs backup` of the data directory into `dest` (new or empty), while it serves.
    pub fn backup(&self, dest: &Path) -> Result<(), Error> {
        let out = Command::new(&self.bin)
            .arg("backup")
            .arg("--data-dir")
            .arg(&self.data)
            .arg(dest)
            .output()?;
        if !out.status.success() {
            return Err(Error(format!(
                "litevfs backup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// With the server killed: what a crash of the machine leaves when `store.db` had synced
    /// no later than `backup`'s copy of it (the write-ahead log goes, the copy takes its place;
    /// the commit log stays).
    pub fn lose_unsynced(&self, backup: &Path) -> Result<(), Error> {
        for ext in ["-wal", "-shm"] {
            let f = self.data.join(format!("store.db{ext}"));
            if f.exists() {
                std::fs::remove_file(f)?;
            }
        }
        std::fs::copy(backup.join("store.db"), self.data.join("store.db"))?;
        Ok(())
    }

    /// A crash: the server ended without being killed.
    pub fn crashed(&mut self) -> Option<ExitStatus> {
        self.server.as_mut().and_then(Server::exited)
    }

    /// Sum of `litevfs_http_requests_total` with a 5xx status since the server started.
    pub fn count_5xx(&self) -> u64 {
        let Ok(r) = http(&self.addr, "GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n", b"") else {
            return 0;
        };
        r.body_text()
            .lines()
            .filter(|l| l.starts_with("litevfs_http_requests_total{") && l.contains("status=\"5"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

/// moto's S3 server from `.venv` on a free loopback port; killed on drop.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Moto {
    pub fn start(ctx: &Ctx) -> Result<Moto, Error> {
        let bin = ctx.moto.as_ref().ok_or_else(|| {
            Error("moto_server is not installed in .venv (cargo xtask test installs it)".into())
        })?;
        let mut child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", "0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error(format!("cannot start {}: {e}", bin.display())))?;
        let err = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if !sent && let Some(at) = line.find("Running on http://") {
                    let _ = tx.send(line[at + "Running on ".len()..].trim().to_string());
                    sent = true;
                }
            }
        });
        let endpoint = rx
            .recv_timeout(Duration::from_secs(60))
            .map_err(|_| Error("moto_server did not start listening".into()))?;
        Ok(Moto { child, endpoint })
    }

    /// Creates bucket `name` (moto accepts unsigned requests).
    pub fn bucket(&self, name: &str) -> Result<String, Error> {
        let addr = self.endpoint.trim_start_matches("http://");
        let r = http(
            addr,
            &format!("PUT /{name} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n"),
            b"",
        )?;
        if r.status != 200 {
            return Err(Error(format!("create bucket {name}: {}", r.status)));
        }
        Ok(name.to_string())
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A worker process; killed on drop.
pub struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

impl Worker {
    pub fn spawn(ctx: &Ctx, host: &str, cache: &Path, args: &[&str]) -> Result<Worker, Error> {
        Worker::spawn_with(ctx, host, cache, args, &[])
    }

    /// [`Worker::spawn`] with extra environment variables.
    pub fn spawn_with(
        ctx: &Ctx,
        host: &str,
        cache: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Worker, Error> {
        let mut all = vec![args[0], args[1], ctx.ext.to_str().expect("utf-8 path")];
        all.extend_from_slice(&args[2..]);
        let mut child = Command::new(&ctx.worker)
            .args(&all)
            .env("LITEFS_CLOUD_HOST", host)
            .env("LITEVFS_CACHE_DIR", cache)
            .env("LITEVFS_COMMIT_DEADLINE", "20")
            .env_remove("LITEFS_CLOUD_TOKEN")
            .env_remove("LITEFS_CLOUD_CLUSTER")
            .env("RUST_LOG", "off")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| Error(format!("cannot start {}: {e}", ctx.worker.display())))?;
        let stdin = child.stdin.take();
        let (tx, rx) = mpsc::channel();
        crate::proc::forward_lines(child.stdout.take().expect("piped"), tx);
        Ok(Worker {
            child,
            stdin,
            lines: rx,
            seen: Vec::new(),
        })
    }

    /// The next line within `timeout`.
    pub fn line(&mut self, timeout: Duration) -> Option<String> {
        let l = self.lines.recv_timeout(timeout).ok()?;
        self.seen.push(l.clone());
        Some(l)
    }

    /// Waits for a line starting with `prefix` (other lines are kept in `seen`).
    pub fn expect(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let l = self.line(left)?;
            if l.starts_with(prefix) {
                return Some(l);
            }
        }
        None
    }

    pub fn send(&mut self, line: &str) {
        if let Some(s) = self.stdin.as_mut() {
            let _ = writeln!(s, "{line}");
            let _ = s.flush();
        }
    }

    /// Closes stdin (the signal to finish) and collects every line until the process ends.
    pub fn finish(mut self, timeout: Duration) -> (Vec<String>, Option<ExitStatus>) {
        self.stdin = None;
        self.drain(timeout)
    }

    pub fn kill9(mut self) -> Vec<String> {
        let _ = self.child.kill();
        self.drain(Duration::from_secs(10)).0
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status();
    }

    fn drain(&mut self, timeout: Duration) -> (Vec<String>, Option<ExitStatus>) {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => self.seen.push(l),
                Err(_) => break,
            }
        }
        // Its stdout closes a moment before it is reaped.
        let reap_by = Instant::now() + Duration::from_secs(10);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < reap_by => std::thread::sleep(ms_(5)),
                _ => {
                    let _ = self.child.kill();
                    break None;
                }
            }
        };
        (std::mem::take(&mut self.seen), status)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ms_(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Runs a worker to completion and returns its last line.
pub fn run_worker(ctx: &Ctx, host: &str, cache: &Path, args: &[&str]) -> Result<String, Error> {
    let w = Worker::spawn(ctx, host, cache, args)?;
    let (lines, _) = w.finish(Duration::from_secs(300));
    lines
        .last()
        .cloned()
        .ok_or_else(|| Error(format!("torture_worker {args:?} printed nothing")))
}

/// `key=value` from a worker's line.
pub fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

/// A JSON number field from `stats {...}`, without a JSON parser.
pub fn json_field(line: &str, key: &str) -> u64 {
    let pat = format!("\"{key}\":");
    line.find(&pat)
        .map(|i| &line[i + pat.len()..])
        .and_then(|rest| {
            rest.chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// One HTTP/1.1 reply.
pub struct Reply {
    pub status: u16,
    pub raw: Vec<u8>,
}

impl Reply {
    pub fn has_content_type(&self) -> bool {
        let text = String::from_utf8_lossy(&self.raw).to_ascii_lowercase();
        let head = text.split("\r\n\r\n").next().unwrap_or("");
        head.contains("\r\ncontent-type:")
    }

    pub fn body_text(&self) -> String {
        let text = String::from_utf8_lossy(&self.raw);
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }
}

/// Sends `head` (which must ask for nothing after the reply) and `body` on a new connection and
/// reads the reply until the server closes it or 10 s pass.
pub fn http(addr: &str, head: &str, body: &[u8]) -> std::io::Result<Reply> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let head = head.replacen("\r\n", "\r\nConnection: close\r\n", 1);
    s.write_all(head.as_bytes())?;
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    // Interim replies (`100 Continue`) come before the final one.
    while raw.starts_with(b"HTTP/1.1 1") {
        match raw.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(end) => raw.drain(..end + 4),
            None => break,
        };
    }
    let status = std::str::from_utf8(raw.get(9..12).unwrap_or(b""))
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no HTTP reply"))?;
    Ok(Reply { status, raw })
}

/// A loopback proxy that loses some replies to `POST /db/tx` (after the store got the request)
/// and some requests (before it did): the faults a flaky network or a restarting load balancer
/// produce. Every other request passes. Each request goes upstream on its own connection.
pub struct LossyProxy {
    pub addr: String,
    pub lost_replies: Arc<AtomicU64>,
    pub lost_requests: Arc<AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl LossyProxy {
    pub fn start(upstream: &str, percent: u64, seed: u64) -> Result<LossyProxy, Error> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?.to_string();
        let up: SocketAddr = upstream
            .parse()
            .map_err(|e| Error(format!("{upstream}: {e}")))?;
        let rng = Arc::new(Mutex::new(Rng::new(seed)));
        let (lr, lq) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (lr2, lq2, stop2) = (lr.clone(), lq.clone(), stop.clone());
        l.set_nonblocking(true)?;
        std::thread::spawn(move || {
            while !stop2.load(Ordering::SeqCst) {
                match l.accept() {
                    Ok((c, _)) => {
                        let _ = c.set_nonblocking(false);
                        let (rng, lr, lq) = (rng.clone(), lr2.clone(), lq2.clone());
                        std::thread::spawn(move || {
                            let _ = serve(c, up, percent, &rng, &lr, &lq);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(LossyProxy {
            addr,
            lost_replies: lr,
            lost_requests: lq,
            stop,
        })
    }
}

impl Drop for LossyProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Reads one request (head and Content-Length body); `None` at EOF.
fn read_request(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<(String, Vec<u8>)>> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let end = line == "\r\n";
        head.push_str(&line);
        if end {
            break;
        }
    }
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok(Some((head, body)))
}

fn serve(
    c: TcpStream,
    up: SocketAddr,
    percent: u64,
    rng: &Mutex<Rng>,
    lost_replies: &AtomicU64,
    lost_requests: &AtomicU64,
) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut out = c.try_clone()?;
    let mut r = BufReader::new(c);
    // One request per connection: the reply ends with the upstream's `Connection: close`.
    if let Some((head, body)) = read_request(&mut r)? {
        let fault = if head.starts_with("POST /db/tx") {
            let mut g = rng.lock().unwrap_or_else(|e| e.into_inner());
            match g.range(0, 100) {
                n if n < percent / 2 => Some("request"),
                n if n < percent => Some("reply"),
                _ => None,
            }
        } else {
            None
        };
        if fault == Some("request") {
            lost_requests.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
        let head: String = head
            .split("\r\n")
            .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
            .collect::<Vec<_>>()
            .join("\r\n");
        let head = head.trim_end().to_string() + "\r\nConnection: close\r\n\r\n";
        let mut u = TcpStream::connect_timeout(&up, Duration::from_secs(5))?;
        u.write_all(head.as_bytes())?;
        u.write_all(&body)?;
        let mut resp = Vec::new();
        u.read_to_end(&mut resp)?;
        if fault == Some("reply") {
            lost_replies.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        }
        out.write_all(&resp)?;
    }
    Ok(())
}
