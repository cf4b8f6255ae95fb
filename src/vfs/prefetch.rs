//! Which pages to ask for besides the one a read misses: adaptive read-ahead.
//!
//! Owns the prefetch heuristics. Candidates come from two sources: the children of interior
//! b-tree pages read recently (a descent or a scan of that b-tree reads them next, in key order
//! or, as `integrity_check` does, in reverse), and page numbers after a sequential or strided
//! run of misses. The window, how many candidates one request carries, starts at
//! `litevfs_max_prefetch_pages` and doubles each time a miss lands just past the previous
//! request's pages (the pattern holds: the pages a longer window would have brought), up to
//! the read-ahead cap; any other miss shrinks it back. So a scan costs a number of requests
//! proportional to its size divided by the cap, and a point lookup keeps small requests. It
//! only proposes page numbers; the caller drops cached ones and bounds the request.

use std::collections::{HashSet, VecDeque};

use super::Pgno;

/// Most hint pages remembered.
const MAX_HINTS: usize = 4096;
/// Largest stride, in pages, recognised as a strided scan.
const MAX_STRIDE: i64 = 16;

/// Child page numbers of an interior b-tree page, in key order (left children, then the
/// right-most pointer). `page` is the whole page; `pgno` 1 has its b-tree header at 100.
pub fn btree_children(pgno: Pgno, page: &[u8]) -> Vec<Pgno> {
    crate::btree::children(pgno.0, page)
        .into_iter()
        .map(Pgno)
        .collect()
}

/// Per-database prefetch state.
#[derive(Default, Debug)]
pub struct Prefetcher {
    /// Children of recently read interior pages, in key order, most recent page first; each
    /// with the number of the read that brought it (its group: one interior page's children).
    hints: VecDeque<(Pgno, u64)>,
    groups: u64,
    last_miss: Pgno,
    /// Page-number distance between the last two misses.
    last_delta: i64,
    /// Pages the last request carried.
    planned: HashSet<Pgno>,
    /// The pages just past the last request in the pattern it followed: a miss there means the
    /// pattern holds and the window grows.
    frontier: HashSet<Pgno>,
    /// Current window, in pages besides the one missed.
    window: u32,
    /// The window the last plan started from.
    base: u32,
}

impl Prefetcher {
    /// Learns from a page that was read (cached or fetched).
    pub fn observe(&mut self, pgno: Pgno, page: &[u8]) {
        let children = btree_children(pgno, page);
        if children.is_empty() {
            return;
        }
        // An interior page the read-ahead brought, or one read while a walk goes on (the
        // window grew): the walk goes on into its children.
        if self.window > self.base || self.planned.contains(&pgno) || self.frontier.contains(&pgno)
        {
            self.frontier.extend(children.iter().copied());
        }
        // A set: this runs on every read of an interior page, warm scans included.
        let fresh: HashSet<Pgno> = children.iter().copied().collect();
        self.hints.retain(|(p, _)| !fresh.contains(p));
        self.groups += 1;
        for c in children.into_iter().rev() {
            self.hints.push_front((c, self.groups));
        }
        self.hints.truncate(MAX_HINTS);
    }

    /// The window the last plan used (pages besides the missed one).
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Pages to request with a miss on `pgno`: `pgno` first, then up to the window of
    /// candidates for which `wanted` is true (not cached, inside the database). `base` is the
    /// window a pattern starts with, `cap` the most it grows to (both in pages).
    pub fn plan(
        &mut self,
        pgno: Pgno,
        base: u32,
        cap: u32,
        wanted: impl Fn(Pgno) -> bool,
    ) -> Vec<Pgno> {
        let delta = i64::from(pgno.0) - i64::from(self.last_miss.0);
        let sequential = self.last_miss != Pgno(0) && delta == 1;
        let strided = self.last_miss != Pgno(0)
            && delta == self.last_delta
            && (2..=MAX_STRIDE).contains(&delta);
        let holds = self.frontier.contains(&pgno) || sequential || strided;
        let cap = cap.max(base);
        self.base = base;
        self.window = if holds && base > 0 {
            self.window.max(base).saturating_mul(2).min(cap)
        } else {
            base
        };
        let window = self.window as usize;

        // Candidates, best first: b-tree siblings in the direction of travel, then pages by
        // number while a run by number holds.
        let mut cands: Vec<Pgno> = Vec::new();
        let reach = 2 * window;
        if let Some(i) = self.hints.iter().position(|&(p, _)| p == pgno) {
            let group = self.hints[i].1;
            let in_group = |k: usize| self.hints.get(k).is_some_and(|h| h.1 == group);
            let first = i == 0 || !in_group(i - 1);
            let last = !in_group(i + 1);
            let j = self
                .hints
                .iter()
                .position(|&(p, g)| p == self.last_miss && g == group);
            let forward = self.hints.iter().skip(i + 1).take(reach).map(|h| h.0);
            let backward = self.hints.iter().take(i).rev().take(reach).map(|h| h.0);
            match j {
                Some(j) if j < i => cands.extend(forward),
                Some(j) if j > i => cands.extend(backward),
                // The first miss in this group: a walk in key order starts at the first child,
                // one in reverse (integrity_check) at the last.
                _ if first && !last => cands.extend(forward),
                _ if last && !first => cands.extend(backward),
                _ => {
                    let (mut f, mut b) = (forward, backward);
                    loop {
                        match (f.next(), b.next()) {
                            (None, None) => break,
                            (x, y) => cands.extend(x.into_iter().chain(y)),
                        }
                    }
                }
            }
        }
        let by_number =
            self.frontier.contains(&pgno) && !self.hints.iter().any(|&(p, _)| p == pgno);
        if sequential || strided || by_number {
            let step = if strided { delta as u32 } else { 1 };
            cands.extend((1..=reach as u32).map(|n| pgno.plus(n.saturating_mul(step))));
        }
        self.last_delta = delta;
        self.last_miss = pgno;

        let mut out = vec![pgno];
        let mut seen: HashSet<Pgno> = HashSet::from([pgno]);
        let mut frontier = HashSet::new();
        for p in cands {
            if !seen.insert(p) || !wanted(p) {
                continue;
            }
            if out.len() <= window {
                out.push(p);
            } else if frontier.len() < window.max(1) {
                frontier.insert(p);
            } else {
                break;
            }
        }
        self.planned = out.iter().copied().collect();
        self.frontier = frontier;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interior(children: &[u32], right: u32) -> Vec<u8> {
        let mut p = vec![0u8; 4096];
        p[0] = 0x05;
        p[3..5].copy_from_slice(&(children.len() as u16).to_be_bytes());
        p[8..12].copy_from_slice(&right.to_be_bytes());
        let mut cell = 2000;
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
        // First miss of a group: both directions.
        assert_eq!(p.plan(Pgno(4), 2, 2, |_| true), pg(&[4, 5, 3]));
        // Moving forward: siblings after.
        assert_eq!(p.plan(Pgno(6), 2, 2, |_| true), pg(&[6, 7]));
        let mut q = Prefetcher::default();
        assert_eq!(q.plan(Pgno(10), 3, 3, |_| true), pg(&[10]));
        assert_eq!(q.plan(Pgno(11), 3, 3, |_| true), pg(&[11, 12, 13, 14]));
    }

    #[test]
    fn the_window_grows_while_a_scan_goes_on_and_shrinks_on_a_random_miss() {
        let mut p = Prefetcher::default();
        let cached = std::cell::RefCell::new(HashSet::new());
        let mut requests = 0;
        let mut windows = Vec::new();
        // A sequential scan of pages 1..=2000: every page read, misses fetched with read-ahead.
        for n in 1..=2000u32 {
            if cached.borrow().contains(&Pgno(n)) {
                continue;
            }
            let plan = p.plan(Pgno(n), 8, 256, |x| !cached.borrow().contains(&x));
            requests += 1;
            windows.push(p.window());
            cached.borrow_mut().extend(plan);
        }
        assert!(requests <= 14, "{requests} requests: {windows:?}");
        assert_eq!(*windows.last().unwrap(), 256);
        // A random miss starts over.
        p.plan(Pgno(50_000), 8, 256, |_| true);
        assert_eq!(p.window(), 8);
        // Off means off.
        assert_eq!(p.plan(Pgno(50_001), 0, 256, |_| true), pg(&[50_001]));
    }

    #[test]
    fn a_btree_walked_in_reverse_is_read_ahead_in_reverse() {
        // integrity_check visits the right-most child first, then the others from last to first.
        let children: Vec<u32> = (100..400).step_by(3).collect();
        let (right, cells) = children.split_last().unwrap();
        let mut p = Prefetcher::default();
        p.observe(Pgno(2), &interior(cells, *right));
        let cached = std::cell::RefCell::new(HashSet::new());
        let mut requests = 0;
        for &c in children.iter().rev() {
            if cached.borrow().contains(&Pgno(c)) {
                continue;
            }
            let plan = p.plan(Pgno(c), 4, 64, |x| !cached.borrow().contains(&x));
            requests += 1;
            cached.borrow_mut().extend(plan);
        }
        assert!(
            requests <= 5,
            "{requests} requests for {} pages",
            children.len()
        );
    }

    #[test]
    fn strided_misses_read_ahead_by_the_stride() {
        let mut p = Prefetcher::default();
        p.plan(Pgno(10), 4, 64, |_| true);
        p.plan(Pgno(13), 4, 64, |_| true);
        assert_eq!(
            p.plan(Pgno(16), 4, 64, |_| true),
            pg(&[16, 19, 22, 25, 28, 31, 34, 37, 40])
        );
    }
}
