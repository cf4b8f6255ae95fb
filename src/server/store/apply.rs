//! Accepting one LTX file (`POST /db/tx`): the lease check, then [`super::verify::ltx`] and the
//! commit.
//!
//! Invariant: in local mode a refused file leaves no trace and an accepted one is durable before
//! the reply. A file of up to [`commitlog::MAX_PAYLOAD`] is verified and stored in the open
//! batch of small transactions (an IMMEDIATE SQLite transaction, [`super::writer`]), then its
//! record is synced to the commit log; the batch commits after the reply, without a sync. A
//! refusal after it stored rows rolls the batch back and applies the batch's transactions again
//! from the log. A larger file is verified and stored in an IMMEDIATE transaction of its own,
//! committed with a sync. It does not parse HTTP or spool bodies.

use std::io::Read;

use super::commitlog::{self, Staged};
use super::publish::LeaseRule;
use super::{DbKey, Store, StoreResult, TxnRow, commit_rows, synchronous, verify};
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
        let (row, stored) = match self.remote() {
            Some(r) => {
                // The first TXID tells whether the client is ahead of this server.
                let mut body = body;
                let mut first = [0u8; crate::ltx::HEADER_SIZE];
                let n = read_up_to(&mut body, &mut first)?;
                let min = verify::ltx_header(&first[..n]).ok().map(|h| h.min_txid);
                let body = (&first[..n]).chain(body);
                let rule = LeaseRule::Header(lease);
                self.commit_bucketed(r, key, rule, min, false, |head, sink| {
                    verify::ltx(head, len, body, sink)
                })?
            }
            None => self.commit_local(key, lease, len, body)?,
        };
        Ok(Applied {
            pos: row.pos(),
            pages_stored: stored,
        })
    }
}

impl Store {
    /// Local mode: verifies and commits one LTX file, through the commit log when it takes it.
    fn commit_local(
        &self,
        key: &DbKey,
        lease: Option<&str>,
        len: u64,
        mut body: impl Read,
    ) -> StoreResult<(TxnRow, u64)> {
        let mut conn = self.w.lock_batch();
        let mut guard = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let log = guard.as_mut().expect("a local store has a commit log");
        let staged = log.stage(key, &mut body, len)?;
        if staged == Staged::Logged {
            self.leases.check_write(key, lease)?;
            self.w.begin(&mut conn)?;
            let c = match self.write_logged(&conn, log, key, len) {
                Ok(c) => c,
                Err(e) => {
                    drop(guard);
                    self.w.reapply(&mut conn, self.data_dir(), &self.local());
                    return Err(e);
                }
            };
            // Durable: acknowledged from here. Its SQLite commit, which makes it visible, comes
            // after the reply ([`super::writer`]).
            log.committed();
            drop(guard);
            self.w.defer(conn, &self.finisher);
            return Ok((c.row, c.stored));
        }
        // A synced commit of its own, after the open batch.
        self.w.finish(&mut conn);
        synchronous(&conn, true)?;
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        self.leases.check_write(key, lease)?;
        let c = commit_rows(&tx, key, &self.local(), None, |head, sink| {
            verify::ltx(head, len, body, sink)
        })?;
        tx.commit()?;
        if staged == Staged::Full {
            // That synced commit made every logged one durable in `store.db`.
            log.restart();
        }
        drop(guard);
        drop(conn);
        self.w.committed();
        Ok((c.row, c.stored))
    }

    /// Writes the staged record's transaction into the open transaction on `conn`, then the
    /// record itself, durably. On an error the caller rolls back.
    fn write_logged(
        &self,
        conn: &rusqlite::Connection,
        log: &mut commitlog::CommitLog,
        key: &DbKey,
        len: u64,
    ) -> StoreResult<super::Committed> {
        let c = commit_rows(conn, key, &self.local(), None, |head, sink| {
            verify::ltx(head, len, log.payload(), sink)
        })?;
        commitlog::set_lsn(conn, log.next_lsn())?;
        if let Err(e) = log.append() {
            log.undo();
            return Err(e.into());
        }
        Ok(c)
    }
}

/// Reads until `buf` is full or the reader ends; returns the bytes read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
