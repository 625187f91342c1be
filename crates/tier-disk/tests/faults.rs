//! Injected faults: short transfers are retried and the data stays right;
//! EIO and ENOSPC come out as typed errors with messages that say what to
//! do; a failure in the middle of a multi-chunk request is never success.

use std::any::Any;
use std::path::PathBuf;
use std::ptr::NonNull;
use std::sync::Arc;
use tier_api::{
    Access, CopyConfig, CopyMatrix, Device, DeviceKind, Error, HostMemKind, HostSpan, IoOp, Shape, Storage, Tensor,
};
use tier_disk::fault::{Fault, FaultKind, FaultPlan};
use tier_disk::{AlignedBuf, BackendChoice, DiskConfig, DiskDevice, DiskStorage, IoFailure, MAX_SHORT_RETRIES};

const CHUNK: usize = 16 << 10;
const BACKENDS: [BackendChoice; 2] = [BackendChoice::IoUring, BackendChoice::Threads];

fn dir() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tier-disk-faults");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

fn device(dir: &tempfile::TempDir, backend: BackendChoice, plan: &Arc<FaultPlan>) -> Arc<DiskDevice> {
    let config = DiskConfig { backend, chunk_size: CHUNK, queue_depth: 4, ..DiskConfig::new(dir.path()) };
    DiskDevice::with_faults(config, Arc::clone(plan)).unwrap()
}

fn pattern(len: usize, seed: u8) -> AlignedBuf {
    let mut b = AlignedBuf::new(len).unwrap();
    for (i, x) in b.as_mut_slice().iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(7).wrapping_add(seed) | 1;
    }
    b
}

fn offset(t: &Tensor) -> u64 {
    t.storage().as_any().downcast_ref::<DiskStorage>().unwrap().offset()
}

#[test]
fn short_reads_are_retried_and_the_data_is_right() {
    for b in BACKENDS {
        let plan = Arc::new(FaultPlan::new());
        let dir = dir();
        let d = device(&dir, b, &plan);
        let len = 16 * CHUNK;
        let t = d.allocate_bytes(len).unwrap();
        let src = pattern(len, 3);
        t.write_bytes(0, src.as_slice()).unwrap();
        // An unaligned short count (the chunk is redone), an aligned one (the
        // remainder is resubmitted), and a read of 0 bytes before the end.
        plan.add(Fault::nth(IoOp::Read, 3, FaultKind::Short(5000)));
        plan.add(Fault::nth(IoOp::Read, 7, FaultKind::Short(8192)));
        plan.add(Fault::nth(IoOp::Read, 10, FaultKind::Short(0)));
        let mut dst = AlignedBuf::new(len).unwrap();
        t.read_bytes(0, dst.as_mut_slice()).unwrap();
        assert!(dst.as_slice() == src.as_slice(), "{b:?}: data after retried short reads");
        assert_eq!(plan.fired().len(), 3, "{b:?}");
        assert_eq!(plan.ops(IoOp::Read), 16 + 3, "{b:?}: one resubmission per short read");
        // Short reads of staged (unaligned) chunks, into an unaligned buffer.
        plan.add(Fault::nth(IoOp::Read, plan.ops(IoOp::Read), FaultKind::Short(100)));
        plan.add(Fault::nth(IoOp::Read, plan.ops(IoOp::Read) + 1, FaultKind::Short(1024)));
        let mut odd = vec![0u8; 3 * CHUNK + 11];
        t.read_bytes(999, &mut odd[1..]).unwrap();
        assert_eq!(&odd[1..], &src.as_slice()[999..999 + 3 * CHUNK + 10], "{b:?}");
        assert_eq!(plan.fired().len(), 5);
    }
}

#[test]
fn short_writes_are_retried_and_the_data_is_right() {
    for b in BACKENDS {
        let plan = Arc::new(FaultPlan::new());
        let dir = dir();
        let d = device(&dir, b, &plan);
        let len = 8 * CHUNK;
        let t = d.allocate_bytes(len).unwrap();
        plan.add(Fault::nth(IoOp::Write, 1, FaultKind::Short(4096)));
        plan.add(Fault::nth(IoOp::Write, 4, FaultKind::Short(1000)));
        plan.add(Fault::nth(IoOp::Write, 6, FaultKind::Short(0)));
        let src = pattern(len, 9);
        t.write_bytes(0, src.as_slice()).unwrap();
        assert_eq!(plan.fired().len(), 3);
        let mut dst = AlignedBuf::new(len).unwrap();
        t.read_bytes(0, dst.as_mut_slice()).unwrap();
        assert!(dst.as_slice() == src.as_slice(), "{b:?}: data after retried short writes");
    }
}

#[test]
fn a_read_that_stays_short_is_a_short_transfer_error() {
    for b in BACKENDS {
        // An unaligned count (the chunk is redone each time) and no bytes at all.
        for (short, done_seen) in [(100u32, 100u64), (0, 0)] {
            let plan = Arc::new(FaultPlan::new());
            let dir = dir();
            let d = device(&dir, b, &plan);
            let t = d.allocate_bytes(4 * CHUNK).unwrap();
            t.write_bytes(0, pattern(4 * CHUNK, 1).as_slice()).unwrap();
            let at = offset(&t) + 2 * CHUNK as u64 + 10;
            plan.add(Fault::at_offset(IoOp::Read, at, FaultKind::Short(short)).always());
            let mut dst = AlignedBuf::new(4 * CHUNK).unwrap();
            let err = t.read_bytes(0, dst.as_mut_slice()).unwrap_err();
            match &err {
                Error::ShortTransfer { op, tier, offset: o, len, done, attempts } => {
                    assert_eq!((*op, tier.as_str()), (IoOp::Read, "disk:0"));
                    assert_eq!((*o, *len), (offset(&t) + 2 * CHUNK as u64, CHUNK as u64));
                    assert_eq!((*attempts, *done), (MAX_SHORT_RETRIES + 1, done_seen));
                }
                other => panic!("{b:?}: expected a short transfer, got {other:?}"),
            }
            assert!(err.to_string().contains("stayed short after 17 attempts"), "{err}");
            assert_eq!(plan.fired().len(), MAX_SHORT_RETRIES as usize + 1, "bounded retries");
        }
    }
}

#[test]
fn eio_is_a_typed_error_naming_op_tier_offset_and_length() {
    for b in BACKENDS {
        let plan = Arc::new(FaultPlan::new());
        let dir = dir();
        let d = device(&dir, b, &plan);
        let t = d.allocate_bytes(4 * CHUNK).unwrap();
        t.write_bytes(0, pattern(4 * CHUNK, 2).as_slice()).unwrap();
        plan.add(Fault::nth(IoOp::Read, 1, FaultKind::Eio));
        let mut dst = AlignedBuf::new(4 * CHUNK).unwrap();
        let err = t.read_bytes(0, dst.as_mut_slice()).unwrap_err();
        let msg = err.to_string();
        let Error::Io { op, tier, offset: o, len, source } = err else { panic!("{b:?}: expected Io, got {msg}") };
        assert_eq!((op, tier.as_str(), o, len), (IoOp::Read, "disk:0", offset(&t) + CHUNK as u64, CHUNK as u64));
        let failure = source.get_ref().and_then(|s| s.downcast_ref::<IoFailure>()).expect("the errno is kept");
        assert_eq!(failure.errno, libc::EIO);
        assert!(msg.contains("read of 16384 bytes at offset") && msg.contains("on disk:0 failed"), "{msg}");
        assert!(msg.contains("Input/output error") && msg.contains("dmesg"), "{msg}");
        // The device keeps working after the failed request.
        t.read_bytes(0, dst.as_mut_slice()).unwrap();
        assert!(dst.as_slice() == pattern(4 * CHUNK, 2).as_slice());
    }
}

#[test]
fn enospc_in_the_middle_of_a_multi_chunk_write_is_reported_never_success() {
    for b in BACKENDS {
        let plan = Arc::new(FaultPlan::new());
        let dir = dir();
        let d = device(&dir, b, &plan);
        let len = 12 * CHUNK;
        let t = d.allocate_bytes(len).unwrap();
        plan.add(Fault::nth(IoOp::Write, 5, FaultKind::NoSpace));
        let err = t.write_bytes(0, pattern(len, 4).as_slice()).unwrap_err();
        match &err {
            Error::DiskFull { tier, offset: o, len } => {
                assert_eq!((tier.as_str(), *o, *len), ("disk:0", offset(&t) + 5 * CHUNK as u64, CHUNK as u64));
            }
            other => panic!("{b:?}: expected DiskFull, got {other:?}"),
        }
        assert!(err.to_string().contains("free space in the offload directory"), "{err}");
        // Submission stopped at the error: at most the chunks already in
        // flight (depth 4) went on after it.
        assert!(plan.ops(IoOp::Write) <= 5 + 4, "{}", plan.ops(IoOp::Write));
        // An unaligned write whose read-modify-write read fails reports it too.
        plan.add(Fault::nth(IoOp::Read, plan.ops(IoOp::Read), FaultKind::Eio));
        let err = t.write_bytes(100, &[7u8; 50]).unwrap_err();
        assert!(matches!(err, Error::Io { op: IoOp::Read, .. }), "{err:?}");
        // And with no fault the same write now succeeds.
        t.write_bytes(0, pattern(len, 4).as_slice()).unwrap();
        assert_eq!(t.to_bytes().unwrap(), pattern(len, 4).as_slice());
    }
}

/// Host memory for the copy-matrix test (tier-disk does not depend on tier-host).
#[derive(Debug)]
struct HostBuf(AlignedBuf);

impl Storage for HostBuf {
    fn device(&self) -> DeviceKind {
        DeviceKind::Host { mem: HostMemKind::Pageable }
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn access(&self) -> Access<'_> {
        let ptr = NonNull::new(self.0.as_ptr().cast_mut()).unwrap_or(NonNull::dangling());
        // SAFETY: the buffer lives as long as the storage.
        Access::Host(unsafe { HostSpan::new(ptr, self.0.len()) })
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[test]
fn copy_matrix_views_round_trip_and_faults_reach_the_waiter() {
    let plan = Arc::new(FaultPlan::new());
    let dir = dir();
    let d = device(&dir, BackendChoice::Auto, &plan);
    let shape = Shape::new([64, 1000]); // rows of 2000 bytes: views are unaligned
    let host = |seed| {
        let buf = pattern(128_000, seed);
        Tensor::from_storage(Arc::new(HostBuf(buf)), shape.clone(), tier_api::DType::F16).unwrap()
    };
    let (a, back) = (host(5), host(0));
    let disk = d.allocate(&shape, tier_api::DType::F16).unwrap();
    let m = CopyMatrix::new(CopyConfig::default()).unwrap();
    m.copy(&a.view(), &disk.view()).unwrap();
    // A strided window: columns 3..503 of rows 10..40.
    let sv = a.narrow(0, 10, 30).unwrap().narrow(1, 3, 500).unwrap();
    let dv = disk.narrow(0, 10, 30).unwrap().narrow(1, 3, 500).unwrap();
    let bv = back.narrow(0, 10, 30).unwrap().narrow(1, 3, 500).unwrap();
    m.copy(&dv, &bv).unwrap();
    let (got, want) = (back.to_bytes().unwrap(), a.to_bytes().unwrap());
    for r in 10..40 {
        let row = r * 2000;
        assert_eq!(&got[row + 6..row + 1006], &want[row + 6..row + 1006], "row {r}");
    }
    drop(sv);
    plan.add(Fault::nth(IoOp::Write, plan.ops(IoOp::Write), FaultKind::NoSpace));
    let err = m.submit(a.view(), disk.view()).unwrap().wait().unwrap_err();
    assert!(matches!(err, Error::DiskFull { .. }), "{err:?}");
    assert!(d.describe().contains("with injected faults"), "{}", d.describe());
}
