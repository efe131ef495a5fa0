//! Host capability probes, run once at start-up and reported through the
//! `Capabilities` rpc. Parsing is pure and unit-tested; the few syscalls live
//! in [`crate::sys`].

use harness_proto::sandbox::v1 as pb;

/// What the host offers for isolation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostProbe {
    /// `uname -r`.
    pub kernel_release: String,
    /// A user namespace could be created.
    pub user_namespaces: bool,
    /// `/proc/sys/user/max_user_namespaces`.
    pub max_user_namespaces: u64,
    /// cgroup layout.
    pub cgroups: CgroupLayout,
    /// landlock ABI, 0 if unavailable.
    pub landlock_abi: u32,
    /// seccomp filter mode is available.
    pub seccomp_filter: bool,
    /// Missing features, each with its fix.
    pub missing: Vec<String>,
}

/// The host's cgroup hierarchies.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CgroupLayout {
    /// Controllers with a v1 hierarchy.
    pub v1_controllers: Vec<String>,
    /// Where cgroup2 is mounted, if it is.
    pub v2_mount: Option<String>,
    /// Controllers enabled at the v2 root.
    pub v2_controllers: Vec<String>,
}

impl CgroupLayout {
    /// The overall version classification.
    pub fn version(&self) -> pb::CgroupVersion {
        match (self.v1_controllers.is_empty(), self.v2_mount.is_some()) {
            (true, false) => pb::CgroupVersion::None,
            (false, false) => pb::CgroupVersion::V1,
            (true, true) => pb::CgroupVersion::V2,
            (false, true) => pb::CgroupVersion::Hybrid,
        }
    }
}

/// Probes the running host.
pub fn probe_host() -> HostProbe {
    let kernel_release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let max_user_namespaces = read_u64("/proc/sys/user/max_user_namespaces").unwrap_or(0);
    let user_ns = crate::sys::probe_user_namespace();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut cgroups = parse_cgroup_mounts(&mountinfo);
    if let Some(mount) = &cgroups.v2_mount {
        let controllers =
            std::fs::read_to_string(format!("{mount}/cgroup.controllers")).unwrap_or_default();
        cgroups.v2_controllers = controllers.split_whitespace().map(str::to_owned).collect();
    }
    let landlock_abi = crate::sys::landlock_abi_version().unwrap_or(0);
    let seccomp_filter = crate::sys::seccomp_filter_available();

    let mut missing = Vec::new();
    if let Err(err) = &user_ns {
        missing.push(format!(
            "user namespaces: unshare(CLONE_NEWUSER) failed ({err}); enable them with \
             `sysctl -w user.max_user_namespaces=15000` (and \
             `kernel.unprivileged_userns_clone=1` on Debian kernels)"
        ));
    }
    if cgroups.version() == pb::CgroupVersion::None {
        missing.push(
            "cgroups: no cgroup v1 or v2 hierarchy is mounted; mount cgroup2 at /sys/fs/cgroup"
                .to_owned(),
        );
    }
    if landlock_abi == 0 {
        missing.push(
            "landlock: not available; boot a kernel ≥ 5.13 with `lsm=landlock,...` on its \
             command line"
                .to_owned(),
        );
    }
    if !seccomp_filter {
        missing.push(
            "seccomp: filter mode unavailable; use a kernel built with CONFIG_SECCOMP_FILTER"
                .to_owned(),
        );
    }
    HostProbe {
        kernel_release,
        user_namespaces: user_ns.is_ok(),
        max_user_namespaces,
        cgroups,
        landlock_abi,
        seccomp_filter,
        missing,
    }
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Finds cgroup mounts in `/proc/self/mountinfo` text.
pub fn parse_cgroup_mounts(mountinfo: &str) -> CgroupLayout {
    let mut layout = CgroupLayout::default();
    for mount in cgroup_mounts(mountinfo) {
        if mount.v2 {
            if layout.v2_mount.is_none() {
                layout.v2_mount = Some(mount.mount_point);
            }
            continue;
        }
        for controller in mount.controllers {
            if !layout.v1_controllers.contains(&controller) {
                layout.v1_controllers.push(controller);
            }
        }
    }
    layout.v1_controllers.sort();
    layout
}

/// One cgroup filesystem mount, as `/proc/self/mountinfo` lists it.
///
/// The session cgroups need more than [`CgroupLayout`] says: where each v1
/// controller's hierarchy is mounted, and which part of the hierarchy the
/// mount shows (containers often mount only their own subtree).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    /// `true` for a cgroup2 mount, `false` for a v1 hierarchy.
    pub v2: bool,
    /// The v1 controllers bound to the hierarchy, in mount-option order;
    /// empty for cgroup2 and for named hierarchies such as `name=systemd`.
    pub controllers: Vec<String>,
    /// The cgroup path, within its hierarchy, that the mount's root shows
    /// (mountinfo field 4; `/` unless a subtree was bind-mounted).
    pub root: String,
    /// Where it is mounted.
    pub mount_point: String,
}

/// Every cgroup mount in `/proc/self/mountinfo` text, in mount order.
///
/// A mountinfo line is `id parent major:minor root mountpoint options
/// [optional fields...] - fstype source superoptions`; `root` and
/// `mountpoint` escape space, tab, newline and backslash as `\ooo` octal.
pub fn cgroup_mounts(mountinfo: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in mountinfo.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let mut post_fields = post.split_whitespace();
        let fstype = post_fields.next().unwrap_or_default();
        let _source = post_fields.next();
        let super_options = post_fields.next().unwrap_or_default();
        let mut pre_fields = pre.split_whitespace();
        let root = unescape_mountinfo(pre_fields.nth(3).unwrap_or_default());
        let mount_point = unescape_mountinfo(pre_fields.next().unwrap_or_default());
        match fstype {
            "cgroup2" => mounts.push(CgroupMount {
                v2: true,
                controllers: Vec::new(),
                root,
                mount_point,
            }),
            "cgroup" => mounts.push(CgroupMount {
                v2: false,
                controllers: super_options
                    .split(',')
                    .filter(|option| is_v1_controller(option))
                    .map(str::to_owned)
                    .collect(),
                root,
                mount_point,
            }),
            _ => {}
        }
    }
    mounts
}

/// Undoes mountinfo's `\ooo` octal escapes.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)))
            .and_then(|digits| std::str::from_utf8(digits).ok())
            .and_then(|digits| u8::from_str_radix(digits, 8).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_v1_controller(option: &str) -> bool {
    matches!(
        option,
        "cpu"
            | "cpuacct"
            | "cpuset"
            | "memory"
            | "pids"
            | "blkio"
            | "io"
            | "devices"
            | "freezer"
            | "net_cls"
            | "net_prio"
            | "perf_event"
            | "hugetlb"
            | "rdma"
            | "misc"
    )
}

impl HostProbe {
    /// The probe as the protobuf message.
    pub fn to_proto(&self) -> pb::HostIsolation {
        pb::HostIsolation {
            kernel_release: self.kernel_release.clone(),
            user_namespaces: self.user_namespaces,
            max_user_namespaces: self.max_user_namespaces,
            cgroups: Some(pb::CgroupInfo {
                version: self.cgroups.version() as i32,
                v1_controllers: self.cgroups.v1_controllers.clone(),
                v2_controllers: self.cgroups.v2_controllers.clone(),
                v2_mount: self.cgroups.v2_mount.clone().unwrap_or_default(),
            }),
            landlock_abi: self.landlock_abi,
            seccomp_filter: self.seccomp_filter,
            missing: self.missing.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 24 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:28 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 31 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
36 31 0:32 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,pids
37 31 0:33 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:16 - cgroup cgroup rw,cpu,cpuacct
";

    #[test]
    fn hybrid_layout_lists_v1_controllers_and_the_v2_mount() {
        let layout = parse_cgroup_mounts(HYBRID);
        assert_eq!(
            layout,
            CgroupLayout {
                v1_controllers: vec![
                    "cpu".to_owned(),
                    "cpuacct".to_owned(),
                    "memory".to_owned(),
                    "pids".to_owned()
                ],
                v2_mount: Some("/sys/fs/cgroup/unified".to_owned()),
                v2_controllers: vec![],
            }
        );
        assert_eq!(layout.version(), pb::CgroupVersion::Hybrid);
    }

    #[test]
    fn cgroup_mounts_keep_roots_and_unescape_mount_points() {
        let text = "\
35 31 0:31 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /mnt/my\\040cgroup rw shared:3 - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(
            cgroup_mounts(text),
            vec![
                CgroupMount {
                    v2: false,
                    controllers: vec!["memory".to_owned()],
                    root: "/docker/abc".to_owned(),
                    mount_point: "/sys/fs/cgroup/memory".to_owned(),
                },
                CgroupMount {
                    v2: false,
                    controllers: vec![],
                    root: "/".to_owned(),
                    mount_point: "/sys/fs/cgroup/systemd".to_owned(),
                },
                CgroupMount {
                    v2: true,
                    controllers: vec![],
                    root: "/".to_owned(),
                    mount_point: "/mnt/my cgroup".to_owned(),
                },
            ]
        );
    }

    #[test]
    fn pure_v2_and_no_cgroups_are_classified() {
        let v2 = "30 1 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cgroup_mounts(v2).version(), pb::CgroupVersion::V2);
        assert_eq!(parse_cgroup_mounts("").version(), pb::CgroupVersion::None);
    }

    #[test]
    fn probing_this_host_reports_a_kernel_release() {
        let probe = probe_host();
        assert!(!probe.kernel_release.is_empty());
        // Every missing feature must come with a fix.
        for note in &probe.missing {
            assert!(note.contains(';'), "note without a fix: {note}");
        }
    }
}
