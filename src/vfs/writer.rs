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
use crate::wire::{ErrorCode, Pos};

impl Database {
    /// Writes whole pages of the main database file inside the connection's write transaction.
    pub fn write(&self, me: ConnId, offset: u64, data: &[u8]) -> Result<()> {
        let mut st = self.state.lock();
        if st.shm.mapped(me) {
            drop(st);
            return self.checkpoint_write(offset, data);
        }
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
    /// A connection that took EXCLUSIVE in WAL mode and left it (`PRAGMA journal_mode`) starts
    /// one here, under the same checks as at RESERVED.
    fn own_write<'s>(&self, st: &'s mut State, me: ConnId) -> Result<&'s mut WriteTxn> {
        if st.write.is_none() && st.locks.writes(me) && !st.shm.mapped(me) {
            self.check_writable(st)?;
            self.start_write(st, me);
        }
        st.write
            .as_mut()
            .filter(|w| w.owner == me)
            .ok_or_else(|| Error::NoLease(self.name.clone()))
    }

    /// Truncates the main database file inside the write transaction (VACUUM, auto-vacuum).
    pub fn truncate(&self, me: ConnId, bytes: u64) -> Result<()> {
        let mut st = self.state.lock();
        if st.shm.mapped(me) {
            drop(st);
            return self.checkpoint_truncate(bytes);
        }
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
        Ok(st.main_size() as u64 * st.page_size as u64)
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
        let prepared = {
            let mut committed = |pgnos: &[Pgno]| self.committed_pages(st, pgnos);
            self.prepare(&base, &mut dirty, new_size, &mut committed)?
        };
        let Some((built, ltx)) = prepared else {
            return Ok(false);
        };
        let lease_id = self.live_lease()?;
        self.stats.requests.fetch_add(1, Relaxed);
        if let Err(e) = self.ship(base.pos, built.pos, &lease_id, &ltx) {
            return Err(self.ship_failed(st, e, built.pos));
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

    /// The LTX of a transaction from `base` to the pages of `dirty` and `new_size`, or `None`
    /// when it changes nothing. `committed` gives the content of pages at `base`. Page 1's
    /// change counter is moved when SQLite left it (exclusive locking mode, WAL mode): the
    /// patched page 1 is then in `dirty`.
    pub(super) fn prepare(
        &self,
        base: &Base,
        dirty: &mut DirtyPages,
        new_size: u32,
        committed: &mut commit::Committed<'_>,
    ) -> Result<Option<(commit::Built, SpillBuf)>> {
        let mut ltx = SpillBuf::new(self.spill.clone());
        let Some(mut built) = commit::build(base, dirty, new_size, committed, &mut ltx)? else {
            return Ok(None);
        };
        if !base.pos.is_zero() {
            let old1 = committed(&[Pgno::ONE])?.remove(&Pgno::ONE);
            let mut new1 = vec![0u8; base.page_size as usize];
            let page1 = if dirty.get(Pgno::ONE, &mut new1)? {
                Some(new1)
            } else {
                old1.clone()
            };
            if let Some(p1) = commit::bump_change_counter(old1.as_ref(), page1.as_ref()) {
                // Without a moved change counter, other processes' SQLite would keep stale
                // pages in its own cache.
                dirty.insert(Pgno::ONE, &p1)?;
                ltx = SpillBuf::new(self.spill.clone());
                built = commit::build(base, dirty, new_size, committed, &mut ltx)?
                    .expect("page 1 changed");
            }
        }
        Ok(Some((built, ltx)))
    }

    /// The id of the live write lease, renewed first when due.
    pub(super) fn live_lease(&self) -> Result<String> {
        self.refresh_lease();
        let lease_id = self
            .lease
            .lock()
            .as_ref()
            .filter(|l| l.is_live())
            .map(|l| l.id.clone());
        lease_id.ok_or_else(|| Error::NoLease(self.name.clone()))
    }

    /// What a failed upload of the commit to `after` means for the database; returns the error.
    pub(super) fn ship_failed(&self, st: &mut State, e: Error, after: Pos) -> Error {
        if matches!(e, Error::CommitUnknown { .. }) {
            st.unsettled = Some(after);
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
        e
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
