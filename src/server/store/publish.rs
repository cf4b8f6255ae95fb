//! Committing a transaction in bucket mode: verified by the same rules as in local mode
//! ([`super::verify`]), written as one object, committed by creating `l0/MIN` only if absent,
//! then added to the local index.
//!
//! Invariants: the reply says "committed" only once the commit object is in the bucket, and
//! never says "failed" for one that is: an ambiguous create (a lost reply) is settled by retrying
//! the same create and reading back the nonce of whatever holds the key. A commit too large for
//! one conditional PUT uploads its body first (multipart, `big/`), then creates a small pointer
//! at `l0/MIN`. A lost race (another server took the TXID) changes nothing and answers
//! `EPOSMISMATCH` with the winner's position.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use super::remote::{Loaded, Remote, RemoteBytes, ingest};
use super::verify::{self, PageSink};
use super::{DbKey, Store, StoreError, StoreResult, TxnRow, find_db, head, head_of};
use crate::server::bucket::format::{self, Header, Kind, TxnRecord};
use crate::server::bucket::{BucketError, Cas, Spill, layout};

/// Commit objects up to this size are written in one conditional PUT; larger ones as a
/// multipart body plus a pointer.
pub const INLINE_LIMIT: u64 = 8 << 20;
/// How long a commit keeps trying to learn whether its object landed (no attempt starts later;
/// one takes at most `bucket::CONDITIONAL_TIMEOUT`).
pub const SETTLE_DEADLINE: Duration = Duration::from_secs(10);

/// Which lease a bucket-mode commit must hold.
pub(super) enum LeaseRule<'a> {
    /// Administrative writes (upload, restore) ignore leases, as in local mode.
    Ignore,
    /// `POST /db/tx`: the `Lfsc-Lease-Id` header, if any.
    Header(Option<&'a str>),
}

/// Spools the page versions of one transaction (index entries and page bytes separately, so
/// the object can be written index first).
pub(super) struct ObjectSink {
    pub page_size: u32,
    entries: Spill,
    data: Spill,
    slots: u64,
}

impl ObjectSink {
    pub fn new(tmp: &std::path::Path) -> ObjectSink {
        ObjectSink {
            page_size: 0,
            entries: Spill::new(tmp, 1 << 20),
            data: Spill::new(tmp, INLINE_LIMIT as usize),
            slots: 0,
        }
    }
}

impl PageSink for ObjectSink {
    fn begin(&mut self, _txid: u64, page_size: u32) -> StoreResult<()> {
        self.page_size = page_size;
        Ok(())
    }

    fn page(&mut self, pgno: u32, ck: u64, data: &[u8]) -> StoreResult<()> {
        self.entries.write_all(&pgno.to_be_bytes())?;
        self.entries.write_all(&ck.to_be_bytes())?;
        self.data.write_all(data)?;
        self.slots += 1;
        Ok(())
    }
}

/// A commit object ready to write.
struct Built {
    header: Header,
    record: TxnRecord,
    /// Encoded index (records, entries, CRC).
    index: Spill,
    data: Spill,
}

fn build(tmp: &std::path::Path, row: &TxnRow, sink: ObjectSink, epoch: u64) -> StoreResult<Built> {
    let kind = if row.min_txid == 1 {
        Kind::Image
    } else {
        Kind::Pages
    };
    if kind == Kind::Image && sink.slots != format::image_slots(row.page_size, row.commit) {
        return Err(StoreError::Corrupt(format!(
            "a snapshot of {} pages stored {} slots",
            row.commit, sink.slots
        )));
    }
    let record = TxnRecord {
        min_txid: row.min_txid,
        max_txid: row.max_txid,
        page_size: row.page_size,
        commit: row.commit,
        timestamp_ms: row.timestamp_ms,
        pre_apply: row.pre_apply,
        post_apply: row.post_apply,
        created_ms: super::now_ms(),
        first_slot: 0,
    };
    let header = Header::new(
        kind,
        0,
        row.page_size,
        1,
        sink.slots,
        (row.min_txid, row.max_txid),
        layout::nonce(),
        epoch,
        0,
    );
    let mut index = Spill::new(tmp, 1 << 20);
    let mut digest = crate::ltx::CRC64.digest();
    let rec = record.encode();
    digest.update(&rec);
    index.write_all(&rec)?;
    let mut r = std::io::BufReader::new(sink.entries.into_reader()?);
    let mut e = [0u8; 12];
    for _ in 0..sink.slots {
        r.read_exact(&mut e)?;
        let part = if kind == Kind::Image { &e[4..] } else { &e[..] };
        digest.update(part);
        index.write_all(part)?;
    }
    index.write_all(&digest.finalize().to_be_bytes())?;
    debug_assert_eq!(index.len(), header.index_len);
    Ok(Built {
        header,
        record,
        index,
        data: sink.data,
    })
}

/// How a conditional create ended.
enum Settled {
    /// Our object holds the key.
    Ours,
    /// Another writer's object holds the key.
    Theirs,
}

/// Whether an error from the bucket proves the request was never sent (connection refused,
/// unreachable host): only then is a failed create certainly not committed.
fn never_sent(e: &BucketError) -> bool {
    let BucketError::Op { source, .. } = e else {
        return false;
    };
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
    while let Some(err) = cur {
        if let Some(re) = err.downcast_ref::<reqwest013::Error>() {
            return re.is_connect();
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
            );
        }
        cur = err.source();
    }
    false
}

impl Remote {
    /// Creates `rel` with `bytes` if absent, until the outcome is known or the deadline passes.
    fn settle_create(&self, rel: &str, bytes: Vec<u8>, nonce: u64) -> StoreResult<Settled> {
        let deadline = Instant::now() + SETTLE_DEADLINE;
        let mut backoff = Duration::from_millis(50);
        let mut maybe_sent = false;
        let mut last = String::new();
        loop {
            match self.bucket.put_create(rel, bytes.clone()) {
                Ok(Cas::Done(_)) => return Ok(Settled::Ours),
                Ok(Cas::Lost) => match self.bucket.get_range(rel, 0..format::HEADER_SIZE as u64) {
                    Ok(Some((b, _))) => {
                        let h = Header::decode(&b).map_err(|e| {
                            StoreError::Corrupt(format!("commit object {rel}: {e}"))
                        })?;
                        return Ok(if h.nonce == nonce {
                            Settled::Ours
                        } else {
                            Settled::Theirs
                        });
                    }
                    // Gone again (deleted meanwhile by garbage collection): try again.
                    Ok(None) => {}
                    Err(e) => {
                        maybe_sent = true;
                        last = e.to_string();
                    }
                },
                Err(e) => {
                    maybe_sent |= !never_sent(&e);
                    last = e.to_string();
                }
            }
            if Instant::now() + backoff > deadline {
                return Err(if maybe_sent {
                    StoreError::CommitUnknown(format!(
                        "could not learn within {}s whether the commit landed (the bucket \
                         failed: {last}); read the database's position to find out",
                        SETTLE_DEADLINE.as_secs()
                    ))
                } else {
                    StoreError::Unavailable(format!(
                        "the bucket is unreachable, nothing was committed: {last}"
                    ))
                });
            }
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }
}

impl Store {
    /// Bucket mode: verifies one transaction against the head, commits it to the bucket, and
    /// indexes it. `verify` gets the head (read through `store.db`) and the sink; `min_txid` is
    /// the first TXID the transaction claims (`None`: head + 1), used to catch up first when a
    /// client is ahead of this server; `whole_image` (a restore) keeps what it reads out of the
    /// page cache.
    pub(super) fn commit_bucketed(
        &self,
        r: &Remote,
        key: &DbKey,
        lease: LeaseRule,
        min_txid: Option<u64>,
        whole_image: bool,
        verify: impl FnOnce(&verify::Head, &mut dyn PageSink) -> StoreResult<TxnRow>,
    ) -> StoreResult<(TxnRow, u64)> {
        r.check_key(key)?;
        let st = r.db(key);
        let _g = st.lock.lock();
        let local_head = || -> StoreResult<u64> {
            self.read(|tx| {
                Ok(match find_db(tx, key)? {
                    Some(id) => head(tx, id)?.map_or(0, |h| h.max_txid),
                    None => 0,
                })
            })
        };
        // Catch up first if this server never looked at the database, or the client is ahead
        // of it (it committed through another server): verification needs the head.
        if st.never_refreshed() || min_txid.is_some_and(|m| m > local_head().unwrap_or(0) + 1) {
            self.refresh_locked(r, key, &st, true)?;
        }
        let check_lease = || match &lease {
            LeaseRule::Ignore => Ok(0),
            LeaseRule::Header(id) => r.leases.check_write(key, *id),
        };
        let epoch = check_lease()?;
        let lease_checked = Instant::now();
        // Pages a commit compares with are worth caching; a restore's whole image is not.
        let fetch = RemoteBytes {
            remote: r,
            cache: !whole_image,
        };
        let (row, sink) = self.read(|tx| {
            let head = head_of(tx, key, &fetch)?;
            let mut sink = ObjectSink::new(&self.tmp_dir);
            let row = verify(&head, &mut sink)?;
            Ok((row, sink))
        })?;
        // Only a verified transaction may create the database in the bucket.
        let gn = self.ensure_manifest(r, key, &st)?;
        let stored = sink.slots;
        let built = build(&self.tmp_dir, &row, sink, epoch)?;
        let nonce = built.header.nonce;
        let (rel, (mut l0_bytes, mut loaded)) = self.write_object(r, key, &gn, built)?;
        let lost = |this: &Self| -> StoreResult<StoreError> {
            if let Some(big) = &rel {
                let _ = r.bucket.delete(&layout::in_generation(key, &gn, big));
            }
            this.refresh_locked(r, key, &st, false)?;
            let pos = this.read(|tx| {
                Ok(match find_db(tx, key)? {
                    Some(id) => head(tx, id)?.map_or(crate::wire::Pos::ZERO, |h| h.pos()),
                    None => crate::wire::Pos::ZERO,
                })
            })?;
            Ok(StoreError::PosMismatch(pos))
        };
        // The lease must still be ours if the first check was a while ago (a large body).
        if lease_checked.elapsed() > r.cfg.max_skew / 2 && check_lease()? != epoch {
            return Err(StoreError::LeaseMismatch);
        }
        // The last look before the commit point: the manifest (a conditional GET, usually
        // unchanged) must still name this generation with nothing merged past our head. From
        // here to the end of the create takes at most the settle deadline plus one attempt,
        // which `--gc-grace` must exceed (config::MIN_GC_GRACE).
        if self.recheck_manifest(r, key, &st)?.as_deref() != Some(gn.as_str())
            || local_head()? + 1 != row.min_txid
        {
            return Err(lost(self)?);
        }
        // The commit lands now: its creation time (which retention counts from) is now.
        let created = super::now_ms();
        stamp_created(&mut l0_bytes, created)?;
        loaded.txns[0].created_ms = created;
        let l0 = layout::in_generation(key, &gn, &layout::l0(row.min_txid));
        match r.settle_create(&l0, l0_bytes, nonce)? {
            Settled::Ours => {}
            Settled::Theirs => return Err(lost(self)?),
        }
        r.mark_dirty(key);
        // Committed. Indexing it here is an optimisation: if it fails, the next refresh finds it.
        let l = loaded;
        let indexed = self.write(|tx| {
            let db_id = find_db(tx, key)?
                .ok_or_else(|| StoreError::Stale("database row vanished".into()))?;
            ingest(tx, db_id, &l)
        });
        match indexed {
            Ok(_) => st.mark_refreshed(),
            Err(e) => {
                tracing::warn!(db = %key.name, error = %e, "indexing a committed transaction")
            }
        }
        self.notify();
        let mut row = row;
        row.created_ms = l.txns[0].created_ms;
        Ok((row, stored))
    }

    /// Writes the object of a commit (inline, or a multipart body plus a pointer): returns the
    /// `big/` key if one was written, and the bytes to create at `l0/MIN` with what the index
    /// needs.
    #[allow(clippy::type_complexity)]
    fn write_object(
        &self,
        r: &Remote,
        key: &DbKey,
        gn: &str,
        b: Built,
    ) -> StoreResult<(Option<String>, (Vec<u8>, Loaded))> {
        let rel_l0 = layout::l0(b.record.min_txid);
        if b.header.len <= INLINE_LIMIT {
            let mut bytes = Vec::with_capacity(b.header.len as usize);
            bytes.extend_from_slice(&b.header.encode());
            b.index.into_reader()?.read_to_end(&mut bytes)?;
            let data_at = bytes.len();
            b.data.into_reader()?.read_to_end(&mut bytes)?;
            let entries = entries_spill(
                &self.tmp_dir,
                &bytes[format::HEADER_SIZE..data_at],
                &b.header,
            )?;
            let loaded = Loaded {
                rel: rel_l0,
                header: b.header.clone(),
                txns: vec![b.record.clone()],
                entries,
                data: bytes::Bytes::copy_from_slice(&bytes[data_at..]),
            };
            return Ok((None, (bytes, loaded)));
        }
        let big = layout::big(b.record.min_txid, b.header.nonce);
        let full = layout::in_generation(key, gn, &big);
        let head = b.header.encode();
        let index_reader = b.index.reader()?;
        let body = head
            .as_slice()
            .chain(index_reader)
            .chain(b.data.into_reader()?);
        r.bucket.upload(&full, body, b.header.len)?;
        let pointer = Header::new(
            Kind::Pointer,
            0,
            b.header.page_size,
            1,
            0,
            (b.record.min_txid, b.record.max_txid),
            b.header.nonce,
            b.header.lease_epoch,
            big.len() as u64,
        );
        let mut bytes = pointer.encode().to_vec();
        bytes.extend_from_slice(&format::encode_index(
            Kind::Pointer,
            std::slice::from_ref(&b.record),
            &[],
        ));
        bytes.extend_from_slice(big.as_bytes());
        let entries = entries_spill(&self.tmp_dir, b.index.reader()?, &b.header)?;
        let loaded = Loaded {
            rel: big.clone(),
            header: b.header.clone(),
            txns: vec![b.record.clone()],
            entries,
            data: bytes::Bytes::new(),
        };
        Ok((Some(big), (bytes, loaded)))
    }
}

/// Sets the creation time of the first transaction record of an encoded object (a commit, or
/// a pointer), whose whole index is in `bytes`, and updates the index's CRC.
fn stamp_created(bytes: &mut [u8], created_ms: u64) -> StoreResult<()> {
    let h = Header::decode(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let start = format::HEADER_SIZE;
    let end = h.data_offset as usize;
    if bytes.len() < end || h.txns == 0 {
        return Err(StoreError::Corrupt(
            "commit object without its index".into(),
        ));
    }
    // created_ms is bytes 48..56 of a transaction record.
    bytes[start + 48..start + 56].copy_from_slice(&created_ms.to_be_bytes());
    let crc = crate::ltx::CRC64.checksum(&bytes[start..end - 8]);
    bytes[end - 8..end].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// The slot entries of an encoded index (records first, CRC last), copied into a spill.
fn entries_spill(tmp: &std::path::Path, index: impl Read, h: &Header) -> StoreResult<Spill> {
    let skip = h.txns as u64 * format::TXN_RECORD_SIZE as u64;
    let len = h.index_len - skip - 8;
    let mut r = index;
    std::io::copy(&mut (&mut r).take(skip), &mut std::io::sink())?;
    let mut s = Spill::new(tmp, 1 << 20);
    let copied = std::io::copy(&mut r.take(len), &mut s)?;
    if copied != len {
        return Err(StoreError::Corrupt(
            "commit index shorter than its header says".into(),
        ));
    }
    Ok(s)
}
