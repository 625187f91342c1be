//! `runtime::interrupt` in this process: a signal sets the flag that
//! `check` turns into `Error::Interrupted`. Its own test binary, one test,
//! so that no other test sees the flag set.

use runtime::{interrupt, Error};

#[test]
fn a_signal_sets_the_flag_and_an_ignored_one_stays_ignored() {
    // SAFETY: `signal` with SIG_DFL / SIG_IGN changes this process's
    // dispositions; nothing else in this test binary handles signals.
    // SIGINT at its default (a runner started in the background ignores
    // it), SIGTERM ignored as if by the parent: `install` must keep that.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
    interrupt::install();
    interrupt::install(); // idempotent
    assert!(!interrupt::requested());
    assert!(interrupt::check().is_ok());

    // SAFETY: raise(3) on this thread; SIGTERM is ignored.
    assert_eq!(unsafe { libc::raise(libc::SIGTERM) }, 0);
    assert!(!interrupt::requested(), "a signal ignored on entry stays ignored");

    // SAFETY: raise(3) on this thread; the handler installed above only
    // sets the flag (and writes a notice to stderr), and runs before
    // raise returns.
    assert_eq!(unsafe { libc::raise(libc::SIGINT) }, 0);
    assert!(interrupt::requested());
    let err = interrupt::check().unwrap_err();
    assert!(matches!(err, Error::Interrupted), "{err:?}");
    assert!(err.to_string().contains("interrupted"), "{err}");
    assert_eq!(interrupt::exit_status(), 130);
    // Still set: every later check stops too.
    assert!(interrupt::check().is_err());
}
