//! Ctrl-C (SIGINT) and SIGTERM stop a run cleanly.
//!
//! [`install`] sets a handler that does one async-signal-safe thing: it sets
//! a flag. The long loops (generation, once per layer) call [`check`], which
//! turns the flag into [`Error::Interrupted`]; the error travels up like any
//! other, so the stack unwinds normally and every `Drop` runs on the way:
//!
//! - page-locked host memory (`tier-host`'s `HostStorage`) is given back
//!   with `cuMemFreeHost` or `cuMemHostUnregister`;
//! - GPU buffers are freed with their context;
//! - the disk tier's arena (`tier-disk`, `arena.rs` `create_file`, used by
//!   `device.rs` `DiskDevice::new`) is opened with `O_CREAT | O_EXCL` and
//!   unlinked at once, before any tensor is placed in it: the offload
//!   directory never holds its name for longer than that, and its blocks go
//!   back to the filesystem when the last descriptor closes, that is when
//!   the `DiskDevice` drops (or, at the latest, when the process ends).
//!
//! `tierlm` then prints the error and exits with status 128 + the signal's
//! number: 130 for SIGINT (the shell's convention), 143 for SIGTERM.
//!
//! A second signal while the first is being honoured (a loop that has no
//! [`check`] yet, or a slow unwind) ends the process at once: the handler
//! restores the default disposition and re-raises the signal, so the parent
//! sees a death by SIGINT (or SIGTERM), not an ordinary exit status. That is
//! what shells and `make` look for to stop a whole script, which an
//! `_exit(130)` would not tell them. Nothing is left behind either way: the
//! kernel unpins and frees page-locked memory when the process dies, the
//! CUDA driver's resources go with the process, and the arena file, already
//! unlinked, disappears when its descriptor closes.
//!
//! A signal that was ignored when the process started (`nohup`, a
//! background job of a non-interactive shell) stays ignored, as the
//! convention for signal handlers asks.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Once;

use crate::error::{Error, Result};

/// Set by the handler at the first signal.
static REQUESTED: AtomicBool = AtomicBool::new(false);
/// The first signal's number (0 before any).
static SIGNAL: AtomicI32 = AtomicI32::new(0);
static INSTALL: Once = Once::new();

/// The signals that stop a run.
const SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

/// The handler: only atomics, `write`, `sigaction` and `raise`, all
/// async-signal-safe. The first signal sets the flag and says so on stderr;
/// the second ends the process.
extern "C" fn on_signal(sig: libc::c_int) {
    let _ = SIGNAL.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    if !REQUESTED.swap(true, Ordering::SeqCst) {
        const MSG: &[u8] = b"\ntierlm: stopping cleanly (Ctrl-C again to quit at once)\n";
        // SAFETY: `write` is async-signal-safe; MSG is a static buffer of
        // MSG.len() bytes. A short or failed write only loses the notice.
        unsafe {
            libc::write(libc::STDERR_FILENO, MSG.as_ptr().cast(), MSG.len());
        }
    } else {
        // SAFETY: a zeroed `sigaction` is a valid value of the plain C
        // struct; `sigemptyset`, `sigaction` and `raise` are
        // async-signal-safe (POSIX) and get valid pointers to locals. The
        // raised signal is blocked while this handler runs (no
        // SA_NODEFER), so it is delivered, with the default action
        // (terminate), as soon as the handler returns.
        unsafe {
            let mut default: libc::sigaction = std::mem::zeroed();
            default.sa_sigaction = libc::SIG_DFL;
            libc::sigemptyset(&mut default.sa_mask);
            libc::sigaction(sig, &default, std::ptr::null_mut());
            libc::raise(sig);
        }
    }
}

/// Installs the handler for SIGINT and SIGTERM (once; later calls do
/// nothing). `tierlm` calls it for the commands that generate, which call
/// [`check`]; the others keep the default (a first Ctrl-C ends them).
pub fn install() {
    INSTALL.call_once(|| {
        for sig in SIGNALS {
            install_one(sig);
        }
    });
}

fn install_one(sig: libc::c_int) {
    // SAFETY: zeroed `sigaction` structs are valid values; `sigaction` and
    // `sigemptyset`/`sigaddset` get valid pointers to these locals. The
    // handler is an `extern "C" fn(c_int)` that touches only atomics and
    // async-signal-safe calls. A failure (an invalid signal number, which
    // these are not) leaves the default disposition, which is safe.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 || old.sa_sigaction == libc::SIG_IGN {
            return;
        }
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // Restart interrupted reads and writes rather than failing them
        // with EINTR: the flag is looked at between layers, not by I/O.
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        // Both signals blocked while either handler runs on this thread.
        for s in SIGNALS {
            libc::sigaddset(&mut action.sa_mask, s);
        }
        libc::sigaction(sig, &action, std::ptr::null_mut());
    }
}

/// Whether SIGINT or SIGTERM arrived since [`install`].
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// [`Error::Interrupted`] once a stop was requested; call it where stopping
/// is cheap and everything is in a consistent state (between layers).
pub fn check() -> Result<()> {
    if requested() {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}

/// The exit status of a run stopped by a signal: 128 + its number (130
/// for SIGINT, 143 for SIGTERM; 130 if none arrived).
pub fn exit_status() -> u8 {
    match SIGNAL.load(Ordering::SeqCst) {
        s @ 1..=127 => 128 + s as u8,
        _ => 128 + libc::SIGINT as u8,
    }
}
