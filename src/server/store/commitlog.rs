//! The commit log, `DATA_DIR/commits.log`: how a small accepted transaction (`POST /db/tx`) is
//! made durable with one synced write instead of an fsynced SQLite commit.
//!
//! A local store commits each small transaction to `store.db` with `synchronous=NORMAL` (the
//! log's frames are written but not synced), after the reply and in a batch with others
//! ([`super::writer`]), after writing the transaction's LTX file, as one record, to this log
//! with `O_DSYNC` (and `O_DIRECT` where the filesystem has it). A synced SQLite commit writes a
//! few whole 32 KiB store pages to its log and syncs them; a record here is the LTX file itself,
//! padded to 4 KiB.
//!
//! Invariants:
//! - a record is written, and durable, before its transaction is acknowledged or commits in
//!   `store.db`; a record whose write fails is overwritten with zeros, durably, before the
//!   failure is reported (or the process aborts: its outcome could not be made certain);
//! - each record carries a log sequence number (LSN), one more than the record before it, and
//!   `store.db` keeps the LSN of the last logged transaction it holds (`meta`, [`META_KEY`]) in
//!   the same SQLite transaction. Every other write to `store.db` is synced (`synchronous=FULL`),
//!   which makes every earlier logged transaction durable too, so after a crash `store.db` holds
//!   exactly the logged transactions up to its LSN, and the ones after it are in the log;
//! - records are written one after another from the start of the file (after its first block,
//!   which holds a random salt chosen at each open). The log goes back to the start only when
//!   everything in it is durable in `store.db`: at open, after the records past `store.db`'s
//!   LSN were applied and synced, and after a transaction that did not fit was committed with a
//!   sync. Older records further on have lower LSNs or another salt, so a scan from the start
//!   stops at the first record that is torn, zero, not the next LSN, or not of this open. Every
//!   record's CRC covers the salt, so bytes a client sent (a page inside a record) can never be
//!   taken for a record: the client cannot know the salt.
//!
//! Recovery ([`recover`]) applies the records past `store.db`'s LSN with the same code that
//! accepted them ([`super::commit_rows`]), in order, at open; the same code ([`apply_records`])
//! applies a batch again after it was rolled back. This module does not check leases
//! (they were checked when the record was written) and does not parse HTTP.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

use super::{DbKey, Fetch, StoreError, StoreResult, commit_rows, verify};
use crate::ltx::CRC64;

/// The log's file name in the data directory.
pub const FILE: &str = "commits.log";
/// The log's size; it is written once with zeros, so a record never changes the file's size or
/// allocation and its sync writes data only.
pub const LOG_SIZE: u64 = 8 << 20;
/// Largest LTX file written to the log; a larger one is committed with a synced SQLite commit
/// (its own size dwarfs the sync's cost).
pub const MAX_PAYLOAD: u64 = 1 << 20;
/// The `meta` key holding the LSN of the last logged transaction in `store.db`.
pub const META_KEY: &str = "commit_log_lsn";
/// Records start and end on this boundary (what `O_DIRECT` needs).
const BLOCK: usize = 4096;
/// Longest cluster and name together that a record takes.
const MAX_NAMES: usize = 1024;
/// The fixed part of a record: magic, LSN, payload length, name lengths, CRC.
const HEADER: usize = 32;
const MAGIC: &[u8; 8] = b"LVCMTLOG";
/// The first block: this magic, the salt, and a CRC of both.
const HEADER_MAGIC: &[u8; 8] = b"LVCMTHDR";
/// The largest record, padded.
const MAX_RECORD: usize = round_up(HEADER + MAX_NAMES + MAX_PAYLOAD as usize);

const fn round_up(n: usize) -> usize {
    n.div_ceil(BLOCK) * BLOCK
}

/// The open log of a local store, used under the store's writer lock.
pub struct CommitLog {
    /// Opened with `O_DSYNC` (and `O_DIRECT` where it can be): a write returns once it is
    /// durable.
    file: File,
    /// Where the next record goes.
    head: u64,
    /// This open's salt (in the first block), part of every record's CRC.
    salt: u64,
    /// The LSN of the last record whose transaction committed.
    lsn: u64,
    /// Holds the staged record at `start..start + len` (`start` aligned to [`BLOCK`]).
    buf: Vec<u8>,
    start: usize,
    /// Length of the staged record before padding; 0 when none is staged.
    staged: usize,
    /// Where the payload of the staged record begins (relative to `start`).
    payload_at: usize,
}

/// What [`CommitLog::stage`] decided for one transaction.
#[derive(Debug, PartialEq, Eq)]
pub enum Staged {
    /// The record is in the buffer; verify [`CommitLog::payload`], then [`CommitLog::append`].
    Logged,
    /// Too large for the log: commit with a sync, without a record.
    TooLarge,
    /// Does not fit in what is left of the log: commit with a sync, then
    /// [`CommitLog::restart`].
    Full,
}

impl CommitLog {
    /// Opens (creating if needed) the log in `data_dir`, positioned at its start; `lsn` is the
    /// LSN `store.db` holds. Call only when everything in the log is durable in `store.db`.
    fn open(data_dir: &Path, lsn: u64) -> io::Result<CommitLog> {
        let path = data_dir.join(FILE);
        create(&path)?;
        let (file, direct) = open_for_writes(&path)?;
        tracing::debug!(direct, "commit log {}", path.display());
        let mut buf = vec![0u8; MAX_RECORD + BLOCK];
        let start = buf.as_ptr().align_offset(BLOCK);
        buf.truncate(start + MAX_RECORD);
        let mut log = CommitLog {
            file,
            head: BLOCK as u64,
            salt: rand::random(),
            lsn,
            buf,
            start,
            staged: 0,
            payload_at: 0,
        };
        // A new salt: a scan of the log after a crash reads only records written from now on.
        let block = &mut log.buf[log.start..log.start + BLOCK];
        block.fill(0);
        block[..8].copy_from_slice(HEADER_MAGIC);
        block[8..16].copy_from_slice(&log.salt.to_le_bytes());
        let crc = CRC64.checksum(&block[..16]);
        block[16..24].copy_from_slice(&crc.to_le_bytes());
        log.file.write_all_at(block, 0)?;
        Ok(log)
    }

    /// Reads the `len`-byte LTX file of `key` from `body` into a record, unless it is too
    /// large for the log or does not fit in what is left of it (then `body` is untouched).
    pub fn stage(&mut self, key: &DbKey, body: &mut dyn Read, len: u64) -> io::Result<Staged> {
        self.staged = 0;
        let names = key.cluster.len() + key.name.len();
        if len > MAX_PAYLOAD || names > MAX_NAMES {
            return Ok(Staged::TooLarge);
        }
        let total = HEADER + names + len as usize;
        if self.head + round_up(total) as u64 > LOG_SIZE {
            return Ok(Staged::Full);
        }
        let rec = &mut self.buf[self.start..self.start + round_up(total)];
        rec[8..16].fill(0);
        rec[16..20].copy_from_slice(&(len as u32).to_le_bytes());
        rec[20..22].copy_from_slice(&(key.cluster.len() as u16).to_le_bytes());
        rec[22..24].copy_from_slice(&(key.name.len() as u16).to_le_bytes());
        let mut at = HEADER;
        for s in [&key.cluster, &key.name] {
            rec[at..at + s.len()].copy_from_slice(s.as_bytes());
            at += s.len();
        }
        body.read_exact(&mut rec[at..total])?;
        rec[total..].fill(0);
        self.payload_at = at;
        self.staged = total;
        Ok(Staged::Logged)
    }

    /// The staged LTX file.
    pub fn payload(&self) -> &[u8] {
        &self.buf[self.start + self.payload_at..self.start + self.staged]
    }

    /// The LSN the staged record gets.
    pub fn next_lsn(&self) -> u64 {
        self.lsn + 1
    }

    /// Writes the staged record at the head; it is durable when this returns `Ok`. On an error
    /// the record may be partly written: call [`CommitLog::undo`].
    pub fn append(&mut self) -> io::Result<()> {
        assert!(self.staged > 0, "append without a staged record");
        let total = self.staged;
        let rec = &mut self.buf[self.start..self.start + round_up(total)];
        rec[..8].copy_from_slice(MAGIC);
        rec[8..16].copy_from_slice(&(self.lsn + 1).to_le_bytes());
        let crc = record_crc(self.salt, &rec[..total]);
        rec[24..32].copy_from_slice(&crc.to_le_bytes());
        self.file.write_all_at(rec, self.head)
    }

    /// The staged record's transaction committed: the next record goes after it.
    pub fn committed(&mut self) {
        self.head += round_up(self.staged) as u64;
        self.lsn += 1;
        self.staged = 0;
    }

    /// Makes the record written at the head unreadable (its first block zeroed, durably), after
    /// its transaction failed to commit. If that fails, whether the transaction will be applied
    /// at the next start is unknown, so the process stops rather than report either outcome.
    pub fn undo(&mut self) {
        self.staged = 0;
        if let Err(e) = self.zero_block(self.head) {
            tracing::error!(
                "the commit log's last record, whose transaction failed to commit, could not be \
                 erased ({e}): stopping, so that the next start settles it from the log"
            );
            std::process::abort();
        }
    }

    /// Everything logged so far is durable in `store.db` (a synced commit came after it): the
    /// next record goes at the start.
    pub fn restart(&mut self) {
        self.head = BLOCK as u64;
    }

    fn zero_block(&mut self, at: u64) -> io::Result<()> {
        let block = &mut self.buf[self.start..self.start + BLOCK];
        block.fill(0);
        self.file.write_all_at(block, at)
    }
}

/// The CRC of a record: the log's salt, and everything of the record but the CRC field and the
/// padding.
fn record_crc(salt: u64, rec: &[u8]) -> u64 {
    let mut d = CRC64.digest();
    d.update(&salt.to_le_bytes());
    d.update(&rec[..24]);
    d.update(&rec[HEADER..]);
    d.finalize()
}

/// Creates the log as [`LOG_SIZE`] bytes of zeros, or completes one a crash left shorter.
fn create(path: &Path) -> io::Result<()> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)?;
    let len = f.metadata()?.len();
    if len >= LOG_SIZE {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut at = len;
    while at < LOG_SIZE {
        let n = (LOG_SIZE - at).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    f.sync_all()?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Opens the log for synced writes, with `O_DIRECT` where the filesystem supports it (tmpfs
/// does not), probing it with a write of zeros to the first block.
fn open_for_writes(path: &Path) -> io::Result<(File, bool)> {
    let direct = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC | libc::O_DIRECT)
        .open(path);
    if let Ok(f) = direct {
        let probe = vec![0u8; 2 * BLOCK];
        let at = probe.as_ptr().align_offset(BLOCK);
        match f.write_all_at(&probe[at..at + BLOCK], 0) {
            Ok(()) => return Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(path)?;
    Ok((f, false))
}

/// One record read back from the log.
struct Scanned {
    lsn: u64,
    key: DbKey,
    payload: Vec<u8>,
}

/// Reads the chain of records from the start of the log: each valid, of the log's salt, and one
/// LSN after the one before. Holds one record at a time.
struct Scanner {
    file: File,
    at: u64,
    prev: Option<u64>,
    /// `None`: the first block is not a valid header, so the log holds no record.
    salt: Option<u64>,
}

impl Scanner {
    fn open(path: &Path) -> io::Result<Scanner> {
        let file = File::open(path)?;
        let mut block = [0u8; 24];
        let salt = (read_at(&file, &mut block, 0)?
            && &block[..8] == HEADER_MAGIC
            && CRC64.checksum(&block[..16]).to_le_bytes() == block[16..24])
            .then(|| u64::from_le_bytes(block[8..16].try_into().unwrap()));
        Ok(Scanner {
            file,
            at: BLOCK as u64,
            prev: None,
            salt,
        })
    }

    fn next(&mut self) -> io::Result<Option<Scanned>> {
        let Some(salt) = self.salt else {
            return Ok(None);
        };
        let mut head = [0u8; HEADER];
        if self.at + HEADER as u64 > LOG_SIZE || !read_at(&self.file, &mut head, self.at)? {
            return Ok(None);
        }
        if &head[..8] != MAGIC {
            return Ok(None);
        }
        let le64 = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap());
        let le16 = |b: &[u8]| usize::from(u16::from_le_bytes(b.try_into().unwrap()));
        let lsn = le64(&head[8..16]);
        let len = u32::from_le_bytes(head[16..20].try_into().unwrap()) as usize;
        let (cl, nl) = (le16(&head[20..22]), le16(&head[22..24]));
        let total = HEADER + cl + nl + len;
        if len as u64 > MAX_PAYLOAD
            || cl + nl > MAX_NAMES
            || self.at + round_up(total) as u64 > LOG_SIZE
            || self.prev.is_some_and(|p| lsn != p + 1)
        {
            return Ok(None);
        }
        let mut rec = vec![0u8; total];
        if !read_at(&self.file, &mut rec, self.at)? {
            return Ok(None);
        }
        if record_crc(salt, &rec) != le64(&rec[24..32]) {
            return Ok(None);
        }
        let text = |b: &[u8]| String::from_utf8(b.to_vec()).ok();
        let (Some(cluster), Some(name)) = (
            text(&rec[HEADER..HEADER + cl]),
            text(&rec[HEADER + cl..HEADER + cl + nl]),
        ) else {
            return Ok(None);
        };
        self.at += round_up(total) as u64;
        self.prev = Some(lsn);
        rec.drain(..HEADER + cl + nl);
        Ok(Some(Scanned {
            lsn,
            key: DbKey { cluster, name },
            payload: rec,
        }))
    }
}

/// The databases (cluster, name) that records of the log in `data_dir` name: read by the mode
/// check at start, before the log is applied.
pub fn logged_databases(
    data_dir: &Path,
) -> io::Result<std::collections::BTreeSet<(String, String)>> {
    let mut out = std::collections::BTreeSet::new();
    let path = data_dir.join(FILE);
    if path.exists() {
        let mut scan = Scanner::open(&path)?;
        while let Some(r) = scan.next()? {
            out.insert((r.key.cluster, r.key.name));
        }
    }
    Ok(out)
}

/// Fills `buf` from `at`; false if the file ends first.
fn read_at(f: &File, buf: &mut [u8], at: u64) -> io::Result<bool> {
    match f.read_exact_at(buf, at) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// The LSN of the last logged transaction `tx` holds (0 for none).
fn stored_lsn(tx: &Connection) -> rusqlite::Result<u64> {
    let v: Option<String> = tx
        .query_row("SELECT value FROM meta WHERE key = ?1", [META_KEY], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(v.and_then(|v| v.parse().ok()).unwrap_or(0))
}

/// Records `lsn` as the last logged transaction, in the caller's transaction.
pub fn set_lsn(tx: &Connection, lsn: u64) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO meta(key, value) VALUES (?1, ?2)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute(rusqlite::params![META_KEY, lsn.to_string()])?;
    Ok(())
}

/// What [`recover`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Transactions applied from the log.
    pub applied: u64,
}

/// At open, before anything else writes: applies the logged transactions `store.db` lacks (a
/// crash of the machine lost its unsynced commits), syncs `store.db`, and opens the log at its
/// start. A record that no longer applies means `store.db` and the log disagree: the store does
/// not open, and the error says how to start without the log.
pub fn recover(
    data_dir: &Path,
    writer: &mut Connection,
    fetch: &dyn Fetch,
) -> StoreResult<(CommitLog, Recovered)> {
    writer.pragma_update(None, "synchronous", "FULL")?;
    let tx = writer.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    // The LSN is written even when unchanged: this synced commit makes everything the log
    // holds durable in `store.db`, so the log can start over.
    let (lsn, applied) = apply_records(data_dir, &tx, fetch)?;
    tx.commit()?;
    let path = data_dir.join(FILE);
    if applied > 0 {
        tracing::info!("applied {applied} transactions from {}", path.display());
    }
    Ok((CommitLog::open(data_dir, lsn)?, Recovered { applied }))
}

/// Applies, in `tx`, the records of the log past the LSN `store.db` holds, in order, with the
/// code that accepted them; returns the LSN of the last one and how many were applied. At open
/// ([`recover`]), and when a batch of logged transactions was rolled back
/// ([`super::writer`]). Records the LSN in `tx` (even when nothing was applied). A record that
/// does not apply is [`StoreError::Corrupt`].
pub fn apply_records(
    data_dir: &Path,
    tx: &Connection,
    fetch: &dyn Fetch,
) -> StoreResult<(u64, u64)> {
    let mut lsn = stored_lsn(tx)?;
    let mut applied = 0;
    let path = data_dir.join(FILE);
    if !path.exists() {
        set_lsn(tx, lsn)?;
        return Ok((lsn, 0));
    }
    let mut scan = Scanner::open(&path)?;
    while let Some(r) = scan.next()? {
        if r.lsn <= lsn {
            continue;
        }
        let len = r.payload.len() as u64;
        commit_rows(tx, &r.key, fetch, None, |head, sink| {
            verify::ltx(head, len, &r.payload[..], sink)
        })
        .map_err(|e| {
            StoreError::Corrupt(format!(
                "record {} of {} (database {:?} of cluster {:?}) does not apply to \
                 store.db: {e}. The store was not changed. Moving {FILE} out of the data \
                 directory lets the server start without the transactions in it.",
                r.lsn,
                path.display(),
                r.key.name,
                r.key.cluster
            ))
        })?;
        lsn = r.lsn;
        applied += 1;
        if applied == 1 {
            tracing::info!("applying transactions from {}", path.display());
        }
    }
    set_lsn(tx, lsn)?;
    Ok((lsn, applied))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;
    use std::time::Duration;

    use super::super::{DbKey, Store, StoreError};
    use super::{FILE, LOG_SIZE, Scanner};
    use crate::ltx::{self, EMPTY_CHECKSUM, checksum_xor, page_checksum};
    use crate::wire::Pos;

    const PS: u32 = 4096;

    /// A database as the test expects it: its pages and position.
    #[derive(Clone, Default)]
    struct Model {
        pages: BTreeMap<u32, Vec<u8>>,
        pos: Option<Pos>,
    }

    impl Model {
        /// The LTX file that sets `pages` pages from `first` to bytes derived from `seed`.
        /// (`first` is moved down to leave no gap in the database.)
        fn tx(&self, first: u32, pages: u32, seed: u64) -> (Vec<u8>, Model) {
            let end = first + pages;
            let first = first.min(self.pages.len() as u32 + 1);
            let pages = end - first;
            let mut next = self.clone();
            for p in first..first + pages {
                let byte = (seed.wrapping_mul(31) + u64::from(p)) as u8;
                next.pages.insert(p, vec![byte; PS as usize]);
            }
            let commit = *next.pages.keys().last().unwrap();
            let pre = self.pos.map_or(0, |p| p.checksum.0);
            let txid = self.pos.map_or(0, |p| p.txid.0) + 1;
            let hdr = ltx::Header::new(PS, commit, txid, txid, pre);
            let mut w = ltx::Writer::new(Vec::new(), &hdr).unwrap();
            let mut post = EMPTY_CHECKSUM;
            for (p, d) in &next.pages {
                post = checksum_xor(post, page_checksum(*p, d));
                if (first..first + pages).contains(p) {
                    w.write_page(*p, d).unwrap();
                }
            }
            let bytes = w.finish(post).unwrap().1;
            next.pos = Some(Pos::new(txid, post));
            (bytes, next)
        }
    }

    fn key(name: &str) -> DbKey {
        DbKey {
            cluster: "c".into(),
            name: name.into(),
        }
    }

    fn open(dir: &Path) -> Store {
        Store::open(dir, Duration::from_secs(3600)).unwrap()
    }

    /// A consistent copy of `store.db` as it is now: what a crash of the machine can leave when
    /// the commits after it were not synced.
    fn snapshot(store: &Store, to: &Path) {
        // As of the last commit: its batch committed (unsynced), as a read would have it.
        store.w.settle();
        snapshot_as_is(store, to);
    }

    /// A copy of `store.db` as committed now, an open batch not included: what a crash of the
    /// server (or the machine) leaves while a batch is open.
    fn snapshot_as_is(store: &Store, to: &Path) {
        let conn = super::super::schema::open_reader(&store.path).unwrap();
        let mut out = rusqlite::Connection::open(to).unwrap();
        rusqlite::backup::Backup::new(&conn, &mut out)
            .unwrap()
            .step(-1)
            .unwrap();
    }

    /// A data directory holding `snap` as `store.db` and `from`'s commit log.
    fn crashed_copy(from: &Path, snap: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        std::fs::copy(snap, to.join("store.db")).unwrap();
        std::fs::copy(from.join(FILE), to.join(FILE)).unwrap();
    }

    fn assert_serves(store: &Store, name: &str, m: &Model) {
        let k = key(name);
        let pgnos: Vec<u32> = m.pages.keys().copied().collect();
        let got = store.pages_at(&k, None, &pgnos, 0).unwrap();
        assert_eq!(Some(got.pos), m.pos, "{name}: position");
        let want: Vec<(u32, Vec<u8>)> = m.pages.clone().into_iter().collect();
        assert_eq!(got.pages, want, "{name}: pages");
    }

    fn commit(store: &Store, name: &str, m: &mut Model, first: u32, pages: u32, seed: u64) {
        let (bytes, next) = m.tx(first, pages, seed);
        let a = store
            .apply_ltx(&key(name), None, bytes.len() as u64, &bytes[..])
            .unwrap();
        assert_eq!(Some(a.pos), next.pos);
        *m = next;
    }

    fn records(dir: &Path) -> Vec<u64> {
        let mut s = Scanner::open(&dir.join(FILE)).unwrap();
        let mut out = vec![];
        while let Some(r) = s.next().unwrap() {
            out.push(r.lsn);
        }
        out
    }

    /// `store.db` as of any commit after the last sync is what a crash of the machine can
    /// leave; from each of them, the open applies the logged commits after it and ends at the
    /// last acknowledged one.
    #[test]
    fn every_state_a_crash_can_leave_comes_back_to_the_last_commit() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let store = open(&live);
        let (mut a, mut b) = (Model::default(), Model::default());
        let mut snaps = vec![];
        let snap = |i: usize| dir.path().join(format!("snap{i}"));
        snapshot(&store, &snap(0));
        snaps.push(snap(0));
        for i in 0..12u64 {
            if i % 3 == 2 {
                commit(&store, "b", &mut b, 1 + (i as u32 % 4), 2, i);
            } else {
                commit(
                    &store,
                    "a",
                    &mut a,
                    1 + (i as u32 % 5),
                    1 + (i as u32 % 3),
                    i,
                );
            }
            snapshot(&store, &snap(snaps.len()));
            snaps.push(snap(snaps.len()));
        }
        assert_eq!(records(&live), (1..=12).collect::<Vec<_>>());
        drop(store);
        for (i, s) in snaps.iter().enumerate() {
            let to = dir.path().join(format!("crashed{i}"));
            crashed_copy(&live, s, &to);
            let store = open(&to);
            assert_serves(&store, "a", &a);
            assert_serves(&store, "b", &b);
            drop(store);
            // Opened again: nothing is applied twice.
            let store = open(&to);
            assert_serves(&store, "a", &a);
            assert_serves(&store, "b", &b);
        }
    }

    /// A backup of a store no server runs on, after a crash of the machine, holds the commits
    /// only its log had.
    #[test]
    fn a_backup_after_a_crash_holds_the_logged_commits() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let store = open(&live);
        let mut a = Model::default();
        commit(&store, "a", &mut a, 1, 3, 1);
        let snap = dir.path().join("snap");
        snapshot(&store, &snap);
        for i in 2..6 {
            commit(&store, "a", &mut a, 2, 2, i);
        }
        drop(store);
        let crashed = dir.path().join("crashed");
        crashed_copy(&live, &snap, &crashed);
        let dest = dir.path().join("backup");
        super::super::backup::backup(&crashed, &dest).unwrap();
        std::fs::remove_dir_all(&crashed).unwrap();
        let store = open(&dest);
        assert_serves(&store, "a", &a);
    }

    /// A record torn by the crash (its transaction was never acknowledged) ends the log: the
    /// store opens at the commit before it.
    #[test]
    fn a_torn_last_record_is_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let store = open(&live);
        let mut a = Model::default();
        for i in 0..3 {
            commit(&store, "a", &mut a, 1, 2, i);
        }
        let before_last = a.clone();
        let snap = dir.path().join("snap");
        snapshot(&store, &snap);
        commit(&store, "a", &mut a, 2, 3, 9);
        drop(store);
        let to = dir.path().join("crashed");
        crashed_copy(&live, &snap, &to);
        // The fourth record starts after the header block and three records of three blocks
        // each; flip a byte of its payload.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(to.join(FILE))
            .unwrap();
        use std::os::unix::fs::FileExt;
        let at = 4096 + 3 * 12288 + 5000;
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, at).unwrap();
        f.write_all_at(&[byte[0] ^ 0xff], at).unwrap();
        assert_eq!(records(&to), vec![1, 2, 3]);
        let store = open(&to);
        assert_serves(&store, "a", &before_last);
    }

    /// A record past `store.db`'s LSN that does not apply means the two disagree: the store does
    /// not open, says why and how to go on, and is left as it was.
    #[test]
    fn a_record_that_does_not_apply_stops_the_open() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let store = open(&live);
        let mut a = Model::default();
        for i in 0..4 {
            commit(&store, "a", &mut a, 1, 1, i);
        }
        let snap = dir.path().join("snap");
        snapshot(&store, &snap);
        drop(store);
        rusqlite::Connection::open(&snap)
            .unwrap()
            .execute(
                "UPDATE meta SET value = '2' WHERE key = ?1",
                [super::META_KEY],
            )
            .unwrap();
        let to = dir.path().join("crashed");
        crashed_copy(&live, &snap, &to);
        let err = match Store::open(&to, Duration::from_secs(3600)) {
            Err(e) => e,
            Ok(_) => panic!("opened a store its log disagrees with"),
        };
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Corrupt(_)), "{msg}");
        assert!(msg.contains("record 3") && msg.contains(FILE), "{msg}");
        let lsn: String = rusqlite::Connection::open(to.join("store.db"))
            .unwrap()
            .query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [super::META_KEY],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(lsn, "2", "the failed open changed store.db");
        // Without the log, the store opens as it is.
        std::fs::rename(to.join(FILE), dir.path().join("aside")).unwrap();
        let store = open(&to);
        assert_serves(&store, "a", &a);
    }

    /// The log starts over once a commit does not fit: that one is synced in `store.db`, and a
    /// crash after it comes back from any later state.
    #[test]
    fn the_log_starts_over_when_full_and_stays_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let store = open(&live);
        let mut a = Model::default();
        // 200 KiB records: about 40 fit.
        let mut heads = vec![];
        let mut snaps = vec![];
        for i in 0..100u64 {
            commit(&store, "a", &mut a, 1 + (i as u32 % 7), 50, i);
            heads.push(store.log.lock().unwrap().as_ref().unwrap().head);
            let s = dir.path().join(format!("snap{i}"));
            snapshot(&store, &s);
            snaps.push(s);
        }
        let wraps: Vec<usize> = (1..heads.len()).filter(|&i| heads[i] == 4096).collect();
        assert!(wraps.len() >= 2, "the log never started over: {heads:?}");
        let last = *wraps.last().unwrap();
        assert!(records(&live).len() < 50);
        assert_eq!(
            std::fs::metadata(live.join(FILE)).unwrap().len(),
            LOG_SIZE,
            "the log changed size"
        );
        drop(store);
        for (i, s) in snaps.iter().enumerate().skip(last) {
            let to = dir.path().join(format!("crashed{i}"));
            crashed_copy(&live, s, &to);
            let store = open(&to);
            assert_serves(&store, "a", &a);
        }
    }

    /// Records are read only under the salt of the open that wrote them: a record copied from
    /// another log (or bytes a client crafted to look like one) ends the scan.
    #[test]
    fn a_record_of_another_open_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for d in [&a, &b] {
            std::fs::create_dir_all(d).unwrap();
        }
        let mut la = super::CommitLog::open(&a, 0).unwrap();
        let lb = super::CommitLog::open(&b, 0).unwrap();
        assert_ne!(la.salt, lb.salt);
        let payload = vec![7u8; 3000];
        la.stage(&key("x"), &mut &payload[..], 3000).unwrap();
        la.append().unwrap();
        la.committed();
        assert_eq!(records(&a), vec![1]);
        // The same bytes at the same place of the other log.
        use std::os::unix::fs::FileExt;
        let mut rec = vec![0u8; 4096];
        std::fs::File::open(a.join(FILE))
            .unwrap()
            .read_exact_at(&mut rec, 4096)
            .unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(b.join(FILE))
            .unwrap();
        f.write_all_at(&rec, 4096).unwrap();
        assert_eq!(records(&b), Vec::<u64>::new());
        // A reopened log has a new salt: what the old open wrote is not read again.
        drop(la);
        let _ = super::CommitLog::open(&a, 1).unwrap();
        assert_eq!(records(&a), Vec::<u64>::new());
    }

    /// A transaction the store refuses leaves no record; the next one gets the next LSN.
    #[test]
    fn a_refused_transaction_leaves_no_record() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut a = Model::default();
        commit(&store, "a", &mut a, 1, 1, 1);
        let (mut bad, _) = a.tx(1, 1, 2);
        let n = bad.len();
        bad[n - 9] ^= 1; // the post-apply checksum
        assert!(
            store
                .apply_ltx(&key("a"), None, bad.len() as u64, &bad[..])
                .is_err()
        );
        assert_eq!(records(dir.path()), vec![1]);
        commit(&store, "a", &mut a, 1, 1, 3);
        assert_eq!(records(dir.path()), vec![1, 2]);
        assert_serves(&store, "a", &a);
    }

    /// A record whose transaction failed to commit is erased before the failure is reported,
    /// and the next record takes its place and LSN.
    #[test]
    fn an_undone_record_is_gone_and_its_place_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = super::CommitLog::open(dir.path(), 7).unwrap();
        let payload = vec![5u8; 6000];
        let staged = log.stage(&key("a"), &mut &payload[..], 6000).unwrap();
        assert_eq!(staged, super::Staged::Logged);
        assert_eq!(log.payload(), &payload[..]);
        log.append().unwrap();
        assert_eq!(records(dir.path()), vec![8]);
        log.undo();
        assert_eq!(records(dir.path()), Vec::<u64>::new());
        log.stage(&key("a"), &mut &payload[..], 6000).unwrap();
        log.append().unwrap();
        log.committed();
        log.stage(&key("b"), &mut &payload[..100], 100).unwrap();
        log.append().unwrap();
        log.committed();
        assert_eq!(records(dir.path()), vec![8, 9]);
        // Too large for the log, and what no longer fits.
        let big = super::MAX_PAYLOAD + 1;
        let staged = log.stage(&key("a"), &mut std::io::empty(), big).unwrap();
        assert_eq!(staged, super::Staged::TooLarge);
        log.head = LOG_SIZE - 4096;
        let staged = log.stage(&key("a"), &mut &payload[..], 6000).unwrap();
        assert_eq!(staged, super::Staged::Full);
    }

    /// The newest TXID of `name` committed in `store.db` (an open batch not included).
    fn committed_txid(store: &Store, name: &str) -> Option<i64> {
        let conn = super::super::schema::open_reader(&store.path).unwrap();
        conn.query_row(
            "SELECT MAX(t.max_txid) FROM txns t JOIN dbs d ON d.id = t.db_id WHERE d.name = ?1",
            [name],
            |r| r.get(0),
        )
        .unwrap()
    }

    fn hold(store: &Store) {
        store
            .w
            .hold
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Logged transactions wait in a batch, not yet in `store.db`; watchers hear of each at
    /// once, and the next read sees them all.
    #[test]
    fn a_batch_is_seen_by_the_next_read_and_watchers_hear_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        hold(&store);
        let mut a = Model::default();
        let mut changes = store.subscribe();
        changes.borrow_and_update();
        commit(&store, "a", &mut a, 1, 2, 1);
        assert!(changes.has_changed().unwrap(), "watchers were not told");
        for i in 2..5 {
            commit(&store, "a", &mut a, 1, 1, i);
        }
        assert!(store.w.is_pending());
        assert_eq!(committed_txid(&store, "a"), None, "the batch was committed");
        assert_serves(&store, "a", &a);
        assert!(!store.w.is_pending(), "the read did not commit the batch");
        assert_eq!(committed_txid(&store, "a"), Some(4));
    }

    /// With nobody reading, the commit thread commits a batch on its own.
    #[test]
    fn the_commit_thread_commits_a_batch_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        let mut a = Model::default();
        for i in 0..3 {
            commit(&store, "a", &mut a, 1, 1, i);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while committed_txid(&store, "a") != Some(3) {
            assert!(std::time::Instant::now() < deadline, "batch still open");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!store.w.is_pending());
    }

    /// A transaction that fails inside a batch after writing rows (its pages are stored before
    /// its post-apply checksum is found wrong) takes the batch back with it; the batch's
    /// transactions, acknowledged, are applied again from the log: none is lost, none applied
    /// twice, and the failed one leaves no record.
    #[test]
    fn a_failure_inside_a_batch_loses_none_of_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        hold(&store);
        let (mut a, mut b) = (Model::default(), Model::default());
        for i in 0..3 {
            commit(&store, "a", &mut a, 1, 2, i);
            commit(&store, "b", &mut b, 2, 1, i + 10);
        }
        assert!(store.w.is_pending());
        let (mut bad, _) = a.tx(2, 3, 99);
        let n = bad.len();
        bad[n - 9] ^= 1; // the post-apply checksum
        let err = store
            .apply_ltx(&key("a"), None, bad.len() as u64, &bad[..])
            .unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
        assert!(!store.w.is_pending());
        assert_eq!(committed_txid(&store, "a"), Some(3));
        assert_eq!(committed_txid(&store, "b"), Some(3));
        assert_serves(&store, "a", &a);
        assert_serves(&store, "b", &b);
        assert_eq!(records(dir.path()), (1..=6).collect::<Vec<u64>>());
        // A refusal that writes nothing (a position the database is not at) leaves the batch.
        commit(&store, "b", &mut b, 1, 1, 20);
        let (stale, _) = Model::default().tx(1, 1, 21);
        assert!(
            store
                .apply_ltx(&key("b"), None, stale.len() as u64, &stale[..])
                .is_err()
        );
        commit(&store, "a", &mut a, 1, 1, 22);
        assert_eq!(records(dir.path()), (1..=8).collect::<Vec<u64>>());
        drop(store);
        let store = open(dir.path());
        assert_serves(&store, "a", &a);
        assert_serves(&store, "b", &b);
    }

    /// A crash with a batch open (nothing of it in `store.db`) loses nothing: the next start
    /// applies the batch from the log.
    #[test]
    fn a_crash_with_a_batch_open_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let store = open(&live);
        let (mut a, mut b) = (Model::default(), Model::default());
        commit(&store, "a", &mut a, 1, 1, 1);
        store.w.settle();
        hold(&store);
        for i in 2..6 {
            commit(&store, "a", &mut a, 1, 2, i);
            commit(&store, "b", &mut b, 1, 1, i);
        }
        let snap = dir.path().join("snap");
        snapshot_as_is(&store, &snap);
        let to = dir.path().join("crashed");
        crashed_copy(&live, &snap, &to);
        drop(store);
        let store = open(&to);
        assert_serves(&store, "a", &a);
        assert_serves(&store, "b", &b);
    }

    /// A backup taken while a batch is open holds the batch: it takes SQLite's write lock
    /// first, which the batch holds until something commits it.
    #[test]
    fn a_backup_holds_the_open_batch() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        let store = open(&live);
        hold(&store);
        let mut a = Model::default();
        for i in 0..3 {
            commit(&store, "a", &mut a, 1, 1, i);
        }
        assert!(store.w.is_pending());
        let dest = dir.path().join("backup");
        std::thread::scope(|s| {
            // The batch commits only after the backup began waiting.
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(300));
                store.w.settle();
            });
            super::super::backup::backup(&live, &dest).unwrap();
        });
        drop(store);
        let copy = open(&dest);
        assert_serves(&copy, "a", &a);
    }
}
