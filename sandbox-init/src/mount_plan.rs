//! The sandbox's root file system as data: which host paths are bound where,
//! read-only or not, which tmpfs mounts, files and links exist. Built by
//! sandboxd (pure, unit-tested), executed step by step by `sandbox-init`
//! inside the new mount namespace before it pivots into the root.
//!
//! Paths in a plan are sandbox paths (absolute, normalised); the init
//! prefixes its staging directory. Sources the sandbox user could not reach
//! itself (the workspace, policy binds) are passed as descriptors opened by
//! sandboxd, so the init never resolves a host path it was not meant to.

use std::path::{Component, Path};

use serde::{Deserialize, Serialize};

/// Errors building a plan from a policy.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MountPlanError {
    /// A bind's sandbox path is not absolute and normalised.
    #[error("bind target {0:?} must be an absolute path without `.`, `..` or empty components")]
    BadTarget(String),
    /// A bind's sandbox path would cover part of the sandbox's own layout.
    #[error("bind target {target:?} would cover {reserved}, which the sandbox manages itself")]
    Reserved {
        /// The requested target.
        target: String,
        /// The reserved path it collides with.
        reserved: String,
    },
    /// Two binds target the same path.
    #[error("two binds target {0:?}")]
    Duplicate(String),
}

/// Where a bind mount's source comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BindSource {
    /// A world-readable host path the init may resolve itself (system
    /// directories, device nodes).
    Host(String),
    /// The n-th descriptor sandboxd passed with the spec: a detached mount
    /// tree (`open_tree`) to attach.
    Passed(usize),
}

/// One step of building the root, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "step")]
pub enum MountStep {
    /// Create a directory (parents must exist).
    Dir {
        /// Sandbox path.
        path: String,
        /// Permission bits.
        mode: u32,
    },
    /// Create a regular file with this content.
    File {
        /// Sandbox path.
        path: String,
        /// Content.
        content: String,
        /// Permission bits.
        mode: u32,
    },
    /// Create a symbolic link.
    Symlink {
        /// Sandbox path of the link.
        path: String,
        /// What it points to.
        target: String,
    },
    /// Bind-mount `source` on `target` (which exists by now), non-recursive,
    /// always `nosuid,nodev`; read-only unless `writable`.
    Bind {
        /// Source.
        source: BindSource,
        /// Sandbox path.
        target: String,
        /// Leave it writable.
        writable: bool,
        /// Keep device nodes usable (the /dev entries only).
        devices: bool,
    },
    /// Mount a fresh tmpfs.
    Tmpfs {
        /// Sandbox path.
        target: String,
        /// Size cap.
        size_bytes: u64,
        /// Permission bits of its root.
        mode: u32,
    },
    /// Mount a fresh procfs for the sandbox's pid namespace.
    Proc {
        /// Sandbox path.
        target: String,
    },
    /// Remount an earlier tmpfs read-only once it is populated.
    ReadOnly {
        /// Sandbox path.
        target: String,
    },
}

/// The sandbox paths landlock grants, by kind of access.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LandlockPaths {
    /// Read and execute.
    pub read_only: Vec<String>,
    /// Everything.
    pub read_write: Vec<String>,
    /// Read and write of existing device files.
    pub devices: Vec<String>,
}

/// A complete root.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MountPlan {
    /// Steps in order.
    pub steps: Vec<MountStep>,
    /// What landlock allows afterwards.
    pub landlock: LandlockPaths,
    /// How many descriptors the spec carries (workspace first, then the
    /// policy binds in order).
    pub passed_sources: usize,
}

/// What a host path is, as far as the plan cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEntry {
    /// A directory.
    Dir(String),
    /// A regular file.
    File(String),
    /// A symbolic link and its target (recreated, not followed).
    Symlink(String, String),
}

/// A bind the policy asks for; its source is passed as a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyBind {
    /// Sandbox path.
    pub target: String,
    /// Read-write.
    pub writable: bool,
    /// The source is a directory (else a file).
    pub is_dir: bool,
}

/// Inputs of [`MountPlan::build`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSpec {
    /// Top-level system paths that exist on the host (`/usr`, `/bin`,
    /// `/lib*`, `/sbin`), as found.
    pub system: Vec<HostEntry>,
    /// Extra read-only pieces of the host's `/etc` that exist (CA
    /// certificates, the loader cache, alternatives).
    pub etc: Vec<HostEntry>,
    /// Workspace mounted read-only.
    pub workspace_read_only: bool,
    /// `/tmp` (and `/dev/shm`) size cap.
    pub tmp_bytes: u64,
    /// Policy binds.
    pub binds: Vec<PolicyBind>,
    /// The sandbox user's uid and gid (inside the namespace).
    pub uid: u32,
}

/// The top-level host paths offered read-only to every sandbox.
pub const SYSTEM_PATHS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
];

/// Pieces of the host's `/etc` bound read-only when present.
pub const ETC_PATHS: &[&str] = &[
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/localtime",
];

/// Device nodes in the sandbox's `/dev`.
pub const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Sandbox paths a policy bind may not cover or sit beneath.
const RESERVED: &[&str] = &[
    "/",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc",
    "/proc",
    "/dev",
    "/sys",
    "/tmp",
    "/workspace",
];

/// The workspace inside the sandbox.
pub const WORKSPACE: &str = "/workspace";

impl MountPlan {
    /// Builds the root for `spec`.
    pub fn build(spec: &RootSpec) -> Result<Self, MountPlanError> {
        let mut plan = Self::default();
        // Listing `/` and walking the tree (`ls /`, `find /`) must work; the
        // root holds only what this plan puts there, all of it readable
        // anyway, and landlock's value here is in refusing writes.
        plan.landlock.read_only.push("/".to_owned());
        plan.host_entries(&spec.system);
        plan.etc(&spec.etc, spec.uid);
        plan.push_dir(WORKSPACE, 0o755);
        plan.bind(BindSource::Passed(0), WORKSPACE, !spec.workspace_read_only);
        plan.passed_sources = 1;
        if spec.workspace_read_only {
            plan.landlock.read_only.push(WORKSPACE.to_owned());
        } else {
            plan.landlock.read_write.push(WORKSPACE.to_owned());
        }
        plan.push_dir("/tmp", 0o1777);
        plan.steps.push(MountStep::Tmpfs {
            target: "/tmp".to_owned(),
            size_bytes: spec.tmp_bytes,
            mode: 0o1777,
        });
        plan.landlock.read_write.push("/tmp".to_owned());
        plan.push_dir("/proc", 0o555);
        plan.steps.push(MountStep::Proc {
            target: "/proc".to_owned(),
        });
        plan.landlock.read_only.push("/proc".to_owned());
        plan.dev(spec.tmp_bytes);
        plan.policy_binds(&spec.binds)?;
        Ok(plan)
    }

    fn push_dir(&mut self, path: &str, mode: u32) {
        self.steps.push(MountStep::Dir {
            path: path.to_owned(),
            mode,
        });
    }

    fn bind(&mut self, source: BindSource, target: &str, writable: bool) {
        self.steps.push(MountStep::Bind {
            source,
            target: target.to_owned(),
            writable,
            devices: false,
        });
    }

    fn host_entries(&mut self, entries: &[HostEntry]) {
        for entry in entries {
            match entry {
                HostEntry::Dir(path) => {
                    self.push_dir(path, 0o755);
                    self.bind(BindSource::Host(path.clone()), path, false);
                    self.landlock.read_only.push(path.clone());
                }
                HostEntry::File(path) => {
                    self.steps.push(MountStep::File {
                        path: path.clone(),
                        content: String::new(),
                        mode: 0o644,
                    });
                    self.bind(BindSource::Host(path.clone()), path, false);
                }
                HostEntry::Symlink(path, target) => self.steps.push(MountStep::Symlink {
                    path: path.clone(),
                    target: target.clone(),
                }),
            }
        }
    }

    fn etc(&mut self, etc: &[HostEntry], uid: u32) {
        self.push_dir("/etc", 0o755);
        for (name, content) in etc_files(uid) {
            self.steps.push(MountStep::File {
                path: format!("/etc/{name}"),
                content,
                mode: 0o644,
            });
        }
        self.host_entries(etc);
        self.landlock.read_only.push("/etc".to_owned());
    }

    fn dev(&mut self, shm_bytes: u64) {
        self.push_dir("/dev", 0o755);
        self.steps.push(MountStep::Tmpfs {
            target: "/dev".to_owned(),
            size_bytes: 64 * 1024,
            mode: 0o755,
        });
        for device in DEVICES {
            let path = format!("/dev/{device}");
            self.steps.push(MountStep::File {
                path: path.clone(),
                content: String::new(),
                mode: 0o666,
            });
            self.steps.push(MountStep::Bind {
                source: BindSource::Host(path.clone()),
                target: path.clone(),
                writable: true,
                devices: true,
            });
            self.landlock.devices.push(path);
        }
        for (link, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            self.steps.push(MountStep::Symlink {
                path: format!("/dev/{link}"),
                target: target.to_owned(),
            });
        }
        self.push_dir("/dev/shm", 0o755);
        self.steps.push(MountStep::ReadOnly {
            target: "/dev".to_owned(),
        });
        self.steps.push(MountStep::Tmpfs {
            target: "/dev/shm".to_owned(),
            size_bytes: shm_bytes,
            mode: 0o1777,
        });
        self.landlock.read_only.push("/dev".to_owned());
        self.landlock.read_write.push("/dev/shm".to_owned());
    }

    fn policy_binds(&mut self, binds: &[PolicyBind]) -> Result<(), MountPlanError> {
        let mut seen = std::collections::BTreeSet::new();
        for bind in binds {
            check_bind_target(&bind.target)?;
            if !seen.insert(bind.target.clone()) {
                return Err(MountPlanError::Duplicate(bind.target.clone()));
            }
        }
        let mut made: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        for bind in binds {
            let target = Path::new(&bind.target);
            let ancestors: Vec<&Path> = target
                .ancestors()
                .skip(1)
                .filter(|a| a.as_os_str() != "/")
                .collect();
            for ancestor in ancestors.into_iter().rev() {
                let ancestor = ancestor.to_string_lossy().into_owned();
                if made.insert(ancestor.clone()) {
                    self.push_dir(&ancestor, 0o755);
                }
            }
            if bind.is_dir {
                if made.insert(bind.target.clone()) {
                    self.push_dir(&bind.target, 0o755);
                }
            } else {
                self.steps.push(MountStep::File {
                    path: bind.target.clone(),
                    content: String::new(),
                    mode: 0o644,
                });
            }
            self.bind(
                BindSource::Passed(self.passed_sources),
                &bind.target,
                bind.writable,
            );
            self.passed_sources += 1;
            let list = if bind.writable {
                &mut self.landlock.read_write
            } else {
                &mut self.landlock.read_only
            };
            list.push(bind.target.clone());
        }
        Ok(())
    }
}

/// The minimal `/etc`: the sandbox user and no name service but `hosts`
/// (there is no DNS inside; names resolve through the egress proxy).
fn etc_files(uid: u32) -> Vec<(&'static str, String)> {
    vec![
        (
            "passwd",
            format!(
                "root:x:0:0:root:/root:/usr/sbin/nologin\n\
                 sandbox:x:{uid}:{uid}:sandbox:/workspace:/bin/sh\n\
                 nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
            ),
        ),
        (
            "group",
            format!("root:x:0:\nsandbox:x:{uid}:\nnogroup:x:65534:\n"),
        ),
        (
            "hosts",
            "127.0.0.1\tlocalhost sandbox\n::1\tlocalhost ip6-localhost\n".to_owned(),
        ),
        (
            "resolv.conf",
            "# No DNS inside the sandbox; use the HTTP(S) proxy in the environment.\n".to_owned(),
        ),
        (
            "nsswitch.conf",
            "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n".to_owned(),
        ),
    ]
}

fn check_bind_target(target: &str) -> Result<(), MountPlanError> {
    let path = Path::new(target);
    let normal = path.is_absolute()
        && (target == "/" || !target.ends_with('/'))
        && !target.contains("//")
        && path
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
    if !normal {
        return Err(MountPlanError::BadTarget(target.to_owned()));
    }
    for reserved in RESERVED {
        let covers =
            *reserved == "/" && target == "/" || *reserved != "/" && path.starts_with(reserved);
        if covers {
            return Err(MountPlanError::Reserved {
                target: target.to_owned(),
                reserved: (*reserved).to_owned(),
            });
        }
    }
    Ok(())
}

/// Looks at the host's top-level system paths and `/etc` pieces.
pub fn probe_host_entries(paths: &[&str]) -> Vec<HostEntry> {
    paths
        .iter()
        .filter_map(|path| {
            let meta = std::fs::symlink_metadata(path).ok()?;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(path).ok()?;
                Some(HostEntry::Symlink(
                    (*path).to_owned(),
                    target.to_string_lossy().into_owned(),
                ))
            } else if meta.is_dir() {
                Some(HostEntry::Dir((*path).to_owned()))
            } else if meta.is_file() {
                Some(HostEntry::File((*path).to_owned()))
            } else {
                None
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn spec() -> RootSpec {
        RootSpec {
            system: vec![
                HostEntry::Dir("/usr".into()),
                HostEntry::Symlink("/bin".into(), "usr/bin".into()),
            ],
            etc: vec![HostEntry::File("/etc/ld.so.cache".into())],
            workspace_read_only: false,
            tmp_bytes: 1 << 20,
            binds: vec![PolicyBind {
                target: "/opt/data".into(),
                writable: false,
                is_dir: true,
            }],
            uid: 1000,
        }
    }

    #[test]
    fn plan_binds_system_paths_read_only_and_recreates_links() {
        let plan = MountPlan::build(&spec()).unwrap();
        assert_eq!(
            plan.steps[..3],
            [
                MountStep::Dir {
                    path: "/usr".into(),
                    mode: 0o755
                },
                MountStep::Bind {
                    source: BindSource::Host("/usr".into()),
                    target: "/usr".into(),
                    writable: false,
                    devices: false
                },
                MountStep::Symlink {
                    path: "/bin".into(),
                    target: "usr/bin".into()
                },
            ]
        );
        assert_eq!(plan.passed_sources, 2);
        assert_eq!(
            plan.landlock,
            LandlockPaths {
                read_only: vec![
                    "/".into(),
                    "/usr".into(),
                    "/etc".into(),
                    "/proc".into(),
                    "/dev".into(),
                    "/opt/data".into()
                ],
                read_write: vec!["/workspace".into(), "/tmp".into(), "/dev/shm".into()],
                devices: DEVICES.iter().map(|d| format!("/dev/{d}")).collect(),
            }
        );
    }

    #[test]
    fn workspace_and_policy_binds_come_from_passed_descriptors() {
        let plan = MountPlan::build(&spec()).unwrap();
        let binds: Vec<_> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                MountStep::Bind {
                    source: BindSource::Passed(n),
                    target,
                    writable,
                    ..
                } => Some((*n, target.as_str(), *writable)),
                _ => None,
            })
            .collect();
        assert_eq!(
            binds,
            vec![(0, "/workspace", true), (1, "/opt/data", false)]
        );
        let dirs_before_bind: Vec<_> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                MountStep::Dir { path, .. } if path.starts_with("/opt") => Some(path.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(dirs_before_bind, vec!["/opt", "/opt/data"]);
    }

    #[test]
    fn tmp_is_a_capped_tmpfs_and_dev_is_minimal_and_read_only() {
        let plan = MountPlan::build(&spec()).unwrap();
        assert!(plan.steps.contains(&MountStep::Tmpfs {
            target: "/tmp".into(),
            size_bytes: 1 << 20,
            mode: 0o1777
        }));
        let device_binds: Vec<_> = plan
            .steps
            .iter()
            .filter_map(|s| match s {
                MountStep::Bind {
                    target,
                    devices: true,
                    ..
                } => Some(target.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(
            device_binds,
            vec![
                "/dev/null",
                "/dev/zero",
                "/dev/full",
                "/dev/random",
                "/dev/urandom",
                "/dev/tty"
            ]
        );
        assert!(plan.steps.contains(&MountStep::ReadOnly {
            target: "/dev".into()
        }));
    }

    #[test]
    fn minimal_etc_names_the_sandbox_user() {
        let plan = MountPlan::build(&spec()).unwrap();
        let passwd = plan.steps.iter().find_map(|s| match s {
            MountStep::File { path, content, .. } if path == "/etc/passwd" => Some(content),
            _ => None,
        });
        assert!(
            passwd
                .unwrap()
                .contains("sandbox:x:1000:1000:sandbox:/workspace:/bin/sh")
        );
    }

    #[test]
    fn bind_targets_are_checked() {
        let mut bad = spec();
        for (target, expected) in [
            ("relative", MountPlanError::BadTarget("relative".into())),
            (
                "/opt/../etc",
                MountPlanError::BadTarget("/opt/../etc".into()),
            ),
            (
                "/proc/sys",
                MountPlanError::Reserved {
                    target: "/proc/sys".into(),
                    reserved: "/proc".into(),
                },
            ),
            (
                "/workspace/x",
                MountPlanError::Reserved {
                    target: "/workspace/x".into(),
                    reserved: "/workspace".into(),
                },
            ),
            (
                "/",
                MountPlanError::Reserved {
                    target: "/".into(),
                    reserved: "/".into(),
                },
            ),
        ] {
            bad.binds[0].target = target.into();
            assert_eq!(MountPlan::build(&bad), Err(expected), "{target}");
        }
        let mut twice = spec();
        twice.binds.push(twice.binds[0].clone());
        assert_eq!(
            MountPlan::build(&twice),
            Err(MountPlanError::Duplicate("/opt/data".into()))
        );
    }

    #[test]
    fn probing_this_host_finds_usr() {
        let entries = probe_host_entries(SYSTEM_PATHS);
        assert!(
            entries.contains(&HostEntry::Dir("/usr".into())),
            "{entries:?}"
        );
    }
}
