//! Bandwidth of every GPU copy path, measured through the copy matrix next
//! to the raw driver figure (`cuMemcpyHtoD`/`cuMemcpyDtoH` between
//! `cuMemHostAlloc` memory and the GPU) taken in the same run, and the check
//! that pinned memory costs the process what the tier says it does.
//!
//! `tierlm bench-tiers` calls [`run`] and prints its [`BenchReport`]; the
//! disk, if any, comes in as `Arc<dyn Device>` so that this crate needs no
//! disk backend.

use crate::device::GpuDevice;
use crate::{copy_matrix, GpuConfig, GpuInfo, StagingConfig};
use cudarc::driver::sys;
use std::ffi::c_void;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;
use tier_api::{Access, CopyConfig, CopyMatrix, DType, Device, Error, HostMemKind, Result, Shape, Tensor};
use tier_host::cuda::driver_error;
use tier_host::{HostConfig, HostDevice};

/// What to measure.
#[derive(Clone)]
pub struct BenchConfig {
    pub ordinal: u32,
    /// Bytes per transfer (1 GiB by default).
    pub bytes: usize,
    /// Timed transfers per path, after one untimed warm-up.
    pub reps: usize,
    /// Timed transfers per disk path (disks are slow).
    pub disk_reps: usize,
    pub staging: StagingConfig,
    /// A disk tier for the staged paths, or `None` to skip them.
    pub disk: Option<Arc<dyn Device>>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        BenchConfig { ordinal: 0, bytes: 1 << 30, reps: 5, disk_reps: 3, staging: StagingConfig::default(), disk: None }
    }
}

/// One measured path.
#[derive(Clone, Debug)]
pub struct BenchRow {
    pub name: String,
    /// Seconds of each timed transfer.
    pub secs: Vec<f64>,
    pub bytes: u64,
    /// The row this one is compared with, and the fraction of its rate it
    /// must reach (`None`: reported only).
    pub reference: Option<(String, Option<f64>)>,
}

impl BenchRow {
    /// GB/s (10^9 bytes per second) of the median transfer.
    pub fn gbps(&self) -> f64 {
        let mut s = self.secs.clone();
        s.sort_by(|a, b| a.total_cmp(b));
        match s.get(s.len() / 2) {
            Some(&t) if t > 0.0 => self.bytes as f64 / t / 1e9,
            _ => 0.0,
        }
    }

    /// GB/s of the slowest transfer.
    pub fn worst_gbps(&self) -> f64 {
        let t = self.secs.iter().copied().fold(0.0, f64::max);
        if t > 0.0 {
            self.bytes as f64 / t / 1e9
        } else {
            0.0
        }
    }

    /// GB/s of the fastest transfer.
    pub fn best_gbps(&self) -> f64 {
        let t = self.secs.iter().copied().fold(f64::INFINITY, f64::min);
        if t.is_finite() && t > 0.0 {
            self.bytes as f64 / t / 1e9
        } else {
            0.0
        }
    }
}

/// Every row of one run.
#[derive(Clone, Debug)]
pub struct BenchReport {
    pub gpu: GpuInfo,
    pub staging: StagingConfig,
    pub rows: Vec<BenchRow>,
    /// How the staged disk rows reached the disk: whether the pinned slots
    /// were io_uring fixed buffers ([`GpuDevice::staged_disk_io`]).
    pub staged_disk: Vec<String>,
}

impl BenchReport {
    pub fn row(&self, name: &str) -> Option<&BenchRow> {
        self.rows.iter().find(|r| r.name == name)
    }

    /// `(ratio to its reference, target)` for a row with a reference.
    pub fn ratio(&self, row: &BenchRow) -> Option<(f64, Option<f64>)> {
        let (reference, target) = row.reference.as_ref()?;
        let base = self.row(reference)?.gbps();
        (base > 0.0).then(|| (row.gbps() / base, *target))
    }

    /// Rows that miss their target.
    pub fn misses(&self) -> Vec<String> {
        self.rows
            .iter()
            .filter_map(|r| match self.ratio(r) {
                Some((ratio, Some(target))) if ratio < target => {
                    Some(format!("{}: {:.1}% of its reference, target {:.0}%", r.name, ratio * 100.0, target * 100.0))
                }
                _ => None,
            })
            .collect()
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", self.gpu)?;
        writeln!(
            f,
            "staging: {} slots x {} MiB, {} helper threads",
            self.staging.slots,
            self.staging.slot_bytes >> 20,
            self.staging.helpers
        )?;
        writeln!(f, "{:<34} {:>9} {:>9} {:>9}  {:<30}", "path", "GB/s", "best", "worst", "vs reference (target)")?;
        for r in &self.rows {
            let vs = match (self.ratio(r), &r.reference) {
                (Some((ratio, target)), Some((name, _))) => {
                    let t =
                        target.map(|t| format!(" (>= {:.0}%: {})", t * 100.0, if ratio >= t { "ok" } else { "MISS" }));
                    format!("{:.1}% of {name}{}", ratio * 100.0, t.unwrap_or_default())
                }
                _ => String::new(),
            };
            writeln!(f, "{:<34} {:>9.2} {:>9.2} {:>9.2}  {vs}", r.name, r.gbps(), r.best_gbps(), r.worst_gbps())?;
        }
        for d in &self.staged_disk {
            writeln!(f, "staged disk I/O: {d}")?;
        }
        Ok(())
    }
}

pub const RAW_H2D: &str = "raw cuMemcpyHtoD (cuMemHostAlloc)";
pub const RAW_D2H: &str = "raw cuMemcpyDtoH (cuMemHostAlloc)";
pub const DISK_READ: &str = "disk read (disk -> pinned)";
pub const DISK_WRITE: &str = "disk write (pinned -> disk)";

/// Measures every GPU path of `config`.
pub fn run(config: &BenchConfig) -> Result<BenchReport> {
    if config.bytes == 0 || config.reps == 0 {
        return Err(Error::Config("the bench needs at least one byte and one repetition".into()));
    }
    let gpu =
        GpuDevice::new(GpuConfig { ordinal: config.ordinal, staging: config.staging.clone(), ..GpuConfig::default() })?;
    let matrix = copy_matrix(CopyConfig::default())?;
    let n = config.bytes;
    let reps = config.reps;
    let mut rows = Vec::new();
    let reference = |name: &str, target: Option<f64>| Some((name.to_string(), target));

    // The raw baseline is measured next to every path, rep by rep, so that
    // a machine whose speed drifts (a shared host) weighs on both alike; its
    // row pools every sample.
    let raw = RawPinned::new(&gpu, n)?;
    let (mut raw_up, mut raw_down) = (Vec::new(), Vec::new());

    let shape = Shape::new([n]);
    let g1 = gpu.allocate(&shape, DType::U8)?;
    let g2 = gpu.allocate(&shape, DType::U8)?;
    let timed = |a: &Tensor, b: &Tensor| -> Result<f64> {
        let t = Instant::now();
        matrix.copy(&a.view(), &b.view())?;
        Ok(t.elapsed().as_secs_f64())
    };

    for kind in [HostMemKind::Pinned, HostMemKind::Registered, HostMemKind::Pageable] {
        let host = HostDevice::new(HostConfig { kind, ..HostConfig::default() })?;
        let src = host.allocate(&shape, DType::U8)?;
        let dst = host.allocate(&shape, DType::U8)?;
        fill_pattern(&src, kind as u64 + 1)?;
        fill_pattern(&dst, 0)?;
        let label = match kind {
            HostMemKind::Pageable => "relay".to_string(),
            _ => "DMA".to_string(),
        };
        let target = if kind == HostMemKind::Pageable { 0.60 } else { 0.95 };
        timed(&src, &g1)?;
        timed(&g1, &dst)?;
        same_bytes(&src, &dst, &format!("{kind} -> gpu -> {kind}"))?;
        let (mut up, mut down) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            raw_up.push(raw.h2d()?);
            up.push(timed(&src, &g1)?);
            raw_down.push(raw.d2h()?);
            down.push(timed(&g1, &dst)?);
        }
        rows.push(BenchRow {
            name: format!("{label} {kind} -> gpu"),
            secs: up,
            bytes: n as u64,
            reference: reference(RAW_H2D, Some(target)),
        });
        rows.push(BenchRow {
            name: format!("{label} gpu -> {kind}"),
            secs: down,
            bytes: n as u64,
            reference: reference(RAW_D2H, Some(target)),
        });
        if kind == HostMemKind::Pageable {
            let (up, down) = naive_pageable(&gpu, &g1, &src, &dst, reps)?;
            rows.push(BenchRow {
                name: "naive cuMemcpyHtoD pageable -> gpu".into(),
                secs: up,
                bytes: n as u64,
                reference: reference(RAW_H2D, None),
            });
            rows.push(BenchRow {
                name: "naive cuMemcpyDtoH gpu -> pageable".into(),
                secs: down,
                bytes: n as u64,
                reference: reference(RAW_D2H, None),
            });
        }
    }
    rows.insert(0, BenchRow { name: RAW_D2H.into(), secs: raw_down, bytes: n as u64, reference: None });
    rows.insert(0, BenchRow { name: RAW_H2D.into(), secs: raw_up, bytes: n as u64, reference: None });
    drop(raw);

    let d2d = time_copy(&matrix, &g1, &g2, reps)?;
    rows.push(BenchRow { name: "gpu -> gpu (same device)".into(), secs: d2d, bytes: n as u64, reference: None });
    drop(g2);

    if let Some(disk) = &config.disk {
        rows.extend(disk_rows(&matrix, &g1, disk.as_ref(), n, config.disk_reps.max(1))?);
    }
    Ok(BenchReport {
        gpu: gpu.info().clone(),
        staging: config.staging.clone(),
        rows,
        staged_disk: gpu.staged_disk_io(),
    })
}

/// The staged disk paths next to the disk's own read and write rates through
/// its `BlockIo` (disk to and from pinned memory), measured in the same run
/// and interleaved rep by rep, so that a disk whose speed drifts weighs on
/// both sides alike.
fn disk_rows(matrix: &CopyMatrix, g: &Tensor, disk: &dyn Device, n: usize, reps: usize) -> Result<Vec<BenchRow>> {
    let shape = Shape::new([n]);
    let host = HostDevice::new(HostConfig { kind: HostMemKind::Pinned, ..HostConfig::default() })?;
    let src = host.allocate(&shape, DType::U8)?;
    let back = host.allocate(&shape, DType::U8)?;
    fill_pattern(&src, 99)?;
    let d = disk.allocate(&shape, DType::U8)?;
    let timed = |a: &Tensor, b: &Tensor| -> Result<f64> {
        let t = Instant::now();
        matrix.copy(&a.view(), &b.view())?;
        Ok(t.elapsed().as_secs_f64())
    };
    // Warm-up, and the data checks.
    timed(&src, &d)?;
    timed(&d, &back)?;
    same_bytes(&src, &back, "pinned -> disk -> pinned")?;
    timed(&d, g)?;
    fill_pattern(&back, 0)?;
    timed(g, &d)?;
    timed(&d, &back)?;
    same_bytes(&src, &back, "disk -> gpu -> disk")?;
    let (mut write, mut read, mut up, mut down) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        write.push(timed(&src, &d)?);
        read.push(timed(&d, &back)?);
        up.push(timed(&d, g)?);
        down.push(timed(g, &d)?);
    }
    let b = n as u64;
    let r = |name: &str, target: Option<f64>| Some((name.to_string(), target));
    Ok(vec![
        BenchRow { name: DISK_READ.into(), secs: read, bytes: b, reference: None },
        BenchRow { name: DISK_WRITE.into(), secs: write, bytes: b, reference: None },
        BenchRow { name: "staged disk -> gpu".into(), secs: up, bytes: b, reference: r(DISK_READ, Some(0.90)) },
        BenchRow { name: "staged gpu -> disk".into(), secs: down, bytes: b, reference: r(DISK_WRITE, None) },
    ])
}

/// Staged disk reads with each number of reads in flight in `caps`, every
/// rep next to the disk's own read into pinned memory. Rows come in pairs:
/// "disk read [cap N]" and "staged disk -> gpu [N reads in flight]", the
/// second referring to the first with the 90% target.
pub fn disk_read_sweep(config: &BenchConfig, disk: &dyn Device, caps: &[usize]) -> Result<Vec<BenchRow>> {
    let n = config.bytes;
    let shape = Shape::new([n]);
    let host = HostDevice::new(HostConfig { kind: HostMemKind::Pinned, ..HostConfig::default() })?;
    let src = host.allocate(&shape, DType::U8)?;
    let back = host.allocate(&shape, DType::U8)?;
    fill_pattern(&src, 5)?;
    let d = disk.allocate(&shape, DType::U8)?;
    let matrix = copy_matrix(CopyConfig::default())?;
    matrix.copy(&src.view(), &d.view())?;
    let mut rows = Vec::new();
    for &cap in caps {
        let staging = StagingConfig { disk_reads: cap.min(config.staging.slots), ..config.staging.clone() };
        let gpu = GpuDevice::new(GpuConfig { ordinal: config.ordinal, staging, ..GpuConfig::default() })?;
        let g = gpu.allocate(&shape, DType::U8)?;
        matrix.copy(&d.view(), &g.view())?;
        let (mut own, mut staged) = (Vec::new(), Vec::new());
        for _ in 0..config.disk_reps.max(1) {
            let t = Instant::now();
            matrix.copy(&d.view(), &back.view())?;
            own.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            matrix.copy(&d.view(), &g.view())?;
            staged.push(t.elapsed().as_secs_f64());
        }
        let own_name = format!("disk read [cap {cap}]");
        rows.push(BenchRow { name: own_name.clone(), secs: own, bytes: n as u64, reference: None });
        rows.push(BenchRow {
            name: format!("staged disk -> gpu [{cap} reads in flight]"),
            secs: staged,
            bytes: n as u64,
            reference: Some((own_name, Some(0.90))),
        });
    }
    Ok(rows)
}

/// The pageable relay alone, both ways, for each staging shape in
/// `shapes`: rows named "relay pageable -> gpu [slots x MiB, helpers]".
pub fn relay_sweep(config: &BenchConfig, shapes: &[StagingConfig]) -> Result<Vec<BenchRow>> {
    let n = config.bytes;
    let shape = Shape::new([n]);
    let host = HostDevice::new(HostConfig::default())?;
    let src = host.allocate(&shape, DType::U8)?;
    let dst = host.allocate(&shape, DType::U8)?;
    fill_pattern(&src, 7)?;
    fill_pattern(&dst, 0)?;
    let matrix = copy_matrix(CopyConfig::default())?;
    let mut rows = Vec::new();
    for staging in shapes {
        let gpu =
            GpuDevice::new(GpuConfig { ordinal: config.ordinal, staging: staging.clone(), ..GpuConfig::default() })?;
        let g = gpu.allocate(&shape, DType::U8)?;
        let up = time_copy(&matrix, &src, &g, config.reps)?;
        let down = time_copy(&matrix, &g, &dst, config.reps)?;
        same_bytes(&src, &dst, "relay sweep")?;
        let tag = format!("[{} x {} MiB, {} helpers]", staging.slots, staging.slot_bytes >> 20, staging.helpers);
        rows.push(BenchRow {
            name: format!("relay pageable -> gpu {tag}"),
            secs: up,
            bytes: n as u64,
            reference: None,
        });
        rows.push(BenchRow {
            name: format!("relay gpu -> pageable {tag}"),
            secs: down,
            bytes: n as u64,
            reference: None,
        });
    }
    Ok(rows)
}

/// Seconds of `reps` copies of the whole of `src` into `dst`, after one
/// untimed warm-up.
pub fn time_copy(matrix: &CopyMatrix, src: &Tensor, dst: &Tensor, reps: usize) -> Result<Vec<f64>> {
    matrix.copy(&src.view(), &dst.view())?;
    let mut secs = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        matrix.copy(&src.view(), &dst.view())?;
        secs.push(t.elapsed().as_secs_f64());
    }
    Ok(secs)
}

/// Fills a host tensor with bytes from a seeded xorshift (never zeros).
pub fn fill_pattern(t: &Tensor, seed: u64) -> Result<()> {
    let Access::Host(span) = t.storage().access() else {
        return Err(Error::Config("fill_pattern needs a host tensor".into()));
    };
    // SAFETY: the caller owns the tensor and runs no copy into it meanwhile.
    let bytes = unsafe { span.slice_mut(0, span.len()) }.ok_or_else(|| Error::Config("empty span".into()))?;
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in bytes.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = x.to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    Ok(())
}

fn same_bytes(a: &Tensor, b: &Tensor, what: &str) -> Result<()> {
    let (Access::Host(x), Access::Host(y)) = (a.storage().access(), b.storage().access()) else {
        return Err(Error::Config("same_bytes compares host tensors".into()));
    };
    // SAFETY: no copy runs into either tensor while they are compared.
    let equal = unsafe { x.slice(0, x.len()) == y.slice(0, y.len()) };
    if equal {
        Ok(())
    } else {
        Err(Error::Config(format!("bench data check failed: {what} changed the bytes")))
    }
}

/// Memory from the driver, freed on drop, for the raw baselines.
struct RawHost(*mut c_void);

impl Drop for RawHost {
    fn drop(&mut self) {
        // SAFETY: from cuMemHostAlloc, freed once.
        let _ = unsafe { sys::cuMemFreeHost(self.0) };
    }
}

/// The raw baseline: synchronous `cuMemcpyHtoD` and `cuMemcpyDtoH` between
/// plain `cuMemHostAlloc` memory and the GPU, as a program would do it
/// without any tier.
pub struct RawPinned {
    host: RawHost,
    /// Owns the device memory `d` points into.
    _dev: Tensor,
    d: sys::CUdeviceptr,
    bytes: usize,
    tier: String,
}

impl RawPinned {
    pub fn new(gpu: &GpuDevice, bytes: usize) -> Result<Self> {
        let tier = format!("gpu:{}", gpu.ordinal());
        gpu.context().bind_to_thread().map_err(|e| driver_error(&tier, "cuCtxSetCurrent", e))?;
        // SAFETY: a context is current; the pointer is freed by RawHost.
        let host = unsafe { cudarc::driver::result::malloc_host(bytes, 0) }
            .map_err(|e| driver_error("host:pinned", "cuMemHostAlloc", e))?;
        let host = RawHost(host);
        // SAFETY: `bytes` bytes at host.0 belong to us.
        unsafe { std::ptr::write_bytes(host.0.cast::<u8>(), 0x5a, bytes) };
        let dev = gpu.allocate(&Shape::new([bytes]), DType::U8)?;
        let d = gpu.device_ptr(&dev)?;
        let raw = RawPinned { host, _dev: dev, d, bytes, tier };
        // Warm-up.
        raw.h2d()?;
        raw.d2h()?;
        Ok(raw)
    }

    /// Seconds of one host-to-GPU copy.
    pub fn h2d(&self) -> Result<f64> {
        let t = Instant::now();
        // SAFETY: both buffers hold `bytes` bytes and outlive the call.
        unsafe { sys::cuMemcpyHtoD_v2(self.d, self.host.0, self.bytes) }
            .result()
            .map_err(|e| driver_error(&self.tier, "cuMemcpyHtoD", e))?;
        Ok(t.elapsed().as_secs_f64())
    }

    /// Seconds of one GPU-to-host copy.
    pub fn d2h(&self) -> Result<f64> {
        let t = Instant::now();
        // SAFETY: as above.
        unsafe { sys::cuMemcpyDtoH_v2(self.host.0, self.d, self.bytes) }
            .result()
            .map_err(|e| driver_error(&self.tier, "cuMemcpyDtoH", e))?;
        Ok(t.elapsed().as_secs_f64())
    }
}

/// `reps` raw copies each way (see [`RawPinned`]).
pub fn raw_pinned(gpu: &GpuDevice, bytes: usize, reps: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let raw = RawPinned::new(gpu, bytes)?;
    let h2d = (0..reps).map(|_| raw.h2d()).collect::<Result<Vec<_>>>()?;
    let d2h = (0..reps).map(|_| raw.d2h()).collect::<Result<Vec<_>>>()?;
    Ok((h2d, d2h))
}

/// Synchronous `cuMemcpy` straight from and to pageable memory: what a
/// program gets without pinned memory or a relay.
fn naive_pageable(
    gpu: &GpuDevice,
    g: &Tensor,
    src: &Tensor,
    dst: &Tensor,
    reps: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let tier = format!("gpu:{}", gpu.ordinal());
    let d = gpu.device_ptr(g)?;
    let (Access::Host(s), Access::Host(t)) = (src.storage().access(), dst.storage().access()) else {
        return Err(Error::Config("naive copies need host tensors".into()));
    };
    let n = s.len().min(t.len()).min(g.byte_len());
    gpu.context().bind_to_thread().map_err(|e| driver_error(&tier, "cuCtxSetCurrent", e))?;
    let mut up = Vec::with_capacity(reps);
    let mut down = Vec::with_capacity(reps);
    for i in 0..=reps {
        let t0 = Instant::now();
        // SAFETY: both sides hold `n` bytes and outlive the synchronous call.
        unsafe { sys::cuMemcpyHtoD_v2(d, s.as_ptr() as *const c_void, n) }
            .result()
            .map_err(|e| driver_error(&tier, "cuMemcpyHtoD", e))?;
        if i > 0 {
            up.push(t0.elapsed().as_secs_f64());
        }
    }
    for i in 0..=reps {
        let t0 = Instant::now();
        // SAFETY: as above.
        unsafe { sys::cuMemcpyDtoH_v2(t.as_ptr() as *mut c_void, d, n) }
            .result()
            .map_err(|e| driver_error(&tier, "cuMemcpyDtoH", e))?;
        if i > 0 {
            down.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok((up, down))
}

/// What allocating pinned (or registered) memory cost the process.
#[derive(Clone, Debug)]
pub struct RssCheck {
    pub kind: HostMemKind,
    pub asked: u64,
    /// What the tier reports as resident.
    pub tier_resident: u64,
    /// VmRSS growth of this process (from /proc/self/status).
    pub rss_growth: u64,
    /// Growth of the machine's used memory (MemTotal - MemAvailable).
    pub system_growth: i64,
    /// VmRSS given back after freeing.
    pub rss_released: i64,
    pub alloc_secs: f64,
}

impl RssCheck {
    /// The growth bound: 4,150 MiB for 4,097 MiB asked, scaled.
    pub fn rss_bound(&self) -> u64 {
        self.asked + self.asked * 53 / 4097
    }

    /// Resident bytes as the tier reports them agree with the OS within 1%.
    pub fn agrees(&self) -> bool {
        let (a, b) = (self.tier_resident as f64, self.rss_growth as f64);
        a > 0.0 && (a - b).abs() / a <= 0.01
    }

    pub fn passes(&self) -> bool {
        self.rss_growth <= self.rss_bound() && self.agrees()
    }
}

impl fmt::Display for RssCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: f64| b / (1u64 << 20) as f64;
        write!(
            f,
            "{}: asked {:.0} MiB in {:.2} s; VmRSS grew {:.1} MiB (bound {:.0} MiB: {}); tier resident {:.1} MiB \
             (agrees within 1%: {}); machine used memory grew {:.1} MiB; freeing gave back {:.1} MiB of VmRSS",
            self.kind,
            mib(self.asked as f64),
            self.alloc_secs,
            mib(self.rss_growth as f64),
            mib(self.rss_bound() as f64),
            if self.rss_growth <= self.rss_bound() { "ok" } else { "MISS" },
            mib(self.tier_resident as f64),
            if self.agrees() { "ok" } else { "MISS" },
            mib(self.system_growth as f64),
            mib(self.rss_released as f64),
        )
    }
}

/// A `/proc` figure in kB, as bytes.
fn proc_kb(file: &str, key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::Config(format!("cannot read {file}: {e}")))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .ok_or_else(|| Error::Config(format!("no {key} in {file}")))
}

/// The process's resident set (VmRSS), in bytes.
pub fn vm_rss() -> Result<u64> {
    proc_kb("/proc/self/status", "VmRSS")
}

fn system_used() -> Result<u64> {
    Ok(proc_kb("/proc/meminfo", "MemTotal")?.saturating_sub(proc_kb("/proc/meminfo", "MemAvailable")?))
}

/// Allocates `bytes` of `kind` host memory and compares what the process
/// and the machine paid with what the tier reports. The target: 4,097 MiB
/// raise VmRSS by at most 4,150 MiB, and the tier's resident figure agrees
/// with VmRSS growth within 1%.
pub fn pinned_rss_check(kind: HostMemKind, bytes: usize) -> Result<RssCheck> {
    let host = HostDevice::new(HostConfig { kind, ..HostConfig::default() })?;
    let (rss0, sys0) = (vm_rss()?, system_used()?);
    let t = Instant::now();
    let tensor = host.allocate_bytes(bytes)?;
    let alloc_secs = t.elapsed().as_secs_f64();
    let (rss1, sys1) = (vm_rss()?, system_used()?);
    let tier_resident = host.stats().resident;
    drop(tensor);
    let rss2 = vm_rss()?;
    Ok(RssCheck {
        kind,
        asked: bytes as u64,
        tier_resident,
        rss_growth: rss1.saturating_sub(rss0),
        system_growth: sys1 as i64 - sys0 as i64,
        rss_released: rss1 as i64 - rss2 as i64,
        alloc_secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_figures_parse() {
        assert!(vm_rss().unwrap() > 0);
        assert!(system_used().unwrap() > 0);
    }

    #[test]
    fn rows_compute_rates_and_ratios() {
        let row = |name: &str, secs: Vec<f64>, reference| BenchRow {
            name: name.into(),
            secs,
            bytes: 1_000_000_000,
            reference,
        };
        let report = BenchReport {
            gpu: GpuInfo {
                ordinal: 0,
                name: "test".into(),
                total_mem: 1,
                compute_capability: (9, 0),
                driver_version: 13000,
                device_count: 1,
            },
            staging: StagingConfig::default(),
            rows: vec![
                row(RAW_H2D, vec![0.02, 0.025, 0.03], None),
                row("dma", vec![0.021, 0.02, 0.05], Some((RAW_H2D.into(), Some(0.95)))),
                row("relay", vec![0.05], Some((RAW_H2D.into(), Some(0.6)))),
            ],
            staged_disk: vec!["disk:0: slots are io_uring fixed buffers (...)".into()],
        };
        assert!((report.rows[0].gbps() - 40.0).abs() < 1e-9);
        assert!((report.rows[0].best_gbps() - 50.0).abs() < 1e-9);
        let misses = report.misses();
        assert_eq!(misses.len(), 1, "{misses:?}");
        assert!(misses[0].starts_with("relay"));
        assert!(report.to_string().contains("MISS"));
        assert!(report.to_string().contains("staged disk I/O: disk:0: slots are io_uring fixed buffers"));
        let check = RssCheck {
            kind: HostMemKind::Pinned,
            asked: 4097 << 20,
            tier_resident: 4097 << 20,
            rss_growth: (4097 << 20) + (1 << 20),
            system_growth: 0,
            rss_released: 0,
            alloc_secs: 0.0,
        };
        assert_eq!(check.rss_bound(), 4150 << 20);
        assert!(check.passes(), "{check}");
    }
}
