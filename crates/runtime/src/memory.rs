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
        kb.checked_mul(1024)
    })
}

/// The process's peak resident set size (`VmHWM`).
pub fn peak_rss_bytes() -> Option<u64> {
    proc_field_bytes("/proc/self/status", "VmHWM")
}

/// The process's resident set size now (`VmRSS`).
pub fn rss_bytes() -> Option<u64> {
    proc_field_bytes("/proc/self/status", "VmRSS")
}

/// Memory the kernel says is available to new allocations (`MemAvailable`).
pub fn available_bytes() -> Option<u64> {
    proc_field_bytes("/proc/meminfo", "MemAvailable")
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
        let text = "Name:\ttierlm\nVmPeak:\t  2000 kB\nVmHWM:\t    1536 kB\nBig:\t18446744073709551615 kB\n";
        assert_eq!(parse_kb_field(text, "VmHWM"), Some(1536 * 1024));
        assert_eq!(parse_kb_field(text, "VmRSS"), None);
        assert_eq!(parse_kb_field(text, "Big"), None, "a figure past u64 is unknown, not wrapped");
        #[cfg(target_os = "linux")]
        assert!(peak_rss_bytes().is_some_and(|b| b > 0));
    }
}
