//! Containing panics raised inside third-party libraries on bad input.
//!
//! Some libraries tierlm feeds user files to (the tokenizers crate, found by
//! fuzzing) panic on malformed input instead of returning an error.
//! [`contain`] runs such a call under `catch_unwind` and turns a panic into
//! a message the caller wraps in its own error, naming the file. While a
//! contained call runs, the panic hook installed by [`install_quiet_hook`]
//! prints nothing, so the user sees only that error, not a backtrace.

use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// Depth of [`contain`] calls running on this thread.
    static CONTAINED: Cell<u32> = const { Cell::new(0) };
}

/// Runs `f`; a panic inside it becomes `Err` with the panic's message.
///
/// For calls into libraries that may panic on malformed input only: a
/// panic in tierlm's own code is a bug and is not contained.
pub fn contain<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    CONTAINED.with(|c| c.set(c.get().saturating_add(1)));
    let result = catch_unwind(AssertUnwindSafe(f));
    CONTAINED.with(|c| c.set(c.get().saturating_sub(1)));
    result.map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
            .unwrap_or_else(|| "the library panicked".to_string())
    })
}

/// Wraps the process's panic hook so that panics inside [`contain`] print
/// nothing; every other panic prints as before. Idempotent.
pub fn install_quiet_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if CONTAINED.with(Cell::get) == 0 {
                previous(info);
            }
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message() {
        install_quiet_hook();
        let r: Result<(), String> = contain(|| panic!("index {} out of bounds", 4));
        assert_eq!(r, Err("index 4 out of bounds".to_string()));
        assert_eq!(contain(|| 7), Ok(7));
        // Depth returns to zero after a contained panic.
        assert_eq!(CONTAINED.with(Cell::get), 0);
    }
}
