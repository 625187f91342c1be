//! `tierlm copy-matrix`: the copy path planned for every pair of tiers
//! present on this machine.

use super::tiers::{copy_matrix, present_tiers, Tier, TierArgs};
use clap::Args;
use tier_api::{DType, Shape};

#[derive(Args, Debug)]
pub struct CopyMatrixArgs {
    #[command(flatten)]
    pub tiers: TierArgs,

    /// Print the matrix as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: CopyMatrixArgs) -> tier_api::Result<()> {
    let present = present_tiers(&args.tiers)?;
    let matrix = copy_matrix()?;
    let devices: Vec<_> = present.devices().cloned().collect();
    // Plan real copies between small tensors on each tier: what is printed is
    // what `plan` decides, not a table kept beside it.
    let shape = Shape::new([4, 1024]);
    let sources = devices.iter().map(|d| d.allocate(&shape, DType::F16)).collect::<Result<Vec<_>, _>>()?;
    let targets = devices.iter().map(|d| d.allocate(&shape, DType::F16)).collect::<Result<Vec<_>, _>>()?;
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
    let names: Vec<String> = devices.iter().map(|d| d.kind().to_string()).collect();
    let missing: Vec<(&str, &str)> = present
        .tiers
        .iter()
        .filter_map(|t| match t {
            Tier::Missing { name, why } => Some((name.as_str(), why.as_str())),
            Tier::Present(_) => None,
        })
        .collect();
    if args.json {
        let doc = serde_json::json!({
            "host_memory": { "kind": present.host_choice.kind.name(), "reason": present.host_choice.reason },
            "gpu": present.gpu_message,
            "tiers": devices.iter().map(|d| serde_json::json!({
                "name": d.kind().to_string(), "description": d.describe(),
            })).collect::<Vec<_>>(),
            "unavailable": missing.iter().map(|(n, w)| serde_json::json!({"name": n, "why": w})).collect::<Vec<_>>(),
            "paths": names.iter().zip(&cells).map(|(src, row)| {
                let row = names.iter().cloned().zip(row.iter().map(|c| serde_json::Value::from(c.as_str())));
                (src.clone(), serde_json::Value::Object(row.collect()))
            }).collect::<serde_json::Map<String, serde_json::Value>>(),
        });
        println!("{doc:#}");
        return Ok(());
    }
    println!("gpu: {}", present.gpu_message);
    println!("host memory the engine uses: {}", present.host_choice);
    println!("tiers:");
    for d in &devices {
        println!("  {:<16} {}", d.kind().to_string(), d.describe());
    }
    for (name, why) in &missing {
        println!("  {name:<16} unavailable: {why}");
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
