//! Which pages to ask for besides the one a read misses: adaptive read-ahead.
//!
//! Owns the prefetch heuristics. Candidates come from two sources: the children of interior
//! b-tree pages read recently (a descent or a scan of that b-tree reads them next, in key order
//! or, as `integrity_check` does, in reverse), and page numbers after a sequential or strided
//! run of misses. A walk that reaches the end of one interior page's children goes on, in the
//! same request, into the children of the next interior pages of the level above (learned from
//! the cache when the read-ahead brought them earlier), and fetches the next few interior pages
//! whose children are not known yet, so a request is not cut short at each interior page. The window, how many candidates one request carries, starts at
//! `litevfs_max_prefetch_pages` and doubles each time a miss lands just past the previous
//! request's pages (the pattern holds: the pages a longer window would have brought), up to
//! the read-ahead cap; any other miss shrinks it back. So a scan costs a number of requests
//! proportional to its size divided by the cap, and a point lookup keeps small requests. It
//! only proposes page numbers; the caller drops cached ones and bounds the request.

use std::collections::{HashMap, HashSet, VecDeque};

use super::Pgno;

/// Most child page numbers remembered (of all groups together).
const MAX_HINTS: usize = 65_536;
/// Most interior pages with unknown children fetched ahead of a walk across them.
const AHEAD: usize = 8;
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

/// The children of one interior page (a group), and when it was learned.
#[derive(Debug)]
struct Group {
    children: Vec<Pgno>,
    seq: u64,
}

/// Per-database prefetch state.
#[derive(Default, Debug)]
pub struct Prefetcher {
    /// The child lists of interior pages read or fetched recently, by interior page.
    groups: HashMap<Pgno, Group>,
    /// The interior page each remembered child belongs to.
    parent: HashMap<Pgno, Pgno>,
    /// Interior pages in the order they were learned (with the `seq` of that learning), to
    /// forget the oldest first.
    order: VecDeque<(u64, Pgno)>,
    seq: u64,
    hints: usize,
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
    /// The direction of the b-tree walk the last plan followed (true: key order).
    dir: Option<bool>,
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
        self.learn(pgno, children);
    }

    /// Remembers the children of interior page `pgno` (most recent first).
    fn learn(&mut self, pgno: Pgno, children: Vec<Pgno>) {
        if let Some(g) = self.groups.get(&pgno)
            && g.children == children
        {
            return;
        }
        self.forget(pgno);
        self.seq += 1;
        for c in &children {
            if let Some(old) = self.parent.insert(*c, pgno)
                && old != pgno
                && let Some(g) = self.groups.get_mut(&old)
            {
                // Moved to another parent: the old list no longer has it.
                g.children.retain(|x| x != c);
                self.hints -= 1;
            }
        }
        self.hints += children.len();
        self.groups.insert(
            pgno,
            Group {
                children,
                seq: self.seq,
            },
        );
        self.order.push_back((self.seq, pgno));
        while self.hints > MAX_HINTS {
            let Some((seq, old)) = self.order.pop_front() else {
                break;
            };
            if self.groups.get(&old).is_some_and(|g| g.seq == seq) {
                self.forget(old);
            }
        }
    }

    fn forget(&mut self, pgno: Pgno) {
        if let Some(g) = self.groups.remove(&pgno) {
            self.hints -= g.children.len();
            for c in g.children {
                if self.parent.get(&c) == Some(&pgno) {
                    self.parent.remove(&c);
                }
            }
        }
    }

    /// The window the last plan used (pages besides the missed one).
    pub fn window(&self) -> u32 {
        self.window
    }

    /// Children of the siblings of interior page `owner` after it (`forward`) or before it,
    /// appended to `out` in the direction of travel until it holds `need` pages. A sibling whose
    /// children are not known yet is read with `peek` if it is cached; otherwise it goes to the
    /// returned list (the walk stops at [`AHEAD`] of them): fetched now, its children are known
    /// by the time the walk gets there.
    fn siblings(
        &mut self,
        owner: Pgno,
        forward: bool,
        need: usize,
        out: &mut Vec<Pgno>,
        peek: &mut dyn FnMut(Pgno) -> Option<Vec<u8>>,
    ) -> Vec<Pgno> {
        let mut unknown = Vec::new();
        let Some(up) = self.parent.get(&owner).copied() else {
            return unknown;
        };
        let Some(list) = self.groups.get(&up).map(|g| g.children.clone()) else {
            return unknown;
        };
        let Some(k) = list.iter().position(|&p| p == owner) else {
            return unknown;
        };
        let sibs: Vec<Pgno> = if forward {
            list[k + 1..].to_vec()
        } else {
            list[..k].iter().rev().copied().collect()
        };
        for s in sibs {
            // Bounded: only the groups this request reaches are read and learned (learning
            // every sibling of a large level would push out the groups in use).
            if out.len() >= need || unknown.len() >= AHEAD {
                break;
            }
            if !self.groups.contains_key(&s)
                && let Some(page) = peek(s)
            {
                let children = btree_children(s, &page);
                if !children.is_empty() {
                    self.learn(s, children);
                }
            }
            match self.groups.get(&s) {
                Some(g) if forward => out.extend(g.children.iter().copied()),
                Some(g) => out.extend(g.children.iter().rev().copied()),
                None => unknown.push(s),
            }
        }
        unknown
    }

    /// Pages to request with a miss on `pgno`: `pgno` first, then up to the window of
    /// candidates for which `wanted` is true (not cached, inside the database). `base` is the
    /// window a pattern starts with, `cap` the most it grows to (both in pages). `peek` reads a
    /// cached page (to learn the children of interior pages fetched ahead but not read yet).
    pub fn plan(
        &mut self,
        pgno: Pgno,
        base: u32,
        cap: u32,
        wanted: impl Fn(Pgno) -> bool,
        peek: &mut dyn FnMut(Pgno) -> Option<Vec<u8>>,
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

        // Candidates, best first: b-tree siblings in the direction of travel (then the
        // children of the next interior pages of the level above), then pages by number while
        // a run by number holds.
        let mut cands: Vec<Pgno> = Vec::new();
        let reach = 2 * window;
        let owner = self.parent.get(&pgno).copied();
        let known = owner.is_some();
        let mut dir_taken = None;
        let place = owner.filter(|_| reach > 0).and_then(|o| {
            let list = &self.groups.get(&o)?.children;
            Some((o, list.iter().position(|&p| p == pgno)?))
        });
        if let Some((owner, i)) = place {
            let list = &self.groups[&owner].children;
            let j = (self.parent.get(&self.last_miss) == Some(&owner))
                .then(|| list.iter().position(|&p| p == self.last_miss))
                .flatten();
            let (first, last) = (i == 0, i + 1 == list.len());
            let forward: Vec<Pgno> = list[i + 1..].iter().take(reach).copied().collect();
            let backward: Vec<Pgno> = list[..i].iter().rev().take(reach).copied().collect();
            let dir = match j {
                Some(j) if j < i => Some(true),
                Some(j) if j > i => Some(false),
                // A walk that went on from the previous request into this group keeps its
                // direction (the miss may land anywhere in the group: the request before
                // brought some of it).
                _ if holds && self.dir.is_some() => self.dir,
                // The first miss in this group: a walk in key order starts at the first child,
                // one in reverse (integrity_check) at the last.
                _ if first && !last => Some(true),
                _ if last && !first => Some(false),
                _ => None,
            };
            dir_taken = dir;
            match dir {
                Some(fwd) => {
                    let mut walk: Vec<Pgno> = if fwd { forward } else { backward };
                    // The interior pages the walk needs next come first: a few pages, and
                    // without them the request after this one could not go past them.
                    let ahead = self.siblings(owner, fwd, reach, &mut walk, peek);
                    cands.extend(ahead);
                    cands.extend(walk);
                }
                None => {
                    let (mut f, mut b) = (forward.into_iter(), backward.into_iter());
                    loop {
                        match (f.next(), b.next()) {
                            (None, None) => break,
                            (x, y) => cands.extend(x.into_iter().chain(y)),
                        }
                    }
                }
            }
        }
        self.dir = dir_taken;
        let by_number = self.frontier.contains(&pgno) && !known;
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
        // Cells (child page number, a one-byte key) right after the cell pointer array.
        let mut cell = 12 + 2 * children.len();
        for (i, c) in children.iter().enumerate() {
            p[12 + 2 * i..14 + 2 * i].copy_from_slice(&(cell as u16).to_be_bytes());
            p[cell..cell + 4].copy_from_slice(&c.to_be_bytes());
            p[cell + 4] = 1;
            cell += 5;
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
        assert_eq!(
            p.plan(Pgno(4), 2, 2, |_| true, &mut |_| None),
            pg(&[4, 5, 3])
        );
        // Moving forward: siblings after.
        assert_eq!(p.plan(Pgno(6), 2, 2, |_| true, &mut |_| None), pg(&[6, 7]));
        let mut q = Prefetcher::default();
        assert_eq!(q.plan(Pgno(10), 3, 3, |_| true, &mut |_| None), pg(&[10]));
        assert_eq!(
            q.plan(Pgno(11), 3, 3, |_| true, &mut |_| None),
            pg(&[11, 12, 13, 14])
        );
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
            let plan = p.plan(
                Pgno(n),
                8,
                256,
                |x| !cached.borrow().contains(&x),
                &mut |_| None,
            );
            requests += 1;
            windows.push(p.window());
            cached.borrow_mut().extend(plan);
        }
        assert!(requests <= 14, "{requests} requests: {windows:?}");
        assert_eq!(*windows.last().unwrap(), 256);
        // A random miss starts over.
        p.plan(Pgno(50_000), 8, 256, |_| true, &mut |_| None);
        assert_eq!(p.window(), 8);
        // Off means off.
        assert_eq!(
            p.plan(Pgno(50_001), 0, 256, |_| true, &mut |_| None),
            pg(&[50_001])
        );
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
            let plan = p.plan(
                Pgno(c),
                4,
                64,
                |x| !cached.borrow().contains(&x),
                &mut |_| None,
            );
            requests += 1;
            cached.borrow_mut().extend(plan);
        }
        assert!(
            requests <= 5,
            "{requests} requests for {} pages",
            children.len()
        );
    }

    /// A root over `n` interior pages of `m` leaves each, walked leaf by leaf as SQLite reads a
    /// b-tree (each interior page read before its leaves), forward or in reverse; with
    /// `warm`, every interior page is cached from the start (as the open's warm set brings
    /// them). Returns the requests it took.
    fn walk_two_levels(n: u32, m: u32, reverse: bool, warm: bool) -> usize {
        let leaves = |k: u32| -> Vec<u32> { (0..m).map(|x| 100_000 + k * m + x).collect() };
        let interiors: Vec<u32> = (0..n).map(|k| 100 + k).collect();
        let mut pages: HashMap<u32, Vec<u8>> = HashMap::new();
        let (right, cells) = interiors.split_last().unwrap();
        pages.insert(2, interior(cells, *right));
        for (k, &ip) in interiors.iter().enumerate() {
            let l = leaves(k as u32);
            let (right, cells) = l.split_last().unwrap();
            pages.insert(ip, interior(cells, *right));
        }
        let mut start = HashSet::from([Pgno(2)]);
        if warm {
            start.extend(interiors.iter().map(|&p| Pgno(p)));
        }
        let cached = std::cell::RefCell::new(start);
        let mut p = Prefetcher::default();
        let mut requests = 0;
        let mut read = |x: u32, p: &mut Prefetcher| {
            if !cached.borrow().contains(&Pgno(x)) {
                let mut peek = |y: Pgno| {
                    cached
                        .borrow()
                        .contains(&y)
                        .then(|| pages.get(&y.0).cloned())
                        .flatten()
                };
                let plan = p.plan(
                    Pgno(x),
                    8,
                    256,
                    |y| !cached.borrow().contains(&y),
                    &mut peek,
                );
                requests += 1;
                cached.borrow_mut().extend(plan);
            }
            if let Some(page) = pages.get(&x) {
                p.observe(Pgno(x), page);
            }
        };
        read(2, &mut p);
        let mut order: Vec<usize> = (0..n as usize).collect();
        if reverse {
            order.reverse();
        }
        for k in order {
            read(interiors[k], &mut p);
            let mut l = leaves(k as u32);
            if reverse {
                l.reverse();
            }
            for leaf in l {
                read(leaf, &mut p);
            }
        }
        requests
    }

    #[test]
    fn a_walk_goes_on_across_interior_pages_in_one_request() {
        // 2,020 pages at most 257 a request: with each interior page's leaves in a request of
        // their own it took at least 20.
        for (reverse, warm) in [(false, false), (true, false), (false, true), (true, true)] {
            let n = walk_two_levels(20, 100, reverse, warm);
            assert!(n <= 14, "{n} requests (reverse {reverse}, warm {warm})");
        }
        // More leaves than the hints kept (72,000), every interior page cached: learning the
        // siblings of a whole level must not push out the group being walked.
        for reverse in [false, true] {
            let n = walk_two_levels(180, 400, reverse, true);
            assert!(n <= 72_000 / 257 + 40, "{n} requests (reverse {reverse})");
        }
    }

    #[test]
    fn strided_misses_read_ahead_by_the_stride() {
        let mut p = Prefetcher::default();
        p.plan(Pgno(10), 4, 64, |_| true, &mut |_| None);
        p.plan(Pgno(13), 4, 64, |_| true, &mut |_| None);
        assert_eq!(
            p.plan(Pgno(16), 4, 64, |_| true, &mut |_| None),
            pg(&[16, 19, 22, 25, 28, 31, 34, 37, 40])
        );
    }
}
