//! Size-capped tmpfs mounts that back session workspaces.
//!
//! A workspace on its own tmpfs has a cap the kernel enforces for every
//! writer: `WriteFiles`, a WASI tool writing through its preopen, any
//! process in a process sandbox. A write past `size=` or `nr_inodes=` fails
//! with `ENOSPC` at the writer, and nothing else on the host fills up.
//! Options are built by a pure function ([`mount_options`]) and applied in
//! one place ([`mount`]).

use std::path::Path;

use nix::mount::{MntFlags, MsFlags};

/// Why a tmpfs workspace could not be mounted or unmounted.
#[derive(Debug, thiserror::Error)]
pub enum TmpfsError {
    /// tmpfs reads 0 as "unlimited", so a zero cap is refused, not mounted.
    #[error("a tmpfs workspace needs a non-zero {what}; 0 would mean unlimited")]
    Unlimited {
        /// Which limit was zero.
        what: &'static str,
    },
    /// mount(2) failed.
    #[error(
        "cannot mount a tmpfs workspace at {path}{hint}",
        hint = if *source == nix::errno::Errno::EPERM {
            ": sandboxd needs CAP_SYS_ADMIN (run it as root) for workspace-storage = \"tmpfs\", \
             or set workspace-storage = \"directory\" (which caps WriteFiles only)"
        } else {
            ""
        }
    )]
    Mount {
        /// The mount point.
        path: String,
        /// Why.
        #[source]
        source: nix::errno::Errno,
    },
    /// umount2(2) failed.
    #[error("cannot unmount the tmpfs workspace at {path}")]
    Unmount {
        /// The mount point.
        path: String,
        /// Why.
        #[source]
        source: nix::errno::Errno,
    },
}

/// The tmpfs options for a workspace holding at most `size_cap` bytes (in
/// whole pages: tmpfs rounds up, and every non-empty file takes at least
/// one) and `max_files` inodes (files, directories and links, the root
/// included). Mode 0700: only its owner may enter.
pub fn mount_options(size_cap: u64, max_files: u64) -> Result<String, TmpfsError> {
    if size_cap == 0 {
        return Err(TmpfsError::Unlimited { what: "size cap" });
    }
    if max_files == 0 {
        return Err(TmpfsError::Unlimited { what: "file count" });
    }
    Ok(format!("size={size_cap},nr_inodes={max_files},mode=0700"))
}

/// Mounts a fresh tmpfs on the (existing, empty) directory `root`: no
/// setuid or device files take effect in it.
pub fn mount(root: &Path, size_cap: u64, max_files: u64) -> Result<(), TmpfsError> {
    let options = mount_options(size_cap, max_files)?;
    nix::mount::mount(
        Some("tmpfs"),
        root,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(|source| TmpfsError::Mount {
        path: root.display().to_string(),
        source,
    })
}

/// Detaches the tmpfs at `root`. Its memory is freed once nothing holds it
/// (a process sandbox's clone of the mount goes with its namespace).
pub fn unmount(root: &Path) -> Result<(), TmpfsError> {
    nix::mount::umount2(root, MntFlags::MNT_DETACH).map_err(|source| TmpfsError::Unmount {
        path: root.display().to_string(),
        source,
    })
}

/// Unmounts whatever is mounted on `path`, if anything: a no-op for a plain
/// directory (the kernel answers `EINVAL`).
pub fn unmount_if_mounted(path: &Path) -> Result<(), TmpfsError> {
    match unmount(path) {
        Err(TmpfsError::Unmount {
            source: nix::errno::Errno::EINVAL,
            ..
        }) => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn options_carry_both_caps_and_refuse_unlimited() {
        assert_eq!(
            mount_options(1 << 20, 4096).unwrap(),
            "size=1048576,nr_inodes=4096,mode=0700"
        );
        assert!(matches!(
            mount_options(0, 4096),
            Err(TmpfsError::Unlimited { what: "size cap" })
        ));
        assert!(matches!(
            mount_options(1 << 20, 0),
            Err(TmpfsError::Unlimited { what: "file count" })
        ));
    }

    #[test]
    fn a_permission_error_says_how_to_fix_it() {
        let error = TmpfsError::Mount {
            path: "/var/lib/sandboxd/sessions/x".to_owned(),
            source: nix::errno::Errno::EPERM,
        };
        let text = error.to_string();
        assert!(
            text.contains("CAP_SYS_ADMIN") && text.contains("workspace-storage"),
            "{text}"
        );
    }
}
