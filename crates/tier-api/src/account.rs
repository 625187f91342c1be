//! Exact memory accounting for one tier.
//!
//! Every allocation reserves two numbers: the bytes the caller asked for and
//! the bytes the tier actually holds for it (rounded to pages, extents,
//! allocator granules). The budget limits resident bytes, because that is what
//! runs a machine out of memory.

use crate::error::{Error, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A snapshot of a tier's accounting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemStats {
    pub tier: String,
    /// Bytes asked for by live allocations.
    pub asked: u64,
    /// Bytes actually held for live allocations.
    pub resident: u64,
    /// The largest `resident` seen since creation.
    pub peak_resident: u64,
    /// The largest `asked` seen since creation.
    pub peak_asked: u64,
    pub budget: Option<u64>,
    /// Live allocations.
    pub allocations: u64,
}

/// The counters of one tier. Shared by the device and by every reservation
/// made against it.
#[derive(Debug)]
pub struct MemAccount {
    tier: String,
    asked: AtomicU64,
    resident: AtomicU64,
    peak_resident: AtomicU64,
    peak_asked: AtomicU64,
    allocations: AtomicU64,
    /// `u64::MAX` means no budget.
    budget: AtomicU64,
}

impl MemAccount {
    pub fn new(tier: impl Into<String>, budget: Option<u64>) -> Arc<Self> {
        Arc::new(MemAccount {
            tier: tier.into(),
            asked: AtomicU64::new(0),
            resident: AtomicU64::new(0),
            peak_resident: AtomicU64::new(0),
            peak_asked: AtomicU64::new(0),
            allocations: AtomicU64::new(0),
            budget: AtomicU64::new(budget.unwrap_or(u64::MAX)),
        })
    }

    pub fn tier(&self) -> &str {
        &self.tier
    }

    pub fn budget(&self) -> Option<u64> {
        match self.budget.load(Ordering::Relaxed) {
            u64::MAX => None,
            b => Some(b),
        }
    }

    /// Changes the budget. Lowering it below what is resident refuses new
    /// allocations until enough is freed; it never frees anything.
    pub fn set_budget(&self, budget: Option<u64>) {
        self.budget.store(budget.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Bytes that can still be made resident under the budget.
    pub fn free(&self) -> u64 {
        self.budget.load(Ordering::Relaxed).saturating_sub(self.resident.load(Ordering::Relaxed))
    }

    /// Reserves `asked` bytes that will occupy `resident` bytes, or fails with
    /// [`Error::OutOfMemory`] when the budget would be exceeded. The
    /// reservation is released when the returned guard is dropped.
    pub fn reserve(self: &Arc<Self>, asked: u64, resident: u64) -> Result<Reservation> {
        debug_assert!(resident >= asked, "a tier holds at least the bytes asked for");
        let budget = self.budget.load(Ordering::Relaxed);
        let mut current = self.resident.load(Ordering::Relaxed);
        loop {
            let next = current.checked_add(resident).filter(|&n| n <= budget).ok_or_else(|| Error::OutOfMemory {
                tier: self.tier.clone(),
                asked,
                free: budget.saturating_sub(current),
                budget,
            })?;
            match self.resident.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => {
                    self.peak_resident.fetch_max(next, Ordering::Relaxed);
                    break;
                }
                Err(seen) => current = seen,
            }
        }
        let asked_now = self.asked.fetch_add(asked, Ordering::AcqRel) + asked;
        self.peak_asked.fetch_max(asked_now, Ordering::Relaxed);
        self.allocations.fetch_add(1, Ordering::Relaxed);
        Ok(Reservation { account: Arc::clone(self), asked, resident })
    }

    pub fn stats(&self) -> MemStats {
        MemStats {
            tier: self.tier.clone(),
            asked: self.asked.load(Ordering::Relaxed),
            resident: self.resident.load(Ordering::Relaxed),
            peak_resident: self.peak_resident.load(Ordering::Relaxed),
            peak_asked: self.peak_asked.load(Ordering::Relaxed),
            budget: self.budget(),
            allocations: self.allocations.load(Ordering::Relaxed),
        }
    }
}

/// Bytes held against a [`MemAccount`]; released on drop.
#[derive(Debug)]
pub struct Reservation {
    account: Arc<MemAccount>,
    asked: u64,
    resident: u64,
}

impl Reservation {
    pub fn asked(&self) -> u64 {
        self.asked
    }

    pub fn resident(&self) -> u64 {
        self.resident
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        let before = self.account.resident.fetch_sub(self.resident, Ordering::AcqRel);
        debug_assert!(before >= self.resident, "released more than was reserved");
        self.account.asked.fetch_sub(self.asked, Ordering::AcqRel);
        self.account.allocations.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_enforced_on_resident_bytes() {
        let acc = MemAccount::new("host:pageable", Some(10_000));
        let a = acc.reserve(4000, 4096).expect("fits");
        let err = acc.reserve(5000, 8192).expect_err("over budget");
        match err {
            Error::OutOfMemory { tier, asked, free, budget } => {
                assert_eq!(tier, "host:pageable");
                assert_eq!(asked, 5000);
                assert_eq!(free, 10_000 - 4096);
                assert_eq!(budget, 10_000);
            }
            other => panic!("unexpected {other:?}"),
        }
        let s = acc.stats();
        assert_eq!((s.asked, s.resident, s.allocations), (4000, 4096, 1));
        drop(a);
        let s = acc.stats();
        assert_eq!((s.asked, s.resident, s.peak_resident, s.peak_asked), (0, 0, 4096, 4000));
        assert!(acc.reserve(5000, 8192).is_ok());
    }

    #[test]
    fn no_budget_means_unlimited() {
        let acc = MemAccount::new("disk:0", None);
        assert_eq!(acc.budget(), None);
        let _r = acc.reserve(1 << 40, 1 << 40).expect("unlimited");
        acc.set_budget(Some(1));
        assert!(acc.reserve(1, 1).is_err(), "lowered budget refuses new allocations");
    }
}
