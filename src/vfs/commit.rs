//! Turning a write transaction into the one LTX file that commits it.
//!
//! Owns the rules of spec sections 2.2 and 8: txid = position + 1, pre-apply = the position's
//! checksum (a snapshot with MinTXID 1 for a new database), pages equal to their committed
//! content are left out, pages past the old end are all present when the database grows, and
//! the post-apply checksum is updated incrementally, including pages removed by truncation.
//! It is pure: the caller supplies the committed content of the pages it asks for, uploads
//! the result and applies it only when the store accepted it.

use std::collections::{BTreeMap, HashMap};

use super::Pgno;
use crate::ltx::{self, EMPTY_CHECKSUM, Header, LtxError, checksum_xor, page_checksum};
use crate::wire::Pos;

/// The committed state a transaction starts from.
#[derive(Copy, Clone, Debug)]
pub struct Base {
    pub pos: Pos,
    /// Database size in pages at `pos`.
    pub size: u32,
    pub page_size: u32,
}

/// A ready-to-upload commit.
#[derive(Debug)]
pub struct Built {
    pub ltx: Vec<u8>,
    /// The position after the store applies it.
    pub pos: Pos,
    /// Database size in pages after it.
    pub size: u32,
    /// Pages in the file (changed or new).
    pub pages: Vec<Pgno>,
}

/// The pages whose committed content [`build`] needs: dirty pages inside the old size (to see
/// whether they changed, and to remove their old checksum) and pages cut off by a shrink.
pub fn needed_pages(base: &Base, dirty: &BTreeMap<Pgno, Vec<u8>>, new_size: u32) -> Vec<Pgno> {
    if base.pos.is_zero() {
        return Vec::new();
    }
    let lock = Pgno::lock_page(base.page_size);
    let keep = Pgno(base.size.min(new_size));
    let mut out: Vec<Pgno> = dirty.range(..=keep).map(|(p, _)| *p).collect();
    out.extend(Pgno::between(new_size, base.size).filter(|p| *p != lock));
    out
}

/// Builds the LTX of a transaction, or `None` when it changes nothing. Work is proportional
/// to the pages written and the pages gained or lost, not to the database size.
pub fn build(
    base: &Base,
    dirty: &BTreeMap<Pgno, Vec<u8>>,
    new_size: u32,
    committed: &HashMap<Pgno, Vec<u8>>,
) -> Result<Option<Built>, LtxError> {
    let fresh = base.pos.is_zero();
    let old_size = if fresh { 0 } else { base.size };
    let lock = Pgno::lock_page(base.page_size);
    let zero = vec![0u8; base.page_size as usize];
    let old_of = |p: Pgno| {
        committed.get(&p).ok_or(LtxError::Pgno {
            pgno: p.0,
            why: "committed content unavailable",
        })
    };
    let mut sum = if fresh {
        EMPTY_CHECKSUM
    } else {
        base.pos.checksum.0
    };
    let mut pages: Vec<(u32, &[u8])> = Vec::new();
    for (&p, new) in dirty
        .range(..=Pgno(old_size.min(new_size)))
        .filter(|(p, _)| **p != lock)
    {
        let old = old_of(p)?;
        if old == new {
            continue;
        }
        sum = checksum_xor(sum, page_checksum(p.0, old));
        sum = checksum_xor(sum, page_checksum(p.0, new));
        pages.push((p.0, new));
    }
    for p in Pgno::between(old_size, new_size).filter(|p| *p != lock) {
        let new = dirty.get(&p).map_or(zero.as_slice(), Vec::as_slice);
        sum = checksum_xor(sum, page_checksum(p.0, new));
        pages.push((p.0, new));
    }
    for p in Pgno::between(new_size, old_size).filter(|p| *p != lock) {
        sum = checksum_xor(sum, page_checksum(p.0, old_of(p)?));
    }
    if pages.is_empty() && new_size == old_size {
        return Ok(None);
    }
    let txid = base.pos.txid.0 + 1;
    let pre = if fresh { 0 } else { base.pos.checksum.0 };
    let header = Header::new(base.page_size, new_size, txid, txid, pre);
    let bytes = ltx::encode(&header, &pages, sum)?;
    Ok(Some(Built {
        ltx: bytes,
        pos: Pos::new(txid, sum),
        size: new_size,
        pages: pages.iter().map(|(p, _)| Pgno(*p)).collect(),
    }))
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

    fn db_sum(pages: &[(u32, Vec<u8>)]) -> u64 {
        pages.iter().fold(EMPTY_CHECKSUM, |s, (p, d)| {
            checksum_xor(s, page_checksum(*p, d))
        })
    }

    #[test]
    fn snapshot_for_new_database_matches_vector_b() {
        let base = Base {
            pos: Pos::ZERO,
            size: 0,
            page_size: 512,
        };
        let dirty = BTreeMap::from([(Pgno(1), vec![3u8; 512]), (Pgno(2), vec![2u8; 512])]);
        let b = build(&base, &dirty, 2, &HashMap::new()).unwrap().unwrap();
        assert_eq!(b.pos, Pos::new(1, 0x8b87423eeeeeeeee));
        let f = ltx::decode(&b.ltx).unwrap();
        assert!(f.header.is_snapshot());
        assert_eq!(f.pages.len(), 2);
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
        assert_eq!(needed_pages(&base, &dirty, 2), vec![Pgno(1), Pgno(2)]);
        let b = build(&base, &dirty, 2, &committed).unwrap().unwrap();
        assert_eq!(b.pos, Pos::new(2, 0xd078845888888888));
        assert_eq!(b.pages, vec![Pgno(2)]);
        let f = ltx::decode(&b.ltx).unwrap();
        assert_eq!(f.header.pre_apply_checksum, 0x8b87423eeeeeeeee);
        // A rollback that wrote the original pages back commits nothing.
        let same = BTreeMap::from([(Pgno(2), vec![2u8; 512])]);
        assert!(build(&base, &same, 2, &committed).unwrap().is_none());
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
        let dirty = BTreeMap::from([(Pgno(1), vec![9u8; 512])]);
        assert_eq!(
            needed_pages(&base, &dirty, 2),
            vec![Pgno(1), Pgno(3), Pgno(4)]
        );
        let b = build(&base, &dirty, 2, &committed).unwrap().unwrap();
        assert_eq!(
            b.pos.checksum.0,
            db_sum(&[(1, vec![9; 512]), (2, vec![2; 512])])
        );
        let dirty = BTreeMap::from([(Pgno(6), vec![6u8; 512])]);
        let b = build(&base, &dirty, 6, &committed).unwrap().unwrap();
        assert_eq!(b.pages, vec![Pgno(5), Pgno(6)]);
        let mut grown = old.clone();
        grown.push((5, vec![0; 512]));
        grown.push((6, vec![6; 512]));
        assert_eq!(b.pos.checksum.0, db_sum(&grown));
    }
}
