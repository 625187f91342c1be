//! Host memory figures: the runtime's ([`runtime::memory`]), under the
//! names the engine has used.

pub use runtime::memory::{available_bytes, gib, peak_rss_bytes};
pub use runtime::TierPeaks;
