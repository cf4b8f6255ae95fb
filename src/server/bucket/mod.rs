//! The object store behind `litevfs serve --store URL`: S3 and S3-compatible stores
//! (`s3://BUCKET/PREFIX`) and a local directory with the same layout (`file://DIR`), through
//! the `object_store` crate.
//!
//! Owns the connection to the bucket, the blocking calls the store makes into it (from
//! blocking threads, never from the async executor), the conditional writes the design relies
//! on (create-if-absent for commits, compare-and-swap on ETags for manifests and leases; on
//! `file://` the latter under an exclusive `flock`, since object_store's local store has no
//! conditional update), and the per-operation request counters shown by `/metrics`. It knows
//! object keys and bytes, not databases: [`layout`], [`format`], [`manifest`] and the store's
//! bucket logic ([`remote`]) give them meaning.

pub mod format;
pub mod layout;
pub mod lease;
pub mod manifest;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use object_store::path::Path as Key;
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    UpdateVersion, WriteMultipart,
};

/// Connection settings of `--store`.
#[derive(Clone, Debug, Default)]
pub struct BucketConfig {
    /// `s3://BUCKET/PREFIX` or `file://DIR`.
    pub url: String,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub region: Option<String>,
    /// Endpoint of an S3-compatible service (MinIO, R2, Tigris, moto); `http://` allowed.
    pub endpoint: Option<String>,
    /// Path-style addressing (`ENDPOINT/BUCKET/KEY`) instead of virtual-hosted style.
    pub path_style: bool,
}

/// Timeout of one request to the bucket (a page range, a part of an upload).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Transient failures of idempotent requests are retried for at most this long.
const RETRY_TIMEOUT: Duration = Duration::from_secs(8);
/// How long a settled conditional write keeps trying.
const SETTLE_WRITES: Duration = Duration::from_secs(8);
/// Part size of multipart uploads (S3's minimum is 5 MiB).
pub const PART_SIZE: usize = 8 << 20;
/// Parts of one upload in flight at once.
const PARTS_IN_FLIGHT: usize = 2;

/// Why a bucket operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    /// The bucket could not be reached, or refused the request.
    #[error("object storage {url}: {op} {key}: {source}")]
    Op {
        url: String,
        op: &'static str,
        key: String,
        source: Box<object_store::Error>,
    },
    #[error("invalid --store {0:?}: {1}")]
    Config(String, String),
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

pub type BucketResult<T> = Result<T, BucketError>;

/// An object read whole, with its ETag.
#[derive(Clone, Debug)]
pub struct Got {
    pub bytes: Bytes,
    pub etag: Option<String>,
}

/// The outcome of a conditional write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cas {
    /// Written; the new ETag.
    Done(Option<String>),
    /// The condition failed: the object exists (create) or changed (update).
    Lost,
}

/// Request counters by operation and outcome, and bytes moved.
#[derive(Default)]
pub struct BucketMetrics {
    requests: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

impl BucketMetrics {
    fn count(&self, op: &'static str, result: &'static str) {
        tracing::trace!(op, result, "object store request");
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((op, result))
            .or_default() += 1;
    }

    /// Requests of `op` (every outcome).
    pub fn requests(&self, op: &str) -> u64 {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|((o, _), _)| *o == op)
            .map(|(_, n)| n)
            .sum()
    }

    /// The Prometheus text of these metrics.
    pub fn render(&self, out: &mut String) {
        out.push_str(
            "# HELP litevfs_bucket_requests_total Requests to the object store by operation \
             and outcome.\n# TYPE litevfs_bucket_requests_total counter\n",
        );
        for ((op, result), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "litevfs_bucket_requests_total{{op=\"{op}\",result=\"{result}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP litevfs_bucket_bytes_total Bytes read from and written to the object store.\n\
             # TYPE litevfs_bucket_bytes_total counter\n\
             litevfs_bucket_bytes_total{{direction=\"read\"}} {}\n\
             litevfs_bucket_bytes_total{{direction=\"write\"}} {}",
            self.bytes_read.load(Ordering::Relaxed),
            self.bytes_written.load(Ordering::Relaxed)
        );
    }
}

fn outcome(e: &object_store::Error) -> &'static str {
    match e {
        object_store::Error::NotFound { .. } => "not_found",
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => {
            "conflict"
        }
        object_store::Error::NotModified { .. } => "not_modified",
        _ => "error",
    }
}

/// The bucket: an object store, the key prefix of this layout, and the runtime its calls run on.
pub struct Bucket {
    inner: Arc<dyn ObjectStore>,
    /// The same store without retries, for conditional writes: their callers retry and settle
    /// ambiguous outcomes themselves, which needs every attempt visible.
    once: Arc<dyn ObjectStore>,
    /// `PREFIX/v1` (no leading or trailing `/`), or `v1`.
    root: String,
    url: String,
    rt: tokio::runtime::Handle,
    /// `file://`: the lock file that serialises conditional updates between processes.
    cas_lock: Option<PathBuf>,
    pub metrics: BucketMetrics,
}

/// Installs ring as the process's TLS crypto provider (reqwest 0.13 is built without one).
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl Bucket {
    /// Connects to the bucket named by `cfg.url`. Makes no request: the first operation does.
    pub fn open(cfg: &BucketConfig, rt: tokio::runtime::Handle) -> BucketResult<Bucket> {
        let bad = |why: &str| BucketError::Config(cfg.url.clone(), why.to_string());
        type Stores = (Arc<dyn ObjectStore>, Arc<dyn ObjectStore>);
        let ((inner, once), prefix, cas_lock): (Stores, String, Option<PathBuf>) =
            if let Some(rest) = cfg.url.strip_prefix("s3://") {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(bad("no bucket name (use s3://BUCKET/PREFIX)"));
                }
                let stores: Stores = (
                    Arc::new(s3(cfg, bucket, true)?),
                    Arc::new(s3(cfg, bucket, false)?),
                );
                (stores, prefix.to_string(), None)
            } else if let Some(dir) = cfg.url.strip_prefix("file://") {
                if dir.is_empty() {
                    return Err(bad("no directory (use file:///absolute/dir or file://dir)"));
                }
                std::fs::create_dir_all(dir)?;
                let dir = std::fs::canonicalize(dir)?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| bad(&e.to_string()))?
                    .with_fsync(true)
                    .with_automatic_cleanup(true);
                let fs: Arc<dyn ObjectStore> = Arc::new(fs);
                (
                    (fs.clone(), fs),
                    String::new(),
                    Some(dir.join(".litevfs-cas.lock")),
                )
            } else {
                return Err(bad("use s3://BUCKET/PREFIX or file://DIR"));
            };
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|s| s == "." || s == "..") {
            return Err(bad("the prefix may not contain . or .. segments"));
        }
        // Keys are at most 1,024 bytes on S3; a database's longest key takes about 400.
        if prefix.len() > 512 {
            return Err(bad("the prefix is longer than 512 bytes"));
        }
        let root = if prefix.is_empty() {
            "v1".to_string()
        } else {
            format!("{prefix}/v1")
        };
        Ok(Bucket {
            inner,
            once,
            root,
            url: cfg.url.clone(),
            rt,
            cas_lock,
            metrics: BucketMetrics::default(),
        })
    }

    /// The `--store` URL, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn key(&self, rel: &str) -> Key {
        Key::from(format!("{}/{rel}", self.root))
    }

    fn err(&self, op: &'static str, rel: &str, source: object_store::Error) -> BucketError {
        BucketError::Op {
            url: self.url.clone(),
            op,
            key: rel.to_string(),
            source: Box::new(source),
        }
    }

    fn run<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn read_bytes(&self, n: usize) {
        self.metrics
            .bytes_read
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    fn wrote_bytes(&self, n: u64) {
        self.metrics.bytes_written.fetch_add(n, Ordering::Relaxed);
    }

    /// Reads a whole (small) object; `None` if it does not exist.
    pub fn get(&self, rel: &str) -> BucketResult<Option<Got>> {
        self.get_opts(rel, GetOptions::default())
            .map(|r| r.map(|(g, _)| g))
    }

    /// Reads a whole (small) object unless its ETag is still `etag`: `Ok(None)` when it does not
    /// exist, `Ok(Some(None))` when unchanged.
    pub fn get_if_changed(
        &self,
        rel: &str,
        etag: Option<&str>,
    ) -> BucketResult<Option<Option<Got>>> {
        tracing::debug!(key = rel, etag, "GET (if changed)");
        let opts = GetOptions {
            if_none_match: etag.map(str::to_string),
            ..Default::default()
        };
        let key = self.key(rel);
        let r = self.run(async {
            let got = self.inner.get_opts(&key, opts).await?;
            let etag = got.meta.e_tag.clone();
            Ok::<_, object_store::Error>((got.bytes().await?, etag))
        });
        match r {
            Ok((bytes, etag)) => {
                self.metrics.count("get", "ok");
                self.read_bytes(bytes.len());
                Ok(Some(Some(Got { bytes, etag })))
            }
            Err(object_store::Error::NotModified { .. }) => {
                self.metrics.count("get", "not_modified");
                Ok(Some(None))
            }
            Err(object_store::Error::NotFound { .. }) => {
                self.metrics.count("get", "not_found");
                Ok(None)
            }
            Err(e) => {
                self.metrics.count("get", outcome(&e));
                Err(self.err("GET", rel, e))
            }
        }
    }

    /// Reads `range` of an object (less at its end); `None` if the object does not exist. Also
    /// returns the object's total size.
    pub fn get_range(&self, rel: &str, range: Range<u64>) -> BucketResult<Option<(Bytes, u64)>> {
        let opts = GetOptions {
            range: Some(GetRange::Bounded(range)),
            ..Default::default()
        };
        self.get_opts(rel, opts)
            .map(|r| r.map(|(g, size)| (g.bytes, size)))
    }

    fn get_opts(&self, rel: &str, opts: GetOptions) -> BucketResult<Option<(Got, u64)>> {
        tracing::debug!(key = rel, range = ?opts.range, "GET");
        let op = if opts.range.is_some() {
            "get_range"
        } else {
            "get"
        };
        let key = self.key(rel);
        let r = self.run(async {
            let got = self.inner.get_opts(&key, opts).await?;
            let (etag, size) = (got.meta.e_tag.clone(), got.meta.size);
            Ok::<_, object_store::Error>((got.bytes().await?, etag, size))
        });
        match r {
            Ok((bytes, etag, size)) => {
                self.metrics.count(op, "ok");
                self.read_bytes(bytes.len());
                Ok(Some((Got { bytes, etag }, size)))
            }
            Err(object_store::Error::NotFound { .. }) => {
                self.metrics.count(op, "not_found");
                Ok(None)
            }
            Err(e) => {
                self.metrics.count(op, outcome(&e));
                Err(self.err("GET", rel, e))
            }
        }
    }

    /// Writes a small object unconditionally.
    pub fn put(&self, rel: &str, bytes: Vec<u8>) -> BucketResult<()> {
        let n = bytes.len() as u64;
        let key = self.key(rel);
        match self.run(self.inner.put(&key, PutPayload::from(bytes))) {
            Ok(_) => {
                self.metrics.count("put", "ok");
                self.wrote_bytes(n);
                Ok(())
            }
            Err(e) => {
                self.metrics.count("put", outcome(&e));
                Err(self.err("PUT", rel, e))
            }
        }
    }

    /// Creates an object only if no object has that key: the commit point of a transaction.
    pub fn put_create(&self, rel: &str, bytes: Vec<u8>) -> BucketResult<Cas> {
        tracing::debug!(key = rel, bytes = bytes.len(), "PUT (create)");
        let n = bytes.len() as u64;
        let key = self.key(rel);
        let opts = PutOptions::from(PutMode::Create);
        match self.run(self.once.put_opts(&key, PutPayload::from(bytes), opts)) {
            Ok(r) => {
                self.metrics.count("put_create", "ok");
                self.wrote_bytes(n);
                Ok(Cas::Done(r.e_tag))
            }
            Err(object_store::Error::AlreadyExists { .. }) => {
                self.metrics.count("put_create", "conflict");
                Ok(Cas::Lost)
            }
            Err(e) => {
                self.metrics.count("put_create", outcome(&e));
                Err(self.err("PUT (create)", rel, e))
            }
        }
    }

    /// Replaces an object only if its ETag is still `etag` (compare-and-swap).
    pub fn put_update(&self, rel: &str, bytes: Vec<u8>, etag: &str) -> BucketResult<Cas> {
        tracing::debug!(key = rel, etag, "PUT (update)");
        let n = bytes.len() as u64;
        let r = match &self.cas_lock {
            Some(lock) => self.put_update_locked(lock, rel, bytes, etag),
            None => {
                let key = self.key(rel);
                let opts = PutOptions::from(PutMode::Update(UpdateVersion {
                    e_tag: Some(etag.to_string()),
                    version: None,
                }));
                self.run(self.once.put_opts(&key, PutPayload::from(bytes), opts))
                    .map(|r| r.e_tag)
            }
        };
        match r {
            Ok(etag) => {
                self.metrics.count("put_update", "ok");
                self.wrote_bytes(n);
                Ok(Cas::Done(etag))
            }
            Err(
                object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
            ) => {
                self.metrics.count("put_update", "conflict");
                Ok(Cas::Lost)
            }
            Err(e) => {
                self.metrics.count("put_update", outcome(&e));
                Err(self.err("PUT (update)", rel, e))
            }
        }
    }

    /// A conditional write (create if `etag` is `None`, else compare-and-swap) whose outcome is
    /// settled: when the condition fails or the request fails, the object is read back, and if
    /// it holds exactly `bytes` the write happened (a reply was lost, or a retry found its own
    /// earlier attempt). Failed requests are retried for a few seconds. Use for objects whose
    /// bytes are unique to the writer (manifests, leases).
    pub fn put_settled(&self, rel: &str, bytes: Vec<u8>, etag: Option<&str>) -> BucketResult<Cas> {
        let deadline = std::time::Instant::now() + SETTLE_WRITES;
        let mut backoff = Duration::from_millis(50);
        loop {
            let attempt = match etag {
                None => self.put_create(rel, bytes.clone()),
                Some(e) => self.put_update(rel, bytes.clone(), e),
            };
            let failed = match attempt {
                Ok(Cas::Done(e)) => return Ok(Cas::Done(e)),
                Ok(Cas::Lost) => None,
                Err(e) => Some(e),
            };
            match self.get(rel) {
                Ok(Some(got)) if got.bytes[..] == bytes[..] => return Ok(Cas::Done(got.etag)),
                Ok(_) if failed.is_none() => return Ok(Cas::Lost),
                _ => {}
            }
            if std::time::Instant::now() + backoff > deadline {
                return Err(failed.unwrap_or_else(|| {
                    BucketError::Io(io::Error::other(format!(
                        "could not read back {rel} after a conditional write"
                    )))
                }));
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// `file://`: compare-and-swap under an exclusive lock shared by every process on the
    /// directory (the ETag of a local file changes with every replacement).
    fn put_update_locked(
        &self,
        lock: &Path,
        rel: &str,
        bytes: Vec<u8>,
        etag: &str,
    ) -> object_store::Result<Option<String>> {
        let generic = |e: io::Error| object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(e),
        };
        let _guard = FileLock::exclusive(lock).map_err(generic)?;
        let key = self.key(rel);
        let meta = self.run(self.inner.head(&key))?;
        if meta.e_tag.as_deref() != Some(etag) {
            return Err(object_store::Error::Precondition {
                path: key.to_string(),
                source: "ETag changed".into(),
            });
        }
        self.run(self.inner.put(&key, PutPayload::from(bytes)))
            .map(|r| r.e_tag)
    }

    /// Uploads `len` bytes from `r` as one object (multipart past [`PART_SIZE`]), with at most
    /// a few parts in memory whatever the size.
    pub fn upload(&self, rel: &str, mut r: impl Read, len: u64) -> BucketResult<()> {
        if len <= PART_SIZE as u64 {
            let mut buf = Vec::with_capacity(len as usize);
            r.read_to_end(&mut buf)?;
            return self.put(rel, buf);
        }
        let key = self.key(rel);
        let up = match self.run(self.inner.put_multipart(&key)) {
            Ok(u) => u,
            Err(e) => {
                self.metrics.count("multipart", outcome(&e));
                return Err(self.err("PUT (multipart)", rel, e));
            }
        };
        // Parts are uploaded by tasks spawned on the runtime.
        let _rt = self.rt.enter();
        let mut w = WriteMultipart::new_with_chunk_size(up, PART_SIZE);
        let mut buf = vec![0u8; PART_SIZE];
        let mut sent = 0u64;
        let result: BucketResult<()> = (|| loop {
            let n = read_full(&mut r, &mut buf)?;
            if n == 0 {
                return Ok(());
            }
            self.run(w.wait_for_capacity(PARTS_IN_FLIGHT))
                .map_err(|e| self.err("PUT (part)", rel, e))?;
            w.write(&buf[..n]);
            sent += n as u64;
        })();
        if let Err(e) = result {
            self.metrics.count("multipart", "error");
            let _ = self.run(w.abort());
            return Err(e);
        }
        if sent != len {
            self.metrics.count("multipart", "error");
            let _ = self.run(w.abort());
            return Err(BucketError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("upload of {rel}: {sent} of {len} bytes"),
            )));
        }
        match self.run(w.finish()) {
            Ok(_) => {
                self.metrics.count("multipart", "ok");
                self.wrote_bytes(len);
                Ok(())
            }
            Err(e) => {
                self.metrics.count("multipart", outcome(&e));
                Err(self.err("PUT (multipart)", rel, e))
            }
        }
    }

    /// Deletes an object (absent is fine).
    pub fn delete(&self, rel: &str) -> BucketResult<()> {
        tracing::debug!(key = rel, "DELETE");
        let key = self.key(rel);
        match self.run(self.inner.delete(&key)) {
            Ok(()) => {
                self.metrics.count("delete", "ok");
                Ok(())
            }
            Err(object_store::Error::NotFound { .. }) => {
                self.metrics.count("delete", "not_found");
                Ok(())
            }
            Err(e) => {
                self.metrics.count("delete", outcome(&e));
                Err(self.err("DELETE", rel, e))
            }
        }
    }

    /// The names directly under `rel/` (like directory entries): objects and common prefixes.
    /// A LIST: never on the hot path.
    pub fn list_names(&self, rel: &str) -> BucketResult<Vec<String>> {
        tracing::debug!(prefix = rel, "LIST");
        let key = self.key(rel);
        match self.run(self.inner.list_with_delimiter(Some(&key))) {
            Ok(r) => {
                self.metrics.count("list", "ok");
                let name = |p: &Key| p.filename().map(str::to_string);
                let mut out: Vec<String> = r
                    .common_prefixes
                    .iter()
                    .filter_map(name)
                    .chain(r.objects.iter().filter_map(|m| name(&m.location)))
                    .collect();
                out.sort();
                out.dedup();
                Ok(out)
            }
            Err(e) => {
                self.metrics.count("list", outcome(&e));
                Err(self.err("LIST", rel, e))
            }
        }
    }

    /// Every object under `rel/`, recursively: (key relative to the root, size).
    pub fn list_all(&self, rel: &str) -> BucketResult<Vec<(String, u64)>> {
        Ok(self
            .list_all_timed(rel)?
            .into_iter()
            .map(|(k, size, _)| (k, size))
            .collect())
    }

    /// Every object under `rel/`, recursively: (key relative to the root, size, last modified
    /// in ms since the epoch).
    pub fn list_all_timed(&self, rel: &str) -> BucketResult<Vec<(String, u64, u64)>> {
        use futures_util::StreamExt;
        let key = self.key(rel);
        let strip = format!("{}/", self.root);
        let r: Result<Vec<_>, _> = self.run(async {
            let mut s = self.inner.list(Some(&key));
            let mut out = Vec::new();
            while let Some(m) = s.next().await {
                let m = m?;
                let k = m.location.to_string();
                let at = m.last_modified.timestamp_millis().max(0) as u64;
                out.push((k.strip_prefix(&strip).unwrap_or(&k).to_string(), m.size, at));
            }
            Ok(out)
        });
        match r {
            Ok(v) => {
                self.metrics.count("list", "ok");
                Ok(v)
            }
            Err(e) => {
                self.metrics.count("list", outcome(&e));
                Err(self.err("LIST", rel, e))
            }
        }
    }
}

/// Reads until `buf` is full or the reader ends.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Timeout of one conditional write (without retries: bounded, so a commit's outcome is
/// settled within a known time; see `--gc-grace`).
pub const CONDITIONAL_TIMEOUT: Duration = Duration::from_secs(10);

fn s3(
    cfg: &BucketConfig,
    bucket: &str,
    retries: bool,
) -> BucketResult<object_store::aws::AmazonS3> {
    use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
    use object_store::{BackoffConfig, ClientOptions, RetryConfig};
    install_crypto_provider();
    let http = cfg
        .endpoint
        .as_deref()
        .is_some_and(|e| e.starts_with("http://"));
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_conditional_put(S3ConditionalPut::ETagMatch)
        .with_virtual_hosted_style_request(!cfg.path_style)
        .with_client_options(
            ClientOptions::new()
                .with_timeout(if retries {
                    REQUEST_TIMEOUT
                } else {
                    CONDITIONAL_TIMEOUT
                })
                .with_connect_timeout(CONNECT_TIMEOUT)
                .with_allow_http(http),
        )
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(50),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: if retries { 4 } else { 0 },
            retry_timeout: RETRY_TIMEOUT,
        });
    if let Some(r) = &cfg.region {
        b = b.with_region(r);
    }
    if let Some(e) = &cfg.endpoint {
        b = b.with_endpoint(e);
    }
    if let Some(k) = &cfg.access_key_id {
        b = b.with_access_key_id(k);
    }
    if let Some(s) = &cfg.secret_access_key {
        b = b.with_secret_access_key(s);
    }
    if let Some(t) = &cfg.session_token {
        b = b.with_token(t);
    }
    b.build()
        .map_err(|e| BucketError::Config(cfg.url.clone(), e.to_string()))
}

/// An exclusive `flock` on a file, released on drop.
struct FileLock(std::fs::File);

impl FileLock {
    fn exclusive(path: &Path) -> io::Result<FileLock> {
        use std::os::fd::AsRawFd;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        // SAFETY: `f` is open for the whole call, so its descriptor is valid; flock has no other
        // preconditions.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(FileLock(f))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is still open (closed after this, when the File drops).
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// Bytes written once and read back once: in memory up to `limit`, then in an anonymous
/// temporary file in `dir`.
pub struct Spill {
    mem: Vec<u8>,
    file: Option<std::fs::File>,
    len: u64,
    limit: usize,
    dir: PathBuf,
}

impl Spill {
    pub fn new(dir: &Path, limit: usize) -> Spill {
        Spill {
            mem: Vec::new(),
            file: None,
            len: 0,
            limit,
            dir: dir.to_path_buf(),
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes, if they stayed in memory.
    pub fn as_slice(&self) -> Option<&[u8]> {
        self.file.is_none().then_some(self.mem.as_slice())
    }

    /// A reader over the bytes from the start, leaving the spill readable again.
    pub fn reader(&self) -> io::Result<Box<dyn Read + Send>> {
        match &self.file {
            None => Ok(Box::new(io::Cursor::new(self.mem.clone()))),
            Some(f) => Ok(Box::new(AtReader {
                f: f.try_clone()?,
                pos: 0,
                len: self.len,
            })),
        }
    }

    /// A reader over the bytes from the start.
    pub fn into_reader(self) -> io::Result<Box<dyn Read + Send>> {
        match self.file {
            None => Ok(Box::new(io::Cursor::new(self.mem))),
            Some(mut f) => {
                f.seek(SeekFrom::Start(0))?;
                Ok(Box::new(io::BufReader::new(f)))
            }
        }
    }
}

/// Reads a file from its start with positioned reads (its own offset, not the file's).
struct AtReader {
    f: std::fs::File,
    pos: u64,
    len: u64,
}

impl Read for AtReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let want = buf.len().min((self.len - self.pos) as usize);
        if want == 0 {
            return Ok(0);
        }
        let n = self.f.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for Spill {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.file.is_none() && self.mem.len() + buf.len() > self.limit {
            let mut f = tempfile::tempfile_in(&self.dir)?;
            f.write_all(&self.mem)?;
            self.mem = Vec::new();
            self.file = Some(f);
        }
        match &mut self.file {
            Some(f) => f.write_all(buf)?,
            None => self.mem.extend_from_slice(buf),
        }
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(dir: &Path, rt: &tokio::runtime::Runtime) -> Bucket {
        let cfg = BucketConfig {
            url: format!("file://{}", dir.display()),
            ..Default::default()
        };
        Bucket::open(&cfg, rt.handle().clone()).unwrap()
    }

    #[test]
    fn conditional_writes_on_a_local_directory() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let b = local(dir.path(), &rt);
        let Cas::Done(Some(e1)) = b.put_create("a/x", b"one".to_vec()).unwrap() else {
            panic!("create");
        };
        assert_eq!(b.put_create("a/x", b"two".to_vec()).unwrap(), Cas::Lost);
        let Cas::Done(Some(e2)) = b.put_update("a/x", b"three".to_vec(), &e1).unwrap() else {
            panic!("update");
        };
        assert_eq!(
            b.put_update("a/x", b"four".to_vec(), &e1).unwrap(),
            Cas::Lost,
            "a stale ETag loses"
        );
        assert_eq!(&b.get("a/x").unwrap().unwrap().bytes[..], b"three");
        assert!(
            b.get_if_changed("a/x", Some(&e2))
                .unwrap()
                .unwrap()
                .is_none()
        );
        assert_eq!(b.put_update("a/none", vec![], &e2).unwrap(), Cas::Lost);
        let (part, size) = b.get_range("a/x", 1..3).unwrap().unwrap();
        assert_eq!((&part[..], size), (&b"hr"[..], 5));
        assert!(b.get("a/none").unwrap().is_none());
        assert_eq!(b.list_names("a").unwrap(), vec!["x".to_string()]);
        b.delete("a/x").unwrap();
        b.delete("a/x").unwrap();
        assert!(b.get("a/x").unwrap().is_none());
        assert_eq!(b.metrics.requests("put_create"), 2);
    }

    #[test]
    fn uploads_stream_in_parts() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let b = local(dir.path(), &rt);
        let len = PART_SIZE as u64 * 2 + 123;
        let data = (0..len).map(|i| (i % 251) as u8);
        let bytes: Vec<u8> = data.collect();
        b.upload("big", &bytes[..], len).unwrap();
        let (got, size) = b.get_range("big", len - 10..len).unwrap().unwrap();
        assert_eq!((&got[..], size), (&bytes[bytes.len() - 10..], len));
        let short = b.upload("short", &bytes[..100], len);
        assert!(short.is_err(), "a short reader fails the upload");
    }

    #[test]
    fn bad_urls_are_refused() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        for url in ["http://x", "s3://", "s3:///p", "file://", "s3://b/a/../c"] {
            let cfg = BucketConfig {
                url: url.into(),
                ..Default::default()
            };
            assert!(
                matches!(
                    Bucket::open(&cfg, rt.handle().clone()),
                    Err(BucketError::Config(..))
                ),
                "{url}"
            );
        }
    }

    #[test]
    fn spill_moves_to_a_file_past_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spill::new(dir.path(), 4);
        s.write_all(b"abc").unwrap();
        assert_eq!(s.as_slice(), Some(&b"abc"[..]));
        s.write_all(b"defg").unwrap();
        assert!(s.as_slice().is_none());
        let mut out = String::new();
        s.into_reader().unwrap().read_to_string(&mut out).unwrap();
        assert_eq!(out, "abcdefg");
    }
}
