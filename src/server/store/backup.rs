//! `litevfs backup`: a consistent copy of a local store's data directory, taken while its server
//! runs or not.
//!
//! Owns the copy of `store.db` (SQLite's online backup API, in one step, so the copy is one
//! committed state) and of the object files that copy names (only their data: holes punched out
//! of a file stay holes). Invariant: nothing the copy of `store.db` names is removed or punched
//! out while the backup runs: it holds a shared lock on `DATA_DIR/BACKUP.lock` from before the
//! copy of `store.db` until the last object file is copied, and the server gives space back only
//! while it can take that lock exclusively ([`hold_off_backups`]). The destination is complete
//! only once `DEST/store.db` exists: it is written as `store.db.partial`, synced, then renamed.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::objects::{DIR, LOCAL_FILE};
use super::{Store, StoreError, StoreResult};

/// Name of the lock file in the data directory.
const LOCK: &str = "BACKUP.lock";

/// What a backup copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackedUp {
    /// Bytes of the copy of `store.db`.
    pub store_bytes: u64,
    /// Object files copied, and the bytes of data in them.
    pub objects: u64,
    pub object_bytes: u64,
}

fn lock_file(data_dir: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(data_dir.join(LOCK))
}

/// `flock` on `f`; `Ok(false)` if `nonblocking` and someone else holds it.
pub(super) fn flock(f: &File, op: libc::c_int) -> std::io::Result<bool> {
    // SAFETY: a plain system call on an open descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// The server's side: `Some` (hold it while giving space back) when no backup runs, `None`
/// while one does (try again later).
pub(super) fn hold_off_backups(data_dir: &Path) -> std::io::Result<Option<File>> {
    let f = lock_file(data_dir)?;
    Ok(flock(&f, libc::LOCK_EX | libc::LOCK_NB)?.then_some(f))
}

/// Copies the local store in `data_dir` into `dest` (a new or empty directory), whether or not
/// a server runs on it. `dest` can then be served as a data directory.
pub fn backup(data_dir: &Path, dest: &Path) -> StoreResult<BackedUp> {
    let src = data_dir.join("store.db");
    if !src.exists() {
        return Err(StoreError::BadInput(format!(
            "{} holds no store (no store.db)",
            data_dir.display()
        )));
    }
    if dest.exists() && std::fs::read_dir(dest)?.next().is_some() {
        return Err(StoreError::BadInput(format!(
            "{} is not empty: back up into a new or empty directory",
            dest.display()
        )));
    }
    let conn = Connection::open_with_flags(&src, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    let mode: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'mode'", [], |r| {
            r.get(0)
        })
        .optional()
        .unwrap_or(None);
    if mode.as_deref().is_some_and(|m| m != "local") {
        return Err(StoreError::BadInput(format!(
            "{} is the cache of an object store, which holds the data: back up the bucket",
            data_dir.display()
        )));
    }
    // With no server on it, the store may have commits that only its commit log holds (the
    // machine crashed): opening it applies them, as a server's start would, and keeps a server
    // from starting until the copy is done.
    let _opened = match Store::open(data_dir, std::time::Duration::from_secs(u32::MAX.into())) {
        Ok(store) => Some(store),
        Err(StoreError::Locked(_)) => None,
        Err(e) => return Err(e),
    };
    // A running server may hold acknowledged transactions in a batch not committed yet
    // ([`super::writer`]); the batch holds SQLite's write lock, so once this takes that lock
    // (and gives it back), everything acknowledged before the backup began is in `store.db`.
    let barrier = Connection::open(&src)?;
    barrier.busy_timeout(std::time::Duration::from_secs(10))?;
    barrier.execute_batch("BEGIN IMMEDIATE; COMMIT")?;
    drop(barrier);
    let lock = lock_file(data_dir)?;
    flock(&lock, libc::LOCK_SH)?;
    std::fs::create_dir_all(dest.join(DIR))?;
    let partial = dest.join("store.db.partial");
    {
        let mut out = Connection::open(&partial)?;
        let b = rusqlite::backup::Backup::new(&conn, &mut out)?;
        // One step: one read transaction on the source, so the copy is one committed state
        // (in steps, a write in between would restart it).
        b.step(-1)?;
    }
    drop(conn);
    let copy = Connection::open_with_flags(&partial, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let keys: Vec<String> = copy
        .prepare("SELECT key FROM objects WHERE kind = ?1 ORDER BY id")?
        .query_map([LOCAL_FILE], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    drop(copy);
    let mut object_bytes = 0;
    for key in &keys {
        object_bytes += copy_data(&data_dir.join(DIR).join(key), &dest.join(DIR).join(key))?;
    }
    drop(lock);
    File::open(&partial)?.sync_all()?;
    File::open(dest.join(DIR))?.sync_all()?;
    let store_bytes = std::fs::metadata(&partial)?.len();
    std::fs::rename(&partial, dest.join("store.db"))?;
    File::open(dest)?.sync_all()?;
    Ok(BackedUp {
        store_bytes,
        objects: keys.len() as u64,
        object_bytes,
    })
}

/// Copies the data of `from` into a new file `to` of the same length, leaving its holes holes;
/// returns the bytes of data copied. The copy is synced.
fn copy_data(from: &Path, to: &Path) -> std::io::Result<u64> {
    let src = File::open(from)?;
    let len = src.metadata()?.len();
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)?;
    dst.set_len(len)?;
    let fd = src.as_raw_fd();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    let mut copied = 0;
    while at < len {
        // SAFETY: plain system calls on an open descriptor.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole remains
            }
            return Err(e);
        }
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let (mut pos, end) = (data as u64, (hole as u64).min(len));
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], pos)?;
            dst.write_all_at(&buf[..n], pos)?;
            pos += n as u64;
            copied += n as u64;
        }
        at = end;
    }
    dst.sync_all()?;
    Ok(copied)
}
