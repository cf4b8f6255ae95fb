//! The page store: databases, their positions, page versions at positions, leases, retention.
//!
//! Owns all persistent state (in `DATA_DIR/store.db`, see [`schema`]) and the in-memory leases.
//! Invariants:
//! - every accepted transaction (an LTX file, an upload, a restore) is written on the single
//!   writer connection and durable before the caller replies: committed with
//!   `synchronous=FULL`, or, for a small LTX file, synced as a record of the commit log
//!   ([`commitlog`]) and committed after the reply, in a batch with the small ones around it
//!   ([`writer`]), before anything reads `store.db`. A crash leaves each database at its last
//!   acknowledged position; the reply waits for nothing else (checkpoints run on their own
//!   thread, [`checkpoint`]);
//! - bad input is detected inside that transaction and rolls it back, so it changes nothing;
//! - every position newer than the retention window can be read back page by page.
//!
//! All methods block (SQLite I/O): call them from `spawn_blocking`. The store knows nothing about
//! HTTP; [`StoreError`] is mapped to wire codes by the server.

mod apply;
pub mod backup;
mod checkpoint;
mod commitlog;
mod compact_bucket;
mod evict;
pub(super) mod image;
pub(crate) mod lease;
pub(crate) mod objects;
mod publish;
mod read;
pub mod remote;
pub mod repack;
mod retention;
mod schema;
mod verify;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Transaction};
use tokio::sync::watch;

use crate::ltx::LtxError;
use crate::wire::Pos;

pub use compact_bucket::BucketStats;
pub use image::{Format, RestoreTarget};
pub use lease::{DEFAULT_LEASE, LeaseEvent, Leases, MAX_LEASE, MIN_LEASE};
pub use objects::Incoming;
use objects::{LocalBytes, Objects};
pub use read::SnapshotPlan;
pub use retention::{CompactionStats, DbSize};
pub use verify::ltx_header;

/// A database's identity: its cluster (namespace) and name, both already validated.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DbKey {
    pub cluster: String,
    pub name: String,
}

/// Everything that can go wrong in the store; the server maps each variant to one wire code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("position mismatch")]
    PosMismatch(Pos),
    #[error("database {0:?} not found")]
    NoDb(String),
    #[error("{0}")]
    NoTxid(String),
    #[error("no transaction at or before timestamp {0}")]
    NoTimestamp(String),
    #[error("page {0} not found")]
    NoPage(u32),
    #[error("invalid LTX file: {0}")]
    BadFormat(LtxError),
    #[error("{0}")]
    BadHeader(String),
    #[error("post-apply checksum mismatch: file says {file:016x}, store computed {computed:016x}")]
    BadChecksum { file: u64, computed: u64 },
    #[error(
        "database grows from {old} to {new} pages but the file lacks {missing} of the new pages"
    )]
    MissingPages { old: u32, new: u32, missing: u32 },
    #[error("previous version of page {0} not found")]
    NoPrevPage(u32),
    #[error("database is leased by another client")]
    LeaseExists,
    #[error("lease not found or expired")]
    NoLease,
    #[error("lease mismatch: the database is leased under another id")]
    LeaseMismatch,
    #[error("{0}")]
    BadInput(String),
    #[error("store corrupt: {0}")]
    Corrupt(String),
    #[error("data directory {0} is in use by another litevfs serve")]
    Locked(String),
    #[error("{0}")]
    Mode(String),
    /// The object store could not be reached or refused a request; nothing was changed.
    #[error("{0}")]
    Unavailable(String),
    /// A commit whose outcome could not be learned before the deadline.
    #[error("{0}")]
    CommitUnknown(String),
    /// The local index no longer matches the bucket (an object it names is gone or changed):
    /// re-read the manifest and try again.
    #[error("stale index: {0}")]
    Stale(String),
    /// A restore to the current position: nothing to commit (never reaches a client).
    #[error("already at {0:016x}")]
    Unchanged(u64),
    #[error("store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

pub type StoreResult<T> = Result<T, StoreError>;

impl From<crate::server::bucket::BucketError> for StoreError {
    fn from(e: crate::server::bucket::BucketError) -> StoreError {
        match e {
            crate::server::bucket::BucketError::Io(io) => StoreError::Io(io),
            e => StoreError::Unavailable(format!(
                "the object store is unavailable, nothing was changed: {e}"
            )),
        }
    }
}

/// One row of `txns`: an accepted transaction and the position it ends at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnRow {
    pub min_txid: u64,
    pub max_txid: u64,
    pub page_size: u32,
    pub commit: u32,
    pub timestamp_ms: u64,
    pub pre_apply: u64,
    pub post_apply: u64,
    pub created_ms: u64,
}

impl TxnRow {
    pub fn pos(&self) -> Pos {
        Pos::new(self.max_txid, self.post_apply)
    }
}

/// Version of the bucket-mode cache in `store.db` (a change discards older caches). 3: 32 KiB
/// store pages (a cache is rebuilt rather than repacked).
const CACHE_FORMAT: u32 = 3;

/// Most read connections kept open for reuse.
const READER_POOL: usize = 8;

/// The store. Shared behind an `Arc`; all methods take `&self`.
pub struct Store {
    /// Commits deferred transactions ([`writer`]); first, so it stops before the rest drops.
    finisher: writer::Finisher,
    /// The writer connection, change notifications and the checkpoint thread.
    w: Arc<writer::Writer>,
    path: PathBuf,
    tmp_dir: PathBuf,
    readers: Mutex<Vec<Connection>>,
    /// Warm sets of recent positions (`GET /db/page?warm=`), bounded in bytes.
    warm_sets: Mutex<read::WarmSets>,
    leases: Leases,
    retention: Duration,
    /// Random, created with the store: the seed of cluster ids.
    store_id: String,
    /// Bucket mode (`--store`): the bucket and this server's view of it.
    remote: Option<Arc<remote::Remote>>,
    /// Local mode: files holding the page bytes of large uploads.
    objects: Objects,
    /// Local mode: makes small transactions durable ([`commitlog`]); locked under `writer`.
    log: Mutex<Option<commitlog::CommitLog>>,
    /// `DATA_DIR/LOCK`, flocked for the store's lifetime (released by the kernel on exit).
    _lock: std::fs::File,
}

impl Store {
    /// Opens the store in `data_dir`, creating it if needed. Cheap on any store size: it only
    /// applies the schema (idempotent) and empties `tmp/`.
    pub fn open(data_dir: &Path, retention: Duration) -> StoreResult<Store> {
        Store::open_with(data_dir, retention, None)
    }

    /// Opens a store whose data lives in a bucket; `data_dir` holds its local index and cache.
    pub fn open_bucket(
        data_dir: &Path,
        bucket: Arc<crate::server::bucket::Bucket>,
        cfg: remote::RemoteConfig,
    ) -> StoreResult<Store> {
        let retention = cfg.retention;
        let remote = remote::Remote::open(bucket, cfg)?;
        Store::open_with(data_dir, retention, Some(Arc::new(remote)))
    }

    fn open_with(
        data_dir: &Path,
        retention: Duration,
        remote: Option<Arc<remote::Remote>>,
    ) -> StoreResult<Store> {
        std::fs::create_dir_all(data_dir)?;
        let lock = lock_data_dir(data_dir)?;
        let tmp_dir = data_dir.join("tmp");
        if tmp_dir.exists() {
            std::fs::remove_dir_all(&tmp_dir)?;
        }
        std::fs::create_dir_all(&tmp_dir)?;
        let path = data_dir.join("store.db");
        // A copy `litevfs repack` left when it was stopped before its rename: never the store.
        for leftover in ["store.db.repack", "store.db.repack-journal"] {
            let f = data_dir.join(leftover);
            if f.exists() {
                tracing::info!("removing {}, left by an interrupted repack", f.display());
                std::fs::remove_file(f)?;
            }
        }
        let mode = match &remote {
            // The cache's format version, the bucket and its identity: a cache of anything
            // else is discarded.
            Some(r) => format!("bucket:{CACHE_FORMAT} {} {}", r.bucket.url(), r.store_id),
            None => "local".to_string(),
        };
        if schema::check_mode(&path, &mode, data_dir)? == schema::ModeCheck::Discard {
            for ext in ["", "-wal", "-shm"] {
                let f = data_dir.join(format!("store.db{ext}"));
                if f.exists() {
                    std::fs::remove_file(f)?;
                }
            }
        }
        let writer = schema::open_writer(&path, remote.is_some())?;
        let page_size: u32 = writer.pragma_query_value(None, "page_size", |r| r.get(0))?;
        if page_size < schema::STORE_PAGE_SIZE {
            tracing::warn!(
                "{} was created with {page_size}-byte pages and takes up to twice the space of \
                 its data: stop the server and run `litevfs repack --data-dir {}` to rewrite it \
                 (needs free disk for one copy)",
                path.display(),
                data_dir.display()
            );
        }
        schema::set_mode(&writer, &mode)?;
        let store_id = match &remote {
            Some(r) => r.store_id.clone(),
            None => store_id(&writer)?,
        };
        let objects = Objects::new(data_dir);
        let mut writer = writer;
        let log = match remote {
            Some(_) => None,
            None => {
                objects.open(&writer)?;
                let fetch = LocalBytes { objects: &objects };
                Some(commitlog::recover(data_dir, &mut writer, &fetch)?.0)
            }
        };
        let checkpointer = checkpoint::Checkpointer::start(&path)?;
        let frames = checkpointer.frames();
        // The frames in the log after each commit: when to checkpoint (see [`checkpoint`]).
        writer.wal_hook(Some(
            move |_: &mut rusqlite::hooks::Wal, pages: std::ffi::c_int| {
                frames.store(pages.max(0) as u64, std::sync::atomic::Ordering::Relaxed);
                Ok(())
            },
        ))?;
        let w = Arc::new(writer::Writer::new(writer, checkpointer));
        Ok(Store {
            finisher: writer::Finisher::start(w.clone())?,
            w,
            objects,
            log: Mutex::new(log),
            path,
            tmp_dir,
            readers: Mutex::new(Vec::new()),
            warm_sets: Mutex::default(),
            leases: Leases::default(),
            retention,
            store_id,
            remote,
            _lock: lock,
        })
    }

    /// The data directory.
    fn data_dir(&self) -> &Path {
        self.path
            .parent()
            .expect("store.db is in the data directory")
    }

    /// Directory for spooled request bodies (emptied at start).
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp_dir
    }

    /// A file to receive a whole-database upload into, which [`Store::upload_file`] keeps as
    /// it is; `None` in bucket mode (spool to [`Store::tmp_dir`] and call [`Store::upload`]).
    pub fn incoming(&self) -> Option<std::io::Result<Incoming>> {
        self.remote().is_none().then(|| self.objects.incoming())
    }

    fn local(&self) -> LocalBytes<'_> {
        LocalBytes {
            objects: &self.objects,
        }
    }

    /// A receiver that sees a new value after every change of any database.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.w.subscribe()
    }

    /// Acquires a new write lease on `key`.
    pub fn acquire_lease(&self, key: &DbKey, d: Duration) -> StoreResult<crate::wire::Lease> {
        match self.remote() {
            Some(r) => r.check_key(key).and_then(|_| r.leases.acquire(key, d)),
            None => self.leases.acquire(key, d),
        }
    }

    /// Extends the live lease `id` of `key`.
    pub fn refresh_lease(
        &self,
        key: &DbKey,
        id: &str,
        d: Duration,
    ) -> StoreResult<crate::wire::Lease> {
        match self.remote() {
            Some(r) => r.check_key(key).and_then(|_| r.leases.refresh(key, id, d)),
            None => self.leases.refresh(key, id, d),
        }
    }

    /// Releases the live lease `id` of `key`.
    pub fn release_lease(&self, key: &DbKey, id: &str) -> StoreResult<()> {
        match self.remote() {
            Some(r) => r.check_key(key).and_then(|_| r.leases.release(key, id)),
            None => self.leases.release(key, id),
        }
    }

    /// Request counters of the bucket (bucket mode).
    pub fn bucket_metrics(&self) -> Option<&crate::server::bucket::BucketMetrics> {
        self.remote().map(|r| &r.bucket.metrics)
    }

    /// Bucket mode: bytes of the data directory's cache, pages and databases evicted so far.
    pub fn cache_metrics(&self) -> Option<(u64, u64, u64)> {
        let r = self.remote()?;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        Some((
            self.cache_bytes(),
            load(&r.evicted_pages),
            load(&r.evicted_dbs),
        ))
    }

    /// Bucket mode: the databases the poller keeps current.
    pub fn active_databases(&self) -> Vec<DbKey> {
        self.remote().map_or_else(Vec::new, |r| r.active())
    }

    /// Bucket mode: counts `keys` as long-polled until the guard drops.
    pub fn watch(&self, keys: Vec<DbKey>) -> Option<remote::WatchGuard> {
        self.remote().map(|r| r.watch(keys))
    }

    /// Bucket mode: learns of commits made through other servers (the poller's step).
    pub fn poll(&self, key: &DbKey) -> StoreResult<()> {
        match self.remote() {
            Some(r) => self.sync_db(r, key, remote::Need::Poll),
            None => Ok(()),
        }
    }

    fn notify(&self) {
        self.w.notify();
    }

    /// Runs `f` in one IMMEDIATE transaction on the writer connection; commits if `f` succeeds,
    /// with a sync (which also makes every logged transaction before it durable in `store.db`).
    fn write<T>(&self, f: impl FnOnce(&Transaction) -> StoreResult<T>) -> StoreResult<T> {
        let mut conn = self.w.lock();
        // A logged commit ([`apply`]) left it at NORMAL; this write is not in the log.
        synchronous(&conn, true)?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        self.w.checkpointer.kick();
        Ok(out)
    }

    /// Runs `f` in one read transaction on a pooled read-only connection.
    fn read<T>(&self, f: impl FnOnce(&Transaction) -> StoreResult<T>) -> StoreResult<T> {
        // Registered before the snapshot begins: object space it may read stays until it ends.
        let _reading = self.objects.reading();
        // The snapshot holds every transaction acknowledged so far.
        self.w.settle();
        let pooled = self.readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => schema::open_reader(&self.path)?,
        };
        let out = {
            let tx = conn.transaction()?;
            let out = f(&tx);
            tx.finish()?;
            out
        };
        let mut pool = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < READER_POOL {
            pool.push(conn);
        }
        out
    }

    /// Positions of every database in `cluster` (zero for databases without data).
    pub fn positions(&self, cluster: &str) -> StoreResult<Vec<(String, Pos)>> {
        if let Some(r) = self.remote() {
            // A LIST: `/pos` is not on the hot path of readers or writers.
            let mut names = r
                .bucket
                .list_names(&crate::server::bucket::layout::cluster(cluster))?;
            names.extend(self.read(|tx| {
                let mut stmt = tx.prepare("SELECT name FROM dbs WHERE cluster = ?1")?;
                let rows = stmt.query_map([cluster], |r| r.get::<_, String>(0))?;
                Ok(rows.collect::<Result<Vec<_>, _>>()?)
            })?);
            names.sort();
            names.dedup();
            for name in names {
                if crate::wire::validate_db_name(&name).is_err() {
                    continue;
                }
                let key = DbKey {
                    cluster: cluster.to_string(),
                    name,
                };
                self.sync_db(r, &key, remote::Need::Recent)?;
            }
        }
        self.read(|tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT d.name, t.max_txid, t.post_apply FROM dbs d
                 LEFT JOIN txns t ON t.db_id = d.id
                   AND t.max_txid = (SELECT MAX(max_txid) FROM txns WHERE db_id = d.id)
                 WHERE d.cluster = ?1 ORDER BY d.name",
            )?;
            let rows = stmt.query_map([cluster], |r| {
                let txid: Option<i64> = r.get(1)?;
                let ck: Option<i64> = r.get(2)?;
                let pos = match (txid, ck) {
                    (Some(t), Some(c)) => Pos::new(t as u64, c as u64),
                    _ => Pos::ZERO,
                };
                Ok((r.get::<_, String>(0)?, pos))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// Deletes a database, its history and its lease.
    pub fn delete_db(&self, key: &DbKey) -> StoreResult<()> {
        if let Some(r) = self.remote() {
            return self.delete_bucketed(r, key);
        }
        let files = self.write(|tx| {
            let id = find_db(tx, key)?.ok_or_else(|| StoreError::NoDb(key.name.clone()))?;
            tx.execute("DELETE FROM pages WHERE db_id = ?1", [id])?;
            tx.execute("DELETE FROM txns WHERE db_id = ?1", [id])?;
            tx.execute("DELETE FROM dbs WHERE id = ?1", [id])?;
            self.objects.delete_db(tx, id)
        })?;
        self.objects.deleted(files);
        self.leases.remove(key);
        self.notify();
        Ok(())
    }

    /// Creates the database row (zero position) if it does not exist yet.
    pub fn ensure_db(&self, key: &DbKey) -> StoreResult<()> {
        if let Some(r) = self.remote() {
            r.check_key(key)?;
            let st = r.db(key);
            let _g = st.lock.lock();
            self.ensure_manifest(r, key, &st)?;
            self.notify();
            return Ok(());
        }
        let created = self.write(|tx| match find_db(tx, key)? {
            Some(_) => Ok(false),
            None => Ok(insert_db(tx, key).map(|_| true)?),
        })?;
        if created {
            self.notify();
        }
        Ok(())
    }

    /// A stable cluster id (`LFSC` + 16 uppercase hex digits). Derived from the store's own
    /// random id and the cluster name, so reading it writes nothing (any caller, read-only
    /// tokens included, may ask about any cluster); ids stored by earlier versions still win.
    pub fn cluster_id(&self, cluster: &str) -> StoreResult<String> {
        let key = format!("cluster_id:{cluster}");
        let stored: Option<String> = self.read(|tx| {
            Ok(tx
                .query_row("SELECT value FROM meta WHERE key = ?1", [&key], |r| {
                    r.get(0)
                })
                .optional()?)
        })?;
        Ok(stored.unwrap_or_else(|| {
            let seed = format!("{}/{cluster}", self.store_id);
            format!("LFSC{:016X}", crate::ltx::CRC64.checksum(seed.as_bytes()))
        }))
    }
}

/// The store's random id (`meta` key `store_id`), created on first open.
fn store_id(conn: &Connection) -> rusqlite::Result<String> {
    let existing: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'store_id'", [], |r| {
            r.get(0)
        })
        .optional()?;
    if let Some(id) = existing {
        return Ok(id);
    }
    let id = format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    );
    conn.execute(
        "INSERT INTO meta(key, value) VALUES ('store_id', ?1)",
        [&id],
    )?;
    Ok(id)
}

/// Takes an exclusive, non-blocking `flock` on `DATA_DIR/LOCK`, so two servers never share a
/// data directory (their in-memory leases would disagree).
/// Sets the writer's `synchronous`: FULL (a commit syncs) or NORMAL (a commit whose record the
/// commit log made durable). Only between transactions: SQLite refuses it inside one.
fn synchronous(conn: &Connection, full: bool) -> rusqlite::Result<()> {
    let sql = if full {
        "PRAGMA synchronous = FULL"
    } else {
        "PRAGMA synchronous = NORMAL"
    };
    conn.prepare_cached(sql)?.raw_execute()?;
    Ok(())
}

fn lock_data_dir(data_dir: &Path) -> StoreResult<std::fs::File> {
    use std::os::fd::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data_dir.join("LOCK"))?;
    // SAFETY: `f` is an open file for the whole call, so its descriptor is valid; flock has no
    // memory-safety preconditions beyond that.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(StoreError::Locked(data_dir.display().to_string()));
    }
    Ok(f)
}

pub(crate) fn now_ms() -> u64 {
    crate::ltx::now_ms()
}

fn find_db(tx: &Connection, key: &DbKey) -> rusqlite::Result<Option<i64>> {
    tx.prepare_cached("SELECT id FROM dbs WHERE cluster = ?1 AND name = ?2")?
        .query_row([&key.cluster, &key.name], |r| r.get(0))
        .optional()
}

fn insert_db(tx: &Connection, key: &DbKey) -> rusqlite::Result<i64> {
    tx.execute(
        "INSERT INTO dbs(cluster, name, created_ms) VALUES (?1, ?2, ?3)",
        rusqlite::params![key.cluster, key.name, now_ms() as i64],
    )?;
    Ok(tx.last_insert_rowid())
}

const TXN_COLS: &str =
    "min_txid, max_txid, page_size, commit_size, timestamp_ms, pre_apply, post_apply, created_ms";

fn txn_from_row(r: &rusqlite::Row) -> rusqlite::Result<TxnRow> {
    Ok(TxnRow {
        min_txid: r.get::<_, i64>(0)? as u64,
        max_txid: r.get::<_, i64>(1)? as u64,
        page_size: r.get(2)?,
        commit: r.get(3)?,
        timestamp_ms: r.get::<_, i64>(4)? as u64,
        pre_apply: r.get::<_, i64>(5)? as u64,
        post_apply: r.get::<_, i64>(6)? as u64,
        created_ms: r.get::<_, i64>(7)? as u64,
    })
}

/// The newest transaction of a database (its current position), if any.
fn head(tx: &Connection, db_id: i64) -> rusqlite::Result<Option<TxnRow>> {
    let sql =
        format!("SELECT {TXN_COLS} FROM txns WHERE db_id = ?1 ORDER BY max_txid DESC LIMIT 1");
    tx.prepare_cached(&sql)?
        .query_row([db_id], txn_from_row)
        .optional()
}

/// The transaction ending exactly at `txid`, if it is still retained.
fn txn_at(tx: &Connection, db_id: i64, txid: u64) -> rusqlite::Result<Option<TxnRow>> {
    let sql = format!("SELECT {TXN_COLS} FROM txns WHERE db_id = ?1 AND max_txid = ?2");
    tx.prepare_cached(&sql)?
        .query_row([db_id, txid as i64], txn_from_row)
        .optional()
}

fn insert_txn(tx: &Connection, db_id: i64, t: &TxnRow) -> rusqlite::Result<()> {
    let sql =
        format!("INSERT INTO txns(db_id, {TXN_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)");
    tx.prepare_cached(&sql)?.execute(rusqlite::params![
        db_id,
        t.min_txid as i64,
        t.max_txid as i64,
        t.page_size,
        t.commit,
        t.timestamp_ms as i64,
        t.pre_apply as i64,
        t.post_apply as i64,
        t.created_ms as i64,
    ])?;
    Ok(())
}

/// Where the bytes of a page version are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bytes {
    /// In `store.db` (local mode; cached in bucket mode).
    Here(Vec<u8>),
    /// Only in an object: of the bucket, or (local mode) a file of `objects/`.
    Remote(Loc),
}

/// The place of a page version in an object (a row of `objects`): its slot.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Loc {
    pub obj: i64,
    pub slot: u64,
}

/// A stored page version: the version of `pgno` written by the transaction ending at `txid`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Version {
    pub pgno: u32,
    pub txid: u64,
    pub ck: u64,
    pub bytes: Bytes,
    /// The bytes came from the page cache (bucket mode).
    pub cached: bool,
}

/// Reads the bytes of page versions that are not in `store.db`.
pub(crate) trait Fetch {
    /// The bytes of `v`, verified against its checksum.
    fn bytes(&self, tx: &Connection, db_id: i64, v: &Version) -> StoreResult<Vec<u8>>;

    /// The bytes of many versions, in order (implementations may read them together).
    fn batch(&self, tx: &Connection, db_id: i64, vs: &[Version]) -> StoreResult<Vec<Vec<u8>>> {
        vs.iter().map(|v| self.bytes(tx, db_id, v)).collect()
    }

    /// Page bytes worth reading ahead in one batch of a sequential read.
    fn batch_bytes(&self) -> usize {
        256 << 10
    }

    /// Whether versions may live in the bucket (bucket mode): lookups then consult the page
    /// cache and the base image; a local store needs neither.
    fn bucket(&self) -> bool {
        false
    }
}

/// The newest version of `pgno` at or before `txid`: a row of `pages`, else (bucket mode) the
/// base image. Bytes come from the row, else (bucket mode) the page cache, else they are
/// remote.
fn page_version(
    tx: &Connection,
    db_id: i64,
    pgno: u32,
    txid: u64,
    bucket: bool,
) -> rusqlite::Result<Option<Version>> {
    if !bucket {
        return tx
            .prepare_cached(
                "SELECT txid, chksum, data, obj, slot FROM pages
                 WHERE db_id = ?1 AND pgno = ?2 AND txid <= ?3 ORDER BY txid DESC LIMIT 1",
            )?
            .query_row(rusqlite::params![db_id, pgno, txid as i64], |r| {
                let bytes = match r.get::<_, Option<Vec<u8>>>(2)? {
                    Some(d) => Bytes::Here(d),
                    None => Bytes::Remote(Loc {
                        obj: r.get(3)?,
                        slot: r.get::<_, i64>(4)? as u64,
                    }),
                };
                Ok(Version {
                    pgno,
                    txid: r.get::<_, i64>(0)? as u64,
                    ck: r.get::<_, i64>(1)? as u64,
                    bytes,
                    cached: false,
                })
            })
            .optional();
    }
    let row = tx
        .prepare_cached(
            "SELECT p.txid, p.chksum, p.data, p.obj, p.slot, c.data FROM pages p
               LEFT JOIN page_cache c ON c.db_id = p.db_id AND c.pgno = p.pgno AND c.txid = p.txid
             WHERE p.db_id = ?1 AND p.pgno = ?2 AND p.txid <= ?3
             ORDER BY p.txid DESC LIMIT 1",
        )?
        .query_row(rusqlite::params![db_id, pgno, txid as i64], |r| {
            let data: Option<Vec<u8>> = r.get(2)?;
            let obj: Option<i64> = r.get(3)?;
            let slot: Option<i64> = r.get(4)?;
            let cached: Option<Vec<u8>> = r.get(5)?;
            let (bytes, from_cache) = match (data, cached, obj, slot) {
                (Some(d), _, _, _) => (Bytes::Here(d), false),
                (None, Some(c), _, _) => (Bytes::Here(c), true),
                (None, None, Some(obj), Some(slot)) => (
                    Bytes::Remote(Loc {
                        obj,
                        slot: slot as u64,
                    }),
                    false,
                ),
                _ => {
                    return Err(rusqlite::Error::InvalidColumnType(
                        2,
                        "data".into(),
                        rusqlite::types::Type::Null,
                    ));
                }
            };
            Ok(Version {
                pgno,
                txid: r.get::<_, i64>(0)? as u64,
                ck: r.get::<_, i64>(1)? as u64,
                bytes,
                cached: from_cache,
            })
        })
        .optional()?;
    match row {
        Some(v) => Ok(Some(v)),
        None => remote::base_version(tx, db_id, pgno, txid),
    }
}

/// The checksum of the newest version of `pgno` at or before `txid`.
fn page_ck(tx: &Connection, db_id: i64, pgno: u32, txid: u64) -> rusqlite::Result<Option<u64>> {
    let row = tx
        .prepare_cached(
            "SELECT chksum FROM pages WHERE db_id = ?1 AND pgno = ?2 AND txid <= ?3
             ORDER BY txid DESC LIMIT 1",
        )?
        .query_row(rusqlite::params![db_id, pgno, txid as i64], |r| {
            Ok(r.get::<_, i64>(0)? as u64)
        })
        .optional()?;
    match row {
        Some(ck) => Ok(Some(ck)),
        None => remote::base_page_ck(tx, db_id, pgno, txid),
    }
}

/// Stores the page versions of one transaction as rows of `pages` (local mode), with their bytes
/// or, for an upload kept as an object file, naming the slot of each page (page P at P-1).
struct RowSink<'t> {
    tx: &'t Connection,
    db_id: i64,
    txid: u64,
    stored: u64,
    obj: Option<i64>,
}

impl verify::PageSink for RowSink<'_> {
    fn begin(&mut self, txid: u64, _page_size: u32) -> StoreResult<()> {
        self.txid = txid;
        Ok(())
    }

    fn page(&mut self, pgno: u32, ck: u64, data: &[u8]) -> StoreResult<()> {
        match self.obj {
            None => insert_page(self.tx, self.db_id, pgno, self.txid, ck, data)?,
            Some(obj) => {
                self.tx
                    .prepare_cached(
                        "INSERT INTO pages(db_id, pgno, txid, chksum, obj, slot)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )?
                    .execute(rusqlite::params![
                        self.db_id,
                        pgno,
                        self.txid as i64,
                        ck as i64,
                        obj,
                        i64::from(pgno) - 1
                    ])?;
            }
        }
        self.stored += 1;
        Ok(())
    }
}

fn insert_page(
    tx: &Connection,
    db_id: i64,
    pgno: u32,
    txid: u64,
    ck: u64,
    data: &[u8],
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO pages(db_id, pgno, txid, chksum, data) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(rusqlite::params![db_id, pgno, txid as i64, ck as i64, data])?;
    Ok(())
}

/// The head of `key` as seen by `tx`, for verifying a new transaction.
fn head_of<'t>(
    tx: &'t Connection,
    key: &DbKey,
    fetch: &'t dyn Fetch,
) -> StoreResult<verify::Head<'t>> {
    let db_id = find_db(tx, key)?;
    let row = match db_id {
        Some(id) => head(tx, id)?,
        None => None,
    };
    Ok(verify::Head {
        tx,
        db_id,
        row,
        fetch,
    })
}

/// What [`commit_rows`] stored.
struct Committed {
    row: TxnRow,
    db_id: i64,
    /// Page versions stored.
    stored: u64,
    /// The object the versions name (`to_object`), unless none was stored.
    obj: Option<i64>,
}

/// Local mode: verifies one transaction and stores it as rows, in the caller's write
/// transaction. `verify` gets the head and the sink. `to_object`: the versions' bytes are in an
/// upload's file (page P at slot P-1; the caller puts the file in place before committing), whose
/// `objects` row is added here.
fn commit_rows(
    tx: &Connection,
    key: &DbKey,
    fetch: &dyn Fetch,
    to_object: Option<&mut Incoming>,
    verify: impl FnOnce(&verify::Head, &mut dyn verify::PageSink) -> StoreResult<TxnRow>,
) -> StoreResult<Committed> {
    let head = head_of(tx, key, fetch)?;
    // A refused transaction rolls back with the caller's transaction, database row included.
    let db_id = match head.db_id {
        Some(id) => id,
        None => insert_db(tx, key)?,
    };
    let obj = match &to_object {
        Some(inc) => Some(objects::insert_row(tx, db_id, inc)?),
        None => None,
    };
    let mut sink = RowSink {
        tx,
        db_id,
        txid: 0,
        stored: 0,
        obj,
    };
    let mut row = verify(&head, &mut sink)?;
    row.created_ms = now_ms();
    insert_txn(tx, db_id, &row)?;
    let obj = match obj {
        Some(obj) if sink.stored == 0 => {
            tx.execute("DELETE FROM objects WHERE id = ?1", [obj])?;
            None
        }
        Some(obj) => {
            objects::set_txn(tx, obj, row.page_size, row.max_txid)?;
            Some(obj)
        }
        None => None,
    };
    Ok(Committed {
        row,
        db_id,
        stored: sink.stored,
        obj,
    })
}
