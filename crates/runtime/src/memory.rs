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

/// Memory this process's cgroup (v2) may still use: `memory.max` less
/// `memory.current`; `None` without a limit or where it cannot be read.
pub fn cgroup_available_bytes() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok();
    let rel = own.as_deref().and_then(|t| t.lines().find_map(|l| l.strip_prefix("0::"))).unwrap_or("/");
    let dirs = [format!("/sys/fs/cgroup{}", rel.trim_end_matches('/')), "/sys/fs/cgroup".to_string()];
    dirs.iter().find_map(|d| {
        let max = std::fs::read_to_string(format!("{d}/memory.max")).ok()?;
        let cur = std::fs::read_to_string(format!("{d}/memory.current")).ok()?;
        cgroup_room(&max, &cur)
    })
}

fn cgroup_room(max: &str, current: &str) -> Option<u64> {
    let max: u64 = max.trim().parse().ok()?;
    let current: u64 = current.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// Host memory a run may plan for: MemAvailable, or what the cgroup's limit
/// leaves where that is less.
pub fn host_budget_bytes() -> Option<u64> {
    match (available_bytes(), cgroup_available_bytes()) {
        (Some(a), Some(c)) => Some(a.min(c)),
        (a, c) => a.or(c),
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
    fn cgroup_limits_read_as_room_left() {
        assert_eq!(cgroup_room("1073741824\n", "73741824\n"), Some(1_000_000_000));
        assert_eq!(cgroup_room("max\n", "5"), None, "no limit");
        assert_eq!(cgroup_room("10", "20"), Some(0), "over the limit: no room, not a wrap");
    }

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
