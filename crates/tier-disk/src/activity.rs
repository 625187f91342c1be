//! What the disk is doing: operations in flight, how long it had any,
//! bytes moved — the evidence that tells a disk kept busy but slow from a
//! disk left idle by whoever should be submitting to it.
//!
//! Every operation the driver hands to a backend is counted from its
//! submission to its completion (retries of a short transfer stay one
//! operation), device-wide, over every session at once. [`IoActivity`]
//! integrates over time: seconds with at least one operation in flight
//! (`busy_s`) and operations × seconds (`depth_s`, so `depth_s / busy_s` is
//! the mean queue depth while busy), and keeps the most operations ever in
//! flight at once since [`IoActivity::take_peak`] (the trace hook tests
//! use: it does not depend on timing). A window between two
//! [`IoSnapshot`]s ([`IoSnapshot::since`]) gives a phase's figures.

use parking_lot::Mutex;
use std::time::Instant;
use tier_api::IoOp;

/// Device-wide counters of the operations in flight (see the module).
#[derive(Debug)]
pub struct IoActivity {
    tally: Mutex<Tally>,
}

#[derive(Debug, Clone, Copy)]
struct Tally {
    in_flight: usize,
    peak: usize,
    ops: u64,
    bytes_read: u64,
    bytes_written: u64,
    busy_s: f64,
    depth_s: f64,
    since: Instant,
}

impl Tally {
    /// Accounts the time since the last change at the depth it had.
    fn advance(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.since).as_secs_f64();
        if self.in_flight > 0 {
            self.busy_s += dt;
            self.depth_s += dt * self.in_flight as f64;
        }
        self.since = now;
    }
}

impl Default for IoActivity {
    fn default() -> Self {
        IoActivity {
            tally: Mutex::new(Tally {
                in_flight: 0,
                peak: 0,
                ops: 0,
                bytes_read: 0,
                bytes_written: 0,
                busy_s: 0.0,
                depth_s: 0.0,
                since: Instant::now(),
            }),
        }
    }
}

impl IoActivity {
    /// An operation went to the backend.
    pub(crate) fn begin(&self) {
        let mut t = self.tally.lock();
        t.advance(Instant::now());
        t.in_flight += 1;
        t.peak = t.peak.max(t.in_flight);
    }

    /// An operation came back, having moved `bytes` (0 when it failed).
    pub(crate) fn end(&self, op: IoOp, bytes: u64) {
        let mut t = self.tally.lock();
        t.advance(Instant::now());
        t.in_flight = t.in_flight.saturating_sub(1);
        t.ops += 1;
        match op {
            IoOp::Read => t.bytes_read += bytes,
            IoOp::Write => t.bytes_written += bytes,
        }
    }

    /// The counters now.
    pub fn snapshot(&self) -> IoSnapshot {
        let mut t = self.tally.lock();
        let now = Instant::now();
        t.advance(now);
        IoSnapshot {
            at: now,
            in_flight: t.in_flight,
            peak_in_flight: t.peak,
            ops: t.ops,
            bytes_read: t.bytes_read,
            bytes_written: t.bytes_written,
            busy_s: t.busy_s,
            depth_s: t.depth_s,
        }
    }

    /// The most operations in flight at once since the last call (or the
    /// device's start); the count starts again from those in flight now.
    pub fn take_peak(&self) -> usize {
        let mut t = self.tally.lock();
        let peak = t.peak;
        t.peak = t.in_flight;
        peak
    }
}

/// [`IoActivity`]'s counters at one moment.
#[derive(Debug, Clone, Copy)]
pub struct IoSnapshot {
    pub at: Instant,
    /// Operations in flight at that moment.
    pub in_flight: usize,
    /// The most at once since the last [`IoActivity::take_peak`].
    pub peak_in_flight: usize,
    /// Operations completed.
    pub ops: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Seconds with at least one operation in flight.
    pub busy_s: f64,
    /// Operations × seconds in flight.
    pub depth_s: f64,
}

impl IoSnapshot {
    /// The window from `earlier` to this snapshot.
    pub fn since(&self, earlier: &IoSnapshot) -> IoWindow {
        IoWindow {
            wall_s: self.at.saturating_duration_since(earlier.at).as_secs_f64(),
            ops: self.ops.saturating_sub(earlier.ops),
            bytes_read: self.bytes_read.saturating_sub(earlier.bytes_read),
            bytes_written: self.bytes_written.saturating_sub(earlier.bytes_written),
            busy_s: (self.busy_s - earlier.busy_s).max(0.0),
            depth_s: (self.depth_s - earlier.depth_s).max(0.0),
            peak_in_flight: self.peak_in_flight,
        }
    }
}

/// The disk's activity over a window of time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IoWindow {
    pub wall_s: f64,
    pub ops: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Seconds of the window with at least one operation in flight.
    pub busy_s: f64,
    pub depth_s: f64,
    /// The most operations in flight at once (since the later snapshot's
    /// last [`IoActivity::take_peak`]).
    pub peak_in_flight: usize,
}

impl IoWindow {
    /// The share of the window the disk had work, 0..=1.
    pub fn busy_fraction(&self) -> f64 {
        if self.wall_s > 0.0 {
            (self.busy_s / self.wall_s).min(1.0)
        } else {
            0.0
        }
    }

    /// Mean operations in flight while it had any.
    pub fn mean_depth(&self) -> f64 {
        if self.busy_s > 0.0 {
            self.depth_s / self.busy_s
        } else {
            0.0
        }
    }

    /// Bytes moved (both ways) per second of busy time: the rate the disk
    /// gave while it had work.
    pub fn busy_rate(&self) -> f64 {
        if self.busy_s > 0.0 {
            (self.bytes_read + self.bytes_written) as f64 / self.busy_s
        } else {
            0.0
        }
    }
}

impl std::fmt::Display for IoWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} GB read, {:.2} GB written in {:.2} s: busy {:.2} s ({:.0}%), {:.2} GB/s while busy, \
             mean depth {:.1} while busy, peak {}",
            self.bytes_read as f64 / 1e9,
            self.bytes_written as f64 / 1e9,
            self.wall_s,
            self.busy_s,
            100.0 * self.busy_fraction(),
            self.busy_rate() / 1e9,
            self.mean_depth(),
            self.peak_in_flight
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_depth_and_bytes() {
        let a = IoActivity::default();
        let s0 = a.snapshot();
        a.begin();
        a.begin();
        a.begin();
        assert_eq!(a.snapshot().in_flight, 3);
        a.end(IoOp::Read, 10);
        a.end(IoOp::Write, 7);
        a.end(IoOp::Read, 0);
        let w = a.snapshot().since(&s0);
        assert_eq!((w.ops, w.bytes_read, w.bytes_written, w.peak_in_flight), (3, 10, 7, 3));
        assert!(w.busy_s <= w.wall_s + 1e-9 && w.depth_s >= w.busy_s);
        assert!(w.mean_depth() == 0.0 || (0.999..=3.001).contains(&w.mean_depth()), "{w}");
        assert_eq!(a.take_peak(), 3);
        assert_eq!(a.take_peak(), 0, "the peak starts again from those in flight");
    }
}
