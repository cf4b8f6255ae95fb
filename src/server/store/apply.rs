//! Accepting one LTX file (`POST /db/tx`): contiguity, lease, page size, incremental post-apply
//! checksum, growth without gaps, truncation and deletion.
//!
//! Invariant: the file is streamed through [`ltx::Reader`] inside one IMMEDIATE SQLite
//! transaction; any failure (decoder or store rule) returns before `COMMIT`, so a refused file
//! leaves no trace. It does not parse HTTP or spool bodies.

use std::cell::Cell;
use std::io::Read;
use std::rc::Rc;

use rusqlite::{Connection, Transaction};

use super::{
    DbKey, Store, StoreError, StoreResult, TxnRow, find_db, head, insert_db, insert_page,
    insert_txn, now_ms, page_checksum_at, page_version,
};
use crate::ltx::{self, EMPTY_CHECKSUM, checksum_xor, lock_page, page_checksum};
use crate::wire::Pos;

/// What an accepted file did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub pos: Pos,
    /// Page versions stored (pages identical to their previous version are not stored).
    pub pages_stored: u64,
}

/// Running state while the file's pages stream in.
struct Apply<'t> {
    tx: &'t Connection,
    db_id: i64,
    old: Option<TxnRow>,
    txid: u64,
    checksum: u64,
    grown: u32,
    stored: u64,
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
        let applied = self.write(|tx| {
            self.leases.check_write(key, lease)?;
            apply_in(tx, key, len, body)
        })?;
        self.notify();
        Ok(applied)
    }
}

fn old_commit(old: &Option<TxnRow>) -> u32 {
    old.as_ref().map_or(0, |t| t.commit)
}

/// Counts the bytes the LTX reader consumed, to detect data after the trailer.
struct Counted<R> {
    inner: R,
    n: Rc<Cell<u64>>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n.set(self.n.get() + n as u64);
        Ok(n)
    }
}

fn apply_in(tx: &Transaction, key: &DbKey, len: u64, body: impl Read) -> StoreResult<Applied> {
    let db_id = find_db(tx, key)?;
    let old = match db_id {
        Some(id) => head(tx, id)?,
        None => None,
    };
    let current = old.as_ref().map_or(Pos::ZERO, TxnRow::pos);
    let consumed = Rc::new(Cell::new(0));
    let counted = Counted {
        inner: std::io::BufReader::new(body),
        n: consumed.clone(),
    };
    let mut reader = ltx::Reader::new(counted).map_err(StoreError::BadFormat)?;
    let hdr = reader.header().clone();
    if hdr.max_txid > i64::MAX as u64 {
        // TXIDs are stored as SQLite integers (i64).
        let e = ltx::LtxError::Header(format!("max TXID {:016x} too large", hdr.max_txid));
        return Err(StoreError::BadFormat(e));
    }
    if hdr.min_txid != current.txid.0 + 1 || hdr.pre_apply_checksum != current.checksum.0 {
        return Err(StoreError::PosMismatch(current));
    }
    if let Some(o) = old
        .as_ref()
        .filter(|o| o.commit > 0 && o.page_size != hdr.page_size)
    {
        return Err(StoreError::BadHeader(format!(
            "page size mismatch: database has {}, file has {}",
            o.page_size, hdr.page_size
        )));
    }
    let db_id = match db_id {
        Some(id) => id,
        None => insert_db(tx, key)?,
    };
    let checksum = old.as_ref().map_or(EMPTY_CHECKSUM, |o| o.post_apply);
    let mut st = Apply {
        tx,
        db_id,
        old,
        txid: hdr.max_txid,
        checksum,
        grown: 0,
        stored: 0,
    };
    let mut buf = vec![0u8; hdr.page_size as usize];
    while let Some(pgno) = reader.next_page(&mut buf).map_err(StoreError::BadFormat)? {
        st.page(pgno, &buf)?;
    }
    let trailer = reader.finish().map_err(StoreError::BadFormat)?;
    if consumed.get() != len {
        return Err(StoreError::BadFormat(ltx::LtxError::TrailingData));
    }
    st.check_growth(hdr.commit, hdr.page_size)?;
    st.truncate(hdr.commit, hdr.page_size)?;
    if st.checksum != trailer.post_apply_checksum {
        return Err(StoreError::BadChecksum {
            file: trailer.post_apply_checksum,
            computed: st.checksum,
        });
    }
    let row = TxnRow {
        min_txid: hdr.min_txid,
        max_txid: hdr.max_txid,
        page_size: hdr.page_size,
        commit: hdr.commit,
        timestamp_ms: hdr.timestamp_ms,
        pre_apply: hdr.pre_apply_checksum,
        post_apply: trailer.post_apply_checksum,
        created_ms: now_ms(),
    };
    insert_txn(tx, db_id, &row)?;
    Ok(Applied {
        pos: row.pos(),
        pages_stored: st.stored,
    })
}

impl Apply<'_> {
    /// Folds one new page into the checksum and stores it unless it equals the previous version.
    fn page(&mut self, pgno: u32, data: &[u8]) -> StoreResult<()> {
        let new_ck = page_checksum(pgno, data);
        if pgno <= old_commit(&self.old) {
            let (old_ck, old_data) = page_version(self.tx, self.db_id, pgno, u64::MAX >> 1)?
                .ok_or(StoreError::NoPrevPage(pgno))?;
            if old_ck == new_ck && old_data == data {
                return Ok(());
            }
            self.checksum = checksum_xor(self.checksum, old_ck);
        } else {
            self.grown += 1;
        }
        self.checksum = checksum_xor(self.checksum, new_ck);
        insert_page(self.tx, self.db_id, pgno, self.txid, new_ck, data)?;
        self.stored += 1;
        Ok(())
    }

    /// Growing needs every page in `(old commit, new commit]` except the lock page.
    fn check_growth(&self, commit: u32, page_size: u32) -> StoreResult<()> {
        let old = old_commit(&self.old);
        if commit <= old {
            return Ok(());
        }
        let lock = lock_page(page_size);
        let expected = commit - old - u32::from(lock > old && lock <= commit);
        if self.grown < expected {
            return Err(StoreError::MissingPages {
                old,
                new: commit,
                missing: expected - self.grown,
            });
        }
        Ok(())
    }

    /// Shrinking removes pages `(new commit, old commit]` from the checksum.
    fn truncate(&mut self, commit: u32, page_size: u32) -> StoreResult<()> {
        let old = old_commit(&self.old);
        let lock = lock_page(page_size);
        for pgno in (commit + 1..=old).filter(|&p| p != lock) {
            let ck = page_checksum_at(self.tx, self.db_id, pgno, u64::MAX >> 1)?
                .ok_or(StoreError::NoPrevPage(pgno))?;
            self.checksum = checksum_xor(self.checksum, ck);
        }
        Ok(())
    }
}
