//! The CUDA driver, as far as host memory needs it: finding it without
//! panicking, checking its version, and a context to pin memory in.
//!
//! cudarc loads `libcuda` lazily and panics when it is missing, so every path
//! here asks [`driver`] first; nothing calls into cudarc before that check.

use cudarc::driver::result::DriverError;
use cudarc::driver::sys;
use cudarc::driver::CudaContext;
use std::sync::{Arc, OnceLock};
use tier_api::{Error, Result};

/// The oldest driver API version tierlm runs on (CUDA 12.0).
pub const MIN_DRIVER_VERSION: i32 = 12000;

/// What was found when looking for the CUDA driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriverState {
    /// `libcuda` could not be loaded.
    Missing,
    /// The driver loaded but `cuInit` failed (no device, a broken install).
    InitFailed { reason: String },
    /// The driver is older than [`MIN_DRIVER_VERSION`].
    TooOld { version: i32 },
    /// Usable, with this many devices.
    Ready { version: i32, devices: u32 },
}

impl DriverState {
    /// One sentence for users.
    pub fn describe(&self) -> String {
        match self {
            DriverState::Missing => "no CUDA driver (libcuda could not be loaded)".into(),
            DriverState::InitFailed { reason } => format!("the CUDA driver did not initialize: {reason}"),
            DriverState::TooOld { version } => format!(
                "the CUDA driver supports CUDA {} but tierlm needs {} or newer; update the NVIDIA driver",
                version_string(*version),
                version_string(MIN_DRIVER_VERSION)
            ),
            DriverState::Ready { version, devices } => {
                format!("CUDA driver {} with {devices} device(s)", version_string(*version))
            }
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self, DriverState::Ready { devices, .. } if *devices > 0)
    }
}

/// `12040` as `12.4`.
pub fn version_string(v: i32) -> String {
    format!("{}.{}", v / 1000, (v % 1000) / 10)
}

/// Looks for the driver once per process and remembers the answer.
pub fn driver() -> &'static DriverState {
    static STATE: OnceLock<DriverState> = OnceLock::new();
    STATE.get_or_init(find_driver)
}

fn find_driver() -> DriverState {
    // SAFETY: only tries to dlopen the driver library; calls no driver function.
    if !unsafe { sys::is_culib_present() } {
        return DriverState::Missing;
    }
    let mut version = 0;
    // SAFETY: the library is present (checked above); cuDriverGetVersion
    // needs no cuInit, and the out-pointer is valid.
    if let Err(e) = unsafe { sys::cuDriverGetVersion(&mut version) }.result() {
        return DriverState::InitFailed { reason: driver_reason(e) };
    }
    if version < MIN_DRIVER_VERSION {
        return DriverState::TooOld { version };
    }
    match cudarc::driver::result::init() {
        Ok(()) => {}
        Err(e) if e.0 == sys::cudaError_enum::CUDA_ERROR_NO_DEVICE => {
            return DriverState::Ready { version, devices: 0 };
        }
        Err(e) => return DriverState::InitFailed { reason: driver_reason(e) },
    }
    match cudarc::driver::result::device::get_count() {
        Ok(n) => DriverState::Ready { version, devices: n.max(0) as u32 },
        Err(e) => DriverState::InitFailed { reason: driver_reason(e) },
    }
}

/// Fails with a clear error unless the driver is usable and has a device.
/// `what` names the feature that needs it, for the message.
pub fn require_driver(what: &str) -> Result<i32> {
    match driver() {
        DriverState::Ready { version, devices } if *devices > 0 => Ok(*version),
        DriverState::Ready { .. } => Err(Error::Unsupported {
            what: what.into(),
            hint: "the CUDA driver sees no GPU; use --host-memory pageable".into(),
        }),
        other => Err(Error::Unsupported {
            what: what.into(),
            hint: format!("{}; use --host-memory pageable", other.describe()),
        }),
    }
}

/// The driver's name and description of an error code.
pub fn driver_reason(e: DriverError) -> String {
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
    match e.error_string() {
        Ok(text) => format!("{name} ({})", text.to_string_lossy()),
        Err(_) => name,
    }
}

/// A driver call's failure as the tiers' error.
pub fn driver_error(tier: &str, call: &str, e: DriverError) -> Error {
    Error::Driver { tier: tier.into(), call: call.into(), reason: driver_reason(e) }
}

/// The primary context of device 0, retained once per process: pinned and
/// registered memory is made portable, so the context it is made in only
/// has to exist.
pub fn host_context() -> Result<Arc<CudaContext>> {
    static CTX: OnceLock<std::result::Result<Arc<CudaContext>, String>> = OnceLock::new();
    require_driver("pinned host memory")?;
    CTX.get_or_init(|| CudaContext::new(0).map_err(driver_reason)).clone().map_err(|reason| Error::Driver {
        tier: "gpu:0".into(),
        call: "cuDevicePrimaryCtxRetain".into(),
        reason,
    })
}
