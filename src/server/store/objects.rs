//! Local mode: the page bytes of large uploads, kept in files of `DATA_DIR/objects/` that are
//! written once, as the body arrives, and never rewritten.
//!
//! An upload over the spool's memory limit is received into `objects/in-NONCE` ([`Incoming`]):
//! a raw SQLite file, so page P is at `(P-1) * page_size`. Once verified, the file is synced,
//! renamed to `objects/OBJ-NONCE` (a row of `objects`, kind [`LOCAL_FILE`]) and its page
//! versions are index rows of `pages` with `data` NULL and `obj`/`slot` naming their bytes, all in
//! the upload's one SQLite transaction. Page bytes are thus written once, instead of into a spool,
//! the store's log and then `store.db`.
//!
//! Invariants:
//! - a row names an object only if the object's file is synced and in place: the rename and the
//!   directory's sync come before the commit that adds the rows;
//! - a file is removed, and a range of it punched out, only once no row names it and no read
//!   transaction that began before those rows were deleted is still running ([`Objects`]
//!   counts read transactions by epoch), so a long export never reads a hole, and while no
//!   `litevfs backup` holds `BACKUP.lock` ([`super::backup`]);
//! - a file without its `objects` row (a crash between rename and commit, or between the
//!   deletion of the row and the unlink) is removed when the store opens.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension};

use super::{Bytes, Fetch, StoreError, StoreResult, Version};
use crate::ltx::page_checksum;

/// `objects.kind` of a local file: slot S holds page S+1 (the lock page's slot included).
pub(super) const LOCAL_FILE: i64 = 16;
/// Directory of the files, under the data directory.
pub const DIR: &str = "objects";
/// Prefix of a file still being received.
const INCOMING: &str = "in-";
/// Open files kept for reads.
const OPEN_FILES: usize = 64;
/// Most bytes of one read of consecutive slots.
const MOST_READ: usize = 1 << 20;

/// An open object file.
struct ObjFile {
    file: File,
    page_size: u32,
}

/// The object files of a local store, and when their space may be given back.
pub(crate) struct Objects {
    dir: PathBuf,
    open: Mutex<Vec<(i64, Arc<ObjFile>)>>,
    /// Bumped after every commit that deletes rows naming objects.
    epoch: AtomicU64,
    /// Read transactions running, by the epoch they began in.
    readers: Mutex<BTreeMap<u64, usize>>,
    /// Space to give back, with the epoch from which that is safe.
    pending: Mutex<Vec<(u64, Work)>>,
    /// Rows naming each object when its gaps were last punched out.
    punched: Mutex<HashMap<i64, u64>>,
}

/// Work to run in one store transaction (read or write).
pub(super) type TxnFn<'f> = &'f mut dyn FnMut(&Connection) -> StoreResult<()>;

/// Space to give back once no read can need it.
enum Work {
    /// Objects of this database lost rows.
    Db(i64),
    /// Files of objects whose rows are gone with their database (id, key).
    Files(Vec<(i64, String)>),
}

/// A running read transaction (see [`Objects::reading`]).
pub(crate) struct ReadGuard<'a> {
    objects: &'a Objects,
    epoch: u64,
}

impl Drop for ReadGuard<'_> {
    fn drop(&mut self) {
        let mut readers = self
            .objects
            .readers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = readers.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                readers.remove(&self.epoch);
            }
        }
    }
}

/// An upload being received into `objects/`; removed when dropped unless adopted.
pub struct Incoming {
    path: PathBuf,
    file: File,
    nonce: String,
    adopted: bool,
    /// Bytes whose write-back to disk was started ([`Incoming::received`]).
    flushing: u64,
}

/// Write-back of a file being received is started in steps of this many bytes.
const WRITEBACK_STEP: u64 = 32 << 20;

impl Incoming {
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Call as the file grows to `len` bytes: starts writing the new part to disk in the
    /// background (`sync_file_range`), so the sync before the commit finds little left to do.
    pub fn received(&mut self, len: u64) {
        use std::os::fd::AsRawFd;
        while len >= self.flushing + WRITEBACK_STEP {
            // SAFETY: a plain system call on an open descriptor; it writes no memory of ours.
            // Advisory: an error only means the final sync does all the work.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    self.flushing as libc::off64_t,
                    WRITEBACK_STEP as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            self.flushing += WRITEBACK_STEP;
        }
    }

    /// Moves the read position back to the start (the file is also read as it is, through
    /// `Read`, and removed when dropped).
    pub fn rewind(&mut self) -> std::io::Result<()> {
        use std::io::Seek;
        self.file.rewind()
    }

    /// A reader of the file from its start.
    pub fn reader(&self) -> std::io::Result<File> {
        use std::io::Seek;
        let mut f = self.file.try_clone()?;
        f.seek(std::io::SeekFrom::Start(0))?;
        Ok(f)
    }
}

impl std::io::Read for Incoming {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if !self.adopted {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn nonce() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Objects {
    /// The objects of the store in `data_dir` (see [`Objects::open`]).
    pub fn new(data_dir: &Path) -> Objects {
        Objects {
            dir: data_dir.join(DIR),
            open: Mutex::default(),
            epoch: AtomicU64::new(1),
            readers: Mutex::default(),
            pending: Mutex::default(),
            punched: Mutex::default(),
        }
    }

    fn data_dir(&self) -> &Path {
        self.dir
            .parent()
            .expect("objects/ is in the data directory")
    }

    /// A new file to receive an upload into.
    pub fn incoming(&self) -> std::io::Result<Incoming> {
        let nonce = nonce();
        let path = self.dir.join(format!("{INCOMING}{nonce}"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(Incoming {
            path,
            file,
            nonce,
            adopted: false,
            flushing: 0,
        })
    }

    /// Local mode, when the store opens, before any request: creates the directory and removes
    /// files nobody names (uploads cut short, and files of rows that a crash kept from being
    /// removed or committed).
    pub fn open(&self, conn: &Connection) -> StoreResult<()> {
        std::fs::create_dir_all(&self.dir)?;
        // A running backup may still copy a file whose row a crash left deleted.
        let hold = super::backup::hold_off_backups(self.data_dir())?;
        let mut known = std::collections::HashSet::new();
        let mut stmt = conn.prepare("SELECT key FROM objects WHERE kind = ?1")?;
        for key in stmt.query_map([LOCAL_FILE], |r| r.get::<_, String>(0))? {
            known.insert(key?);
        }
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) && (hold.is_some() || name.starts_with(INCOMING)) {
                tracing::info!(
                    "removing {}: no row of the store names it",
                    entry.path().display()
                );
                std::fs::remove_file(entry.path())?;
            }
        }
        // Gaps left by deletions the previous run did not get to punch out.
        let mut stmt = conn.prepare("SELECT DISTINCT db_id FROM objects WHERE kind = ?1")?;
        let dbs: Vec<i64> = stmt
            .query_map([LOCAL_FILE], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.extend(dbs.into_iter().map(|db| (0, Work::Db(db))));
        Ok(())
    }

    /// Registers a read transaction about to begin; hold the guard until it ends.
    pub fn reading(&self) -> ReadGuard<'_> {
        let mut readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
        let epoch = self.epoch.load(Ordering::SeqCst);
        *readers.entry(epoch).or_default() += 1;
        ReadGuard {
            objects: self,
            epoch,
        }
    }

    /// Call after committing the deletion of rows of `db_id`: its objects' freed space is given
    /// back once every read that may still see those rows has ended.
    pub fn freed(&self, db_id: i64) {
        self.later(Work::Db(db_id));
    }

    /// Call after committing the deletion of a database and of its objects' rows (`files`, from
    /// [`Objects::delete_db`]): the files go once no read can still see the rows.
    pub fn deleted(&self, files: Vec<(i64, String)>) {
        if !files.is_empty() {
            self.later(Work::Files(files));
        }
    }

    fn later(&self, work: Work) {
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((epoch, work));
    }

    /// Moves the file of `inc` into place as object `obj` ([`insert_row`]) and syncs the
    /// directory, inside the write transaction that adds the object's rows. The caller synced
    /// the file itself first, and removes it ([`Objects::discard`]) if that transaction then
    /// fails to commit.
    pub fn place(&self, inc: &mut Incoming, obj: i64) -> StoreResult<String> {
        let key = key(obj, &inc.nonce);
        std::fs::rename(&inc.path, self.dir.join(&key))?;
        inc.adopted = true;
        File::open(&self.dir)?.sync_all()?;
        Ok(key)
    }

    /// Removes the file `key` of an object whose rows were never committed.
    pub fn discard(&self, key: &str) {
        let _ = std::fs::remove_file(self.dir.join(key));
    }

    fn file(&self, tx: &Connection, obj: i64) -> StoreResult<Arc<ObjFile>> {
        {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(i) = open.iter().position(|(o, _)| *o == obj) {
                let e = open.remove(i);
                let f = e.1.clone();
                open.push(e);
                return Ok(f);
            }
        }
        let (key, page_size): (String, u32) = tx
            .prepare_cached("SELECT key, page_size FROM objects WHERE id = ?1 AND kind = ?2")?
            .query_row(rusqlite::params![obj, LOCAL_FILE], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .optional()?
            .ok_or_else(|| StoreError::Corrupt(format!("object {obj} has no row")))?;
        let path = self.dir.join(&key);
        let file = File::open(&path)
            .map_err(|e| StoreError::Corrupt(format!("object file {}: {e}", path.display())))?;
        let f = Arc::new(ObjFile { file, page_size });
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.push((obj, f.clone()));
        if open.len() > OPEN_FILES {
            open.remove(0);
        }
        Ok(f)
    }

    fn forget(&self, obj: i64) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(o, _)| *o != obj);
        self.punched
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&obj);
    }

    /// Gives back the space of deleted rows whose last possible reader has ended: objects no
    /// row names are removed, gaps of the others punched out of their files. `write` runs a
    /// write transaction on the store. Returns the files removed.
    pub fn reclaim(
        &self,
        read: &dyn Fn(TxnFn) -> StoreResult<()>,
        write: &dyn Fn(TxnFn) -> StoreResult<()>,
    ) -> StoreResult<u64> {
        // Nothing is given back while a backup copies files (the work waits for a later pass).
        let Some(_hold) = super::backup::hold_off_backups(self.data_dir())? else {
            return Ok(0);
        };
        let oldest = {
            let readers = self.readers.lock().unwrap_or_else(|e| e.into_inner());
            readers.keys().next().copied().unwrap_or(u64::MAX)
        };
        let ready: Vec<Work> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            // A database with work a read may still need waits whole: its gaps are found from
            // its rows, which no longer show which deletion freed them.
            let busy: std::collections::HashSet<i64> = pending
                .iter()
                .filter_map(|(e, w)| match w {
                    Work::Db(db) if *e > oldest => Some(*db),
                    _ => None,
                })
                .collect();
            let (ready, wait): (Vec<_>, Vec<_>) = pending.drain(..).partition(|(e, w)| {
                *e <= oldest && !matches!(w, Work::Db(db) if busy.contains(db))
            });
            *pending = wait;
            ready.into_iter().map(|(_, w)| w).collect()
        };
        let mut removed = 0;
        let mut dbs = Vec::new();
        for work in ready {
            match work {
                Work::Db(db) => dbs.push(db),
                Work::Files(files) => {
                    for (obj, key) in files {
                        self.forget(obj);
                        removed += u64::from(self.remove(&key)?);
                    }
                }
            }
        }
        dbs.sort_unstable();
        dbs.dedup();
        for db_id in dbs {
            // Objects of the database, with the rows that still name them.
            let mut objs: Vec<(i64, String, u32, u64, u64)> = Vec::new();
            read(&mut |tx| {
                // Every row of the upload's transaction names its object, and no other does.
                let mut stmt = tx.prepare(
                    "SELECT id, key, page_size, max_txid,
                        (SELECT COUNT(*) FROM pages p WHERE p.db_id = o.db_id AND p.txid = o.max_txid)
                     FROM objects o WHERE db_id = ?1 AND kind = ?2",
                )?;
                objs = stmt
                    .query_map(rusqlite::params![db_id, LOCAL_FILE], |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get(2)?,
                            r.get::<_, i64>(3)? as u64,
                            r.get::<_, i64>(4)? as u64,
                        ))
                    })?
                    .collect::<Result<_, _>>()?;
                Ok(())
            })?;
            for (obj, key, page_size, txid, live) in objs {
                if live == 0 {
                    write(&mut |tx| {
                        tx.execute(
                            "DELETE FROM objects WHERE id = ?1
                               AND NOT EXISTS (SELECT 1 FROM pages WHERE db_id = ?2 AND txid = ?3)",
                            rusqlite::params![obj, db_id, txid as i64],
                        )?;
                        Ok(())
                    })?;
                    self.forget(obj);
                    removed += u64::from(self.remove(&key)?);
                    continue;
                }
                let done = self
                    .punched
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&obj)
                    == Some(&live);
                if done {
                    continue;
                }
                let path = self.dir.join(&key);
                let file = std::fs::OpenOptions::new().write(true).open(&path)?;
                let slots = file.metadata()?.len() / u64::from(page_size);
                read(&mut |tx| {
                    let mut stmt = tx.prepare_cached(
                        "SELECT slot FROM pages WHERE db_id = ?1 AND txid = ?2 ORDER BY slot",
                    )?;
                    let mut next = 0u64;
                    let mut rows = stmt.query(rusqlite::params![db_id, txid as i64])?;
                    while let Some(r) = rows.next()? {
                        let slot = r.get::<_, i64>(0)? as u64;
                        if slot > next {
                            punch(&file, next, slot, page_size);
                        }
                        next = slot + 1;
                    }
                    if slots > next {
                        punch(&file, next, slots, page_size);
                    }
                    Ok(())
                })?;
                self.punched
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(obj, live);
            }
        }
        Ok(removed)
    }

    /// Deletes the `objects` rows of `db_id` in the caller's write transaction (its `pages` rows
    /// go with it); returns the files to hand to [`Objects::deleted`] once it committed.
    pub fn delete_db(&self, tx: &Connection, db_id: i64) -> StoreResult<Vec<(i64, String)>> {
        let mut stmt = tx.prepare("SELECT id, key FROM objects WHERE db_id = ?1 AND kind = ?2")?;
        let keys = stmt
            .query_map(rusqlite::params![db_id, LOCAL_FILE], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        tx.execute(
            "DELETE FROM objects WHERE db_id = ?1 AND kind = ?2",
            rusqlite::params![db_id, LOCAL_FILE],
        )?;
        Ok(keys)
    }

    /// Removes the file `key`; whether it was there.
    fn remove(&self, key: &str) -> StoreResult<bool> {
        match std::fs::remove_file(self.dir.join(key)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

fn key(obj: i64, nonce: &str) -> String {
    format!("{obj}-{nonce}")
}

/// Adds the `objects` row of the upload received into `inc`, for database `db_id`, in the
/// caller's write transaction; returns its id. Its page size and TXIDs are set once known.
pub(super) fn insert_row(tx: &Connection, db_id: i64, inc: &Incoming) -> StoreResult<i64> {
    tx.prepare_cached(
        "INSERT INTO objects(db_id, key, kind, page_size, data_offset, min_txid, max_txid)
         VALUES (?1, ?2, ?3, 0, 0, 0, 0)",
    )?
    .execute(rusqlite::params![db_id, inc.nonce, LOCAL_FILE])?;
    let obj = tx.last_insert_rowid();
    tx.prepare_cached("UPDATE objects SET key = ?2 WHERE id = ?1")?
        .execute(rusqlite::params![obj, key(obj, &inc.nonce)])?;
    Ok(obj)
}

/// Records the page size and TXID of the transaction whose versions object `obj` holds.
pub(super) fn set_txn(tx: &Connection, obj: i64, page_size: u32, txid: u64) -> StoreResult<()> {
    tx.prepare_cached(
        "UPDATE objects SET page_size = ?2, min_txid = ?3, max_txid = ?3 WHERE id = ?1",
    )?
    .execute(rusqlite::params![obj, page_size, txid as i64])?;
    Ok(())
}

/// Punches slots `from..to` out of `file` (no-op where the file system cannot).
fn punch(file: &File, from: u64, to: u64, page_size: u32) {
    use std::os::fd::AsRawFd;
    let ps = u64::from(page_size);
    let (off, len) = (
        (from * ps) as libc::off_t,
        ((to - from) * ps) as libc::off_t,
    );
    // SAFETY: a plain system call on an open descriptor; it writes no memory of ours.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if rc != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "cannot punch a hole in an object file; its space is given back with the file"
        );
    }
}

/// Local mode's [`Fetch`]: bytes in `store.db`, or in an object file.
pub(crate) struct LocalBytes<'a> {
    pub objects: &'a Objects,
}

impl Fetch for LocalBytes<'_> {
    fn bytes(&self, tx: &Connection, db_id: i64, v: &Version) -> StoreResult<Vec<u8>> {
        Ok(self.batch(tx, db_id, std::slice::from_ref(v))?.remove(0))
    }

    fn batch(&self, tx: &Connection, _db_id: i64, vs: &[Version]) -> StoreResult<Vec<Vec<u8>>> {
        let mut out: Vec<Vec<u8>> = Vec::with_capacity(vs.len());
        let mut i = 0;
        while i < vs.len() {
            let loc = match &vs[i].bytes {
                Bytes::Here(d) => {
                    out.push(d.clone());
                    i += 1;
                    continue;
                }
                Bytes::Remote(l) => *l,
            };
            let f = self.objects.file(tx, loc.obj)?;
            let ps = f.page_size as usize;
            // The run of versions at consecutive slots of this object, read at once.
            let mut n = 1;
            while i + n < vs.len()
                && (n + 1) * ps <= MOST_READ
                && matches!(&vs[i + n].bytes,
                    Bytes::Remote(l) if l.obj == loc.obj && l.slot == loc.slot + n as u64)
            {
                n += 1;
            }
            let mut buf = vec![0u8; n * ps];
            f.file
                .read_exact_at(&mut buf, loc.slot * ps as u64)
                .map_err(|e| StoreError::Corrupt(format!("object {}: {e}", loc.obj)))?;
            for (k, chunk) in buf.chunks_exact(ps).enumerate() {
                let v = &vs[i + k];
                if page_checksum(v.pgno, chunk) != v.ck {
                    return Err(StoreError::Corrupt(format!(
                        "page {} at {:016x} fails its checksum in object {}",
                        v.pgno, v.txid, loc.obj
                    )));
                }
                out.push(chunk.to_vec());
            }
            i += n;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use super::super::{DbKey, Store};

    /// A SQLite-looking image of `n` 4 KiB pages, every byte past the header salted.
    fn image(n: u32, salt: u8) -> Vec<u8> {
        let mut out: Vec<u8> = (0..n as usize * 4096)
            .map(|i| (i % 251) as u8 ^ salt)
            .collect();
        out[..16].copy_from_slice(b"SQLite format 3\0");
        out[16..18].copy_from_slice(&4096u16.to_be_bytes());
        out[18..20].copy_from_slice(&[1, 1]);
        out[20..100].fill(0);
        out
    }

    fn upload(store: &Store, key: &DbKey, bytes: &[u8]) {
        let inc = store.incoming().expect("local mode").unwrap();
        inc.file().write_all(bytes).unwrap();
        store.upload_file(key, bytes.len() as u64, inc).unwrap();
    }

    fn files(store: &Store) -> Vec<(String, u64)> {
        use std::os::unix::fs::MetadataExt;
        let mut out: Vec<_> = std::fs::read_dir(&store.objects.dir)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let m = e.metadata().unwrap();
                (e.file_name().into_string().unwrap(), m.blocks() * 512)
            })
            .collect();
        out.sort();
        out
    }

    /// A read that began before compaction dropped the versions in an object can still read
    /// them: the file stays whole until that read ends.
    #[test]
    fn space_of_dropped_versions_waits_for_reads_that_may_see_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Duration::ZERO).unwrap();
        let key = DbKey {
            cluster: "c".into(),
            name: "db".into(),
        };
        upload(&store, &key, &image(64, 1));
        upload(&store, &key, &image(64, 2));
        let read = store.objects.reading();
        std::thread::sleep(Duration::from_millis(5));
        let stats = store.compact().unwrap();
        assert_eq!(stats.pages_deleted, 64);
        assert_eq!(stats.object_files_removed, 0, "a read may still need it");
        let f = files(&store);
        assert_eq!(f.len(), 2);
        assert!(f.iter().all(|(_, used)| *used >= 64 * 4096), "{f:?}");
        drop(read);
        // Nor while a backup copies files.
        let backup = std::fs::File::open(dir.path().join("BACKUP.lock")).unwrap();
        assert!(super::super::backup::flock(&backup, libc::LOCK_SH).unwrap());
        assert_eq!(store.compact().unwrap().object_files_removed, 0);
        assert_eq!(files(&store).len(), 2);
        drop(backup);
        let stats = store.compact().unwrap();
        assert_eq!(stats.object_files_removed, 1);
        assert_eq!(files(&store).len(), 1);
        // The remaining versions read back whole.
        let mut out = Vec::new();
        store
            .snapshot(&key, None, super::super::Format::Sqlite, |_| Some(&mut out))
            .unwrap();
        assert!(out == image(64, 2));
    }

    /// The lookup of a page version is prepared once, whatever the ids bound to it (database
    /// id 1 once re-prepared it on every page read).
    #[test]
    fn page_lookups_are_not_reprepared() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Duration::from_secs(60)).unwrap();
        let key = DbKey {
            cluster: "c".into(),
            name: "db".into(),
        };
        upload(&store, &key, &image(64, 1));
        store
            .read(|tx| {
                for pgno in 1..=64 {
                    super::super::page_version(tx, 1, pgno, 1, false)?.expect("stored");
                }
                let st = tx.prepare_cached(
                    "SELECT txid, chksum, data, obj, slot FROM pages
                 WHERE db_id = ?1 AND pgno = ?2 AND txid <= ?3 ORDER BY txid DESC LIMIT 1",
                )?;
                let n = st.get_status(rusqlite::StatementStatus::RePrepare);
                assert!(n <= 1, "re-prepared {n} times for 64 lookups");
                Ok(())
            })
            .unwrap();
    }
}
