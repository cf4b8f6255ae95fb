//! Whole-database images: writing a snapshot (LTX or raw SQLite) at a position, and appending a
//! full image as a new transaction (`POST /db/upload`, `POST /db/restore`).
//!
//! Invariants: a written LTX snapshot's pages are re-checksummed against the stored position
//! before its trailer is written (a mismatch aborts the stream); an appended image becomes
//! exactly one transaction at head+1 whose post-apply checksum is computed from its pages, and
//! only pages that differ from the previous version are stored.

use std::io::{BufReader, Read, Write};
use std::str::FromStr;

use rusqlite::{Connection, OptionalExtension};

use super::publish::LeaseRule;
use super::read::plan_in;
use super::remote::{Need, Remote, RemoteBytes};
use super::verify::PageSink;
use super::{
    DbKey, Fetch, Incoming, SnapshotPlan, Store, StoreError, StoreResult, TXN_COLS, TxnRow,
    commit_rows, find_db, head, page_version, txn_at, txn_from_row, verify,
};
use crate::dbfile::DbHeader;
use crate::ltx::{self, EMPTY_CHECKSUM, checksum_xor, lock_page, page_checksum};
use crate::wire::{Pos, Txid};

/// Output format of `GET /db/snapshot`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Format {
    /// An uncompressed LTX snapshot (MinTXID 1, MaxTXID = the position's TXID).
    Ltx,
    /// The raw SQLite file, lock page zero-filled.
    Sqlite,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "" | "ltx" => Ok(Format::Ltx),
            "sqlite" => Ok(Format::Sqlite),
            _ => Err(format!("unknown snapshot format {s:?} (use ltx or sqlite)")),
        }
    }
}

/// Where `POST /db/restore` goes back to.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RestoreTarget {
    Txid(u64),
    /// Milliseconds since the epoch: the position that was current at that moment.
    TimestampMs(u64),
}

impl Store {
    /// Writes a snapshot of `key` at `txid` (default: current). `start` is called once the
    /// snapshot is known to exist and returns the sink (or `None` to give up); errors before
    /// that are returned without calling it.
    pub fn snapshot<W: Write>(
        &self,
        key: &DbKey,
        txid: Option<u64>,
        format: Format,
        start: impl FnOnce(&SnapshotPlan) -> Option<W>,
    ) -> StoreResult<()> {
        let Some(r) = self.remote() else {
            return self.read(|tx| {
                let plan = plan_in(tx, key, txid)?;
                match start(&plan) {
                    Some(out) => write_image(tx, &plan, format, out, &self.local()),
                    None => Ok(()),
                }
            });
        };
        self.sync_db(r, key, txid.map_or(Need::Recent, Need::Txid))?;
        let fetch = RemoteBytes {
            remote: r,
            cache: false,
        };
        let res = self.read(|tx| {
            let plan = plan_in(tx, key, txid)?;
            match start(&plan) {
                Some(out) => write_image(tx, &plan, format, out, &fetch),
                None => Ok(()),
            }
        });
        self.flush_stash(r);
        res
    }

    /// Imports a raw SQLite file of `len` bytes as a new transaction at head+1.
    pub fn upload(&self, key: &DbKey, len: u64, body: impl Read) -> StoreResult<Pos> {
        let mut r = BufReader::new(body);
        let (first, hdr, commit) = image_geometry(&mut r, len)?;
        let mut fill = |pgno: u32, buf: &mut [u8]| next_page(&mut r, &first, pgno, buf);
        let mut verify = |head: &verify::Head, sink: &mut dyn PageSink| {
            verify::image(head, hdr.page_size, commit, ltx::now_ms(), &mut fill, sink)
        };
        let row = match self.remote() {
            Some(r) => {
                self.commit_bucketed(r, key, LeaseRule::Ignore, None, false, &mut verify)?
                    .0
            }
            None => {
                let c = self.write(|tx| commit_rows(tx, key, &self.local(), None, &mut verify))?;
                self.notify();
                c.row
            }
        };
        Ok(row.pos())
    }

    /// Local mode: imports the raw SQLite file of `len` bytes received into `inc`
    /// ([`Store::incoming`]) as a new transaction at head+1. The file becomes the object holding
    /// the versions' bytes, so they are written once; `store.db` gets only index rows.
    pub fn upload_file(&self, key: &DbKey, len: u64, mut inc: Incoming) -> StoreResult<Pos> {
        let written = inc.file().metadata()?.len();
        if written != len {
            return Err(StoreError::BadInput(format!(
                "upload of {len} bytes has {written} in its file"
            )));
        }
        let mut r = BufReader::with_capacity(1 << 20, inc.reader()?);
        let (first, hdr, commit) = image_geometry(&mut r, len)?;
        // Durable before it is named: synced on another thread while the pages are verified
        // and indexed (the disk and the CPU work at once), and waited for before the rename.
        let syncing = {
            let f = inc.file().try_clone()?;
            std::thread::spawn(move || f.sync_all())
        };
        let synced = std::cell::Cell::new(Some(syncing));
        let wait_sync = || -> StoreResult<()> {
            match synced.take() {
                Some(h) => h
                    .join()
                    .map_err(|_| StoreError::Io(std::io::Error::other("file sync panicked")))?
                    .map_err(StoreError::Io),
                None => Ok(()),
            }
        };
        let mut fill = |pgno: u32, buf: &mut [u8]| next_page(&mut r, &first, pgno, buf);
        let placed = std::cell::RefCell::new(None);
        let done = self.write(|tx| {
            let c = commit_rows(tx, key, &self.local(), Some(&mut inc), |head, sink| {
                verify::image(head, hdr.page_size, commit, ltx::now_ms(), &mut fill, sink)
            })?;
            wait_sync()?;
            if let Some(obj) = c.obj {
                *placed.borrow_mut() = Some(self.objects.place(&mut inc, obj)?);
            }
            Ok(c)
        });
        // A refusal must not leave the sync running on a file about to be removed.
        let _ = wait_sync();
        let c = match done {
            Ok(c) => c,
            Err(e) => {
                if let Some(k) = placed.borrow_mut().take() {
                    self.objects.discard(&k);
                }
                return Err(e);
            }
        };
        self.notify();
        if c.stored < u64::from(commit) {
            // Slots of pages equal to their previous version: nothing names them.
            self.objects.freed(c.db_id);
        }
        Ok(c.row.pos())
    }

    /// Re-appends the image at `target` as a new transaction; returns the new head TXID (or the
    /// current one when the target is the current position).
    pub fn restore(&self, key: &DbKey, target: RestoreTarget) -> StoreResult<Txid> {
        if let Some(r) = self.remote() {
            return self.restore_bucketed(r, key, target);
        }
        let (txid, changed) = self.write(|tx| {
            let db_id = find_db(tx, key)?.ok_or_else(|| StoreError::NoDb(key.name.clone()))?;
            let h = head(tx, db_id)?
                .ok_or_else(|| StoreError::NoTxid("database has no data yet".into()))?;
            let t = resolve(tx, db_id, target)?;
            if t.max_txid == h.max_txid {
                return Ok((h.max_txid, false));
            }
            let local = self.local();
            let mut pages = ImageReader::new(tx, db_id, &t, &local);
            let c = commit_rows(tx, key, &local, None, |head, sink| {
                let mut fill = |pgno: u32, buf: &mut [u8]| pages.fill(pgno, buf);
                verify::image(head, t.page_size, t.commit, ltx::now_ms(), &mut fill, sink)
            })?;
            Ok((c.row.max_txid, true))
        })?;
        if changed {
            self.notify();
        }
        Ok(Txid(txid))
    }

    fn restore_bucketed(
        &self,
        r: &Remote,
        key: &DbKey,
        target: RestoreTarget,
    ) -> StoreResult<Txid> {
        self.sync_db(r, key, Need::Recent)?;
        // The target is resolved in the same read transaction as the head it is verified
        // against, so both belong to one incarnation of the database.
        let done = self.commit_bucketed(r, key, LeaseRule::Ignore, None, true, |head, sink| {
            let db_id = head
                .db_id
                .ok_or_else(|| StoreError::NoDb(key.name.clone()))?;
            let h = head
                .row
                .clone()
                .ok_or_else(|| StoreError::NoTxid("database has no data yet".into()))?;
            let t = resolve(head.tx, db_id, target)?;
            if t.max_txid == h.max_txid {
                return Err(StoreError::Unchanged(h.max_txid));
            }
            let mut pages = ImageReader::new(head.tx, db_id, &t, head.fetch);
            let mut fill = |pgno: u32, buf: &mut [u8]| pages.fill(pgno, buf);
            verify::image(head, t.page_size, t.commit, ltx::now_ms(), &mut fill, sink)
        });
        self.flush_stash(r);
        match done {
            Ok((row, _)) => Ok(Txid(row.max_txid)),
            Err(StoreError::Unchanged(txid)) => Ok(Txid(txid)),
            Err(e) => Err(e),
        }
    }
}

/// Pages at one position, read in order with their bytes fetched in batches (bucket mode: a
/// few range GETs per batch instead of one per page). The lock page reads as zeros.
pub(super) struct ImageReader<'a> {
    tx: &'a Connection,
    db_id: i64,
    txn: &'a TxnRow,
    fetch: &'a dyn Fetch,
    queue: std::collections::VecDeque<(u32, u64, Vec<u8>)>,
}

impl<'a> ImageReader<'a> {
    pub fn new(tx: &'a Connection, db_id: i64, txn: &'a TxnRow, fetch: &'a dyn Fetch) -> Self {
        ImageReader {
            tx,
            db_id,
            txn,
            fetch,
            queue: Default::default(),
        }
    }

    /// The checksum and bytes of page `pgno` (1..=commit); ask in increasing order for batches
    /// to help.
    pub fn page(&mut self, pgno: u32) -> StoreResult<(u64, Vec<u8>)> {
        while self.queue.front().is_some_and(|(p, ..)| *p < pgno) {
            self.queue.pop_front();
        }
        if self.queue.front().is_none_or(|(p, ..)| *p != pgno) {
            self.load(pgno)?;
        }
        let (_, ck, data) = self.queue.pop_front().expect("loaded");
        Ok((ck, data))
    }

    /// Queues pages `from..` (up to a batch), the lock page as zeros.
    fn load(&mut self, from: u32) -> StoreResult<()> {
        self.queue.clear();
        let t = self.txn;
        let lock = lock_page(t.page_size);
        let n = (self.fetch.batch_bytes() / t.page_size as usize).max(1) as u32;
        let end = from
            .saturating_add(n)
            .min(t.commit.saturating_add(1))
            .max(from + 1);
        let mut versions = Vec::new();
        for pgno in (from..end).filter(|&p| p != lock) {
            let v = page_version(self.tx, self.db_id, pgno, t.max_txid, self.fetch.bucket())?
                .ok_or(StoreError::NoPrevPage(pgno))?;
            versions.push(v);
        }
        let datas = self.fetch.batch(self.tx, self.db_id, &versions)?;
        let mut fetched = versions.iter().map(|v| (v.pgno, v.ck)).zip(datas);
        for pgno in from..end {
            if pgno == lock {
                let zeros = vec![0u8; t.page_size as usize];
                self.queue
                    .push_back((lock, page_checksum(lock, &zeros), zeros));
            } else if let Some(((p, ck), d)) = fetched.next() {
                self.queue.push_back((p, ck, d));
            }
        }
        Ok(())
    }

    /// Copies page `pgno` into `buf`.
    pub fn fill(&mut self, pgno: u32, buf: &mut [u8]) -> StoreResult<()> {
        let (_, data) = self.page(pgno)?;
        buf.copy_from_slice(&data);
        Ok(())
    }
}

/// Reads page `pgno` of an image from `r`, which is past the header bytes `first` (page 1
/// starts with them).
fn next_page(r: &mut impl Read, first: &[u8], pgno: u32, buf: &mut [u8]) -> StoreResult<()> {
    if pgno == 1 {
        buf[..first.len()].copy_from_slice(first);
        r.read_exact(&mut buf[first.len()..])?;
    } else {
        r.read_exact(buf)?;
    }
    Ok(())
}

/// Reads the SQLite header of an image of `len` bytes; returns its first bytes, the header and
/// the page count.
fn image_geometry(
    r: &mut impl Read,
    len: u64,
) -> StoreResult<([u8; crate::dbfile::HEADER_SIZE], DbHeader, u32)> {
    let mut first = [0u8; crate::dbfile::HEADER_SIZE];
    r.read_exact(&mut first)
        .map_err(|_| StoreError::BadHeader("file is shorter than the SQLite header".into()))?;
    let hdr = DbHeader::parse(&first).map_err(|e| StoreError::BadHeader(e.to_string()))?;
    let ps = u64::from(hdr.page_size);
    if len % ps != 0 || len / ps > u64::from(u32::MAX) {
        return Err(StoreError::BadHeader(format!(
            "file size {len} is not a multiple of the page size {ps}"
        )));
    }
    let commit = (len / ps) as u32;
    if hdr.size_valid && hdr.page_count > commit {
        // SQLite trusts a valid in-header size and reports such a file as corrupt.
        return Err(StoreError::BadHeader(format!(
            "file is truncated: its header counts {} pages, the file has {commit}",
            hdr.page_count
        )));
    }
    Ok((first, hdr, commit))
}

fn resolve(tx: &Connection, db_id: i64, target: RestoreTarget) -> StoreResult<TxnRow> {
    match target {
        RestoreTarget::Txid(t) => txn_at(tx, db_id, t)?.ok_or_else(|| {
            StoreError::NoTxid(format!("transaction {t:016x} not found or not retained"))
        }),
        RestoreTarget::TimestampMs(ms) => {
            let sql = format!(
                "SELECT {TXN_COLS} FROM txns WHERE db_id = ?1 AND created_ms <= ?2
                 ORDER BY max_txid DESC LIMIT 1"
            );
            tx.query_row(&sql, rusqlite::params![db_id, ms as i64], txn_from_row)
                .optional()?
                .ok_or_else(|| StoreError::NoTimestamp(format!("{ms}ms")))
        }
    }
}

/// Streams the image of `plan` to `out`, every page re-verified against its checksum.
fn write_image(
    tx: &Connection,
    plan: &SnapshotPlan,
    format: Format,
    mut out: impl Write,
    fetch: &dyn Fetch,
) -> StoreResult<()> {
    let t = &plan.txn;
    let lock = lock_page(t.page_size);
    let mut pages = ImageReader::new(tx, plan.db_id, t, fetch);
    let mut page = |pgno: u32| -> StoreResult<Vec<u8>> {
        let (ck, data) = pages.page(pgno)?;
        if page_checksum(pgno, &data) != ck {
            return Err(StoreError::Corrupt(format!(
                "stored page {pgno} fails its checksum"
            )));
        }
        Ok(data)
    };
    match format {
        Format::Sqlite => {
            for pgno in 1..=t.commit {
                let data = if pgno == lock {
                    vec![0; t.page_size as usize]
                } else {
                    page(pgno)?
                };
                out.write_all(&data)?;
            }
            out.flush()?;
        }
        Format::Ltx => {
            let hdr = ltx::Header {
                timestamp_ms: t.timestamp_ms,
                ..ltx::Header::new(t.page_size, t.commit, 1, t.max_txid, 0)
            };
            let corrupt = |e: ltx::LtxError| match e {
                ltx::LtxError::Io(io) => StoreError::Io(io),
                e => StoreError::Corrupt(e.to_string()),
            };
            let mut w = ltx::Writer::new(out, &hdr).map_err(corrupt)?;
            let mut checksum = EMPTY_CHECKSUM;
            for pgno in (1..=t.commit).filter(|&p| p != lock) {
                let data = page(pgno)?;
                checksum = checksum_xor(checksum, page_checksum(pgno, &data));
                w.write_page(pgno, &data).map_err(corrupt)?;
            }
            if checksum != t.post_apply {
                return Err(StoreError::Corrupt(format!(
                    "pages at {:016x} sum to {checksum:016x}, position says {:016x}",
                    t.max_txid, t.post_apply
                )));
            }
            let (_, mut out) = w.finish(t.post_apply).map_err(corrupt)?;
            out.flush()?;
        }
    }
    Ok(())
}
