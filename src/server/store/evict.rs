//! Bucket mode: keeping `DATA_DIR` under `--cache-size`.
//!
//! What fills the data directory is `store.db` (and its write-ahead log): page bytes fetched
//! from the bucket (`page_cache`), and the index of every database this server has opened. When
//! the two files pass the bound, page bytes go first, least recently used first (`atime`, kept
//! approximately: hits are recorded in memory and applied in batches); freed space is given back
//! to the file system (incremental vacuum, then a truncating checkpoint of the log). If the index
//! alone still passes the bound, whole databases are forgotten, least recently used first, except
//! ones with long-polling readers, a lease or compaction work on this server: the next request
//! for them reads their manifest again. Everything evicted is in the bucket, so eviction never
//! loses anything.

use std::path::Path;
use std::time::Instant;

use super::remote::Remote;
use super::{Store, StoreResult};

/// Evict once the data directory passes this fraction of the bound...
const HIGH: f64 = 0.90;
/// ... down to this fraction.
const LOW: f64 = 0.75;
/// Rows deleted per write transaction while evicting: about a sixteenth of the bound in 4 KiB
/// pages, within these limits. Each batch goes through the log twice (the deletes, then the
/// incremental vacuum moving the file's last pages into the holes) before the log is cut, so
/// a batch much larger than the bound would take the log past it.
const BATCH: (u64, u64) = (64, 2048);
/// Tries of the truncating checkpoint after a batch, 2 ms apart.
const GIVE_BACK_TRIES: u32 = 25;

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

/// What one eviction did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Evicted {
    pub pages: u64,
    pub databases: u64,
}

impl Store {
    /// Bytes `store.db` and its log take.
    pub(super) fn cache_bytes(&self) -> u64 {
        let wal = self.path.with_file_name("store.db-wal");
        file_len(&self.path) + file_len(&wal)
    }

    /// Evicts until the data directory is under the low mark, if it is over the high mark.
    pub(super) fn enforce_cache_bound(&self, r: &Remote) -> StoreResult<Evicted> {
        let bound = r.cfg.cache_size as f64;
        let mut out = Evicted::default();
        if (self.cache_bytes() as f64) < bound * HIGH {
            return Ok(out);
        }
        let target = (bound * LOW) as u64;
        let batch = (r.cfg.cache_size / 16 / 4096).clamp(BATCH.0, BATCH.1);
        while self.cache_bytes() > target {
            let before = self.cache_bytes();
            let deleted = self.write(|tx| {
                Ok(tx.execute(
                    "DELETE FROM page_cache WHERE rowid IN
                       (SELECT rowid FROM page_cache ORDER BY atime LIMIT ?1)",
                    [batch as i64],
                )? as u64)
            })?;
            out.pages += deleted;
            self.give_back()?;
            // Nothing freed (a long read holds the log, so it cannot be cut): stop here rather
            // than empty the whole cache; a later pass goes on.
            if deleted == 0 || self.cache_bytes() >= before {
                return Ok(out);
            }
        }
        if self.cache_bytes() > target {
            for key in self.idle_databases(r) {
                if self.cache_bytes() <= target {
                    break;
                }
                // Never under a refresh or a commit of the same database.
                let st = r.db(&key);
                let Some(_g) = st.lock.try_lock() else {
                    continue;
                };
                // First make every reader of it refresh (it is no longer current here), then
                // drop its rows; its entry and lock stay, so the database keeps one lock.
                r.forget(&key);
                self.drop_local(&key)?;
                out.databases += 1;
                self.give_back()?;
            }
        }
        if self.cache_bytes() > r.cfg.cache_size {
            tracing::warn!(
                bytes = self.cache_bytes(),
                bound = r.cfg.cache_size,
                "the index of the databases in use does not fit in --cache-size"
            );
        }
        Ok(out)
    }

    /// Returns free pages of `store.db` to the file system and truncates its log.
    fn give_back(&self) -> StoreResult<()> {
        let writer = || self.w.lock();
        {
            let conn = writer();
            // The pragma frees one page per step (each step yields a row), so it is stepped to
            // the end; `execute_batch` would step it once and free a single page.
            let mut stmt = conn.prepare_cached("PRAGMA incremental_vacuum")?;
            let mut rows = stmt.query([])?;
            while rows.next()?.is_some() {}
        }
        // Busy at once when the checkpoint thread is running a passive checkpoint (the
        // checkpoint lock has no busy handler): try again for a moment, without holding the
        // writer meanwhile, or every batch of the pass would pile its moves onto the log. Busy
        // for longer (a long read is open) is fine: the log is cut at a later pass.
        for _ in 0..GIVE_BACK_TRIES {
            let busy: rusqlite::Result<i64> =
                writer().query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| row.get(0));
            if !matches!(busy, Ok(1)) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        Ok(())
    }
}

impl Remote {
    /// Notes that `key` was used now (for choosing which database to forget).
    pub(super) fn used(&self, key: &super::DbKey) {
        self.last_used
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone(), Instant::now());
    }
}
