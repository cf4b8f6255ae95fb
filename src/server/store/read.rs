//! Reading history: pages as of a position (`/db/page`), change sets since a position
//! (`/db/sync`, `/sync`), and choosing the transaction a snapshot is built from.
//!
//! Invariant: each call runs in one read transaction, so it sees exactly one store state even
//! while commits and compaction run. Nothing here writes.

use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use super::remote::{Need, RemoteBytes};
use super::{
    Bytes, DbKey, Fetch, Loc, Store, StoreError, StoreResult, TxnRow, Version, find_db, head,
    page_version, txn_at,
};
use crate::ltx::{lock_page, page_checksum};
use crate::wire::{Changes, Pos};

/// Most page numbers listed in a change set before it becomes `all: true`.
pub(super) const MAX_CHANGED_PGNOS: usize = 65_536;
/// Most page data in one `/db/page` reply; the first requested page is always included.
pub const MAX_PAGE_REPLY_BYTES: usize = 16 << 20;

/// Pages read at a position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PagesAt {
    /// The position the pages are from.
    pub pos: Pos,
    pub page_size: u32,
    /// The database size in pages at `pos`.
    pub commit: u32,
    pub pages: Vec<(u32, Vec<u8>)>,
    /// The stored LTX page checksum of each returned page, in the same order.
    pub checksums: Vec<(u32, u64)>,
}

/// The transaction a snapshot is built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotPlan {
    pub db_id: i64,
    pub txn: TxnRow,
}

impl Store {
    /// Pages `pgnos` as of `pos`, or of the latest position when `pos` is `None`. Page numbers
    /// past that position's commit size are left out, except that the first one requested
    /// yields `ENOPAGE`. The lock page reads as zeros.
    ///
    /// `warm` (bytes, our extension, local mode only): the reply also carries, up to that much,
    /// the pages a cold reader of the database needs next whatever its query: the schema table
    /// and the interior pages of every b-tree, roots first, then level by level (see
    /// [`warm_pages`]).
    pub fn pages_at(
        &self,
        key: &DbKey,
        pos: Option<Pos>,
        pgnos: &[u32],
        warm: usize,
    ) -> StoreResult<PagesAt> {
        let Some(r) = self.remote() else {
            return self.read(|tx| {
                let local = self.local();
                let mut got = pages_in(tx, key, pos, pgnos, &local, false)?;
                if warm > 0 {
                    add_warm_pages(tx, key, &mut got, warm, &local, &self.warm_sets)?;
                }
                Ok(got)
            });
        };
        let need = pos.map_or(Need::Recent, |p| Need::Txid(p.txid.0));
        self.sync_db(r, key, need)?;
        let fetch = RemoteBytes {
            remote: r,
            cache: true,
        };
        let got = match self.read(|tx| pages_in(tx, key, pos, pgnos, &fetch, true)) {
            // The index changed under the read (an object is gone, the database was evicted
            // from the cache meanwhile): read the bucket again, once.
            Err(e @ (StoreError::Stale(_) | StoreError::NoDb(_))) => {
                tracing::debug!(db = %key.name, error = %e, "re-reading the bucket");
                self.sync_db(r, key, Need::Full)?;
                self.read(|tx| pages_in(tx, key, pos, pgnos, &fetch, true))
            }
            other => other,
        };
        self.flush_stash(r);
        got
    }

    /// What changed in `key` after `client`; `None` if the database does not exist.
    pub fn changes(&self, key: &DbKey, client: Pos) -> StoreResult<Option<Changes>> {
        if let Some(r) = self.remote() {
            self.sync_db(r, key, Need::Recent)?;
        }
        self.read(|tx| match find_db(tx, key)? {
            Some(id) => changes_in(tx, id, client).map(Some),
            None => Ok(None),
        })
    }

    /// Change sets for many databases, read in one transaction.
    pub fn changes_many(
        &self,
        cluster: &str,
        positions: &[(String, Pos)],
    ) -> StoreResult<Vec<(String, Changes)>> {
        if let Some(r) = self.remote() {
            for (name, _) in positions {
                let key = DbKey {
                    cluster: cluster.to_string(),
                    name: name.clone(),
                };
                self.sync_db(r, &key, Need::Recent)?;
            }
        }
        self.read(|tx| {
            let mut out = Vec::new();
            for (name, pos) in positions {
                let key = DbKey {
                    cluster: cluster.to_string(),
                    name: name.clone(),
                };
                if let Some(id) = find_db(tx, &key)? {
                    out.push((name.clone(), changes_in(tx, id, *pos)?));
                }
            }
            Ok(out)
        })
    }
}

/// Prefetch hints within this many slots of the first requested page may share its range GET.
const HINT_WINDOW_SLOTS: u64 = 256;

/// The remote versions that one range GET around `anchor` reads anyway: slots of its object
/// chained to it by gaps the fetcher reads through, within the hint window.
fn one_range(
    anchor: Loc,
    versions: &[Version],
    page_size: u32,
) -> std::collections::HashSet<(i64, u64)> {
    let span = (super::remote::MAX_RANGE / u64::from(page_size)).min(HINT_WINDOW_SLOTS);
    let mut slots: Vec<u64> = versions
        .iter()
        .filter_map(|v| match &v.bytes {
            Bytes::Remote(l) if l.obj == anchor.obj => Some(l.slot),
            _ => None,
        })
        .filter(|s| s.abs_diff(anchor.slot) < span)
        .collect();
    slots.sort_unstable();
    slots.dedup();
    let at = slots.binary_search(&anchor.slot).unwrap_or(0);
    let (mut lo, mut hi) = (at, at);
    let gap = super::remote::MAX_GAP_SLOTS;
    // Grow from the anchor while the fetcher would read through the gap, in at most `span`
    // slots (its byte cap).
    loop {
        let down = lo > 0 && slots[lo] - slots[lo - 1] <= gap && slots[hi] - slots[lo - 1] < span;
        let up = hi + 1 < slots.len()
            && slots[hi + 1] - slots[hi] <= gap
            && slots[hi + 1] - slots[lo] < span;
        if up {
            hi += 1;
        } else if down {
            lo -= 1;
        } else {
            break;
        }
    }
    slots[lo..=hi].iter().map(|s| (anchor.obj, *s)).collect()
}

/// The pages of one `/db/page` request. `thrifty` (bucket mode): a hint whose bytes are only in
/// the bucket is served when it shares the first page's object and lies near it (one range GET
/// for all); other such hints are left out, so a request costs at most one GET.
fn pages_in(
    tx: &Connection,
    key: &DbKey,
    pos: Option<Pos>,
    pgnos: &[u32],
    fetch: &dyn Fetch,
    thrifty: bool,
) -> StoreResult<PagesAt> {
    let db_id = find_db(tx, key)?.ok_or_else(|| StoreError::NoDb(key.name.clone()))?;
    let txn = match pos {
        Some(pos) => servable(tx, db_id, pos)?,
        None => head(tx, db_id)?.ok_or_else(|| {
            StoreError::NoTxid(format!("database {:?} has no data yet", key.name))
        })?,
    };
    let most = (MAX_PAGE_REPLY_BYTES / txn.page_size as usize).max(1);
    // Past the byte cap, the rest are prefetch hints a reply may leave out (spec 2.4).
    let mut versions: Vec<Version> = Vec::with_capacity(pgnos.len().min(most));
    for (i, &pgno) in pgnos.iter().enumerate().take(most) {
        match read_page(tx, db_id, &txn, pgno, fetch.bucket())? {
            Some(v) => versions.push(v),
            None if i == 0 => return Err(StoreError::NoPage(pgno)),
            None => {}
        }
    }
    if thrifty {
        let anchor = match versions.first().map(|v| &v.bytes) {
            Some(Bytes::Remote(l)) => Some(*l),
            _ => None,
        };
        let near = anchor
            .map(|a| one_range(a, &versions, txn.page_size))
            .unwrap_or_default();
        let mut first = true;
        versions.retain(|v| {
            let keep = first
                || match &v.bytes {
                    Bytes::Here(_) => true,
                    Bytes::Remote(l) => near.contains(&(l.obj, l.slot)),
                };
            first = false;
            keep
        });
    }
    let datas = fetch.batch(tx, db_id, &versions)?;
    let checksums = versions.iter().map(|v| (v.pgno, v.ck)).collect();
    let pages = versions.iter().map(|v| v.pgno).zip(datas).collect();
    Ok(PagesAt {
        pos: txn.pos(),
        page_size: txn.page_size,
        commit: txn.commit,
        pages,
        checksums,
    })
}

/// Most bytes of warm sets kept in memory ([`WarmSets`]).
const WARM_SETS_BYTES: usize = 16 << 20;

/// One warm set: page number, stored checksum and bytes of each page, in reply order.
type WarmSet = Arc<Vec<(u32, u64, Vec<u8>)>>;

/// The warm sets ([`warm_pages`]) built most recently, by database id, TXID and page count,
/// least recently used first, at most [`WARM_SETS_BYTES`] in all. The pages at a TXID never
/// change while it is servable (which the caller checks first) and database ids are never
/// reused, so an entry is never stale: many cold readers opening one database at one position
/// (a fleet of functions starting) cost the walk once.
#[derive(Default)]
pub(super) struct WarmSets {
    entries: std::collections::VecDeque<((i64, u64, usize), WarmSet)>,
    bytes: usize,
}

impl WarmSets {
    fn get(&mut self, key: (i64, u64, usize)) -> Option<WarmSet> {
        let i = self.entries.iter().position(|(k, _)| *k == key)?;
        let e = self.entries.remove(i).expect("found");
        let set = e.1.clone();
        self.entries.push_back(e);
        Some(set)
    }

    fn put(&mut self, key: (i64, u64, usize), set: WarmSet) {
        let size = set.iter().map(|(_, _, d)| d.len()).sum::<usize>();
        if size > WARM_SETS_BYTES / 2 {
            return;
        }
        self.bytes += size;
        self.entries.push_back((key, set));
        while self.bytes > WARM_SETS_BYTES {
            let Some((_, old)) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= old.iter().map(|(_, _, d)| d.len()).sum::<usize>();
        }
    }
}

/// Adds the warm pages of `got`'s position to it, up to `budget` bytes and the reply's cap.
fn add_warm_pages(
    tx: &Connection,
    key: &DbKey,
    got: &mut PagesAt,
    budget: usize,
    fetch: &dyn Fetch,
    sets: &Mutex<WarmSets>,
) -> StoreResult<()> {
    let db_id = find_db(tx, key)?.ok_or_else(|| StoreError::NoDb(key.name.clone()))?;
    let txn = txn_at(tx, db_id, got.pos.txid.0)?.ok_or_else(|| StoreError::PosMismatch(got.pos))?;
    let ps = txn.page_size as usize;
    let have: usize = got.pages.iter().map(|(_, d)| d.len()).sum();
    let room = budget.min(MAX_PAGE_REPLY_BYTES.saturating_sub(have)) / ps;
    let mut seen: std::collections::HashSet<u32> = got.pages.iter().map(|(p, _)| *p).collect();
    let most = room + seen.len();
    let lock = || sets.lock().unwrap_or_else(|e| e.into_inner());
    let set_key = (db_id, txn.max_txid, most);
    let cached = lock().get(set_key);
    let set = match cached {
        Some(set) => set,
        None => {
            let set: WarmSet = Arc::new(
                warm_pages(tx, db_id, &txn, fetch, most)?
                    .into_iter()
                    .map(|(v, data)| (v.pgno, v.ck, data))
                    .collect(),
            );
            lock().put(set_key, set.clone());
            set
        }
    };
    let mut added = 0;
    for (pgno, ck, data) in set.iter() {
        if added >= room {
            break;
        }
        if seen.insert(*pgno) {
            got.checksums.push((*pgno, *ck));
            got.pages.push((*pgno, data.clone()));
            added += 1;
        }
    }
    Ok(())
}

/// The pages any cold reader of the database at `txn` reads first: the whole schema table (a
/// statement cannot be prepared without it), then the interior pages of every table and index,
/// roots first, then level by level, at most `most` pages in all. Leaves of data b-trees are
/// never included; b-trees are balanced, so one probe per b-tree and level tells whether the
/// next level is interior.
pub(super) fn warm_pages(
    tx: &Connection,
    db_id: i64,
    txn: &TxnRow,
    fetch: &dyn Fetch,
    most: usize,
) -> StoreResult<Vec<(Version, Vec<u8>)>> {
    use crate::btree;
    let read = |pgnos: &[u32]| -> StoreResult<Vec<(Version, Vec<u8>)>> {
        let mut vs = Vec::with_capacity(pgnos.len());
        for &p in pgnos {
            if let Some(v) = read_page(tx, db_id, txn, p, fetch.bucket())? {
                vs.push(v);
            }
        }
        let datas = fetch.batch(tx, db_id, &vs)?;
        Ok(vs.into_iter().zip(datas).collect())
    };
    let mut out: Vec<(Version, Vec<u8>)> = Vec::new();
    let mut seen = std::collections::HashSet::from([1u32]);
    // The schema table, whole.
    let mut roots = Vec::new();
    let mut level = vec![1u32];
    let mut usable = txn.page_size as usize;
    while !level.is_empty() && out.len() < most {
        let mut next = Vec::new();
        for (v, d) in read(&level)? {
            if v.pgno == 1 {
                usable -= usize::from(d.get(20).copied().unwrap_or(0));
            }
            if btree::is_interior(v.pgno, &d) {
                next.extend(
                    btree::children(v.pgno, &d)
                        .into_iter()
                        .filter(|c| seen.insert(*c)),
                );
            } else {
                roots.extend(btree::schema_roots(v.pgno, &d, usable));
            }
            out.push((v, d));
        }
        level = next;
    }
    // Every b-tree's interior levels, each page tagged with its tree.
    let mut level: Vec<(u32, u32)> = roots
        .into_iter()
        .filter(|r| *r <= txn.commit && seen.insert(*r))
        .map(|r| (r, r))
        .collect();
    while !level.is_empty() && out.len() < most {
        level.truncate(most - out.len());
        let pgnos: Vec<u32> = level.iter().map(|(_, p)| *p).collect();
        let trees: std::collections::HashMap<u32, u32> =
            level.iter().map(|(t, p)| (*p, *t)).collect();
        // Children by parent. The level below the last interior one is every leaf of the
        // database, so nothing is done per child until the probes tell which trees go deeper.
        let mut next: Vec<(u32, Vec<u32>)> = Vec::new();
        let mut probes: Vec<(u32, u32)> = Vec::new();
        let mut probed = std::collections::HashSet::new();
        for (v, d) in read(&pgnos)? {
            if !btree::is_interior(v.pgno, &d) {
                continue;
            }
            let tree = trees[&v.pgno];
            let kids: Vec<u32> = btree::children(v.pgno, &d)
                .into_iter()
                .filter(|c| *c <= txn.commit)
                .collect();
            if let Some(&first) = kids.first()
                && probed.insert(tree)
            {
                probes.push((tree, first));
            }
            next.push((tree, kids));
            out.push((v, d));
        }
        // One probe per tree: are its next-level pages interior?
        let probe_pgnos: Vec<u32> = probes.iter().map(|(_, p)| *p).collect();
        let interior: std::collections::HashSet<u32> = read(&probe_pgnos)?
            .into_iter()
            .filter(|(v, d)| btree::is_interior(v.pgno, d))
            .map(|(v, _)| v.pgno)
            .collect();
        let deeper: std::collections::HashSet<u32> = probes
            .iter()
            .filter(|(_, p)| interior.contains(p))
            .map(|(t, _)| *t)
            .collect();
        level = next
            .into_iter()
            .filter(|(t, _)| deeper.contains(t))
            .flat_map(|(t, kids)| kids.into_iter().map(move |c| (t, c)))
            .filter(|(_, c)| seen.insert(*c))
            .collect();
    }
    out.truncate(most);
    Ok(out)
}

/// The transaction at `pos` if it is still retained and its checksum matches; otherwise
/// `EPOSMISMATCH` with the current position.
fn servable(tx: &Connection, db_id: i64, pos: Pos) -> StoreResult<TxnRow> {
    let current = || -> StoreResult<Pos> { Ok(head(tx, db_id)?.map_or(Pos::ZERO, |h| h.pos())) };
    if pos.is_zero() {
        return Err(StoreError::PosMismatch(current()?));
    }
    match txn_at(tx, db_id, pos.txid.0)? {
        Some(t) if t.post_apply == pos.checksum.0 => Ok(t),
        _ => Err(StoreError::PosMismatch(current()?)),
    }
}

/// The version of `pgno` at `txn`, `None` past its commit size. The lock page reads as zeros.
fn read_page(
    tx: &Connection,
    db_id: i64,
    txn: &TxnRow,
    pgno: u32,
    bucket: bool,
) -> StoreResult<Option<Version>> {
    if pgno == 0 || pgno > txn.commit {
        return Ok(None);
    }
    if pgno == lock_page(txn.page_size) {
        let zeros = vec![0; txn.page_size as usize];
        return Ok(Some(Version {
            pgno,
            txid: txn.max_txid,
            ck: page_checksum(pgno, &zeros),
            bytes: Bytes::Here(zeros),
            cached: false,
        }));
    }
    match page_version(tx, db_id, pgno, txn.max_txid, bucket)? {
        Some(v) => Ok(Some(v)),
        None => Err(StoreError::NoPrevPage(pgno)),
    }
}

fn no_changes(pos: Pos) -> Changes {
    Changes {
        pos,
        pgnos: None,
        all: None,
    }
}

fn all_changed(pos: Pos) -> Changes {
    Changes {
        pos,
        pgnos: None,
        all: Some(true),
    }
}

/// Spec 2.5: `all` when the client position is zero, unknown, pruned, ahead or mismatched, or
/// the page size changed; otherwise every page written after it, plus pages truncated away.
fn changes_in(tx: &Connection, db_id: i64, client: Pos) -> StoreResult<Changes> {
    let Some(h) = head(tx, db_id)? else {
        return Ok(if client.is_zero() {
            no_changes(Pos::ZERO)
        } else {
            all_changed(Pos::ZERO)
        });
    };
    let pos = h.pos();
    if client == pos {
        return Ok(no_changes(pos));
    }
    let base = match txn_at(tx, db_id, client.txid.0)? {
        Some(t) if !client.is_zero() && t.post_apply == client.checksum.0 => t,
        _ => return Ok(all_changed(pos)),
    };
    if base.page_size != h.page_size {
        return Ok(all_changed(pos));
    }
    // One more than the limit is enough to know the answer is `all`: time and memory stay
    // bounded however much changed since the client's position.
    let mut pgnos: Vec<u32> = tx
        .prepare_cached(
            "SELECT DISTINCT pgno FROM pages WHERE db_id = ?1 AND txid > ?2 ORDER BY pgno LIMIT ?3",
        )?
        .query_map(
            rusqlite::params![db_id, base.max_txid as i64, MAX_CHANGED_PGNOS as i64 + 1],
            |r| r.get(0),
        )?
        .collect::<Result<_, _>>()?;
    if h.commit < base.commit {
        if (base.commit - h.commit) as usize > MAX_CHANGED_PGNOS {
            return Ok(all_changed(pos));
        }
        pgnos.extend(h.commit + 1..=base.commit);
        pgnos.sort_unstable();
        pgnos.dedup();
    }
    if pgnos.len() > MAX_CHANGED_PGNOS {
        return Ok(all_changed(pos));
    }
    Ok(Changes {
        pos,
        pgnos: Some(pgnos),
        all: Some(false),
    })
}

/// The transaction a snapshot of `key` at `txid` (default: the current position) is built from.
pub(super) fn plan_in(
    tx: &Connection,
    key: &DbKey,
    txid: Option<u64>,
) -> StoreResult<SnapshotPlan> {
    let db_id = find_db(tx, key)?.ok_or_else(|| StoreError::NoDb(key.name.clone()))?;
    let txn = match txid {
        None => {
            head(tx, db_id)?.ok_or_else(|| StoreError::NoTxid("database has no data yet".into()))?
        }
        Some(t) => txn_at(tx, db_id, t)?.ok_or_else(|| {
            StoreError::NoTxid(format!("transaction {t:016x} not found or not retained"))
        })?,
    };
    Ok(SnapshotPlan { db_id, txn })
}
