//! `litevfs repack`: rewrites a stopped store's `store.db` compactly.
//!
//! Owns the offline rewrite of `store.db` into a new file with [`STORE_PAGE_SIZE`] pages and no
//! free pages, and its swap for the old one. Invariant: at every instant `DATA_DIR/store.db` is
//! either the old file or the complete, synced new one, and never has a log beside it that
//! belongs to the other: the old log is checkpointed into the old file and gone before the
//! rename. It runs only while no server holds the data directory's lock, and holds that lock
//! itself, so a server cannot start in the middle.
//!
//! Two things make a store larger than its data, and this removes both: stores created before
//! 32 KiB store pages (one 4 KiB page version took a whole 8 KiB store page), and free pages
//! left by retention and deleted databases (SQLite reuses them for new data but never gives them
//! back to the file system on a local store).

use std::path::{Path, PathBuf};

use rusqlite::Connection;

use super::schema::STORE_PAGE_SIZE;
use super::{StoreError, StoreResult};

/// What a repack did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repacked {
    /// `store.db` and its log before, in bytes.
    pub bytes_before: u64,
    /// `store.db` after (it has no log).
    pub bytes_after: u64,
    pub page_size_before: u32,
    pub page_size_after: u32,
}

/// Rewrites `DATA_DIR/store.db` with [`STORE_PAGE_SIZE`] pages and no free space. Needs free
/// disk for one copy of the live data. Fails with [`StoreError::Locked`] while a server runs on
/// `data_dir`; a failure or a crash at any point leaves the old store in place (a partial copy
/// is removed by the next repack or server start).
pub fn repack(data_dir: &Path) -> StoreResult<Repacked> {
    let path = data_dir.join("store.db");
    if !path.exists() {
        return Err(StoreError::BadInput(format!(
            "{} holds no store (no store.db)",
            data_dir.display()
        )));
    }
    let _lock = super::lock_data_dir(data_dir)?;
    let new = data_dir.join("store.db.repack");
    remove_if_exists(&new)?;
    remove_if_exists(&sibling(&new, "-journal"))?;
    let wal = sibling(&path, "-wal");
    let bytes_before = file_len(&path)? + file_len(&wal)?;

    let conn = Connection::open(&path)?;
    let page_size_before: u32 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
    // Everything committed goes into store.db first, so that the copy is all of it and no log
    // is left that would be replayed onto the new file.
    let (busy, _, _): (i64, i64, i64) =
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?;
    if busy != 0 {
        return Err(StoreError::BadInput(format!(
            "{} is open in another process: close it and repack again",
            path.display()
        )));
    }
    // VACUUM INTO takes the page size asked for here, even from a WAL database.
    conn.pragma_update(None, "page_size", STORE_PAGE_SIZE)?;
    let copied = conn.execute("VACUUM INTO ?1", [new.to_string_lossy()]);
    if let Err(e) = copied {
        let _ = std::fs::remove_file(&new);
        return Err(e.into());
    }
    if let Err(e) = finish_copy(&new) {
        let _ = std::fs::remove_file(&new);
        return Err(e);
    }
    let page_size_after: u32 = {
        let c = Connection::open(&new)?;
        c.pragma_query_value(None, "page_size", |r| r.get(0))?
    };
    // Closing the last connection checkpoints and deletes the log; check that it is gone before
    // the new file takes the name the log belongs to.
    drop(conn);
    if file_len(&wal)? != 0 {
        let _ = std::fs::remove_file(&new);
        return Err(StoreError::BadInput(format!(
            "{} still has a log after its checkpoint (is it open in another process?); the \
             store was left as it was",
            path.display()
        )));
    }
    remove_if_exists(&wal)?;
    remove_if_exists(&sibling(&path, "-shm"))?;
    std::fs::rename(&new, &path)?;
    std::fs::File::open(data_dir)?.sync_all()?;
    Ok(Repacked {
        bytes_before,
        bytes_after: file_len(&path)?,
        page_size_before,
        page_size_after,
    })
}

/// Checks the copy, puts it in WAL mode as the server runs it, and syncs it to disk.
fn finish_copy(new: &Path) -> StoreResult<()> {
    let c = Connection::open(new)?;
    let check: String = c.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(StoreError::BadInput(format!(
            "the repacked copy fails its check ({check}); the store was left as it was"
        )));
    }
    c.pragma_update(None, "journal_mode", "WAL")?;
    drop(c);
    remove_if_exists(&sibling(new, "-wal"))?;
    remove_if_exists(&sibling(new, "-shm"))?;
    std::fs::File::open(new)?.sync_all()?;
    Ok(())
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", path.display()))
}

fn file_len(path: &Path) -> std::io::Result<u64> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e),
    }
}

fn remove_if_exists(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
