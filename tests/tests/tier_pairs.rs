//! Property tests: for every pair of tiers present on this machine (pageable
//! host, disk through io_uring, disk through the thread-pool fallback, and
//! mixed tensors split over several of them), bytes copied between random
//! views of random shapes and dtypes arrive unchanged, and bytes outside the
//! destination view stay as they were.

use proptest::prelude::*;
use std::sync::{Arc, OnceLock};
use tier_api::{CopyConfig, CopyMatrix, DType, Device, SegmentedTensor, Shape, TensorView};
use tier_disk::{BackendChoice, DiskConfig, DiskDevice};
use tier_host::{HostConfig, HostDevice};
use tierlm_tests::{fill_random, gather, scatter, scratch_dir, tempfile_dir::TempDir};

struct Tiers {
    _dir: TempDir,
    devices: Vec<Arc<dyn Device>>,
    matrix: CopyMatrix,
}

fn tiers() -> &'static Tiers {
    static TIERS: OnceLock<Tiers> = OnceLock::new();
    TIERS.get_or_init(|| {
        let dir = scratch_dir(concat!(env!("CARGO_TARGET_TMPDIR"), "/tier-pairs"));
        let host = HostDevice::new(HostConfig::default()).expect("pageable host");
        let mut devices: Vec<Arc<dyn Device>> = vec![host];
        let threads = DiskConfig { id: 1, backend: BackendChoice::Threads, ..DiskConfig::new(dir.path()) };
        devices.push(DiskDevice::new(threads).expect("disk through the fallback"));
        match DiskDevice::new(DiskConfig { id: 0, backend: BackendChoice::IoUring, ..DiskConfig::new(dir.path()) }) {
            Ok(d) => devices.push(d),
            Err(e) => eprintln!("io_uring disk tier not available here, testing the fallback only: {e}"),
        }
        let matrix = CopyMatrix::new(CopyConfig { workers: 4, queue_capacity: 8 }).expect("copy matrix");
        Tiers { _dir: dir, devices, matrix }
    })
}

const DTYPES: [DType; 5] = DType::ALL;

/// A random shape of rank 1 to 4 and, for each dimension, a window into it.
fn shape_and_window() -> impl Strategy<Value = (Vec<usize>, Vec<(usize, usize)>)> {
    prop::collection::vec(1usize..9, 1..=4).prop_flat_map(|dims| {
        let windows: Vec<_> = dims.iter().map(|&d| (0..d).prop_flat_map(move |s| (Just(s), 1..=d - s))).collect();
        (Just(dims), windows)
    })
}

fn window(t: &tier_api::Tensor, w: &[(usize, usize)]) -> TensorView {
    let mut v = t.view();
    for (dim, &(start, len)) in w.iter().enumerate() {
        v = v.narrow(dim, start, len).expect("window inside the tensor");
    }
    v
}

/// A destination shape at least as large as the window, and where to put it.
fn placement(window: &[(usize, usize)], pad: &[usize]) -> (Vec<usize>, Vec<(usize, usize)>) {
    let dims: Vec<usize> = window.iter().zip(pad).map(|(&(_, len), &p)| len + p).collect();
    let at: Vec<(usize, usize)> = window.iter().zip(pad).map(|(&(_, len), &p)| (p / 2, len)).collect();
    (dims, at)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn copies_between_every_pair_of_tiers_are_exact(
        (dims, win) in shape_and_window(),
        pad in prop::collection::vec(0usize..4, 4),
        dtype in prop::sample::select(DTYPES.to_vec()),
        seed in any::<u64>(),
    ) {
        let t = tiers();
        let (dst_dims, dst_win) = placement(&win, &pad[..win.len()]);
        for src_dev in &t.devices {
            for dst_dev in &t.devices {
                let src = src_dev.allocate(&Shape::new(dims.clone()), dtype).unwrap();
                let dst = dst_dev.allocate(&Shape::new(dst_dims.clone()), dtype).unwrap();
                let src_img = fill_random(&src, seed);
                let mut dst_img = fill_random(&dst, seed ^ 0x5555);
                let sv = window(&src, &win);
                let dv = window(&dst, &dst_win);
                let report = t.matrix.copy(&sv, &dv).unwrap();
                prop_assert_eq!(report.bytes as usize, sv.byte_len());
                scatter(&mut dst_img, &dv, &gather(&src_img, &sv));
                prop_assert!(dst.to_bytes().unwrap() == dst_img,
                    "{} -> {}: bytes differ", src_dev.kind(), dst_dev.kind());
            }
        }
    }

    #[test]
    fn mixed_tensors_round_trip_through_every_tier(
        rows in 1usize..40,
        cols in 1usize..20,
        granularity in 1usize..5,
        cut in (0u32..=100, 0u32..=100),
        dtype in prop::sample::select(DTYPES.to_vec()),
        seed in any::<u64>(),
    ) {
        let t = tiers();
        let (a, b) = (cut.0.min(cut.1) as f64, cut.0.max(cut.1) as f64);
        let shape = Shape::new([rows, cols]);
        // Split over the first three tiers (host, and both disk backends where present).
        let n = t.devices.len().min(3);
        let shares = [a, b - a, 100.0 - b];
        let placements: Vec<(&dyn Device, f64)> = t.devices[..n]
            .iter()
            .zip(shares.iter().copied())
            .map(|(d, p)| (d.as_ref(), p))
            .collect::<Vec<_>>();
        // Fewer than three tiers: give the missing shares to the last present one.
        let mut placements = placements;
        let missing: f64 = shares[n..].iter().sum();
        if let Some(last) = placements.last_mut() { last.1 += missing; }
        let mixed = SegmentedTensor::allocate(&shape, dtype, 0, &placements, granularity).unwrap();
        let covered: usize = mixed.segments().iter().map(|s| s.range.len()).sum();
        prop_assert_eq!(covered, rows);
        for s in &mixed.segments()[..mixed.segments().len().saturating_sub(1)] {
            prop_assert_eq!(s.range.end % granularity, 0, "split points fall on the granularity");
        }
        for dev in &t.devices {
            let src = dev.allocate(&shape, dtype).unwrap();
            let img = fill_random(&src, seed);
            let back = dev.allocate(&shape, dtype).unwrap();
            fill_random(&back, !seed);
            let whole = |v: TensorView| SegmentedTensor::single(v, 0).unwrap();
            t.matrix.submit_segmented(&whole(src.view()), &mixed).unwrap().wait().unwrap();
            t.matrix.submit_segmented(&mixed, &whole(back.view())).unwrap().wait().unwrap();
            prop_assert!(back.to_bytes().unwrap() == img, "through mixed and back to {}", dev.kind());
        }
    }
}

#[test]
fn concurrent_copies_to_disjoint_views_do_not_interfere() {
    let t = tiers();
    // Rows of 1000 bytes: not a multiple of any direct-I/O block, so
    // neighbouring rows share blocks on disk.
    let rows = 48;
    for dst_dev in &t.devices {
        for src_dev in &t.devices {
            let src = src_dev.allocate(&Shape::new([rows, 1000]), DType::U8).unwrap();
            let dst = dst_dev.allocate(&Shape::new([rows, 1000]), DType::U8).unwrap();
            let img = fill_random(&src, 77);
            fill_random(&dst, 78);
            let handles: Vec<_> = (0..rows)
                .map(|r| {
                    t.matrix.submit(src.narrow(0, r, 1).unwrap(), dst.narrow(0, rows - 1 - r, 1).unwrap()).unwrap()
                })
                .collect();
            for h in handles {
                h.wait().unwrap();
            }
            let out = dst.to_bytes().unwrap();
            for r in 0..rows {
                assert!(
                    out[(rows - 1 - r) * 1000..][..1000] == img[r * 1000..][..1000],
                    "{} -> {}: row {r} damaged",
                    src_dev.kind(),
                    dst_dev.kind()
                );
            }
        }
    }
}
