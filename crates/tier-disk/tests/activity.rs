//! The disk's activity trace ([`tier_disk::IoActivity`]): a request keeps
//! the configured queue depth of operations in flight, every operation is
//! counted once (a retried short transfer too), and bytes add up. Counted,
//! not timed: these hold on any machine.

use std::path::PathBuf;
use std::sync::Arc;
use tier_api::IoOp;
use tier_disk::fault::{Fault, FaultKind, FaultPlan};
use tier_disk::{AlignedBuf, BackendChoice, DiskConfig, DiskDevice};

const CHUNK: usize = 16 << 10;
const DEPTH: usize = 8;

fn dir() -> tempfile::TempDir {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("tier-disk-activity");
    std::fs::create_dir_all(&base).unwrap();
    tempfile::tempdir_in(base).unwrap()
}

#[test]
fn a_request_keeps_the_queue_depth_in_flight() {
    for backend in [BackendChoice::IoUring, BackendChoice::Threads] {
        let dir = dir();
        let plan = Arc::new(FaultPlan::new());
        let config = DiskConfig { backend, chunk_size: CHUNK, queue_depth: DEPTH, ..DiskConfig::new(dir.path()) };
        let d = match DiskDevice::with_faults(config, Arc::clone(&plan)) {
            Ok(d) => d,
            // io_uring refused on this machine: the thread pool still runs.
            Err(e) if backend == BackendChoice::IoUring => {
                eprintln!("skipping io_uring: {e}");
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        let len = 64 * CHUNK;
        let t = d.allocate_bytes(len).unwrap();
        let mut src = AlignedBuf::new(len).unwrap();
        src.as_mut_slice().iter_mut().enumerate().for_each(|(i, b)| *b = i as u8 | 1);
        t.write_bytes(0, src.as_slice()).unwrap();
        let before = d.activity().snapshot();
        d.activity().take_peak();
        // A short read in the middle is retried inside its operation.
        plan.add(Fault::nth(IoOp::Read, 5, FaultKind::Short(8192)));
        let mut dst = AlignedBuf::new(len).unwrap();
        t.read_bytes(0, dst.as_mut_slice()).unwrap();
        assert!(dst.as_slice() == src.as_slice(), "{backend:?}");
        assert_eq!(d.activity().take_peak(), DEPTH, "{backend:?}: a request of 64 chunks keeps the depth in flight");
        let w = d.activity().snapshot().since(&before);
        assert_eq!((w.ops, w.bytes_read, w.bytes_written), (64, len as u64, 0), "{backend:?}: {w}");
        assert_eq!(d.activity().snapshot().in_flight, 0, "{backend:?}: every operation came back");
        assert!(w.busy_s <= w.wall_s + 1e-6, "{backend:?}: {w}");
        // A request smaller than the depth has no more in flight than its chunks.
        t.read_bytes(0, &mut dst.as_mut_slice()[..3 * CHUNK]).unwrap();
        assert_eq!(d.activity().take_peak(), 3, "{backend:?}");
    }
}
