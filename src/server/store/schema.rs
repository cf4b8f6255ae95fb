//! The SQLite schema of `store.db` and how connections to it are opened.
//!
//! Owns table layout and connection settings. Invariant: the writer connection runs in WAL mode
//! with `synchronous=FULL`, so a committed SQLite transaction is on disk before `COMMIT`
//! returns; readers are separate read-only connections that see one consistent snapshot per
//! read transaction. It does not decide what goes into the tables.

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

/// Tables:
/// - `dbs`: one row per database (cluster, name). A row with no `txns` is a database at the
///   zero position (created by a lease). `compacted_txid` is the K of the last compaction
///   ([`super::retention`]).
/// - `txns`: one row per accepted transaction (LTX file), keyed by its max TXID. The database's
///   position is its row with the highest `max_txid`. Checksums are u64 stored as i64 bits.
/// - `pages`: page versions. A version written by the transaction ending at `txid`; the page at
///   position T is the version with the largest `txid <= T`.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS dbs(
    id INTEGER PRIMARY KEY,
    cluster TEXT NOT NULL,
    name TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    compacted_txid INTEGER NOT NULL DEFAULT 0,
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
    data BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS pages_version ON pages(db_id, pgno, txid);
CREATE INDEX IF NOT EXISTS pages_by_txid ON pages(db_id, txid);
";

const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Size the write-ahead log is truncated to when it restarts after a checkpoint.
const WAL_SIZE_LIMIT: i64 = 16 << 20;

/// Opens (creating if needed) the writer connection and applies the schema.
pub fn open_writer(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Takes effect only on a new file: 8 KiB store pages hold a 4 KiB page version in one
    // b-tree cell instead of spilling to an overflow page.
    conn.pragma_update(None, "page_size", 8192)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // The log grows to the largest transaction (an upload, a compaction) and SQLite keeps it
    // at that size unless told otherwise; when it restarts, cut it back to this (twice the
    // autocheckpoint size, so steady writing does not truncate and regrow it every cycle).
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

/// Opens a read-only connection; the database must already exist.
pub fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}
