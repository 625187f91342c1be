//! `tierlm bench-tiers`: bandwidth of every copy path between the tiers
//! present on this machine, beside the baselines they must beat.

use super::tiers::TierArgs;
use clap::Args;

#[derive(Args, Debug)]
pub struct BenchTiersArgs {
    #[command(flatten)]
    pub tiers: TierArgs,

    /// Bytes moved per measurement (suffixes K, M, G for KiB, MiB, GiB).
    #[arg(long, value_name = "SIZE", default_value = "1G", value_parser = parse_size)]
    pub bytes: u64,

    /// Bytes per disk I/O operation.
    #[arg(long, value_name = "SIZE", default_value = "1M", value_parser = parse_size)]
    pub block: u64,

    /// Print the rows as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Parses `123`, `64K`, `1M`, `2G` (binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 10),
        Some((i, 'm' | 'M')) => (&s[..i], 20),
        Some((i, 'g' | 'G')) => (&s[..i], 30),
        _ => (s, 0),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("{s:?} is not a size like 4096, 64K, 1M or 2G"))?;
    n.checked_shl(shift).filter(|v| v >> shift == n).ok_or_else(|| format!("{s:?} is too large"))
}

pub fn run(args: BenchTiersArgs) -> tier_api::Result<()> {
    let block = usize::try_from(args.block).map_err(|_| tier_api::Error::Config("block size too large".into()))?;
    let config = tier_disk::bench::BenchConfig {
        bytes: args.bytes,
        block,
        queue_depth: args.tiers.queue_depth,
        ..tier_disk::bench::BenchConfig::new(args.tiers.offload_dir())
    };
    let rows = tier_disk::bench::run(&config)?;
    if args.json {
        let rows: Vec<_> = rows
            .iter()
            .map(|r| {
                serde_json::json!({
                    "path": r.name, "detail": r.detail, "direction": r.direction.to_string(),
                    "bytes": r.bytes, "seconds": r.seconds, "gbps": r.gbps,
                })
            })
            .collect();
        println!("{:#}", serde_json::Value::Array(rows));
    } else {
        print!("{}", tier_disk::bench::table(&rows));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999999999G").is_err());
    }
}
