//! Per-database state of this process: position, size, cache, locks, pending remote changes.
//!
//! Owns [`Database`], shared by every connection of the process to one database name. Its
//! invariant: every page a connection reads belongs to one position, [`State::pos`], which
//! moves (changes from the store applied, the cache pruned) only while no local connection
//! holds a lock ([`State::idle`]: WAL-mode connections keep SHARED between transactions and
//! hold wal-index locks inside them); changes that arrive meanwhile wait in [`State::pending`].
//! In WAL mode `pos` is the main file's position, and the store may be ahead of it
//! ([`State::store_pos`], see [`super::wal`]). Reads are in
//! [`super::pager`], writes and commits in [`super::writer`]. It does not talk SQLite's C API.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::Pgno;
use super::cache::{Bounds, Cache};
use super::client::{Client, Fetched};
use super::config::Settings;
use super::error::{Error, Result};
use super::lease::HeldLease;
use super::lock::{ConnId, LockLevel, LockTable};
use super::prefetch::Prefetcher;
use super::shm::Shm;
use super::spill::{DirtyPages, SpillConfig};
use super::wal::Wal;
use crate::dbfile::DbHeader;
use crate::wire::{Changes, ErrorCode, Pos};

/// Counters shown by `PRAGMA litevfs_cache_stats`.
#[derive(Default, Debug)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub requests: AtomicU64,
    pub pages_fetched: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub commits: AtomicU64,
    /// Fetched pages whose checksum the store sent and we checked.
    pub checksums_verified: AtomicU64,
    /// Commits whose reply was lost, and how each was settled ([`super::resolve`]).
    pub lost_replies: AtomicU64,
    pub lost_replies_landed: AtomicU64,
    pub lost_replies_failed: AtomicU64,
    pub commits_unknown: AtomicU64,
}

/// Checks a fetched page: requested, one valid page long, page 1 a SQLite header of that page
/// size, and its checksum when the store sent checksums. `Ok(true)` when the checksum was checked.
pub fn verify_page(
    pgno: Pgno,
    data: &[u8],
    requested: &[Pgno],
    checksums: Option<&super::client::PageChecksums>,
) -> std::result::Result<bool, String> {
    if !requested.contains(&pgno) {
        return Err("not requested".into());
    }
    if !crate::ltx::valid_page_size(data.len() as u32) {
        return Err(format!("{} bytes long", data.len()));
    }
    if pgno == Pgno::ONE {
        let h = DbHeader::parse(data).map_err(|e| e.to_string())?;
        if h.page_size as usize != data.len() {
            return Err(format!(
                "header says page size {}, got {} bytes",
                h.page_size,
                data.len()
            ));
        }
    }
    let Some(sums) = checksums else {
        return Ok(false);
    };
    let want = sums
        .get(&pgno.0)
        .ok_or("the store sent no checksum for it")?;
    let got = crate::ltx::page_checksum(pgno.0, data);
    if got != want.0 {
        return Err(format!("its checksum is {got:016x}, the store says {want}"));
    }
    Ok(true)
}

/// A change set from the store, valid only on top of the position it was computed from.
#[derive(Debug, Clone)]
pub struct Pending {
    pub from: Pos,
    pub changes: Changes,
}

/// An open write transaction: the pages SQLite wrote, held (in memory up to
/// `LITEVFS_TXN_MEMORY`, then in a spill file) until the store accepts them. Never in the
/// cache before that.
#[derive(Debug)]
pub struct WriteTxn {
    pub owner: ConnId,
    pub dirty: DirtyPages,
    /// Database size in pages as SQLite sees it inside the transaction.
    pub size: u32,
    pub page_size: u32,
}

/// Mutable state of a database, behind one mutex.
pub struct State {
    pub pos: Pos,
    /// The store knows this database (it may still be empty).
    pub exists: bool,
    /// Page size, 0 while the database has no pages.
    pub page_size: u32,
    /// Size in pages at `pos`; meaningful when `size_known`.
    pub size: u32,
    pub size_known: bool,
    /// The private `-wal` file and the main file under it ([`super::wal`]).
    pub walf: Wal,
    /// The private wal-index ([`super::shm`]).
    pub shm: Shm,
    pub cache: Cache,
    pub locks: LockTable,
    pub write: Option<WriteTxn>,
    pub pending: Option<Pending>,
    /// A fetch hit `EPOSMISMATCH`: resynchronise before the next transaction.
    pub stale: bool,
    /// The position of a commit whose outcome was reported unknown: until the store answers a
    /// sync, no transaction may read the position from before it (it could be wrong).
    pub unsettled: Option<Pos>,
    pub prefetch: Prefetcher,
    pub last_sync: Option<Instant>,
    /// Included in the change poller's request in flight.
    pub watched: bool,
    /// When a sync at transaction start last failed: cached reads go on without waiting.
    pub sync_failed: Option<Instant>,
}

/// Timeout of the sync a transaction start makes; cached reads must not wait long on a store
/// that does not answer.
const INLINE_SYNC_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed sync at transaction start, the next ones skip syncing this long.
const SYNC_BACKOFF: Duration = Duration::from_secs(5);

/// One database as seen by this process.
pub struct Database {
    pub name: String,
    pub client: Arc<Client>,
    pub state: Mutex<State>,
    pub settings: Mutex<Settings>,
    pub stats: Stats,
    pub lease: Mutex<Option<HeldLease>>,
    pub last_error: Mutex<Option<String>>,
    /// Open main-database files of this process.
    pub handles: AtomicUsize,
    /// Whether a lease holder thread runs for this database ([`super::lease`]).
    pub holding: std::sync::atomic::AtomicBool,
    /// Where write transactions and journals of this database spill, and from what size.
    pub spill: SpillConfig,
    /// `LITEVFS_OPEN_PREFETCH` (bytes): what a cold open asks the store to add to page 1.
    pub open_prefetch: u64,
}

impl Database {
    /// Creates the in-process state around a cache; [`Database::attach`] syncs it.
    pub fn new(name: &str, client: Arc<Client>, cache: Cache, txn_memory: u64) -> Database {
        let spill = SpillConfig {
            dir: cache.dir().to_path_buf(),
            limit: txn_memory,
        };
        let state = State {
            pos: cache.pos(),
            exists: !cache.pos().is_zero(),
            page_size: cache.page_size(),
            size: 0,
            size_known: false,
            walf: Wal::default(),
            shm: Shm::default(),
            cache,
            locks: LockTable::default(),
            write: None,
            pending: None,
            stale: false,
            unsettled: None,
            prefetch: Prefetcher::default(),
            last_sync: None,
            watched: false,
            sync_failed: None,
        };
        Database {
            name: name.to_string(),
            client,
            state: Mutex::new(state),
            settings: Mutex::new(Settings::default()),
            stats: Stats::default(),
            lease: Mutex::new(None),
            last_error: Mutex::new(None),
            handles: AtomicUsize::new(0),
            holding: std::sync::atomic::AtomicBool::new(false),
            spill,
            open_prefetch: 0,
        }
    }

    /// A connection opens the database: bring it up to date with the store and learn its size.
    /// With the store unreachable, a database known from the cache still opens.
    pub fn attach(&self, readonly: bool) -> Result<()> {
        let mut st = self.state.lock();
        let cold = st.pos.is_zero() && st.cache.is_empty();
        let opened = if cold {
            self.open_cold(&mut st)
        } else {
            self.sync_locked(&mut st, true)
        };
        if let Err(e) = opened {
            let usable = st.exists && st.cache.contains(Pgno::ONE);
            if !usable
                || !matches!(
                    e,
                    Error::Client(super::client::ClientError::Unreachable { .. })
                )
            {
                return Err(e);
            }
            tracing::warn!(db = %self.name, "opening from the local cache only: {e}");
        }
        if !st.exists && readonly {
            return Err(Error::NoSuchDatabase {
                name: self.name.clone(),
                host: self.client.host().to_string(),
            });
        }
        self.ensure_size(&mut st)?;
        if self.handles.fetch_add(1, Relaxed) == 0 {
            super::sync::database_opened();
        }
        Ok(())
    }

    /// A connection closed its main file. The last one gives back the write lease.
    pub fn detach(&self) {
        if self.handles.fetch_sub(1, Relaxed) == 1 {
            let held = self.lease.lock().is_some();
            if held {
                if let Err(e) = self.release_lease() {
                    tracing::warn!(db = %self.name, "{e}");
                }
            }
            let mut st = self.state.lock();
            st.watched = false;
            if let Err(e) = st.cache.persist() {
                tracing::warn!(db = %self.name, "{e}");
            }
        }
    }

    pub fn bounds(&self) -> Bounds {
        let s = self.settings.lock();
        Bounds {
            max_pages: s.max_cached_pages,
            min_free_bytes: s.min_available_space,
        }
    }

    /// Asks the store what changed since our position, now, and applies it when no
    /// connection holds a lock (otherwise it waits for the last lock to go).
    pub fn sync_locked(&self, st: &mut State, force: bool) -> Result<()> {
        self.sync_with_timeout(st, force, super::client::REQUEST_TIMEOUT)
    }

    fn sync_with_timeout(&self, st: &mut State, force: bool, timeout: Duration) -> Result<()> {
        let from = st.store_pos();
        let positions = BTreeMap::from([(self.name.clone(), from)]);
        self.stats.requests.fetch_add(1, Relaxed);
        let mut changes = self.client.sync(positions, None, timeout)?;
        st.last_sync = Some(Instant::now());
        self.offer_locked(st, from, changes.remove(&self.name));
        if force && st.idle() {
            self.apply_pending(st);
        }
        Ok(())
    }

    /// Takes a change set computed from `from` (`None`: the store does not list the database).
    pub fn offer(&self, from: Pos, changes: Option<Changes>) {
        let mut st = self.state.lock();
        st.last_sync = Some(Instant::now());
        self.offer_locked(&mut st, from, changes);
    }

    fn offer_locked(&self, st: &mut State, from: Pos, changes: Option<Changes>) {
        if from != st.store_pos() {
            return; // computed from an older position; the next poll asks again
        }
        let changes = match changes {
            Some(c) => c,
            None if st.pos.is_zero() => {
                st.exists = false;
                return;
            }
            None => Changes {
                pos: Pos::ZERO,
                pgnos: None,
                all: Some(true),
            },
        };
        st.exists = true;
        if changes.pos == st.store_pos() && !changes.drops_all() {
            return;
        }
        st.pending = Some(Pending { from, changes });
        if st.idle() {
            self.apply_pending(st);
        }
    }

    /// Applies waiting changes; only called when no connection holds a lock.
    pub fn apply_pending(&self, st: &mut State) {
        let Some(p) = st.pending.take() else { return };
        if p.from != st.store_pos() {
            return;
        }
        // What this process committed through its WAL since the main file's position goes
        // with the WAL: the cache is pruned back to that position, then to the new one.
        for pgno in self.drop_wal(st) {
            st.cache.remove(pgno);
        }
        let ch = p.changes;
        if ch.drops_all() || ch.pos.is_zero() {
            if let Err(e) = st.cache.clear() {
                tracing::warn!(db = %self.name, "{e}");
            }
            st.page_size = 0;
            st.prefetch = Prefetcher::default();
        } else {
            for pgno in ch.pgnos.iter().flatten() {
                st.cache.remove(Pgno(*pgno));
            }
        }
        tracing::debug!(db = %self.name, from = %st.pos, to = %ch.pos, "applied remote changes");
        st.exists = st.exists || !ch.pos.is_zero();
        st.pos = ch.pos;
        st.cache.set_pos(ch.pos);
        st.size_known = false;
        if ch.pos.is_zero() {
            st.size = 0;
            st.size_known = true;
        }
    }

    /// Learns page size and database size from page 1 (fetching it if needed).
    pub fn ensure_size(&self, st: &mut State) -> Result<()> {
        if st.size_known {
            return Ok(());
        }
        if st.pos.is_zero() {
            (st.size, st.size_known) = (0, true);
            return Ok(());
        }
        let page1 = self.page_one(st)?;
        let h = DbHeader::parse(&page1).map_err(|e| Error::BadPage {
            db: self.name.clone(),
            pgno: 1,
            why: e.to_string(),
        })?;
        st.page_size = h.page_size;
        st.size = if h.size_valid && h.page_count > 0 {
            h.page_count
        } else {
            // SQLite ignores such a count (0 or stale, as files last written before 3.7.0 may
            // have) and takes the size from the file: the store's size of the position.
            match self.size_at_store(st.pos)? {
                Some(n) => n,
                None => {
                    tracing::warn!(db = %self.name, pages = h.page_count, "the database header's page count is not valid (a file last written by SQLite before 3.7.0?) and the page store does not send the size; reads may be wrong");
                    h.page_count.max(1)
                }
            }
        };
        st.size_known = true;
        Ok(())
    }

    /// The database size in pages at `pos` as the store reports it (`Litevfs-Db-Size` with
    /// page 1), or `None` from a store that does not send it.
    fn size_at_store(&self, pos: Pos) -> Result<Option<u32>> {
        self.stats.requests.fetch_add(1, Relaxed);
        Ok(self.client.pages(&self.name, Some(pos), &[1])?.size)
    }

    fn page_one(&self, st: &mut State) -> Result<Vec<u8>> {
        let cached_size = st.cache.page_size();
        if cached_size != 0 {
            let mut buf = vec![0u8; cached_size as usize];
            if st.cache.get(Pgno::ONE, &mut buf)? {
                return Ok(buf);
            }
        }
        self.stats.misses.fetch_add(1, Relaxed);
        let mut pages = self.fetch(st.pos, &[Pgno::ONE])?;
        let page = pages.remove(&Pgno::ONE).ok_or_else(|| Error::BadPage {
            db: self.name.clone(),
            pgno: 1,
            why: "the store did not return page 1".into(),
        })?;
        if cached_size != 0 && cached_size as usize != page.len() {
            st.cache.clear()?;
        }
        st.cache.put(Pgno::ONE, &page, self.bounds())?;
        Ok(page)
    }

    /// Fetches pages at `pos` in one request and checks what can be checked: the pages asked
    /// for, one page long, page 1 a SQLite header of that page size, and each page's checksum
    /// when the store sends them.
    pub fn fetch(&self, pos: Pos, pgnos: &[Pgno]) -> Result<HashMap<Pgno, Vec<u8>>> {
        self.stats.requests.fetch_add(1, Relaxed);
        let raw: Vec<u32> = pgnos.iter().map(|p| p.0).collect();
        let fetched = self.client.pages(&self.name, Some(pos), &raw)?;
        self.accept(pgnos, fetched)
    }

    /// Checks fetched pages (see [`Database::fetch`]) and counts them.
    fn accept(&self, pgnos: &[Pgno], fetched: Fetched) -> Result<HashMap<Pgno, Vec<u8>>> {
        let mut out = HashMap::with_capacity(fetched.pages.len());
        for p in fetched.pages {
            self.stats.pages_fetched.fetch_add(1, Relaxed);
            self.stats
                .bytes_fetched
                .fetch_add(p.data.len() as u64, Relaxed);
            let verified = verify_page(Pgno(p.pgno), &p.data, pgnos, fetched.checksums.as_ref())
                .map_err(|why| Error::BadPage {
                    db: self.name.clone(),
                    pgno: p.pgno,
                    why,
                })?;
            if verified {
                self.stats.checksums_verified.fetch_add(1, Relaxed);
            }
            out.insert(Pgno(p.pgno), p.data);
        }
        Ok(out)
    }

    /// Opens a database this process knows nothing about (no position, empty cache) in one
    /// round trip: page 1 at the store's latest position, which the reply names. Stores without
    /// that extension (no `Litevfs-Pos` header, or `pos` required) get the plain sync.
    fn open_cold(&self, st: &mut State) -> Result<()> {
        self.stats.requests.fetch_add(1, Relaxed);
        let warm = self.open_prefetch;
        let fetched = match self.client.pages_warm(&self.name, None, &[1], warm) {
            Ok(f) => f,
            Err(e) => {
                match e.api_code() {
                    // Unknown, or known without data (created by a lease): nothing to cache.
                    Some(ErrorCode::NoDb) => st.exists = false,
                    Some(ErrorCode::NoTxid) => st.exists = true,
                    Some(ErrorCode::BadPos) => return self.sync_locked(st, true),
                    _ => return Err(e.into()),
                }
                st.last_sync = Some(Instant::now());
                return Ok(());
            }
        };
        let Some(pos) = fetched.pos.filter(|p| !p.is_zero()) else {
            return self.sync_locked(st, true);
        };
        // With `warm`, the store adds pages of its choosing; each is still checked against its
        // checksum, and page 1 must be there.
        let mut asked = vec![Pgno::ONE];
        if warm > 0 && fetched.checksums.is_some() {
            asked.extend(fetched.pages.iter().map(|p| Pgno(p.pgno)));
        }
        let mut pages = self.accept(&asked, fetched)?;
        let page1 = pages.remove(&Pgno::ONE).ok_or_else(|| Error::BadPage {
            db: self.name.clone(),
            pgno: 1,
            why: "the store did not return page 1".into(),
        })?;
        let page_size = page1.len();
        self.stats.misses.fetch_add(1, Relaxed);
        st.last_sync = Some(Instant::now());
        st.exists = true;
        st.pos = pos;
        st.cache.set_pos(pos);
        st.size_known = false;
        let bounds = self.bounds();
        st.cache.put(Pgno::ONE, &page1, bounds)?;
        for (p, data) in pages.into_iter().filter(|(_, d)| d.len() == page_size) {
            st.cache.put(p, &data, bounds)?;
        }
        Ok(())
    }

    /// Starts a read transaction for the first lock holder: sync if due, apply what waits,
    /// learn the size. A store that cannot be reached does not stop cached reads.
    pub fn begin_read(&self, st: &mut State) -> Result<()> {
        if let Some(pos) = st.unsettled {
            // After an unknown outcome a read must tell the truth or fail: no backoff, no
            // falling back to the cached position.
            match self.sync_with_timeout(st, false, INLINE_SYNC_TIMEOUT) {
                Ok(()) => (st.unsettled, st.stale, st.sync_failed) = (None, false, None),
                Err(e) => {
                    st.sync_failed = Some(Instant::now());
                    return Err(Error::Unsettled {
                        db: self.name.clone(),
                        pos,
                        why: e.to_string(),
                    });
                }
            }
        }
        let period = self.settings.lock().sync_period;
        let due =
            !period.is_zero() && !st.watched && st.last_sync.is_none_or(|t| t.elapsed() >= period);
        let backing_off = st.sync_failed.is_some_and(|t| t.elapsed() < SYNC_BACKOFF);
        if (due || st.stale) && !backing_off {
            match self.sync_with_timeout(st, false, INLINE_SYNC_TIMEOUT) {
                Ok(()) => (st.stale, st.sync_failed) = (false, None),
                Err(e) => {
                    tracing::debug!(db = %self.name, "sync at transaction start: {e}");
                    st.sync_failed = Some(Instant::now());
                }
            }
        }
        self.apply_pending(st);
        self.ensure_size(st)
    }

    /// Raises a connection's lock.
    pub fn lock(&self, me: ConnId, from: LockLevel, to: LockLevel) -> Result<LockLevel> {
        let mut st = self.state.lock();
        if from == LockLevel::Unlocked && st.idle() && to >= LockLevel::Shared {
            self.begin_read(&mut st)?;
        }
        // A WAL-mode connection takes EXCLUSIVE only to checkpoint and close its WAL, which
        // is local work; if it then writes in rollback mode (leaving WAL), the write starts
        // the write transaction ([`Database::start_write`]).
        if to == LockLevel::Exclusive
            && from < LockLevel::Reserved
            && !st.shm.mapped(me)
            && self.header_says_wal(&mut st)?
        {
            // Shared straight to EXCLUSIVE on a WAL database: SQLite opens the WAL in
            // exclusive locking mode (its wal-index in its own heap).
            st.shm.enter_heap_mode(me);
        }
        let wal_mode = st.shm.mapped(me);
        if to >= LockLevel::Reserved && from < LockLevel::Reserved && !wal_mode {
            self.check_writable(&st)?;
        }
        let level = st.locks.lock(me, from, to).map_err(|_| Error::Busy)?;
        if level >= LockLevel::Reserved && st.write.is_none() && !wal_mode {
            self.start_write(&mut st, me);
        }
        Ok(level)
    }

    /// Whether the main file's page 1 says WAL (bytes 18 and 19 are 2).
    fn header_says_wal(&self, st: &mut State) -> Result<bool> {
        if st.main_size() == 0 {
            return Ok(false);
        }
        let page1 = match st.main_page(Pgno::ONE, st.page_size)? {
            Some(p) => p,
            None => self.page_one(st)?,
        };
        Ok(DbHeader::parse(&page1).is_ok_and(|h| h.is_wal()))
    }

    /// Opens connection `me`'s write transaction.
    pub(super) fn start_write(&self, st: &mut State, me: ConnId) {
        let page_size = st.page_size;
        st.write = Some(WriteTxn {
            owner: me,
            dirty: DirtyPages::new(self.spill.clone()),
            size: st.size,
            page_size,
        });
    }

    pub(super) fn check_writable(&self, st: &State) -> Result<()> {
        // Renew here too when due: a starved refresher thread must not fail a write.
        self.refresh_lease();
        if !self.lease.lock().as_ref().is_some_and(HeldLease::is_live) {
            return Err(Error::NoLease(self.name.clone()));
        }
        if st.pending.is_some() || st.stale {
            let pos = st.pending.as_ref().map_or(st.pos, |p| p.changes.pos);
            return Err(Error::RemoteChanged {
                db: self.name.clone(),
                pos,
            });
        }
        Ok(())
    }

    /// Lowers a connection's lock; leaving RESERVED commits what is still uncommitted (journal
    /// modes MEMORY and OFF; the others commit when the journal is finalised).
    pub fn unlock(&self, me: ConnId, from: LockLevel, to: LockLevel) -> Result<()> {
        let mut st = self.state.lock();
        let mut result = Ok(());
        let leaves_write = from >= LockLevel::Reserved && to <= LockLevel::Shared;
        if leaves_write && st.write.as_ref().is_some_and(|w| w.owner == me) {
            result = self.commit_locked(&mut st);
            st.write = None;
        }
        st.locks.unlock(me, to);
        if st.idle() {
            self.apply_pending(&mut st);
            if st.pending.is_none() && st.cache.persist_if_due().is_err() {
                tracing::debug!(db = %self.name, "could not write the cache index");
            }
        }
        result
    }

    /// Whether a connection of this process holds RESERVED or more.
    pub fn reserved(&self) -> bool {
        self.state.lock().locks.reserved()
    }

    /// How long the poller may wait on this database before a transaction start syncs.
    pub fn sync_period(&self) -> Duration {
        self.settings.lock().sync_period
    }

    pub fn set_error(&self, msg: &str) {
        *self.last_error.lock() = Some(msg.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Checksum;

    /// A database at position 1 with pages 1..=3 cached, no network used (sync period 0).
    fn db_at_pos1(dir: &std::path::Path) -> Database {
        let cfg = super::super::config::Config {
            host: "http://127.0.0.1:9".into(),
            token: None,
            cluster: None,
            cache_dir: None,
            log_file: None,
            commit_deadline: super::super::config::DEFAULT_COMMIT_DEADLINE,
            txn_memory: crate::vfs::spill::DEFAULT_TXN_MEMORY,
            open_prefetch: 0,
            default_vfs: false,
        };
        let client = Arc::new(Client::new(&cfg).unwrap());
        let cache = Cache::open(dir, "d", false).unwrap().unwrap();
        let db = Database::new("d", client, cache, crate::vfs::spill::DEFAULT_TXN_MEMORY);
        db.settings.lock().sync_period = Duration::ZERO;
        let mut st = db.state.lock();
        let mut p1 = vec![0u8; 512];
        p1[..16].copy_from_slice(crate::dbfile::MAGIC);
        p1[16..18].copy_from_slice(&512u16.to_be_bytes());
        p1[28..32].copy_from_slice(&3u32.to_be_bytes());
        let b = db.bounds();
        st.cache.put(Pgno(1), &p1, b).unwrap();
        st.cache.put(Pgno(2), &[2u8; 512], b).unwrap();
        st.cache.put(Pgno(3), &[3u8; 512], b).unwrap();
        st.pos = Pos::new(1, 1 << 63 | 1);
        let pos = st.pos;
        st.cache.set_pos(pos);
        drop(st);
        db
    }

    fn changes(txid: u64, pgnos: &[u32]) -> Changes {
        Changes {
            pos: Pos::new(txid, 1 << 63 | txid),
            pgnos: Some(pgnos.to_vec()),
            all: None,
        }
    }

    #[test]
    fn changes_wait_for_the_last_lock_and_drop_changed_pages() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_at_pos1(&dir.path().join("c"));
        assert_eq!(
            db.lock(1, LockLevel::Unlocked, LockLevel::Shared).unwrap(),
            LockLevel::Shared
        );
        assert_eq!(
            db.lock(2, LockLevel::Unlocked, LockLevel::Shared).unwrap(),
            LockLevel::Shared
        );
        db.offer(Pos::new(1, 1 << 63 | 1), Some(changes(2, &[2])));
        {
            let st = db.state.lock();
            assert_eq!(st.pos.txid.0, 1, "a read transaction keeps its position");
            assert!(st.cache.contains(Pgno(2)) && st.pending.is_some());
        }
        db.unlock(1, LockLevel::Shared, LockLevel::Unlocked)
            .unwrap();
        assert_eq!(
            db.state.lock().pos.txid.0,
            1,
            "another connection still reads"
        );
        db.unlock(2, LockLevel::Shared, LockLevel::Unlocked)
            .unwrap();
        let st = db.state.lock();
        assert_eq!(st.pos.txid.0, 2);
        assert!(!st.cache.contains(Pgno(2)) && st.cache.contains(Pgno(3)));
        assert_eq!(st.cache.pos().txid.0, 2);
    }

    #[test]
    fn stale_change_sets_are_ignored_and_all_drops_everything() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_at_pos1(&dir.path().join("c"));
        db.offer(Pos::new(5, 1 << 63 | 5), Some(changes(6, &[2])));
        assert_eq!(
            db.state.lock().pos.txid.0,
            1,
            "computed from another position"
        );
        let all = Changes {
            pos: Pos::new(9, 1 << 63 | 9),
            pgnos: None,
            all: Some(true),
        };
        db.offer(Pos::new(1, 1 << 63 | 1), Some(all));
        let st = db.state.lock();
        assert_eq!((st.pos.txid.0, st.cache.len()), (9, 0));
    }

    #[test]
    fn writes_need_the_lease() {
        let dir = tempfile::tempdir().unwrap();
        let db = db_at_pos1(&dir.path().join("c"));
        db.lock(1, LockLevel::Unlocked, LockLevel::Shared).unwrap();
        let e = db
            .lock(1, LockLevel::Shared, LockLevel::Reserved)
            .unwrap_err();
        assert!(matches!(e, Error::NoLease(_)), "{e}");
    }

    #[test]
    fn fetched_pages_are_verified() {
        let page = vec![7u8; 512];
        let sums = BTreeMap::from([(2, Checksum(crate::ltx::page_checksum(2, &page)))]);
        assert_eq!(
            verify_page(Pgno(2), &page, &[Pgno(2)], Some(&sums)),
            Ok(true)
        );
        assert_eq!(verify_page(Pgno(2), &page, &[Pgno(2)], None), Ok(false));
        let mut corrupt = page.clone();
        corrupt[100] ^= 1;
        assert!(
            verify_page(Pgno(2), &corrupt, &[Pgno(2)], Some(&sums))
                .unwrap_err()
                .contains("checksum")
        );
        assert!(
            verify_page(Pgno(3), &page, &[Pgno(2)], Some(&sums)).is_err(),
            "not requested"
        );
        assert!(
            verify_page(Pgno(2), &page[..500], &[Pgno(2)], None).is_err(),
            "not a page"
        );
        assert!(
            verify_page(Pgno(1), &page, &[Pgno(1)], None).is_err(),
            "page 1 without a SQLite header"
        );
    }
}
