//! Writing: SQLite's page writes buffered (in memory, spilling to a file when large), committed
//! as one LTX upload.
//!
//! Owns the write path of [`Database`]: whole-page writes and truncation inside a write
//! transaction, the file size SQLite sees, and [`Database::commit_locked`], which uploads the
//! transaction and only then moves the position and puts the pages into the cache. A failed
//! upload throws the transaction's pages away, so the cache never holds a page the store did
//! not accept. Deciding *when* to commit (journal finalised, lock dropped) is the caller's job.

use std::sync::atomic::Ordering::Relaxed;

use super::Pgno;
use super::commit::{self, Base};
use super::database::{Database, State, WriteTxn};
use super::error::{Error, Result};
use super::lock::ConnId;
use super::spill::{DirtyPages, SpillBuf};
use crate::ltx::valid_page_size;
use crate::wire::ErrorCode;

impl Database {
    /// Writes whole pages of the main database file inside the connection's write transaction.
    pub fn write(&self, me: ConnId, offset: u64, data: &[u8]) -> Result<()> {
        let mut st = self.state.lock();
        let w = self.own_write(&mut st, me)?;
        if w.page_size == 0 && offset == 0 && valid_page_size(data.len() as u32) {
            w.page_size = data.len() as u32;
        }
        let ps = w.page_size as u64;
        if ps == 0 || offset % ps != 0 || data.len() as u64 != ps {
            return Err(Error::Unsupported(format!(
                "database {:?}: a write of {} bytes at offset {offset} is not one whole page of {ps} bytes \
                 (changing the page size of an existing database is not supported)",
                self.name,
                data.len()
            )));
        }
        let pgno = Pgno((offset / ps + 1) as u32);
        w.dirty.insert(pgno, data)?;
        w.size = w.size.max(pgno.0);
        Ok(())
    }

    /// Connection `me`'s write transaction; writing without one means writing without the lease.
    fn own_write<'s>(&self, st: &'s mut State, me: ConnId) -> Result<&'s mut WriteTxn> {
        st.write
            .as_mut()
            .filter(|w| w.owner == me)
            .ok_or_else(|| Error::NoLease(self.name.clone()))
    }

    /// Truncates the main database file inside the write transaction (VACUUM, auto-vacuum).
    pub fn truncate(&self, me: ConnId, bytes: u64) -> Result<()> {
        let mut st = self.state.lock();
        let w = self.own_write(&mut st, me)?;
        if w.page_size == 0 {
            return Ok(());
        }
        w.size = (bytes / w.page_size as u64) as u32;
        w.dirty.truncate(w.size)?;
        Ok(())
    }

    /// Size in bytes of the main database file as connection `me` sees it.
    pub fn file_size(&self, me: ConnId) -> Result<u64> {
        let mut st = self.state.lock();
        if let Some(w) = st.write.as_ref().filter(|w| w.owner == me) {
            return Ok(w.size as u64 * w.page_size as u64);
        }
        self.ensure_size(&mut st)?;
        Ok(st.size as u64 * st.page_size as u64)
    }

    /// The journal of this database was finalised (deleted, truncated, or its header zeroed):
    /// SQLite's commit point. Upload now.
    pub fn journal_finalized(&self) -> Result<()> {
        let mut st = self.state.lock();
        self.commit_locked(&mut st)
    }

    /// Uploads the open write transaction if it changes anything. On success the position
    /// moves and the pages enter the cache; on failure the transaction's pages are dropped.
    pub fn commit_locked(&self, st: &mut State) -> Result<()> {
        let Some(w) = st.write.as_mut() else {
            return Ok(());
        };
        if w.dirty.is_empty() && w.size == st.size {
            return Ok(());
        }
        let fresh = w.dirty.fresh();
        let dirty = std::mem::replace(&mut w.dirty, fresh);
        let (new_size, page_size) = (w.size, w.page_size);
        let result = self.upload(st, dirty, new_size, page_size);
        if let Some(w) = st.write.as_mut() {
            w.size = st.size;
            w.page_size = st.page_size;
        }
        if result.as_ref().is_ok_and(|uploaded| *uploaded) {
            self.stats.commits.fetch_add(1, Relaxed);
        }
        result.map(drop)
    }

    fn upload(
        &self,
        st: &mut State,
        mut dirty: DirtyPages,
        new_size: u32,
        page_size: u32,
    ) -> Result<bool> {
        if st.page_size != 0 && st.page_size != page_size {
            return Err(Error::Unsupported(format!(
                "database {:?}: changing the page size from {} to {page_size} is not supported",
                self.name, st.page_size
            )));
        }
        let base = Base {
            pos: st.pos,
            size: if st.pos.is_zero() { 0 } else { st.size },
            page_size,
        };
        let mut ltx = SpillBuf::new(self.spill.clone());
        let Some(mut built) = self.build(st, &base, &dirty, new_size, &mut ltx)? else {
            return Ok(false);
        };
        if !base.pos.is_zero() {
            let old1 = self.committed_pages(st, &[Pgno::ONE])?.remove(&Pgno::ONE);
            let mut new1 = vec![0u8; page_size as usize];
            let page1 = if dirty.get(Pgno::ONE, &mut new1)? {
                Some(new1)
            } else {
                old1.clone()
            };
            if let Some(p1) = commit::bump_change_counter(old1.as_ref(), page1.as_ref()) {
                // SQLite did not move the change counter (exclusive locking mode): move it, or
                // other processes' SQLite would keep stale pages in its own cache.
                dirty.insert(Pgno::ONE, &p1)?;
                ltx = SpillBuf::new(self.spill.clone());
                built = self
                    .build(st, &base, &dirty, new_size, &mut ltx)?
                    .expect("page 1 changed");
            }
        }
        self.refresh_lease();
        let lease_id = self
            .lease
            .lock()
            .as_ref()
            .filter(|l| l.is_live())
            .map(|l| l.id.clone());
        let lease_id = lease_id.ok_or_else(|| Error::NoLease(self.name.clone()))?;
        self.stats.requests.fetch_add(1, Relaxed);
        if let Err(e) = self.ship(base.pos, built.pos, &lease_id, &ltx) {
            if matches!(e, Error::CommitUnknown { .. }) {
                st.unsettled = Some(built.pos);
            }
            // Moved elsewhere, or unknown: the next transaction must learn the store's position.
            if matches!(
                e,
                Error::Client(super::client::ClientError::PosMismatch { .. })
                    | Error::CommitUnknown { .. }
            ) {
                st.stale = true;
            }
            if let Error::Client(c) = &e
                && matches!(
                    c.api_code(),
                    Some(ErrorCode::NoLease | ErrorCode::LeaseMismatch)
                )
            {
                // The store no longer knows our lease: later writes need a new one.
                tracing::warn!(db = %self.name, "the write lease was lost: {c}");
                *self.lease.lock() = None;
            }
            return Err(e);
        }
        tracing::debug!(db = %self.name, pos = %built.pos, pages = built.pages, bytes = ltx.len(), "committed");
        drop(ltx);
        if st.page_size == 0 {
            st.cache.clear()?;
        }
        st.cache.truncate(built.size);
        st.cache.set_pos(built.pos);
        (st.pos, st.size, st.page_size, st.exists, st.size_known) =
            (built.pos, built.size, page_size, true, true);
        self.cache_committed(st, &dirty, base.size, built.size);
        Ok(true)
    }

    /// [`commit::build`] with the committed pages read through the cache.
    fn build(
        &self,
        st: &mut State,
        base: &Base,
        dirty: &DirtyPages,
        new_size: u32,
        out: &mut SpillBuf,
    ) -> Result<Option<commit::Built>> {
        let mut committed = |pgnos: &[Pgno]| self.committed_pages(st, pgnos);
        commit::build(base, dirty, new_size, &mut committed, out)
    }

    /// Puts a committed transaction's pages into the cache. One that spilled to disk is too
    /// large to be worth it: its pages only leave the cache, where older copies may sit.
    fn cache_committed(&self, st: &mut State, dirty: &DirtyPages, old_size: u32, size: u32) {
        let bounds = self.bounds();
        let mut page = vec![0u8; st.page_size as usize];
        let mut at = dirty.first_from(Pgno::ONE);
        while let Some(p) = at.filter(|p| p.0 <= size) {
            at = dirty.first_from(p.plus(1));
            if dirty.is_spilled() {
                st.cache.remove(p);
                continue;
            }
            let stored = match dirty.get(p, &mut page) {
                Ok(_) => st.cache.put(p, &page, bounds).map_err(Error::from),
                Err(e) => Err(e.into()),
            };
            if let Err(e) = stored {
                tracing::warn!(db = %self.name, "{e}");
                st.cache.remove(p);
            }
        }
        if dirty.is_spilled() {
            return;
        }
        // Pages the database gained without SQLite writing them are zeros.
        page.fill(0);
        let lock = Pgno::lock_page(st.page_size);
        for p in Pgno::between(old_size, size).filter(|p| *p != lock && !dirty.contains(*p)) {
            if let Err(e) = st.cache.put(p, &page, bounds) {
                tracing::warn!(db = %self.name, "{e}");
                st.cache.remove(p);
            }
        }
    }
}
