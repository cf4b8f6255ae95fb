//! Helpers for the page-store tests: spawn the real `litevfs serve` on loopback, talk HTTP to
//! it, and build LTX files against a model of the database.

#![allow(dead_code)]

pub mod proxy;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use litevfs::ltx::{self, EMPTY_CHECKSUM, checksum_xor, lock_page, page_checksum};
use litevfs::wire::{ErrorBody, Pos};
use reqwest::Method;
use reqwest::blocking::{Client, RequestBuilder};

/// Where a test server keeps its databases. The conformance suites run once per backend.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `DATA_DIR/store.db` (no `--store`).
    Local,
    /// `--store file://DIR`.
    File,
    /// `--store s3://BUCKET` on a moto server on loopback.
    S3,
}

thread_local! {
    static BACKEND: std::cell::Cell<Backend> = const { std::cell::Cell::new(Backend::Local) };
}

/// The backend of the test running on this thread.
pub fn backend() -> Backend {
    BACKEND.with(|b| b.get())
}

/// Runs `test` with servers on `b`.
pub fn with_backend(b: Backend, test: fn()) {
    BACKEND.with(|c| c.set(b));
    test()
}

/// Defines, for each listed test function (a plain `fn name()` in the enclosing file), one
/// `#[test]` per backend: `local::name`, `file::name`, `s3::name`.
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod local {
            $( #[test] fn $name() { $crate::server_support::with_backend($crate::server_support::Backend::Local, super::$name) } )*
        }
        mod file {
            $( #[test] fn $name() { $crate::server_support::with_backend($crate::server_support::Backend::File, super::$name) } )*
        }
        mod s3 {
            $( #[test] fn $name() { $crate::server_support::with_backend($crate::server_support::Backend::S3, super::$name) } )*
        }
    };
}

/// Like [`on_every_backend`], for tests of `--store` only: `file::name` and `s3::name`.
#[macro_export]
macro_rules! on_bucket_backends {
    ($($name:ident),* $(,)?) => {
        mod file {
            $( #[test] fn $name() { $crate::server_support::with_backend($crate::server_support::Backend::File, super::$name) } )*
        }
        mod s3 {
            $( #[test] fn $name() { $crate::server_support::with_backend($crate::server_support::Backend::S3, super::$name) } )*
        }
    };
}

/// The moto S3 server of this test process (started on first use, on a free loopback port,
/// and killed with the process).
pub struct Moto {
    pub endpoint: String,
    _child: Child,
}

static MOTO: std::sync::OnceLock<Moto> = std::sync::OnceLock::new();

/// The moto server (`moto_server` from the project's `.venv`, or `LITEVFS_MOTO_SERVER`).
pub fn moto() -> &'static Moto {
    MOTO.get_or_init(|| {
        // The kernel kills moto when the thread that started it ends (PR_SET_PDEATHSIG follows
        // the thread, not the process): start it from a thread that lives as long as the
        // process, so it dies with the test binary and not before.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let started = std::panic::catch_unwind(start_moto);
            let keep = started.as_ref().ok().map(|(_, c)| c.id());
            let _ = tx.send(started);
            if keep.is_some() {
                loop {
                    std::thread::park();
                }
            }
        });
        let (endpoint, child) = match rx.recv().expect("moto starter") {
            Ok(v) => v,
            Err(e) => std::panic::resume_unwind(e),
        };
        Moto {
            endpoint,
            _child: child,
        }
    })
}

fn start_moto() -> (String, Child) {
    let bin = std::env::var_os("LITEVFS_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/moto_server"));
    assert!(
        bin.exists(),
        "{} not found: the S3 tests need moto's server; run `cargo xtask test`, which \
         installs it into .venv (or set LITEVFS_MOTO_SERVER)",
        bin.display()
    );
    let mut cmd = Command::new(&bin);
    cmd.args(["-H", "127.0.0.1", "-p", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: prctl only asks the kernel to signal the child when its parent thread ends; it
    // touches no memory of ours and is async-signal-safe.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("start moto_server");
    let mut err = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    let endpoint = loop {
        line.clear();
        if err.read_line(&mut line).expect("moto output") == 0 {
            panic!("moto_server exited before listening");
        }
        if let Some(at) = line.find("Running on http://") {
            break line[at + "Running on ".len()..].trim().to_string();
        }
    };
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        while err.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
            sink.clear();
        }
    });
    (endpoint, child)
}

/// A bucket name derived from a data directory, so that a restart finds the same bucket.
fn bucket_for(dir: &Path) -> String {
    let h = litevfs::ltx::CRC64.checksum(dir.to_string_lossy().as_bytes());
    format!("t{h:016x}")
}

/// The keys of every object in the bucket that belongs to `dir` (bucket backends).
pub fn bucket_objects(dir: &Path) -> Vec<String> {
    match backend() {
        Backend::Local => Vec::new(),
        Backend::File => {
            let root = dir.with_extension("bucket");
            let mut out = Vec::new();
            let mut todo = vec![root.clone()];
            while let Some(d) = todo.pop() {
                for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                    let p = e.path();
                    if p.is_dir() {
                        todo.push(p);
                    } else if !p.to_string_lossy().contains("#")
                        && !p.ends_with(".litevfs-cas.lock")
                    {
                        out.push(
                            p.strip_prefix(&root)
                                .unwrap()
                                .to_string_lossy()
                                .into_owned(),
                        );
                    }
                }
            }
            out.sort();
            out
        }
        Backend::S3 => {
            let m = moto();
            let bucket = bucket_for(dir);
            let mut out = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let mut url = format!("{}/{bucket}?list-type=2", m.endpoint);
                if let Some(t) = &token {
                    url.push_str(&format!("&continuation-token={t}"));
                }
                let xml = Client::new().get(url).send().unwrap().text().unwrap();
                for part in xml.split("<Key>").skip(1) {
                    out.push(part.split("</Key>").next().unwrap().to_string());
                }
                token = xml
                    .split("<NextContinuationToken>")
                    .nth(1)
                    .map(|t| t.split('<').next().unwrap().to_string());
                if token.is_none() {
                    break;
                }
            }
            out.sort();
            out
        }
    }
}

/// One object of the bucket that belongs to `dir`, by its key relative to the bucket (for
/// `s3://` the key includes the `litevfs/` prefix the tests use; for `file://` that prefix is
/// stripped, the directory being the root).
pub fn bucket_object(dir: &Path, key: &str) -> Option<Vec<u8>> {
    match backend() {
        Backend::Local => None,
        Backend::File => {
            let rel = key.strip_prefix("litevfs/").unwrap_or(key);
            std::fs::read(dir.with_extension("bucket").join(rel)).ok()
        }
        Backend::S3 => {
            // moto checks that an object read carries credentials, not their signature.
            let auth = "AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, \
                        SignedHeaders=host, Signature=00";
            let r = Client::new()
                .get(format!("{}/{}/{key}", moto().endpoint, bucket_for(dir)))
                .header("Authorization", auth)
                .send()
                .ok()?;
            r.status().is_success().then(|| r.bytes().unwrap().to_vec())
        }
    }
}

/// The `--store` arguments (and environment) for a server of the current backend whose data
/// lives with `dir`; none for the local backend.
pub fn store_args(dir: &Path) -> (Vec<String>, Vec<(String, String)>) {
    store_args_via(dir, None)
}

/// Like [`store_args`], with S3 requests sent to `endpoint` (a proxy) instead of moto.
pub fn store_args_via(dir: &Path, endpoint: Option<&str>) -> (Vec<String>, Vec<(String, String)>) {
    match backend() {
        Backend::Local => (Vec::new(), Vec::new()),
        Backend::File => (
            vec![
                "--store".into(),
                format!("file://{}", dir.with_extension("bucket").display()),
            ],
            Vec::new(),
        ),
        Backend::S3 => {
            let m = moto();
            let bucket = bucket_for(dir);
            let r = Client::new()
                .put(format!("{}/{bucket}", m.endpoint))
                .send()
                .expect("create the bucket on moto");
            assert!(r.status().is_success(), "create bucket: {}", r.status());
            (
                vec![
                    "--store".into(),
                    format!("s3://{bucket}/litevfs"),
                    "--aws-endpoint-url".into(),
                    endpoint.unwrap_or(&m.endpoint).to_string(),
                    "--s3-path-style".into(),
                ],
                vec![
                    ("AWS_ACCESS_KEY_ID".into(), "test".into()),
                    ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
                    ("AWS_REGION".into(), "us-east-1".into()),
                ],
            )
        }
    }
}

/// A running `litevfs serve`, killed on drop.
pub struct Server {
    child: Child,
    _stdout: BufReader<ChildStdout>,
    pub base: String,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a server on a fresh temporary data directory.
    pub fn start(extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut s = Server::start_in(&tmp.path().join("data"), extra);
        s._tmp = Some(tmp);
        s
    }

    /// Starts a server on `dir` (kept after the server stops); with a bucket backend, on the
    /// bucket that belongs to `dir`, so a restart on `dir` finds its data.
    pub fn start_in(dir: &Path, extra: &[&str]) -> Server {
        Server::start_with_bucket_of(dir, dir, extra)
    }

    /// Starts a server with data directory `dir` on the bucket that belongs to `bucket_dir`
    /// (several servers on one bucket each have their own data directory).
    pub fn start_with_bucket_of(dir: &Path, bucket_dir: &Path, extra: &[&str]) -> Server {
        Server::start_via(dir, bucket_dir, None, extra)
    }

    /// Like [`Server::start_with_bucket_of`], reaching S3 through `endpoint` (a proxy).
    pub fn start_via(
        dir: &Path,
        bucket_dir: &Path,
        endpoint: Option<&str>,
        extra: &[&str],
    ) -> Server {
        let (store, env) = store_args_via(bucket_dir, endpoint);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_litevfs"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(dir)
            .args(["--listen", "127.0.0.1:0"])
            .args(&store)
            .envs(env)
            .args(extra);
        Server::spawn(cmd, dir)
    }

    /// Runs `cmd` (a `litevfs serve` using `dir`) and waits for its ready line.
    pub fn spawn(mut cmd: Command, dir: &Path) -> Server {
        std::fs::create_dir_all(dir).expect("data dir");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.with_extension("log"))
            .expect("log file");
        if !cmd.get_envs().any(|(k, _)| k == "LITEVFS_TOKENS") {
            cmd.env_remove("LITEVFS_TOKENS");
        }
        let mut child = cmd
            .env_remove("LITEVFS_TOKENS_FILE")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn litevfs serve");
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read ready line");
        let base = line
            .trim()
            .strip_prefix("litevfs serve: listening on ")
            .unwrap_or_else(|| panic!("unexpected ready line {line:?}"))
            .to_string();
        Server {
            child,
            _stdout: stdout,
            base,
            dir: dir.to_path_buf(),
            _tmp: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit by itself.
    pub fn wait(mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait for litevfs serve")
    }

    /// kill -9, and wait for the process to be gone.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Anonymous client.
    pub fn api(&self) -> Api {
        Api::new(&self.base, None)
    }

    /// Client sending `token` in `Authorization`.
    pub fn api_with(&self, token: &str) -> Api {
        Api::new(&self.base, Some(token.to_string()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A reply, fully read.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ascii header").to_string())
    }

    /// Asserts success and returns self.
    pub fn ok(self) -> Resp {
        assert_eq!(
            self.status,
            200,
            "expected 200, got {}: {}",
            self.status,
            self.text()
        );
        self
    }

    /// Asserts an error reply with this status and code; returns the body.
    pub fn err(&self, status: u16, code: &str) -> ErrorBody {
        assert_eq!(self.status, status, "status for {code}: {}", self.text());
        let e: ErrorBody = self.json();
        assert_eq!(e.code, code, "{}", self.text());
        assert!(!e.error.is_empty());
        e
    }
}

/// A blocking HTTP client of one server.
#[derive(Clone)]
pub struct Api {
    base: String,
    token: Option<String>,
    http: Client,
}

impl Api {
    pub fn new(base: &str, token: Option<String>) -> Api {
        let http = Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        Api {
            base: base.to_string(),
            token,
            http,
        }
    }

    pub fn req(&self, method: Method, path: &str, q: &[(&str, &str)]) -> RequestBuilder {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.base))
            .query(q);
        if let Some(t) = &self.token {
            rb = rb.header("Authorization", t);
        }
        rb
    }

    pub fn send(&self, rb: RequestBuilder) -> Resp {
        self.try_send(rb).expect("HTTP request")
    }

    /// Like [`Api::send`], but a transport failure (server gone) is an `Err`.
    pub fn try_send(&self, rb: RequestBuilder) -> reqwest::Result<Resp> {
        let r = rb.send()?;
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = r.bytes()?.to_vec();
        Ok(Resp {
            status,
            headers,
            body,
        })
    }

    pub fn get(&self, path: &str, q: &[(&str, &str)]) -> Resp {
        self.send(self.req(Method::GET, path, q))
    }

    pub fn post(&self, path: &str, q: &[(&str, &str)], body: Vec<u8>) -> Resp {
        self.send(self.req(Method::POST, path, q).body(body))
    }

    pub fn delete(&self, path: &str, q: &[(&str, &str)]) -> Resp {
        self.send(self.req(Method::DELETE, path, q))
    }

    pub fn tx(&self, db: &str, ltx: Vec<u8>) -> Resp {
        self.post("/db/tx", &[("db", db)], ltx)
    }

    /// The value of a metric without labels (0 if absent).
    pub fn metric(&self, name: &str) -> u64 {
        let text = self.get("/metrics", &[]).ok().text();
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |v| v.parse().unwrap())
    }

    /// Requests to the bucket of operation `op` (every outcome).
    pub fn bucket_requests(&self, op: &str) -> u64 {
        let text = self.get("/metrics", &[]).ok().text();
        let prefix = format!("litevfs_bucket_requests_total{{op=\"{op}\",");
        text.lines()
            .filter(|l| l.starts_with(&prefix))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    /// GETs to the bucket (whole objects and byte ranges).
    pub fn bucket_gets(&self) -> u64 {
        self.bucket_requests("get") + self.bucket_requests("get_range")
    }

    pub fn positions(&self) -> BTreeMap<String, Pos> {
        self.get("/pos", &[]).ok().json()
    }

    pub fn pos(&self, db: &str) -> Option<Pos> {
        self.positions().get(db).copied()
    }

    pub fn snapshot(&self, db: &str) -> ltx::File {
        let r = self.get("/db/snapshot", &[("db", db)]).ok();
        ltx::decode(&r.body).expect("snapshot decodes and verifies")
    }
}

/// A fake SQLite file of `pages` 4 KiB pages, each different (enough for `POST /db/upload`).
pub fn fake_sqlite(pages: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(pages as usize * 4096);
    for p in 0..pages {
        out.extend((0..4096u32).map(|i| (i.wrapping_mul(31) ^ p.wrapping_mul(7919)) as u8));
    }
    out[..16].copy_from_slice(b"SQLite format 3\0");
    out[16..18].copy_from_slice(&4096u16.to_be_bytes());
    out[18] = 1;
    out[19] = 1;
    out
}

/// A page filled with one byte.
pub fn page(ps: u32, byte: u8) -> Vec<u8> {
    vec![byte; ps as usize]
}

/// The database as the client believes it is; builds the LTX of each change.
#[derive(Clone, Debug)]
pub struct Model {
    pub page_size: u32,
    pub commit: u32,
    pub pages: BTreeMap<u32, Vec<u8>>,
    pub pos: Pos,
}

impl Model {
    pub fn new(page_size: u32) -> Model {
        Model {
            page_size,
            commit: 0,
            pages: BTreeMap::new(),
            pos: Pos::ZERO,
        }
    }

    pub fn checksum(&self) -> u64 {
        let lock = lock_page(self.page_size);
        self.pages
            .iter()
            .filter(|(p, _)| **p <= self.commit && **p != lock)
            .fold(EMPTY_CHECKSUM, |c, (p, d)| {
                checksum_xor(c, page_checksum(*p, d))
            })
    }

    /// The LTX of one transaction writing `changes` and setting the size to `commit`, and the
    /// model after it (adopt it only if the server accepts the file).
    pub fn tx(&self, commit: u32, changes: &[(u32, Vec<u8>)]) -> (Vec<u8>, Model) {
        let mut next = self.clone();
        for (p, d) in changes {
            next.pages.insert(*p, d.clone());
        }
        next.commit = commit;
        next.pages.retain(|p, _| *p <= commit);
        let txid = self.pos.txid.0 + 1;
        let pre = if txid == 1 { 0 } else { self.pos.checksum.0 };
        let hdr = ltx::Header::new(self.page_size, commit, txid, txid, pre);
        let mut sorted: Vec<(u32, &[u8])> =
            changes.iter().map(|(p, d)| (*p, d.as_slice())).collect();
        sorted.sort_by_key(|(p, _)| *p);
        let post = next.checksum();
        next.pos = Pos::new(txid, post);
        (ltx::encode(&hdr, &sorted, post).expect("encode"), next)
    }

    /// Writes `changes` through `api` and adopts the result; panics unless accepted.
    pub fn commit(&mut self, api: &Api, db: &str, commit: u32, changes: &[(u32, Vec<u8>)]) {
        let (bytes, next) = self.tx(commit, changes);
        api.tx(db, bytes).ok();
        *self = next;
    }

    /// The image as a SQLite-file-like byte string (pages 1..=commit).
    pub fn image(&self) -> Vec<u8> {
        (1..=self.commit)
            .flat_map(|p| {
                self.pages
                    .get(&p)
                    .cloned()
                    .unwrap_or_else(|| page(self.page_size, 0))
            })
            .collect()
    }
}

/// The spec's test vectors.
pub fn vector(name: &str) -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/spec/vectors/");
    std::fs::read(format!("{path}{name}")).unwrap_or_else(|e| panic!("vector {name}: {e}"))
}

/// Whether two files have the same bytes, read in 1 MiB pieces (the files may be gigabytes).
pub fn same_files(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (mut fa, mut fb) = (
        std::fs::File::open(a).unwrap(),
        std::fs::File::open(b).unwrap(),
    );
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba).unwrap();
        if n == 0 {
            return fb.read(&mut bb).unwrap() == 0;
        }
        if fb.read_exact(&mut bb[..n]).is_err() || ba[..n] != bb[..n] {
            return false;
        }
    }
}

/// Free bytes on the file system of `dir`.
pub fn free_space(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path and a zeroed, properly sized struct for statvfs to fill.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
    st.f_bavail as u64 * st.f_frsize as u64
}
