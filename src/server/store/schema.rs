//! The SQLite schema of `store.db` and how connections to it are opened.
//!
//! Owns table layout and connection settings. Invariant: the writer connection runs in WAL mode
//! with `synchronous=FULL`, so a committed SQLite transaction is on disk before `COMMIT`
//! returns, except for a small transaction whose record the commit log already made durable
//! ([`super::commitlog`], which sets `synchronous=NORMAL` around it); readers are separate read-only connections that see one consistent snapshot per
//! read transaction. It does not decide what goes into the tables.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

/// Tables:
/// - `dbs`: one row per database (cluster, name); ids are never reused (the page cache is keyed
///   by them, and a database dropped and indexed again must not find another's bytes). A row
///   with no `txns` is a database at the
///   zero position (created by a lease). `compacted_txid` is the K of the last compaction
///   ([`super::retention`]). `generation` (bucket mode) is the generation of the database in the
///   bucket that the rows describe.
/// - `txns`: one row per accepted transaction (LTX file), keyed by its max TXID. The database's
///   position is its row with the highest `max_txid`. Checksums are u64 stored as i64 bits.
/// - `pages`: page versions. A version written by the transaction ending at `txid`; the page at
///   position T is the version with the largest `txid <= T`. Local mode keeps the bytes in `data`;
///   bucket mode leaves `data` NULL and names the object (`obj`) and slot that hold them.
///
/// Bucket mode only (the local index and cache of the bucket; deleting them loses nothing):
/// - `objects`: the bucket objects that rows point into (key relative to the generation).
/// - `bases`: per database, the image the page versions apply on: a page with no version in
///   `pages` at or below T is read from the base (whose TXID is at or below every servable T).
///   `base_cks` holds its page checksums, 4096 to a chunk, in slot order.
/// - `page_cache`: bytes of page versions fetched from the bucket, evicted least recently used
///   first (`atime`).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dbs(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster TEXT NOT NULL,
    name TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    compacted_txid INTEGER NOT NULL DEFAULT 0,
    generation TEXT,
    UNIQUE(cluster, name)
);
CREATE TABLE IF NOT EXISTS txns(
    db_id INTEGER NOT NULL,
    min_txid INTEGER NOT NULL,
    max_txid INTEGER NOT NULL,
    page_size INTEGER NOT NULL,
    commit_size INTEGER NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    pre_apply INTEGER NOT NULL,
    post_apply INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    PRIMARY KEY(db_id, max_txid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pages(
    db_id INTEGER NOT NULL,
    pgno INTEGER NOT NULL,
    txid INTEGER NOT NULL,
    chksum INTEGER NOT NULL,
    data BLOB,
    obj INTEGER,
    slot INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS pages_version ON pages(db_id, pgno, txid);
CREATE INDEX IF NOT EXISTS pages_by_txid ON pages(db_id, txid);
CREATE TABLE IF NOT EXISTS objects(
    id INTEGER PRIMARY KEY,
    db_id INTEGER NOT NULL,
    key TEXT NOT NULL,
    kind INTEGER NOT NULL,
    page_size INTEGER NOT NULL,
    data_offset INTEGER NOT NULL,
    min_txid INTEGER NOT NULL,
    max_txid INTEGER NOT NULL,
    UNIQUE(db_id, key)
);
CREATE TABLE IF NOT EXISTS bases(
    db_id INTEGER PRIMARY KEY,
    obj INTEGER NOT NULL,
    txid INTEGER NOT NULL,
    commit_size INTEGER NOT NULL,
    page_size INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS base_cks(
    obj INTEGER NOT NULL,
    chunk INTEGER NOT NULL,
    cks BLOB NOT NULL,
    PRIMARY KEY(obj, chunk)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS page_cache(
    db_id INTEGER NOT NULL,
    pgno INTEGER NOT NULL,
    txid INTEGER NOT NULL,
    data BLOB NOT NULL,
    atime INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS page_cache_key ON page_cache(db_id, pgno, txid);
CREATE INDEX IF NOT EXISTS page_cache_atime ON page_cache(atime);
";

/// Columns added after the first release, for stores created before them.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("dbs", "generation", "TEXT"),
    ("pages", "obj", "INTEGER"),
    ("pages", "slot", "INTEGER"),
];

/// Page size of `store.db`. A row holding one page version is a little larger than the page
/// (its key and checksum), so a store page holds as many versions as fit whole: with 8 KiB store
/// pages a 4 KiB version took a whole store page (the store was twice the data), with 32 KiB
/// ones seven fit (about 1.15x the data for 4 KiB pages, 1.07x for 1-2 KiB, 1.35x for 8 KiB).
/// The cost is write volume: a small commit rewrites a few whole store pages in the log, so
/// larger store pages (64 KiB: 1.1x for 4 KiB pages) cost single-row commits about a fifth
/// of their rate; 32 KiB cost less than half of that when measured side by side.
pub const STORE_PAGE_SIZE: u32 = 32768;

const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Size the write-ahead log is truncated to when it restarts after a checkpoint.
pub(super) const WAL_SIZE_LIMIT: i64 = 16 << 20;

/// Opens (creating if needed) the writer connection and applies the schema. `cache`: a bucket's
/// cache, which must be able to give evicted space back (incremental auto-vacuum, which costs
/// a local store extra writes on every commit, so it is off there).
pub fn open_writer(path: &Path, cache: bool) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    stable_plans(&conn)?;
    // Takes effect only on a new file (`litevfs repack` rewrites an older one).
    conn.pragma_update(None, "page_size", STORE_PAGE_SIZE)?;
    if cache {
        // Takes effect only on a new file, and only before anything writes its first page:
        // switching to WAL does, so this comes first (it once came after, and a cache never
        // gave space back).
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    }
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // The log grows to the largest transaction (an upload, a compaction) and SQLite keeps it
    // at that size unless told otherwise; when it restarts, cut it back to this (twice the
    // autocheckpoint size, so steady writing does not truncate and regrow it every cycle).
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    // Checkpoints run on their own thread ([`super::checkpoint`]), never inside a commit.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.execute_batch(SCHEMA)?;
    for (table, column, ty) in ADDED_COLUMNS {
        let has: bool = conn
            .prepare(&format!(
                "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
            ))?
            .exists([column])?;
        if !has {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {ty}"))?;
        }
    }
    Ok(conn)
}

/// Opens a read-only connection; the database must already exist.
pub fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    stable_plans(&conn)?;
    Ok(conn)
}

/// Query plans that never depend on bound values. Without this, SQLite marks parameters of some
/// statements (`WHERE db_id = ?1 AND pgno = ?2 AND txid <= ?3 ORDER BY txid DESC LIMIT 1`, the
/// lookup of every page version) to re-prepare the statement whenever one is bound to 0 or 1
/// after being NULL, and rusqlite's statement cache sets every parameter to NULL when a
/// statement goes back to it: the first database (id 1) re-parsed that lookup for every page
/// read, half the store's CPU in an export. `store.db` has no statistics for values to matter.
fn stable_plans(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

/// What to do with an existing `store.db` before opening it in a mode.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ModeCheck {
    Keep,
    /// A cache of another bucket (or an empty local store): delete it and start afresh.
    Discard,
}

/// Checks that `store.db` at `path` may be opened as `mode` (`local`, or `bucket URL STORE_ID`):
/// a local store holding databases is never treated as a cache (that would lose them), and a
/// bucket's cache is never taken for a local store (it is incomplete).
pub fn check_mode(
    path: &Path,
    mode: &str,
    data_dir: &Path,
) -> Result<ModeCheck, super::StoreError> {
    use super::StoreError;
    if !path.exists() {
        return Ok(ModeCheck::Keep);
    }
    let conn = open_reader(path)?;
    let has = |table: &str| -> rusqlite::Result<bool> {
        conn.prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1")?
            .exists([table])
    };
    let stored: Option<String> = if has("meta")? {
        conn.query_row("SELECT value FROM meta WHERE key = 'mode'", [], |r| {
            r.get(0)
        })
        .optional()?
    } else {
        None
    };
    let stored = stored.unwrap_or_else(|| "local".into());
    if stored == mode {
        return Ok(ModeCheck::Keep);
    }
    let dir = data_dir.display();
    match (stored.starts_with("bucket"), mode.starts_with("bucket")) {
        (true, false) => Err(StoreError::Mode(format!(
            "{dir} holds the cache of the object store {}, not a local store: start with --store \
             {0}, or use another --data-dir",
            stored.split(' ').nth(1).unwrap_or("?")
        ))),
        (false, true) => {
            let mut names = std::collections::BTreeSet::new();
            if has("dbs")? {
                let mut stmt = conn.prepare("SELECT cluster, name FROM dbs")?;
                for row in stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))? {
                    names.insert(row?);
                }
            }
            // Databases whose transactions only the commit log holds yet (a crash, or a kill
            // with a batch open) count too.
            names.extend(super::commitlog::logged_databases(data_dir)?);
            let dbs = names.len();
            if dbs > 0 {
                return Err(StoreError::Mode(format!(
                    "{dir} holds a local store with {dbs} database(s); with --store it would be \
                     only a cache: use another --data-dir (export the databases and import them \
                     into the object store to move them)"
                )));
            }
            Ok(ModeCheck::Discard)
        }
        _ => Ok(ModeCheck::Discard),
    }
}

/// Records the mode `store.db` is used in.
pub fn set_mode(conn: &Connection, mode: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO meta(key, value) VALUES ('mode', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [mode],
    )?;
    Ok(())
}
