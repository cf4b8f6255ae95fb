//! SQLite's file locks among the connections of this process to one database.
//!
//! Owns [`LockTable`]: which connection holds SHARED, RESERVED, PENDING and EXCLUSIVE, with the
//! transitions of SQLite's own unix VFS, so connections of one process never see a half-written
//! transaction. It does not coordinate processes: across hosts the write lease serialises
//! writers and each process reads its own pinned position.

use std::collections::HashSet;

pub use sqlite_plugin::flags::LockLevel;

/// Identifies one open main-database file (one SQLite connection).
pub type ConnId = u64;

/// The lock holders of one database in this process.
#[derive(Debug, Default)]
pub struct LockTable {
    shared: HashSet<ConnId>,
    reserved: Option<ConnId>,
    pending: Option<ConnId>,
    exclusive: Option<ConnId>,
}

/// Another connection's lock is in the way.
#[derive(Debug, PartialEq, Eq)]
pub struct Busy;

impl LockTable {
    /// No connection holds any lock: the database may move to a new position.
    pub fn is_idle(&self) -> bool {
        self.shared.is_empty()
    }

    /// Some connection holds RESERVED or more.
    pub fn reserved(&self) -> bool {
        self.reserved.is_some() || self.pending.is_some() || self.exclusive.is_some()
    }

    /// Every connection holding SHARED passes `f` (the WAL-mode ones, which keep it between
    /// transactions).
    pub fn shared_only_by(&self, f: impl Fn(ConnId) -> bool) -> bool {
        self.shared.iter().all(|c| f(*c))
    }

    /// Connection `me` holds RESERVED or more.
    pub fn writes(&self, me: ConnId) -> bool {
        [self.reserved, self.pending, self.exclusive].contains(&Some(me))
    }

    fn other(slot: Option<ConnId>, me: ConnId) -> bool {
        slot.is_some_and(|c| c != me)
    }

    /// Raises `me` from `from` to `to`; returns the level reached. On `Busy`, a connection
    /// asking for EXCLUSIVE keeps PENDING, as SQLite expects.
    pub fn lock(
        &mut self,
        me: ConnId,
        from: LockLevel,
        to: LockLevel,
    ) -> Result<LockLevel, (Busy, LockLevel)> {
        if to <= from {
            return Ok(from);
        }
        match to {
            LockLevel::Unlocked => Ok(from),
            LockLevel::Shared => {
                if Self::other(self.pending, me) || Self::other(self.exclusive, me) {
                    return Err((Busy, from));
                }
                self.shared.insert(me);
                Ok(LockLevel::Shared)
            }
            LockLevel::Reserved => {
                if Self::other(self.reserved, me)
                    || Self::other(self.pending, me)
                    || Self::other(self.exclusive, me)
                {
                    return Err((Busy, from));
                }
                self.reserved = Some(me);
                Ok(LockLevel::Reserved)
            }
            LockLevel::Pending | LockLevel::Exclusive => {
                if Self::other(self.pending, me)
                    || Self::other(self.exclusive, me)
                    || Self::other(self.reserved, me)
                {
                    return Err((Busy, from));
                }
                self.reserved = Some(me);
                self.pending = Some(me);
                if self.shared.iter().any(|c| *c != me) {
                    return Err((Busy, LockLevel::Pending));
                }
                self.exclusive = Some(me);
                Ok(LockLevel::Exclusive)
            }
        }
    }

    /// Lowers `me` to `to` (SHARED or NONE).
    pub fn unlock(&mut self, me: ConnId, to: LockLevel) {
        for slot in [&mut self.reserved, &mut self.pending, &mut self.exclusive] {
            if *slot == Some(me) {
                *slot = None;
            }
        }
        if to == LockLevel::Unlocked {
            self.shared.remove(&me);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use LockLevel::*;

    #[test]
    fn readers_block_exclusive_and_pending_blocks_readers() {
        let mut t = LockTable::default();
        assert_eq!(t.lock(1, Unlocked, Shared), Ok(Shared));
        assert_eq!(t.lock(2, Unlocked, Shared), Ok(Shared));
        assert_eq!(t.lock(1, Shared, Reserved), Ok(Reserved));
        assert_eq!(t.lock(2, Shared, Reserved), Err((Busy, Shared)));
        assert_eq!(t.lock(1, Reserved, Exclusive), Err((Busy, Pending)));
        assert_eq!(t.lock(3, Unlocked, Shared), Err((Busy, Unlocked)));
        t.unlock(2, Unlocked);
        assert_eq!(t.lock(1, Pending, Exclusive), Ok(Exclusive));
        assert!(!t.is_idle() && t.reserved());
        t.unlock(1, Shared);
        assert!(!t.reserved());
        t.unlock(1, Unlocked);
        assert!(t.is_idle());
    }
}
