//! GPU tests: every pair of tiers involving the GPU, random views, concurrent
//! copies, budgets and failures. Each test checks for a driver and a device
//! first and otherwise prints "skipped: no CUDA driver" and passes, so CI
//! without a GPU runs them as no-ops.

use proptest::prelude::*;
use std::sync::{Arc, OnceLock};
use tier_api::{
    Access, BlockIo, CopyConfig, CopyMatrix, CopyPath, DType, Device, DeviceKind, Error, HostMemKind, IoOp, MemAccount,
    Reservation, Result, Shape, Storage, Tensor, TensorView,
};
use tier_cuda::{GpuConfig, GpuDevice, StagingConfig};
use tier_disk::{DiskConfig, DiskDevice};
use tier_host::{HostConfig, HostDevice, RegisteredFile};

/// Everything a test needs, made once per test binary.
struct Rig {
    /// Small staging slots, so that modest tensors cross many of them.
    gpu: Arc<GpuDevice>,
    /// Default staging (16 MiB slots).
    gpu_big: Arc<GpuDevice>,
    pinned: Arc<HostDevice>,
    registered: Arc<HostDevice>,
    pageable: Arc<HostDevice>,
    disk: Arc<DiskDevice>,
    matrix: CopyMatrix,
}

fn rig() -> Option<&'static Rig> {
    static RIG: OnceLock<Option<Rig>> = OnceLock::new();
    RIG.get_or_init(|| {
        // SAFETY: only tries to load the library.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return None;
        }
        match tier_cuda::probe() {
            Ok(Some(_)) => {}
            Ok(None) => return None,
            Err(e) => panic!("a CUDA driver is present but unusable: {e}"),
        }
        let small = StagingConfig { slots: 4, slot_bytes: 64 << 10, helpers: 3, max_read_gap: 4096, disk_reads: 2 };
        let gpu = GpuDevice::new(GpuConfig { staging: small, streams: 6, ..GpuConfig::default() }).expect("gpu");
        let gpu_big = GpuDevice::new(GpuConfig::default()).expect("gpu");
        let host = |kind| HostDevice::new(HostConfig { kind, ..HostConfig::default() }).expect("host device");
        let disk = DiskDevice::new(DiskConfig::new(std::env::temp_dir())).expect("disk tier");
        Some(Rig {
            gpu,
            gpu_big,
            pinned: host(HostMemKind::Pinned),
            registered: host(HostMemKind::Registered),
            pageable: host(HostMemKind::Pageable),
            disk,
            matrix: tier_cuda::copy_matrix(CopyConfig { workers: 4, queue_capacity: 64 }).expect("matrix"),
        })
    })
    .as_ref()
}

macro_rules! rig_or_skip {
    () => {
        match rig() {
            Some(r) => r,
            None => {
                println!("skipped: no CUDA driver");
                return;
            }
        }
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tier {
    Gpu,
    Pinned,
    Registered,
    Pageable,
    Disk,
}

const TIERS: [Tier; 5] = [Tier::Gpu, Tier::Pinned, Tier::Registered, Tier::Pageable, Tier::Disk];

impl Rig {
    fn device(&self, t: Tier) -> &dyn Device {
        match t {
            Tier::Gpu => self.gpu.as_ref(),
            Tier::Pinned => self.pinned.as_ref(),
            Tier::Registered => self.registered.as_ref(),
            Tier::Pageable => self.pageable.as_ref(),
            Tier::Disk => self.disk.as_ref(),
        }
    }

    /// A tensor on `t` holding `bytes` (written through the matrix for the GPU).
    fn tensor_with(&self, t: Tier, shape: &Shape, dtype: DType, bytes: &[u8]) -> Tensor {
        let dev = self.device(t);
        let tensor = dev.allocate(shape, dtype).expect("allocate");
        if t == Tier::Gpu {
            let staging = self.pageable.allocate(shape, dtype).expect("allocate");
            staging.write_bytes(0, bytes).expect("write");
            self.matrix.copy(&staging.view(), &tensor.view()).expect("upload");
        } else {
            tensor.write_bytes(0, bytes).expect("write");
        }
        tensor
    }

    /// All bytes of any tensor (through the matrix for the GPU).
    fn bytes_of(&self, t: &Tensor) -> Vec<u8> {
        if t.device().is_gpu() {
            let host = self.pageable.allocate(t.shape(), t.dtype()).expect("allocate");
            self.matrix.copy(&t.view(), &host.view()).expect("download");
            host.to_bytes().expect("read")
        } else {
            t.to_bytes().expect("read")
        }
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[test]
fn probe_reports_the_gpu() {
    let rig = rig_or_skip!();
    let info = rig.gpu.info();
    assert!(info.total_mem > 0);
    assert!(tier_cuda::probe_message().contains(&info.name));
    assert_eq!(rig.gpu.kind(), DeviceKind::Gpu { ordinal: 0 });
}

#[test]
fn every_pair_of_tiers_with_the_gpu_moves_bytes_unchanged() {
    let rig = rig_or_skip!();
    for (len, gpu) in [(1_000_003usize, &rig.gpu), (40 << 20, &rig.gpu_big)] {
        let shape = Shape::new([len]);
        for (i, &s) in TIERS.iter().enumerate() {
            for &d in &TIERS {
                if s != Tier::Gpu && d != Tier::Gpu {
                    continue;
                }
                let data = pattern(len, (i * 10 + len) as u64);
                let src = if s == Tier::Gpu {
                    let t = gpu.allocate(&shape, DType::U8).unwrap();
                    let up = rig.pageable.allocate(&shape, DType::U8).unwrap();
                    up.write_bytes(0, &data).unwrap();
                    rig.matrix.copy(&up.view(), &t.view()).unwrap();
                    t
                } else {
                    rig.tensor_with(s, &shape, DType::U8, &data)
                };
                let dst = if d == Tier::Gpu {
                    gpu.allocate(&shape, DType::U8).unwrap()
                } else {
                    rig.device(d).allocate(&shape, DType::U8).unwrap()
                };
                let report =
                    rig.matrix.copy(&src.view(), &dst.view()).unwrap_or_else(|e| panic!("{s:?} -> {d:?}: {e}"));
                let expect_path = match (s, d) {
                    (Tier::Gpu, Tier::Gpu) => CopyPath::DeviceToDevice,
                    (Tier::Pinned | Tier::Registered, _) | (_, Tier::Pinned | Tier::Registered) => CopyPath::Dma,
                    (Tier::Pageable, _) | (_, Tier::Pageable) => CopyPath::PinnedRelay,
                    _ => CopyPath::StagedDisk,
                };
                assert_eq!(report.paths, vec![expect_path], "{s:?} -> {d:?}");
                assert!(rig.bytes_of(&dst) == data, "{s:?} -> {d:?} ({len} bytes) changed the bytes");
            }
        }
    }
}

/// Views with the same shape in two differently padded tensors.
#[derive(Clone, Debug)]
struct ViewCase {
    dims: Vec<usize>,
    src_pad: Vec<(usize, usize)>,
    dst_pad: Vec<(usize, usize)>,
    dtype: DType,
    src: Tier,
    dst: Tier,
    seed: u64,
}

fn view_case() -> impl Strategy<Value = ViewCase> {
    let pads = |rank| prop::collection::vec((0usize..4, 0usize..4), rank);
    (1usize..=4)
        .prop_flat_map(move |rank| {
            (
                prop::collection::vec(1usize..24, rank),
                pads(rank),
                pads(rank),
                prop::sample::select(DType::ALL.to_vec()),
                prop::sample::select(TIERS.to_vec()),
                prop::sample::select(TIERS.to_vec()),
                any::<bool>(),
                any::<u64>(),
            )
        })
        .prop_map(|(dims, src_pad, dst_pad, dtype, a, b, gpu_first, seed)| {
            // At least one side on the GPU.
            let (src, dst) = if a == Tier::Gpu || b == Tier::Gpu {
                (a, b)
            } else if gpu_first {
                (Tier::Gpu, b)
            } else {
                (a, Tier::Gpu)
            };
            ViewCase { dims, src_pad, dst_pad, dtype, src, dst, seed }
        })
}

fn padded_view(t: &Tensor, dims: &[usize], pad: &[(usize, usize)]) -> TensorView {
    let mut v = t.view();
    for (i, (&d, &(before, _))) in dims.iter().zip(pad).enumerate() {
        v = v.narrow(i, before, d).expect("view");
    }
    v
}

fn check_view_copy(rig: &Rig, c: &ViewCase) -> std::result::Result<(), TestCaseError> {
    let full =
        |pad: &[(usize, usize)]| Shape::new(c.dims.iter().zip(pad).map(|(&d, &(a, b))| d + a + b).collect::<Vec<_>>());
    let (ss, ds) = (full(&c.src_pad), full(&c.dst_pad));
    let (sb, db) = (ss.byte_size(c.dtype).unwrap(), ds.byte_size(c.dtype).unwrap());
    let (sdata, ddata) = (pattern(sb, c.seed), pattern(db, c.seed ^ 0xabcdef));
    let src = rig.tensor_with(c.src, &ss, c.dtype, &sdata);
    let dst = rig.tensor_with(c.dst, &ds, c.dtype, &ddata);
    // The expected result, by the host memcpy route on pageable copies.
    let hs = rig.tensor_with(Tier::Pageable, &ss, c.dtype, &sdata);
    let hd = rig.tensor_with(Tier::Pageable, &ds, c.dtype, &ddata);
    rig.matrix
        .copy(&padded_view(&hs, &c.dims, &c.src_pad), &padded_view(&hd, &c.dims, &c.dst_pad))
        .expect("reference copy");
    let sv = padded_view(&src, &c.dims, &c.src_pad);
    let dv = padded_view(&dst, &c.dims, &c.dst_pad);
    rig.matrix.copy(&sv, &dv).map_err(|e| TestCaseError::fail(format!("{c:?}: {e}")))?;
    prop_assert!(rig.bytes_of(&dst) == hd.to_bytes().unwrap(), "{:?}: bytes differ", c);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_views_between_tiers_arrive_unchanged(c in view_case()) {
        let Some(rig) = rig() else {
            println!("skipped: no CUDA driver");
            return Ok(());
        };
        check_view_copy(rig, &c)?;
    }
}

#[test]
fn strided_views_with_large_rows_use_every_path() {
    let rig = rig_or_skip!();
    // Rows of 24 KiB, two of every four blocks: 2D copies, and pieces
    // split across the small staging slots.
    for &other in &[Tier::Pinned, Tier::Registered, Tier::Pageable, Tier::Disk, Tier::Gpu] {
        for (s, d) in [(other, Tier::Gpu), (Tier::Gpu, other)] {
            let c = ViewCase {
                dims: vec![8, 2, 12288],
                src_pad: vec![(0, 0), (1, 1), (0, 0)],
                dst_pad: vec![(0, 0), (0, 2), (0, 0)],
                dtype: DType::F16,
                src: s,
                dst: d,
                seed: 5,
            };
            check_view_copy(rig, &c).unwrap_or_else(|e| panic!("{s:?} -> {d:?}: {e}"));
        }
    }
}

#[test]
fn concurrent_copies_into_disjoint_views() {
    let rig = rig_or_skip!();
    let (rows, cols) = (48usize, 3000usize);
    let shape = Shape::new([rows, cols]);
    let gpu_t = rig.gpu.allocate(&shape, DType::F32).unwrap();
    let bytes = shape.byte_size(DType::F32).unwrap();
    let data = pattern(bytes, 11);
    let sources: Vec<Tensor> = [Tier::Pinned, Tier::Registered, Tier::Pageable, Tier::Disk]
        .iter()
        .map(|&t| rig.tensor_with(t, &shape, DType::F32, &data))
        .collect();
    // Rows from alternating tiers, all in flight at once.
    let mut handle = tier_api::CopyHandle::empty();
    for r in 0..rows {
        let src = sources[r % sources.len()].narrow(0, r, 1).unwrap();
        handle = handle.join(rig.matrix.submit(src, gpu_t.narrow(0, r, 1).unwrap()).unwrap());
    }
    handle.wait().unwrap();
    assert!(rig.bytes_of(&gpu_t) == data, "rows arrived unchanged");
    // Column blocks (strided) back out to different tiers at once.
    let outs: Vec<Tensor> = [Tier::Pinned, Tier::Registered, Tier::Pageable, Tier::Disk]
        .iter()
        .map(|&t| rig.device(t).allocate(&shape, DType::F32).unwrap())
        .collect();
    let blocks = 12;
    let width = cols / blocks;
    let mut handle = tier_api::CopyHandle::empty();
    for out in &outs {
        for b in 0..blocks {
            let v = gpu_t.narrow(1, b * width, width).unwrap();
            handle = handle.join(rig.matrix.submit(v, out.narrow(1, b * width, width).unwrap()).unwrap());
        }
    }
    handle.wait().unwrap();
    for out in &outs {
        assert!(out.to_bytes().unwrap() == data, "{}: column blocks arrived unchanged", out.device());
    }
}

#[test]
fn gpu_budget_refuses_with_out_of_memory() {
    let _rig = rig_or_skip!();
    let gpu = GpuDevice::new(GpuConfig { budget: Some(16 << 20), ..GpuConfig::default() }).unwrap();
    let a = gpu.allocate(&Shape::new([6 << 20]), DType::U8).unwrap();
    let s = gpu.stats();
    assert_eq!((s.asked, s.resident), (6 << 20, 6 << 20));
    match gpu.allocate(&Shape::new([6 << 20]), DType::F16) {
        Err(Error::OutOfMemory { tier, asked, budget, .. }) => {
            assert_eq!(tier, "gpu:0");
            assert_eq!(asked, 12 << 20);
            assert_eq!(budget, 16 << 20);
        }
        other => panic!("expected out of memory, got {other:?}"),
    }
    drop(a);
    assert_eq!(gpu.stats().resident, 0);
    // More than the card has: the driver's refusal is out of memory too.
    let huge = GpuDevice::new(GpuConfig::default()).unwrap();
    match huge.allocate(&Shape::new([1usize << 50]), DType::U8) {
        Err(Error::OutOfMemory { tier, .. }) => assert_eq!(tier, "gpu:0"),
        other => panic!("expected out of memory from the driver, got {other:?}"),
    }
    assert_eq!(huge.stats().resident, 0, "a refused allocation is not accounted");
}

#[test]
fn gpu_memory_accounting_matches_the_driver_for_large_allocations() {
    let rig = rig_or_skip!();
    let (free0, _) = rig.gpu_big.mem_info().unwrap();
    let t = rig.gpu_big.allocate(&Shape::new([512 << 20]), DType::U8).unwrap();
    let (free1, _) = rig.gpu_big.mem_info().unwrap();
    let used = free0.saturating_sub(free1);
    let resident = 512u64 << 20;
    let diff = used.abs_diff(resident);
    assert!(diff <= 4 << 20, "driver used {used} bytes for a {resident}-byte allocation");
    drop(t);
}

#[test]
fn staging_ring_is_pinned_exactly() {
    let rig = rig_or_skip!();
    let shape = Shape::new([100_000]);
    let src = rig.tensor_with(Tier::Pageable, &shape, DType::U8, &pattern(100_000, 3));
    let dst = rig.gpu.allocate(&shape, DType::U8).unwrap();
    rig.matrix.copy(&src.view(), &dst.view()).unwrap();
    let s = rig.gpu.staging_stats().expect("the ring exists after a relay");
    let cfg = rig.gpu.staging_config();
    assert_eq!(s.asked, cfg.pinned_bytes());
    assert_eq!(s.resident, cfg.pinned_bytes());
    assert_eq!(s.allocations, cfg.slots as u64);
}

#[test]
fn registered_files_go_to_the_gpu_and_refuse_writes() {
    let rig = rig_or_skip!();
    let path = std::env::temp_dir().join(format!("tier-cuda-weights-{}.bin", std::process::id()));
    let data = pattern(3 << 20, 17);
    std::fs::write(&path, &data).unwrap();
    let account = MemAccount::new("host:registered", None);
    let file = RegisteredFile::open(&path, &account).unwrap();
    let t = file.tensor(8, &Shape::new([1 << 20]), DType::F16).unwrap();
    let g = rig.gpu.allocate(&Shape::new([1 << 20]), DType::F16).unwrap();
    let report = rig.matrix.copy(&t.view(), &g.view()).unwrap();
    assert_eq!(report.paths, vec![CopyPath::Dma]);
    assert!(rig.bytes_of(&g) == data[8..8 + (2 << 20)]);
    assert!(matches!(rig.matrix.copy(&g.view(), &t.view()), Err(Error::Unsupported { .. })), "read-only destination");
    drop((t, file));
    assert_eq!(account.stats().resident, 0);
    std::fs::remove_file(&path).unwrap();
}

/// A disk whose I/O fails at and after one offset.
struct BrokenIo {
    fail_from: u64,
}

impl BlockIo for BrokenIo {
    fn tier(&self) -> String {
        "disk:9".into()
    }
    fn backend(&self) -> String {
        "broken".into()
    }
    fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        if offset + dst.len() as u64 > self.fail_from {
            return Err(Error::Io {
                op: IoOp::Read,
                tier: self.tier(),
                offset,
                len: dst.len() as u64,
                source: std::io::Error::other("injected"),
            });
        }
        dst.fill(1);
        Ok(())
    }
    fn write_at(&self, offset: u64, src: &[u8]) -> Result<()> {
        if offset + src.len() as u64 > self.fail_from {
            return Err(Error::Io {
                op: IoOp::Write,
                tier: self.tier(),
                offset,
                len: src.len() as u64,
                source: std::io::Error::other("injected"),
            });
        }
        Ok(())
    }
}

#[derive(Debug)]
struct BrokenStorage {
    len: usize,
    io: BrokenIo,
    _r: Option<Reservation>,
}

impl std::fmt::Debug for BrokenIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BrokenIo")
    }
}

impl Storage for BrokenStorage {
    fn device(&self) -> DeviceKind {
        DeviceKind::Disk { id: 9 }
    }
    fn len(&self) -> usize {
        self.len
    }
    fn access(&self) -> Access<'_> {
        Access::Block { io: &self.io, base: 0 }
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[test]
fn a_failing_disk_surfaces_to_whoever_waits() {
    let rig = rig_or_skip!();
    let len = 1 << 20;
    let shape = Shape::new([len]);
    let broken = Tensor::from_storage(
        Arc::new(BrokenStorage { len, io: BrokenIo { fail_from: 700_000 }, _r: None }),
        shape.clone(),
        DType::U8,
    )
    .unwrap();
    for gpu in [&rig.gpu, &rig.gpu_big] {
        let g = gpu.allocate(&shape, DType::U8).unwrap();
        let err = rig.matrix.submit(broken.view(), g.view()).unwrap().wait().unwrap_err();
        assert!(matches!(err, Error::Io { op: IoOp::Read, .. }), "{err}");
        let err = rig.matrix.submit(g.view(), broken.view()).unwrap().wait().unwrap_err();
        assert!(matches!(err, Error::Io { op: IoOp::Write, .. }), "{err}");
        // The GPU and its staging ring still work afterwards.
        let data = pattern(len, 23);
        let ok = rig.tensor_with(Tier::Pageable, &shape, DType::U8, &data);
        rig.matrix.copy(&ok.view(), &g.view()).unwrap();
        assert!(rig.bytes_of(&g) == data);
    }
}

#[test]
fn gpu_tensors_refuse_synchronous_host_access() {
    let rig = rig_or_skip!();
    let g = rig.gpu.allocate(&Shape::new([16]), DType::U8).unwrap();
    assert!(matches!(g.write_bytes(0, &[1]), Err(Error::Unsupported { .. })));
    assert!(matches!(g.storage().access(), Access::Opaque));
    assert_ne!(rig.gpu.device_ptr(&g).unwrap(), 0);
    let host = rig.pageable.allocate(&Shape::new([16]), DType::U8).unwrap();
    assert!(rig.gpu.device_ptr(&host).is_err());
    let empty = rig.gpu.allocate(&Shape::new([0]), DType::U8).unwrap();
    let host_empty = rig.pageable.allocate(&Shape::new([0]), DType::U8).unwrap();
    rig.matrix.copy(&host_empty.view(), &empty.view()).unwrap();
}

/// Operations a `staged_disk_io` line reports ("...; 12 ops)").
fn ops_in(line: &str) -> u64 {
    line.rsplit("; ").next().and_then(|s| s.strip_suffix(" ops)")).and_then(|n| n.parse().ok()).unwrap_or(0)
}

#[test]
fn staged_disk_copies_use_the_slots_as_fixed_buffers() {
    let rig = rig_or_skip!();
    // A fresh ring and disks, so that the lines below are these copies' alone.
    let small = StagingConfig { slots: 4, slot_bytes: 256 << 10, helpers: 3, max_read_gap: 4096, disk_reads: 2 };
    let gpu = GpuDevice::new(GpuConfig { staging: small, ..GpuConfig::default() }).expect("gpu");
    let uring = DiskDevice::new(DiskConfig::new(std::env::temp_dir())).expect("disk tier");
    let threads = DiskDevice::new(DiskConfig {
        id: 1,
        backend: tier_disk::BackendChoice::Threads,
        ..DiskConfig::new(std::env::temp_dir())
    })
    .expect("disk tier");
    let len = 3 << 20;
    let shape = Shape::new([len]);
    let data = pattern(len, 41);
    for disk in [&uring, &threads] {
        let d = disk.allocate(&shape, DType::U8).unwrap();
        d.write_bytes(0, &data).unwrap();
        let g = gpu.allocate(&shape, DType::U8).unwrap();
        assert_eq!(rig.matrix.copy(&d.view(), &g.view()).unwrap().paths, vec![CopyPath::StagedDisk]);
        assert!(rig.bytes_of(&g) == data);
        let back = disk.allocate(&shape, DType::U8).unwrap();
        rig.matrix.copy(&g.view(), &back.view()).unwrap();
        assert!(back.to_bytes().unwrap() == data);
    }
    let lines = gpu.staged_disk_io();
    println!("{lines:#?}");
    assert_eq!(lines.len(), 2, "{lines:?}");
    let (fixed, plain) = (&lines[0], &lines[1]);
    if uring.backend().starts_with("io_uring") {
        assert!(
            fixed.starts_with("disk:0: slots are io_uring fixed buffers (4 spans (1 MiB) as 4 fixed buffers"),
            "the kernel should take cuMemHostAlloc memory as fixed buffers: {fixed}"
        );
        // 3 MiB each way in 256 KiB slots, at least one operation per slot load.
        assert!(ops_in(fixed) >= 24, "{fixed}");
    } else {
        assert!(fixed.contains("plain reads and writes"), "{fixed}");
    }
    assert_eq!(plain, "disk:1: plain reads and writes (the disk backend cannot register memory)");
    assert!(gpu.describe().contains("staged disk I/O: disk:0: "), "{}", gpu.describe());
    // The ring goes (registrations first), then the disks: nothing is left behind.
    drop(gpu);
    drop((uring, threads));
}

#[test]
fn a_staged_disk_read_keeps_a_slot_of_operations_in_flight() {
    let _rig = rig_or_skip!();
    // Slots of 1 MiB over a disk of 64 KiB chunks at depth 32: each slot's
    // read is one request of 16 operations at once (issue 14: the disk's
    // queue must not drain to one operation at a time), counted by the
    // disk's trace, not timed.
    let small = StagingConfig { slots: 4, slot_bytes: 1 << 20, helpers: 3, max_read_gap: 4096, disk_reads: 2 };
    let gpu = GpuDevice::new(GpuConfig { staging: small, ..GpuConfig::default() }).expect("gpu");
    let chunk = 64 << 10;
    let disk =
        DiskDevice::new(DiskConfig { chunk_size: chunk, queue_depth: 32, ..DiskConfig::new(std::env::temp_dir()) })
            .expect("disk tier");
    let matrix = tier_cuda::copy_matrix(CopyConfig { workers: 2, queue_capacity: 8 }).expect("matrix");
    let len = 8 << 20;
    let shape = Shape::new([len]);
    let d = disk.allocate(&shape, DType::U8).unwrap();
    d.write_bytes(0, &pattern(len, 43)).unwrap();
    let g = gpu.allocate(&shape, DType::U8).unwrap();
    let before = disk.activity().snapshot();
    disk.activity().take_peak();
    assert_eq!(matrix.copy(&d.view(), &g.view()).unwrap().paths, vec![CopyPath::StagedDisk]);
    let peak = disk.activity().take_peak();
    let w = disk.activity().snapshot().since(&before);
    assert_eq!((w.bytes_read, w.ops), (len as u64, (len / chunk) as u64), "{w}");
    assert!(peak >= (1 << 20) / chunk, "a slot's read keeps its 16 operations in flight at once: peak {peak}");
}
