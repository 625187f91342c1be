//! The copy matrix's behaviour on the host tier: planning, errors, failing
//! and panicking workers, concurrency.

use std::sync::Arc;
use tier_api::{
    CopyConfig, CopyJob, CopyMatrix, CopyPath, CopyRoute, DType, Device, DeviceKind, Error, HostMemKind, Shape,
};
use tier_host::{HostConfig, HostDevice};
use tierlm_tests::{fill_random, gather, scatter};

fn host() -> Arc<HostDevice> {
    HostDevice::new(HostConfig::default()).expect("pageable host device")
}

#[test]
fn plan_names_the_path_and_counts_runs() {
    let dev = host();
    let m = CopyMatrix::new(CopyConfig::default()).unwrap();
    let a = dev.allocate(&Shape::new([4, 6]), DType::F16).unwrap();
    let b = dev.allocate(&Shape::new([4, 3]), DType::F16).unwrap();
    let plan = m.plan(&a.narrow(1, 2, 3).unwrap(), &b.view()).unwrap();
    assert_eq!(plan.path, CopyPath::HostMemcpy);
    assert_eq!(plan.bytes, 24);
    assert_eq!(plan.runs, 4, "four rows of a column window, one contiguous destination");
    assert_eq!(plan.src, DeviceKind::Host { mem: HostMemKind::Pageable });
}

#[test]
fn strided_copy_moves_exactly_the_view() {
    let dev = host();
    let m = CopyMatrix::new(CopyConfig::default()).unwrap();
    let src = dev.allocate(&Shape::new([5, 7, 3]), DType::I32).unwrap();
    let dst = dev.allocate(&Shape::new([4, 9, 3]), DType::I32).unwrap();
    let src_img = fill_random(&src, 1);
    let mut dst_img = fill_random(&dst, 2);
    let sv = src.narrow(0, 1, 3).unwrap().narrow(1, 2, 4).unwrap().narrow(2, 1, 2).unwrap();
    let dv = dst.narrow(0, 0, 3).unwrap().narrow(1, 5, 4).unwrap().narrow(2, 0, 2).unwrap();
    let report = m.copy(&sv, &dv).unwrap();
    assert_eq!(report.bytes, 3 * 4 * 2 * 4);
    scatter(&mut dst_img, &dv, &gather(&src_img, &sv));
    assert_eq!(dst.to_bytes().unwrap(), dst_img);
}

#[test]
fn mismatches_and_overlaps_are_refused_before_any_byte_moves() {
    let dev = host();
    let m = CopyMatrix::new(CopyConfig::default()).unwrap();
    let a = dev.allocate(&Shape::new([8, 8]), DType::F16).unwrap();
    let b = dev.allocate(&Shape::new([8, 8]), DType::BF16).unwrap();
    let c = dev.allocate(&Shape::new([8, 4]), DType::F16).unwrap();
    assert!(matches!(m.plan(&a.view(), &b.view()), Err(Error::DTypeMismatch { .. })));
    assert!(matches!(m.plan(&a.view(), &c.view()), Err(Error::ShapeMismatch { .. })));
    let img = fill_random(&a, 3);
    let err = m.copy(&a.narrow(0, 0, 4).unwrap(), &a.narrow(0, 2, 4).unwrap()).unwrap_err();
    assert!(matches!(err, Error::OverlappingCopy), "{err}");
    assert_eq!(a.to_bytes().unwrap(), img, "a refused copy leaves the destination untouched");
    // Disjoint views of one tensor are fine.
    m.copy(&a.narrow(0, 0, 4).unwrap(), &a.narrow(0, 4, 4).unwrap()).unwrap();
    let bytes = a.to_bytes().unwrap();
    assert_eq!(bytes[64..], img[..64]);
}

struct Panicking;

impl CopyRoute for Panicking {
    fn path(&self) -> CopyPath {
        CopyPath::HostMemcpy
    }
    fn accepts(&self, src: DeviceKind, dst: DeviceKind) -> bool {
        src.is_host() && dst.is_host()
    }
    fn run(&self, job: &CopyJob) -> tier_api::Result<()> {
        if job.bytes() == 4 {
            panic!("injected failure in a copy worker");
        }
        Err(Error::Config("injected error".into()))
    }
}

#[test]
fn a_panicking_worker_becomes_an_error_and_the_pool_survives() {
    let dev = host();
    let m = CopyMatrix::with_routes(CopyConfig { workers: 1, queue_capacity: 1 }, vec![Arc::new(Panicking)]).unwrap();
    let a = dev.allocate(&Shape::new([4]), DType::U8).unwrap();
    let b = dev.allocate(&Shape::new([4]), DType::U8).unwrap();
    for _ in 0..3 {
        match m.copy(&a.view(), &b.view()) {
            Err(Error::WorkerPanicked { message, .. }) => {
                assert!(message.contains("injected failure"))
            }
            other => panic!("expected a worker panic error, got {other:?}"),
        }
    }
    let err = m.copy(&a.narrow(0, 0, 2).unwrap(), &b.narrow(0, 0, 2).unwrap()).unwrap_err();
    assert!(err.to_string().contains("injected error"));
}

#[test]
fn gpu_pairs_have_no_route_without_the_cuda_tier() {
    let m = CopyMatrix::new(CopyConfig::default()).unwrap();
    let err = m
        .route(DeviceKind::Host { mem: HostMemKind::Pageable }, DeviceKind::Gpu { ordinal: 0 })
        .err()
        .expect("no GPU route");
    assert!(err.to_string().contains("CUDA tier"), "{err}");
}

#[test]
fn bad_pool_sizes_are_refused() {
    assert!(CopyMatrix::new(CopyConfig { workers: 0, queue_capacity: 4 }).is_err());
    assert!(CopyMatrix::new(CopyConfig { workers: 2, queue_capacity: 0 }).is_err());
}

#[test]
fn many_concurrent_copies_into_disjoint_rows() {
    let dev = host();
    let m = CopyMatrix::new(CopyConfig { workers: 4, queue_capacity: 2 }).unwrap();
    let rows = 64;
    let src = dev.allocate(&Shape::new([rows, 1000]), DType::U8).unwrap();
    let dst = dev.allocate(&Shape::new([rows, 1000]), DType::U8).unwrap();
    let img = fill_random(&src, 9);
    let handles: Vec<_> = (0..rows)
        .map(|r| m.submit(src.narrow(0, r, 1).unwrap(), dst.narrow(0, rows - 1 - r, 1).unwrap()).unwrap())
        .collect();
    for h in handles {
        h.wait().unwrap();
    }
    let out = dst.to_bytes().unwrap();
    for r in 0..rows {
        assert_eq!(out[(rows - 1 - r) * 1000..][..1000], img[r * 1000..][..1000]);
    }
}

#[test]
fn tensors_outlive_their_handles_while_a_copy_runs() {
    let dev = host();
    let m = CopyMatrix::new(CopyConfig::default()).unwrap();
    let src = dev.allocate(&Shape::new([1 << 20]), DType::U8).unwrap();
    let dst = dev.allocate(&Shape::new([1 << 20]), DType::U8).unwrap();
    let img = fill_random(&src, 4);
    let handle = m.submit(src.view(), dst.view()).unwrap();
    drop(src);
    handle.wait().unwrap();
    assert_eq!(dst.to_bytes().unwrap(), img);
    drop(dst);
    assert_eq!(dev.stats().resident, 0, "bytes come back once the copy and the handles are gone");
}
