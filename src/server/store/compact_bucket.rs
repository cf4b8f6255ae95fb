//! Compaction and retention in the bucket: keeping the number of objects a reader opens bounded
//! and deleting what the retention window no longer needs.
//!
//! A pass takes one step at a time per database, each ending in one compare-and-swap of the
//! manifest (a step whose swap loses deletes what it wrote and is retried by a later pass):
//!
//! 1. the first commit (an image) becomes the manifest's base;
//! 2. [`L0_FANIN`] or more commit objects are merged into one level-1 segment;
//! 3. [`SEG_FANIN`] or more consecutive segments of one level become one of the next level (so
//!    at most 7 segments per level, and levels grow with the logarithm of the commits since
//!    the base);
//! 4. the base moves forward: a new image at the newest segment or commit boundary at or before
//!    K (the position current at `now - retention`), once the history it makes droppable is at
//!    least half the image's size;
//! 5. objects retired longer ago than the retention plus `--gc-grace` (and the clock-skew
//!    margin) are deleted, as are the generations of deleted databases and objects no manifest
//!    or commit names (a crashed compaction's output, the body of a commit that lost its race).
//!
//! Segments keep every version of every transaction they merge, so retained positions stay
//! readable exactly; only a new base forgets history, and only history older than the
//! retention. Commits never wait for compaction: they touch `l0/` only.

use std::collections::HashSet;
use std::io::{Read, Write};

use super::remote::{Loaded, Remote, RemoteBytes};
use super::{DbKey, Store, StoreError, StoreResult, TxnRow, find_db, head, now_ms, page_ck};
use crate::ltx::lock_page;
use crate::server::bucket::format::{self, Header, Kind, TxnRecord};
use crate::server::bucket::manifest::{Manifest, ObjRef, Retired};
use crate::server::bucket::{Cas, Spill, layout};

/// Commit objects merged into one level-1 segment.
pub const L0_FANIN: usize = 8;
/// Segments of one level merged into one of the next.
pub const SEG_FANIN: usize = 8;
/// Most commit objects merged in one step.
const MAX_MERGE: usize = 64;
/// Steps one database may take in one pass.
const MAX_STEPS: usize = 8;
/// How often the whole bucket is swept for garbage-collection work (ms; the first sweep comes
/// ten compaction intervals, at most a minute, after start).
const SWEEP_MS: u64 = 3_600_000;
/// How often a database's generation is listed for orphans (ms).
const ORPHAN_SWEEP_MS: u64 = 3_600_000;
/// How old an unnamed object must be to be taken for an orphan (ms): far longer than any
/// upload (a multipart object's time is when its upload started) or compaction step.
const ORPHAN_MIN_AGE_MS: u64 = 24 * 3_600_000;

/// What one pass did in the bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BucketStats {
    pub segments_written: u64,
    pub images_written: u64,
    pub objects_deleted: u64,
}

/// One step of a pass.
enum Step {
    /// Make the first commit (an image) the base.
    Promote(ObjRef, Vec<Retired>),
    /// Merge these objects (commit objects or segments) into one segment of `level`.
    Merge {
        sources: Vec<ObjRef>,
        level: u8,
        /// Keys to retire with them (commit pointers, besides their bodies).
        also_retire: Vec<String>,
    },
    /// A new base image at this transaction.
    Image(TxnRow),
    /// Delete objects retired long enough ago, and dead generations.
    Collect,
}

impl Remote {
    /// The grace after which a retired object may be deleted (ms).
    pub(super) fn gc_delay_ms(&self) -> u64 {
        (self.cfg.retention + self.cfg.gc_grace + self.cfg.max_skew).as_millis() as u64
    }
}

impl Store {
    /// Bucket mode: one compaction pass over the databases with work due on this server (ones
    /// it committed to, and ones whose manifest has objects due for deletion).
    pub(super) fn compact_bucket(&self, r: &Remote) -> StoreResult<BucketStats> {
        let mut stats = BucketStats::default();
        if r.sweep_due(now_ms(), SWEEP_MS) {
            if let Err(e) = self.sweep_bucket(r) {
                tracing::warn!(error = %e, "sweeping the bucket for garbage");
            }
        }
        for key in r.compaction_candidates(now_ms()) {
            // Taken off before its pass: a commit during the pass marks it again.
            r.set_dirty(&key, None);
            match self.compact_one(r, &key, &mut stats) {
                Ok(next) => r.set_dirty(&key, next),
                Err(e) => {
                    r.mark_dirty(&key);
                    tracing::warn!(db = %key.name, error = %e, "compacting in the bucket");
                }
            }
        }
        Ok(stats)
    }

    /// Lists every database in the bucket and marks those whose manifest has objects to delete
    /// (now or later) for compaction: work that no server may hold in memory after restarts.
    /// At start, then hourly; a LIST per 1,000 databases and a GET per database.
    pub(super) fn sweep_bucket(&self, r: &Remote) -> StoreResult<()> {
        for cluster in r.bucket.list_names("c")? {
            if crate::wire::validate_cluster_name(&cluster).is_err() {
                continue;
            }
            for name in r.bucket.list_names(&layout::cluster(&cluster))? {
                if crate::wire::validate_db_name(&name).is_err() {
                    continue;
                }
                let key = DbKey {
                    cluster: cluster.clone(),
                    name,
                };
                let Some(got) = r.bucket.get(&layout::manifest(&key))? else {
                    continue;
                };
                match Manifest::decode(&got.bytes) {
                    Ok(m) if !m.retired.is_empty() || !m.dead_generations.is_empty() => {
                        r.mark_dirty(&key);
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(db = %key.name, error = %e, "sweeping the bucket"),
                }
            }
        }
        Ok(())
    }

    /// Garbage collection of a database this server has not indexed (found by the sweep, or
    /// deleted here), without indexing it: deletes what is due; returns when more will be.
    fn collect_unindexed(
        &self,
        r: &Remote,
        key: &DbKey,
        stats: &mut BucketStats,
    ) -> StoreResult<Option<u64>> {
        let Some(got) = r.bucket.get(&layout::manifest(key))? else {
            return Ok(None);
        };
        let m = Manifest::decode(&got.bytes)
            .map_err(|e| StoreError::Corrupt(format!("manifest of {:?}: {e}", key.name)))?;
        if m.deleted {
            return self.collect_deleted(r, key, &m, got.etag.as_deref(), stats);
        }
        let now = now_ms();
        let due = |o: &Retired| o.at_ms + r.gc_delay_ms() <= now;
        if m.retired.iter().chain(&m.dead_generations).any(due) {
            let etag = got.etag.ok_or_else(|| {
                StoreError::Corrupt("the object store returned no ETag for a manifest".into())
            })?;
            let mut next = m.clone();
            next.updated_ms = now;
            for o in m.retired.iter().filter(|o| due(o)) {
                r.bucket
                    .delete(&layout::in_generation(key, &m.generation, &o.key))?;
                stats.objects_deleted += 1;
            }
            let dead = self.collect_dead(r, key, &m, stats)?;
            next.retired.retain(|o| !due(o));
            next.dead_generations.retain(|g| !dead.contains(&g.key));
            r.bucket
                .put_settled(&layout::manifest(key), next.encode(), Some(&etag))?;
            return Ok(next_due(r, &next));
        }
        Ok(next_due(r, &m))
    }

    /// Steps through one database; returns when it next has work (ms; `None`: nothing
    /// pending).
    fn compact_one(
        &self,
        r: &Remote,
        key: &DbKey,
        stats: &mut BucketStats,
    ) -> StoreResult<Option<u64>> {
        if self.read(|tx| Ok(find_db(tx, key)?.is_none()))? {
            return self.collect_unindexed(r, key, stats);
        }
        for _ in 0..MAX_STEPS {
            let st = r.db(key);
            {
                let _g = st.lock.lock();
                self.refresh_locked(r, key, &st, true)?;
            }
            let Some((m, etag)) = st.manifest() else {
                return Ok(None);
            };
            if m.deleted {
                return self.collect_deleted(r, key, &m, etag.as_deref(), stats);
            }
            let Some(step) = self.plan(r, key, &m)? else {
                self.sweep_orphans(r, key, &m)?;
                return self.next_work(r, key, &m);
            };
            let etag = etag.ok_or_else(|| {
                StoreError::Corrupt("the object store returned no ETag for a manifest".into())
            })?;
            if !self.take_step(r, key, &m, &etag, step, stats)? {
                // Lost a race with another compactor: try again in a later pass.
                return Ok(Some(0));
            }
        }
        Ok(Some(0))
    }

    /// The next step for a database, if any.
    fn plan(&self, r: &Remote, key: &DbKey, m: &Manifest) -> StoreResult<Option<Step>> {
        let now = now_ms();
        if m.retired
            .iter()
            .chain(m.dead_generations.iter())
            .any(|o| o.at_ms + r.gc_delay_ms() <= now)
        {
            return Ok(Some(Step::Collect));
        }
        let commits = self.unmerged_commits(r, key, m)?;
        if m.base.is_none() {
            let Some((first, _)) = commits.first() else {
                return Ok(None);
            };
            let l = r.load(
                key,
                &m.generation,
                &layout::l0(first.min_txid),
                0,
                false,
                &self.tmp_dir,
            )?;
            let Some(l) = l else {
                return Ok(None);
            };
            if l.header.kind != Kind::Image {
                return Err(StoreError::Corrupt(format!(
                    "the first commit of {:?} is not an image",
                    key.name
                )));
            }
            let base = obj_ref(&l);
            let retire = retire_pointer(&l, first.min_txid, now);
            return Ok(Some(Step::Promote(base, retire)));
        }
        if commits.len() >= L0_FANIN {
            let mut sources = Vec::new();
            let mut also = Vec::new();
            // One page size per segment (a database emptied by a commit of size 0 may come back
            // with another), and a bounded number of sources per step.
            let ps = commits[0].0.page_size;
            let run = commits
                .iter()
                .take_while(|(t, _)| t.page_size == ps || t.commit == 0)
                .take(MAX_MERGE);
            for (t, _) in run {
                let rel = layout::l0(t.min_txid);
                let l = r
                    .load(key, &m.generation, &rel, 0, false, &self.tmp_dir)?
                    .ok_or_else(|| StoreError::Stale(format!("{rel} is missing")))?;
                if l.rel != rel {
                    also.push(rel);
                }
                sources.push(obj_ref(&l));
            }
            return Ok(Some(Step::Merge {
                sources,
                level: 1,
                also_retire: also,
            }));
        }
        let top = m.segments.iter().map(|s| s.level).max().unwrap_or(0);
        for level in 1..=top.min(u8::MAX - 1) {
            let last_ps = m.segments.last().map_or(0, |s| s.page_size);
            let run: Vec<ObjRef> = m
                .segments
                .iter()
                .rev()
                .take_while(|s| s.level == level && s.page_size == last_ps)
                .cloned()
                .collect();
            if run.len() >= SEG_FANIN {
                let mut sources = run;
                sources.reverse();
                return Ok(Some(Step::Merge {
                    sources,
                    level: level + 1,
                    also_retire: Vec::new(),
                }));
            }
        }
        Ok(self.image_due(r, key, m, &commits)?.map(Step::Image))
    }

    /// Commits after the manifest's segments (`l0/` objects), from the local index, with
    /// their page counts.
    fn unmerged_commits(
        &self,
        _r: &Remote,
        key: &DbKey,
        m: &Manifest,
    ) -> StoreResult<Vec<(TxnRow, u64)>> {
        self.read(|tx| {
            let Some(db_id) = find_db(tx, key)? else {
                return Ok(Vec::new());
            };
            let sql = format!(
                "SELECT {}, (SELECT COUNT(*) FROM pages p WHERE p.db_id = ?1 AND p.txid = t.max_txid)
                 FROM txns t WHERE db_id = ?1 AND min_txid >= ?2 ORDER BY max_txid",
                super::TXN_COLS
                    .split(", ")
                    .map(|c| format!("t.{c}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let mut stmt = tx.prepare(&sql)?;
            let rows = stmt.query_map(rusqlite::params![db_id, m.next_l0 as i64], |row| {
                Ok((super::txn_from_row(row)?, row.get::<_, i64>(8)? as u64))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    /// A new base image, if history older than the retention window is worth forgetting: the
    /// image is placed at the newest object boundary at or before K, and made once the versions
    /// it lets go are at least half its own size.
    fn image_due(
        &self,
        r: &Remote,
        key: &DbKey,
        m: &Manifest,
        commits: &[(TxnRow, u64)],
    ) -> StoreResult<Option<TxnRow>> {
        let Some(base) = &m.base else {
            return Ok(None);
        };
        let cutoff = now_ms().saturating_sub(r.cfg.retention.as_millis() as u64);
        let boundaries: Vec<u64> = m
            .segments
            .iter()
            .map(|s| s.max_txid)
            .chain(commits.iter().map(|(t, _)| t.max_txid))
            .collect();
        self.read(|tx| {
            let Some(db_id) = find_db(tx, key)? else {
                return Ok(None);
            };
            // K: the newest transaction accepted before the window's start.
            let k: Option<u64> = tx
                .query_row(
                    "SELECT max_txid FROM txns WHERE db_id = ?1 AND created_ms < ?2
                     ORDER BY max_txid DESC LIMIT 1",
                    rusqlite::params![db_id, cutoff as i64],
                    |row| row.get::<_, i64>(0),
                )
                .map(|v| Some(v as u64))
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })?;
            let Some(k) = k else {
                return Ok(None);
            };
            let Some(at) = boundaries.iter().copied().filter(|&b| b <= k).max() else {
                return Ok(None);
            };
            if at <= base.max_txid {
                return Ok(None);
            }
            let Some(t) = super::txn_at(tx, db_id, at)? else {
                return Ok(None);
            };
            let droppable: i64 = tx.query_row(
                "SELECT COUNT(*) FROM pages WHERE db_id = ?1 AND txid <= ?2",
                rusqlite::params![db_id, at as i64],
                |row| row.get(0),
            )?;
            let image = u64::from(t.commit).max(1);
            Ok((droppable as u64 * 2 >= image).then_some(t))
        })
    }

    /// When a later pass may find work here without a new commit (ms): when retired objects
    /// come due, and while the retention window still covers commits after the base (K, and
    /// with it a new image, may still move), once the newest of them leaves it.
    fn next_work(&self, r: &Remote, key: &DbKey, m: &Manifest) -> StoreResult<Option<u64>> {
        let base = m.base.as_ref().map_or(0, |b| b.max_txid);
        let window = r.cfg.retention.as_millis() as u64;
        let moves = self.read(|tx| {
            let Some(db_id) = find_db(tx, key)? else {
                return Ok(None);
            };
            Ok(head(tx, db_id)?
                .filter(|h| h.max_txid > base && h.created_ms + window >= now_ms())
                .map(|h| h.created_ms + window + 1))
        })?;
        Ok(earliest([moves, next_due(r, m)]))
    }

    /// Builds what `step` needs, swaps the manifest, then indexes the result. Returns false if
    /// another server changed the manifest first.
    fn take_step(
        &self,
        r: &Remote,
        key: &DbKey,
        m: &Manifest,
        etag: &str,
        step: Step,
        stats: &mut BucketStats,
    ) -> StoreResult<bool> {
        let now = now_ms();
        let mut next = m.clone();
        next.updated_ms = now;
        let mut written: Option<String> = None;
        match step {
            Step::Promote(base, retire) => {
                next.next_l0 = base.max_txid + 1;
                next.base = Some(base);
                next.retired.extend(retire);
            }
            Step::Merge {
                sources,
                level,
                also_retire,
            } => {
                let seg = self.merge(r, key, &m.generation, &sources, level)?;
                written = Some(seg.key.clone());
                stats.segments_written += 1;
                let (lo, hi) = (sources[0].min_txid, seg.max_txid);
                if level == 1 {
                    next.segments.push(seg);
                    next.next_l0 = hi + 1;
                } else {
                    next.segments.retain(|s| s.max_txid < lo || s.min_txid > hi);
                    let at = next.segments.partition_point(|s| s.max_txid < lo);
                    next.segments.insert(at, seg);
                }
                let gone = sources.into_iter().map(|s| s.key).chain(also_retire);
                next.retired
                    .extend(gone.map(|k| Retired { key: k, at_ms: now }));
            }
            Step::Image(t) => {
                let img = self.write_image_object(r, key, &m.generation, &t)?;
                written = Some(img.key.clone());
                stats.images_written += 1;
                let mut gone: Vec<String> = m.base.iter().map(|b| b.key.clone()).collect();
                gone.extend(
                    m.segments
                        .iter()
                        .filter(|s| s.max_txid <= t.max_txid)
                        .map(|s| s.key.clone()),
                );
                for (c, _) in self.unmerged_commits(r, key, m)? {
                    if c.max_txid <= t.max_txid {
                        gone.extend(self.commit_keys(r, key, m, &c)?);
                    }
                }
                next.segments.retain(|s| s.max_txid > t.max_txid);
                next.next_l0 = next.next_l0.max(t.max_txid + 1);
                next.base = Some(img);
                next.retired
                    .extend(gone.into_iter().map(|k| Retired { key: k, at_ms: now }));
            }
            Step::Collect => {
                let due: Vec<Retired> = m
                    .retired
                    .iter()
                    .filter(|o| o.at_ms + r.gc_delay_ms() <= now)
                    .cloned()
                    .collect();
                for o in &due {
                    r.bucket
                        .delete(&layout::in_generation(key, &m.generation, &o.key))?;
                    stats.objects_deleted += 1;
                }
                let dead = self.collect_dead(r, key, m, stats)?;
                let keys: HashSet<&str> = due.iter().map(|o| o.key.as_str()).collect();
                next.retired.retain(|o| !keys.contains(o.key.as_str()));
                next.dead_generations.retain(|g| !dead.contains(&g.key));
            }
        }
        // Never publish a manifest readers would refuse: that would make the database
        // unreadable for every server.
        if let Err(why) = Manifest::decode(&next.encode()) {
            if let Some(k) = written {
                let _ = r
                    .bucket
                    .delete(&layout::in_generation(key, &m.generation, &k));
            }
            return Err(StoreError::Corrupt(format!(
                "compaction of {:?} planned an invalid manifest: {why}",
                key.name
            )));
        }
        let won = r
            .bucket
            .put_settled(&layout::manifest(key), next.encode(), Some(etag))?;
        if won == Cas::Lost {
            // What this step wrote stays: a manifest written meanwhile by a server that read
            // ours could name it. The orphan sweep deletes it once nothing does.
            return Ok(false);
        }
        let st = r.db(key);
        let _g = st.lock.lock();
        self.refresh_locked(r, key, &st, true)?;
        Ok(true)
    }

    /// The keys of one commit's objects (its `l0/` key, and its body if that is a pointer).
    fn commit_keys(
        &self,
        r: &Remote,
        key: &DbKey,
        m: &Manifest,
        c: &TxnRow,
    ) -> StoreResult<Vec<String>> {
        let rel = layout::l0(c.min_txid);
        let mut out = vec![rel.clone()];
        if let Some(l) = r.load(key, &m.generation, &rel, 0, false, &self.tmp_dir)?
            && l.rel != rel
        {
            out.push(l.rel);
        }
        Ok(out)
    }

    /// Deletes every object under `prefix` (a dead generation); returns how many.
    fn delete_prefix(&self, r: &Remote, prefix: &str) -> StoreResult<u64> {
        let all = r.bucket.list_all(prefix)?;
        for (k, ..) in &all {
            r.bucket.delete(k)?;
        }
        Ok(all.len() as u64)
    }

    /// Deletes the objects of generations dead for longer than the grace; returns which.
    fn collect_dead(
        &self,
        r: &Remote,
        key: &DbKey,
        m: &Manifest,
        stats: &mut BucketStats,
    ) -> StoreResult<Vec<String>> {
        let now = now_ms();
        let mut done = Vec::new();
        for g in m
            .dead_generations
            .iter()
            .filter(|g| g.at_ms + r.gc_delay_ms() <= now)
        {
            stats.objects_deleted += self.delete_prefix(r, &layout::generation(key, &g.key))?;
            done.push(g.key.clone());
        }
        Ok(done)
    }

    /// A deleted database: once the grace has passed, the objects of its dead generations go.
    /// The tombstone manifest stays (a few hundred bytes): deleting it could race a creation
    /// of the same name, and a creation replaces it by compare-and-swap anyway.
    fn collect_deleted(
        &self,
        r: &Remote,
        key: &DbKey,
        m: &Manifest,
        etag: Option<&str>,
        stats: &mut BucketStats,
    ) -> StoreResult<Option<u64>> {
        let dead = self.collect_dead(r, key, m, stats)?;
        let mut next = m.clone();
        next.dead_generations.retain(|g| !dead.contains(&g.key));
        if let (Some(etag), false) = (etag, dead.is_empty()) {
            next.updated_ms = now_ms();
            r.bucket
                .put_settled(&layout::manifest(key), next.encode(), Some(etag))?;
        }
        Ok(next_due(r, &next))
    }

    /// Deletes objects of the current generation that nothing names and that are older than
    /// [`ORPHAN_MIN_AGE_MS`]: output of a compaction that crashed or lost its swap, bodies of
    /// commits that lost their race. Lists the generation at most once an hour per database,
    /// and decides what is named from the manifest as it is *after* the listing, so an object
    /// named meanwhile is never taken for an orphan. Commit keys at or past `next_l0`, and the
    /// bodies of those commits, are never orphans.
    fn sweep_orphans(&self, r: &Remote, key: &DbKey, m: &Manifest) -> StoreResult<()> {
        let now = now_ms();
        if !r.orphan_sweep_due(key, now, ORPHAN_SWEEP_MS) {
            return Ok(());
        }
        let prefix = layout::generation(key, &m.generation);
        let listing = r.bucket.list_all_timed(&prefix)?;
        let st = r.db(key);
        {
            let _g = st.lock.lock();
            self.refresh_locked(r, key, &st, true)?;
        }
        let Some((m, _)) = st.manifest() else {
            return Ok(());
        };
        if m.deleted || !prefix.ends_with(&m.generation) {
            return Ok(());
        }
        let mut named: HashSet<String> = m.listed().map(|o| o.key.clone()).collect();
        named.extend(m.retired.iter().map(|o| o.key.clone()));
        for (c, _) in self.unmerged_commits(r, key, &m)? {
            named.extend(self.commit_keys(r, key, &m, &c)?);
        }
        let txid_of = |rel: &str, kind: &str| -> Option<u64> {
            let rest = rel.strip_prefix(kind)?;
            u64::from_str_radix(rest.get(..16)?, 16).ok()
        };
        for (full, _, modified_ms) in listing {
            let rel = full
                .strip_prefix(&format!("{prefix}/"))
                .unwrap_or(&full)
                .to_string();
            let unmerged = txid_of(&rel, "l0/")
                .or_else(|| txid_of(&rel, "big/"))
                .is_some_and(|t| t >= m.next_l0);
            if named.contains(&rel) || unmerged || modified_ms + ORPHAN_MIN_AGE_MS > now {
                continue;
            }
            tracing::info!(db = %key.name, object = %rel, "deleting an orphaned object");
            r.bucket.delete(&full)?;
        }
        Ok(())
    }

    /// Writes one segment holding every transaction of `sources` (in order): their records,
    /// their slot entries and their page bytes, streamed from the bucket.
    fn merge(
        &self,
        r: &Remote,
        key: &DbKey,
        gn: &str,
        sources: &[ObjRef],
        level: u8,
    ) -> StoreResult<ObjRef> {
        let mut loaded: Vec<Loaded> = Vec::new();
        for s in sources {
            let l = r
                .load(key, gn, &s.key, s.index_len, false, &self.tmp_dir)?
                .ok_or_else(|| StoreError::Stale(format!("{} is missing", s.key)))?;
            if l.header.kind != Kind::Pages {
                return Err(StoreError::Corrupt(format!("{} is not a segment", s.key)));
            }
            loaded.push(l);
        }
        // The page size of the pages held (a source without pages, a commit of size 0, may
        // name another).
        let ps = loaded
            .iter()
            .find(|l| l.header.slots > 0)
            .unwrap_or(&loaded[0])
            .header
            .page_size;
        let mut records: Vec<TxnRecord> = Vec::new();
        let mut slots = 0u64;
        let mut index = Spill::new(&self.tmp_dir, 1 << 20);
        let mut entries = Spill::new(&self.tmp_dir, 1 << 20);
        for l in &loaded {
            if l.header.page_size != ps && l.header.slots > 0 {
                return Err(StoreError::Corrupt("segments of several page sizes".into()));
            }
            for t in &l.txns {
                records.push(TxnRecord {
                    first_slot: t.first_slot + slots,
                    ..t.clone()
                });
            }
            std::io::copy(&mut l.entries.reader()?, &mut entries)?;
            slots += l.header.slots;
        }
        let (min, max) = (records[0].min_txid, records[records.len() - 1].max_txid);
        let header = Header::new(
            Kind::Pages,
            level,
            ps,
            records.len() as u32,
            slots,
            (min, max),
            layout::nonce(),
            0,
            0,
        );
        let mut digest = crate::ltx::CRC64.digest();
        for t in &records {
            let b = t.encode();
            digest.update(&b);
            index.write_all(&b)?;
        }
        let mut er = entries.into_reader()?;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = er.read(&mut buf)?;
            if n == 0 {
                break;
            }
            digest.update(&buf[..n]);
            index.write_all(&buf[..n])?;
        }
        index.write_all(&digest.finalize().to_be_bytes())?;
        let rel = layout::segment(min, max, header.nonce);
        let data = SourceData::new(r, key, gn, &loaded);
        let body = std::io::Cursor::new(header.encode())
            .chain(index.into_reader()?)
            .chain(data);
        r.bucket
            .upload(&layout::in_generation(key, gn, &rel), body, header.len)?;
        Ok(ObjRef {
            key: rel,
            min_txid: min,
            max_txid: max,
            len: header.len,
            index_len: header.index_len,
            page_size: ps,
            level,
        })
    }

    /// Writes an image of the database at `t` (every page, read through the index and the
    /// bucket, re-verified) as a new object.
    fn write_image_object(
        &self,
        r: &Remote,
        key: &DbKey,
        gn: &str,
        t: &TxnRow,
    ) -> StoreResult<ObjRef> {
        let slots = format::image_slots(t.page_size, t.commit);
        let record = TxnRecord {
            min_txid: 1,
            max_txid: t.max_txid,
            page_size: t.page_size,
            commit: t.commit,
            timestamp_ms: t.timestamp_ms,
            pre_apply: 0,
            post_apply: t.post_apply,
            created_ms: t.created_ms,
            first_slot: 0,
        };
        let header = Header::new(
            Kind::Image,
            0,
            t.page_size,
            1,
            slots,
            (1, t.max_txid),
            layout::nonce(),
            0,
            0,
        );
        let rel = layout::image(t.max_txid, header.nonce);
        let fetch = RemoteBytes {
            remote: r,
            cache: false,
        };
        self.read(|tx| {
            let db_id = find_db(tx, key)?
                .ok_or_else(|| StoreError::Stale("database row vanished".into()))?;
            let lock = lock_page(t.page_size);
            let mut index = Spill::new(&self.tmp_dir, 1 << 20);
            let mut digest = crate::ltx::CRC64.digest();
            let rec = record.encode();
            digest.update(&rec);
            index.write_all(&rec)?;
            for pgno in (1..=t.commit).filter(|&p| p != lock) {
                let ck =
                    page_ck(tx, db_id, pgno, t.max_txid)?.ok_or(StoreError::NoPrevPage(pgno))?;
                digest.update(&ck.to_be_bytes());
                index.write_all(&ck.to_be_bytes())?;
            }
            index.write_all(&digest.finalize().to_be_bytes())?;
            let pages = ImageBytes {
                reader: super::image::ImageReader::new(tx, db_id, t, &fetch),
                next: 1,
                lock,
                commit: t.commit,
                buf: Vec::new(),
                at: 0,
            };
            let body = std::io::Cursor::new(header.encode())
                .chain(index.into_reader()?)
                .chain(pages);
            r.bucket
                .upload(&layout::in_generation(key, gn, &rel), body, header.len)?;
            Ok(())
        })?;
        self.flush_stash(r);
        Ok(ObjRef {
            key: rel,
            min_txid: 1,
            max_txid: t.max_txid,
            len: header.len,
            index_len: header.index_len,
            page_size: t.page_size,
            level: 0,
        })
    }
}

/// The page bytes of an image, read in order (lock page skipped), as a byte stream.
struct ImageBytes<'a> {
    reader: super::image::ImageReader<'a>,
    next: u32,
    lock: u32,
    commit: u32,
    buf: Vec<u8>,
    at: usize,
}

impl Read for ImageBytes<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.at == self.buf.len() {
            if self.next == self.lock {
                self.next += 1;
            }
            if self.next > self.commit {
                return Ok(0);
            }
            let (ck, data) = self
                .reader
                .page(self.next)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            if crate::ltx::page_checksum(self.next, &data) != ck {
                return Err(std::io::Error::other(format!(
                    "page {} fails its checksum",
                    self.next
                )));
            }
            self.buf = data;
            self.at = 0;
            self.next += 1;
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// The data sections of several objects, one after the other, read from the bucket in ranges.
struct SourceData<'a> {
    remote: &'a Remote,
    /// (full key, data offset, data length) of each source.
    parts: Vec<(String, u64, u64)>,
    part: usize,
    done: u64,
    buf: bytes::Bytes,
}

impl<'a> SourceData<'a> {
    fn new(remote: &'a Remote, key: &DbKey, gn: &str, loaded: &[Loaded]) -> Self {
        let parts = loaded
            .iter()
            .map(|l| {
                (
                    layout::in_generation(key, gn, &l.rel),
                    l.header.data_offset,
                    l.header.len - l.header.data_offset,
                )
            })
            .collect();
        SourceData {
            remote,
            parts,
            part: 0,
            done: 0,
            buf: bytes::Bytes::new(),
        }
    }
}

impl Read for SourceData<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.buf.is_empty() {
            let Some((k, off, len)) = self.parts.get(self.part) else {
                return Ok(0);
            };
            if self.done == *len {
                self.part += 1;
                self.done = 0;
                continue;
            }
            let n = (len - self.done).min(super::remote::MAX_RANGE);
            let start = off + self.done;
            let (got, _) = self
                .remote
                .bucket
                .get_range(k, start..start + n)
                .map_err(|e| std::io::Error::other(e.to_string()))?
                .ok_or_else(|| std::io::Error::other(format!("{k} disappeared")))?;
            if got.len() as u64 != n {
                return Err(std::io::Error::other(format!(
                    "{k} is shorter than indexed"
                )));
            }
            self.done += n;
            self.buf = got;
        }
        let n = out.len().min(self.buf.len());
        out[..n].copy_from_slice(&self.buf[..n]);
        self.buf = self.buf.slice(n..);
        Ok(n)
    }
}

/// When the first retired object or dead generation of `m` comes due for deletion (ms).
fn next_due(r: &Remote, m: &Manifest) -> Option<u64> {
    m.retired
        .iter()
        .chain(&m.dead_generations)
        .map(|o| o.at_ms + r.gc_delay_ms())
        .min()
}

/// The earliest of some times.
fn earliest<const N: usize>(times: [Option<u64>; N]) -> Option<u64> {
    times.into_iter().flatten().min()
}

/// The manifest's reference to a loaded object.
fn obj_ref(l: &Loaded) -> ObjRef {
    ObjRef {
        key: l.rel.clone(),
        min_txid: l.header.min_txid,
        max_txid: l.header.max_txid,
        len: l.header.len,
        index_len: l.header.index_len,
        page_size: l.header.page_size,
        level: l.header.level,
    }
}

/// When the base is a commit's body reached through a pointer, the pointer is retired.
fn retire_pointer(l: &Loaded, min_txid: u64, now: u64) -> Vec<Retired> {
    let rel = layout::l0(min_txid);
    if l.rel == rel {
        Vec::new()
    } else {
        vec![Retired {
            key: rel,
            at_ms: now,
        }]
    }
}
