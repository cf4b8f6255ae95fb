//! Turning a write transaction into the one LTX file that commits it.
//!
//! Owns the rules of spec sections 2.2 and 8: txid = position + 1, pre-apply = the position's
//! checksum (a snapshot with MinTXID 1 for a new database), pages equal to their committed
//! content are left out, pages past the old end are all present when the database grows, and
//! the post-apply checksum is updated incrementally, including pages removed by truncation.
//! It is pure: the caller supplies the committed content of the pages it asks for, uploads
//! the result and applies it only when the store accepted it.

use std::collections::HashMap;

use super::Pgno;
use super::error::Result;
use super::spill::{DirtyPages, SpillBuf};
use crate::ltx::{self, EMPTY_CHECKSUM, Header, LtxError, checksum_xor, page_checksum};
use crate::wire::Pos;

/// Pages compared or summed per round: the memory a commit holds besides its output is this
/// many pages of committed content.
pub const BATCH: usize = 256;

/// Returns the committed content of the pages it is given.
pub type Committed<'a> = dyn FnMut(&[Pgno]) -> Result<HashMap<Pgno, Vec<u8>>> + 'a;

/// The committed state a transaction starts from.
#[derive(Copy, Clone, Debug)]
pub struct Base {
    pub pos: Pos,
    /// Database size in pages at `pos`.
    pub size: u32,
    pub page_size: u32,
}

/// A commit written out and ready to upload.
#[derive(Debug)]
pub struct Built {
    /// The position after the store applies it.
    pub pos: Pos,
    /// Database size in pages after it.
    pub size: u32,
    /// Pages in the file (changed or new).
    pub pages: usize,
}

/// Writes the LTX of a transaction into `out` and describes it, or returns `None` when the
/// transaction changes nothing. `committed` returns the committed content of the pages it is
/// asked for (dirty pages inside the old size, to see whether they changed and to remove their
/// old checksum; pages cut off by a shrink), at most [`BATCH`] at a time. Work is proportional
/// to the pages written and the pages gained or lost, not to the database size, and memory to
/// one batch: the pages stream from `dirty` to `out`.
pub fn build(
    base: &Base,
    dirty: &DirtyPages,
    new_size: u32,
    committed: &mut Committed<'_>,
    out: &mut SpillBuf,
) -> Result<Option<Built>> {
    let fresh = base.pos.is_zero();
    let old_size = if fresh { 0 } else { base.size };
    let lock = Pgno::lock_page(base.page_size);
    let txid = base.pos.txid.0 + 1;
    let pre = if fresh { 0 } else { base.pos.checksum.0 };
    let header = Header::new(base.page_size, new_size, txid, txid, pre);
    let mut w = ltx::Writer::new(out.writer(), &header)?;
    let mut sum = if fresh {
        EMPTY_CHECKSUM
    } else {
        base.pos.checksum.0
    };
    let mut pages = 0usize;
    let mut new = vec![0u8; base.page_size as usize];

    // Dirty pages that existed before: written only when they differ from the committed ones.
    let keep = Pgno(old_size.min(new_size));
    let mut from = Pgno::ONE;
    loop {
        let mut batch = dirty.range(from, keep, BATCH);
        let Some(last) = batch.last() else { break };
        from = last.plus(1);
        batch.retain(|p| *p != lock);
        let old = committed(&batch)?;
        for p in batch {
            let old = committed_page(&old, p)?;
            dirty.get(p, &mut new)?;
            if *old == new {
                continue;
            }
            sum = checksum_xor(sum, page_checksum(p.0, old));
            sum = checksum_xor(sum, page_checksum(p.0, &new));
            w.write_page(p.0, &new)?;
            pages += 1;
        }
    }
    // Pages the database gains: all present, zeros where SQLite wrote nothing.
    for p in Pgno::between(old_size, new_size).filter(|p| *p != lock) {
        if !dirty.get(p, &mut new)? {
            new.fill(0);
        }
        sum = checksum_xor(sum, page_checksum(p.0, &new));
        w.write_page(p.0, &new)?;
        pages += 1;
    }
    // Pages it loses: out of the checksum.
    let mut lost = Pgno::between(new_size, old_size).filter(|p| *p != lock);
    loop {
        let batch: Vec<Pgno> = lost.by_ref().take(BATCH).collect();
        if batch.is_empty() {
            break;
        }
        let old = committed(&batch)?;
        for p in batch {
            sum = checksum_xor(sum, page_checksum(p.0, committed_page(&old, p)?));
        }
    }
    if pages == 0 && new_size == old_size {
        return Ok(None);
    }
    w.finish(sum)?;
    Ok(Some(Built {
        pos: Pos::new(txid, sum),
        size: new_size,
        pages,
    }))
}

/// Page `p` of a batch of committed pages; the caller asked for it, so its absence is an error.
fn committed_page(batch: &HashMap<Pgno, Vec<u8>>, p: Pgno) -> Result<&Vec<u8>> {
    Ok(batch.get(&p).ok_or(LtxError::Pgno {
        pgno: p.0,
        why: "committed content unavailable",
    })?)
}

/// Page 1 with a file change counter past the committed one, when SQLite left it unchanged
/// (it does in exclusive locking mode): every commit must change page 1 so that every reader's
/// SQLite notices the change and drops its page cache. `None` when no patch is needed.
pub fn bump_change_counter(
    committed: Option<&Vec<u8>>,
    page1: Option<&Vec<u8>>,
) -> Option<Vec<u8>> {
    let (old, new) = (committed?, page1?);
    if old.len() < 100 || new.len() < 100 {
        return None;
    }
    let be32 = |p: &[u8], o: usize| u32::from_be_bytes(p[o..o + 4].try_into().expect("4 bytes"));
    let (was, now) = (be32(old, 24), be32(new, 24));
    if (now.wrapping_sub(was) as i32) > 0 {
        return None;
    }
    let counter = was.wrapping_add(1);
    let mut out = new.clone();
    if be32(new, 92) == now {
        out[92..96].copy_from_slice(&counter.to_be_bytes());
    }
    out[24..28].copy_from_slice(&counter.to_be_bytes());
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfs::spill::SpillConfig;
    use std::collections::BTreeMap;

    fn db_sum(pages: &[(u32, Vec<u8>)]) -> u64 {
        pages.iter().fold(EMPTY_CHECKSUM, |s, (p, d)| {
            checksum_xor(s, page_checksum(*p, d))
        })
    }

    /// Builds with `dirty` and `committed` given as maps; returns the decoded file too. A
    /// `limit` of 0 pages spills every dirty page and the output.
    fn run(
        base: &Base,
        dirty: &BTreeMap<Pgno, Vec<u8>>,
        new_size: u32,
        committed: &HashMap<Pgno, Vec<u8>>,
        spill_all: bool,
    ) -> (Option<Built>, Option<ltx::File>, Vec<Vec<Pgno>>) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SpillConfig {
            dir: dir.path().to_path_buf(),
            limit: if spill_all { 0 } else { 1 << 20 },
        };
        let mut pages = DirtyPages::new(cfg.clone());
        for (p, d) in dirty {
            pages.insert(*p, d).unwrap();
        }
        assert_eq!(pages.is_spilled(), spill_all && !dirty.is_empty());
        let mut asked = Vec::new();
        let mut fetch = |ps: &[Pgno]| {
            asked.push(ps.to_vec());
            Ok(ps
                .iter()
                .filter_map(|p| committed.get(p).map(|d| (*p, d.clone())))
                .collect())
        };
        let mut out = SpillBuf::new(cfg);
        let built = build(base, &pages, new_size, &mut fetch, &mut out).unwrap();
        let file = built.as_ref().map(|_| {
            let mut bytes = vec![0u8; out.len() as usize];
            out.read_at(0, &mut bytes).unwrap();
            ltx::decode(&bytes).unwrap()
        });
        (built, file, asked)
    }

    #[test]
    fn snapshot_for_new_database_matches_vector_b() {
        let base = Base {
            pos: Pos::ZERO,
            size: 0,
            page_size: 512,
        };
        let dirty = BTreeMap::from([(Pgno(1), vec![3u8; 512]), (Pgno(2), vec![2u8; 512])]);
        for spill in [false, true] {
            let (b, f, asked) = run(&base, &dirty, 2, &HashMap::new(), spill);
            assert_eq!(b.unwrap().pos, Pos::new(1, 0x8b87423eeeeeeeee));
            let f = f.unwrap();
            assert!(f.header.is_snapshot());
            assert_eq!(f.pages.len(), 2);
            assert!(asked.is_empty(), "a new database has no committed pages");
        }
    }

    #[test]
    fn incremental_matches_vector_c_and_skips_unchanged() {
        let base = Base {
            pos: Pos::new(1, 0x8b87423eeeeeeeee),
            size: 2,
            page_size: 512,
        };
        let committed = HashMap::from([(Pgno(1), vec![3u8; 512]), (Pgno(2), vec![2u8; 512])]);
        let dirty = BTreeMap::from([(Pgno(1), vec![3u8; 512]), (Pgno(2), vec![4u8; 512])]);
        for spill in [false, true] {
            let (b, f, asked) = run(&base, &dirty, 2, &committed, spill);
            assert_eq!(asked, vec![vec![Pgno(1), Pgno(2)]]);
            let b = b.unwrap();
            assert_eq!(b.pos, Pos::new(2, 0xd078845888888888));
            assert_eq!(b.pages, 1);
            let f = f.unwrap();
            assert_eq!(f.header.pre_apply_checksum, 0x8b87423eeeeeeeee);
            assert_eq!(f.pages.len(), 1);
            assert_eq!(f.pages[0].0, 2);
        }
        // A rollback that wrote the original pages back commits nothing.
        let same = BTreeMap::from([(Pgno(2), vec![2u8; 512])]);
        assert!(run(&base, &same, 2, &committed, false).0.is_none());
    }

    #[test]
    fn change_counter_always_moves() {
        let page = |counter: u32, valid_for: u32| {
            let mut p = vec![0u8; 512];
            p[24..28].copy_from_slice(&counter.to_be_bytes());
            p[92..96].copy_from_slice(&valid_for.to_be_bytes());
            p
        };
        let old = page(7, 7);
        assert_eq!(bump_change_counter(Some(&old), Some(&page(8, 8))), None);
        let bumped = bump_change_counter(Some(&old), Some(&page(7, 7))).unwrap();
        assert_eq!(bumped, page(8, 8));
        let bumped = bump_change_counter(Some(&page(9, 9)), Some(&page(7, 7))).unwrap();
        assert_eq!(
            bumped,
            page(10, 10),
            "never back to a value a reader may hold"
        );
        assert_eq!(bump_change_counter(None, Some(&old)), None);
    }

    #[test]
    fn shrink_and_grow_keep_the_checksum_exact() {
        let old: Vec<(u32, Vec<u8>)> = (1..=4).map(|p| (p, vec![p as u8; 512])).collect();
        let base = Base {
            pos: Pos::new(5, db_sum(&old)),
            size: 4,
            page_size: 512,
        };
        let committed: HashMap<Pgno, Vec<u8>> =
            old.iter().map(|(p, d)| (Pgno(*p), d.clone())).collect();
        for spill in [false, true] {
            let dirty = BTreeMap::from([(Pgno(1), vec![9u8; 512])]);
            let (b, _, asked) = run(&base, &dirty, 2, &committed, spill);
            assert_eq!(asked, vec![vec![Pgno(1)], vec![Pgno(3), Pgno(4)]]);
            assert_eq!(
                b.unwrap().pos.checksum.0,
                db_sum(&[(1, vec![9; 512]), (2, vec![2; 512])])
            );
            let dirty = BTreeMap::from([(Pgno(6), vec![6u8; 512])]);
            let (b, f, _) = run(&base, &dirty, 6, &committed, spill);
            let pgnos: Vec<u32> = f.unwrap().pages.iter().map(|p| p.0).collect();
            assert_eq!(pgnos, vec![5, 6]);
            let mut grown = old.clone();
            grown.push((5, vec![0; 512]));
            grown.push((6, vec![6; 512]));
            assert_eq!(b.unwrap().pos.checksum.0, db_sum(&grown));
        }
    }

    #[test]
    fn large_transactions_go_in_batches() {
        let n = 3 * BATCH as u32 + 7;
        let old: Vec<(u32, Vec<u8>)> = (1..=n).map(|p| (p, vec![p as u8; 512])).collect();
        let base = Base {
            pos: Pos::new(9, db_sum(&old)),
            size: n,
            page_size: 512,
        };
        let committed: HashMap<Pgno, Vec<u8>> =
            old.iter().map(|(p, d)| (Pgno(*p), d.clone())).collect();
        // Every other page changes; the database shrinks by BATCH + 3 pages.
        let new_size = n - BATCH as u32 - 3;
        let dirty: BTreeMap<Pgno, Vec<u8>> = (1..=new_size)
            .map(|p| (Pgno(p), vec![(p + (p % 2)) as u8; 512]))
            .collect();
        let (b, f, asked) = run(&base, &dirty, new_size, &committed, true);
        assert!(asked.iter().all(|a| a.len() <= BATCH));
        let b = b.unwrap();
        let want: Vec<(u32, Vec<u8>)> = dirty.iter().map(|(p, d)| (p.0, d.clone())).collect();
        assert_eq!(b.pos.checksum.0, db_sum(&want));
        assert_eq!(b.pages, new_size.div_ceil(2) as usize);
        assert_eq!(f.unwrap().pages.len(), b.pages);
    }
}
