//! Host memory figures: the runtime's ([`runtime::memory`]), under the
//! names the engine has used.

pub use runtime::memory::{available_bytes, gib, peak_rss_bytes, rss_bytes};
pub use runtime::TierPeaks;

/// Bytes from which the C allocator gives a block its own mapping.
pub const MMAP_THRESHOLD: usize = 128 << 10;

/// Makes glibc's allocator give every block of [`MMAP_THRESHOLD`] bytes or
/// more its own mapping, returned to the kernel when freed. By default
/// glibc raises that threshold to the largest mapped block freed so far (up
/// to 32 MiB): after the first streamed layer is dropped, blocks of a
/// weight's or a cache's size come from its heap, and freed ones stay
/// resident (measured: 8 to 12 MB above the accounts for OPT-125M with
/// weights on disk, no account seeing them). Called once, at the start of
/// the process; elsewhere than glibc it does nothing.
pub fn fix_allocator_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's tunables; called before
    // other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int);
    }
}
