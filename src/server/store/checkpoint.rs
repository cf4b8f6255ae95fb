//! Checkpoints of `store.db`'s write-ahead log, off the reply path.
//!
//! The writer connection never checkpoints (`wal_autocheckpoint = 0`): with SQLite's automatic
//! checkpoint, the `COMMIT` that crosses the threshold copies the whole log into the database
//! and syncs it before returning, so the reply to a large transaction waited for work that has
//! nothing to do with its durability. Here a thread with its own connection does that work after
//! writes: a passive checkpoint once the log passes [`CHECKPOINT_AT`] (it never blocks the
//! writer or readers), and when the log has grown past [`super::schema::WAL_SIZE_LIMIT`] (a large
//! upload or compaction) a truncating one, which waits at most [`TRUNCATE_WAIT`] for readers and
//! is retried every [`RETRY`] until it succeeds, so an idle store gives the space back without
//! waiting for the next write.

use std::path::{Path, PathBuf};
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
}

impl Checkpointer {
    /// Starts the thread for the store at `path` (which must exist, in WAL mode).
    pub fn start(path: &Path) -> rusqlite::Result<Checkpointer> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(TRUNCATE_WAIT)?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        let wal = PathBuf::from(format!("{}-wal", path.display()));
        let (tx, rx) = mpsc::sync_channel::<()>(1);
        let thread = std::thread::Builder::new()
            .name("litevfs-checkpoint".into())
            .spawn(move || {
                while let Ok(()) | Err(RecvTimeoutError::Timeout) = rx.recv_timeout(RETRY) {
                    checkpoint(&conn, &wal);
                }
            })
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
        Ok(Checkpointer {
            kick: Some(tx),
            thread: Some(thread),
        })
    }

    /// Tells the thread the log grew (never blocks).
    pub fn kick(&self) {
        if let Some(tx) = &self.kick {
            let _ = tx.try_send(());
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

/// One round: passive when the log is large, truncating when it is too large.
pub fn checkpoint(conn: &Connection, wal: &Path) {
    let size = std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0);
    if size < CHECKPOINT_AT {
        return;
    }
    let mode = if size > WAL_SIZE_LIMIT as u64 {
        "TRUNCATE"
    } else {
        "PASSIVE"
    };
    let r: rusqlite::Result<(i64, i64, i64)> =
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        });
    match r {
        Ok((busy, log, done)) => {
            tracing::debug!(mode, busy, log, done, bytes = size, "checkpoint")
        }
        // Busy: a reader or the writer held it past TRUNCATE_WAIT; the next round retries.
        Err(e) => tracing::debug!(mode, "checkpoint deferred: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::super::{DbKey, Store};
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
            .writer
            .lock()
            .unwrap()
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
