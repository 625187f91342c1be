//! Compressed tensors are tensors to the tiers: quantized straight into a
//! host `u8` tensor, split over host memory and a disk with a
//! `SegmentedTensor`, moved by the copy matrix (only the packed bytes move),
//! and dequantized on the CPU everywhere and on the GPU where there is one.

#[macro_use]
mod common;

use common::{bits_of, host_bytes_mut, Rng};
use compression::{dequantize_into, quantize_into, CompressedLayout, CompressionConfig, SourceDtype};
use half::f16;
use tier_api::{CopyConfig, CopyMatrix, CopyPath, DType, Device, SegmentedTensor, Shape};
use tier_disk::{DiskConfig, DiskDevice};
use tier_host::{HostConfig, HostDevice};

#[test]
fn compressed_tensors_cross_the_tiers_packed() {
    let mut rng = Rng::seeded("tiers");
    // A weight of [out, in] with groups of 64 along the output dim.
    let shape = [768usize, 320];
    let layout = CompressedLayout::new(&shape, SourceDtype::F16, CompressionConfig::int4(0)).unwrap();
    let total = layout.total_bytes();
    let x: Vec<f16> = common::values(&mut rng, layout.numel()).into_iter().map(f16::from_f32).collect();

    // Quantized in place into a host u8 tensor.
    let host = HostDevice::new(HostConfig::default()).unwrap();
    let packed = host.allocate(&Shape::new([total]), DType::U8).unwrap();
    // SAFETY: nothing else uses the fresh tensor while the slice lives.
    quantize_into(&x, &layout, unsafe { host_bytes_mut(&packed) }).unwrap();
    let mut reference = vec![f16::ZERO; layout.numel()];
    dequantize_into(&packed.to_bytes().unwrap(), &layout, &mut reference).unwrap();

    // Split 60 / 40 over host memory and a disk.
    let dir = tempfile::tempdir_in(std::env::temp_dir()).unwrap();
    let disk = DiskDevice::new(DiskConfig::new(dir.path())).unwrap();
    let placements: [(&dyn Device, f64); 2] = [(host.as_ref(), 60.0), (disk.as_ref(), 40.0)];
    let split = SegmentedTensor::allocate(&Shape::new([total]), DType::U8, 0, &placements, 512).unwrap();
    assert_eq!(split.segments().len(), 2);
    assert!(split.segments()[1].view.device().is_disk());

    let matrix = CopyMatrix::new(CopyConfig::default()).unwrap();
    let whole = SegmentedTensor::single(packed.view(), 0).unwrap();
    let report = matrix.submit_segmented(&whole, &split).unwrap().wait().unwrap();
    // Only the packed bytes moved: 0.5625 byte per value plus the header,
    // not the 2 bytes per value of f16.
    assert_eq!(report.bytes as usize, total);
    assert!(total < layout.numel() * 2 * 3 / 10);
    assert!(report.paths.contains(&CopyPath::DiskWrite), "{:?}", report.paths);

    // Back into one host tensor, and dequantized there.
    let back = host.allocate(&Shape::new([total]), DType::U8).unwrap();
    let report = matrix.submit_segmented(&split, &SegmentedTensor::single(back.view(), 0).unwrap()).unwrap().wait();
    let report = report.unwrap();
    assert_eq!(report.bytes as usize, total);
    assert!(report.paths.contains(&CopyPath::DiskRead), "{:?}", report.paths);
    let bytes = back.to_bytes().unwrap();
    assert_eq!(bytes, packed.to_bytes().unwrap());
    let mut y = vec![f16::ZERO; layout.numel()];
    dequantize_into(&bytes, &layout, &mut y).unwrap();
    assert_eq!(y, reference);
    // And within the documented error of the original (half a step plus
    // the final rounding to f16).
    let c = compression::CompressedTensor::from_bytes(bytes).unwrap();
    for (i, (a, b)) in x.iter().zip(&y).enumerate() {
        let (group, _) = layout.group_of(i).unwrap();
        let step = c.decode_params(group).unwrap().1;
        let ulp = f32::from(*b).abs().max(6.1e-5) / 1024.0;
        assert!((f32::from(*a) - f32::from(*b)).abs() <= step / 2.0 + ulp, "{i}: {a} vs {b}");
    }

    // On the GPU: the segments go straight to GPU memory (the disk part
    // through the staged disk path), packed, and are unpacked there.
    let rig = rig_or_skip!();
    let gpu_packed = rig.gpu.allocate(&Shape::new([total]), DType::U8).unwrap();
    let to_gpu = SegmentedTensor::single(gpu_packed.view(), 0).unwrap();
    let report = rig.matrix.submit_segmented(&split, &to_gpu).unwrap().wait().unwrap();
    assert_eq!(report.bytes as usize, total);
    assert!(report.paths.contains(&CopyPath::StagedDisk), "{:?}", report.paths);
    let out = rig.gpu.allocate(&Shape::new(shape), DType::F16).unwrap();
    rig.deq.dequantize(&gpu_packed.view(), &layout, &out.view()).unwrap();
    let want: Vec<u16> = reference.iter().map(|v| v.to_bits()).collect();
    assert_eq!(bits_of(&rig.download(&out.view())), want);
}
