//! Typed GPU buffers: `tier-cuda` device memory (so the GPU tier's account
//! sees every byte) with an element type, a length, and copies to and from
//! host slices on the engine's stream.

use std::marker::PhantomData;

use half::{bf16, f16};
use tier_api::{DType, Device, Shape, Tensor};
use tier_cuda::kernels::CudaStream;

use super::{driver_err, tier_err, Gpu};
use crate::error::{Error, Result};

/// An element type a [`DevBuf`] can hold.
pub trait DevElem: Copy + Default + 'static {
    /// The tier's type of the same size (u32 is held as i32).
    const DTYPE: DType;
}

impl DevElem for f16 {
    const DTYPE: DType = DType::F16;
}
impl DevElem for bf16 {
    const DTYPE: DType = DType::BF16;
}
impl DevElem for f32 {
    const DTYPE: DType = DType::F32;
}
impl DevElem for u8 {
    const DTYPE: DType = DType::U8;
}
impl DevElem for i32 {
    const DTYPE: DType = DType::I32;
}
impl DevElem for u32 {
    const DTYPE: DType = DType::I32;
}

/// A 16-bit float type the GPU computes in (f16 or bf16): products take
/// it with f32 accumulation, kernels have an entry point for each (named
/// with its [`Half::SUFFIX`]).
pub trait Half: DevElem + Send + Sync {
    /// The suffix of the kernels' entry points for this type.
    const SUFFIX: &'static str;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Half for f16 {
    const SUFFIX: &'static str = "f16";
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl Half for bf16 {
    const SUFFIX: &'static str = "bf16";
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

/// `len` elements of `T` in GPU memory, freed on drop.
#[derive(Debug)]
pub struct DevBuf<T: DevElem> {
    tensor: Tensor,
    ptr: u64,
    len: usize,
    _elem: PhantomData<T>,
}

impl<T: DevElem> DevBuf<T> {
    /// Uninitialised room for `len` elements (the bytes are whatever the
    /// allocator left; every user writes before reading).
    pub fn alloc(gpu: &Gpu, len: usize) -> Result<Self> {
        let tensor = gpu.device().allocate(&Shape::new([len]), T::DTYPE).map_err(tier_err)?;
        let ptr = gpu.device().device_ptr(&tensor).map_err(tier_err)?;
        Ok(DevBuf { tensor, ptr, len, _elem: PhantomData })
    }

    /// A buffer holding a copy of `host`.
    pub fn from_host(gpu: &Gpu, host: &[T]) -> Result<Self> {
        let buf = Self::alloc(gpu, host.len())?;
        buf.upload(gpu.stream(), 0, host)?;
        Ok(buf)
    }

    /// Elements held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address of the first element.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The device address of element `i` (checked to be inside).
    pub fn ptr_at(&self, i: usize) -> Result<u64> {
        if i > self.len {
            return Err(Error::Gpu(format!("GPU buffer index {i} is past its {} elements", self.len)));
        }
        Ok(self.ptr + (i * std::mem::size_of::<T>()) as u64)
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.tensor.byte_len() as u64
    }

    /// The GPU tier's tensor behind the buffer (`[len]` of the tier's type
    /// of the same size), for copies through the copy matrix.
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }

    /// Copies `host` into elements `offset..offset + host.len()`, enqueued
    /// on `stream`. The host slice may be reused as soon as this returns.
    pub fn upload(&self, stream: &CudaStream, offset: usize, host: &[T]) -> Result<()> {
        self.check(offset, host.len())?;
        if host.is_empty() {
            return Ok(());
        }
        let dst = self.ptr_at(offset)?;
        stream.context().bind_to_thread().map_err(|e| driver_err("cuCtxSetCurrent", e))?;
        // SAFETY: `dst..dst + size_of_val(host)` lies inside this buffer
        // (checked above) and the buffer outlives the copy (it is dropped
        // only after the stream's work); from pageable memory the driver
        // has copied `host` into its staging memory before returning, so the
        // slice need not outlive the call.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, host, stream.cu_stream()) }
            .map_err(|e| driver_err("cuMemcpyHtoDAsync", e))
    }

    /// Elements `offset..offset + len` copied to the host, after everything
    /// enqueued on `stream` before.
    pub fn download_range(&self, stream: &CudaStream, offset: usize, len: usize) -> Result<Vec<T>> {
        self.check(offset, len)?;
        let mut out = vec![T::default(); len];
        if len == 0 {
            return Ok(out);
        }
        let src = self.ptr_at(offset)?;
        stream.context().bind_to_thread().map_err(|e| driver_err("cuCtxSetCurrent", e))?;
        // SAFETY: `src..src + len` elements lie inside this buffer (checked
        // above); `out` has room for `len` elements and is not touched until
        // the stream is synchronized just below.
        unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut out, src, stream.cu_stream()) }
            .map_err(|e| driver_err("cuMemcpyDtoHAsync", e))?;
        stream.synchronize().map_err(|e| driver_err("cuStreamSynchronize", e))?;
        Ok(out)
    }

    /// `src`'s elements copied into this buffer's first ones, device to
    /// device, enqueued on `stream`. Both buffers must stay alive until the
    /// stream has run the copy (they drop only after the stream's work).
    pub fn copy_from(&self, stream: &CudaStream, src: &DevBuf<T>) -> Result<()> {
        self.check(0, src.len)?;
        if src.len == 0 {
            return Ok(());
        }
        let bytes =
            src.len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| Error::Gpu("copy size overflows".into()))?;
        stream.context().bind_to_thread().map_err(|e| driver_err("cuCtxSetCurrent", e))?;
        // SAFETY: `bytes` bytes lie inside `src` and, checked above, inside
        // this buffer; they are distinct allocations (two `DevBuf`s never
        // share storage unless `share`d, and a shared handle has the same
        // pointer, which the driver copies in place), and both outlive the
        // stream's work as documented.
        unsafe { cudarc::driver::result::memcpy_dtod_async(self.ptr(), src.ptr(), bytes, stream.cu_stream()) }
            .map_err(|e| driver_err("cuMemcpyDtoDAsync", e))
    }

    /// The whole buffer copied to the host.
    pub fn download(&self, stream: &CudaStream) -> Result<Vec<T>> {
        self.download_range(stream, 0, self.len)
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::Gpu(format!(
                "GPU buffer copy of {len} elements at {offset} does not fit its {} elements",
                self.len
            ))),
        }
    }
}

impl<T: DevElem> DevBuf<T> {
    /// Another handle on the same GPU memory (the memory is freed when the
    /// last handle goes): the compressed layers' matrices all name the one
    /// f16 workspace they are dequantized into.
    pub fn share(&self) -> Self {
        DevBuf { tensor: self.tensor.clone(), ptr: self.ptr, len: self.len, _elem: PhantomData }
    }
}
