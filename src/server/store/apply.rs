//! Accepting one LTX file (`POST /db/tx`): the lease check, then [`super::verify::ltx`] and the
//! commit.
//!
//! Invariant: in local mode the file is verified and stored inside one IMMEDIATE SQLite
//! transaction, so a refused file leaves no trace and an accepted one is durable before the
//! reply. It does not parse HTTP or spool bodies.

use std::io::Read;

use super::{DbKey, Store, StoreResult, commit_rows, verify};
use crate::wire::Pos;

/// What an accepted file did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub pos: Pos,
    /// Page versions stored (pages identical to their previous version are not stored).
    pub pages_stored: u64,
}

impl Store {
    /// Verifies and appends one LTX file to `key`. `lease` is the `Lfsc-Lease-Id` header.
    pub fn apply_ltx(
        &self,
        key: &DbKey,
        lease: Option<&str>,
        len: u64,
        body: impl Read,
    ) -> StoreResult<Applied> {
        let (row, stored) = self.write(|tx| {
            self.leases.check_write(key, lease)?;
            commit_rows(tx, key, |head, sink| verify::ltx(head, len, body, sink))
        })?;
        self.notify();
        Ok(Applied {
            pos: row.pos(),
            pages_stored: stored,
        })
    }
}
