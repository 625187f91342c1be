//! `tierlm copy-matrix`: the copy path planned for every pair of tiers
//! present on this machine.

use super::tiers::{present_tiers, TierArgs};
use clap::Args;
use tier_api::{CopyConfig, CopyMatrix, DType, Shape};

#[derive(Args, Debug)]
pub struct CopyMatrixArgs {
    #[command(flatten)]
    pub tiers: TierArgs,

    /// Print the matrix as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: CopyMatrixArgs) -> tier_api::Result<()> {
    let (choice, tiers) = present_tiers(&args.tiers)?;
    let matrix = CopyMatrix::new(CopyConfig::default())?;
    // Plan real copies between small tensors on each tier: what is printed is
    // what `plan` decides, not a table kept beside it.
    let shape = Shape::new([4, 1024]);
    let sources = tiers.iter().map(|t| t.device.allocate(&shape, DType::F16)).collect::<Result<Vec<_>, _>>()?;
    let targets = tiers.iter().map(|t| t.device.allocate(&shape, DType::F16)).collect::<Result<Vec<_>, _>>()?;
    let mut cells = Vec::new();
    for src in &sources {
        let mut row = Vec::new();
        for dst in &targets {
            row.push(match matrix.plan(&src.view(), &dst.view()) {
                Ok(plan) => plan.path.name().to_string(),
                Err(e) => format!("none ({e})"),
            });
        }
        cells.push(row);
    }
    let names: Vec<String> = tiers.iter().map(|t| t.device.kind().to_string()).collect();
    if args.json {
        let doc = serde_json::json!({
            "host_memory": { "kind": choice.kind.name(), "reason": choice.reason },
            "tiers": tiers.iter().map(|t| serde_json::json!({
                "name": t.device.kind().to_string(), "description": t.device.describe(), "note": t.note,
            })).collect::<Vec<_>>(),
            "paths": names.iter().zip(&cells).map(|(src, row)| {
                (src.clone(), names.iter().cloned().zip(row.iter().map(|c| serde_json::Value::from(c.as_str()))).collect::<serde_json::Map<_, _>>().into())
            }).collect::<serde_json::Map<String, serde_json::Value>>(),
        });
        println!("{doc:#}");
        return Ok(());
    }
    println!("host memory: {choice}");
    println!("gpu: none in this build (the CUDA tier adds GPU rows)");
    println!("tiers:");
    for (name, t) in names.iter().zip(&tiers) {
        let note = if t.note.is_empty() { String::new() } else { format!("  [{}]", t.note) };
        println!("  {name:<16} {}{note}", t.device.describe());
    }
    println!();
    let width = cells.iter().flatten().map(|c| c.len()).chain(names.iter().map(|n| n.len())).max().unwrap_or(8) + 2;
    print!("{:<16}", "from \\ to");
    for n in &names {
        print!("{n:<width$}");
    }
    println!();
    for (n, row) in names.iter().zip(&cells) {
        print!("{n:<16}");
        for c in row {
            print!("{c:<width$}");
        }
        println!();
    }
    Ok(())
}
