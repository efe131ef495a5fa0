//! The control plane's only `unsafe`: system calls that neither `std` nor
//! `nix` wraps. Each takes safe arguments and returns `std::io::Result`.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Starts writing `file`'s dirty pages back to disk and returns without
/// waiting for them (`sync_file_range(SYNC_FILE_RANGE_WRITE)` over the whole
/// file). Durability is unchanged (this flushes no disk cache and promises
/// nothing); what it buys is that a later `fsync` finds little left to do.
pub fn start_writeback(file: &File) -> std::io::Result<()> {
    // SAFETY: the descriptor is open for the duration of the call (borrowed
    // from `file`); sync_file_range reads no memory of ours.
    let result =
        unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::io::Write as _;

    use super::*;

    #[test]
    fn writeback_starts_on_a_file_and_is_refused_on_a_pipe() {
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(&[7; 64 * 1024]).unwrap();
        start_writeback(&file).unwrap();
        let (reader, _writer) = std::io::pipe().unwrap();
        let pipe = File::from(std::os::fd::OwnedFd::from(reader));
        assert_eq!(
            start_writeback(&pipe).unwrap_err().raw_os_error(),
            Some(libc::ESPIPE)
        );
    }
}
