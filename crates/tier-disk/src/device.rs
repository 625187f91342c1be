//! The disk device and its tensors' storage.

use crate::arena::{Alignment, Arena};
use crate::config::{human, DiskConfig};
use crate::fault::FaultPlan;
use std::any::Any;
use std::path::Path;
use std::sync::Arc;
use tier_api::{Access, BlockIo, DType, Device, DeviceKind, MemAccount, Reservation, Result, Shape, Storage, Tensor};

/// A disk tier: tensors are extents of one unlinked arena file in the
/// offload directory, reached by positioned I/O ([`Access::Block`]).
pub struct DiskDevice {
    id: u32,
    config: DiskConfig,
    arena: Arc<Arena>,
    account: Arc<MemAccount>,
}

impl DiskDevice {
    /// Creates the arena in `config.dir` and sets up the backend. In a
    /// debug build (or one with `fault-injection`), the faults `TIERLM_DISK_FAULTS` names are injected
    /// ([`crate::fault::FAULTS_ENV`]: end-to-end fault tests of the binary).
    pub fn new(config: DiskConfig) -> Result<Arc<Self>> {
        Self::build(config, crate::fault::plan_from_env()?)
    }

    /// Like [`new`](Self::new), with the chosen backend wrapped in a fault
    /// injector (see [`crate::fault`]). The backend's self-test at creation
    /// runs before the wrapper, so faults count only later operations.
    pub fn with_faults(config: DiskConfig, plan: Arc<FaultPlan>) -> Result<Arc<Self>> {
        Self::build(config, Some(plan))
    }

    fn build(config: DiskConfig, faults: Option<Arc<FaultPlan>>) -> Result<Arc<Self>> {
        let arena = Arc::new(Arena::create(&config, faults)?);
        let account = MemAccount::new(arena.tier_name(), config.budget);
        Ok(Arc::new(DiskDevice { id: config.id, config, arena, account }))
    }

    pub fn config(&self) -> &DiskConfig {
        &self.config
    }

    pub fn dir(&self) -> &Path {
        self.arena.dir()
    }

    /// Whether the arena is open with O_DIRECT (false where the filesystem
    /// refused it, as tmpfs does).
    pub fn direct_io(&self) -> bool {
        self.arena.direct()
    }

    /// The backend serving requests, and why it was chosen.
    pub fn backend(&self) -> String {
        self.arena.backend()
    }

    pub fn alignment(&self) -> Alignment {
        self.arena.alignment().clone()
    }

    /// The arena as positioned I/O, at arena offsets (a tensor's bytes start
    /// at its storage's [`DiskStorage::offset`]).
    pub fn block_io(&self) -> Arc<dyn BlockIo> {
        Arc::clone(&self.arena) as Arc<dyn BlockIo>
    }

    /// The operations this disk has in flight and has done, over every
    /// request at once: how busy it is kept and at what depth (issue 14's
    /// evidence; tests read its peak as a trace hook).
    pub fn activity(&self) -> &crate::IoActivity {
        self.arena.activity()
    }

    /// The arena file's length in bytes.
    pub fn arena_len(&self) -> u64 {
        self.arena.file_len()
    }

    /// Bytes of disk the arena really occupies (freed extents are punched out).
    pub fn disk_usage(&self) -> Result<u64> {
        self.arena.disk_usage()
    }

    /// Free extents inside the arena: how many, and their bytes.
    pub fn free_extents(&self) -> (usize, u64) {
        self.arena.free_extents()
    }

    /// The host memory this tier holds for its I/O: the staging (bounce)
    /// buffers of each session made so far, `staging_buffers ×
    /// chunk_size` a session (rounded to pages), reserved whole (pinned
    /// where io_uring registers them). Not part of [`Device::account`],
    /// which counts bytes on disk.
    pub fn host_account(&self) -> &Arc<MemAccount> {
        self.arena.host_account()
    }

    /// Bytes kept out of reuse because punching them out failed.
    pub fn leaked_bytes(&self) -> u64 {
        self.arena.leaked()
    }

    /// Allocates `len` bytes as a `u8` tensor.
    pub fn allocate_bytes(&self, len: usize) -> Result<Tensor> {
        self.allocate(&Shape::new([len]), DType::U8)
    }
}

impl Device for DiskDevice {
    fn kind(&self) -> DeviceKind {
        DeviceKind::Disk { id: self.id }
    }

    fn describe(&self) -> String {
        let a = self.arena.alignment();
        let budget = self.config.budget.map(|b| format!(", budget {b} bytes")).unwrap_or_default();
        format!(
            "{}: arena in {} ({}; {}; extents of {}), {}{budget}",
            self.kind(),
            self.arena.dir().display(),
            self.arena.io_mode(),
            a.source,
            human(a.extent as usize),
            self.arena.backend(),
        )
    }

    fn allocate(&self, shape: &Shape, dtype: DType) -> Result<Tensor> {
        let len = shape.byte_size(dtype)?;
        let align = self.arena.alignment().extent;
        let extent = (len as u64)
            .div_ceil(align)
            .checked_mul(align)
            .ok_or(tier_api::Error::SizeOverflow { shape: shape.clone(), dtype: Some(dtype) })?;
        let reservation = self.account.reserve(len as u64, extent)?;
        let offset = if extent == 0 { 0 } else { self.arena.allocate(extent)? };
        let storage = DiskStorage { arena: Arc::clone(&self.arena), offset, extent, len, _reservation: reservation };
        Tensor::from_storage(Arc::new(storage), shape.clone(), dtype)
    }

    fn account(&self) -> &Arc<MemAccount> {
        &self.account
    }
}

/// One tensor's extent of the arena. Dropping it punches the extent out and
/// returns it to the free list.
pub struct DiskStorage {
    arena: Arc<Arena>,
    offset: u64,
    extent: u64,
    len: usize,
    _reservation: Reservation,
}

impl DiskStorage {
    /// Where the tensor's bytes start in the arena.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The extent's length (the tensor's bytes rounded up to the extent alignment).
    pub fn extent_len(&self) -> u64 {
        self.extent
    }
}

impl std::fmt::Debug for DiskStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskStorage")
            .field("tier", &self.arena.tier_name())
            .field("offset", &self.offset)
            .field("extent", &self.extent)
            .field("len", &self.len)
            .finish()
    }
}

impl Storage for DiskStorage {
    fn device(&self) -> DeviceKind {
        // The tier name is "disk:{id}", and the arena keeps the id's device.
        DeviceKind::Disk { id: self.arena_id() }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn access(&self) -> Access<'_> {
        Access::Block { io: &*self.arena, base: self.offset }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl DiskStorage {
    fn arena_id(&self) -> u32 {
        self.arena.id()
    }
}

impl Drop for DiskStorage {
    fn drop(&mut self) {
        self.arena.release(self.offset, self.extent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendChoice;
    use crate::sys::AlignedBuf;
    use tier_api::{Error, IoOp};

    /// A small deterministic generator (xorshift64).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn fill(&mut self, buf: &mut [u8]) {
            for b in buf {
                *b = self.next() as u8;
            }
        }
    }

    const BACKENDS: [BackendChoice; 2] = [BackendChoice::IoUring, BackendChoice::Threads];

    fn config(dir: &Path, backend: BackendChoice) -> DiskConfig {
        // Small chunks so that modest requests span many chunks in flight.
        DiskConfig { backend, chunk_size: 16 << 10, queue_depth: 8, ..DiskConfig::new(dir) }
    }

    fn device(dir: &Path, backend: BackendChoice) -> Arc<DiskDevice> {
        DiskDevice::new(config(dir, backend)).expect("a disk device")
    }

    /// Fills a tensor with random bytes; returns them.
    fn fill(t: &Tensor, rng: &mut Rng) -> Vec<u8> {
        let mut data = vec![0u8; t.byte_len()];
        rng.fill(&mut data);
        t.write_bytes(0, &data).unwrap();
        data
    }

    #[test]
    fn arena_file_is_unlinked_and_direct() {
        let dir = crate::test_dir();
        for b in BACKENDS {
            let d = device(dir.path(), b);
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing is left in the directory");
            assert!(d.direct_io(), "{}", d.describe());
            let desc = d.describe();
            assert!(desc.starts_with("disk:0: arena in") && desc.contains("O_DIRECT"), "{desc}");
            match b {
                BackendChoice::IoUring => assert!(
                    d.backend().starts_with("io_uring (O_DIRECT, depth 8, 16 KiB chunks, fixed buffers)"),
                    "{}",
                    d.backend()
                ),
                _ => assert!(d.backend().starts_with("pread/pwrite threads (O_DIRECT"), "{}", d.backend()),
            }
            let a = d.alignment();
            assert!(a.extent >= 4096 && a.extent.is_multiple_of(a.offset), "{a:?}");
        }
    }

    #[test]
    fn new_tensors_read_as_zeros_even_in_reused_extents() {
        let dir = crate::test_dir();
        let d = device(dir.path(), BackendChoice::Auto);
        let mut rng = Rng(7);
        let t = d.allocate_bytes(100_000).unwrap();
        fill(&t, &mut rng);
        let off = t.storage().as_any().downcast_ref::<DiskStorage>().unwrap().offset();
        let keep = d.allocate_bytes(4096).unwrap();
        drop(t);
        let t = d.allocate_bytes(90_000).unwrap();
        assert_eq!(t.storage().as_any().downcast_ref::<DiskStorage>().unwrap().offset(), off, "first fit reuses");
        assert!(t.to_bytes().unwrap().iter().all(|&b| b == 0));
        drop(keep);
    }

    #[test]
    fn unaligned_offsets_lengths_and_buffers_round_trip() {
        let dir = crate::test_dir();
        for b in BACKENDS {
            let d = device(dir.path(), b);
            let mut rng = Rng(0x1234_5678);
            let len = 300_000;
            let t = d.allocate_bytes(len).unwrap();
            // Real data everywhere first: O_DIRECT over holes hides alignment bugs.
            let mut model = fill(&t, &mut rng);
            assert_eq!(t.to_bytes().unwrap(), model);
            // A backing buffer we can misalign on purpose.
            let mut backing = AlignedBuf::new(len + 64).unwrap();
            for i in 0..300 {
                let off = rng.below(len as u64) as usize;
                let n = match i % 4 {
                    0 => rng.below(16) as usize + 1,
                    1 => rng.below(5000) as usize + 1,
                    _ => rng.below(70_000) as usize + 1,
                }
                .min(len - off);
                let shift = [0usize, 1, 7, 512, 4095][i % 5];
                let buf = &mut backing.as_mut_slice()[shift..shift + n];
                if i % 2 == 0 {
                    rng.fill(buf);
                    t.write_bytes(off, buf).unwrap();
                    model[off..off + n].copy_from_slice(buf);
                } else {
                    t.read_bytes(off, buf).unwrap();
                    assert_eq!(buf, &model[off..off + n], "{b:?} read {n} at {off} into +{shift}");
                }
            }
            assert_eq!(t.to_bytes().unwrap(), model, "{b:?}");
        }
    }

    #[test]
    fn aligned_large_requests_go_direct_across_many_chunks() {
        let dir = crate::test_dir();
        for b in BACKENDS {
            let d = device(dir.path(), b);
            let len = 5 << 20; // 320 chunks of 16 KiB, depth 8
            let t = d.allocate_bytes(len).unwrap();
            let mut src = AlignedBuf::new(len).unwrap();
            Rng(99).fill(src.as_mut_slice());
            t.write_bytes(0, src.as_slice()).unwrap();
            let mut dst = AlignedBuf::new(len).unwrap();
            t.read_bytes(0, dst.as_mut_slice()).unwrap();
            assert!(src.as_slice() == dst.as_slice(), "{b:?}");
        }
    }

    #[test]
    fn concurrent_writers_to_disjoint_ranges_sharing_blocks() {
        let dir = crate::test_dir();
        for b in BACKENDS {
            let d = device(dir.path(), b);
            let len = 64 << 10;
            let t = d.allocate_bytes(len).unwrap();
            let mut rng = Rng(5);
            let mut model = fill(&t, &mut rng);
            // 16 writers own interleaved 100-byte stripes: every 4 KiB block
            // is shared by several of them, so every write is a partial-block
            // read-modify-write racing with its neighbours'.
            let writers = 16;
            let piece = 100;
            std::thread::scope(|s| {
                for w in 0..writers {
                    let t = t.clone();
                    s.spawn(move || {
                        for round in 0..20u8 {
                            let mut off = w * piece;
                            while off + piece <= len {
                                let bytes = vec![(w as u8).wrapping_mul(31).wrapping_add(round); piece];
                                t.write_bytes(off, &bytes).unwrap();
                                off += writers * piece;
                            }
                        }
                    });
                }
            });
            for w in 0..writers {
                let mut off = w * piece;
                while off + piece <= len {
                    model[off..off + piece].fill((w as u8).wrapping_mul(31).wrapping_add(19));
                    off += writers * piece;
                }
            }
            assert!(t.to_bytes().unwrap() == model, "{b:?}: a partial-block write clobbered a neighbour");
        }
    }

    #[test]
    fn extents_are_aligned_reused_coalesced_and_punched() {
        let dir = crate::test_dir();
        let d = device(dir.path(), BackendChoice::Auto);
        let align = d.alignment().extent;
        let off = |t: &Tensor| t.storage().as_any().downcast_ref::<DiskStorage>().unwrap().offset();
        let mut rng = Rng(11);
        let ts: Vec<Tensor> =
            [5000usize, 1, 70_000, 4096, 12_345].iter().map(|&n| d.allocate_bytes(n).unwrap()).collect();
        for t in &ts {
            assert_eq!(off(t) % align, 0);
            fill(t, &mut rng);
        }
        let s = d.stats();
        assert_eq!(s.asked, 5000 + 1 + 70_000 + 4096 + 12_345);
        let extents: u64 = [5000u64, 1, 70_000, 4096, 12_345].iter().map(|n| n.div_ceil(align) * align).sum();
        assert_eq!(s.resident, extents);
        assert_eq!(d.arena_len(), extents);
        let used = d.disk_usage().unwrap();
        assert!(used >= extents, "fallocate reserved the extents: {used} < {extents}");
        let [a, b, c, e, f]: [Tensor; 5] = ts.try_into().unwrap();
        let (b_off, c_off) = (off(&b), off(&c));
        let c_len = 70_000u64.div_ceil(align) * align;
        // Free two neighbours: they coalesce into one hole.
        drop(b);
        drop(c);
        assert_eq!(d.free_extents(), (1, align + c_len));
        assert!(d.disk_usage().unwrap() <= used - c_len, "punched extents give their space back");
        // A request larger than either piece fits the merged hole.
        let g = d.allocate_bytes((align + 4096) as usize).unwrap();
        assert_eq!(off(&g), b_off);
        assert!(off(&g) < c_off);
        assert!(g.to_bytes().unwrap().iter().all(|&x| x == 0));
        // Freeing the tail shrinks the file.
        let len_before = d.arena_len();
        drop(f);
        assert!(d.arena_len() < len_before);
        drop((a, e, g));
        assert_eq!(d.arena_len(), 0);
        assert_eq!(d.free_extents(), (0, 0));
        let s = d.stats();
        assert_eq!((s.asked, s.resident, s.allocations), (0, 0, 0));
        assert_eq!(d.leaked_bytes(), 0);
    }

    #[test]
    fn budget_refuses_with_out_of_memory() {
        let dir = crate::test_dir();
        let d =
            DiskDevice::new(DiskConfig { budget: Some(10_000), ..config(dir.path(), BackendChoice::Auto) }).unwrap();
        let _a = d.allocate_bytes(4000).unwrap();
        match d.allocate_bytes(4000) {
            // Extents round to 4096, so 2 × 4096 fits; a third does not.
            Ok(_b) => match d.allocate_bytes(100) {
                Err(Error::OutOfMemory { tier, .. }) => assert_eq!(tier, "disk:0"),
                other => panic!("expected out of memory, got {other:?}"),
            },
            Err(e) => panic!("{e}"),
        }
        let tiny =
            DiskDevice::new(DiskConfig { budget: Some(100), ..config(dir.path(), BackendChoice::Auto) }).unwrap();
        let err = tiny.allocate_bytes(1).unwrap_err();
        assert!(matches!(err, Error::OutOfMemory { asked: 1, budget: 100, .. }), "{err:?}");
        assert_eq!(tiny.arena_len(), 0, "nothing was allocated on disk");
    }

    #[test]
    fn bad_offload_directories_say_what_to_do() {
        let dir = crate::test_dir();
        let missing = dir.path().join("nope");
        let err = DiskDevice::new(DiskConfig::new(&missing)).err().expect("missing dir");
        let msg = err.to_string();
        assert!(matches!(err, Error::OffloadDir { .. }) && msg.contains("nope") && msg.contains("mkdir -p"), "{msg}");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = DiskDevice::new(DiskConfig::new(&file)).err().expect("a file");
        assert!(err.to_string().contains("is a file, not a directory"), "{err}");
        // Root may write anywhere, so a read-only directory only tells as a user.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            use std::os::unix::fs::PermissionsExt;
            let ro = dir.path().join("ro");
            std::fs::create_dir(&ro).unwrap();
            std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
            let err = DiskDevice::new(DiskConfig::new(&ro)).err().expect("read-only dir");
            assert!(err.to_string().contains("not writable"), "{err}");
        }
        let bad = DiskConfig { queue_depth: 0, ..DiskConfig::new(dir.path()) };
        assert!(matches!(DiskDevice::new(bad), Err(Error::Config(_))));
    }

    #[test]
    fn without_io_uring_auto_falls_back_and_says_why() {
        let dir = crate::test_dir();
        crate::arena::FAIL_URING.with(|f| f.set(true));
        let auto = DiskDevice::new(config(dir.path(), BackendChoice::Auto));
        let forced = DiskDevice::new(config(dir.path(), BackendChoice::IoUring));
        crate::arena::FAIL_URING.with(|f| f.set(false));
        let d = auto.unwrap();
        assert!(
            d.backend().starts_with("pread/pwrite threads (O_DIRECT")
                && d.backend().contains("io_uring unavailable: cannot set up a ring (Operation not permitted"),
            "{}",
            d.backend()
        );
        let t = d.allocate_bytes(10_000).unwrap();
        t.write_bytes(3, &[9; 5000]).unwrap();
        assert_eq!(t.to_bytes().unwrap()[3..5003], [9; 5000]);
        match forced {
            Err(Error::Unsupported { what, hint }) => {
                assert_eq!(what, "io_uring");
                assert!(hint.contains("Operation not permitted") && hint.contains("threads"), "{hint}");
            }
            other => panic!("expected io_uring to be unsupported, got {:?}", other.map(|d| d.backend())),
        }
    }

    #[test]
    fn buffered_io_needs_no_alignment() {
        let dir = crate::test_dir();
        for b in BACKENDS {
            let d = DiskDevice::new(DiskConfig { direct_io: false, ..config(dir.path(), b) }).unwrap();
            assert!(!d.direct_io());
            assert!(d.describe().contains("buffered I/O: O_DIRECT turned off"), "{}", d.describe());
            assert_eq!((d.alignment().offset, d.alignment().mem, d.alignment().extent), (1, 1, 4096));
            let t = d.allocate_bytes(100_000).unwrap();
            let mut rng = Rng(21);
            let mut model = fill(&t, &mut rng);
            for _ in 0..50 {
                let off = rng.below(99_000) as usize;
                let n = rng.below(1000) as usize + 1;
                let mut bytes = vec![0u8; n];
                rng.fill(&mut bytes);
                t.write_bytes(off, &bytes).unwrap();
                model[off..off + n].copy_from_slice(&bytes);
            }
            assert_eq!(t.to_bytes().unwrap(), model);
        }
    }

    #[test]
    fn tmpfs_falls_back_to_buffered_io() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            eprintln!("no /dev/shm here; skipping");
            return;
        }
        let Ok(dir) = tempfile::tempdir_in(shm) else { return };
        for b in BACKENDS {
            let d = device(dir.path(), b);
            if d.direct_io() {
                eprintln!("/dev/shm accepts O_DIRECT here; nothing to check");
                return;
            }
            assert!(d.describe().contains("buffered I/O"), "{}", d.describe());
            let t = d.allocate_bytes(50_000).unwrap();
            let data = fill(&t, &mut Rng(3));
            let mut part = vec![0u8; 777];
            t.read_bytes(1001, &mut part).unwrap();
            assert_eq!(part, data[1001..1778]);
            assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }

    #[test]
    fn empty_tensors_need_no_disk() {
        let dir = crate::test_dir();
        let d = device(dir.path(), BackendChoice::Auto);
        let t = d.allocate(&Shape::new([0, 3]), DType::F32).unwrap();
        assert!(t.to_bytes().unwrap().is_empty());
        assert_eq!(d.arena_len(), 0);
        assert!(d.free(t).is_ok());
    }

    /// A span over all of `buf`, for registration.
    fn span_of(buf: &mut AlignedBuf) -> tier_api::HostSpan {
        let ptr = std::ptr::NonNull::new(buf.as_mut_ptr()).expect("a mapped buffer");
        // SAFETY: the buffer is valid for its length while it lives; every
        // test drops the registration before the buffer.
        unsafe { tier_api::HostSpan::new(ptr, buf.len()) }
    }

    /// Chunks the aligned middle of `off..off + len` takes.
    fn middle_chunks(off: u64, len: usize, align: u64, chunk: usize) -> u64 {
        let (ds, de) = (off.div_ceil(align) * align, (off + len as u64) / align * align);
        if de > ds {
            (de - ds).div_ceil(chunk as u64)
        } else {
            0
        }
    }

    #[test]
    fn registered_memory_moves_through_fixed_buffers() {
        let dir = crate::test_dir();
        let d = device(dir.path(), BackendChoice::IoUring);
        let (align, chunk) = (d.alignment().offset, 16 << 10);
        let len = 1 << 20;
        let t = d.allocate_bytes(len).unwrap();
        let base = t.storage().as_any().downcast_ref::<DiskStorage>().unwrap().offset();
        let mut rng = Rng(0xF1CED);
        // Real data everywhere first: O_DIRECT over holes hides mistakes.
        let mut model = fill(&t, &mut rng);
        let io = d.block_io();
        let mut mem = AlignedBuf::new(len + 8192).unwrap();
        let span = span_of(&mut mem);
        // SAFETY: `mem` outlives `reg`, dropped at the end of the test first.
        let reg = unsafe { io.register_buffers(&[span]) }.unwrap().expect("io_uring registers caller memory");
        assert!(
            reg.describe().starts_with("1 span (1032 KiB) as 1 fixed buffer, held by 1 of 1 io_uring rings"),
            "{}",
            reg.describe()
        );
        assert_eq!(reg.ops(), 0);

        // Aligned: every chunk in place, through the fixed buffer.
        let buf = &mut mem.as_mut_slice()[..256 << 10];
        io.read_at(base + (64 << 10), buf).unwrap();
        assert!(buf == &model[64 << 10..320 << 10]);
        assert_eq!(reg.ops(), 16, "256 KiB in 16 KiB chunks");

        // Unaligned head and tail through bounce buffers, the middle fixed.
        let (off, n, shift) = (3 * 4096 + 100, 100_000, 100);
        let before = reg.ops();
        let buf = &mut mem.as_mut_slice()[shift..shift + n];
        io.read_at(base + off as u64, buf).unwrap();
        assert!(buf == &model[off..off + n]);
        assert_eq!(reg.ops() - before, middle_chunks(off as u64, n, align, chunk));
        assert!(reg.ops() > before);

        // Memory misaligned for O_DIRECT: all staged, none fixed.
        if d.direct_io() {
            let before = reg.ops();
            let buf = &mut mem.as_mut_slice()[1..1 + 50_000];
            io.read_at(base + 8192, buf).unwrap();
            assert!(buf == &model[8192..8192 + 50_000]);
            assert_eq!(reg.ops(), before, "staged chunks do not count");
        }

        // Writes: aligned, then with partial blocks at both ends.
        let before = reg.ops();
        let src = &mut mem.as_mut_slice()[..128 << 10];
        rng.fill(src);
        io.write_at(base + (512 << 10), src).unwrap();
        model[512 << 10..640 << 10].copy_from_slice(src);
        assert_eq!(reg.ops() - before, 8);
        let (off, n, shift) = (10 * 4096 + 100, 70_000, 100);
        let before = reg.ops();
        let src = &mut mem.as_mut_slice()[shift..shift + n];
        rng.fill(src);
        io.write_at(base + off as u64, src).unwrap();
        model[off..off + n].copy_from_slice(src);
        assert_eq!(reg.ops() - before, middle_chunks(off as u64, n, align, chunk));
        // Read back into memory that is not registered.
        assert!(t.to_bytes().unwrap() == model);

        // After unregistering, the same memory is served plainly, and the
        // table entry goes to the next registration.
        drop(reg);
        let mut other = AlignedBuf::new(64 << 10).unwrap();
        let other_span = span_of(&mut other);
        // SAFETY: `other` outlives `reg2`.
        let reg2 = unsafe { io.register_buffers(&[other_span]) }.unwrap().expect("registers again");
        let buf = &mut mem.as_mut_slice()[..256 << 10];
        io.read_at(base, buf).unwrap();
        assert!(buf == &model[..256 << 10]);
        assert_eq!(reg2.ops(), 0, "unregistered memory takes the plain path");
        io.read_at(base, other.as_mut_slice()).unwrap();
        assert!(other.as_slice() == &model[..64 << 10]);
        assert_eq!(reg2.ops(), 4);
        drop(reg2);
    }

    #[test]
    fn registrations_are_bounded_and_freed_on_drop() {
        let dir = crate::test_dir();
        let d = device(dir.path(), BackendChoice::IoUring);
        let io = d.block_io();
        let mut mem = AlignedBuf::new((crate::MAX_FIXED_BUFFERS + 1) * 4096).unwrap();
        let all = span_of(&mut mem);
        let spans: Vec<tier_api::HostSpan> = (0..=crate::MAX_FIXED_BUFFERS)
            .map(|i| {
                let p = std::ptr::NonNull::new(all.as_ptr().wrapping_add(i * 4096)).unwrap();
                // SAFETY: a page of `mem`, which outlives every registration here.
                unsafe { tier_api::HostSpan::new(p, 4096) }
            })
            .collect();
        let (last, first) = spans.split_last().unwrap();
        // SAFETY (all registrations below): `mem` outlives them.
        let full = unsafe { io.register_buffers(first) }.unwrap().unwrap();
        assert!(full.describe().starts_with("256 spans (1 MiB) as 256 fixed buffers"), "{}", full.describe());
        let err = unsafe { io.register_buffers(std::slice::from_ref(last)) }.unwrap_err();
        assert!(matches!(&err, Error::Config(m) if m.contains("0 of 256 are free")), "{err}");
        // Pages of `first` and the last page, each through its own entry.
        let t = d.allocate_bytes(8192).unwrap();
        let data = fill(&t, &mut Rng(8));
        let base = t.storage().as_any().downcast_ref::<DiskStorage>().unwrap().offset();
        io.read_at(base + 4096, &mut mem.as_mut_slice()[4096 * 7..4096 * 8]).unwrap();
        assert_eq!(full.ops(), 1);
        assert!(mem.as_slice()[4096 * 7..4096 * 8] == data[4096..]);
        drop(full);
        let one = unsafe { io.register_buffers(std::slice::from_ref(last)) }.unwrap().unwrap();
        let n = mem.len();
        io.read_at(base, &mut mem.as_mut_slice()[n - 4096..]).unwrap();
        assert!(mem.as_slice()[n - 4096..] == data[..4096]);
        assert_eq!(one.ops(), 1);
        assert!(matches!(unsafe { io.register_buffers(&[]) }, Err(Error::Config(_))));
    }

    #[test]
    fn registered_memory_survives_short_reads() {
        let dir = crate::test_dir();
        let plan = Arc::new(crate::fault::FaultPlan::new());
        let d = DiskDevice::with_faults(config(dir.path(), BackendChoice::IoUring), Arc::clone(&plan)).unwrap();
        let t = d.allocate_bytes(256 << 10).unwrap();
        let data = fill(&t, &mut Rng(77));
        let base = t.storage().as_any().downcast_ref::<DiskStorage>().unwrap().offset();
        let io = d.block_io();
        let mut mem = AlignedBuf::new(256 << 10).unwrap();
        let span = span_of(&mut mem);
        // SAFETY: `mem` outlives `reg`.
        let reg = unsafe { io.register_buffers(&[span]) }.unwrap().expect("the fault wrapper passes registration on");
        // A chunk stops after 8 KiB: the rest is resubmitted inside the
        // fixed buffer; another stops unaligned and is redone whole.
        let reads = plan.ops(IoOp::Read);
        plan.add(crate::fault::Fault::nth(IoOp::Read, reads + 2, crate::fault::FaultKind::Short(8192)));
        plan.add(crate::fault::Fault::nth(IoOp::Read, reads + 5, crate::fault::FaultKind::Short(100)));
        io.read_at(base, mem.as_mut_slice()).unwrap();
        assert_eq!(plan.fired().len(), 2);
        assert!(mem.as_slice() == &data[..]);
        assert_eq!(reg.ops(), 16);
    }

    #[test]
    fn the_thread_pool_cannot_register_memory() {
        let dir = crate::test_dir();
        let d = device(dir.path(), BackendChoice::Threads);
        let mut mem = AlignedBuf::new(8192).unwrap();
        let span = span_of(&mut mem);
        // SAFETY: `mem` outlives the (absent) registration.
        assert!(unsafe { d.block_io().register_buffers(&[span]) }.unwrap().is_none());
        let t = d.allocate_bytes(8192).unwrap();
        let data = fill(&t, &mut Rng(1));
        t.read_bytes(0, mem.as_mut_slice()).unwrap();
        assert!(mem.as_slice() == &data[..]);
    }

    #[test]
    fn out_of_range_block_io_is_refused() {
        let dir = crate::test_dir();
        let d = device(dir.path(), BackendChoice::Auto);
        let _t = d.allocate_bytes(4096).unwrap();
        let io = d.block_io();
        let mut buf = [0u8; 10];
        assert!(matches!(io.read_at(4090, &mut buf), Err(Error::Io { offset: 4090, len: 10, .. })));
        assert!(io.write_at(u64::MAX - 2, &buf).is_err());
        assert!(io.read_at(4086, &mut buf).is_ok());
    }
}
