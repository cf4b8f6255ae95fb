//! Retention and compaction: dropping history older than the retention window.
//!
//! Rule: a position stays readable while it was current at some moment within the last
//! `retention`. For each database let K be the newest transaction accepted before
//! `now - retention` (the position current at the window's start). Compaction deletes every
//! transaction older than K, and every page version that is not visible at K or later: versions
//! shadowed by a newer version at or below K, and versions of pages past K's commit size written
//! at or before K. The newest version of every live page always survives, so the store holds one
//! full image plus the window's history. Each database is compacted in its own short write
//! transaction. In bucket mode the bucket's own compaction runs instead
//! ([`super::compact_bucket`]): a new base image there is what forgets history, in the bucket
//! and in this index alike.

use rusqlite::{Connection, OptionalExtension};

use super::{DbKey, Store, StoreResult, now_ms};

/// What one compaction pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactionStats {
    pub txns_deleted: u64,
    pub pages_deleted: u64,
    /// Page versions left in the store after the pass (bucket mode: indexed, the pages of
    /// each database's base image included).
    pub page_versions: u64,
    /// What each database holds after the pass, in (cluster, name) order.
    pub databases: Vec<DbSize>,
    /// Local mode: object files removed, their last page version gone.
    pub object_files_removed: u64,
    /// Bucket mode: what the pass did in the bucket.
    pub bucket: super::BucketStats,
}

/// The page versions one database holds: its live pages and the history retention keeps
/// (bucket mode: as indexed by this server, its base image included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbSize {
    pub key: DbKey,
    pub page_versions: u64,
    /// Page versions times their page size.
    pub bytes: u64,
}

impl Store {
    /// Runs one compaction pass over every database.
    pub fn compact(&self) -> StoreResult<CompactionStats> {
        let cutoff = now_ms().saturating_sub(self.retention.as_millis() as u64);
        // Only databases whose K moved since their last pass need the writer.
        let ids: Vec<i64> = self.read(|tx| {
            let mut stmt = tx.prepare(
                "SELECT id FROM (SELECT d.id, d.compacted_txid AS prev,
                     (SELECT t.max_txid FROM txns t WHERE t.db_id = d.id AND t.created_ms < ?1
                      ORDER BY t.max_txid DESC LIMIT 1) AS k FROM dbs d)
                 WHERE k IS NOT NULL AND k <> prev ORDER BY id",
            )?;
            let ids = stmt
                .query_map([cutoff as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            Ok(ids)
        })?;
        let mut stats = CompactionStats::default();
        // Bucket mode: the index must keep every commit the manifest has not merged yet (the
        // compactor lists them from it); history is forgotten only when a new base image lands.
        let ids = if self.remote().is_some() {
            Vec::new()
        } else {
            ids
        };
        for id in ids {
            let (t, p) = self.write(|tx| compact_db(tx, id, cutoff))?;
            stats.txns_deleted += t;
            stats.pages_deleted += p;
            if p > 0 {
                self.objects.freed(id);
            }
        }
        if self.remote().is_none() {
            stats.object_files_removed = self
                .objects
                .reclaim(&|f| self.read(|tx| f(tx)), &|f| self.write(|tx| f(tx)))?;
        }
        if let Some(r) = self.remote() {
            stats.bucket = self.compact_bucket(r)?;
            stats.pages_deleted += r.pruned.swap(0, std::sync::atomic::Ordering::Relaxed);
            self.evict_if_needed(r);
        }
        stats.databases = self.read(|tx| Ok(db_sizes(tx)?))?;
        stats.page_versions = stats.databases.iter().map(|d| d.page_versions).sum();
        Ok(stats)
    }
}

/// The page versions of every database: rows of `pages` (counted through an index, without
/// reading a page) at the page size of the database's newest transaction, plus (bucket mode)
/// the slots of its base image.
fn db_sizes(tx: &Connection) -> rusqlite::Result<Vec<DbSize>> {
    let mut stmt = tx.prepare(
        "SELECT d.cluster, d.name,
                (SELECT COUNT(*) FROM pages p WHERE p.db_id = d.id),
                (SELECT t.page_size FROM txns t WHERE t.db_id = d.id
                 ORDER BY t.max_txid DESC LIMIT 1),
                b.commit_size, b.page_size
         FROM dbs d LEFT JOIN bases b ON b.db_id = d.id
         ORDER BY d.cluster, d.name",
    )?;
    let rows = stmt.query_map([], |r| {
        let versions = r.get::<_, i64>(2)? as u64;
        let page_size = r.get::<_, Option<u32>>(3)?;
        let base = match (r.get::<_, Option<u32>>(4)?, r.get::<_, Option<u32>>(5)?) {
            (Some(commit), Some(ps)) => {
                (crate::server::bucket::format::image_slots(ps, commit), ps)
            }
            _ => (0, 0),
        };
        let ps = u64::from(page_size.unwrap_or(base.1));
        Ok(DbSize {
            key: DbKey {
                cluster: r.get(0)?,
                name: r.get(1)?,
            },
            page_versions: versions + base.0,
            bytes: versions * ps + base.0 * u64::from(base.1),
        })
    })?;
    rows.collect()
}

fn compact_db(tx: &Connection, db_id: i64, cutoff_ms: u64) -> StoreResult<(u64, u64)> {
    let k: Option<(i64, i64)> = tx
        .query_row(
            "SELECT max_txid, commit_size FROM txns WHERE db_id = ?1 AND created_ms < ?2
             ORDER BY max_txid DESC LIMIT 1",
            rusqlite::params![db_id, cutoff_ms as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    // The database may have been deleted since the pass listed it: nothing to do then.
    let Some(prev) = tx
        .query_row(
            "SELECT compacted_txid FROM dbs WHERE id = ?1",
            [db_id],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
    else {
        return Ok((0, 0));
    };
    let Some((k_txid, k_commit)) = k.filter(|(k, _)| *k != prev) else {
        return Ok((0, 0));
    };
    let txns = tx.execute(
        "DELETE FROM txns WHERE db_id = ?1 AND max_txid < ?2",
        [db_id, k_txid],
    )?;
    // After the previous pass no version at or below its K shadows another, so only pages with a
    // version in (prev K, K] can have shadowed versions now. A restore below prev K is
    // impossible (those positions are gone), so prev only grows.
    let shadowed = tx.execute(
        "DELETE FROM pages WHERE db_id = ?1 AND +txid < ?2
           AND pgno IN (SELECT pgno FROM pages WHERE db_id = ?1 AND txid > ?3 AND txid <= ?2)
           AND EXISTS (SELECT 1 FROM pages n WHERE n.db_id = ?1 AND n.pgno = pages.pgno
                         AND n.txid > pages.txid AND n.txid <= ?2)",
        [db_id, k_txid, prev.min(k_txid)],
    )?;
    let beyond = tx.execute(
        "DELETE FROM pages WHERE db_id = ?1 AND pgno > ?3 AND +txid <= ?2",
        [db_id, k_txid, k_commit],
    )?;
    tx.execute(
        "UPDATE dbs SET compacted_txid = ?2 WHERE id = ?1",
        [db_id, k_txid],
    )?;
    Ok((txns as u64, (shadowed + beyond) as u64))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::{DbKey, Store, StoreError};
    use crate::ltx::{self, EMPTY_CHECKSUM, checksum_xor, page_checksum};
    use crate::wire::Pos;

    /// Commits `n` transactions rewriting page 1 of a 2-page database; returns each position.
    fn commits(store: &Store, key: &DbKey, n: u8) -> Vec<Pos> {
        let mut pos = Pos::ZERO;
        let mut out = Vec::new();
        for i in 0..n {
            let p1 = vec![i; 512];
            let p2 = vec![0xee; 512];
            let post = [(1, &p1), (2, &p2)]
                .iter()
                .fold(EMPTY_CHECKSUM, |c, (p, d)| {
                    checksum_xor(c, page_checksum(*p, d))
                });
            let txid = pos.txid.0 + 1;
            let (hdr, pages): (_, Vec<(u32, &[u8])>) = if txid == 1 {
                (ltx::Header::new(512, 2, 1, 1, 0), vec![(1, &p1), (2, &p2)])
            } else {
                (
                    ltx::Header::new(512, 2, txid, txid, pos.checksum.0),
                    vec![(1, &p1)],
                )
            };
            let bytes = ltx::encode(&hdr, &pages, post).unwrap();
            pos = store
                .apply_ltx(key, None, bytes.len() as u64, &bytes[..])
                .unwrap()
                .pos;
            out.push(pos);
        }
        out
    }

    fn key() -> DbKey {
        DbKey {
            cluster: "c".into(),
            name: "d".into(),
        }
    }

    #[test]
    fn change_lists_past_the_limit_become_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let base = *commits(&store, &key(), 1).last().unwrap();
        // Grow from 2 to 2 + 65537 pages of zeros in one transaction.
        let size = 2 + super::super::read::MAX_CHANGED_PGNOS as u32 + 1;
        let zero = vec![0u8; 512];
        let lock = ltx::lock_page(512);
        let mut post = base.checksum.0;
        let mut w = ltx::Writer::new(Vec::new(), &ltx::Header::new(512, size, 2, 2, post)).unwrap();
        for p in (3..=size).filter(|p| *p != lock) {
            w.write_page(p, &zero).unwrap();
            post = checksum_xor(post, page_checksum(p, &zero));
        }
        let bytes = w.finish(post).unwrap().1;
        let head = store
            .apply_ltx(&key(), None, bytes.len() as u64, &bytes[..])
            .unwrap()
            .pos;
        let c = store.changes(&key(), base).unwrap().unwrap();
        assert_eq!((c.pos, c.all, c.pgnos), (head, Some(true), None));
        let c = store.changes(&key(), head).unwrap().unwrap();
        assert_eq!(c.all, None);
    }

    #[test]
    fn positions_inside_the_window_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Duration::from_secs(3600)).unwrap();
        let positions = commits(&store, &key(), 20);
        let stats = store.compact().unwrap();
        assert_eq!(
            (stats.txns_deleted, stats.pages_deleted, stats.page_versions),
            (0, 0, 21)
        );
        for (i, pos) in positions.iter().enumerate() {
            let got = store.pages_at(&key(), Some(*pos), &[1], 0).unwrap();
            assert_eq!(got.pages[0].1, vec![i as u8; 512]);
        }
    }

    /// A pass lists the databases to compact, then takes the writer for each: one deleted in
    /// between must be skipped, not fail the whole pass (leaving the others uncompacted).
    #[test]
    fn a_database_deleted_during_a_pass_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Duration::ZERO).unwrap();
        commits(&store, &key(), 3);
        let id: i64 = store
            .read(|tx| Ok(tx.query_row("SELECT id FROM dbs", [], |r| r.get(0))?))
            .unwrap();
        store.delete_db(&key()).unwrap();
        let cutoff = super::now_ms() + 1;
        let done = store.write(|tx| super::compact_db(tx, id, cutoff));
        assert_eq!(done.unwrap(), (0, 0));
    }

    #[test]
    fn compaction_keeps_the_newest_version_of_every_page() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Duration::ZERO).unwrap();
        let positions = commits(&store, &key(), 20);
        std::thread::sleep(Duration::from_millis(5));
        let stats = store.compact().unwrap();
        assert_eq!(
            (stats.txns_deleted, stats.pages_deleted, stats.page_versions),
            (19, 19, 2)
        );
        assert_eq!(
            store.compact().unwrap().pages_deleted,
            0,
            "a second pass finds nothing"
        );
        let head = *positions.last().unwrap();
        let got = store.pages_at(&key(), Some(head), &[1, 2], 0).unwrap();
        assert_eq!(got.pages, vec![(1, vec![19; 512]), (2, vec![0xee; 512])]);
        let old = store.pages_at(&key(), Some(positions[0]), &[1], 0);
        assert!(matches!(old, Err(StoreError::PosMismatch(p)) if p == head));
        // Writing continues on top of the compacted history.
        let more = commits(
            &store,
            &DbKey {
                name: "e".into(),
                ..key()
            },
            2,
        );
        assert_eq!(more.len(), 2);
    }
}
