//! Host memory figures from Linux's `/proc`: the process's peak resident set
//! and the memory still available. Elsewhere they are unknown (`None`).

/// Reads a `kB` field of a `/proc` status-like file, in bytes.
fn proc_field_bytes(path: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_kb_field(&text, field)
}

fn parse_kb_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        Some(kb * 1024)
    })
}

/// The process's peak resident set size (`VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    proc_field_bytes("/proc/self/status", "VmHWM")
}

/// Memory the kernel says is available to new allocations (`MemAvailable`).
pub fn available_bytes() -> Option<u64> {
    proc_field_bytes("/proc/meminfo", "MemAvailable")
}

/// The most each memory tier held during a run, bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TierPeaks {
    pub gpu: u64,
    /// Page-locked host memory (pinned or registered).
    pub pinned: u64,
    pub pageable: u64,
    pub disk: u64,
}

impl std::fmt::Display for TierPeaks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gb = |b: u64| b as f64 / 1e9;
        write!(
            f,
            "GPU {:.2} GB, pinned host {:.2} GB, pageable host {:.2} GB, disk {:.2} GB",
            gb(self.gpu),
            gb(self.pinned),
            gb(self.pageable),
            gb(self.disk)
        )
    }
}

/// Bytes to GiB, for messages.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_lines() {
        let text = "Name:\ttierlm\nVmPeak:\t  2000 kB\nVmHWM:\t    1536 kB\n";
        assert_eq!(parse_kb_field(text, "VmHWM"), Some(1536 * 1024));
        assert_eq!(parse_kb_field(text, "VmRSS"), None);
        #[cfg(target_os = "linux")]
        assert!(peak_rss_bytes().is_some_and(|b| b > 0));
    }

    #[test]
    fn tier_peaks_print_every_tier() {
        let p = TierPeaks { gpu: 2_500_000_000, pinned: 0, pageable: 1_000_000, disk: 6_290_000_000 };
        assert_eq!(p.to_string(), "GPU 2.50 GB, pinned host 0.00 GB, pageable host 0.00 GB, disk 6.29 GB");
    }
}
