//! Verifying one transaction against its database's head: the single copy of the rules every
//! accepted transaction obeys, whatever produced it (an LTX file from `POST /db/tx`, a SQLite
//! image from `POST /db/upload`, the image of an older position for a restore) and wherever it
//! is then committed (rows of `store.db`, or an object in the bucket).
//!
//! Rules: contiguity (the file starts right after the head, with its checksum), one page size
//! per non-empty database, TXIDs that fit SQLite integers, the post-apply checksum recomputed
//! incrementally (old versions out, new ones in, truncated pages out), growth without gaps,
//! pages identical to their previous version not stored. Verification writes nothing: page
//! versions go to a [`PageSink`], and the caller commits the returned [`TxnRow`] only if
//! everything here succeeded.

use std::cell::Cell;
use std::io::Read;
use std::rc::Rc;

use rusqlite::Connection;

use super::{Bytes, StoreError, StoreResult, TxnRow, page_ck, page_version};
use crate::ltx::{self, EMPTY_CHECKSUM, checksum_xor, lock_page, page_checksum};
use crate::wire::Pos;

/// Where a transaction's stored page versions go, in increasing page order.
pub(super) trait PageSink {
    /// Called once, before any page, with the TXID the versions belong to.
    fn begin(&mut self, txid: u64, page_size: u32) -> StoreResult<()>;
    /// One page version to store (pages equal to their previous version never arrive).
    fn page(&mut self, pgno: u32, ck: u64, data: &[u8]) -> StoreResult<()>;
}

/// The head of a database, read through one store transaction: what a new transaction is
/// verified against.
pub(super) struct Head<'t> {
    pub tx: &'t Connection,
    /// `None` for a database that does not exist yet.
    pub db_id: Option<i64>,
    /// The newest transaction; `None` for a database without data.
    pub row: Option<TxnRow>,
    /// Reads page versions whose bytes are not in `store.db` (bucket mode).
    pub fetch: &'t dyn super::Fetch,
}

impl Head<'_> {
    pub fn pos(&self) -> Pos {
        self.row.as_ref().map_or(Pos::ZERO, TxnRow::pos)
    }

    fn txid(&self) -> u64 {
        self.row.as_ref().map_or(0, |r| r.max_txid)
    }

    fn commit(&self) -> u32 {
        self.row.as_ref().map_or(0, |r| r.commit)
    }

    fn post_apply(&self) -> u64 {
        self.row.as_ref().map_or(EMPTY_CHECKSUM, |r| r.post_apply)
    }

    /// The page size a new transaction must have, if the database has one (non-empty).
    fn page_size(&self) -> Option<u32> {
        self.row
            .as_ref()
            .filter(|r| r.commit > 0)
            .map(|r| r.page_size)
    }

    /// The checksum of the head's version of `pgno` (which must exist).
    fn checksum(&self, pgno: u32) -> StoreResult<u64> {
        let db_id = self.db_id.ok_or(StoreError::NoPrevPage(pgno))?;
        page_ck(self.tx, db_id, pgno, self.txid())?.ok_or(StoreError::NoPrevPage(pgno))
    }

    /// The head's version of `pgno` compared with `data` (checksum `ck`); `None` if there is no
    /// such version. Bytes are compared, not only checksums: a page whose bytes changed is
    /// always stored.
    fn compare(&self, pgno: u32, ck: u64, data: &[u8]) -> StoreResult<Option<Old>> {
        let Some(db_id) = self.db_id else {
            return Ok(None);
        };
        let Some(v) = page_version(self.tx, db_id, pgno, self.txid(), self.fetch.bucket())? else {
            return Ok(None);
        };
        let same = v.ck == ck
            && match &v.bytes {
                Bytes::Here(old) => old.as_slice() == data,
                Bytes::Remote(_) => self.fetch.bytes(self.tx, db_id, &v)? == data,
            };
        Ok(Some(Old { ck: v.ck, same }))
    }

    fn check_page_size(&self, page_size: u32, what: &str) -> StoreResult<()> {
        match self.page_size() {
            Some(ps) if ps != page_size => Err(StoreError::BadHeader(format!(
                "page size mismatch: database has {ps}, {what} has {page_size}"
            ))),
            _ => Ok(()),
        }
    }
}

/// The head's version of a page, compared with a new one.
struct Old {
    ck: u64,
    same: bool,
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

/// The first bytes of an LTX file, decoded (for callers that must look before verifying).
pub fn ltx_header(first: &[u8]) -> StoreResult<ltx::Header> {
    let hb: &[u8; ltx::HEADER_SIZE] = first
        .get(..ltx::HEADER_SIZE)
        .and_then(|b| b.try_into().ok())
        .ok_or(StoreError::BadFormat(ltx::LtxError::Truncated("header")))?;
    ltx::Header::decode(hb).map_err(StoreError::BadFormat)
}

/// Verifies one LTX file of `len` bytes; stored versions go to `sink`. Returns the transaction
/// (its `created_ms` is left 0: the caller stamps it when it commits).
pub(super) fn ltx(
    head: &Head,
    len: u64,
    body: impl Read,
    sink: &mut dyn PageSink,
) -> StoreResult<TxnRow> {
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
    let current = head.pos();
    if hdr.min_txid != current.txid.0 + 1 || hdr.pre_apply_checksum != current.checksum.0 {
        return Err(StoreError::PosMismatch(current));
    }
    head.check_page_size(hdr.page_size, "file")?;
    let mut acc = Accumulator::new(head, hdr.page_size);
    sink.begin(hdr.max_txid, hdr.page_size)?;
    let mut buf = vec![0u8; hdr.page_size as usize];
    while let Some(pgno) = reader.next_page(&mut buf).map_err(StoreError::BadFormat)? {
        acc.page(pgno, &buf, sink)?;
    }
    let trailer = reader.finish().map_err(StoreError::BadFormat)?;
    if consumed.get() != len {
        return Err(StoreError::BadFormat(ltx::LtxError::TrailingData));
    }
    acc.check_growth(hdr.commit)?;
    acc.truncate(hdr.commit)?;
    if acc.checksum != trailer.post_apply_checksum {
        return Err(StoreError::BadChecksum {
            file: trailer.post_apply_checksum,
            computed: acc.checksum,
        });
    }
    Ok(TxnRow {
        min_txid: hdr.min_txid,
        max_txid: hdr.max_txid,
        page_size: hdr.page_size,
        commit: hdr.commit,
        timestamp_ms: hdr.timestamp_ms,
        pre_apply: hdr.pre_apply_checksum,
        post_apply: trailer.post_apply_checksum,
        created_ms: 0,
    })
}

/// Verifies a whole database image (pages 1..=`commit` from `fill`, in order) as the next
/// transaction: a snapshot at TXID 1 for a database without data, otherwise head+1 storing only
/// the pages that changed. The lock page is never stored.
pub(super) fn image(
    head: &Head,
    page_size: u32,
    commit: u32,
    timestamp_ms: u64,
    fill: &mut dyn FnMut(u32, &mut [u8]) -> StoreResult<()>,
    sink: &mut dyn PageSink,
) -> StoreResult<TxnRow> {
    head.check_page_size(page_size, "image")?;
    let old_txid = head.txid();
    // TXIDs are stored as SQLite integers: past i64::MAX the new head would sort below the old.
    if old_txid >= i64::MAX as u64 {
        return Err(StoreError::BadInput(format!(
            "database is at TXID {old_txid:016x}, the largest there is: nothing can follow it"
        )));
    }
    let txid = old_txid + 1;
    sink.begin(txid, page_size)?;
    let lock = lock_page(page_size);
    let mut checksum = EMPTY_CHECKSUM;
    let mut buf = vec![0u8; page_size as usize];
    for pgno in 1..=commit {
        fill(pgno, &mut buf)?;
        if pgno == lock {
            continue;
        }
        let ck = page_checksum(pgno, &buf);
        checksum = checksum_xor(checksum, ck);
        if pgno <= head.commit() && head.compare(pgno, ck, &buf)?.is_some_and(|o| o.same) {
            continue;
        }
        sink.page(pgno, ck, &buf)?;
    }
    Ok(TxnRow {
        min_txid: if head.row.is_some() { txid } else { 1 },
        max_txid: txid,
        page_size,
        commit,
        timestamp_ms,
        pre_apply: if head.row.is_some() {
            head.post_apply()
        } else {
            0
        },
        post_apply: checksum,
        created_ms: 0,
    })
}

/// The incremental post-apply checksum of an LTX file while its pages stream in.
struct Accumulator<'h, 't> {
    head: &'h Head<'t>,
    page_size: u32,
    checksum: u64,
    /// Pages past the head's commit size seen so far.
    grown: u32,
}

impl<'h, 't> Accumulator<'h, 't> {
    fn new(head: &'h Head<'t>, page_size: u32) -> Self {
        Accumulator {
            head,
            page_size,
            checksum: head.post_apply(),
            grown: 0,
        }
    }

    /// Folds one new page into the checksum and stores it unless it equals the head's version.
    fn page(&mut self, pgno: u32, data: &[u8], sink: &mut dyn PageSink) -> StoreResult<()> {
        let new_ck = page_checksum(pgno, data);
        if pgno <= self.head.commit() {
            let old = self
                .head
                .compare(pgno, new_ck, data)?
                .ok_or(StoreError::NoPrevPage(pgno))?;
            if old.same {
                return Ok(());
            }
            self.checksum = checksum_xor(self.checksum, old.ck);
        } else {
            self.grown += 1;
        }
        self.checksum = checksum_xor(self.checksum, new_ck);
        sink.page(pgno, new_ck, data)
    }

    /// Growing needs every page in `(old commit, new commit]` except the lock page.
    fn check_growth(&self, commit: u32) -> StoreResult<()> {
        let old = self.head.commit();
        if commit <= old {
            return Ok(());
        }
        let lock = lock_page(self.page_size);
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
    fn truncate(&mut self, commit: u32) -> StoreResult<()> {
        let old = self.head.commit();
        let lock = lock_page(self.page_size);
        for pgno in (commit + 1..=old).filter(|&p| p != lock) {
            self.checksum = checksum_xor(self.checksum, self.head.checksum(pgno)?);
        }
        Ok(())
    }
}
