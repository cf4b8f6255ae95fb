//! The `litevfs` SQLite VFS: the loadable extension's side of the system.
//!
//! Owns the process-wide state of the extension ([`Litevfs`]: configuration, the one HTTP
//! client, the open databases, the in-memory journals, the background threads) and
//! [`report`], the one place where an error becomes a log line, a remembered message
//! (`PRAGMA litevfs_last_error`) and an SQLite result code. Modules, from SQLite down:
//!
//! - [`ext`]: entry points, environment, logging setup
//! - [`file`]: SQLite-facing files, locks, commit detection, pragma routing
//! - [`pragma`]: `PRAGMA litevfs_*` parsed and evaluated
//! - [`database`], [`pager`], [`writer`]: per-database state, reads, writes and commits;
//!   [`resolve`]: settling a commit whose reply was lost
//! - [`commit`]: the LTX of a transaction
//! - [`cache`]: the local disk page cache; [`prefetch`]: what else to fetch on a miss
//! - [`wal`]: WAL-mode databases (the private `-wal`, its commits, checkpoints); [`shm`]: the
//!   private wal-index and its locks
//! - [`sync`]: the change poller; [`lease`]: write leases
//! - [`client`]: the page-store HTTP client ([`http1`]: its direct path for commits);
//!   [`config`]; [`lock`]; [`error`]
//!
//! Page numbers are [`Pgno`]; positions, TXIDs and checksums are the wire newtypes.
//!
//! User documentation: `docs/vfs.md`.

pub mod cache;
pub mod client;
pub mod commit;
pub mod config;
pub mod database;
pub mod error;
pub mod ext;
pub mod file;
pub mod http1;
pub mod lease;
pub mod lock;
pub mod pager;
pub mod pragma;
pub mod prefetch;
pub mod resolve;
pub mod shm;
pub mod spill;
pub mod sync;
pub mod wal;
pub mod writer;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use sqlite_plugin::logger::SqliteLogLevel;

use cache::Cache;
use client::Client;
use config::Config;
use database::Database;
use error::{Error, Op, Result};

/// A page number in a database file, counted from 1 (the wire and LTX carry it as a `u32`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Pgno(pub u32);

impl Pgno {
    pub const ONE: Pgno = Pgno(1);

    /// The page `n` pages after this one.
    pub fn plus(self, n: u32) -> Pgno {
        Pgno(self.0.saturating_add(n))
    }

    /// Pages `1..=count`.
    pub fn all(count: u32) -> impl DoubleEndedIterator<Item = Pgno> {
        (1..=count).map(Pgno)
    }

    /// Pages `from+1..=to` (what a database gains growing from `from` to `to` pages).
    pub fn between(from: u32, to: u32) -> impl Iterator<Item = Pgno> {
        (from.saturating_add(1)..=to).map(Pgno)
    }

    /// The page that holds byte offset 2^30 of a database with this page size.
    pub fn lock_page(page_size: u32) -> Pgno {
        Pgno(crate::ltx::lock_page(page_size))
    }
}

impl std::fmt::Display for Pgno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Everything the extension keeps for the life of the process.
pub struct Litevfs {
    pub config: Config,
    pub client: Arc<Client>,
    /// `LITEVFS_CACHE_DIR`; `None`: a private directory per database, removed once opened.
    cache_root: Option<PathBuf>,
    databases: Mutex<HashMap<String, Arc<Database>>>,
    /// Rollback and super journals, by file name: in memory, spilled to an anonymous file when
    /// large, never a named file on disk.
    pub journals: Mutex<HashMap<String, Arc<Mutex<spill::SpillBuf>>>>,
    next_conn: AtomicU64,
    threads: std::sync::Once,
}

impl Litevfs {
    pub fn new(config: Config) -> Result<Litevfs> {
        let client = Arc::new(Client::new(&config)?);
        let cache_root = config.cache_dir.clone();
        Ok(Litevfs {
            config,
            client,
            cache_root,
            databases: Mutex::new(HashMap::new()),
            journals: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            threads: std::sync::Once::new(),
        })
    }

    pub fn next_conn(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// An open database of this process.
    pub fn find(&self, name: &str) -> Option<Arc<Database>> {
        self.databases.lock().get(name).cloned()
    }

    /// The database `name`, created (cache opened) on first use.
    pub fn database(self: &Arc<Self>, name: &str) -> Result<Arc<Database>> {
        self.start_threads();
        let mut dbs = self.databases.lock();
        if let Some(db) = dbs.get(name) {
            return Ok(db.clone());
        }
        let shared = match &self.cache_root {
            Some(root) => Cache::open(root, name, true)?,
            None => None,
        };
        let cache = match shared {
            Some(c) => c,
            None if self.cache_root.is_none() => Cache::open(&private_cache_dir()?, name, false)?
                .expect("a fresh directory is not locked"),
            None => {
                tracing::info!(
                    db = name,
                    "the cache in LITEVFS_CACHE_DIR is in use by another process; using a private one"
                );
                Cache::open(&private_cache_dir()?, name, false)?
                    .expect("a fresh directory is not locked")
            }
        };
        let mut db = Database::new(name, self.client.clone(), cache, self.config.txn_memory);
        db.open_prefetch = self.config.open_prefetch;
        let db = Arc::new(db);
        dbs.insert(name.to_string(), db.clone());
        Ok(db)
    }

    fn all(&self) -> Vec<Arc<Database>> {
        self.databases.lock().values().cloned().collect()
    }

    fn start_threads(self: &Arc<Self>) {
        self.threads.call_once(|| {
            let me = self.clone();
            let client = self.client.clone();
            let _ = std::thread::Builder::new()
                .name("litevfs-sync".into())
                .spawn(move || sync::poller(client, || me.all()));
            let me = self.clone();
            let _ = std::thread::Builder::new()
                .name("litevfs-lease".into())
                .spawn(move || lease::refresher(|| me.all()));
        });
    }
}

fn private_cache_dir() -> Result<PathBuf> {
    tempfile::Builder::new()
        .prefix("litevfs-cache-")
        .tempdir()
        .map(|d| d.keep())
        .map_err(|e| {
            Error::Unsupported(format!(
                "cannot create a cache directory under the system temp dir: {e}"
            ))
        })
}

/// The last error of any database, for `PRAGMA litevfs_last_error` when none is specific.
static LAST_ERROR: Mutex<Option<String>> = Mutex::new(None);

/// Reports an error that is about to reach SQLite: logs it (WARN, through tracing and
/// SQLite's log), remembers it for `PRAGMA litevfs_last_error`, and returns its SQLite code.
pub fn report(db: Option<&Database>, err: &Error, op: Op) -> i32 {
    let code = err.code(op);
    if err.is_quiet() {
        return code;
    }
    let msg = err.to_string();
    tracing::warn!(code, "{msg}");
    if let Some(logger) = ext::LOGGER.get() {
        // sqlite3_log takes a format string: escape '%' and drop NULs.
        logger.log(
            SqliteLogLevel::Warn,
            &format!("litevfs: {msg}")
                .replace('%', "%%")
                .replace('\0', ""),
        );
    }
    if let Some(db) = db {
        db.set_error(&msg);
    }
    *LAST_ERROR.lock() = Some(msg);
    code
}
