//! Finding the GPUs without ever letting cudarc panic on a machine with no
//! driver: the driver library's presence is checked before any call into it
//! (in `tier_host::cuda::driver`), and no context is created here.

use cudarc::driver::result::device;
use cudarc::driver::sys::CUdevice_attribute as Attr;
use std::fmt;
use tier_api::{Error, Result};
use tier_host::cuda::{driver, driver_error, version_string, DriverState};

/// One GPU as the driver describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    pub ordinal: u32,
    pub name: String,
    /// Bytes of device memory.
    pub total_mem: u64,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// The driver's CUDA version, `13000` for 13.0.
    pub driver_version: i32,
    /// GPUs the driver sees.
    pub device_count: u32,
}

impl fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "gpu:{} {} ({:.1} GiB, compute {}.{}), CUDA driver {}",
            self.ordinal,
            self.name,
            self.total_mem as f64 / (1u64 << 30) as f64,
            self.compute_capability.0,
            self.compute_capability.1,
            version_string(self.driver_version)
        )
    }
}

/// The first GPU, `Ok(None)` when there is no driver or no device (run
/// without a GPU), or an error when a driver is there but unusable (too old,
/// broken install): that one the user should fix rather than silently lose
/// the GPU.
pub fn probe() -> Result<Option<GpuInfo>> {
    Ok(probe_all()?.into_iter().next())
}

/// Every GPU the driver sees; empty without a driver or device.
pub fn probe_all() -> Result<Vec<GpuInfo>> {
    match driver() {
        DriverState::Missing => Ok(Vec::new()),
        DriverState::Ready { version, devices } => (0..*devices).map(|i| info(i, *version, *devices)).collect(),
        other => Err(Error::Unsupported { what: "the GPU".into(), hint: other.describe() }),
    }
}

/// One line for tools to print once at start: which GPU is used, or why
/// there is none ("no CUDA driver: running without a GPU").
pub fn probe_message() -> String {
    match probe_all() {
        Ok(gpus) if gpus.is_empty() => match driver() {
            DriverState::Missing => "no CUDA driver: running without a GPU".into(),
            _ => "the CUDA driver sees no GPU: running without a GPU".into(),
        },
        Ok(gpus) => gpus.iter().map(|g| g.to_string()).collect::<Vec<_>>().join("; "),
        Err(e) => format!("{e}: running without a GPU"),
    }
}

/// Whether GPU work can run here (a driver and at least one device).
pub fn gpu_available() -> bool {
    driver().is_ready()
}

pub(crate) fn info(ordinal: u32, driver_version: i32, device_count: u32) -> Result<GpuInfo> {
    let tier = format!("gpu:{ordinal}");
    let dev = device::get(ordinal as i32).map_err(|e| driver_error(&tier, "cuDeviceGet", e))?;
    let name = device::get_name(dev).map_err(|e| driver_error(&tier, "cuDeviceGetName", e))?;
    // SAFETY: `dev` is a valid device handle from cuDeviceGet.
    let total_mem = unsafe { device::total_mem(dev) }.map_err(|e| driver_error(&tier, "cuDeviceTotalMem", e))?;
    let attr = |a: Attr| {
        // SAFETY: as above; the attribute is a plain query.
        unsafe { device::get_attribute(dev, a) }.map_err(|e| driver_error(&tier, "cuDeviceGetAttribute", e))
    };
    let major = attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(Attr::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    Ok(GpuInfo {
        ordinal,
        name,
        total_mem: total_mem as u64,
        compute_capability: (major, minor),
        driver_version,
        device_count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probing_never_panics_and_says_why() {
        let msg = probe_message();
        assert!(!msg.is_empty());
        match probe() {
            Ok(None) => assert!(msg.contains("running without a GPU"), "{msg}"),
            Ok(Some(g)) => assert!(msg.contains(&g.name), "{msg}"),
            Err(e) => assert!(msg.contains(&e.to_string()), "{msg}"),
        }
    }
}
