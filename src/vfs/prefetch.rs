//! Which pages to ask for besides the one a read misses.
//!
//! Owns the prefetch heuristics: the children of interior b-tree pages read recently (a
//! descent or a scan reads them next), and the next pages of a sequential scan. It only
//! proposes page numbers; the caller drops cached ones and bounds the request.

use std::collections::VecDeque;

use super::Pgno;

/// Most hint pages remembered.
const MAX_HINTS: usize = 4096;

/// Child page numbers of an interior b-tree page, in key order (left children, then the
/// right-most pointer). `page` is the whole page; `pgno` 1 has its b-tree header at 100.
pub fn btree_children(pgno: Pgno, page: &[u8]) -> Vec<Pgno> {
    let hdr = if pgno == Pgno::ONE { 100 } else { 0 };
    if page.len() < hdr + 12 || !matches!(page[hdr], 0x02 | 0x05) {
        return Vec::new();
    }
    let be16 = |o: usize| u16::from_be_bytes([page[o], page[o + 1]]) as usize;
    let be32 = |o: usize| u32::from_be_bytes(page[o..o + 4].try_into().expect("4 bytes"));
    let ncells = be16(hdr + 3);
    let mut out = Vec::with_capacity(ncells + 1);
    for i in 0..ncells {
        let ptr_at = hdr + 12 + 2 * i;
        if ptr_at + 2 > page.len() {
            break;
        }
        let cell = be16(ptr_at);
        if cell + 4 <= page.len() && cell >= hdr + 12 {
            out.push(Pgno(be32(cell)));
        }
    }
    out.push(Pgno(be32(hdr + 8)));
    out.retain(|&p| p > Pgno::ONE);
    out
}

/// Per-database prefetch state.
#[derive(Default, Debug)]
pub struct Prefetcher {
    /// Children of recently read interior pages, in the order a scan visits them.
    hints: VecDeque<Pgno>,
    last_miss: Pgno,
    run: u32,
}

impl Prefetcher {
    /// Learns from a page that was read (cached or fetched).
    pub fn observe(&mut self, pgno: Pgno, page: &[u8]) {
        let children = btree_children(pgno, page);
        if children.is_empty() {
            return;
        }
        // A set: this runs on every read of an interior page, warm scans included.
        let fresh: std::collections::HashSet<Pgno> = children.iter().copied().collect();
        self.hints.retain(|p| !fresh.contains(p));
        for c in children.into_iter().rev() {
            self.hints.push_front(c);
        }
        self.hints.truncate(MAX_HINTS);
    }

    /// Pages to request with a miss on `pgno`: `pgno` first, then up to `max` candidates for
    /// which `wanted` is true (not cached, inside the database).
    pub fn plan(&mut self, pgno: Pgno, max: u32, wanted: impl Fn(Pgno) -> bool) -> Vec<Pgno> {
        self.run = if self.last_miss != Pgno(0) && pgno == self.last_miss.plus(1) {
            self.run + 1
        } else {
            0
        };
        self.last_miss = pgno;
        let mut out = vec![pgno];
        let max = max as usize;
        let push = |p: Pgno, out: &mut Vec<Pgno>| {
            if out.len() <= max && p != pgno && !out.contains(&p) && wanted(p) {
                out.push(p);
            }
        };
        if let Some(i) = self.hints.iter().position(|&p| p == pgno) {
            let siblings: Vec<Pgno> = self.hints.iter().skip(i + 1).copied().collect();
            for p in siblings {
                push(p, &mut out);
            }
        }
        if self.run >= 1 {
            for p in (1..=max as u32).map(|n| pgno.plus(n)) {
                push(p, &mut out);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interior(children: &[u32], right: u32) -> Vec<u8> {
        let mut p = vec![0u8; 512];
        p[0] = 0x05;
        p[3..5].copy_from_slice(&(children.len() as u16).to_be_bytes());
        p[8..12].copy_from_slice(&right.to_be_bytes());
        let mut cell = 400;
        for (i, c) in children.iter().enumerate() {
            p[12 + 2 * i..14 + 2 * i].copy_from_slice(&(cell as u16).to_be_bytes());
            p[cell..cell + 4].copy_from_slice(&c.to_be_bytes());
            p[cell + 4] = 1;
            cell += 8;
        }
        p
    }

    fn pg(v: &[u32]) -> Vec<Pgno> {
        v.iter().copied().map(Pgno).collect()
    }

    #[test]
    fn children_of_interior_pages() {
        assert_eq!(
            btree_children(Pgno(2), &interior(&[3, 4, 5], 9)),
            pg(&[3, 4, 5, 9])
        );
        let mut leaf = interior(&[3], 4);
        leaf[0] = 0x0d;
        assert!(btree_children(Pgno(2), &leaf).is_empty());
    }

    #[test]
    fn plans_siblings_then_sequential() {
        let mut p = Prefetcher::default();
        p.observe(Pgno(2), &interior(&[3, 4, 5, 6], 7));
        assert_eq!(p.plan(Pgno(4), 2, |_| true), pg(&[4, 5, 6]));
        assert_eq!(
            p.plan(Pgno(5), 8, |x| x != Pgno(6)),
            pg(&[5, 7, 8, 9, 10, 11, 12, 13])
        );
        let mut q = Prefetcher::default();
        assert_eq!(q.plan(Pgno(10), 3, |_| true), pg(&[10]));
        assert_eq!(q.plan(Pgno(11), 3, |_| true), pg(&[11, 12, 13, 14]));
    }
}
