//! Bucket mode (`--store`): keeping `store.db` a current index and bounded cache of the bucket.
//!
//! Owns, per database: reading the manifest (conditionally, by ETag), ingesting the objects it
//! lists (index rows only; page bytes stay in the bucket until read), probing `l0/` for commits
//! made through other servers, and fetching page bytes with as few range GETs as possible, each
//! page verified against its checksum before it is served or cached.
//!
//! Invariants: a row enters `store.db` only after the object it describes is in the bucket, so
//! the index never runs ahead of the bucket; a database's rows always describe one generation
//! (a new generation drops the old rows); every fetched page is checked against its LTX page
//! checksum. Freshness: a read at a position the index already has needs no request; other reads
//! see every commit older than the poll interval; a commit re-reads the manifest when the last
//! read is older than [`Remote::manifest_ttl`].

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes as Buf;
use rusqlite::{Connection, OptionalExtension};

use super::{
    Bytes, DbKey, Fetch, Loc, Store, StoreError, StoreResult, TxnRow, Version, find_db, head,
    insert_txn, now_ms,
};
use crate::ltx::page_checksum;
use crate::server::bucket::format::{self, Entry, FormatError, Header, Kind, TxnRecord};
use crate::server::bucket::lease::BucketLeases;
use crate::server::bucket::manifest::{Manifest, ObjRef};
use crate::server::bucket::{Bucket, Cas, Spill, layout};

/// Settings of bucket mode.
#[derive(Clone, Debug)]
pub struct RemoteConfig {
    pub poll_interval: Duration,
    pub retention: Duration,
    pub max_skew: Duration,
    /// Bound of `DATA_DIR` (store.db and its log).
    pub cache_size: u64,
    /// Extra time a retired object stays in the bucket after the retention.
    pub gc_grace: Duration,
    /// How long after start the first bucket-wide garbage sweep waits (not to compete with a
    /// cold start's first requests).
    pub sweep_delay: Duration,
}

/// Page checksums per `base_cks` chunk.
pub(super) const CKS_PER_CHUNK: u64 = 4096;
/// Most bytes of one coalesced range GET.
pub(super) const MAX_RANGE: u64 = 8 << 20;
/// Largest gap (in slots) a coalesced range GET reads through.
pub(super) const MAX_GAP_SLOTS: u64 = 8;
/// Index bytes kept in memory while ingesting; larger indexes are spilled to `tmp/`.
const INDEX_IN_MEMORY: usize = 8 << 20;
/// Fetched page bytes waiting to enter `page_cache`.
const STASH_LIMIT: usize = 32 << 20;
/// Database names with sync state kept in memory before unused ones are pruned.
const MAX_TRACKED: usize = 10_000;

/// Per-database sync state of this server.
#[derive(Default)]
pub(super) struct DbSync {
    /// Serialises refreshes and commits of the database on this server.
    pub lock: parking_lot::Mutex<()>,
    state: Mutex<SyncState>,
}

#[derive(Default, Clone)]
struct SyncState {
    manifest: Option<Manifest>,
    etag: Option<String>,
    manifest_read: Option<Instant>,
    refreshed: Option<Instant>,
}

impl DbSync {
    fn state(&self) -> SyncState {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, f: impl FnOnce(&mut SyncState)) {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// The manifest this server last read, with its ETag.
    pub fn manifest(&self) -> Option<(Manifest, Option<String>)> {
        let s = self.state();
        s.manifest.map(|m| (m, s.etag))
    }

    /// Whether this server has not brought the index of the database up to date since start
    /// (or since its state was reset).
    pub fn never_refreshed(&self) -> bool {
        self.state().refreshed.is_none()
    }

    /// The index is known current as of now (after this server's own commit).
    pub fn mark_refreshed(&self) {
        self.update(|s| s.refreshed = Some(Instant::now()));
    }
}

/// How current the index of a database must be before an operation.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(super) enum Need {
    /// Refreshed within the poll interval (reads without a position, change feeds, `/pos`).
    Recent,
    /// The index holds this TXID (reads at a client's position).
    Txid(u64),
    /// Before a commit: refreshed within the manifest TTL.
    Commit,
    /// Everything: the manifest re-read now (after a stale object or a lost race).
    Full,
    /// The poller: refreshed within half the poll interval.
    Poll,
}

/// Bytes fetched from the bucket, waiting to be written to `page_cache`.
#[derive(Default)]
struct Stash {
    pages: Vec<(i64, u32, u64, Vec<u8>)>,
    bytes: usize,
    touched: Vec<(i64, u32, u64)>,
}

/// The bucket side of a store.
pub struct Remote {
    pub bucket: Arc<Bucket>,
    pub leases: BucketLeases,
    pub cfg: RemoteConfig,
    pub store_id: String,
    dbs: Mutex<HashMap<DbKey, Arc<DbSync>>>,
    watchers: Mutex<HashMap<DbKey, usize>>,
    stash: Mutex<Stash>,
    /// Databases with compaction work this server should do (it committed to them, or a sweep
    /// found garbage), each with the time (ms) before which there is nothing to do.
    dirty: Mutex<HashMap<DbKey, u64>>,
    /// When each database's generation was last listed for orphans (ms).
    swept: Mutex<HashMap<DbKey, u64>>,
    /// When the bucket was last swept for garbage-collection work (ms; 0: never).
    swept_bucket: std::sync::atomic::AtomicU64,
    /// When this server started (ms).
    started_ms: u64,
    /// Index rows a new base made redundant, since the last compaction pass read this.
    pub(super) pruned: std::sync::atomic::AtomicU64,
    /// When each database was last used here (for forgetting the least recently used).
    pub(super) last_used: Mutex<HashMap<DbKey, Instant>>,
    /// Page bytes and databases evicted from the cache (for `/metrics`).
    pub(super) evicted_pages: std::sync::atomic::AtomicU64,
    pub(super) evicted_dbs: std::sync::atomic::AtomicU64,
}

/// Stops counting a watcher when dropped.
pub struct WatchGuard {
    remote: Arc<Remote>,
    keys: Vec<DbKey>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        let mut w = self
            .remote
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for k in &self.keys {
            if let Some(n) = w.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    w.remove(k);
                }
            }
        }
    }
}

impl Remote {
    /// Opens bucket mode: reads (or creates) the store's identity object.
    pub fn open(bucket: Arc<Bucket>, cfg: RemoteConfig) -> StoreResult<Remote> {
        check_conditional_writes(&bucket)?;
        let store_id = store_identity(&bucket)?;
        let leases = BucketLeases::new(bucket.clone(), cfg.max_skew);
        Ok(Remote {
            bucket,
            leases,
            cfg,
            store_id,
            dbs: Mutex::new(HashMap::new()),
            watchers: Mutex::new(HashMap::new()),
            stash: Mutex::new(Stash::default()),
            dirty: Mutex::new(Default::default()),
            swept: Mutex::new(HashMap::new()),
            pruned: Default::default(),
            swept_bucket: Default::default(),
            started_ms: now_ms(),
            last_used: Mutex::new(HashMap::new()),
            evicted_pages: Default::default(),
            evicted_dbs: Default::default(),
        })
    }

    pub(super) fn db(&self, key: &DbKey) -> Arc<DbSync> {
        let mut dbs = self.dbs.lock().unwrap_or_else(|e| e.into_inner());
        if dbs.len() >= MAX_TRACKED && !dbs.contains_key(key) {
            // Names asked about that have no manifest (nonexistent databases) and that nobody
            // is using right now: forget them, so junk names cannot grow this map without
            // bound. (Two entries for one name at worst cost a duplicate refresh; the bucket's
            // conditional create still orders commits.)
            dbs.retain(|_, st| Arc::strong_count(st) > 1 || st.state().manifest.is_some());
            self.last_used
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|k, _| dbs.contains_key(k));
            self.swept
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|k, _| dbs.contains_key(k));
        }
        dbs.entry(key.clone()).or_default().clone()
    }

    /// Refuses names the store cannot hold: on `file://` a database name is a directory name,
    /// at most 255 bytes.
    pub(super) fn check_key(&self, key: &DbKey) -> StoreResult<()> {
        if self.bucket.url().starts_with("file://") && key.name.len() > 255 {
            return Err(StoreError::BadInput(format!(
                "database names longer than 255 bytes cannot be kept in a file:// store ({} bytes)",
                key.name.len()
            )));
        }
        Ok(())
    }

    /// How old a manifest read may be before a commit re-reads it: well under the retention, so
    /// that no commit object this server has not seen can have been merged and removed (see
    /// docs/server.md, "Running on object storage").
    pub fn manifest_ttl(&self) -> Duration {
        (self.cfg.retention / 4).min(Duration::from_secs(5))
    }

    /// Counts `keys` as watched (long-polled) until the guard drops.
    pub fn watch(self: &Arc<Self>, keys: Vec<DbKey>) -> WatchGuard {
        let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        for k in &keys {
            *w.entry(k.clone()).or_default() += 1;
        }
        WatchGuard {
            remote: self.clone(),
            keys,
        }
    }

    /// Databases the poller keeps current: watched ones and ones leased through this server.
    pub fn active(&self) -> Vec<DbKey> {
        let mut keys: Vec<DbKey> = self
            .watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        keys.extend(self.leases.active());
        keys.sort();
        keys.dedup();
        keys
    }

    /// Forgets this server's sync state of `key` (its rows are being dropped): nothing about it
    /// is current here any more. The entry itself stays (one lock per database).
    pub(super) fn forget(&self, key: &DbKey) {
        if let Some(st) = self.dbs.lock().unwrap_or_else(|e| e.into_inner()).get(key) {
            st.update(|s| *s = SyncState::default());
        }
        self.last_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
    }

    /// Whether `key` must stay indexed here: readers wait on it, a lease was granted here, or
    /// compaction work is pending.
    fn pinned(&self, key: &DbKey) -> bool {
        self.active().contains(key)
            || self
                .dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(key)
    }

    /// Of `keys` (databases indexed here), those not pinned, least recently used first.
    pub(super) fn idle_of(&self, keys: Vec<DbKey>) -> Vec<DbKey> {
        let used = self
            .last_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut idle: Vec<DbKey> = keys.into_iter().filter(|k| !self.pinned(k)).collect();
        idle.sort_by_key(|k| used.get(k).copied());
        idle
    }

    /// Notes that `key` changed here: the next compaction pass looks at it.
    pub(super) fn mark_dirty(&self, key: &DbKey) {
        self.set_dirty(key, Some(0));
    }

    /// Records when `key` next has compaction work (`None`: nothing pending).
    pub(super) fn set_dirty(&self, key: &DbKey, next: Option<u64>) {
        let mut d = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        match next {
            Some(at) => {
                let e = d.entry(key.clone()).or_insert(at);
                *e = (*e).min(at);
            }
            None => {
                d.remove(key);
            }
        }
    }

    /// Databases a compaction pass looks at: ones changed here, and ones whose manifest (as
    /// last read) has objects due for deletion or dead generations.
    pub(super) fn compaction_candidates(&self, now: u64) -> Vec<DbKey> {
        let mut keys: Vec<DbKey> = self
            .dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(k, _)| k.clone())
            .collect();
        let delay = self.gc_delay_ms();
        for (k, st) in self.dbs.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            if let Some(m) = st.state().manifest
                && m.retired
                    .iter()
                    .chain(m.dead_generations.iter())
                    .any(|o| o.at_ms + delay <= now)
            {
                keys.push(k.clone());
            }
        }
        keys.sort();
        keys.dedup();
        keys
    }

    /// Whether the bucket-wide sweep is due (and notes that it runs now): first
    /// `sweep_delay` after start, then every `every_ms`.
    pub(super) fn sweep_due(&self, now: u64, every_ms: u64) -> bool {
        use std::sync::atomic::Ordering;
        let last = self.swept_bucket.load(Ordering::Relaxed);
        let next = if last == 0 {
            self.started_ms + self.cfg.sweep_delay.as_millis() as u64
        } else {
            last + every_ms
        };
        if now < next {
            return false;
        }
        self.swept_bucket.store(now, Ordering::Relaxed);
        true
    }

    /// Whether `key`'s generation is due to be listed for orphans (and notes that it is).
    pub(super) fn orphan_sweep_due(&self, key: &DbKey, now: u64, every_ms: u64) -> bool {
        let mut s = self.swept.lock().unwrap_or_else(|e| e.into_inner());
        let last = s.entry(key.clone()).or_insert(now);
        if now >= *last + every_ms {
            *last = now;
            true
        } else {
            false
        }
    }

    fn stash(&self, db_id: i64, pgno: u32, txid: u64, data: &[u8]) {
        let mut s = self.stash.lock().unwrap_or_else(|e| e.into_inner());
        // One flush must not overshoot the cache bound by much.
        let limit = STASH_LIMIT.min((self.cfg.cache_size / 8) as usize);
        if s.bytes + data.len() > limit {
            return;
        }
        s.bytes += data.len();
        s.pages.push((db_id, pgno, txid, data.to_vec()));
    }

    /// Notes a cache hit (applied to `atime` by the next flush).
    pub(super) fn touch(&self, db_id: i64, pgno: u32, txid: u64) {
        let mut s = self.stash.lock().unwrap_or_else(|e| e.into_inner());
        if s.touched.len() < 65_536 {
            s.touched.push((db_id, pgno, txid));
        }
    }

    fn take_stash(&self) -> Stash {
        std::mem::take(&mut *self.stash.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Refuses an object store that does not honour conditional writes: a create of an existing key
/// and an update with a stale ETag must both fail, or two servers could both commit one TXID.
/// Costs three PUTs, one GET and one DELETE at start.
fn check_conditional_writes(bucket: &Bucket) -> StoreResult<()> {
    let key = format!("probe/{:016x}", layout::nonce());
    let unsupported = |what: &str| {
        StoreError::Mode(format!(
            "the object store {} does not honour {what}: litevfs needs conditional writes \
             (PUT with If-None-Match: * and with If-Match) to keep commits from colliding",
            bucket.url()
        ))
    };
    let first = bucket.put_create(&key, b"1".to_vec())?;
    let result = (|| {
        let Cas::Done(etag) = first else {
            return Err(unsupported(
                "create-if-absent (a fresh key already existed)",
            ));
        };
        if bucket.put_create(&key, b"2".to_vec())? != Cas::Lost {
            return Err(unsupported("create-if-absent (If-None-Match: *)"));
        }
        let got = bucket
            .get(&key)?
            .ok_or_else(|| unsupported("reads after writes"))?;
        let etag = got.etag.or(etag).ok_or_else(|| unsupported("ETags"))?;
        let stale = format!("{etag}-stale");
        if bucket.put_update(&key, b"3".to_vec(), &stale)? != Cas::Lost {
            return Err(unsupported("compare-and-swap (If-Match)"));
        }
        Ok(())
    })();
    let _ = bucket.delete(&key);
    result
}

/// The store's identity in the bucket (`store.json`), created by the first server.
fn store_identity(bucket: &Bucket) -> StoreResult<String> {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Identity {
        store_id: String,
        created_ms: u64,
    }
    for _ in 0..3 {
        if let Some(got) = bucket.get(layout::STORE)? {
            let id: Identity = serde_json::from_slice(&got.bytes)
                .map_err(|e| StoreError::Corrupt(format!("{}: {e}", layout::STORE)))?;
            return Ok(id.store_id);
        }
        let id = Identity {
            store_id: format!("{:016x}{:016x}", layout::nonce(), layout::nonce()),
            created_ms: now_ms(),
        };
        let body = serde_json::to_vec(&id).expect("serialises");
        if let Cas::Done(_) = bucket.put_create(layout::STORE, body)? {
            return Ok(id.store_id);
        }
    }
    Err(StoreError::Corrupt(format!(
        "{} keeps changing",
        layout::STORE
    )))
}

/// An object's header, index and whatever page bytes came with the first read.
pub(super) struct Loaded {
    pub rel: String,
    pub header: Header,
    pub txns: Vec<TxnRecord>,
    /// The slot entries, encoded (kind's entry size each), verified.
    pub entries: Spill,
    /// Bytes from the data offset on that the first read happened to include.
    pub data: Buf,
}

impl Loaded {
    /// The slot entries, in slot order.
    pub fn entries(&self) -> StoreResult<impl Iterator<Item = StoreResult<Entry>> + use<>> {
        let kind = self.header.kind;
        let ps = self.header.page_size;
        let size = kind.entry_size();
        let mut r = std::io::BufReader::new(self.entries.reader()?);
        let n = self.header.slots;
        Ok((0..n).map(move |slot| {
            let mut b = [0u8; 12];
            r.read_exact(&mut b[..size])?;
            Ok(match kind {
                Kind::Pages => Entry {
                    pgno: u32::from_be_bytes(b[0..4].try_into().expect("4")),
                    ck: u64::from_be_bytes(b[4..12].try_into().expect("8")),
                },
                _ => Entry {
                    pgno: format::image_pgno(ps, slot),
                    ck: u64::from_be_bytes(b[0..8].try_into().expect("8")),
                },
            })
        }))
    }
}

fn corrupt(rel: &str, e: FormatError) -> StoreError {
    StoreError::Corrupt(format!("object {rel}: {e}"))
}

impl Remote {
    /// Reads an object's header and index (`hint`: bytes the first GET should cover, e.g. the
    /// index length the manifest gives, capped at [`MAX_FIRST_READ`]; more index is read in
    /// bounded chunks). `None` if the object does not exist. POINTER objects are followed to the
    /// object holding the commit (whose record then takes the pointer's creation time: the
    /// commit landed when the pointer was created). With `keep_data`, the page bytes the first
    /// read happened to include are kept (for the cache).
    pub(super) fn load(
        &self,
        key: &DbKey,
        gn: &str,
        rel: &str,
        hint: u64,
        keep_data: bool,
        tmp: &std::path::Path,
    ) -> StoreResult<Option<Loaded>> {
        let full = layout::in_generation(key, gn, rel);
        let first = hint.clamp(format::FIRST_READ, MAX_FIRST_READ);
        let Some((bytes, size)) = self.bucket.get_range(&full, 0..first)? else {
            return Ok(None);
        };
        let header = Header::decode(&bytes).map_err(|e| corrupt(rel, e))?;
        if header.len != size {
            return Err(corrupt(
                rel,
                FormatError::Invalid(format!("{size} bytes, header says {}", header.len)),
            ));
        }
        if header.kind == Kind::Pointer {
            return self.follow_pointer(key, gn, rel, &header, &bytes, keep_data, tmp);
        }
        // Loads that keep page bytes serve requests (one at a time); the others feed merges of
        // many objects at once, so they keep less of each index in memory.
        let in_memory = if keep_data {
            INDEX_IN_MEMORY
        } else {
            256 << 10
        };
        let mut idx = IndexReader::new(&header, tmp, in_memory);
        let range = header.index_range();
        let have = (bytes.len() as u64).min(range.end);
        idx.feed(
            &bytes[range.start.min(have) as usize..have as usize],
            range.start.min(have),
        )?;
        let mut at = have.max(range.start);
        while at < range.end {
            let to = (at + MAX_RANGE).min(range.end);
            let (chunk, _) = self
                .bucket
                .get_range(&full, at..to)?
                .ok_or_else(|| StoreError::Stale(format!("object {rel} disappeared")))?;
            if chunk.len() as u64 != to - at {
                return Err(corrupt(rel, FormatError::Truncated("index")));
            }
            idx.feed(&chunk, at)?;
            at = to;
        }
        let (txns, entries) = idx.finish().map_err(|e| corrupt(rel, e))?;
        let data = if keep_data && bytes.len() as u64 > header.data_offset {
            bytes.slice(header.data_offset as usize..)
        } else {
            Buf::new()
        };
        let loaded = Loaded {
            rel: rel.to_string(),
            header,
            txns,
            entries,
            data,
        };
        check_loaded(&loaded)?;
        Ok(Some(loaded))
    }

    /// Loads the object a POINTER names, with the pointer's record (its creation time).
    #[allow(clippy::too_many_arguments)]
    fn follow_pointer(
        &self,
        key: &DbKey,
        gn: &str,
        rel: &str,
        header: &Header,
        bytes: &Buf,
        keep_data: bool,
        tmp: &std::path::Path,
    ) -> StoreResult<Option<Loaded>> {
        let bad = || corrupt(rel, FormatError::Invalid("pointer".into()));
        if bytes.len() as u64 != header.len || header.len > header.data_offset + 4096 {
            return Err(bad());
        }
        let index = &bytes[header.index_range().start as usize..header.data_offset as usize];
        let record = format::decode_index(header, index).map_err(|e| corrupt(rel, e))?;
        let target = std::str::from_utf8(&bytes[header.data_offset as usize..])
            .map_err(|_| bad())?
            .to_string();
        if !target.starts_with("big/") {
            return Err(bad());
        }
        let Some(mut l) = self.load(key, gn, &target, 0, keep_data, tmp)? else {
            return Err(StoreError::Corrupt(format!(
                "pointer {rel} names {target}, which is missing"
            )));
        };
        let pointed = &record.txns[0];
        match l.txns.as_mut_slice() {
            [t] if t.min_txid == pointed.min_txid && t.max_txid == pointed.max_txid => {
                t.created_ms = pointed.created_ms;
            }
            _ => return Err(bad()),
        }
        Ok(Some(l))
    }
}

/// Most bytes of an object's first GET (the rest of a larger index is read in chunks).
const MAX_FIRST_READ: u64 = 8 << 20;

/// Routes an object's index bytes, arriving in chunks at known offsets, to its records, its
/// slot entries (spilled past [`INDEX_IN_MEMORY`]) and its CRC, checking the CRC at the end.
struct IndexReader {
    start: u64,
    records_end: u64,
    entries_end: u64,
    end: u64,
    records: Vec<u8>,
    entries: Spill,
    crc: [u8; 8],
    digest: crate::ltx::Digest,
    next: u64,
}

impl IndexReader {
    fn new(h: &Header, tmp: &std::path::Path, in_memory: usize) -> IndexReader {
        let r = h.index_range();
        let records_end = r.start + u64::from(h.txns) * format::TXN_RECORD_SIZE as u64;
        IndexReader {
            start: r.start,
            records_end,
            entries_end: r.end - 8,
            end: r.end,
            records: Vec::new(),
            entries: Spill::new(tmp, in_memory),
            crc: [0; 8],
            digest: crate::ltx::CRC64.digest(),
            next: r.start,
        }
    }

    /// Takes `chunk`, the bytes at `at..`; chunks must come in order without gaps.
    fn feed(&mut self, chunk: &[u8], at: u64) -> StoreResult<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        if at != self.next || at + chunk.len() as u64 > self.end {
            return Err(StoreError::Corrupt("index read out of order".into()));
        }
        let part = |lo: u64, hi: u64| -> &[u8] {
            let (a, b) = (lo.max(at), hi.min(at + chunk.len() as u64));
            if a >= b {
                &[]
            } else {
                &chunk[(a - at) as usize..(b - at) as usize]
            }
        };
        let recs = part(self.start, self.records_end);
        self.records.extend_from_slice(recs);
        let ents = part(self.records_end, self.entries_end);
        self.entries.write_all(ents)?;
        self.digest.update(recs);
        self.digest.update(ents);
        let lo = at.max(self.entries_end);
        for (i, b) in part(self.entries_end, self.end).iter().enumerate() {
            self.crc[(lo - self.entries_end) as usize + i] = *b;
        }
        self.next = at + chunk.len() as u64;
        Ok(())
    }

    fn finish(self) -> Result<(Vec<TxnRecord>, Spill), FormatError> {
        if self.next != self.end {
            return Err(FormatError::Truncated("index"));
        }
        if self.digest.finalize() != u64::from_be_bytes(self.crc) {
            return Err(FormatError::Checksum("index"));
        }
        let txns = self
            .records
            .chunks_exact(format::TXN_RECORD_SIZE)
            .map(TxnRecord::decode)
            .collect();
        Ok((txns, self.entries))
    }
}

/// The index rules of [`format`], checked on a streamed index.
fn check_loaded(l: &Loaded) -> StoreResult<()> {
    let h = &l.header;
    let bad = |why: &str| Err(corrupt(&l.rel, FormatError::Invalid(why.to_string())));
    let (Some(first), Some(last)) = (l.txns.first(), l.txns.last()) else {
        return bad("no transaction records");
    };
    if first.min_txid != h.min_txid || last.max_txid != h.max_txid {
        return bad("transaction records do not span the header's TXIDs");
    }
    for (i, t) in l.txns.iter().enumerate() {
        let end = l.txns.get(i + 1).map_or(h.slots, |n| n.first_slot);
        // A transaction without pages (a commit of size 0) may name another page size.
        if t.min_txid > t.max_txid
            || t.first_slot > end
            || (t.page_size != h.page_size && end > t.first_slot)
        {
            return bad("transaction record");
        }
        if l.txns
            .get(i + 1)
            .is_some_and(|n| n.min_txid != t.max_txid + 1)
        {
            return bad("transaction records not contiguous");
        }
    }
    if h.kind == Kind::Image && format::image_slots(h.page_size, last.commit) != h.slots {
        return bad("image slot count does not match its size");
    }
    if h.kind == Kind::Pages {
        let mut prev = 0u32;
        let mut txn = 0usize;
        for (slot, e) in (0u64..).zip(l.entries()?) {
            let e = e?;
            while txn + 1 < l.txns.len() && l.txns[txn + 1].first_slot <= slot {
                txn += 1;
                prev = 0;
            }
            if e.pgno <= prev || e.pgno > l.txns[txn].commit {
                return bad("slots out of order or past the commit size");
            }
            prev = e.pgno;
        }
    }
    Ok(())
}

/// What ingesting an object changed.
#[derive(Default, Debug)]
pub(super) struct Ingested {
    pub txns: u64,
    /// Index rows a new base made redundant.
    pub pruned: u64,
}

/// The local base of a database: (object id, txid, commit, page size).
fn base_of(tx: &Connection, db_id: i64) -> rusqlite::Result<Option<(i64, u64, u32, u32)>> {
    tx.prepare_cached("SELECT obj, txid, commit_size, page_size FROM bases WHERE db_id = ?1")?
        .query_row([db_id], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?, r.get(3)?))
        })
        .optional()
}

/// Adds an object to the index of `db_id` (one write transaction): its transactions, its page
/// versions (or, for an image newer than the base, the new base), and the page bytes that came
/// with it (verified) into the cache.
pub(super) fn ingest(tx: &Connection, db_id: i64, l: &Loaded) -> StoreResult<Ingested> {
    let h = &l.header;
    let kind = match h.kind {
        Kind::Pages => 1,
        Kind::Image => 2,
        Kind::Pointer => unreachable!("pointers are followed when loading"),
    };
    tx.execute(
        "INSERT INTO objects(db_id, key, kind, page_size, data_offset, min_txid, max_txid)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT(db_id, key) DO NOTHING",
        rusqlite::params![
            db_id,
            l.rel,
            kind,
            h.page_size,
            h.data_offset as i64,
            h.min_txid as i64,
            h.max_txid as i64
        ],
    )?;
    let obj: i64 = tx.query_row(
        "SELECT id FROM objects WHERE db_id = ?1 AND key = ?2",
        rusqlite::params![db_id, l.rel],
        |r| r.get(0),
    )?;
    let base_txid = base_of(tx, db_id)?.map_or(0, |b| b.1);
    let mut out = Ingested::default();
    if h.kind == Kind::Image {
        let rec = l.txns.last().expect("checked");
        if rec.max_txid <= base_txid {
            return Ok(out);
        }
        out.pruned = set_base(tx, db_id, obj, rec, l)?;
        out.txns += insert_record(tx, db_id, rec)?;
    } else {
        let mut entries = l.entries()?;
        for (i, rec) in l.txns.iter().enumerate() {
            let end = l.txns.get(i + 1).map_or(h.slots, |n| n.first_slot);
            let above = rec.max_txid > base_txid;
            if above {
                out.txns += insert_record(tx, db_id, rec)?;
            }
            let mut upsert = tx.prepare_cached(
                "INSERT INTO pages(db_id, pgno, txid, chksum, data, obj, slot)
                 VALUES (?1, ?2, ?3, ?4, NULL, ?5, ?6)
                 ON CONFLICT(db_id, pgno, txid) DO UPDATE SET obj = excluded.obj, slot = excluded.slot",
            )?;
            for slot in rec.first_slot..end {
                let e = entries
                    .next()
                    .ok_or_else(|| corrupt(&l.rel, FormatError::Truncated("entries")))??;
                if above {
                    upsert.execute(rusqlite::params![
                        db_id,
                        e.pgno,
                        rec.max_txid as i64,
                        e.ck as i64,
                        obj,
                        slot as i64
                    ])?;
                }
            }
        }
    }
    cache_included(tx, db_id, l)?;
    Ok(out)
}

/// Inserts the transaction row of a record; 1 if it was new.
fn insert_record(tx: &Connection, db_id: i64, rec: &TxnRecord) -> StoreResult<u64> {
    let exists: bool = tx
        .prepare_cached("SELECT 1 FROM txns WHERE db_id = ?1 AND max_txid = ?2")?
        .exists(rusqlite::params![db_id, rec.max_txid as i64])?;
    if exists {
        return Ok(0);
    }
    insert_txn(tx, db_id, &record_row(rec))?;
    Ok(1)
}

pub(super) fn record_row(rec: &TxnRecord) -> TxnRow {
    TxnRow {
        min_txid: rec.min_txid,
        max_txid: rec.max_txid,
        page_size: rec.page_size,
        commit: rec.commit,
        timestamp_ms: rec.timestamp_ms,
        pre_apply: rec.pre_apply,
        post_apply: rec.post_apply,
        created_ms: rec.created_ms,
    }
}

/// Makes the image `obj` the database's base and forgets what it supersedes: versions at or
/// below it and transactions before it (positions that left the retention window).
fn set_base(
    tx: &Connection,
    db_id: i64,
    obj: i64,
    rec: &TxnRecord,
    l: &Loaded,
) -> StoreResult<u64> {
    if let Some((old, ..)) = base_of(tx, db_id)? {
        tx.execute("DELETE FROM base_cks WHERE obj = ?1", [old])?;
    }
    tx.execute(
        "INSERT INTO bases(db_id, obj, txid, commit_size, page_size) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT(db_id) DO UPDATE SET obj = excluded.obj, txid = excluded.txid,
           commit_size = excluded.commit_size, page_size = excluded.page_size",
        rusqlite::params![db_id, obj, rec.max_txid as i64, rec.commit, rec.page_size],
    )?;
    let mut chunk = Vec::with_capacity(CKS_PER_CHUNK as usize * 8);
    let mut n = 0u64;
    let mut insert =
        tx.prepare_cached("INSERT INTO base_cks(obj, chunk, cks) VALUES (?1, ?2, ?3)")?;
    for e in l.entries()? {
        chunk.extend_from_slice(&e?.ck.to_be_bytes());
        n += 1;
        if n % CKS_PER_CHUNK == 0 {
            insert.execute(rusqlite::params![
                obj,
                (n / CKS_PER_CHUNK - 1) as i64,
                chunk
            ])?;
            chunk.clear();
        }
    }
    if !chunk.is_empty() {
        insert.execute(rusqlite::params![obj, (n / CKS_PER_CHUNK) as i64, chunk])?;
    }
    let t = rec.max_txid as i64;
    let pruned = tx.execute(
        "DELETE FROM pages WHERE db_id = ?1 AND txid <= ?2",
        [db_id, t],
    )?;
    tx.execute(
        "DELETE FROM txns WHERE db_id = ?1 AND max_txid < ?2",
        [db_id, t],
    )?;
    tx.execute(
        "DELETE FROM page_cache WHERE db_id = ?1 AND txid < ?2",
        [db_id, t],
    )?;
    tx.execute(
        "DELETE FROM objects WHERE db_id = ?1 AND id <> ?2
           AND NOT EXISTS (SELECT 1 FROM pages p WHERE p.db_id = ?1 AND p.obj = objects.id)",
        [db_id, obj],
    )?;
    Ok(pruned as u64)
}

/// Puts the verified page bytes that came with an object's first read into the cache.
fn cache_included(tx: &Connection, db_id: i64, l: &Loaded) -> StoreResult<()> {
    let ps = l.header.page_size as usize;
    let whole = l.data.len() / ps;
    if whole == 0 {
        return Ok(());
    }
    let mut insert = tx.prepare_cached(
        "INSERT OR REPLACE INTO page_cache(db_id, pgno, txid, data, atime) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let base_txid = base_of(tx, db_id)?.map_or(0, |b| b.1);
    let mut entries = l.entries()?;
    let mut txn = 0usize;
    for slot in 0..whole as u64 {
        let e = match entries.next() {
            Some(e) => e?,
            None => break,
        };
        while txn + 1 < l.txns.len() && l.txns[txn + 1].first_slot <= slot {
            txn += 1;
        }
        let txid = l.txns[txn].max_txid;
        if txid < base_txid {
            continue;
        }
        let data = &l.data[slot as usize * ps..(slot as usize + 1) * ps];
        if page_checksum(e.pgno, data) != e.ck {
            return Err(corrupt(&l.rel, FormatError::Checksum("page")));
        }
        insert.execute(rusqlite::params![
            db_id,
            e.pgno,
            txid as i64,
            data,
            now_ms() as i64
        ])?;
    }
    Ok(())
}

/// The version of `pgno` in the base of `db_id`, if the base is at or below `txid` and holds it.
pub(super) fn base_version(
    tx: &Connection,
    db_id: i64,
    pgno: u32,
    txid: u64,
) -> rusqlite::Result<Option<Version>> {
    let Some((obj, base_txid, slot)) = base_slot(tx, db_id, pgno, txid)? else {
        return Ok(None);
    };
    let Some(ck) = base_ck(tx, obj, slot)? else {
        return Ok(None);
    };
    let cached: Option<Vec<u8>> = tx
        .prepare_cached("SELECT data FROM page_cache WHERE db_id = ?1 AND pgno = ?2 AND txid = ?3")?
        .query_row(rusqlite::params![db_id, pgno, base_txid as i64], |r| {
            r.get(0)
        })
        .optional()?;
    let (bytes, cached) = match cached {
        Some(d) => (Bytes::Here(d), true),
        None => (Bytes::Remote(Loc { obj, slot }), false),
    };
    Ok(Some(Version {
        pgno,
        txid: base_txid,
        ck,
        bytes,
        cached,
    }))
}

fn base_ck(tx: &Connection, obj: i64, slot: u64) -> rusqlite::Result<Option<u64>> {
    let chunk: Option<Vec<u8>> = tx
        .prepare_cached("SELECT cks FROM base_cks WHERE obj = ?1 AND chunk = ?2")?
        .query_row(rusqlite::params![obj, (slot / CKS_PER_CHUNK) as i64], |r| {
            r.get(0)
        })
        .optional()?;
    let at = (slot % CKS_PER_CHUNK) as usize * 8;
    Ok(chunk.and_then(|c| {
        c.get(at..at + 8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8")))
    }))
}

/// The checksum of `pgno` in the base at or below `txid`.
pub(super) fn base_page_ck(
    tx: &Connection,
    db_id: i64,
    pgno: u32,
    txid: u64,
) -> rusqlite::Result<Option<u64>> {
    match base_slot(tx, db_id, pgno, txid)? {
        Some((obj, _, slot)) => base_ck(tx, obj, slot),
        None => Ok(None),
    }
}

/// Where the base of `db_id` holds `pgno`, if the base is at or below `txid` and holds it:
/// the base object, its TXID and the page's slot.
fn base_slot(
    tx: &Connection,
    db_id: i64,
    pgno: u32,
    txid: u64,
) -> rusqlite::Result<Option<(i64, u64, u64)>> {
    let Some((obj, base_txid, commit, ps)) = base_of(tx, db_id)? else {
        return Ok(None);
    };
    if base_txid > txid || pgno > commit {
        return Ok(None);
    }
    Ok(format::image_slot(ps, pgno).map(|slot| (obj, base_txid, slot)))
}

/// Where the bucket holds a version that was served from the cache.
fn cached_loc(tx: &Connection, db_id: i64, v: &Version) -> StoreResult<Option<Loc>> {
    let row: Option<(Option<i64>, Option<i64>)> = tx
        .prepare_cached("SELECT obj, slot FROM pages WHERE db_id = ?1 AND pgno = ?2 AND txid = ?3")?
        .query_row(rusqlite::params![db_id, v.pgno, v.txid as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    if let Some((Some(obj), Some(slot))) = row {
        return Ok(Some(Loc {
            obj,
            slot: slot as u64,
        }));
    }
    // Not a row: a page of the base image.
    let base: Option<(i64, u64, u32)> = tx
        .prepare_cached("SELECT obj, txid, page_size FROM bases WHERE db_id = ?1")?
        .query_row([db_id], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?))
        })
        .optional()?;
    Ok(base.and_then(|(obj, txid, ps)| {
        (txid == v.txid)
            .then(|| format::image_slot(ps, v.pgno))
            .flatten()
            .map(|slot| Loc { obj, slot })
    }))
}

/// Where an object's bytes are: (key relative to the generation, data offset, page size).
fn object_info(tx: &Connection, obj: i64) -> StoreResult<(String, u64, u32)> {
    tx.prepare_cached("SELECT key, data_offset, page_size FROM objects WHERE id = ?1")?
        .query_row([obj], |r| {
            Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?))
        })
        .optional()?
        .ok_or_else(|| StoreError::Stale(format!("object {obj} is no longer indexed")))
}

fn generation_of(tx: &Connection, db_id: i64) -> StoreResult<(DbKey, String)> {
    let (cluster, name, gn): (String, String, Option<String>) = tx
        .prepare_cached("SELECT cluster, name, generation FROM dbs WHERE id = ?1")?
        .query_row([db_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    let gn = gn.ok_or_else(|| StoreError::Stale("database has no generation".into()))?;
    Ok((DbKey { cluster, name }, gn))
}

/// Fetches page bytes from the bucket for the store's read paths.
pub(crate) struct RemoteBytes<'r> {
    pub remote: &'r Remote,
    /// Keep what is fetched in the page cache (not for whole-database reads: a snapshot would
    /// push out every page readers use).
    pub cache: bool,
}

impl Fetch for RemoteBytes<'_> {
    fn bytes(&self, tx: &Connection, db_id: i64, v: &Version) -> StoreResult<Vec<u8>> {
        let mut out = self.batch(tx, db_id, std::slice::from_ref(v))?;
        Ok(out.pop().expect("one page"))
    }

    /// A whole range GET's worth: sequential reads from the bucket are request-bound.
    fn batch_bytes(&self) -> usize {
        MAX_RANGE as usize
    }

    fn bucket(&self) -> bool {
        true
    }

    fn batch(&self, tx: &Connection, db_id: i64, vs: &[Version]) -> StoreResult<Vec<Vec<u8>>> {
        let mut out: Vec<Option<Vec<u8>>> = vec![None; vs.len()];
        let mut remote: Vec<(usize, Loc)> = Vec::new();
        for (i, v) in vs.iter().enumerate() {
            match &v.bytes {
                Bytes::Here(d) if !v.cached || page_checksum(v.pgno, d) == v.ck => {
                    if v.cached {
                        self.remote.touch(db_id, v.pgno, v.txid);
                    }
                    out[i] = Some(d.clone());
                }
                // A cached copy that fails its checksum is fetched again (and replaced).
                Bytes::Here(_) => {
                    tracing::warn!(db_id, pgno = v.pgno, "a cached page fails its checksum");
                    match cached_loc(tx, db_id, v)? {
                        Some(loc) => remote.push((i, loc)),
                        None => {
                            return Err(StoreError::Stale(format!(
                                "cached page {} fails its checksum",
                                v.pgno
                            )));
                        }
                    }
                }
                Bytes::Remote(loc) => remote.push((i, *loc)),
            }
        }
        remote.sort_by_key(|(_, l)| (l.obj, l.slot));
        let (key, gn) = match remote.is_empty() {
            true => (None, String::new()),
            false => {
                let (k, g) = generation_of(tx, db_id)?;
                (Some(k), g)
            }
        };
        let mut i = 0;
        while i < remote.len() {
            let (obj, first) = (remote[i].1.obj, remote[i].1.slot);
            let (rel, data_offset, ps) = object_info(tx, obj)?;
            let ps64 = u64::from(ps);
            let mut j = i + 1;
            while j < remote.len()
                && remote[j].1.obj == obj
                && remote[j].1.slot - remote[j - 1].1.slot <= MAX_GAP_SLOTS
                && (remote[j].1.slot - first + 1) * ps64 <= MAX_RANGE
            {
                j += 1;
            }
            let last = remote[j - 1].1.slot;
            let start = data_offset + first * ps64;
            let end = data_offset + (last + 1) * ps64;
            let full = layout::in_generation(key.as_ref().expect("set"), &gn, &rel);
            let (got, _) = self
                .remote
                .bucket
                .get_range(&full, start..end)?
                .ok_or_else(|| StoreError::Stale(format!("object {rel} is gone")))?;
            if got.len() as u64 != end - start {
                return Err(StoreError::Stale(format!(
                    "object {rel} is shorter than indexed"
                )));
            }
            for &(idx, loc) in &remote[i..j] {
                let v = &vs[idx];
                let at = ((loc.slot - first) * ps64) as usize;
                let data = &got[at..at + ps as usize];
                if page_checksum(v.pgno, data) != v.ck {
                    return Err(StoreError::Stale(format!(
                        "page {} of object {rel} fails its checksum",
                        v.pgno
                    )));
                }
                if self.cache {
                    self.remote.stash(db_id, v.pgno, v.txid, data);
                }
                out[idx] = Some(data.to_vec());
            }
            i = j;
        }
        Ok(out.into_iter().map(|o| o.expect("filled")).collect())
    }
}

impl Store {
    /// The remote half of the store; bucket mode only.
    pub(super) fn remote(&self) -> Option<&Arc<Remote>> {
        self.remote.as_ref()
    }

    /// Writes fetched pages and cache hits to `page_cache`.
    pub(super) fn flush_stash(&self, r: &Remote) {
        let s = r.take_stash();
        if s.pages.is_empty() && s.touched.is_empty() {
            return;
        }
        let now = now_ms() as i64;
        let res = self.write(|tx| {
            let mut ins = tx.prepare_cached(
                "INSERT OR REPLACE INTO page_cache(db_id, pgno, txid, data, atime)
                 SELECT ?1, ?2, ?3, ?4, ?5 WHERE EXISTS (SELECT 1 FROM dbs WHERE id = ?1)",
            )?;
            for (db_id, pgno, txid, data) in &s.pages {
                ins.execute(rusqlite::params![db_id, pgno, *txid as i64, data, now])?;
            }
            let mut touch = tx.prepare_cached(
                "UPDATE page_cache SET atime = ?4 WHERE db_id = ?1 AND pgno = ?2 AND txid = ?3",
            )?;
            for (db_id, pgno, txid) in &s.touched {
                touch.execute(rusqlite::params![db_id, pgno, *txid as i64, now])?;
            }
            Ok(())
        });
        if let Err(e) = res {
            tracing::warn!(error = %e, "writing fetched pages to the cache");
        }
        self.evict_if_needed(r);
    }

    /// Keeps the data directory under `--cache-size` (logs instead of failing a request).
    pub(super) fn evict_if_needed(&self, r: &Remote) {
        match self.enforce_cache_bound(r) {
            Ok(e) => {
                r.evicted_pages
                    .fetch_add(e.pages, std::sync::atomic::Ordering::Relaxed);
                r.evicted_dbs
                    .fetch_add(e.databases, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "evicting from the cache"),
        }
    }

    /// The databases indexed here that may be forgotten, least recently used first.
    pub(super) fn idle_databases(&self, r: &Remote) -> Vec<DbKey> {
        let keys = self.read(|tx| {
            let mut stmt = tx.prepare("SELECT cluster, name FROM dbs")?;
            let rows = stmt.query_map([], |row| {
                Ok(DbKey {
                    cluster: row.get(0)?,
                    name: row.get(1)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        });
        keys.map(|k| r.idle_of(k)).unwrap_or_default()
    }

    /// Makes the index of `key` current enough for `need` (bucket mode). A database that does
    /// not exist in the bucket has no rows afterwards.
    pub(super) fn sync_db(&self, r: &Remote, key: &DbKey, need: Need) -> StoreResult<()> {
        r.check_key(key)?;
        r.used(key);
        let st = r.db(key);
        if self.fresh_enough(r, key, &st, need)? {
            return Ok(());
        }
        let _g = st.lock.lock();
        if self.fresh_enough(r, key, &st, need)? {
            return Ok(());
        }
        self.refresh_locked(r, key, &st, need == Need::Full || need == Need::Commit)
    }

    pub(super) fn fresh_enough(
        &self,
        r: &Remote,
        key: &DbKey,
        st: &DbSync,
        need: Need,
    ) -> StoreResult<bool> {
        let s = st.state();
        let within = |t: Option<Instant>, d: Duration| t.is_some_and(|t| t.elapsed() < d);
        Ok(match need {
            Need::Recent => within(s.refreshed, r.cfg.poll_interval),
            Need::Txid(t) => {
                if s.refreshed.is_none() {
                    false
                } else {
                    let h = self.read(|tx| {
                        Ok(match find_db(tx, key)? {
                            Some(id) => head(tx, id)?.map_or(0, |h| h.max_txid),
                            None => 0,
                        })
                    })?;
                    h >= t
                }
            }
            Need::Commit => {
                within(s.refreshed, r.manifest_ttl()) && within(s.manifest_read, r.manifest_ttl())
            }
            Need::Poll => within(s.refreshed, r.cfg.poll_interval / 2),
            Need::Full => false,
        })
    }

    /// Re-reads the manifest if due (or `force`), ingests what it lists that is new here, then
    /// probes `l0/` for newer commits. Holds the database's lock.
    pub(super) fn refresh_locked(
        &self,
        r: &Remote,
        key: &DbKey,
        st: &DbSync,
        force: bool,
    ) -> StoreResult<()> {
        for attempt in 0..3 {
            let s = st.state();
            let due = force
                || attempt > 0
                || s.manifest_read
                    .is_none_or(|t| t.elapsed() >= r.manifest_ttl());
            if due || s.manifest.is_none() {
                let etag = if attempt > 0 { None } else { s.etag.as_deref() };
                match r.bucket.get_if_changed(&layout::manifest(key), etag)? {
                    None => {
                        self.drop_local(key)?;
                        st.update(|s| {
                            *s = SyncState {
                                manifest_read: Some(Instant::now()),
                                refreshed: Some(Instant::now()),
                                ..Default::default()
                            }
                        });
                        return Ok(());
                    }
                    Some(None) => st.update(|s| s.manifest_read = Some(Instant::now())),
                    Some(Some(got)) => {
                        let m = Manifest::decode(&got.bytes).map_err(|e| {
                            StoreError::Corrupt(format!("manifest of {:?}: {e}", key.name))
                        })?;
                        // Until the new manifest is applied in full, nothing here is current.
                        st.update(|s| *s = SyncState::default());
                        self.apply_manifest(r, key, &m)?;
                        st.update(|s| {
                            s.manifest = Some(m);
                            s.etag = got.etag;
                            s.manifest_read = Some(Instant::now());
                        });
                    }
                }
            }
            let Some(m) = st.state().manifest else {
                continue;
            };
            if m.deleted {
                st.update(|s| s.refreshed = Some(Instant::now()));
                return Ok(());
            }
            match self.probe(r, key, &m) {
                Ok(new) => {
                    st.update(|s| s.refreshed = Some(Instant::now()));
                    if new > 0 {
                        self.notify();
                    }
                    return Ok(());
                }
                Err(StoreError::Stale(why)) => {
                    tracing::debug!(db = %key.name, %why, "re-reading the manifest");
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Corrupt(format!(
            "the bucket's state of {:?} keeps changing under this server",
            key.name
        )))
    }

    /// Re-reads the manifest of `key` (conditionally) and applies it if it changed; returns the
    /// generation it names (`None` for a deleted or missing database). Holds the database's
    /// lock.
    pub(super) fn recheck_manifest(
        &self,
        r: &Remote,
        key: &DbKey,
        st: &DbSync,
    ) -> StoreResult<Option<String>> {
        let s = st.state();
        match r
            .bucket
            .get_if_changed(&layout::manifest(key), s.etag.as_deref())?
        {
            None => Ok(None),
            Some(None) => {
                st.update(|s| s.manifest_read = Some(Instant::now()));
                Ok(s.manifest.filter(|m| !m.deleted).map(|m| m.generation))
            }
            Some(Some(got)) => {
                let m = Manifest::decode(&got.bytes)
                    .map_err(|e| StoreError::Corrupt(format!("manifest of {:?}: {e}", key.name)))?;
                st.update(|s| *s = SyncState::default());
                self.apply_manifest(r, key, &m)?;
                let gn = (!m.deleted).then(|| m.generation.clone());
                st.update(|s| {
                    s.manifest = Some(m);
                    s.etag = got.etag;
                    s.manifest_read = Some(Instant::now());
                });
                Ok(gn)
            }
        }
    }

    /// Forgets everything this server knows of `key` (it is gone from the bucket, or its
    /// generation changed).
    pub(super) fn drop_local(&self, key: &DbKey) -> StoreResult<()> {
        let dropped = self.write(|tx| match find_db(tx, key)? {
            Some(id) => {
                drop_rows(tx, id)?;
                tx.execute("DELETE FROM dbs WHERE id = ?1", [id])?;
                Ok(true)
            }
            None => Ok(false),
        })?;
        if dropped {
            self.notify();
        }
        Ok(())
    }

    /// Brings the index in line with a manifest: a new generation drops the old rows; listed
    /// objects not indexed yet are loaded and ingested.
    fn apply_manifest(&self, r: &Remote, key: &DbKey, m: &Manifest) -> StoreResult<()> {
        let (db_id, known) = self.write(|tx| {
            let id = match find_db(tx, key)? {
                Some(id) => {
                    let gn: Option<String> = tx.query_row(
                        "SELECT generation FROM dbs WHERE id = ?1",
                        [id],
                        |r| r.get(0),
                    )?;
                    if m.deleted || gn.as_deref() != Some(m.generation.as_str()) {
                        drop_rows(tx, id)?;
                        tx.execute("DELETE FROM dbs WHERE id = ?1", [id])?;
                        None
                    } else {
                        Some(id)
                    }
                }
                None => None,
            };
            if m.deleted {
                return Ok((None, Vec::new()));
            }
            let id = match id {
                Some(id) => id,
                None => {
                    tx.execute(
                        "INSERT INTO dbs(cluster, name, created_ms, generation) VALUES (?1, ?2, ?3, ?4)",
                        rusqlite::params![key.cluster, key.name, now_ms() as i64, m.generation],
                    )?;
                    tx.last_insert_rowid()
                }
            };
            let known: Vec<String> = tx
                .prepare("SELECT key FROM objects WHERE db_id = ?1")?
                .query_map([id], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            Ok((Some(id), known))
        })?;
        let Some(db_id) = db_id else {
            self.notify();
            return Ok(());
        };
        for o in m.listed().filter(|o| !known.contains(&o.key)) {
            let l = self
                .load_listed(r, key, &m.generation, o)?
                .ok_or_else(|| StoreError::Stale(format!("listed object {} is missing", o.key)))?;
            let done = self.write(|tx| ingest(tx, db_id, &l))?;
            r.pruned
                .fetch_add(done.pruned, std::sync::atomic::Ordering::Relaxed);
        }
        // Objects the manifest no longer lists and no row points into (their versions were
        // re-pointed to the segment or image that merged them).
        let listed: std::collections::HashSet<&str> = m.listed().map(|o| o.key.as_str()).collect();
        self.write(|tx| {
            let unused: Vec<(i64, String)> = tx
                .prepare(
                    "SELECT id, key FROM objects WHERE db_id = ?1
                       AND id NOT IN (SELECT obj FROM bases WHERE db_id = ?1)
                       AND id NOT IN (SELECT DISTINCT obj FROM pages
                                      WHERE db_id = ?1 AND obj IS NOT NULL)",
                )?
                .query_map([db_id], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<Result<_, _>>()?;
            for (id, key) in unused {
                if !listed.contains(key.as_str()) {
                    tx.execute("DELETE FROM objects WHERE id = ?1", [id])?;
                }
            }
            Ok(())
        })?;
        Ok(())
    }

    fn load_listed(
        &self,
        r: &Remote,
        key: &DbKey,
        gn: &str,
        o: &ObjRef,
    ) -> StoreResult<Option<Loaded>> {
        // Header, index and the first page: a cold open needs page 1 next.
        let hint = format::HEADER_SIZE as u64 + o.index_len + u64::from(o.page_size);
        r.load(key, gn, &o.key, hint, true, &self.tmp_dir)
    }

    /// Ingests `l0/` commits after the local head; returns how many transactions were new.
    fn probe(&self, r: &Remote, key: &DbKey, m: &Manifest) -> StoreResult<u64> {
        let mut new = 0;
        loop {
            let (db_id, h) = self.read(|tx| {
                let id = find_db(tx, key)?
                    .ok_or_else(|| StoreError::Stale("database row vanished".into()))?;
                Ok((id, head(tx, id)?))
            })?;
            let next = h.as_ref().map_or(1, |h| h.max_txid + 1).max(m.next_l0);
            if h.as_ref().map_or(0, |h| h.max_txid) + 1 < m.next_l0 {
                return Err(StoreError::Stale(format!(
                    "index ends before the manifest's next commit {}",
                    m.next_l0
                )));
            }
            let rel = layout::l0(next);
            let Some(l) = r.load(key, &m.generation, &rel, 0, true, &self.tmp_dir)? else {
                return Ok(new);
            };
            let first = l.txns.first().expect("checked");
            let pre = h.as_ref().map_or(0, |h| h.post_apply);
            if l.header.level != 0 || first.min_txid != next || (next > 1 && first.pre_apply != pre)
            {
                // Not a commit that follows our head (a segment's key, or our view is stale):
                // read the manifest again.
                return Err(StoreError::Stale(format!(
                    "{rel} does not follow the index"
                )));
            }
            new += self.write(|tx| ingest(tx, db_id, &l))?.txns;
        }
    }

    /// Creates the database in the bucket if it does not exist there (a new manifest); returns
    /// its generation. Holds the database's lock.
    pub(super) fn ensure_manifest(
        &self,
        r: &Remote,
        key: &DbKey,
        st: &DbSync,
    ) -> StoreResult<String> {
        for _ in 0..4 {
            if let Some(m) = st.state().manifest.filter(|m| !m.deleted) {
                return Ok(m.generation);
            }
            let current = r.bucket.get(&layout::manifest(key))?;
            let (fresh, cas) = match &current {
                None => (Manifest::new(Vec::new()), None),
                Some(got) => {
                    let m = Manifest::decode(&got.bytes)
                        .map_err(|e| StoreError::Corrupt(format!("manifest: {e}")))?;
                    if !m.deleted {
                        self.apply_manifest(r, key, &m)?;
                        st.update(|s| {
                            s.manifest = Some(m);
                            s.etag = got.etag.clone();
                            s.manifest_read = Some(Instant::now());
                        });
                        continue;
                    }
                    // A deleted database: a new generation (the tombstone already lists the old
                    // one among the dead).
                    (Manifest::new(m.dead_generations.clone()), got.etag.clone())
                }
            };
            let won =
                r.bucket
                    .put_settled(&layout::manifest(key), fresh.encode(), cas.as_deref())?;
            if let Cas::Done(etag) = won {
                self.apply_manifest(r, key, &fresh)?;
                st.update(|s| {
                    s.manifest = Some(fresh.clone());
                    s.etag = etag;
                    s.manifest_read = Some(Instant::now());
                    s.refreshed = Some(Instant::now());
                });
                return Ok(fresh.generation);
            }
        }
        Err(StoreError::Unavailable(format!(
            "could not create {:?} in the bucket: its manifest keeps changing",
            key.name
        )))
    }
}

/// Deletes every row of one database except its `dbs` row.
pub(super) fn drop_rows(tx: &Connection, db_id: i64) -> rusqlite::Result<()> {
    tx.execute(
        "DELETE FROM base_cks WHERE obj IN (SELECT id FROM objects WHERE db_id = ?1)",
        [db_id],
    )?;
    for table in ["pages", "txns", "objects", "bases", "page_cache"] {
        tx.execute(&format!("DELETE FROM {table} WHERE db_id = ?1"), [db_id])?;
    }
    Ok(())
}

impl Store {
    /// Deletes a database from the bucket: its manifest becomes a tombstone (its generation's
    /// objects are garbage from then on), its lease ends, and this server forgets it.
    pub(super) fn delete_bucketed(&self, r: &Remote, key: &DbKey) -> StoreResult<()> {
        r.check_key(key)?;
        let st = r.db(key);
        let _g = st.lock.lock();
        let rel = layout::manifest(key);
        let mut done = false;
        for _ in 0..4 {
            let Some(got) = r.bucket.get(&rel)? else {
                break;
            };
            let m = Manifest::decode(&got.bytes)
                .map_err(|e| StoreError::Corrupt(format!("manifest of {:?}: {e}", key.name)))?;
            if m.deleted {
                break;
            }
            let mut dead = m.dead_generations.clone();
            dead.push(crate::server::bucket::manifest::Retired {
                key: m.generation.clone(),
                at_ms: now_ms(),
            });
            let tomb = Manifest {
                deleted: true,
                next_l0: 1,
                base: None,
                segments: Vec::new(),
                retired: Vec::new(),
                dead_generations: dead,
                updated_ms: now_ms(),
                ..m
            };
            let etag = got.etag.ok_or_else(|| {
                StoreError::Corrupt("the object store returned no ETag for a manifest".into())
            })?;
            if let Cas::Done(_) = r.bucket.put_settled(&rel, tomb.encode(), Some(&etag))? {
                done = true;
                break;
            }
        }
        self.drop_local(key)?;
        st.update(|s| *s = SyncState::default());
        if !done {
            return Err(StoreError::NoDb(key.name.clone()));
        }
        // The database is deleted; a lease left behind only ends later by itself.
        if let Err(e) = r.leases.remove(key) {
            tracing::warn!(db = %key.name, error = %e, "ending the lease of a deleted database");
        }
        // Its old generation is garbage: the next compaction pass deletes it.
        r.mark_dirty(key);
        self.notify();
        Ok(())
    }
}
