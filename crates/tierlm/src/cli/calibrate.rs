//! `tierlm calibrate`: the rates the cost model needs
//! ([`runtime::cost::Rates`]), measured on this machine and cached.
//!
//! Measured here: disk reads and writes with direct I/O in the offload
//! directory (the disk tier's own benchmark), a host memory copy, and the
//! CPU's attention rate (f16 dot products over a cache on every core);
//! with a GPU, host↔GPU from pinned, registered and pageable memory (the
//! GPU tier's benchmark, through the copy matrix's routes), and the GPU's
//! memory bandwidth and f16 product rate (a device copy and an 8192³
//! product, as `bench` measures its roofline). Whatever cannot be measured
//! keeps the nominal figure of [`Rates::NOMINAL`], and the file says which.
//!
//! The result is cached as JSON under the user's cache directory
//! (`$XDG_CACHE_HOME/tierlm/`, else `~/.cache/tierlm/`), one file per
//! machine identity ([`MachineId`]: GPU, CPU model, host memory, the
//! offload directory's file system). A file that is corrupt, of another
//! machine or of another format version is measured again, never trusted.
//! `TIERLM_CALIBRATION=FILE` (or `--calibration FILE`) names fixed rates
//! instead (tests, benchmarks); such a file must parse and be of this
//! format.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use engine_opt::{Error, Result};
use runtime::cost::Rates;

/// The version of the file format; files of another are measured again.
pub const FORMAT_VERSION: u32 = 1;

/// The environment variable naming a fixed calibration file.
pub const CALIBRATION_ENV: &str = "TIERLM_CALIBRATION";

/// What identifies a machine for its rates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineId {
    /// The GPU's name and memory, or `none`.
    pub gpu: String,
    pub cpu_model: String,
    /// MemTotal, bytes.
    pub host_memory: u64,
    /// The offload directory's file system: its type and device.
    pub offload_fs: String,
}

/// A calibration file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    pub format: u32,
    pub machine: MachineId,
    pub rates: Rates,
    /// The rates measured here; the others are [`Rates::NOMINAL`]'s.
    pub measured: Vec<String>,
    /// Why a rate was not measured.
    pub notes: Vec<String>,
    /// Seconds the measurement took.
    pub seconds: f64,
}

/// Arguments of `tierlm calibrate`.
#[derive(clap::Args, Debug, Clone)]
pub struct CalibrateArgs {
    /// Directory whose disk is measured (the offload directory; default:
    /// the system's temporary directory)
    #[arg(long)]
    pub offload_dir: Option<PathBuf>,
    /// Measure again even if this machine's rates are cached
    #[arg(long)]
    pub force: bool,
    /// Print the calibration as JSON
    #[arg(long)]
    pub json: bool,
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn mem_total() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .and_then(|kb| kb.checked_mul(1024))
        .unwrap_or(0)
}

/// The file system of `dir` (or of its nearest existing ancestor): its
/// `statfs` type and its device number.
fn file_system(dir: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let mut p = dir.to_path_buf();
    if p.is_relative() {
        if let Ok(cwd) = std::env::current_dir() {
            p = cwd.join(p);
        }
    }
    let existing = p.ancestors().find(|a| a.exists()).map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("/"));
    let dev = std::fs::metadata(&existing).map(|m| m.dev()).unwrap_or(0);
    let fs_type = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes())
        .ok()
        .and_then(|c| {
            let mut st: libc::statfs = unsafe { std::mem::zeroed() };
            // SAFETY: `c` is a valid NUL-terminated path and `st` a valid
            // out-pointer for the duration of the call.
            (unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0).then_some(st.f_type as i64)
        })
        .unwrap_or(0);
    format!("type {fs_type:#x}, device {dev:#x}")
}

/// This machine's identity, for rates measured in `offload_dir`.
pub fn machine_id(offload_dir: &Path) -> MachineId {
    let gpu = match tier_cuda::probe() {
        Ok(Some(info)) => format!("{} ({} bytes)", info.name, info.total_mem),
        _ => "none".to_string(),
    };
    MachineId { gpu, cpu_model: cpu_model(), host_memory: mem_total(), offload_fs: file_system(offload_dir) }
}

/// The user's cache directory for tierlm, if there is one.
pub fn cache_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(std::env::var_os("HOME").filter(|v| !v.is_empty())?).join(".cache"),
    };
    Some(base.join("tierlm"))
}

/// FNV-1a of the machine's identity, as 16 hex digits.
fn id_hash(id: &MachineId) -> String {
    let text = format!("{}|{}|{}|{}", id.gpu, id.cpu_model, id.host_memory, id.offload_fs);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The cache file of machine `id`.
pub fn cache_file(id: &MachineId) -> Option<PathBuf> {
    Some(cache_dir()?.join(format!("calibration-{}.json", id_hash(id))))
}

/// Why a cached file is not used.
#[derive(Debug, PartialEq, Eq)]
pub enum Stale {
    Missing,
    Corrupt(String),
    OtherFormat(u32),
    OtherMachine,
}

impl std::fmt::Display for Stale {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stale::Missing => write!(f, "first use"),
            Stale::Corrupt(why) => write!(f, "the cached file is unreadable ({why})"),
            Stale::OtherFormat(v) => write!(f, "the cached file is of format {v}, this tierlm writes {FORMAT_VERSION}"),
            Stale::OtherMachine => write!(f, "the cached file is another machine's"),
        }
    }
}

/// Reads a cached calibration for `id`; `Err` says why it cannot be used.
pub fn read_cached(path: &Path, id: &MachineId) -> std::result::Result<Calibration, Stale> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Stale::Missing),
        Err(e) => return Err(Stale::Corrupt(e.to_string())),
    };
    let cal = parse(&text).map_err(Stale::Corrupt)?;
    if cal.format != FORMAT_VERSION {
        return Err(Stale::OtherFormat(cal.format));
    }
    if cal.machine != *id {
        return Err(Stale::OtherMachine);
    }
    Ok(cal)
}

/// Parses a calibration file: its format version first (so an older file
/// whose fields differ reads as that version, not as corrupt), then the
/// rest, with every rate checked.
pub fn parse(text: &str) -> std::result::Result<Calibration, String> {
    #[derive(Deserialize)]
    struct Version {
        format: u32,
    }
    let v: Version = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if v.format != FORMAT_VERSION {
        return Ok(Calibration {
            format: v.format,
            machine: MachineId {
                gpu: String::new(),
                cpu_model: String::new(),
                host_memory: 0,
                offload_fs: String::new(),
            },
            rates: Rates::NOMINAL,
            measured: Vec::new(),
            notes: Vec::new(),
            seconds: 0.0,
        });
    }
    let cal: Calibration = serde_json::from_str(text).map_err(|e| e.to_string())?;
    cal.rates.validate().map_err(|e| e.to_string())?;
    Ok(cal)
}

/// Reads a fixed calibration file (`TIERLM_CALIBRATION`, `--calibration`):
/// it must parse and be of this format; its machine is not checked.
pub fn read_fixed(path: &Path) -> Result<Calibration> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let cal = parse(&text)
        .map_err(|why| Error::InvalidArgument(format!("{}: not a calibration file: {why}", path.display())))?;
    if cal.format != FORMAT_VERSION {
        return Err(Error::InvalidArgument(format!(
            "{}: calibration format {}, this tierlm reads {FORMAT_VERSION}; run tierlm calibrate",
            path.display(),
            cal.format
        )));
    }
    Ok(cal)
}

/// Writes `cal` to `path` atomically (a temporary file renamed over it).
pub fn write(path: &Path, cal: &Calibration) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let text = serde_json::to_string_pretty(cal).map_err(|source| Error::Json { path: path.to_path_buf(), source })?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Bytes moved per host and disk measurement.
const SAMPLE_BYTES: usize = 256 << 20;

/// Bytes read and written by the disk measurement where the offload
/// directory has room for them (else [`SAMPLE_BYTES`]). A disk's first
/// hundreds of megabytes can run faster than what it sustains: on the H100
/// machine a 256 MiB read measured 1.59 GB/s in one call and enough more in
/// the next to predict a disk-bound decode (case C) 19% fast, where the
/// engine's own reads ran at about 1.6 GB/s.
const DISK_SAMPLE_BYTES: u64 = 1 << 30;

/// Bytes of the CPU attention's sample cache.
const CPU_SAMPLE_BYTES: usize = 16 << 20;

/// Median seconds of `reps` runs of `f` after one untimed.
fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn host_memcpy() -> f64 {
    let src = vec![1u8; SAMPLE_BYTES];
    let mut dst = vec![0u8; SAMPLE_BYTES];
    let s = median_secs(3, || dst.copy_from_slice(std::hint::black_box(&src)));
    SAMPLE_BYTES as f64 / s
}

/// Bytes of an f16 cache the CPU reads per second computing dot products
/// on every core, as the decode attention does.
fn cpu_attention() -> f64 {
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;
    let n = CPU_SAMPLE_BYTES / 2;
    let cache: Vec<half::f16> = (0..n).map(|i| half::f16::from_f32((i % 97) as f32 / 97.0)).collect();
    let q: Vec<f32> = (0..HEAD).map(|i| i as f32 / HEAD as f32).collect();
    let s = median_secs(3, || {
        let sum: f32 = cache
            .par_chunks(ROWS * HEAD)
            .map(|rows| {
                // A block of keys converted at once, then one dot product a key.
                let mut k = [0f32; ROWS * HEAD];
                let k = &mut k[..rows.len()];
                rows.convert_to_f32_slice(k);
                k.chunks(HEAD).map(|key| key.iter().zip(&q).fold(0.0, |a, (x, y)| a + x * y)).sum::<f32>()
            })
            .sum();
        std::hint::black_box(sum);
    });
    (n * 2) as f64 / s
}

/// A head's width and the keys converted at once by the CPU sample.
const HEAD: usize = 128;
const ROWS: usize = 64;

/// Disk read and write rates in `dir` through the disk tier's benchmark.
fn disk(dir: &Path) -> Result<(f64, f64)> {
    tier_disk::check_offload_dir(dir)?;
    // Twice the sample free: the long one; else the short one, or the error.
    let bytes = if tier_disk::check_free(dir, 2 * DISK_SAMPLE_BYTES, "").is_ok() {
        DISK_SAMPLE_BYTES
    } else {
        tier_disk::check_free(dir, SAMPLE_BYTES as u64, "calibration's disk sample")?;
        SAMPLE_BYTES as u64
    };
    let config = |backend| tier_disk::bench::BenchConfig {
        bytes,
        host_pages: vec![tier_disk::bench::HostPages::Small],
        baseline: false,
        backends: vec![backend],
        ..tier_disk::bench::BenchConfig::new(dir)
    };
    // The backend the disk tier uses: io_uring where it runs, else threads.
    let mut rows = tier_disk::bench::run(&config(tier_disk::BackendChoice::IoUring)).unwrap_or_default();
    if rows.is_empty() {
        rows = tier_disk::bench::run(&config(tier_disk::BackendChoice::Threads))?;
    }
    // The first backend measured is the one the disk tier uses.
    let first = rows.first().map(|r| r.name.clone()).unwrap_or_default();
    let rate = |d: tier_disk::bench::Direction| {
        rows.iter().find(|r| r.name == first && r.direction == d).map(|r| r.gbps * 1e9).filter(|r| *r > 0.0)
    };
    let read = rate(tier_disk::bench::Direction::DiskToHost);
    let write = rate(tier_disk::bench::Direction::HostToDiskRewrite).or(rate(tier_disk::bench::Direction::HostToDisk));
    match (read, write) {
        (Some(r), Some(w)) => Ok((r, w)),
        _ => Err(Error::InvalidArgument("the disk benchmark returned no read or write rate".into())),
    }
}

/// GPU rates: the copy paths through the GPU tier's benchmark, then the
/// device's memory bandwidth and product rate.
fn gpu(rates: &mut Rates, measured: &mut Vec<String>) -> Result<()> {
    let config = tier_cuda::bench::BenchConfig { bytes: SAMPLE_BYTES, reps: 3, disk: None, ..Default::default() };
    let report = tier_cuda::bench::run(&config)?;
    let mut take = |row: &str, field: &str, slot: &mut f64| {
        if let Some(r) = report.row(row).map(|r| r.gbps() * 1e9).filter(|r| *r > 0.0) {
            *slot = r;
            measured.push(field.to_string());
        }
    };
    take("DMA pinned -> gpu", "h2d_pinned", &mut rates.h2d_pinned);
    take("DMA gpu -> pinned", "d2h_pinned", &mut rates.d2h_pinned);
    take("DMA registered -> gpu", "h2d_registered", &mut rates.h2d_registered);
    take("relay pageable -> gpu", "h2d_pageable", &mut rates.h2d_pageable);
    take("relay gpu -> pageable", "d2h_pageable", &mut rates.d2h_pageable);
    let g = engine_opt::gpu::Gpu::new(0)?;
    let roof = super::gpu::measure_roofline(&g)?;
    rates.gpu_mem = roof.copy_bytes_per_s;
    rates.gpu_flops = roof.gemm_flop_per_s;
    measured.extend(["gpu_mem".to_string(), "gpu_flops".to_string()]);
    Ok(())
}

/// Measures this machine's rates with `offload_dir`'s disk.
pub fn measure(offload_dir: &Path) -> Calibration {
    let start = Instant::now();
    let mut rates = Rates::NOMINAL;
    let mut measured = Vec::new();
    let mut notes = Vec::new();
    match disk(offload_dir) {
        Ok((r, w)) => {
            (rates.disk_read, rates.disk_write) = (r, w);
            measured.extend(["disk_read".to_string(), "disk_write".to_string()]);
        }
        Err(e) => notes.push(format!("disk not measured in {}: {e}", offload_dir.display())),
    }
    rates.host_memcpy = host_memcpy();
    rates.cpu_attention = cpu_attention();
    measured.extend(["host_memcpy".to_string(), "cpu_attention".to_string()]);
    match tier_cuda::probe() {
        Ok(Some(_)) => {
            if let Err(e) = gpu(&mut rates, &mut measured) {
                notes.push(format!("GPU rates not measured: {e}"));
            }
        }
        _ => notes.push(format!("no GPU here ({}): its rates are the nominal figures", tier_cuda::probe_message())),
    }
    Calibration {
        format: FORMAT_VERSION,
        machine: machine_id(offload_dir),
        rates,
        measured,
        notes,
        seconds: start.elapsed().as_secs_f64(),
    }
}

/// Where a run's rates came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub calibration: Calibration,
    /// The file read or written (none where there is no cache directory).
    pub path: Option<PathBuf>,
    /// Whether they were measured in this process.
    pub fresh: bool,
}

/// The rates for a run in `offload_dir`: a fixed file (`fixed`, else
/// `TIERLM_CALIBRATION`), else this machine's cached file, else measured
/// now (saying so on stderr) and cached.
pub fn load(offload_dir: &Path, fixed: Option<&Path>, force: bool) -> Result<Loaded> {
    let env = std::env::var_os(CALIBRATION_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(path) = fixed.map(Path::to_path_buf).or(env) {
        return Ok(Loaded { calibration: read_fixed(&path)?, path: Some(path), fresh: false });
    }
    let id = machine_id(offload_dir);
    let path = cache_file(&id);
    let why = match (&path, force) {
        (Some(p), false) => match read_cached(p, &id) {
            Ok(cal) => return Ok(Loaded { calibration: cal, path, fresh: false }),
            Err(why) => why.to_string(),
        },
        (Some(_), true) => "asked to measure again".to_string(),
        (None, _) => "no cache directory (neither XDG_CACHE_HOME nor HOME is set)".to_string(),
    };
    eprintln!("note: measuring this machine's rates for the cost model ({why}); this takes a few seconds");
    let cal = measure(offload_dir);
    if let Some(p) = &path {
        match write(p, &cal) {
            Ok(()) => eprintln!("note: rates cached in {}", p.display()),
            Err(e) => eprintln!("note: could not cache the rates: {e}"),
        }
    }
    Ok(Loaded { calibration: cal, path, fresh: true })
}

/// Rates per second for people: GB/s, or TFLOP/s for the product rate.
pub fn describe(cal: &Calibration) -> String {
    let mut s = String::new();
    for (name, v) in cal.rates.named() {
        let how = if cal.measured.iter().any(|m| m == name) { "measured" } else { "nominal" };
        let value =
            if name == "gpu_flops" { format!("{:.1} TFLOP/s", v / 1e12) } else { format!("{:.2} GB/s", v / 1e9) };
        s += &format!("  {name:<15} {value:>14}  {how}\n");
    }
    for n in &cal.notes {
        s += &format!("  note: {n}\n");
    }
    s
}

/// Runs `tierlm calibrate`.
pub fn run(args: CalibrateArgs) -> Result<()> {
    let dir = args.offload_dir.clone().unwrap_or_else(std::env::temp_dir);
    let loaded = load(&dir, None, args.force)?;
    let cal = &loaded.calibration;
    let mut out = std::io::stdout().lock();
    let stdout_err = |e: std::io::Error| Error::io("<stdout>", e);
    if args.json {
        let line =
            serde_json::to_string(cal).map_err(|source| Error::Json { path: PathBuf::from("<stdout>"), source })?;
        return writeln!(out, "{line}").map_err(stdout_err);
    }
    let text = format!(
        "machine: GPU {}; CPU {}; {:.1} GiB host memory; offload directory {} ({})\n\
         rates ({}{}):\n{}",
        cal.machine.gpu,
        cal.machine.cpu_model,
        cal.machine.host_memory as f64 / (1u64 << 30) as f64,
        dir.display(),
        cal.machine.offload_fs,
        if loaded.fresh { format!("measured in {:.1} s", cal.seconds) } else { "cached".to_string() },
        loaded.path.as_ref().map_or(String::new(), |p| format!(", {}", p.display())),
        describe(cal),
    );
    out.write_all(text.as_bytes()).map_err(stdout_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: MachineId) -> Calibration {
        Calibration {
            format: FORMAT_VERSION,
            machine: id,
            rates: Rates { disk_read: 1.5e9, ..Rates::NOMINAL },
            measured: vec!["disk_read".into()],
            notes: Vec::new(),
            seconds: 1.0,
        }
    }

    fn id() -> MachineId {
        MachineId { gpu: "none".into(), cpu_model: "test cpu".into(), host_memory: 1 << 34, offload_fs: "t".into() }
    }

    #[test]
    fn a_cached_file_is_used_only_for_its_own_machine_and_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.json");
        assert_eq!(read_cached(&path, &id()), Err(Stale::Missing));
        write(&path, &sample(id())).unwrap();
        assert_eq!(read_cached(&path, &id()).unwrap().rates.disk_read, 1.5e9);
        let other = MachineId { cpu_model: "another cpu".into(), ..id() };
        assert_eq!(read_cached(&path, &other), Err(Stale::OtherMachine));

        std::fs::write(&path, "{\"format\": 1, \"machine\": ").unwrap();
        assert!(matches!(read_cached(&path, &id()), Err(Stale::Corrupt(_))));
        std::fs::write(&path, "{\"format\": 0, \"rates\": {\"disk\": 3}}").unwrap();
        assert_eq!(read_cached(&path, &id()), Err(Stale::OtherFormat(0)));
        // Well-formed JSON with a rate that is no rate.
        let mut bad = serde_json::to_value(sample(id())).unwrap();
        bad["rates"]["disk_read"] = serde_json::json!(-1.0);
        std::fs::write(&path, bad.to_string()).unwrap();
        assert!(matches!(read_cached(&path, &id()), Err(Stale::Corrupt(ref w)) if w.contains("disk_read")));
    }

    #[test]
    fn a_fixed_file_must_parse_and_be_of_this_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fixed.json");
        write(&path, &sample(MachineId { gpu: "elsewhere".into(), ..id() })).unwrap();
        assert_eq!(read_fixed(&path).unwrap().rates.disk_read, 1.5e9, "another machine's fixed rates are used");
        std::fs::write(&path, "not json").unwrap();
        assert!(read_fixed(&path).unwrap_err().to_string().contains("not a calibration file"));
        std::fs::write(&path, "{\"format\": 7}").unwrap();
        assert!(read_fixed(&path).unwrap_err().to_string().contains("format 7"));
    }

    #[test]
    fn machines_differ_by_file_name() {
        assert_ne!(id_hash(&id()), id_hash(&MachineId { host_memory: 1 << 33, ..id() }));
        assert_ne!(id_hash(&id()), id_hash(&MachineId { offload_fs: "u".into(), ..id() }));
        assert_eq!(id_hash(&id()), id_hash(&id()));
        assert!(machine_id(&std::env::temp_dir()).host_memory > 0);
    }
}
