//! The offload directory before any arena is made in it: created where
//! missing, refused clearly where it is a file, and asked for its free space
//! so that a placement can be checked before bytes go to disk.

use std::io;
use std::path::Path;

use tier_api::{Error, Result};

fn dir_error(dir: &Path, reason: impl Into<String>) -> Error {
    Error::OffloadDir { path: dir.to_path_buf(), reason: reason.into() }
}

/// Makes `dir` (and its parents) where it does not exist; refuses a path
/// that names, or lies under, something other than a directory.
pub fn check_offload_dir(dir: &Path) -> Result<()> {
    // The nearest part of the path that exists must be a directory.
    for (i, a) in dir.ancestors().filter(|a| !a.as_os_str().is_empty()).enumerate() {
        match std::fs::metadata(a) {
            Ok(m) if m.is_dir() => return Ok(()),
            Ok(m) if i == 0 => return Err(not_a_directory(dir, &m)),
            Ok(m) => {
                let what = if m.is_file() { "a file" } else { "not a directory" };
                return Err(dir_error(dir, format!("cannot be made: {} is {what}, not a directory", a.display())));
            }
            // Missing, or under a file (ENOTDIR): look further up.
            Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => continue,
            Err(e) => return Err(dir_error(dir, format!("cannot be inspected ({e}); check its permissions"))),
        }
    }
    Ok(())
}

/// [`check_offload_dir`], then makes the directory where it is missing.
pub fn prepare_offload_dir(dir: &Path) -> Result<()> {
    check_offload_dir(dir)?;
    std::fs::create_dir_all(dir)
        .map_err(|e| dir_error(dir, format!("cannot be created ({e}); choose a directory you can write to")))
}

/// The error for an offload path that is not a directory.
pub(crate) fn not_a_directory(dir: &Path, m: &std::fs::Metadata) -> Error {
    let what = if m.is_file() { "a file" } else { "not a directory" };
    dir_error(dir, format!("is {what}, not a directory; pass a directory with --offload-dir"))
}

/// Bytes an unprivileged user may still write on the file system holding
/// `dir` (statvfs: available blocks × fragment size). A directory that does
/// not exist yet is asked through its nearest existing ancestor.
pub fn free_bytes(dir: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let existing = dir.ancestors().find(|a| !a.as_os_str().is_empty() && a.exists()).unwrap_or(Path::new("."));
    let path =
        std::ffi::CString::new(existing.as_os_str().as_bytes()).map_err(|_| dir_error(dir, "contains a NUL byte"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string that outlives the call and
    // `st` has room for one `statvfs`, which the call fills on success.
    let rc = unsafe { libc::statvfs(path.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(dir_error(dir, format!("its free space cannot be asked (statvfs: {e})")));
    }
    // SAFETY: statvfs returned 0, so it initialised `st`.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // c_ulong is not u64 on every target
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Whether `dir` (or its nearest existing ancestor) is on tmpfs or ramfs,
/// whose files live in host memory: what is put there counts against RAM.
pub fn in_memory_fs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let existing = dir.ancestors().find(|a| !a.as_os_str().is_empty() && a.exists()).unwrap_or(Path::new("."));
    let Ok(path) = std::ffi::CString::new(existing.as_os_str().as_bytes()) else { return false };
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string that outlives the call and
    // `st` has room for one `statfs`, which the call fills on success.
    if unsafe { libc::statfs(path.as_ptr(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: statfs returned 0, so it initialised `st`.
    #[allow(clippy::unnecessary_cast)] // f_type is not i64 on every target
    let kind = unsafe { st.assume_init() }.f_type as i64;
    kind == TMPFS_MAGIC || kind == RAMFS_MAGIC
}

/// Refuses to put `need` bytes of `what` in `dir` when its file system has
/// less free space, naming both figures.
pub fn check_free(dir: &Path, need: u64, what: &str) -> Result<()> {
    let free = free_bytes(dir)?;
    if need > free {
        return Err(dir_error(
            dir,
            format!(
                "{what} need {need} bytes ({:.2} GiB) on disk, and its file system has {free} bytes ({:.2} GiB) \
                 free; free space, choose a larger disk with --offload-dir, or keep more in memory (--percent)",
                need as f64 / (1u64 << 30) as f64,
                free as f64 / (1u64 << 30) as f64
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_files_and_free_space() {
        let tmp = crate::test_dir();
        let nested = tmp.path().join("a/b");
        prepare_offload_dir(&nested).unwrap();
        assert!(nested.is_dir());
        prepare_offload_dir(&nested).unwrap();

        let file = tmp.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let err = prepare_offload_dir(&file).unwrap_err().to_string();
        assert!(err.contains("is a file, not a directory"), "{err}");
        let err = prepare_offload_dir(&file.join("sub")).unwrap_err().to_string();
        assert!(err.contains("cannot be made: ") && err.contains("f is a file, not a directory"), "{err}");
        check_offload_dir(&tmp.path().join("not/yet")).unwrap();
        assert!(!tmp.path().join("not").exists(), "checking makes nothing");

        assert!(in_memory_fs(Path::new("/dev/shm")) || !Path::new("/dev/shm").exists());
        assert!(!in_memory_fs(Path::new("/proc/self")));
        let free = free_bytes(tmp.path()).unwrap();
        assert!(free > 0);
        // A directory not made yet: its ancestor's file system.
        assert!(free_bytes(&tmp.path().join("later/on")).unwrap() > 0);
        check_free(tmp.path(), 1, "one byte").unwrap();
        let err = check_free(tmp.path(), u64::MAX, "the weights").unwrap_err().to_string();
        assert!(err.contains("the weights need 18446744073709551615 bytes") && err.contains("free"), "{err}");
    }
}
