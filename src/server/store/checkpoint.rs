//! Checkpoints of `store.db`'s write-ahead log, off the reply path.
//!
//! The writer connection never checkpoints (`wal_autocheckpoint = 0`): with SQLite's automatic
//! checkpoint, the `COMMIT` that crosses the threshold copies the whole log into the database
//! and syncs it before returning, so the reply to a large transaction waited for work that has
//! nothing to do with its durability. Here a thread with its own connection does that work after
//! writes: a passive checkpoint once the frames written since the last one pass
//! [`CHECKPOINT_AT`] (it never blocks the writer or readers; the file's size is no measure, as
//! it stays at its largest while the log restarts from its start, and a log that a steady
//! writer never lets restart is not checkpointed again after every commit). When the file has
//! grown past [`super::schema::WAL_SIZE_LIMIT`] (readers kept the log from restarting, or a
//! large transaction), a restarting checkpoint under commits, or a truncating one once no commit
//! came for a round, each waiting at most [`TRUNCATE_WAIT`] for readers and retried every
//! [`RETRY`] until it succeeds, so an idle store gives the space back without waiting for the
//! next write (see [`mode`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

use super::schema::WAL_SIZE_LIMIT;

/// Log size from which a passive checkpoint runs (SQLite's automatic one runs at 1000 pages, 8 MiB
/// of the 8 KiB store pages this was tuned with; starting at half that keeps the log small even
/// when this thread runs late, which matters to a `--cache-size` that counts the log).
pub const CHECKPOINT_AT: u64 = 4 << 20;
/// Longest a truncating checkpoint waits for readers (and so may hold up the writer).
const TRUNCATE_WAIT: Duration = Duration::from_millis(50);
/// How often a log that is still too large is looked at again without new writes.
const RETRY: Duration = Duration::from_secs(1);

/// The checkpoint thread; stopped and joined on drop.
pub struct Checkpointer {
    kick: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
    /// Frames in the log as of the last commit ([`Checkpointer::frames`]).
    frames: Arc<AtomicU64>,
    /// Frames in the log at the last checkpoint: only frames written since count (fewer frames
    /// than then: the log restarted from its start).
    last: Arc<AtomicU64>,
    /// Bytes of one frame's page.
    page_size: u64,
    /// Checkpoints run (for tests).
    #[cfg_attr(not(test), allow(dead_code))]
    runs: Arc<AtomicU64>,
    /// Wake-ups [`Checkpointer::kick`] sent (a kick while one is pending sends none; for tests).
    kicks: AtomicU64,
}

impl Checkpointer {
    /// Starts the thread for the store at `path` (which must exist, in WAL mode).
    pub fn start(path: &Path) -> rusqlite::Result<Checkpointer> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(TRUNCATE_WAIT)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let page_size: u32 = conn.pragma_query_value(None, "page_size", |r| r.get(0))?;
        let page_size = u64::from(page_size);
        let wal = PathBuf::from(format!("{}-wal", path.display()));
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        let frames = Arc::new(AtomicU64::new(0));
        let last = Arc::new(AtomicU64::new(0));
        let runs = Arc::new(AtomicU64::new(0));
        let (f, l, n) = (frames.clone(), last.clone(), runs.clone());
        let thread = std::thread::Builder::new()
            .name("litevfs-checkpoint".into())
            .spawn(move || {
                // Frames at the previous round: unchanged means no commit came in between.
                let mut seen = u64::MAX;
                while let Ok(()) | Err(RecvTimeoutError::Timeout) = rx.recv_timeout(RETRY) {
                    let now = f.load(Ordering::Relaxed);
                    let idle = now == seen;
                    seen = now;
                    let log = since(now, l.load(Ordering::Relaxed)) * page_size;
                    if checkpoint(&conn, &wal, log, idle) {
                        l.store(now, Ordering::Relaxed);
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(Checkpointer {
            kick: Some(tx),
            thread: Some(thread),
            frames,
            last,
            page_size,
            runs,
            kicks: AtomicU64::new(0),
        })
    }

    /// Where the writer's log hook records the frames in the log after each commit.
    pub fn frames(&self) -> Arc<AtomicU64> {
        self.frames.clone()
    }

    #[cfg(test)]
    fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// Tells the thread the log grew, once enough did for a checkpoint (never blocks). Waking
    /// it after every commit cost a context switch per commit, on the reply's path. A log past
    /// its size limit needs no kick: the thread looks at it every [`RETRY`].
    pub fn kick(&self) {
        let new = since(
            self.frames.load(Ordering::Relaxed),
            self.last.load(Ordering::Relaxed),
        );
        if new * self.page_size < CHECKPOINT_AT {
            return;
        }
        if let Some(tx) = &self.kick
            && tx.try_send(()).is_ok()
        {
            self.kicks.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.kick = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Frames written since the checkpoint that saw `last` frames, when the log now has `now`.
fn since(now: u64, last: u64) -> u64 {
    if now < last { now } else { now - last }
}

/// The checkpoint a round runs, if any, for a log file of `size` bytes with `log` bytes of
/// frames written since the last checkpoint; `idle`: no commit since the previous round.
///
/// A file past [`WAL_SIZE_LIMIT`] means the log has not restarted from its start (readers kept
/// it in use): a restarting checkpoint makes the next commit start it over, keeping the file
/// and its cached pages, which SQLite then cuts back to the limit. Truncating it to nothing
/// under steady commits made each cycle allocate the file's blocks and pages again, which cost
/// a commit as much as its own writes. An idle store's file is truncated, giving the space
/// back.
fn mode(size: u64, log: u64, idle: bool) -> Option<&'static str> {
    if size > WAL_SIZE_LIMIT as u64 {
        Some(if idle { "TRUNCATE" } else { "RESTART" })
    } else if log >= CHECKPOINT_AT {
        Some("PASSIVE")
    } else {
        None
    }
}

/// One round (see [`mode`]). Returns whether a checkpoint ran.
pub fn checkpoint(conn: &Connection, wal: &Path, log: u64, idle: bool) -> bool {
    let size = std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0);
    let Some(mode) = mode(size, log, idle) else {
        return false;
    };
    let r: rusqlite::Result<(i64, i64, i64)> =
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        });
    match r {
        Ok((busy, log, done)) => {
            tracing::debug!(mode, busy, log, done, bytes = size, "checkpoint")
        }
        // Busy: a reader or the writer held it past TRUNCATE_WAIT; the next round retries (the
        // frames it did not copy still count).
        Err(e) => {
            tracing::debug!(mode, "checkpoint deferred: {e}");
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    /// Small commits checkpoint once per [`super::CHECKPOINT_AT`] of log, not after every commit
    /// once the file has reached that size (the file keeps its size while the log restarts).
    #[test]
    fn steady_small_commits_checkpoint_once_per_threshold() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let key = DbKey {
            cluster: "c".into(),
            name: "small".into(),
        };
        let mut pos = crate::wire::Pos::ZERO;
        let n = 600u64;
        for i in 0..n {
            let data = vec![(i % 251) as u8; 512];
            let post = checksum_xor(EMPTY_CHECKSUM, page_checksum(1, &data));
            let txid = pos.txid.0 + 1;
            let hdr = ltx::Header::new(512, 1, txid, txid, pos.checksum.0);
            let mut w = ltx::Writer::new(Vec::new(), &hdr).unwrap();
            w.write_page(1, &data).unwrap();
            let bytes = w.finish(post).unwrap().1;
            pos = store
                .apply_ltx(&key, None, bytes.len() as u64, &bytes[..])
                .unwrap()
                .pos;
            // One commit at a time, as a client waiting for each reply does, each committed to
            // `store.db` on its own (as when a reader comes between them; batched, they write
            // fewer frames).
            store.w.settle();
            std::thread::sleep(Duration::from_micros(200));
        }
        std::thread::sleep(Duration::from_millis(100));
        let wal = wal_len(dir.path());
        let runs = store.w.checkpointer.runs();
        // Each commit writes a few 32 KiB frames: tens of commits per 4 MiB of log.
        assert!(wal >= super::CHECKPOINT_AT, "the log file grew to {wal}");
        assert!(
            runs * 10 < n,
            "{runs} checkpoints for {n} commits (one per commit once the file was large)"
        );
        assert!(
            runs >= 2,
            "{runs} checkpoints: the log must still be checkpointed"
        );
        // Woken only when a checkpoint is due, not after every commit.
        let kicks = store
            .w
            .checkpointer
            .kicks
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(kicks * 10 < n, "{kicks} wake-ups for {n} commits");
    }

    use super::super::{DbKey, Store};

    #[test]
    fn the_log_restarts_under_commits_and_is_truncated_when_idle() {
        use super::{CHECKPOINT_AT, WAL_SIZE_LIMIT, mode};
        let big = WAL_SIZE_LIMIT as u64 + 1;
        assert_eq!(mode(big, 0, false), Some("RESTART"));
        assert_eq!(mode(big, CHECKPOINT_AT, false), Some("RESTART"));
        assert_eq!(mode(big, 0, true), Some("TRUNCATE"));
        assert_eq!(mode(1 << 20, CHECKPOINT_AT, false), Some("PASSIVE"));
        assert_eq!(mode(1 << 20, CHECKPOINT_AT - 1, true), None);
    }
    use crate::ltx::{self, EMPTY_CHECKSUM, checksum_xor, page_checksum};

    fn wal_len(dir: &std::path::Path) -> u64 {
        std::fs::metadata(dir.join("store.db-wal"))
            .map(|m| m.len())
            .unwrap_or(0)
    }

    /// A 24 MiB transaction grows the log past the limit; with no further write, the thread
    /// truncates it, and the writer itself never checkpoints.
    #[test]
    fn a_large_log_is_truncated_without_another_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let auto: i64 = store
            .w
            .lock()
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .unwrap();
        assert_eq!(auto, 0, "the writer must not checkpoint inside a commit");
        let key = DbKey {
            cluster: "c".into(),
            name: "big".into(),
        };
        let ps = 4096u32;
        let size = (24 << 20) / ps;
        let lock = ltx::lock_page(ps);
        let mut post = EMPTY_CHECKSUM;
        let mut w = ltx::Writer::new(Vec::new(), &ltx::Header::new(ps, size, 1, 1, 0)).unwrap();
        for p in (1..=size).filter(|p| *p != lock) {
            let data = vec![(p % 251) as u8; ps as usize];
            w.write_page(p, &data).unwrap();
            post = checksum_xor(post, page_checksum(p, &data));
        }
        let bytes = w.finish(post).unwrap().1;
        store
            .apply_ltx(&key, None, bytes.len() as u64, &bytes[..])
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while wal_len(dir.path()) > 0 {
            assert!(
                Instant::now() < deadline,
                "log still {} bytes after 60 s",
                wal_len(dir.path())
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // The data is intact after the checkpoint.
        let got = store.pages_at(&key, None, &[1, size], 0).unwrap();
        assert_eq!(got.pages[0].1, vec![1u8; ps as usize]);
        assert_eq!(got.pages[1].1, vec![(size % 251) as u8; ps as usize]);
    }
}
