//! The wal-index (`-shm`) of a WAL database, private to this process.
//!
//! Owns [`Shm`]: the 32 KiB regions SQLite maps (heap memory, never a file: no other process
//! or host ever needs them) and the eight WAL lock slots, shared and exclusive per connection,
//! with the conflicts of SQLite's unix VFS (`SQLITE_BUSY`, never waiting). It also writes a
//! fresh wal-index header when the database moves under the WAL ([`Shm::restart`]), so that
//! every connection's SQLite notices the change and drops its page cache. It does not know
//! what the WAL holds; [`super::wal`] does.

use std::collections::{HashMap, HashSet};
use std::ptr::NonNull;

use super::lock::ConnId;

/// Lock slots SQLite uses on the wal-index: WRITE, CKPT, RECOVER, READ(0..5).
pub const SLOTS: usize = 8;
/// The first read-mark slot (`WAL_READ_LOCK(0)`).
pub const READ0: usize = 3;

/// Bytes of one copy of the wal-index header (`WalIndexHdr`).
const HDR: usize = 48;
/// `READMARK_NOT_USED`.
const NOT_USED: u32 = 0xffff_ffff;

/// Locks one connection holds.
#[derive(Default, Debug, Clone, Copy)]
struct Held {
    shared: u8,
    exclusive: u8,
}

/// One database's wal-index in this process.
#[derive(Default)]
pub struct Shm {
    regions: Vec<Box<[u8]>>,
    /// Connections that mapped the wal-index (they are in WAL mode), with their locks.
    held: HashMap<ConnId, Held>,
    /// Connections in WAL mode with `locking_mode = EXCLUSIVE`: SQLite keeps their wal-index
    /// in its own heap and holds EXCLUSIVE on the database file instead.
    heap: HashSet<ConnId>,
}

/// Another connection's lock is in the way.
#[derive(Debug, PartialEq, Eq)]
pub struct ShmBusy;

impl Shm {
    /// Region `idx` (created, zeroed, when `extend`); `None` when absent and not extended.
    pub fn map(
        &mut self,
        me: ConnId,
        idx: usize,
        size: usize,
        extend: bool,
    ) -> Option<NonNull<u8>> {
        self.held.entry(me).or_default();
        if idx >= self.regions.len() {
            if !extend {
                return None;
            }
            while self.regions.len() <= idx {
                self.regions.push(vec![0u8; size].into_boxed_slice());
            }
        }
        NonNull::new(self.regions[idx].as_mut_ptr())
    }

    /// Connection `me` stops using the wal-index; its locks go. The last one frees the memory
    /// (a later connection rebuilds it from the WAL, as SQLite does after a restart).
    pub fn unmap(&mut self, me: ConnId) {
        self.heap.remove(&me);
        self.held.remove(&me);
        if self.held.is_empty() {
            self.regions.clear();
        }
    }

    /// Whether connection `me` is in WAL mode (its main-file writes are checkpoints).
    pub fn mapped(&self, me: ConnId) -> bool {
        self.held.contains_key(&me) || self.heap.contains(&me)
    }

    /// Connection `me` opens the WAL in exclusive locking mode.
    pub fn enter_heap_mode(&mut self, me: ConnId) {
        self.heap.insert(me);
    }

    /// The WAL is gone: exclusive-mode connections are back in rollback mode.
    pub fn leave_heap_mode(&mut self) {
        self.heap.clear();
    }

    /// The connections in WAL mode.
    pub fn users(&self) -> impl Iterator<Item = &ConnId> {
        self.held.keys()
    }

    /// No connection holds any wal-index lock: no read or write transaction, no checkpoint.
    pub fn unlocked(&self) -> bool {
        self.held
            .values()
            .all(|h| h.shared == 0 && h.exclusive == 0)
    }

    fn mask(offset: u32, n: u32) -> u8 {
        let (o, n) = (offset.min(SLOTS as u32), n.min(SLOTS as u32));
        (((1u16 << n) - 1) << o) as u8
    }

    /// Takes slots `offset..offset+n`, shared or exclusive, for `me`.
    pub fn lock(
        &mut self,
        me: ConnId,
        offset: u32,
        n: u32,
        exclusive: bool,
    ) -> Result<(), ShmBusy> {
        let m = Self::mask(offset, n);
        let others = self.held.iter().filter(|(c, _)| **c != me);
        let (mut sh, mut ex) = (0u8, 0u8);
        for (_, h) in others {
            sh |= h.shared;
            ex |= h.exclusive;
        }
        if ex & m != 0 || (exclusive && sh & m != 0) {
            return Err(ShmBusy);
        }
        let h = self.held.entry(me).or_default();
        if exclusive {
            h.exclusive |= m;
        } else {
            h.shared |= m;
        }
        Ok(())
    }

    /// Releases slots `offset..offset+n` of `me`.
    pub fn unlock(&mut self, me: ConnId, offset: u32, n: u32, exclusive: bool) {
        let m = Self::mask(offset, n);
        if let Some(h) = self.held.get_mut(&me) {
            if exclusive {
                h.exclusive &= !m;
            } else {
                h.shared &= !m;
            }
        }
    }

    /// Marks the WAL empty in the wal-index header, as SQLite's own restart of the WAL does,
    /// with a new change count and salts: every connection's next read transaction sees a
    /// changed header and drops its page cache, and reads the database file alone. Only called
    /// while no connection holds a wal-index lock. A header that was never written is left
    /// alone (the first reader builds it).
    pub fn restart(&mut self, salt: u32) {
        let Some(r) = self.regions.first_mut() else {
            return;
        };
        let mut h = [0u8; HDR];
        h.copy_from_slice(&r[..HDR]);
        if h[12] == 0 {
            return; // isInit
        }
        let get = |b: &[u8], o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().expect("4"));
        let put = |b: &mut [u8], o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_ne_bytes());
        let change = get(&h, 8).wrapping_add(1);
        put(&mut h, 8, change); // iChange
        put(&mut h, 16, 0); // mxFrame
        put(&mut h, 20, 0); // nPage: 0 means "the size of the database file"
        put(&mut h, 24, 0); // aFrameCksum
        put(&mut h, 28, 0);
        let salt1 = get(&h, 32).wrapping_add(1);
        put(&mut h, 32, salt1); // aSalt
        put(&mut h, 36, salt);
        let (s1, s2) = native_checksum(&h[..40]);
        put(&mut h, 40, s1);
        put(&mut h, 44, s2);
        // WalCkptInfo after the two header copies: nBackfill, aReadMark[5], aLock[8],
        // nBackfillAttempted.
        let ck = 2 * HDR;
        put(r, ck, 0);
        put(r, ck + 4, 0);
        put(r, ck + 8, 0);
        for i in 2..5 {
            put(r, ck + 4 + 4 * i, NOT_USED);
        }
        put(r, ck + 32, 0);
        // SQLite's connections read this memory through the pointers `map` gave them, without
        // a lock for the header (as readers of a unix -shm do while another process's writer
        // rewrites it). As SQLite itself does, the second copy goes first and the first after a
        // barrier; a reader that sees them differ, or a changed header after taking its read
        // lock, retries. Only called while no wal-index lock is held.
        r[HDR..2 * HDR].copy_from_slice(&h);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        r[..HDR].copy_from_slice(&h);
    }
}

/// SQLite's WAL checksum over native-order 32-bit words (`walChecksumBytes` with nativeCksum).
fn native_checksum(b: &[u8]) -> (u32, u32) {
    let (mut s1, mut s2) = (0u32, 0u32);
    for pair in b.chunks_exact(8) {
        let x0 = u32::from_ne_bytes(pair[..4].try_into().expect("4"));
        let x1 = u32::from_ne_bytes(pair[4..].try_into().expect("4"));
        s1 = s1.wrapping_add(x0).wrapping_add(s2);
        s2 = s2.wrapping_add(x1).wrapping_add(s1);
    }
    (s1, s2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_conflict_like_unix_shm() {
        let mut s = Shm::default();
        s.map(1, 0, 32768, true).unwrap();
        s.map(2, 0, 32768, false).unwrap();
        assert_eq!(s.lock(1, 3, 1, false), Ok(()));
        assert_eq!(s.lock(2, 3, 1, false), Ok(()), "readers share a slot");
        assert_eq!(
            s.lock(2, 0, 1, true),
            Ok(()),
            "the write lock is independent"
        );
        assert_eq!(s.lock(1, 0, 1, true), Err(ShmBusy));
        assert_eq!(s.lock(2, 3, 5, true), Err(ShmBusy), "1 reads on slot 3");
        assert!(!s.unlocked());
        s.unlock(1, 3, 1, false);
        s.unlock(2, 3, 1, false);
        s.unlock(2, 0, 1, true);
        assert!(s.unlocked());
        assert_eq!(s.lock(1, 1, 7, true), Ok(()));
        s.unmap(1);
        assert!(s.unlocked() && s.mapped(2) && !s.mapped(1));
    }

    #[test]
    fn restart_writes_a_valid_changed_header() {
        let mut s = Shm::default();
        let p = s.map(1, 0, 32768, true).unwrap();
        s.restart(5);
        // SAFETY: region 0 is 32768 bytes and owned by `s`, which is alive.
        let r = unsafe { std::slice::from_raw_parts(p.as_ptr(), 200) };
        assert!(r.iter().all(|b| *b == 0), "an uninitialised header stays");
        let mut h = [0u8; HDR];
        h[12] = 1;
        h[16..20].copy_from_slice(&7u32.to_ne_bytes());
        s.regions[0][..HDR].copy_from_slice(&h);
        s.restart(5);
        let r = &s.regions[0];
        assert_eq!(r[..HDR], r[HDR..2 * HDR]);
        assert_eq!(u32::from_ne_bytes(r[8..12].try_into().unwrap()), 1);
        assert_eq!(u32::from_ne_bytes(r[16..20].try_into().unwrap()), 0);
        let (s1, s2) = native_checksum(&r[..40]);
        assert_eq!(u32::from_ne_bytes(r[40..44].try_into().unwrap()), s1);
        assert_eq!(u32::from_ne_bytes(r[44..48].try_into().unwrap()), s2);
    }
}
