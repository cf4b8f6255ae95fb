//! WAL-mode databases: the private `-wal` file, its commits, and the main file under it.
//!
//! Owns [`Wal`], one per database in this process: the bytes of the `-wal` file (memory up to
//! `LITEVFS_TXN_MEMORY`, then an unlinked file in the cache directory; never seen by another
//! process), the committed frames of its current generation, and the main file as SQLite's
//! checkpoints left it. Its invariants:
//!
//! - A frame whose header carries a database size (a commit frame) is a commit point: when
//!   SQLite finishes writing it, the transaction's frames become one LTX, built by
//!   [`super::commit`] like any other commit, and the write returns only after the store
//!   accepted it. If the store refuses, the write fails and the frames are cut off the file, so
//!   no reader, and no recovery, ever sees them.
//! - The main file stays at the position it had when the WAL generation began ([`State::pos`],
//!   the cache's position) plus the pages checkpoints wrote (the overlay): readers whose
//!   snapshot is older than the newest commit read older pages from it. The store is ahead, at
//!   [`Wal::head`]. When SQLite starts the WAL over (header rewritten, file truncated or
//!   deleted), no reader needs the old main file any more: it becomes the head (`Database::fold`).
//! - Checkpoints are local: they upload nothing.
//!
//! Remote changes reach a WAL database only while no connection holds a wal-index lock; then
//! the private WAL is dropped and the wal-index restarted (`Database::drop_wal`).

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;

use parking_lot::MutexGuard;

use super::Pgno;
use super::commit::Base;
use super::database::{Database, State};
use super::error::{Error, Result};
use super::lock::ConnId;
use super::spill::{DirtyPages, SpillBuf};
use crate::wire::Pos;

/// Bytes of the WAL file header.
const WAL_HDR: u64 = 32;
/// Bytes of a frame header.
const FRAME_HDR: u64 = 24;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// The store's position after the last WAL commit, ahead of the main file's.
#[derive(Copy, Clone, Debug)]
pub struct Head {
    pub pos: Pos,
    /// Database size in pages at `pos`.
    pub size: u32,
}

/// The WAL of one database in this process.
#[derive(Default)]
pub struct Wal {
    /// The `-wal` file's bytes; `None` while it does not exist.
    pub file: Option<SpillBuf>,
    /// Page size of the current generation (from its header); 0 before a header.
    page_size: u32,
    salts: [u8; 8],
    /// End of the last commit frame of this generation (the header's end when none); 0
    /// before a header.
    committed_end: u64,
    /// The newest committed frame (its offset) of each page in this generation.
    index: HashMap<Pgno, u64>,
    /// Where the store is after this generation's commits; `None` before the first.
    pub head: Option<Head>,
    /// Smallest database size since the main file's position: a page past it that no frame
    /// holds is zeros at the head.
    low: Option<u32>,
    /// Page 1 as the store holds it at the head (its change counter moved by the commit).
    page1: Option<Vec<u8>>,
    /// Pages checkpoints wrote into the main file since its position.
    overlay: Option<DirtyPages>,
    /// Main file size in pages after checkpoints (`None`: the position's size), and the
    /// smallest it was: pages past that and not in the overlay are zeros.
    main_size: Option<u32>,
    main_low: Option<u32>,
}

impl Wal {
    fn frame_size(&self) -> u64 {
        FRAME_HDR + u64::from(self.page_size)
    }

    /// When a write of `len` bytes at `offset` completes a commit frame of a new transaction:
    /// the transaction's frames (`committed_end..end`) and the database size it commits.
    fn completes_commit(&self, offset: u64, len: u64) -> Result<Option<(u64, u64, u32)>> {
        let (Some(f), true) = (self.file.as_ref(), self.page_size != 0) else {
            return Ok(None);
        };
        let end = offset + len;
        let fsz = self.frame_size();
        if offset < WAL_HDR || (end - WAL_HDR) % fsz != 0 || end - fsz < self.committed_end {
            return Ok(None);
        }
        let mut h = [0u8; FRAME_HDR as usize];
        // A transaction that overwrote some of its frames in place writes its frames with zero
        // salts and checksums, and fills them in after the commit frame (walRewriteChecksums):
        // those are frames of this generation too.
        if f.read_at(end - fsz, &mut h)? < h.len() {
            return Ok(None);
        }
        let rechecksummed = h[8..24].iter().all(|b| *b == 0);
        if h[8..16] != self.salts && !rechecksummed {
            return Ok(None);
        }
        Ok(match be32(&h, 4) {
            0 => None,
            size => Some((self.committed_end, end, size)),
        })
    }

    /// The first commit frame past the last commit, among the frames of this generation that
    /// follow it: the frames it ends (`committed_end..end`) and the size it commits.
    fn next_commit(&self) -> Result<Option<(u64, u64, u32)>> {
        let (Some(f), true) = (
            self.file.as_ref(),
            self.page_size != 0 && self.committed_end != 0,
        ) else {
            return Ok(None);
        };
        let mut at = self.committed_end;
        let mut h = [0u8; FRAME_HDR as usize];
        while at + self.frame_size() <= f.len() {
            f.read_at(at, &mut h)?;
            if h[8..16] != self.salts && h[8..24].iter().any(|b| *b != 0) {
                return Ok(None);
            }
            at += self.frame_size();
            if be32(&h, 4) != 0 {
                return Ok(Some((self.committed_end, at, be32(&h, 4))));
            }
        }
        Ok(None)
    }

    /// The data of the frame at `offset`.
    fn frame(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let f = self.file.as_ref().expect("frames live in the file");
        f.read_at(offset + FRAME_HDR, buf)?;
        Ok(())
    }
}

impl State {
    /// The position the store is at as far as this process knows: the head of the WAL's
    /// commits, or the main file's position.
    pub fn store_pos(&self) -> Pos {
        self.walf.head.map_or(self.pos, |h| h.pos)
    }

    /// Main file size in pages as SQLite sees it outside a rollback write transaction.
    pub fn main_size(&self) -> u32 {
        self.walf.main_size.unwrap_or(self.size)
    }

    /// Nobody reads or writes: no file lock but the SHARED that WAL-mode connections keep
    /// between transactions, and no wal-index lock. Only then may the database move.
    pub fn idle(&self) -> bool {
        !self.locks.reserved()
            && self.locks.shared_only_by(|c| self.shm.mapped(c))
            && self.shm.unlocked()
    }

    /// Page `pgno` of the main file when checkpoints changed it: `Some` with its content
    /// (zeros for a page cut off and grown back), `None` to read the position's page.
    pub fn main_page(&self, pgno: Pgno, page_size: u32) -> Result<Option<Vec<u8>>> {
        let mut buf = vec![0u8; page_size as usize];
        if let Some(o) = &self.walf.overlay
            && o.get(pgno, &mut buf)?
        {
            return Ok(Some(buf));
        }
        if self.walf.main_low.is_some_and(|low| pgno.0 > low) {
            return Ok(Some(buf));
        }
        Ok(None)
    }

    /// Whether checkpoints changed page `pgno` of the main file.
    pub fn main_changed(&self, pgno: Pgno) -> bool {
        self.walf.overlay.as_ref().is_some_and(|o| o.contains(pgno))
            || self.walf.main_low.is_some_and(|low| pgno.0 > low)
    }
}

impl Database {
    /// SQLite opens the `-wal` file (creating it when missing).
    pub fn wal_open(&self) {
        let mut st = self.state.lock();
        if st.walf.file.is_none() {
            st.walf.file = Some(SpillBuf::new(self.spill.clone()));
        }
    }

    pub fn wal_exists(&self) -> bool {
        self.state.lock().walf.file.is_some()
    }

    pub fn wal_len(&self) -> u64 {
        self.state
            .lock()
            .walf
            .file
            .as_ref()
            .map_or(0, SpillBuf::len)
    }

    pub fn wal_read(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let st = self.state.lock();
        Ok(match &st.walf.file {
            Some(f) => f.read_at(offset, buf)?,
            None => 0,
        })
    }

    /// A write to the `-wal` file. A header starts a new generation; a completed commit frame
    /// commits (see the module documentation).
    pub fn wal_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut st = self.state.lock();
        let header = offset == 0 && data.len() as u64 >= WAL_HDR;
        let first_frame = !header && st.walf.committed_end != 0 && offset == st.walf.committed_end;
        if header || first_frame {
            // A write transaction's first write: it needs the lease and an up-to-date WAL.
            self.check_writable(&st)?;
        }
        if header {
            self.fold(&mut st);
        }
        if st.walf.file.is_none() {
            st.walf.file = Some(SpillBuf::new(self.spill.clone()));
        }
        st.walf
            .file
            .as_mut()
            .expect("created")
            .write_at(offset, data)?;
        if header {
            let w = &mut st.walf;
            w.page_size = be32(data, 8);
            w.salts.copy_from_slice(&data[16..24]);
            w.committed_end = WAL_HDR;
            return Ok(());
        }
        let Some((start, end, size)) = st.walf.completes_commit(offset, data.len() as u64)? else {
            return Ok(());
        };
        let r = self.wal_commit(&mut st, start, end, size);
        if r.is_err()
            && let Some(f) = st.walf.file.as_mut()
        {
            // No trace of the failed transaction: neither a reader nor a recovery sees it.
            if let Err(e) = f.set_len(start) {
                tracing::warn!(db = %self.name, "{e}");
            }
        }
        r
    }

    /// SQLite truncates the `-wal` file; to zero only once every frame is in the main file.
    pub fn wal_truncate(&self, size: u64) -> Result<()> {
        let mut st = self.state.lock();
        if size == 0 {
            self.fold(&mut st);
            st.walf.committed_end = 0;
        }
        if let Some(f) = st.walf.file.as_mut() {
            f.set_len(size)?;
        }
        Ok(())
    }

    /// SQLite deletes the `-wal` file (the last connection closed it after a full checkpoint,
    /// or the journal mode leaves WAL).
    pub fn wal_delete(&self) {
        let mut st = self.state.lock();
        self.fold(&mut st);
        st.walf.committed_end = 0;
        st.walf.file = None;
        st.shm.leave_heap_mode();
    }

    /// Commits the frames `start..end` of the WAL, which end with a commit frame giving the
    /// database `new_size` pages: one LTX uploaded, the state lock released meanwhile so that
    /// readers go on. Checkpoints cannot run into it: the writer holds the WAL write lock.
    fn wal_commit(
        &self,
        st: &mut MutexGuard<State>,
        start: u64,
        end: u64,
        new_size: u32,
    ) -> Result<()> {
        let ps = st.walf.page_size;
        if st.page_size != 0 && st.page_size != ps {
            return Err(Error::Unsupported(format!(
                "database {:?}: changing the page size from {} to {ps} is not supported",
                self.name, st.page_size
            )));
        }
        let mut dirty = DirtyPages::new(self.spill.clone());
        let mut frames = Vec::new();
        let (fsz, mut page, mut hdr) = (
            st.walf.frame_size(),
            vec![0u8; ps as usize],
            [0u8; FRAME_HDR as usize],
        );
        {
            let f = st.walf.file.as_ref().expect("a commit frame was written");
            let mut at = start;
            while at < end {
                f.read_at(at, &mut hdr)?;
                f.read_at(at + FRAME_HDR, &mut page)?;
                let pgno = Pgno(be32(&hdr, 0));
                dirty.insert(pgno, &page)?;
                frames.push((pgno, at));
                at += fsz;
            }
        }
        let base = match st.walf.head {
            Some(h) => Base {
                pos: h.pos,
                size: h.size,
                page_size: ps,
            },
            None => Base {
                pos: st.pos,
                size: if st.pos.is_zero() { 0 } else { st.size },
                page_size: ps,
            },
        };
        let prepared = {
            let mut committed = |pgnos: &[Pgno]| self.wal_committed(st, pgnos);
            self.prepare(&base, &mut dirty, new_size, &mut committed)?
        };
        let after = match prepared {
            None => None,
            Some((built, ltx)) => {
                let lease_id = self.live_lease()?;
                self.stats.requests.fetch_add(1, Relaxed);
                let shipped =
                    MutexGuard::unlocked(st, || self.ship(base.pos, built.pos, &lease_id, &ltx));
                if let Err(e) = shipped {
                    return Err(self.ship_failed(st, e, built.pos));
                }
                tracing::debug!(db = %self.name, pos = %built.pos, pages = built.pages, bytes = ltx.len(), "committed from the WAL");
                self.stats.commits.fetch_add(1, Relaxed);
                Some(built.pos)
            }
        };
        let mut p1 = vec![0u8; ps as usize];
        let page1 = dirty.get(Pgno::ONE, &mut p1)?.then_some(p1);
        let main_size = st.size;
        let w = &mut st.walf;
        for (p, at) in frames {
            w.index.insert(p, at);
        }
        w.index.retain(|p, _| p.0 <= new_size);
        w.committed_end = end;
        if let Some(pos) = after {
            w.low = Some(w.low.unwrap_or(main_size).min(new_size));
            w.head = Some(Head {
                pos,
                size: new_size,
            });
            if page1.is_some() {
                w.page1 = page1;
            }
            st.exists = true;
            // The poller may have offered this very commit while the upload went on, from the
            // position before it: that change set is obsolete.
            if st.pending.as_ref().is_some_and(|p| p.from != pos) {
                st.pending = None;
            }
        }
        Ok(())
    }

    /// Committed content at the head of the pages asked for: page 1 as uploaded, the newest
    /// committed frame, zeros for a page the database gained without a write, else the main
    /// file's position (cache, then the store).
    fn wal_committed(&self, st: &mut State, pgnos: &[Pgno]) -> Result<HashMap<Pgno, Vec<u8>>> {
        let ps = st.walf.page_size as usize;
        let low = st.walf.low.unwrap_or(st.size).min(st.size);
        let mut out = HashMap::with_capacity(pgnos.len());
        let mut rest = Vec::new();
        for &p in pgnos {
            if p == Pgno::ONE
                && let Some(p1) = &st.walf.page1
            {
                out.insert(p, p1.clone());
            } else if let Some(at) = st.walf.index.get(&p) {
                let mut buf = vec![0u8; ps];
                st.walf.frame(*at, &mut buf)?;
                out.insert(p, buf);
            } else if p.0 > low {
                out.insert(p, vec![0u8; ps]);
            } else {
                rest.push(p);
            }
        }
        out.extend(self.committed_pages(st, &rest)?);
        Ok(out)
    }

    /// A checkpoint writes page frames into the main file: local, the store has them already.
    pub fn checkpoint_write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let mut st = self.state.lock();
        let ps = u64::from(st.walf.page_size.max(st.page_size));
        if ps == 0 || offset % ps != 0 || data.len() as u64 != ps {
            return Err(Error::Unsupported(format!(
                "database {:?}: a checkpoint write of {} bytes at offset {offset} is not one whole page of {ps} bytes",
                self.name,
                data.len()
            )));
        }
        let pgno = Pgno((offset / ps + 1) as u32);
        let size = st.main_size().max(pgno.0);
        let w = &mut st.walf;
        w.overlay
            .get_or_insert_with(|| DirtyPages::new(self.spill.clone()))
            .insert(pgno, data)?;
        w.main_size = Some(size);
        Ok(())
    }

    /// A checkpoint truncates the main file (the database shrank).
    pub fn checkpoint_truncate(&self, bytes: u64) -> Result<()> {
        let mut st = self.state.lock();
        let ps = u64::from(st.walf.page_size.max(st.page_size));
        if ps == 0 {
            return Ok(());
        }
        let size = (bytes / ps) as u32;
        let low = st.walf.main_low.unwrap_or(st.size).min(size);
        let w = &mut st.walf;
        if let Some(o) = w.overlay.as_mut() {
            o.truncate(size)?;
        }
        (w.main_size, w.main_low) = (Some(size), Some(low));
        Ok(())
    }

    /// The WAL starts over (or goes): no reader needs the older main file, which becomes the
    /// head. The pages committed since leave the cache, and their newest content enters it.
    pub(super) fn fold(&self, st: &mut State) {
        let mut w = std::mem::take(&mut st.walf);
        if let Some(head) = w.head {
            let overlaid = w
                .overlay
                .iter()
                .flat_map(|o| o.range(Pgno::ONE, Pgno(u32::MAX), usize::MAX));
            let stale: Vec<Pgno> = w.index.keys().copied().chain(overlaid).collect();
            for p in stale.into_iter().chain([Pgno::ONE]) {
                st.cache.remove(p);
            }
            st.cache.truncate(head.size);
            st.cache.set_pos(head.pos);
            (st.pos, st.size, st.size_known, st.exists) = (head.pos, head.size, true, true);
            let bounds = self.bounds();
            let mut page = vec![0u8; w.page_size as usize];
            for (p, at) in &w.index {
                if *p != Pgno::ONE && w.frame(*at, &mut page).is_ok() {
                    let _ = st.cache.put(*p, &page, bounds);
                }
            }
            if let Some(p1) = &w.page1 {
                let _ = st.cache.put(Pgno::ONE, p1, bounds);
            }
            tracing::debug!(db = %self.name, pos = %head.pos, "the WAL starts over; the main file is at its head");
        }
        // Nothing committed since the position: checkpoints wrote the position's own pages.
        st.walf.file = w.file.take();
    }

    /// Remote changes are about to be applied (nobody holds a wal-index lock): the private WAL
    /// and the checkpointed pages go, the wal-index restarts so that every connection drops its
    /// page cache. Returns the pages that differ from the main file's position, to drop from
    /// the cache.
    pub(super) fn drop_wal(&self, st: &mut State) -> Vec<Pgno> {
        let w = std::mem::take(&mut st.walf);
        let mut stale: Vec<Pgno> = w.index.keys().copied().collect();
        if let Some(o) = &w.overlay {
            stale.extend(o.range(Pgno::ONE, Pgno(u32::MAX), usize::MAX));
        }
        if w.head.is_some() {
            stale.push(Pgno::ONE);
        }
        if let Some(mut f) = w.file {
            if let Err(e) = f.set_len(0) {
                tracing::warn!(db = %self.name, "{e}");
            }
            st.walf.file = Some(f);
        }
        st.shm.restart(rand_salt());
        stale
    }

    /// The writer released the WAL write lock. Every commit frame it wrote was uploaded when
    /// it was written; one found past the last upload went undetected, which is a bug: it is
    /// uploaded now, late, and logged as an error, so the store never misses a transaction
    /// that readers of this process see.
    fn settle_wal(&self, st: &mut MutexGuard<State>) {
        loop {
            let Ok(Some((start, end, size))) = st.walf.next_commit() else {
                return;
            };
            tracing::error!(db = %self.name, "a WAL commit frame went undetected when it was written; uploading it now");
            if let Err(e) = self.wal_commit(st, start, end, size) {
                tracing::error!(db = %self.name, "{e}");
                return;
            }
        }
    }

    /// Connection `me` takes or releases wal-index locks. A read lock taken while nobody holds
    /// any starts a read transaction (sync if due, apply waiting changes); the last lock
    /// released lets waiting changes in.
    pub fn shm_lock(
        &self,
        me: ConnId,
        offset: u32,
        n: u32,
        lock: bool,
        exclusive: bool,
    ) -> Result<()> {
        let mut st = self.state.lock();
        if !lock {
            st.shm.unlock(me, offset, n, exclusive);
            if exclusive && offset == 0 {
                self.settle_wal(&mut st);
            }
            if st.idle() {
                self.apply_pending(&mut st);
                if st.pending.is_none() && st.cache.persist_if_due().is_err() {
                    tracing::debug!(db = %self.name, "could not write the cache index");
                }
            }
            return Ok(());
        }
        if !exclusive && offset as usize >= super::shm::READ0 && st.idle() {
            self.begin_read(&mut st)?;
        }
        st.shm
            .lock(me, offset, n, exclusive)
            .map_err(|_| Error::Busy)
    }
}

/// A new salt for a restarted wal-index.
fn rand_salt() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfs::spill::SpillConfig;

    /// A WAL of page size 512 with a header and frames `(pgno, commit size)`.
    fn wal(frames: &[(u32, u32)]) -> Wal {
        let dir = std::env::temp_dir();
        let mut f = SpillBuf::new(SpillConfig {
            dir,
            limit: 1 << 20,
        });
        let mut h = [0u8; WAL_HDR as usize];
        h[8..12].copy_from_slice(&512u32.to_be_bytes());
        h[16..24].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        f.write_at(0, &h).unwrap();
        let mut w = Wal {
            page_size: 512,
            salts: [1, 2, 3, 4, 5, 6, 7, 8],
            committed_end: WAL_HDR,
            ..Wal::default()
        };
        for (i, (pgno, commit)) in frames.iter().enumerate() {
            let at = WAL_HDR + i as u64 * w.frame_size();
            let mut fh = [0u8; FRAME_HDR as usize];
            fh[..4].copy_from_slice(&pgno.to_be_bytes());
            fh[4..8].copy_from_slice(&commit.to_be_bytes());
            fh[8..16].copy_from_slice(&w.salts);
            f.write_at(at, &fh).unwrap();
            f.write_at(at + FRAME_HDR, &[*pgno as u8; 512]).unwrap();
        }
        w.file = Some(f);
        w
    }

    #[test]
    fn a_commit_is_the_end_of_a_frame_whose_header_has_a_size() {
        let w = wal(&[(2, 0), (3, 0), (1, 9)]);
        let fsz = w.frame_size();
        let third = WAL_HDR + 2 * fsz;
        // The header of the commit frame alone, or a frame without a size: not yet.
        assert_eq!(w.completes_commit(third, FRAME_HDR).unwrap(), None);
        assert_eq!(w.completes_commit(WAL_HDR + FRAME_HDR, 512).unwrap(), None);
        // Its page data completes it: the transaction is every frame since the last commit.
        assert_eq!(
            w.completes_commit(third + FRAME_HDR, 512).unwrap(),
            Some((WAL_HDR, third + fsz, 9))
        );
        // A frame written whole in one write, too.
        assert_eq!(
            w.completes_commit(third, fsz).unwrap(),
            Some((WAL_HDR, third + fsz, 9))
        );
        // Frames of an earlier commit, rewritten (checksums), are no new commit.
        let later = Wal {
            committed_end: third + fsz,
            ..wal(&[(2, 0), (3, 0), (1, 9)])
        };
        assert_eq!(
            later.completes_commit(third + FRAME_HDR, 512).unwrap(),
            None
        );
    }

    #[test]
    fn frames_whose_checksums_come_later_are_commits() {
        // A transaction that overwrote frames in place writes zero salts and checksums first.
        let mut w = wal(&[(2, 0), (1, 5)]);
        let second = WAL_HDR + w.frame_size();
        let f = w.file.as_mut().unwrap();
        f.write_at(second + 8, &[0u8; 16]).unwrap();
        assert_eq!(
            w.completes_commit(second + FRAME_HDR, 512).unwrap(),
            Some((WAL_HDR, second + w.frame_size(), 5))
        );
    }

    #[test]
    fn a_commit_frame_past_the_last_commit_is_found() {
        let mut w = wal(&[(2, 0), (3, 0), (1, 9), (4, 0)]);
        let fsz = w.frame_size();
        assert_eq!(
            w.next_commit().unwrap(),
            Some((WAL_HDR, WAL_HDR + 3 * fsz, 9))
        );
        w.committed_end = WAL_HDR + 3 * fsz;
        assert_eq!(w.next_commit().unwrap(), None, "frames of no commit");
    }

    #[test]
    fn frames_of_another_generation_are_not_commits() {
        let mut w = wal(&[(1, 4)]);
        w.salts = [9; 8];
        assert_eq!(w.completes_commit(WAL_HDR + FRAME_HDR, 512).unwrap(), None);
        assert_eq!(w.next_commit().unwrap(), None);
    }
}
