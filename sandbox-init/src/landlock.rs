//! The process sandbox's landlock ruleset: which sandbox paths may be read,
//! written or executed, as data, and the one function that enforces it.
//!
//! Why landlock on top of the mount namespace: the session root already
//! contains only what the sandbox should see, with read-only binds where it
//! must not write. Landlock is defence in depth for when that construction is
//! wrong (a bind that should have been read-only, a forgotten mount): every
//! filesystem right the ruleset handles is denied everywhere except beneath
//! the paths the plan lists. It also denies device ioctls except on the
//! listed devices, which no mount option can express.
//!
//! The ruleset handles the filesystem rights of landlock ABI 5 ([`TARGET_ABI`],
//! Linux 6.10): ABI 6 and 7 add no filesystem rights, and later ones
//! (connecting to pathname Unix sockets) are left out until tested, as the
//! `landlock` crate advises. Network rights (ABI 4) and scopes (ABI 6) are not
//! handled: the network namespace and the egress proxy confine the network,
//! and handling TCP connect here would also cut the sandbox off from the
//! proxy.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd, PathFdError,
    Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetError, RulesetStatus, make_bitflags,
};

/// Failures applying the ruleset.
#[derive(Debug, thiserror::Error)]
pub enum LandlockError {
    /// The kernel could not be asked for its landlock ABI.
    #[error("cannot ask the kernel for its landlock ABI version")]
    ProbeAbi {
        /// The failing `landlock_create_ruleset` call.
        #[source]
        source: std::io::Error,
    },
    /// The policy requires landlock and the kernel cannot enforce the whole
    /// plan.
    #[error(
        "the policy requires landlock, but this kernel's landlock ABI is {kernel_abi} (0 means \
         none) and lacks {missing}; fix: run Linux {LINUX_FOR_TARGET_ABI} or later with landlock \
         enabled (CONFIG_SECURITY_LANDLOCK=y and `landlock` in the `lsm=` boot parameter), or \
         stop requiring landlock in the session policy"
    )]
    KernelTooOld {
        /// The kernel's ABI version, 0 without landlock.
        kernel_abi: u32,
        /// The missing features, each with the ABI and Linux release that
        /// brought it.
        missing: String,
    },
    /// The ruleset's handled rights were refused.
    #[error("cannot declare the rights the landlock ruleset handles")]
    HandleAccess {
        /// The landlock crate's report.
        #[source]
        source: RulesetError,
    },
    /// The kernel refused to create the ruleset.
    #[error("cannot create the landlock ruleset")]
    CreateRuleset {
        /// The landlock crate's report.
        #[source]
        source: RulesetError,
    },
    /// A listed path exists but could not be opened.
    #[error("cannot open {path:?} for a landlock rule")]
    OpenPath {
        /// The sandbox path.
        path: PathBuf,
        /// The failing open.
        #[source]
        source: PathFdError,
    },
    /// A listed path was opened but could not be inspected.
    #[error("cannot tell whether {path:?} is a directory")]
    StatPath {
        /// The sandbox path.
        path: PathBuf,
        /// The failing `fstat`.
        #[source]
        source: nix::Error,
    },
    /// The kernel refused a rule.
    #[error("cannot add the landlock rule for {path:?}")]
    AddRule {
        /// The sandbox path.
        path: PathBuf,
        /// The landlock crate's report.
        #[source]
        source: RulesetError,
    },
    /// The calling thread could not be restricted.
    #[error("cannot enforce the landlock ruleset")]
    RestrictSelf {
        /// The landlock crate's report.
        #[source]
        source: RulesetError,
    },
    /// The policy requires landlock, the kernel looked able, yet the ruleset
    /// was not fully enforced.
    #[error("the policy requires landlock, but the ruleset was only {outcome:?}")]
    NotFullyEnforced {
        /// What was enforced (the thread is restricted by at least this much).
        outcome: LandlockOutcome,
    },
}

/// The landlock ABI whose filesystem rights the ruleset handles.
pub const TARGET_ABI: ABI = ABI::V5;

/// The first Linux release with [`TARGET_ABI`].
pub const LINUX_FOR_TARGET_ABI: &str = "6.10";

/// Rights beneath read-only paths: read and list, and execute (binaries and
/// libraries live there).
pub const READ_ONLY_ACCESS: BitFlags<AccessFs> =
    make_bitflags!(AccessFs::{ReadFile | ReadDir | Execute});

/// Rights on device files: read and write, and ioctls, so terminals work.
pub const DEVICE_ACCESS: BitFlags<AccessFs> =
    make_bitflags!(AccessFs::{ReadFile | WriteFile | IoctlDev});

/// The ruleset, as data (pure).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LandlockPlan {
    /// Sandbox paths (directories or files) that may be read and executed.
    pub read_only: Vec<PathBuf>,
    /// Sandbox paths with every handled right (the workspace, `/tmp`, policy
    /// binds).
    pub read_write: Vec<PathBuf>,
    /// Device files that may be read, written and ioctl'd.
    pub devices: Vec<PathBuf>,
}

/// One rule of a plan: the rights allowed beneath a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRule {
    /// The sandbox path.
    pub path: PathBuf,
    /// The rights allowed beneath it (narrowed to file rights at enforcement
    /// when the path is not a directory).
    pub access: BitFlags<AccessFs>,
}

impl LandlockPlan {
    /// The sandbox's standard plan: `read_only` are the read-only binds (e.g.
    /// `/usr`, `/bin`, `/lib`, `/lib64`, `/etc`, `/proc`), `read_write` the
    /// writable ones (`/workspace`, `/tmp`, policy binds), `devices` the
    /// device files (`/dev/null`, `/dev/zero`, `/dev/full`, `/dev/random`,
    /// `/dev/urandom`, `/dev/tty`). Anything not listed is denied every
    /// handled right. Paths that do not exist when the plan is applied are
    /// skipped (hosts differ: not every one has `/lib64`), which denies them,
    /// the safe direction.
    pub fn new(read_only: Vec<PathBuf>, read_write: Vec<PathBuf>, devices: Vec<PathBuf>) -> Self {
        Self {
            read_only,
            read_write,
            devices,
        }
    }

    /// Every right the ruleset handles, that is denies unless a rule allows
    /// it: all filesystem rights of [`TARGET_ABI`].
    pub fn handled_access() -> BitFlags<AccessFs> {
        AccessFs::from_all(TARGET_ABI)
    }

    /// The rules, in order: read-only paths, read-write paths, devices.
    pub fn rules(&self) -> Vec<PathRule> {
        let class = |paths: &[PathBuf], access: BitFlags<AccessFs>| {
            paths
                .iter()
                .map(move |path| PathRule {
                    path: path.clone(),
                    access,
                })
                .collect::<Vec<_>>()
        };
        let mut rules = class(&self.read_only, READ_ONLY_ACCESS);
        rules.extend(class(&self.read_write, Self::handled_access()));
        rules.extend(class(&self.devices, DEVICE_ACCESS));
        rules
    }
}

/// What was enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LandlockOutcome {
    /// Every right of the plan is enforced.
    FullyEnforced {
        /// The kernel's landlock ABI.
        abi: u32,
    },
    /// The kernel enforces only the rights its ABI knows; the others are
    /// allowed everywhere.
    PartiallyEnforced {
        /// The kernel's landlock ABI.
        abi: u32,
    },
    /// The kernel has no landlock; nothing is enforced.
    NotEnforced,
}

/// A landlock feature the plan relies on, and where it first appeared.
struct Feature {
    what: &'static str,
    abi: u32,
    linux: &'static str,
}

/// Everything the plan uses, oldest first; the last is [`TARGET_ABI`].
const FEATURES: &[Feature] = &[
    Feature {
        what: "landlock itself",
        abi: 1,
        linux: "5.13",
    },
    Feature {
        what: "the refer right (renames and links across directories)",
        abi: 2,
        linux: "5.19",
    },
    Feature {
        what: "the truncate right",
        abi: 3,
        linux: "6.2",
    },
    Feature {
        what: "the ioctl_dev right (device ioctls)",
        abi: 5,
        linux: LINUX_FOR_TARGET_ABI,
    },
];

/// What a kernel with landlock ABI `kernel_abi` lacks to enforce the whole
/// plan, as one readable list; `None` when it lacks nothing.
fn missing_features(kernel_abi: u32) -> Option<String> {
    let missing: Vec<String> = FEATURES
        .iter()
        .filter(|feature| feature.abi > kernel_abi)
        .map(|feature| {
            format!(
                "{} (ABI {}, Linux {})",
                feature.what, feature.abi, feature.linux
            )
        })
        .collect();
    (!missing.is_empty()).then(|| missing.join(", "))
}

/// Applies the plan to the calling thread (paths are sandbox paths: this runs
/// after pivot_root). Precondition: no_new_privs already set (the landlock
/// crate sets it again, harmlessly). The restriction is inherited by every
/// child and kept across `execve`; it cannot be lifted. With `required`,
/// anything less than full enforcement of the plan's rights is an error
/// naming the missing kernel feature and the fix; without it, best effort.
/// An error may leave the thread unrestricted, so the caller must not go on
/// to run anything after one.
pub fn apply(plan: &LandlockPlan, required: bool) -> Result<LandlockOutcome, LandlockError> {
    let kernel_abi =
        crate::sys::landlock_abi_version().map_err(|source| LandlockError::ProbeAbi { source })?;
    if required && let Some(missing) = missing_features(kernel_abi) {
        return Err(LandlockError::KernelTooOld {
            kernel_abi,
            missing,
        });
    }

    let compatibility = if required {
        CompatLevel::HardRequirement
    } else {
        CompatLevel::BestEffort
    };
    let mut ruleset = Ruleset::default()
        .set_compatibility(compatibility)
        .handle_access(LandlockPlan::handled_access())
        .map_err(|source| LandlockError::HandleAccess { source })?
        .create()
        .map_err(|source| LandlockError::CreateRuleset { source })?;
    for rule in plan.rules() {
        let Some(opened) = open_rule_path(&rule.path)? else {
            continue;
        };
        // The kernel rejects directory-only rights on a file rule.
        let access = if is_directory(&opened, &rule.path)? {
            rule.access
        } else {
            rule.access & AccessFs::from_file(TARGET_ABI)
        };
        ruleset = ruleset
            .add_rule(PathBeneath::new(opened, access))
            .map_err(|source| LandlockError::AddRule {
                path: rule.path.clone(),
                source,
            })?;
    }
    let status = ruleset
        .restrict_self()
        .map_err(|source| LandlockError::RestrictSelf { source })?;

    let outcome = match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockOutcome::FullyEnforced { abi: kernel_abi },
        RulesetStatus::PartiallyEnforced => LandlockOutcome::PartiallyEnforced { abi: kernel_abi },
        RulesetStatus::NotEnforced => LandlockOutcome::NotEnforced,
    };
    if required && !matches!(outcome, LandlockOutcome::FullyEnforced { .. }) {
        return Err(LandlockError::NotFullyEnforced { outcome });
    }
    Ok(outcome)
}

/// Opens a rule's path (`O_PATH`, following symlinks: these are the
/// sandbox's own mount points); `None` when it does not exist.
fn open_rule_path(path: &Path) -> Result<Option<PathFd>, LandlockError> {
    match PathFd::new(path) {
        Ok(fd) => Ok(Some(fd)),
        Err(PathFdError::OpenCall { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(None)
        }
        Err(source) => Err(LandlockError::OpenPath {
            path: path.to_owned(),
            source,
        }),
    }
}

fn is_directory(fd: &PathFd, path: &Path) -> Result<bool, LandlockError> {
    let stat = nix::sys::stat::fstat(fd.as_fd()).map_err(|source| LandlockError::StatPath {
        path: path.to_owned(),
        source,
    })?;
    Ok(stat.st_mode & libc::S_IFMT == libc::S_IFDIR)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::io::ErrorKind;

    use super::*;

    fn paths(list: &[&str]) -> Vec<PathBuf> {
        list.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn plan_maps_each_class_to_its_rights() {
        let plan = LandlockPlan::new(
            paths(&["/usr", "/etc"]),
            paths(&["/workspace", "/tmp"]),
            paths(&["/dev/null", "/dev/tty"]),
        );
        let read_only = make_bitflags!(AccessFs::{Execute | ReadFile | ReadDir});
        let read_write = make_bitflags!(AccessFs::{
            Execute | WriteFile | ReadFile | ReadDir | RemoveDir | RemoveFile | MakeChar
            | MakeDir | MakeReg | MakeSock | MakeFifo | MakeBlock | MakeSym | Refer | Truncate
            | IoctlDev
        });
        let device = make_bitflags!(AccessFs::{ReadFile | WriteFile | IoctlDev});
        let rule = |path: &str, access| PathRule {
            path: PathBuf::from(path),
            access,
        };
        assert_eq!(
            plan.rules(),
            vec![
                rule("/usr", read_only),
                rule("/etc", read_only),
                rule("/workspace", read_write),
                rule("/tmp", read_write),
                rule("/dev/null", device),
                rule("/dev/tty", device),
            ]
        );
        assert_eq!(LandlockPlan::handled_access(), read_write);
    }

    #[test]
    fn target_abi_is_the_newest_feature_the_plan_uses() {
        let newest = FEATURES.last().unwrap();
        assert_eq!(newest.abi, TARGET_ABI as u32);
        assert_eq!(newest.linux, LINUX_FOR_TARGET_ABI);
    }

    #[test]
    fn missing_features_name_what_each_kernel_lacks() {
        let none = missing_features(0).unwrap();
        assert!(
            none.starts_with("landlock itself (ABI 1, Linux 5.13)"),
            "{none}"
        );
        assert_eq!(
            missing_features(3).unwrap(),
            "the ioctl_dev right (device ioctls) (ABI 5, Linux 6.10)"
        );
        assert_eq!(missing_features(5), None);
        assert_eq!(missing_features(7), None);
        let message = LandlockError::KernelTooOld {
            kernel_abi: 3,
            missing: missing_features(3).unwrap(),
        }
        .to_string();
        assert!(message.contains("ioctl_dev"), "{message}");
        assert!(message.contains("Linux 6.10 or later"), "{message}");
    }

    use crate::sys::in_forked_child;

    fn expect_denied<T: std::fmt::Debug>(
        failures: &mut Vec<String>,
        what: &str,
        result: std::io::Result<T>,
    ) {
        match result {
            Err(err) if err.kind() == ErrorKind::PermissionDenied => {}
            other => failures.push(format!("{what}: expected EACCES, got {other:?}")),
        }
    }

    fn expect_allowed<T>(failures: &mut Vec<String>, what: &str, result: std::io::Result<T>) {
        if let Err(err) = result {
            failures.push(format!("{what}: expected success, got {err}"));
        }
    }

    #[test]
    fn applied_plan_confines_a_child() {
        let abi = crate::sys::landlock_abi_version().unwrap();
        assert!(
            abi >= TARGET_ABI as u32,
            "this kernel's landlock ABI is {abi} (0 means none); the test needs ABI {} \
             (Linux {LINUX_FOR_TARGET_ABI}) with landlock enabled (CONFIG_SECURITY_LANDLOCK=y, \
             `landlock` in the `lsm=` boot parameter)",
            TARGET_ABI as u32
        );

        let root = tempfile::tempdir().unwrap();
        let read_only = root.path().join("ro");
        let read_write = root.path().join("rw");
        std::fs::create_dir(&read_only).unwrap();
        std::fs::create_dir(&read_write).unwrap();
        std::fs::write(read_only.join("existing"), "ro").unwrap();
        std::fs::write(root.path().join("unlisted"), "outside").unwrap();
        let plan = LandlockPlan::new(
            vec![read_only.clone(), root.path().join("does-not-exist")],
            vec![read_write.clone()],
            paths(&["/dev/null"]),
        );

        let failures = in_forked_child(|| {
            if let Err(err) = nix::sys::prctl::set_no_new_privs() {
                return vec![format!("set_no_new_privs: {err}")];
            }
            match apply(&plan, true) {
                Ok(LandlockOutcome::FullyEnforced { abi: enforced }) if enforced == abi => {}
                other => return vec![format!("apply: expected full enforcement, got {other:?}")],
            }
            let mut failures = Vec::new();
            expect_allowed(
                &mut failures,
                "read in the read-only dir",
                std::fs::read(read_only.join("existing")),
            );
            expect_denied(
                &mut failures,
                "create in the read-only dir",
                std::fs::write(read_only.join("new"), "x"),
            );
            expect_denied(
                &mut failures,
                "open for writing in the read-only dir",
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(read_only.join("existing")),
            );
            expect_allowed(
                &mut failures,
                "create in the read-write dir",
                std::fs::write(read_write.join("new"), "x"),
            );
            expect_allowed(
                &mut failures,
                "rename in the read-write dir",
                std::fs::rename(read_write.join("new"), read_write.join("renamed")),
            );
            expect_allowed(
                &mut failures,
                "remove in the read-write dir",
                std::fs::remove_file(read_write.join("renamed")),
            );
            expect_denied(
                &mut failures,
                "read an unlisted file",
                std::fs::read(root.path().join("unlisted")),
            );
            expect_denied(
                &mut failures,
                "list an unlisted dir",
                std::fs::read_dir(root.path()),
            );
            expect_allowed(
                &mut failures,
                "write to /dev/null",
                std::fs::write("/dev/null", "x"),
            );
            expect_denied(
                &mut failures,
                "read an unlisted device",
                std::fs::File::open("/dev/zero"),
            );
            failures
        });
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
