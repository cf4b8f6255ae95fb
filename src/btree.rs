//! Facts read from SQLite b-tree pages: which pages an interior page points to, and which
//! b-trees the schema table (`sqlite_schema`) lists.
//!
//! Owns only parsing, defensively: a malformed page yields fewer facts, never a panic. Offsets
//! follow SQLite's file-format document; page 1's b-tree header starts at byte 100.

const INTERIOR_INDEX: u8 = 0x02;
const INTERIOR_TABLE: u8 = 0x05;
const LEAF_TABLE: u8 = 0x0d;

fn header_at(pgno: u32) -> usize {
    if pgno == 1 { 100 } else { 0 }
}

fn be16(p: &[u8], o: usize) -> Option<usize> {
    Some(u16::from_be_bytes(p.get(o..o + 2)?.try_into().ok()?) as usize)
}

fn be32(p: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_be_bytes(p.get(o..o + 4)?.try_into().ok()?))
}

/// Whether page `pgno` is an interior b-tree page (table or index).
pub fn is_interior(pgno: u32, page: &[u8]) -> bool {
    matches!(
        page.get(header_at(pgno)),
        Some(&INTERIOR_INDEX | &INTERIOR_TABLE)
    )
}

/// Child page numbers of an interior b-tree page, in key order (left children, then the
/// right-most pointer); empty for any other page.
pub fn children(pgno: u32, page: &[u8]) -> Vec<u32> {
    let hdr = header_at(pgno);
    if page.len() < hdr + 12 || !is_interior(pgno, page) {
        return Vec::new();
    }
    let ncells = be16(page, hdr + 3).unwrap_or(0);
    let mut out = Vec::with_capacity(ncells + 1);
    for i in 0..ncells {
        let Some(cell) = be16(page, hdr + 12 + 2 * i) else {
            break;
        };
        if cell >= hdr + 12
            && let Some(c) = be32(page, cell)
        {
            out.push(c);
        }
    }
    if let Some(right) = be32(page, hdr + 8) {
        out.push(right);
    }
    out.retain(|&p| p > 1);
    out
}

/// A SQLite varint at `at`: (value, length).
fn varint(p: &[u8], at: usize) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for i in 0..9 {
        let b = *p.get(at + i)?;
        if i == 8 {
            return Some(((v << 8) | u64::from(b), 9));
        }
        v = (v << 7) | u64::from(b & 0x7f);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

/// Bytes of a record column of serial type `t`.
fn serial_len(t: u64) -> usize {
    match t {
        0 | 8 | 9 | 10 | 11 => 0,
        1..=4 => t as usize,
        5 => 6,
        6 | 7 => 8,
        n => ((n - 12) / 2) as usize,
    }
}

/// The `rootpage` column of every row on a leaf page of the schema table: the root pages of the
/// database's tables and indexes. `usable` is the page size less the reserved bytes.
pub fn schema_roots(pgno: u32, page: &[u8], usable: usize) -> Vec<u32> {
    let hdr = header_at(pgno);
    if page.get(hdr) != Some(&LEAF_TABLE) {
        return Vec::new();
    }
    let ncells = be16(page, hdr + 3).unwrap_or(0);
    let mut out = Vec::new();
    for i in 0..ncells {
        let Some(cell) = be16(page, hdr + 8 + 2 * i) else {
            break;
        };
        if let Some(root) = row_rootpage(page, cell, usable) {
            out.push(root);
        }
    }
    out
}

/// Column 3 (`rootpage`) of the schema row whose cell starts at `cell`, if it lies in the
/// page's local part of the payload.
fn row_rootpage(page: &[u8], cell: usize, usable: usize) -> Option<u32> {
    let (payload, n1) = varint(page, cell)?;
    let (_rowid, n2) = varint(page, cell + n1)?;
    let start = cell + n1 + n2;
    // The local part of a payload that spills (file format 1.6 "overflow" rules).
    let max_local = usable.checked_sub(35)?;
    let local = if payload as usize <= max_local {
        payload as usize
    } else {
        let min_local = ((usable - 12) * 32 / 255).checked_sub(23)?;
        let k = min_local + (payload as usize - min_local) % (usable - 4);
        if k <= max_local { k } else { min_local }
    };
    let rec = page.get(start..start + local)?;
    let (hlen, mut at) = varint(rec, 0)?;
    let mut offset = hlen as usize;
    for col in 0..4 {
        let (t, n) = varint(rec, at)?;
        at += n;
        if col == 3 {
            let bytes = rec.get(offset..offset + serial_len(t))?;
            return match t {
                1..=6 => {
                    let v = bytes.iter().fold(0u64, |v, b| (v << 8) | u64::from(*b));
                    u32::try_from(v).ok().filter(|&r| r > 1)
                }
                _ => None,
            };
        }
        offset += serial_len(t);
    }
    None
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use super::*;

    #[test]
    fn roots_and_children_of_a_real_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "create table t(id integer primary key, v text);
             with recursive s(x) as (select 1 union all select x + 1 from s where x < 3000)
             insert into t select x, hex(randomblob(40)) from s;
             create index iv on t(v);",
        )
        .unwrap();
        let roots: Vec<u32> = c
            .prepare("select rootpage from sqlite_schema order by rootpage")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        drop(c);
        let bytes = std::fs::read(&path).unwrap();
        let page = |n: u32| &bytes[(n as usize - 1) * 4096..n as usize * 4096];
        let mut got = schema_roots(1, page(1), 4096);
        got.sort_unstable();
        assert_eq!(got, roots);
        for root in roots {
            assert!(
                is_interior(root, page(root)),
                "3000 rows need more than one page"
            );
            let kids = children(root, page(root));
            assert!(
                !kids.is_empty()
                    && kids
                        .iter()
                        .all(|&k| k > 1 && (k as usize) * 4096 <= bytes.len())
            );
        }
        assert!(children(1, page(1)).is_empty());
        // Garbage never panics.
        for fill in [0u8, 0x05, 0x0d, 0xff] {
            let junk = vec![fill; 4096];
            let _ = (
                children(2, &junk),
                schema_roots(1, &junk, 4096),
                is_interior(2, &junk),
            );
        }
    }
}
