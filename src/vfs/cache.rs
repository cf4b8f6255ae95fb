//! The local disk page cache of one database: one data file plus an index, never a file per page.
//!
//! Owns `NAME.pages` (fixed-size slots, one page each), `NAME.index` (which page sits in which
//! slot, its checksum, the position all cached pages belong to, in least-recently-used order)
//! and `NAME.lock` (one process per cache at a time). Invariant: every page the cache returns
//! is the page at [`Cache::pos`] and matches the checksum recorded when it was stored; a slot
//! that no longer matches (a crash between a slot write and an index write) reads as a miss.
//! Slots inherited from an earlier process are checked on their first read; slots this process
//! wrote are trusted after that (the lock makes it the file's only writer), so a warm hit costs
//! one `pread` and no checksum.
//! The cache is bounded by a page count and by the free space of its file system; page 1 is
//! pinned. It does not fetch, decide what changed remotely, or hold uncommitted pages.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use lru::LruCache;

use super::Pgno;
use crate::ltx::{CRC64, page_checksum};
use crate::wire::Pos;

const INDEX_MAGIC: &[u8; 8] = b"LVFSIDX1";

/// Why the local cache failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("local page cache {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, CacheError>;

/// Where a cached page lives and what it must hash to.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
struct Slot {
    slot: u32,
    checksum: u64,
    /// The slot's bytes are known to match `checksum` in this process: written by it, or read
    /// and checked once. Never persisted.
    verified: bool,
}

/// Limits the cache enforces when it stores a page.
#[derive(Copy, Clone, Debug)]
pub struct Bounds {
    /// Most pages kept (page 1 included); 0 means unbounded.
    pub max_pages: u64,
    /// The file is not grown while the file system has less free space than this.
    pub min_free_bytes: u64,
}

/// One database's page cache.
pub struct Cache {
    dir: PathBuf,
    name: String,
    data: File,
    _lock: File,
    persistent: bool,
    page_size: u32,
    pos: Pos,
    page1: Option<Slot>,
    lru: LruCache<Pgno, Slot>,
    free: Vec<u32>,
    next_slot: u32,
    /// No cached page has a higher number: [`Cache::truncate`] to at least this many pages,
    /// which every commit asks for, has nothing to drop and scans nothing.
    high: u32,
    index_dirty: bool,
    last_persist: Option<std::time::Instant>,
}

/// How often [`Cache::persist_if_due`] writes the index at most.
const PERSIST_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Cache {
    /// Opens (or creates) the cache of `name` in `dir`. With `persistent`, a valid index left
    /// by an earlier process is loaded; its pages are at [`Cache::pos`] and the caller must drop
    /// what changed since. Without, `dir` must be private to this cache: it is removed at once
    /// (the open files live on), so nothing is left behind, even after a kill -9. Returns
    /// `Ok(None)` when another process holds this cache.
    pub fn open(dir: &Path, name: &str, persistent: bool) -> Result<Option<Cache>> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let lock_path = dir.join(format!("{name}.lock"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(&lock_path))?;
        if !try_lock(&lock) {
            return Ok(None);
        }
        let data_path = dir.join(format!("{name}.pages"));
        let data = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&data_path)
            .map_err(io_err(&data_path))?;
        let mut cache = Cache {
            dir: dir.to_path_buf(),
            name: name.to_string(),
            data,
            _lock: lock,
            persistent,
            page_size: 0,
            pos: Pos::ZERO,
            page1: None,
            lru: LruCache::unbounded(),
            free: Vec::new(),
            next_slot: 0,
            high: 0,
            index_dirty: false,
            last_persist: None,
        };
        if !persistent {
            let _ = std::fs::remove_dir_all(dir);
        }
        if !persistent || !cache.load_index() {
            cache.clear()?;
        }
        Ok(Some(cache))
    }

    fn index_path(&self) -> PathBuf {
        self.dir.join(format!("{}.index", self.name))
    }

    fn data_path(&self) -> PathBuf {
        self.dir.join(format!("{}.pages", self.name))
    }

    /// The position every cached page belongs to.
    pub fn pos(&self) -> Pos {
        self.pos
    }

    /// The directory the cache's files are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Number of cached pages.
    pub fn len(&self) -> usize {
        self.lru.len() + usize::from(self.page1.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records that the cached pages are now those of `pos` (the caller dropped what changed).
    pub fn set_pos(&mut self, pos: Pos) {
        if self.pos != pos {
            self.pos = pos;
            self.index_dirty = true;
        }
    }

    fn entry(&mut self, pgno: Pgno, promote: bool) -> Option<Slot> {
        if pgno == Pgno::ONE {
            return self.page1;
        }
        if promote {
            self.lru.get(&pgno).copied()
        } else {
            self.lru.peek(&pgno).copied()
        }
    }

    /// Whether the page is cached (does not count as a use).
    pub fn contains(&self, pgno: Pgno) -> bool {
        if pgno == Pgno::ONE {
            self.page1.is_some()
        } else {
            self.lru.contains(&pgno)
        }
    }

    /// Reads a cached page into `buf` (one page long). A slot whose bytes no longer match its
    /// checksum is dropped and reads as a miss.
    pub fn get(&mut self, pgno: Pgno, buf: &mut [u8]) -> Result<bool> {
        let Some(slot) = self.entry(pgno, true) else {
            return Ok(false);
        };
        if buf.len() != self.page_size as usize {
            return Ok(false);
        }
        let off = slot.slot as u64 * self.page_size as u64;
        if let Err(e) = self.data.read_exact_at(buf, off) {
            if e.kind() != std::io::ErrorKind::UnexpectedEof {
                return Err(io_err(&self.data_path())(e));
            }
            self.remove(pgno);
            return Ok(false);
        }
        if slot.verified {
            return Ok(true);
        }
        if page_checksum(pgno.0, buf) != slot.checksum {
            tracing::debug!(db = %self.name, %pgno, "cached page failed its checksum; dropped");
            self.remove(pgno);
            return Ok(false);
        }
        self.record(
            pgno,
            Slot {
                verified: true,
                ..slot
            },
        );
        Ok(true)
    }

    fn record(&mut self, pgno: Pgno, slot: Slot) {
        self.high = self.high.max(pgno.0);
        if pgno == Pgno::ONE {
            self.page1 = Some(slot);
        } else {
            self.lru.put(pgno, slot);
        }
    }

    /// Stores a page of the cache's position. Sets the page size on first use; a page of
    /// another size is ignored. May evict least recently used pages to stay in `bounds`.
    pub fn put(&mut self, pgno: Pgno, data: &[u8], bounds: Bounds) -> Result<()> {
        if self.page_size == 0 {
            self.page_size = data.len() as u32;
        }
        if data.len() != self.page_size as usize || pgno == Pgno(0) {
            return Ok(());
        }
        let slot = match self.entry(pgno, true) {
            Some(s) => Some(s.slot),
            None => self.take_slot(pgno, bounds)?,
        };
        let Some(slot) = slot else { return Ok(()) };
        let off = slot as u64 * self.page_size as u64;
        if let Err(e) = self.data.write_all_at(data, off) {
            // The slot may be torn now: forget whatever it held and give it back.
            if self.contains(pgno) {
                self.remove(pgno);
            } else {
                self.free.push(slot);
            }
            return Err(io_err(&self.data_path())(e));
        }
        let checksum = page_checksum(pgno.0, data);
        self.record(
            pgno,
            Slot {
                slot,
                checksum,
                verified: true,
            },
        );
        self.index_dirty = true;
        Ok(())
    }

    fn take_slot(&mut self, pgno: Pgno, bounds: Bounds) -> Result<Option<u32>> {
        let at_max = bounds.max_pages > 0 && self.len() as u64 >= bounds.max_pages;
        if at_max {
            return Ok(self.evict_one(pgno));
        }
        if let Some(s) = self.free.pop() {
            return Ok(Some(s));
        }
        if bounds.min_free_bytes > 0
            && free_space(&self.dir).is_some_and(|f| f < bounds.min_free_bytes)
        {
            return Ok(self.evict_one(pgno));
        }
        let s = self.next_slot;
        self.next_slot += 1;
        Ok(Some(s))
    }

    /// Evicts the least recently used page (never page 1) and hands out its slot.
    fn evict_one(&mut self, for_pgno: Pgno) -> Option<u32> {
        if for_pgno == Pgno::ONE && self.lru.is_empty() {
            // Page 1 always has room: it is the one page SQLite needs to notice changes.
            let s = self.next_slot;
            self.next_slot += 1;
            return Some(s);
        }
        self.lru.pop_lru().map(|(_, s)| s.slot)
    }

    /// Drops one page.
    pub fn remove(&mut self, pgno: Pgno) {
        let slot = if pgno == Pgno::ONE {
            self.page1.take()
        } else {
            self.lru.pop(&pgno)
        };
        if let Some(s) = slot {
            self.free.push(s.slot);
            self.index_dirty = true;
        }
    }

    /// Drops every page past `pages` (the database shrank).
    pub fn truncate(&mut self, pages: u32) {
        if pages >= self.high {
            return;
        }
        self.high = pages;
        let gone: Vec<Pgno> = self
            .lru
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| p.0 > pages)
            .collect();
        for p in gone {
            self.remove(p);
        }
        if pages == 0 {
            self.remove(Pgno::ONE);
        }
    }

    /// Drops every page and forgets the page size.
    pub fn clear(&mut self) -> Result<()> {
        self.lru.clear();
        self.page1 = None;
        self.free.clear();
        self.next_slot = 0;
        self.high = 0;
        self.page_size = 0;
        self.pos = Pos::ZERO;
        self.data.set_len(0).map_err(io_err(&self.data_path()))?;
        self.index_dirty = true;
        Ok(())
    }

    /// Reduces the cache to at most `max` pages (page 1 stays).
    pub fn shrink_to(&mut self, max: u64) {
        while max > 0 && self.len() as u64 > max && !self.lru.is_empty() {
            if let Some((_, s)) = self.lru.pop_lru() {
                self.free.push(s.slot);
                self.index_dirty = true;
            }
        }
    }

    /// [`Cache::persist`], at most every two seconds: an older index stays valid (its pages
    /// are checked on read, and what changed since its position is dropped on the next start).
    pub fn persist_if_due(&mut self) -> Result<()> {
        if self
            .last_persist
            .is_some_and(|t| t.elapsed() < PERSIST_EVERY)
        {
            return Ok(());
        }
        self.persist()
    }

    /// Writes the index (atomically, by rename) when it changed and the cache is persistent.
    pub fn persist(&mut self) -> Result<()> {
        if !self.persistent || !self.index_dirty {
            return Ok(());
        }
        let mut out = Vec::with_capacity(40 + 16 * self.len());
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&self.page_size.to_be_bytes());
        out.extend_from_slice(&self.pos.txid.0.to_be_bytes());
        out.extend_from_slice(&self.pos.checksum.0.to_be_bytes());
        out.extend_from_slice(&(self.len() as u32).to_be_bytes());
        let entries = self
            .page1
            .map(|s| (Pgno::ONE, s))
            .into_iter()
            .chain(self.lru.iter().rev().map(|(p, s)| (*p, *s)));
        for (pgno, s) in entries {
            out.extend_from_slice(&pgno.0.to_be_bytes());
            out.extend_from_slice(&s.slot.to_be_bytes());
            out.extend_from_slice(&s.checksum.to_be_bytes());
        }
        let crc = CRC64.checksum(&out);
        out.extend_from_slice(&crc.to_be_bytes());
        let path = self.index_path();
        let tmp = path.with_extension("index.tmp");
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&out)?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(io_err(&path))?;
        self.index_dirty = false;
        self.last_persist = Some(std::time::Instant::now());
        Ok(())
    }

    /// Loads the index of an earlier process; false when absent or damaged.
    fn load_index(&mut self) -> bool {
        let mut bytes = Vec::new();
        let ok = File::open(self.index_path())
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .is_ok();
        ok && self.parse_index(&bytes).is_some()
    }

    fn parse_index(&mut self, b: &[u8]) -> Option<()> {
        let (body, crc) = b.split_at_checked(b.len().checked_sub(8)?)?;
        if CRC64.checksum(body) != u64::from_be_bytes(crc.try_into().ok()?)
            || !body.starts_with(INDEX_MAGIC)
        {
            return None;
        }
        let be32 = |o: usize| u32::from_be_bytes(body[o..o + 4].try_into().expect("4"));
        let be64 = |o: usize| u64::from_be_bytes(body[o..o + 8].try_into().expect("8"));
        if body.len() < 36 {
            return None;
        }
        let (page_size, pos, count) = (be32(8), Pos::new(be64(12), be64(20)), be32(28) as usize);
        if body.len() != 32 + 16 * count || (count > 0 && !crate::ltx::valid_page_size(page_size)) {
            return None;
        }
        let file_slots = self.data.metadata().ok()?.len() / u64::from(page_size.max(1));
        let mut used = std::collections::HashSet::new();
        for i in 0..count {
            let o = 32 + 16 * i;
            let (pgno, slot) = (
                Pgno(be32(o)),
                Slot {
                    slot: be32(o + 4),
                    checksum: be64(o + 8),
                    verified: false,
                },
            );
            if pgno == Pgno(0) || u64::from(slot.slot) >= file_slots || !used.insert(slot.slot) {
                continue;
            }
            self.record(pgno, slot);
        }
        self.page_size = page_size;
        self.pos = pos;
        self.next_slot = file_slots as u32;
        self.free = (0..self.next_slot).filter(|s| !used.contains(s)).collect();
        Some(())
    }
}

/// Takes an exclusive advisory lock on `f` without waiting; false if another holds it.
fn try_lock(f: &File) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor belongs to `f`, which outlives the call.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Free bytes available to unprivileged users on the file system holding `dir`.
fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is a plain C struct of integers; all-zero bytes are a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statvfs struct.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    (rc == 0).then(|| st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Bounds = Bounds {
        max_pages: 3,
        min_free_bytes: 0,
    };

    fn page(v: u8) -> Vec<u8> {
        vec![v; 512]
    }

    #[test]
    fn page_one_stays_at_the_smallest_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cache::open(dir.path(), "db", true).unwrap().unwrap();
        let one = Bounds {
            max_pages: 1,
            min_free_bytes: 0,
        };
        // Page 1 first: nothing else fits, page 1 stays.
        c.put(Pgno(1), &page(1), one).unwrap();
        c.put(Pgno(2), &page(2), one).unwrap();
        assert!(c.contains(Pgno(1)) && !c.contains(Pgno(2)));
        // Page 1 last, into a full cache: it takes the least recently used page's slot.
        let dir2 = tempfile::tempdir().unwrap();
        let mut c = Cache::open(dir2.path(), "db", false).unwrap().unwrap();
        c.put(Pgno(2), &page(2), one).unwrap();
        c.put(Pgno(1), &page(1), one).unwrap();
        c.put(Pgno(3), &page(3), one).unwrap();
        let mut buf = page(0);
        assert!(c.get(Pgno(1), &mut buf).unwrap() && buf == page(1));
        // No free space at all: page 1 still finds room, other pages evict each other.
        let full = Bounds {
            max_pages: 0,
            min_free_bytes: u64::MAX,
        };
        let dir3 = tempfile::tempdir().unwrap();
        let mut c = Cache::open(dir3.path(), "db", false).unwrap().unwrap();
        c.put(Pgno(1), &page(1), full).unwrap();
        c.put(Pgno(2), &page(2), full).unwrap();
        assert!(c.contains(Pgno(1)));
    }

    #[test]
    fn truncate_drops_pages_past_the_end_and_only_those() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cache::open(dir.path(), "db", false).unwrap().unwrap();
        let many = Bounds {
            max_pages: 100,
            min_free_bytes: 0,
        };
        for p in 1..=6 {
            c.put(Pgno(p), &page(p as u8), many).unwrap();
        }
        c.truncate(6);
        c.truncate(9);
        assert_eq!(c.len(), 6, "growing or keeping the size drops nothing");
        c.truncate(4);
        assert!(c.contains(Pgno(4)) && !c.contains(Pgno(5)) && !c.contains(Pgno(6)));
        // Pages put back past a cut are dropped by the next one.
        c.put(Pgno(8), &page(8), many).unwrap();
        c.truncate(5);
        assert!(!c.contains(Pgno(8)) && c.contains(Pgno(4)));
        c.truncate(0);
        assert!(c.is_empty());
        // A page checked on read is recorded again: still dropped by a later cut.
        let dir2 = tempfile::tempdir().unwrap();
        let mut c = Cache::open(dir2.path(), "db", true).unwrap().unwrap();
        c.put(Pgno(1), &page(1), many).unwrap();
        c.put(Pgno(3), &page(3), many).unwrap();
        c.persist().unwrap();
        drop(c);
        let mut c = Cache::open(dir2.path(), "db", true).unwrap().unwrap();
        let mut buf = page(0);
        assert!(c.get(Pgno(3), &mut buf).unwrap());
        c.truncate(2);
        assert!(!c.contains(Pgno(3)) && c.contains(Pgno(1)));
    }

    #[test]
    fn lru_eviction_keeps_page_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cache::open(dir.path(), "db", true).unwrap().unwrap();
        for p in 1..=5 {
            c.put(Pgno(p), &page(p as u8), B).unwrap();
        }
        assert_eq!(c.len(), 3);
        let mut buf = page(0);
        assert!(c.get(Pgno(1), &mut buf).unwrap());
        assert_eq!(buf, page(1));
        assert!(!c.contains(Pgno(2)) && !c.contains(Pgno(3)));
        assert!(c.contains(Pgno(4)) && c.contains(Pgno(5)));
        // one data file, slots reused
        assert_eq!(
            std::fs::metadata(dir.path().join("db.pages"))
                .unwrap()
                .len(),
            3 * 512
        );
    }

    #[test]
    fn reuse_after_restart_in_lru_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut c = Cache::open(dir.path(), "db", true).unwrap().unwrap();
            for p in 1..=3 {
                c.put(Pgno(p), &page(p as u8), B).unwrap();
            }
            let mut buf = page(0);
            c.get(Pgno(2), &mut buf).unwrap(); // 3 is now least recently used
            c.set_pos(Pos::new(7, 1 << 63 | 9));
            c.persist().unwrap();
        }
        let mut c = Cache::open(dir.path(), "db", true).unwrap().unwrap();
        assert_eq!(c.pos(), Pos::new(7, 1 << 63 | 9));
        assert_eq!(c.len(), 3);
        c.put(Pgno(4), &page(4), B).unwrap();
        assert!(!c.contains(Pgno(3)) && c.contains(Pgno(2)) && c.contains(Pgno(1)));
    }

    #[test]
    fn stale_slot_reads_as_miss() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cache::open(dir.path(), "db", true).unwrap().unwrap();
        c.put(Pgno(2), &page(2), B).unwrap();
        c.persist().unwrap();
        c.data.write_all_at(&page(9), 0).unwrap();
        drop(c);
        let mut c = Cache::open(dir.path(), "db", true).unwrap().unwrap();
        let mut buf = page(0);
        assert!(!c.get(Pgno(2), &mut buf).unwrap());
        assert!(!c.contains(Pgno(2)));
    }

    #[test]
    fn inherited_slots_are_checked_once_own_writes_are_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cache::open(dir.path(), "db", true).unwrap().unwrap();
        c.put(Pgno(2), &page(2), B).unwrap();
        assert!(c.entry(Pgno(2), false).unwrap().verified);
        c.persist().unwrap();
        drop(c);
        let mut c = Cache::open(dir.path(), "db", true).unwrap().unwrap();
        assert!(!c.entry(Pgno(2), false).unwrap().verified);
        let mut buf = page(0);
        assert!(c.get(Pgno(2), &mut buf).unwrap());
        assert_eq!(buf, page(2));
        assert!(c.entry(Pgno(2), false).unwrap().verified);
    }

    #[test]
    fn private_cache_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("p");
        let mut c = Cache::open(&private, "db", false).unwrap().unwrap();
        c.put(Pgno(1), &page(1), B).unwrap();
        let mut buf = page(0);
        assert!(c.get(Pgno(1), &mut buf).unwrap() && buf == page(1));
        assert!(!private.exists());
    }

    #[test]
    fn one_process_per_cache() {
        let dir = tempfile::tempdir().unwrap();
        let _a = Cache::open(dir.path(), "db", true).unwrap().unwrap();
        assert!(Cache::open(dir.path(), "db", true).unwrap().is_none());
    }
}
