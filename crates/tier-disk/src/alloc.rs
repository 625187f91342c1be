//! The arena's free list: first-fit allocation of aligned extents, coalescing
//! on free. Pure bookkeeping; the arena does the system calls around it.

use std::collections::BTreeMap;

/// Free extents of an arena file of `end` bytes, keyed by start.
///
/// Invariants (checked by [`FreeList::check`] in tests and debug builds):
/// every extent is aligned and non-empty, lies below `end`, and no two
/// extents touch or overlap (touching ones are merged).
#[derive(Debug)]
pub(crate) struct FreeList {
    free: BTreeMap<u64, u64>,
    end: u64,
    align: u64,
}

impl FreeList {
    pub(crate) fn new(align: u64) -> Self {
        assert!(align.is_power_of_two(), "extent alignment is a power of two");
        FreeList { free: BTreeMap::new(), end: 0, align }
    }

    /// The file length the extents live in.
    pub(crate) fn end(&self) -> u64 {
        self.end
    }

    /// Free bytes below `end`.
    pub(crate) fn free_bytes(&self) -> u64 {
        self.free.values().sum()
    }

    pub(crate) fn extents(&self) -> usize {
        self.free.len()
    }

    /// Takes the first free extent (in address order) of at least `len`
    /// bytes, splitting off what is left. `len` must be aligned and non-zero.
    pub(crate) fn take_first_fit(&mut self, len: u64) -> Option<u64> {
        debug_assert!(len > 0 && len.is_multiple_of(self.align));
        let (&start, &have) = self.free.iter().find(|(_, &l)| l >= len)?;
        self.free.remove(&start);
        if have > len {
            self.free.insert(start + len, have - len);
        }
        Some(start)
    }

    /// Where an extent of `len` bytes would go if the file grows: at the
    /// start of a free extent that reaches the end of the file, or at the
    /// end. Returns `(start, new_end)`; nothing changes until [`grow`](Self::grow).
    pub(crate) fn plan_growth(&self, len: u64) -> Option<(u64, u64)> {
        let start = match self.free.last_key_value() {
            Some((&s, &l)) if s + l == self.end => s,
            _ => self.end,
        };
        Some((start, start.checked_add(len)?))
    }

    /// Commits a planned growth: the tail free extent (if any) is used and
    /// the file now ends at `new_end`.
    pub(crate) fn grow(&mut self, start: u64, new_end: u64) {
        assert!(new_end >= self.end && start <= self.end, "growth extends the file");
        if start < self.end {
            let tail = self.free.remove(&start);
            assert_eq!(tail, Some(self.end - start), "growth starts at the tail free extent");
        }
        self.end = new_end;
    }

    /// Returns an extent to the free list, merged with its neighbours;
    /// returns the merged free extent `(start, len)`.
    pub(crate) fn release(&mut self, start: u64, len: u64) -> (u64, u64) {
        assert!(
            len > 0 && start.is_multiple_of(self.align) && len.is_multiple_of(self.align),
            "released extents are aligned"
        );
        assert!(start + len <= self.end, "released extent lies in the file");
        let (mut s, mut l) = (start, len);
        if let Some((&ps, &pl)) = self.free.range(..start).next_back() {
            assert!(ps + pl <= start, "double free or overlap at {start}");
            if ps + pl == start {
                self.free.remove(&ps);
                s = ps;
                l += pl;
            }
        }
        if let Some((&ns, &nl)) = self.free.range(start..).next() {
            assert!(ns >= start + len, "double free or overlap at {start}");
            if ns == start + len {
                self.free.remove(&ns);
                l += nl;
            }
        }
        self.free.insert(s, l);
        (s, l)
    }

    /// Removes the free extent that reaches the end of the file, if any, and
    /// shrinks the file to its start (after the file was truncated).
    pub(crate) fn shrink_tail(&mut self) -> Option<u64> {
        let (&s, &l) = self.free.last_key_value()?;
        if s + l != self.end {
            return None;
        }
        self.free.remove(&s);
        self.end = s;
        Some(s)
    }

    /// The free extent starting at `start`, if it ends at the file's end.
    pub(crate) fn is_tail(&self, start: u64) -> bool {
        self.free.get(&start).is_some_and(|&l| start + l == self.end)
    }

    /// Asserts the invariants.
    pub(crate) fn check(&self) {
        let mut prev_end = None;
        for (&s, &l) in &self.free {
            assert!(l > 0 && s % self.align == 0 && l % self.align == 0, "free extent {s}+{l} aligned");
            assert!(s + l <= self.end, "free extent {s}+{l} inside the file of {}", self.end);
            if let Some(pe) = prev_end {
                assert!(s > pe, "free extents {s} and the one before are merged and disjoint");
            }
            prev_end = Some(s + l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: u64 = 4096;

    fn alloc(f: &mut FreeList, len: u64) -> u64 {
        if let Some(s) = f.take_first_fit(len) {
            return s;
        }
        let (s, e) = f.plan_growth(len).unwrap();
        f.grow(s, e);
        s
    }

    #[test]
    fn grows_then_reuses_first_fit() {
        let mut f = FreeList::new(A);
        let a = alloc(&mut f, A);
        let b = alloc(&mut f, 3 * A);
        let c = alloc(&mut f, A);
        assert_eq!((a, b, c, f.end()), (0, A, 4 * A, 5 * A));
        f.release(b, 3 * A);
        // First fit takes the front of the hole and leaves the rest.
        assert_eq!(alloc(&mut f, A), A);
        assert_eq!(f.free_bytes(), 2 * A);
        assert_eq!(alloc(&mut f, 2 * A), 2 * A);
        assert_eq!(f.extents(), 0);
        f.check();
    }

    #[test]
    fn coalesces_both_sides() {
        let mut f = FreeList::new(A);
        let xs: Vec<u64> = (0..5).map(|_| alloc(&mut f, A)).collect();
        f.release(xs[1], A);
        f.release(xs[3], A);
        assert_eq!(f.extents(), 2);
        assert_eq!(f.release(xs[2], A), (A, 3 * A));
        assert_eq!(f.extents(), 1);
        f.check();
        // A request larger than any single freed piece fits the merged hole.
        assert_eq!(f.take_first_fit(3 * A), Some(A));
    }

    #[test]
    fn tail_growth_uses_the_free_tail() {
        let mut f = FreeList::new(A);
        let _a = alloc(&mut f, A);
        let b = alloc(&mut f, A);
        f.release(b, A);
        assert!(f.is_tail(b));
        assert_eq!(f.plan_growth(4 * A), Some((A, 5 * A)));
        assert_eq!(alloc(&mut f, 4 * A), A);
        assert_eq!(f.end(), 5 * A);
        f.release(A, 4 * A);
        assert_eq!(f.shrink_tail(), Some(A));
        assert_eq!((f.end(), f.extents()), (A, 0));
        f.check();
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_is_caught() {
        let mut f = FreeList::new(A);
        let a = alloc(&mut f, 2 * A);
        f.release(a, 2 * A);
        f.release(a, A);
    }

    #[test]
    fn random_sequences_keep_invariants() {
        // A small deterministic xorshift so the test needs no crate.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut f = FreeList::new(A);
        let mut live: Vec<(u64, u64)> = Vec::new();
        for _ in 0..2000 {
            if live.is_empty() || next() % 3 != 0 {
                let len = (next() % 8 + 1) * A;
                let s = alloc(&mut f, len);
                for &(ls, ll) in &live {
                    assert!(s + len <= ls || ls + ll <= s, "allocations never overlap");
                }
                live.push((s, len));
            } else {
                let i = (next() as usize) % live.len();
                let (s, l) = live.swap_remove(i);
                f.release(s, l);
                while f.shrink_tail().is_some() {}
            }
            f.check();
            let used: u64 = live.iter().map(|e| e.1).sum();
            assert_eq!(used + f.free_bytes(), f.end(), "every byte is live or free");
        }
    }
}
