//! Reading pages: the write transaction's own pages, then the cache, then the store.
//!
//! Owns the read path of [`Database`]: sub-page reads served from whole pages, a miss fetched
//! in one request with its prefetch candidates at the connection's pinned position, the
//! per-query request budget, and `EPOSMISMATCH` turned into the documented extended code. It
//! never moves the position; [`super::database`] does, between transactions.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;

use parking_lot::MutexGuard;

use super::Pgno;
use super::client::ClientError;
use super::database::{Database, State};
use super::error::{Error, Result};
use super::lock::ConnId;
use crate::ltx::{EMPTY_CHECKSUM, checksum_xor, page_checksum};

/// Largest number of pages asked for in one request when loading many pages.
const BATCH: usize = 256;
/// Page data `litevfs_cache_db` holds in memory at once.
const CACHE_ALL_CHUNK_BYTES: usize = 8 << 20;

/// Remote requests one connection made in its current read transaction.
#[derive(Debug, Default)]
pub struct Budget {
    pub used: u32,
}

impl Database {
    /// Reads `buf.len()` bytes at `offset` of the main database file (within one page).
    pub fn read(
        &self,
        me: ConnId,
        budget: &mut Budget,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize> {
        let mut st = self.state.lock();
        let (page_size, size) = match &st.write {
            Some(w) if w.owner == me => (w.page_size, w.size),
            _ => (st.page_size, st.main_size()),
        };
        if page_size == 0 || size == 0 {
            return Ok(0);
        }
        let ps = page_size as u64;
        let pgno = Pgno((offset / ps + 1) as u32);
        let in_page = (offset % ps) as usize;
        if pgno.0 > size {
            return Ok(0);
        }
        // The common case, a whole committed page in the cache: straight into SQLite's buffer.
        let whole_committed = in_page == 0
            && buf.len() == ps as usize
            && page_size == st.page_size
            && pgno.0 <= st.size
            && !st.main_changed(pgno)
            && !st
                .write
                .as_ref()
                .is_some_and(|w| w.owner == me && w.dirty.contains(pgno));
        if whole_committed && st.cache.get(pgno, buf)? {
            self.stats.hits.fetch_add(1, Relaxed);
            st.prefetch.observe(pgno, buf);
            return Ok(buf.len());
        }
        let page = self.page(&mut st, me, budget, pgno, page_size)?;
        let n = buf.len().min(page.len() - in_page);
        buf[..n].copy_from_slice(&page[in_page..in_page + n]);
        Ok(n)
    }

    fn page(
        &self,
        st: &mut MutexGuard<State>,
        me: ConnId,
        budget: &mut Budget,
        pgno: Pgno,
        page_size: u32,
    ) -> Result<Vec<u8>> {
        if let Some(w) = st.write.as_ref().filter(|w| w.owner == me) {
            let mut buf = vec![0u8; page_size as usize];
            if w.dirty.get(pgno, &mut buf)? {
                return Ok(buf);
            }
        }
        if let Some(page) = st.main_page(pgno, page_size)? {
            return Ok(page);
        }
        if pgno.0 > st.size || page_size != st.page_size {
            return Ok(vec![0u8; page_size as usize]);
        }
        let mut buf = vec![0u8; page_size as usize];
        if st.cache.get(pgno, &mut buf)? {
            self.stats.hits.fetch_add(1, Relaxed);
            st.prefetch.observe(pgno, &buf);
            return Ok(buf);
        }
        self.stats.misses.fetch_add(1, Relaxed);
        self.spend(budget)?;
        let plan = {
            let (base, cap) = self.settings.lock().prefetch_window(page_size);
            let (size, lock) = (st.size, Pgno::lock_page(page_size));
            let State {
                prefetch, cache, ..
            } = &mut **st;
            let cache = std::cell::RefCell::new(cache);
            let mut peek = |p: Pgno| {
                let mut buf = vec![0u8; page_size as usize];
                let found = p.0 <= size && cache.borrow_mut().get(p, &mut buf).ok()?;
                found.then_some(buf)
            };
            prefetch.plan(
                pgno,
                base,
                cap,
                |p| p.0 <= size && p != lock && !cache.borrow().contains(p),
                &mut peek,
            )
        };
        tracing::debug!(db = %self.name, %pgno, window = st.prefetch.window(), pages = plan.len(), "read miss");
        let pos = st.pos;
        let fetched = MutexGuard::unlocked(st, || self.fetch(pos, &plan));
        let mut pages = self.fetched(st, fetched)?;
        let page = pages.remove(&pgno).ok_or_else(|| Error::BadPage {
            db: self.name.clone(),
            pgno: pgno.0,
            why: format!(
                "the store did not return it (database size {} pages at {pos})",
                st.size
            ),
        })?;
        if st.pos == pos {
            let bounds = self.bounds();
            st.cache.put(pgno, &page, bounds)?;
            for (p, d) in &pages {
                st.cache.put(*p, d, bounds)?;
            }
        }
        st.prefetch.observe(pgno, &page);
        Ok(page)
    }

    fn spend(&self, budget: &mut Budget) -> Result<()> {
        let limit = self.settings.lock().max_reqs_per_query;
        if limit > 0 && budget.used >= limit {
            return Err(Error::TooManyRequests {
                db: self.name.clone(),
                limit,
            });
        }
        budget.used += 1;
        Ok(())
    }

    /// Maps a fetch failure: a position the store can no longer serve marks the database stale.
    fn fetched(
        &self,
        st: &mut State,
        r: Result<HashMap<Pgno, Vec<u8>>>,
    ) -> Result<HashMap<Pgno, Vec<u8>>> {
        match r {
            Err(Error::Client(ClientError::PosMismatch { pos, .. })) => {
                st.stale = true;
                Err(Error::RemoteChanged {
                    db: self.name.clone(),
                    pos,
                })
            }
            other => other,
        }
    }

    /// Committed content of `pgnos` at the current position: from the cache, the rest fetched
    /// in batches. Fetched pages also enter the cache.
    pub fn committed_pages(
        &self,
        st: &mut State,
        pgnos: &[Pgno],
    ) -> Result<HashMap<Pgno, Vec<u8>>> {
        let mut out = HashMap::with_capacity(pgnos.len());
        let mut missing = Vec::new();
        for &p in pgnos {
            let mut buf = vec![0u8; st.page_size as usize];
            if st.cache.get(p, &mut buf)? {
                out.insert(p, buf);
            } else {
                missing.push(p);
            }
        }
        let bounds = self.bounds();
        for chunk in missing.chunks(BATCH) {
            let r = self.fetch(st.pos, chunk);
            let pages = self.fetched(st, r)?;
            for &p in chunk {
                let d = pages.get(&p).ok_or_else(|| Error::BadPage {
                    db: self.name.clone(),
                    pgno: p.0,
                    why: "the store did not return it".into(),
                })?;
                st.cache.put(p, d, bounds)?;
            }
            out.extend(pages);
        }
        Ok(out)
    }

    /// `PRAGMA litevfs_cache_db`: loads every page into the cache and checks the whole
    /// database against the position's checksum. Returns the number of pages.
    pub fn cache_all(&self) -> Result<u32> {
        let mut st = self.state.lock();
        if st.idle() {
            self.begin_read(&mut st)?;
        }
        self.ensure_size(&mut st)?;
        if st.pos.is_zero() {
            return Ok(0);
        }
        let max = self.settings.lock().max_cached_pages;
        if max > 0 && u64::from(st.size) > max {
            return Err(Error::Unsupported(format!(
                "database {:?} has {} pages, more than litevfs_max_cached_pages = {max}; raise it first",
                self.name, st.size
            )));
        }
        let lock = Pgno::lock_page(st.page_size);
        let all: Vec<Pgno> = Pgno::all(st.size).filter(|p| *p != lock).collect();
        // A chunk at a time: the checksum folds page by page, so memory stays at one chunk
        // however large the database is.
        let chunk = (CACHE_ALL_CHUNK_BYTES / st.page_size as usize).max(1);
        let mut sum = EMPTY_CHECKSUM;
        for pgnos in all.chunks(chunk) {
            let pages = self.committed_pages(&mut st, pgnos)?;
            sum = pgnos
                .iter()
                .fold(sum, |s, p| checksum_xor(s, page_checksum(p.0, &pages[p])));
        }
        if sum != st.pos.checksum.0 {
            st.cache.clear()?;
            st.size_known = false;
            return Err(Error::BadPage {
                db: self.name.clone(),
                pgno: 0,
                why: format!(
                    "the pages add up to checksum {sum:016x}, the position says {}",
                    st.pos.checksum
                ),
            });
        }
        st.cache.persist()?;
        Ok(st.size)
    }
}
