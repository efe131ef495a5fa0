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

/// Gives the calling thread the lowest CPU priority (nice 19): it runs when
/// the threads that serve sessions leave a core free. Lowering one's own
/// priority needs no privilege; on Linux it applies to this thread alone.
pub fn lower_this_threads_priority() -> std::io::Result<()> {
    // SAFETY: setpriority takes plain integers and touches no memory of ours;
    // `who = 0` with PRIO_PROCESS names the calling thread on Linux.
    let result = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
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
    fn a_thread_lowers_its_own_priority_and_no_other() {
        let nice_of = |tid: i32| -> i64 {
            let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
            let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
            // Field 19 of stat (nice); `fields[0]` is field 3.
            fields[16].parse().unwrap()
        };
        let main_tid = nix::unistd::gettid().as_raw();
        let before = nice_of(main_tid);
        let lowered = std::thread::spawn(move || {
            lower_this_threads_priority().unwrap();
            nice_of(nix::unistd::gettid().as_raw())
        })
        .join()
        .unwrap();
        assert_eq!((lowered, nice_of(main_tid)), (19, before));
    }

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
