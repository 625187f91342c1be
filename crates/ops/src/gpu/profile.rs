//! An optional profile of the engine's parts: when on, each part of a step
//! (a product, the attention kernel, a norm) records an event on the
//! stream after it, and the time between consecutive events is added to
//! that part's total, separately for the prefill and the decode steps.
//! Events cost a few microseconds each: profiled runs are for finding where
//! time goes, not for the reported throughput.

use std::cell::RefCell;
use std::collections::BTreeMap;

use tier_cuda::kernels::CudaEvent;

use super::{driver_err, Gpu};
use crate::error::Result;

/// Events recorded so far, with their phase and part.
#[derive(Debug, Default)]
pub struct Profiler {
    phase: RefCell<&'static str>,
    marks: RefCell<Vec<(&'static str, &'static str, CudaEvent)>>,
}

impl Profiler {
    /// Starts a phase (`prefill`, `decode`): later marks count in it.
    pub fn phase(&self, gpu: &Gpu, phase: &'static str) -> Result<()> {
        *self.phase.borrow_mut() = phase;
        self.mark(gpu, "(between steps)")
    }

    /// Records that `part` ends here on the stream.
    pub fn mark(&self, gpu: &Gpu, part: &'static str) -> Result<()> {
        let ev = gpu.device().new_event(true).map_err(super::tier_err)?;
        ev.record(gpu.stream()).map_err(|e| driver_err("cuEventRecord", e))?;
        self.marks.borrow_mut().push((*self.phase.borrow(), part, ev));
        Ok(())
    }

    /// Milliseconds per (phase, part), after waiting for the stream; clears
    /// the marks.
    pub fn take(&self, gpu: &Gpu) -> Result<BTreeMap<(&'static str, &'static str), f64>> {
        gpu.synchronize()?;
        let marks = std::mem::take(&mut *self.marks.borrow_mut());
        let mut out = BTreeMap::new();
        for pair in marks.windows(2) {
            let (a, b) = (&pair[0], &pair[1]);
            let ms = a.2.elapsed_ms(&b.2).map_err(|e| driver_err("cuEventElapsedTime", e))?;
            *out.entry((b.0, b.1)).or_insert(0.0) += f64::from(ms);
        }
        Ok(out)
    }
}
