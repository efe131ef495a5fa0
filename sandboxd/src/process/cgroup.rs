//! Session cgroups: one per process-backend session, created before any user
//! code runs, limiting memory, processes and CPU, and killed and removed when
//! the session ends.
//!
//! Why a cgroup: the limits must be set by someone the sandbox cannot
//! influence, and teardown must reach every process the session ever forked,
//! including ones that double-forked away from the sandbox init. rlimits and
//! process groups give neither; a cgroup gives both.
//!
//! **Layout.** Session cgroups live in a dedicated directory
//! [`DEDICATED_DIR`] beneath a parent cgroup: the configured parent, else
//! sandboxd's own cgroup in each hierarchy (from `/proc/self/cgroup`). Each
//! is named by its session id, so `<parent>/harness-sandboxd/sbx-<hex>`.
//! Everything under the dedicated directory belongs to this sandboxd:
//! [`CgroupHierarchy::sweep_leftovers`] kills and removes all of it at
//! start-up, so two daemons must not share one parent.
//!
//! **Version.** cgroup v2 is used when the v2 parent offers all of
//! `memory`, `pids` and `cpu`; otherwise each controller comes from its v1
//! hierarchy (plus the v1 `freezer`, when mounted, for a race-free kill), and
//! a controller that v1 lacks but v2 offers is taken from v2. A controller
//! that neither has makes [`CgroupHierarchy::detect`] fail closed, naming the
//! fix.
//!
//! **cgroup v2 rules.** A v2 cgroup whose children have controllers must
//! itself hold no processes (the root excepted). So the parent cannot be a
//! cgroup sandboxd itself runs in: [`CgroupHierarchy::from_host`] refuses a
//! non-root parent that holds processes, and [`CgroupHierarchy::create`]
//! reports `EBUSY` from `cgroup.subtree_control` the same way, with the fix
//! (configure a parent that holds no processes, e.g. systemd `Delegate=yes`
//! with `DelegateSubgroup=supervisor` and the unit's cgroup as the parent).
//! Controllers are enabled in `cgroup.subtree_control` of the parent and of
//! the dedicated directory; the parent must already exist and offer them.
//!
//! **Shape.** Detection and planning are pure (text in, data out) and
//! unit-tested with fixture text; the side effects are small functions that
//! apply a plan step or read a control file. Everything here blocks (file
//! I/O; teardown polls for up to a few seconds), so async callers should use
//! `spawn_blocking`.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::probe::{CgroupMount, cgroup_mounts};

/// The directory beneath the parent cgroup that holds the session cgroups.
pub const DEDICATED_DIR: &str = "harness-sandboxd";
/// The CFS period written with every CPU limit, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The smallest CFS quota the kernel accepts, in microseconds; smaller CPU
/// limits are raised to it (1% of a CPU with [`CPU_PERIOD_US`]).
pub const MIN_CPU_QUOTA_US: u64 = 1_000;

const MOUNTINFO: &str = "/proc/self/mountinfo";
const SELF_CGROUP: &str = "/proc/self/cgroup";

/// Interval between polls while freezing, killing and removing.
const POLL: Duration = Duration::from_millis(10);
/// Polls waiting for a freeze to complete (1 s).
const FREEZE_POLLS: u32 = 100;
/// Polls waiting for a cgroup to empty while killing (5 s).
const KILL_ROUNDS: u32 = 500;
/// After `cgroup.kill` or a complete freeze, stragglers are signalled again
/// every this many rounds.
const RESIGNAL_EVERY: u32 = 50;
/// Attempts at `rmdir` while it reports `EBUSY` (1 s).
const RMDIR_TRIES: u32 = 100;

/// What to do when a needed controller is missing.
const FIX: &str = "give sandboxd a cgroup v2 parent that offers them: under systemd set \
                   `Delegate=yes` and `DelegateSubgroup=supervisor` on sandboxd's unit and \
                   configure the unit's cgroup as sandboxd's cgroup parent, or write \
                   `+memory +pids +cpu` to `cgroup.subtree_control` of every ancestor of the \
                   configured parent; on a cgroup v1 host, mount each missing controller \
                   (e.g. `mount -t cgroup -o pids cgroup /sys/fs/cgroup/pids`)";

/// Errors detecting, creating, inspecting and removing session cgroups.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A `/proc` file or cgroup control file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A cgroup control file could not be written.
    #[error("cannot write {value:?} to {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A cgroup directory could not be created (also when a session cgroup
    /// already exists).
    #[error("cannot create the cgroup directory {path}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A cgroup directory could not be listed.
    #[error("cannot list the cgroup directory {path}")]
    ListDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A cgroup directory could not be removed.
    #[error("cannot remove the cgroup directory {path}")]
    RemoveDir {
        /// The directory.
        path: PathBuf,
        /// Why (`EBUSY` after every retry: something still lives in it).
        #[source]
        source: io::Error,
    },
    /// Controllers could not be enabled for a v2 cgroup's children.
    #[error(
        "cannot enable {controllers} in {path}; the cgroup must offer them in its \
         cgroup.controllers, so enable them in cgroup.subtree_control of every ancestor"
    )]
    EnableControllers {
        /// The `cgroup.subtree_control` file.
        path: PathBuf,
        /// What was written, e.g. `+memory +pids +cpu`.
        controllers: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The v2 parent holds processes, so (no-internal-processes rule) its
    /// children cannot get controllers.
    #[error(
        "the cgroup v2 parent {path} holds processes (sandboxd's own, most likely), so \
         cgroup v2 will not enable controllers for its children; fix: configure a cgroup \
         parent that holds no processes, e.g. under systemd set `Delegate=yes` and \
         `DelegateSubgroup=supervisor` on sandboxd's unit and configure the unit's cgroup \
         as the parent, or move sandboxd into a child cgroup of the parent"
    )]
    ParentHasProcesses {
        /// The parent directory.
        path: PathBuf,
        /// The kernel's refusal (`EBUSY`), when it came from a write.
        #[source]
        source: Option<io::Error>,
    },
    /// A control file held text that could not be parsed.
    #[error("cannot parse {what} in {path}: {text:?}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was looked for.
        what: &'static str,
        /// The offending text.
        text: String,
    },
    /// A line of `/proc/self/cgroup` is not `id:controllers:/path`.
    #[error("cannot understand the /proc/self/cgroup line {line:?}")]
    SelfCgroup {
        /// The line.
        line: String,
    },
    /// The configured parent is not a plain cgroup path.
    #[error(
        "the configured cgroup parent {parent:?} is not a plain cgroup path such as \
         \"/harness\" (no `.` or `..` components)"
    )]
    InvalidParent {
        /// The configured value.
        parent: String,
    },
    /// The session id cannot name a directory safely.
    #[error("session id {id:?} cannot name a cgroup (want 1 to 128 of A-Z a-z 0-9 _ -)")]
    InvalidSessionId {
        /// The id.
        id: String,
    },
    /// A needed controller is available neither in v2 nor in v1.
    #[error(
        "cgroup controllers {missing} are available neither in cgroup v2 ({v2}) nor in \
         cgroup v1 ({v1}); fix: {fix}",
        fix = FIX
    )]
    ControllersMissing {
        /// The missing controllers, comma-separated.
        missing: String,
        /// What cgroup v2 offers, or why it cannot be used.
        v2: String,
        /// What cgroup v1 offers.
        v1: String,
    },
    /// The session has no cgroup with the controller (sessions made by
    /// [`CgroupHierarchy::create`] always have memory, pids and cpu).
    #[error("session {session} has no cgroup with the {controller} controller")]
    NoController {
        /// The session id.
        session: String,
        /// The controller.
        controller: Controller,
    },
    /// A process of the session could not be killed.
    #[error("cannot SIGKILL pid {pid} of session {session}")]
    Kill {
        /// The host pid.
        pid: i32,
        /// The session id.
        session: String,
        /// Why.
        #[source]
        source: Errno,
    },
    /// Processes survived every kill round.
    #[error(
        "{remaining} processes of session {session} are still alive after {waited:?} of killing"
    )]
    StillPopulated {
        /// The session id.
        session: String,
        /// How many are left.
        remaining: usize,
        /// How long teardown tried.
        waited: Duration,
    },
}

/// Limits for one session; `None` leaves the limit as inherited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CgroupLimits {
    /// Memory in bytes; swap is not allowed on top of it.
    pub memory_bytes: Option<u64>,
    /// Maximum number of tasks (processes and threads).
    pub pids: Option<u32>,
    /// CPU in thousandths of a CPU: 1000 is one full CPU, 500 half of one.
    pub cpu_millis: Option<u32>,
}

/// A cgroup controller sandboxd uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Controller {
    /// Memory limit, peak and OOM kills.
    Memory,
    /// Task count limit.
    Pids,
    /// CPU bandwidth limit.
    Cpu,
    /// v1 only: freezing the session for a race-free kill (v2 has
    /// `cgroup.kill` and `cgroup.freeze` built in).
    Freezer,
}

impl Controller {
    /// The controllers every session needs.
    pub const REQUIRED: [Controller; 3] = [Controller::Memory, Controller::Pids, Controller::Cpu];

    /// The kernel's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
            Controller::Cpu => "cpu",
            Controller::Freezer => "freezer",
        }
    }
}

impl fmt::Display for Controller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The cgroup version of one hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// A v1 hierarchy with its own controllers.
    V1,
    /// The unified v2 hierarchy.
    V2,
}

/// One hierarchy in which sandboxd creates session cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Its version.
    pub version: CgroupVersion,
    /// The controllers sandboxd uses in it.
    pub controllers: Vec<Controller>,
    /// The parent as a cgroup path, e.g. `/system.slice/sandboxd.service`.
    pub parent_cgroup: String,
    /// The parent's directory, e.g. `/sys/fs/cgroup/system.slice/sandboxd.service`.
    pub parent_dir: PathBuf,
}

impl Hierarchy {
    /// `<parent>/harness-sandboxd`, which holds the session cgroups.
    pub fn dedicated_dir(&self) -> PathBuf {
        self.parent_dir.join(DEDICATED_DIR)
    }
}

/// Where session cgroups go and which version manages each limit; found once
/// at daemon start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupHierarchy {
    hierarchies: Vec<Hierarchy>,
}

/// One session's cgroup directory in one hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionDir {
    /// The hierarchy's version.
    pub version: CgroupVersion,
    /// The controllers sandboxd uses in it.
    pub controllers: Vec<Controller>,
    /// The directory.
    pub path: PathBuf,
}

/// One step of creating a session cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupStep {
    /// v2: write `+<controller> …` to `<dir>/cgroup.subtree_control`.
    EnableControllers {
        /// The cgroup whose children get the controllers.
        dir: PathBuf,
        /// The controllers.
        controllers: Vec<Controller>,
    },
    /// Create the directory and any missing parents; existing is fine.
    EnsureDir(PathBuf),
    /// Create the directory, which must not exist yet.
    CreateDir(PathBuf),
    /// Write a control file.
    Write {
        /// The file.
        file: PathBuf,
        /// The value.
        value: String,
    },
    /// Write a control file if the kernel has it (swap accounting may be
    /// off or compiled out).
    WriteIfPresent {
        /// The file.
        file: PathBuf,
        /// The value.
        value: String,
    },
}

/// Everything [`CgroupHierarchy::create`] does for one session, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CgroupPlan {
    /// The session's cgroup directories, one per hierarchy.
    pub dirs: Vec<SessionDir>,
    /// The steps.
    pub steps: Vec<CgroupStep>,
}

/// What [`SessionCgroup::kill_and_remove`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CgroupTeardown {
    /// Distinct processes found in the session cgroups and killed.
    pub processes_killed: u32,
    /// Directories removed by this call, deepest first.
    pub removed: Vec<PathBuf>,
}

/// A session's cgroups, one directory per hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionCgroup {
    session_id: String,
    dirs: Vec<SessionDir>,
}

impl CgroupHierarchy {
    /// Pure: finds the hierarchies from `/proc/self/mountinfo` text,
    /// `/proc/self/cgroup` text, an optional configured parent (a cgroup path
    /// such as `/harness`, the same for every hierarchy) and the text of
    /// `cgroup.controllers` in the v2 parent (`None` when there is no v2
    /// parent or it cannot be read; see [`Self::v2_parent_dir`]).
    ///
    /// Fails closed with an error that names what is missing and the fix when
    /// memory, pids or cpu is available neither in v2 nor in v1.
    pub fn detect(
        mountinfo: &str,
        self_cgroup: &str,
        configured_parent: Option<&str>,
        v2_parent_controllers: Option<&str>,
    ) -> Result<Self, CgroupError> {
        let own = parse_self_cgroup(self_cgroup)?;
        let configured = configured_parent.map(normalize_parent).transpose()?;
        let mounts = cgroup_mounts(mountinfo);

        let v2_path = configured.clone().or_else(|| own.v2.clone());
        let v2_dir = v2_path.as_deref().and_then(|path| locate_v2(&mounts, path));
        let v2_offered: Vec<&str> = match (&v2_dir, v2_parent_controllers) {
            (Some(_), Some(text)) => text.split_whitespace().collect(),
            _ => Vec::new(),
        };
        let v2_has = |c: Controller| v2_offered.contains(&c.name());
        let v1_find = |c: Controller| {
            let path = match &configured {
                Some(path) => path.clone(),
                None => own.v1_path(c.name())?.to_owned(),
            };
            let dir = mounts
                .iter()
                .filter(|m| !m.v2 && m.controllers.iter().any(|x| x == c.name()))
                .find_map(|m| locate(m, &path))?;
            Some((path, dir))
        };

        let all_v2 = Controller::REQUIRED.into_iter().all(v2_has);
        let mut v2_controllers = Vec::new();
        let mut v1 = Vec::new();
        let mut missing = Vec::new();
        for controller in Controller::REQUIRED {
            if all_v2 {
                v2_controllers.push(controller);
            } else if let Some(found) = v1_find(controller) {
                v1.push((controller, found));
            } else if v2_has(controller) {
                v2_controllers.push(controller);
            } else {
                missing.push(controller.name());
            }
        }
        if !missing.is_empty() {
            return Err(CgroupError::ControllersMissing {
                missing: missing.join(", "),
                v2: describe_v2(
                    &mounts,
                    v2_path.as_deref(),
                    v2_dir.as_deref(),
                    v2_parent_controllers,
                ),
                v1: describe_v1(&mounts),
            });
        }
        if !v1.is_empty()
            && let Some(found) = v1_find(Controller::Freezer)
        {
            v1.push((Controller::Freezer, found));
        }

        let mut hierarchies = Vec::new();
        if let (false, Some(path), Some(dir)) = (v2_controllers.is_empty(), v2_path, v2_dir) {
            hierarchies.push(Hierarchy {
                version: CgroupVersion::V2,
                controllers: v2_controllers,
                parent_cgroup: path,
                parent_dir: dir,
            });
        }
        for (controller, (path, dir)) in v1 {
            // Controllers co-mounted in one hierarchy (`cpu,cpuacct`) share a directory.
            match hierarchies
                .iter_mut()
                .find(|h| h.version == CgroupVersion::V1 && h.parent_dir == dir)
            {
                Some(hierarchy) => hierarchy.controllers.push(controller),
                None => hierarchies.push(Hierarchy {
                    version: CgroupVersion::V1,
                    controllers: vec![controller],
                    parent_cgroup: path,
                    parent_dir: dir,
                }),
            }
        }
        Ok(Self { hierarchies })
    }

    /// Pure: the directory of the v2 parent (configured, else sandboxd's own
    /// v2 cgroup), whose `cgroup.controllers` [`Self::detect`] needs; `None`
    /// without a usable cgroup2 mount.
    pub fn v2_parent_dir(
        mountinfo: &str,
        self_cgroup: &str,
        configured_parent: Option<&str>,
    ) -> Result<Option<PathBuf>, CgroupError> {
        let own = parse_self_cgroup(self_cgroup)?;
        let configured = configured_parent.map(normalize_parent).transpose()?;
        let mounts = cgroup_mounts(mountinfo);
        Ok(configured
            .or(own.v2)
            .and_then(|path| locate_v2(&mounts, &path)))
    }

    /// Reads `/proc/self/mountinfo`, `/proc/self/cgroup` and the v2 parent's
    /// `cgroup.controllers`, detects, and for v2 refuses a parent that holds
    /// processes (unless it is the root).
    pub fn from_host(configured_parent: Option<&str>) -> Result<Self, CgroupError> {
        let mountinfo = read_file(Path::new(MOUNTINFO))?;
        let self_cgroup = read_file(Path::new(SELF_CGROUP))?;
        let v2_controllers = Self::v2_parent_dir(&mountinfo, &self_cgroup, configured_parent)?
            .and_then(|dir| fs::read_to_string(dir.join("cgroup.controllers")).ok());
        let detected = Self::detect(
            &mountinfo,
            &self_cgroup,
            configured_parent,
            v2_controllers.as_deref(),
        )?;
        for hierarchy in detected.hierarchies_of(CgroupVersion::V2) {
            let procs = read_file(&hierarchy.parent_dir.join("cgroup.procs"))?;
            check_v2_parent(hierarchy, &procs)?;
        }
        tracing::info!(hierarchies = ?detected.hierarchies, "session cgroups");
        Ok(detected)
    }

    /// The hierarchies, v2 first.
    pub fn hierarchies(&self) -> &[Hierarchy] {
        &self.hierarchies
    }

    fn hierarchies_of(&self, version: CgroupVersion) -> impl Iterator<Item = &Hierarchy> {
        self.hierarchies
            .iter()
            .filter(move |h| h.version == version)
    }

    /// Pure: the directories to create and files to write, in order, for a
    /// session. Fails only for a session id that cannot name a directory.
    ///
    /// The v1 memory limit is written before `memory.memsw.limit_in_bytes`:
    /// the kernel keeps memsw ≥ limit, and a fresh cgroup starts with both
    /// unlimited, so lowering the limit first is the order that works.
    pub fn plan(&self, session_id: &str, limits: &CgroupLimits) -> Result<CgroupPlan, CgroupError> {
        validate_session_id(session_id)?;
        let mut plan = CgroupPlan::default();
        for hierarchy in &self.hierarchies {
            let dedicated = hierarchy.dedicated_dir();
            let session = dedicated.join(session_id);
            match hierarchy.version {
                CgroupVersion::V2 => {
                    plan.steps.push(CgroupStep::EnableControllers {
                        dir: hierarchy.parent_dir.clone(),
                        controllers: hierarchy.controllers.clone(),
                    });
                    plan.steps.push(CgroupStep::EnsureDir(dedicated.clone()));
                    plan.steps.push(CgroupStep::EnableControllers {
                        dir: dedicated,
                        controllers: hierarchy.controllers.clone(),
                    });
                }
                CgroupVersion::V1 => plan.steps.push(CgroupStep::EnsureDir(dedicated)),
            }
            plan.steps.push(CgroupStep::CreateDir(session.clone()));
            for controller in &hierarchy.controllers {
                limit_steps(
                    hierarchy.version,
                    *controller,
                    &session,
                    limits,
                    &mut plan.steps,
                );
            }
            plan.dirs.push(SessionDir {
                version: hierarchy.version,
                controllers: hierarchy.controllers.clone(),
                path: session,
            });
        }
        Ok(plan)
    }

    /// Applies the plan: creates the session cgroups and writes the limits.
    /// On failure the session directories created so far are removed again.
    pub fn create(
        &self,
        session_id: &str,
        limits: &CgroupLimits,
    ) -> Result<SessionCgroup, CgroupError> {
        let plan = self.plan(session_id, limits)?;
        let mut created = Vec::new();
        for step in &plan.steps {
            if let Err(err) = apply_step(step, &mut created) {
                for dir in created.iter().rev() {
                    if let Err(undo) = fs::remove_dir(dir) {
                        tracing::warn!(dir = %dir.display(), error = %undo, "cannot remove a half-made session cgroup");
                    }
                }
                return Err(err);
            }
        }
        Ok(SessionCgroup {
            session_id: session_id.to_owned(),
            dirs: plan.dirs,
        })
    }

    /// A handle on an existing session's cgroups (for example after a
    /// restart); nothing is checked on disk.
    pub fn session(&self, session_id: &str) -> Result<SessionCgroup, CgroupError> {
        validate_session_id(session_id)?;
        Ok(self.session_named(OsStr::new(session_id)))
    }

    fn session_named(&self, name: &OsStr) -> SessionCgroup {
        SessionCgroup {
            session_id: name.to_string_lossy().into_owned(),
            dirs: self
                .hierarchies
                .iter()
                .map(|h| SessionDir {
                    version: h.version,
                    controllers: h.controllers.clone(),
                    path: h.dedicated_dir().join(name),
                })
                .collect(),
        }
    }

    /// Kills every process in, and removes, every cgroup under the dedicated
    /// directory (whatever its name) that a crashed sandboxd left behind;
    /// returns the directories removed. Call at start-up, before creating
    /// sessions. Every leftover is attempted; the first failure is returned.
    pub fn sweep_leftovers(&self) -> Result<Vec<PathBuf>, CgroupError> {
        let mut names = BTreeSet::new();
        for hierarchy in &self.hierarchies {
            for child in child_dirs(&hierarchy.dedicated_dir())? {
                if let Some(name) = child.file_name() {
                    names.insert(name.to_owned());
                }
            }
        }
        let mut removed = Vec::new();
        let mut first_error = None;
        for name in names {
            let leftover = self.session_named(&name);
            match leftover.kill_and_remove() {
                Ok(teardown) => {
                    tracing::info!(
                        session = leftover.session_id,
                        killed = teardown.processes_killed,
                        "removed a leftover session cgroup"
                    );
                    removed.extend(teardown.removed);
                }
                Err(err) => {
                    tracing::warn!(session = leftover.session_id, error = %err, "cannot remove a leftover session cgroup");
                    first_error.get_or_insert(err);
                }
            }
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(removed),
        }
    }
}

impl SessionCgroup {
    /// The session id (the directory name).
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// The directories, one per hierarchy.
    pub fn dirs(&self) -> &[SessionDir] {
        &self.dirs
    }

    /// Moves a process (host pid) into the session cgroup in every
    /// hierarchy. Its children forked afterwards start inside; ones forked
    /// before stay where they were, so add the sandbox init before it runs
    /// user code.
    pub fn add_process(&self, pid: i32) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            write_file(&dir.path.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// OOM kills so far (v1 `memory.oom_control`, v2 `memory.events`, both
    /// the `oom_kill` field).
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        let dir = self.dir_with(Controller::Memory)?;
        let file = dir.path.join(match dir.version {
            CgroupVersion::V1 => "memory.oom_control",
            CgroupVersion::V2 => "memory.events",
        });
        let text = read_file(&file)?;
        keyed_value(&text, "oom_kill").ok_or(CgroupError::Parse {
            path: file,
            what: "oom_kill",
            text,
        })
    }

    /// The session's peak memory use in bytes since the cgroup was created
    /// (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`, Linux ≥ 5.19).
    pub fn peak_memory(&self) -> Result<u64, CgroupError> {
        let dir = self.dir_with(Controller::Memory)?;
        let file = dir.path.join(match dir.version {
            CgroupVersion::V1 => "memory.max_usage_in_bytes",
            CgroupVersion::V2 => "memory.peak",
        });
        let text = read_file(&file)?;
        text.trim().parse().map_err(|_| CgroupError::Parse {
            path: file,
            what: "a byte count",
            text,
        })
    }

    /// The number of processes in the session cgroups.
    pub fn process_count(&self) -> Result<u32, CgroupError> {
        let mut pids = BTreeSet::new();
        for dir in &self.dirs {
            let file = dir.path.join("cgroup.procs");
            let text = read_file(&file)?;
            pids.extend(parse_procs(&file, &text)?);
        }
        Ok(u32::try_from(pids.len()).unwrap_or(u32::MAX))
    }

    /// Kills every process in the session cgroups and removes them (with any
    /// child cgroups, deepest first). Idempotent: cgroups already gone are
    /// skipped.
    ///
    /// Killing: v2 `cgroup.kill` when the kernel has it (≥ 5.14); otherwise
    /// freeze (v1 freezer or v2 `cgroup.freeze`), SIGKILL every listed
    /// process, thaw; without a freezer, SIGKILL whatever `cgroup.procs`
    /// lists, round after round, until empty. That last path can race with
    /// pid reuse and with forks; the pids limit bounds the forks. Gives up
    /// after about five seconds. `rmdir` is retried for a second on `EBUSY`.
    pub fn kill_and_remove(&self) -> Result<CgroupTeardown, CgroupError> {
        let mut all = Vec::new();
        for dir in &self.dirs {
            all.extend(post_order(&dir.path)?);
        }
        let mut killed = BTreeSet::new();
        // Usually the sandbox's pid namespace is already gone (its init was
        // killed and reaped), so there is nothing to freeze or signal.
        if !all.is_empty() && !procs_of(&all)?.is_empty() {
            self.kill_all(&all, &mut killed)?;
        }
        let mut removed = Vec::new();
        for dir in all {
            if remove_cgroup_dir(&dir)? {
                removed.push(dir);
            }
        }
        Ok(CgroupTeardown {
            processes_killed: u32::try_from(killed.len()).unwrap_or(u32::MAX),
            removed,
        })
    }

    fn dir_with(&self, controller: Controller) -> Result<&SessionDir, CgroupError> {
        self.dirs
            .iter()
            .find(|d| d.controllers.contains(&controller))
            .ok_or_else(|| CgroupError::NoController {
                session: self.session_id.clone(),
                controller,
            })
    }

    /// Kills every process in `all` (every cgroup directory of the session).
    fn kill_all(&self, all: &[PathBuf], killed: &mut BTreeSet<i32>) -> Result<(), CgroupError> {
        let kill_file = self
            .dirs
            .iter()
            .filter(|d| d.version == CgroupVersion::V2)
            .map(|d| d.path.join("cgroup.kill"))
            .find(|file| file.exists());
        let mut frozen = None;
        match &kill_file {
            Some(file) => {
                killed.extend(procs_of(all)?);
                write_file(file, "1")?;
            }
            None => frozen = freeze(&self.dirs)?,
        }
        let fully_frozen = frozen.as_ref().is_some_and(|f| f.complete);
        let result = self.kill_rounds(all, killed, kill_file.is_some(), fully_frozen, &mut frozen);
        if let Some(frozen) = frozen {
            frozen.thaw()?;
        }
        result
    }

    fn kill_rounds(
        &self,
        all: &[PathBuf],
        killed: &mut BTreeSet<i32>,
        kernel_killed: bool,
        fully_frozen: bool,
        frozen: &mut Option<Frozen>,
    ) -> Result<(), CgroupError> {
        let own_pid = std::process::id();
        let mut remaining = 0;
        for round in 0..KILL_ROUNDS {
            let pids = procs_of(all)?;
            if pids.is_empty() {
                return Ok(());
            }
            remaining = pids.len();
            killed.extend(&pids);
            let signal = if kernel_killed {
                round > 0 && round % RESIGNAL_EVERY == 0
            } else if fully_frozen {
                round % RESIGNAL_EVERY == 0
            } else {
                true
            };
            if signal {
                for pid in pids {
                    // 0 stands for a process outside our pid namespace; never
                    // signal it (kill(0) is our own process group) or ourselves.
                    if pid <= 0 || u32::try_from(pid).is_ok_and(|p| p == own_pid) {
                        tracing::warn!(pid, session = self.session_id, "not killing this pid");
                        continue;
                    }
                    match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                        Ok(()) | Err(Errno::ESRCH) => {}
                        Err(source) => {
                            return Err(CgroupError::Kill {
                                pid,
                                session: self.session_id.clone(),
                                source,
                            });
                        }
                    }
                }
            }
            // Killed while frozen; they die once thawed.
            if let Some(done) = frozen.take() {
                done.thaw()?;
            }
            std::thread::sleep(POLL);
        }
        Err(CgroupError::StillPopulated {
            session: self.session_id.clone(),
            remaining,
            waited: POLL * KILL_ROUNDS,
        })
    }
}

/// A frozen session cgroup, to be thawed.
struct Frozen {
    file: PathBuf,
    thaw_value: &'static str,
    /// The kernel reported the freeze done within the wait.
    complete: bool,
}

impl Frozen {
    fn thaw(self) -> Result<(), CgroupError> {
        write_file(&self.file, self.thaw_value)
    }
}

/// Freezes the session with the v1 freezer or v2 `cgroup.freeze`, whichever
/// it has, and waits (bounded) for the freeze to complete.
fn freeze(dirs: &[SessionDir]) -> Result<Option<Frozen>, CgroupError> {
    for dir in dirs {
        let (file, freeze_value, thaw_value, state_file) = match dir.version {
            CgroupVersion::V1 if dir.controllers.contains(&Controller::Freezer) => {
                let file = dir.path.join("freezer.state");
                (file.clone(), "FROZEN", "THAWED", file)
            }
            CgroupVersion::V2 => (
                dir.path.join("cgroup.freeze"),
                "1",
                "0",
                dir.path.join("cgroup.events"),
            ),
            CgroupVersion::V1 => continue,
        };
        if !file.exists() {
            continue;
        }
        write_file(&file, freeze_value)?;
        let mut complete = false;
        for _ in 0..FREEZE_POLLS {
            let state = read_file(&state_file)?;
            complete = match dir.version {
                CgroupVersion::V1 => state.trim() == "FROZEN",
                CgroupVersion::V2 => keyed_value(&state, "frozen") == Some(1),
            };
            if complete {
                break;
            }
            std::thread::sleep(POLL);
        }
        if !complete {
            tracing::warn!(file = %file.display(), "freeze did not complete; killing in rounds");
        }
        return Ok(Some(Frozen {
            file,
            thaw_value,
            complete,
        }));
    }
    Ok(None)
}

/// For v2: refuses a non-root parent that holds processes, since its
/// children could not get controllers.
fn check_v2_parent(hierarchy: &Hierarchy, procs: &str) -> Result<(), CgroupError> {
    if hierarchy.parent_cgroup != "/" && procs.lines().any(|line| !line.trim().is_empty()) {
        return Err(CgroupError::ParentHasProcesses {
            path: hierarchy.parent_dir.clone(),
            source: None,
        });
    }
    Ok(())
}

/// The limit files for one controller of a session cgroup.
fn limit_steps(
    version: CgroupVersion,
    controller: Controller,
    session: &Path,
    limits: &CgroupLimits,
    steps: &mut Vec<CgroupStep>,
) {
    let write = |name: &str, value: String| CgroupStep::Write {
        file: session.join(name),
        value,
    };
    match (version, controller) {
        (CgroupVersion::V1, Controller::Memory) => {
            if let Some(bytes) = limits.memory_bytes {
                steps.push(write("memory.limit_in_bytes", bytes.to_string()));
                steps.push(CgroupStep::WriteIfPresent {
                    file: session.join("memory.memsw.limit_in_bytes"),
                    value: bytes.to_string(),
                });
            }
        }
        (CgroupVersion::V2, Controller::Memory) => {
            if let Some(bytes) = limits.memory_bytes {
                steps.push(write("memory.max", bytes.to_string()));
                steps.push(CgroupStep::WriteIfPresent {
                    file: session.join("memory.swap.max"),
                    value: "0".to_owned(),
                });
            }
        }
        (_, Controller::Pids) => {
            if let Some(pids) = limits.pids {
                steps.push(write("pids.max", pids.to_string()));
            }
        }
        (CgroupVersion::V1, Controller::Cpu) => {
            if let Some(millis) = limits.cpu_millis {
                steps.push(write("cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
                steps.push(write("cpu.cfs_quota_us", cpu_quota_us(millis).to_string()));
            }
        }
        (CgroupVersion::V2, Controller::Cpu) => {
            if let Some(millis) = limits.cpu_millis {
                steps.push(write(
                    "cpu.max",
                    format!("{} {CPU_PERIOD_US}", cpu_quota_us(millis)),
                ));
            }
        }
        (_, Controller::Freezer) => {}
    }
}

/// The CFS quota for thousandths of a CPU over [`CPU_PERIOD_US`].
fn cpu_quota_us(millis: u32) -> u64 {
    (u64::from(millis) * CPU_PERIOD_US / 1000).max(MIN_CPU_QUOTA_US)
}

/// Applies one step; records session directories it created.
fn apply_step(step: &CgroupStep, created: &mut Vec<PathBuf>) -> Result<(), CgroupError> {
    match step {
        CgroupStep::EnsureDir(dir) => {
            fs::create_dir_all(dir).map_err(|source| CgroupError::CreateDir {
                path: dir.clone(),
                source,
            })
        }
        CgroupStep::CreateDir(dir) => {
            fs::create_dir(dir).map_err(|source| CgroupError::CreateDir {
                path: dir.clone(),
                source,
            })?;
            created.push(dir.clone());
            Ok(())
        }
        CgroupStep::Write { file, value } => write_file(file, value),
        CgroupStep::WriteIfPresent { file, value } => match write_raw(file, value) {
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                tracing::debug!(file = %file.display(), "not written: the kernel does not have it");
                Ok(())
            }
            result => result.map_err(|source| CgroupError::Write {
                path: file.clone(),
                value: value.clone(),
                source,
            }),
        },
        CgroupStep::EnableControllers { dir, controllers } => {
            let file = dir.join("cgroup.subtree_control");
            let value = controllers
                .iter()
                .map(|c| format!("+{c}"))
                .collect::<Vec<_>>()
                .join(" ");
            write_raw(&file, &value).map_err(|source| {
                if source.raw_os_error() == Some(libc::EBUSY) {
                    CgroupError::ParentHasProcesses {
                        path: dir.clone(),
                        source: Some(source),
                    }
                } else {
                    CgroupError::EnableControllers {
                        path: file.clone(),
                        controllers: value.clone(),
                        source,
                    }
                }
            })
        }
    }
}

/// Writes a control file (no create, no truncate: one `write`).
fn write_raw(file: &Path, value: &str) -> io::Result<()> {
    fs::OpenOptions::new()
        .write(true)
        .open(file)?
        .write_all(value.as_bytes())
}

fn write_file(file: &Path, value: &str) -> Result<(), CgroupError> {
    write_raw(file, value).map_err(|source| CgroupError::Write {
        path: file.to_path_buf(),
        value: value.to_owned(),
        source,
    })
}

fn read_file(file: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(file).map_err(|source| CgroupError::Read {
        path: file.to_path_buf(),
        source,
    })
}

/// The pids in one `cgroup.procs` text.
fn parse_procs(file: &Path, text: &str) -> Result<BTreeSet<i32>, CgroupError> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .map(|line| {
            line.parse().map_err(|_| CgroupError::Parse {
                path: file.to_path_buf(),
                what: "a pid",
                text: line.to_owned(),
            })
        })
        .collect()
}

/// The processes in every directory; directories already gone count as empty.
fn procs_of(dirs: &[PathBuf]) -> Result<BTreeSet<i32>, CgroupError> {
    let mut pids = BTreeSet::new();
    for dir in dirs {
        let file = dir.join("cgroup.procs");
        match fs::read_to_string(&file) {
            Ok(text) => pids.extend(parse_procs(&file, &text)?),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(CgroupError::Read { path: file, source }),
        }
    }
    Ok(pids)
}

/// The child directories (child cgroups) of `dir`, sorted; none if `dir` is gone.
fn child_dirs(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let list_err = |source| CgroupError::ListDir {
        path: dir.to_path_buf(),
        source,
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(list_err(source)),
    };
    let mut children = Vec::new();
    for entry in entries {
        let entry = entry.map_err(list_err)?;
        if entry.file_type().map_err(list_err)?.is_dir() {
            children.push(entry.path());
        }
    }
    children.sort();
    Ok(children)
}

/// `dir` and every cgroup beneath it, deepest first; empty if `dir` is gone.
fn post_order(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for child in child_dirs(dir)? {
        out.extend(post_order(&child)?);
    }
    out.push(dir.to_path_buf());
    Ok(out)
}

/// Removes an empty cgroup, retrying while the kernel still reports it busy
/// (exiting processes); `false` if it was already gone.
fn remove_cgroup_dir(dir: &Path) -> Result<bool, CgroupError> {
    let mut tries = 0;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(true),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) && tries < RMDIR_TRIES => {
                tries += 1;
                std::thread::sleep(POLL);
            }
            Err(source) => {
                return Err(CgroupError::RemoveDir {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        }
    }
}

/// The value of `key` in flat-keyed text (`key value` per line).
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        if k == key {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

/// sandboxd's own cgroups, from `/proc/self/cgroup`.
#[derive(Debug, Default)]
struct OwnCgroups {
    /// The `0::` line.
    v2: Option<String>,
    /// (controller, path) for each v1 hierarchy's controllers.
    v1: Vec<(String, String)>,
}

impl OwnCgroups {
    fn v1_path(&self, controller: &str) -> Option<&str> {
        self.v1
            .iter()
            .find(|(c, _)| c == controller)
            .map(|(_, path)| path.as_str())
    }
}

fn parse_self_cgroup(text: &str) -> Result<OwnCgroups, CgroupError> {
    let mut own = OwnCgroups::default();
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        let bad = || CgroupError::SelfCgroup {
            line: line.to_owned(),
        };
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if !path.starts_with('/') {
            return Err(bad());
        }
        let path = normalize_cgroup_path(path).ok_or_else(bad)?;
        if id == "0" && controllers.is_empty() {
            own.v2 = Some(path);
        } else {
            for controller in controllers.split(',') {
                own.v1.push((controller.to_owned(), path.clone()));
            }
        }
    }
    Ok(own)
}

/// A configured parent as `/a/b`; `harness` and `/harness/` both mean `/harness`.
fn normalize_parent(parent: &str) -> Result<String, CgroupError> {
    normalize_cgroup_path(parent).ok_or_else(|| CgroupError::InvalidParent {
        parent: parent.to_owned(),
    })
}

/// `/a/b` from a path of plain components; `None` for `.`, `..` or non-UTF-8.
fn normalize_cgroup_path(path: &str) -> Option<String> {
    let mut out = String::new();
    for component in Path::new(path).components() {
        match component {
            Component::RootDir => {}
            Component::Normal(name) => {
                out.push('/');
                out.push_str(name.to_str()?);
            }
            Component::CurDir | Component::ParentDir | Component::Prefix(_) => return None,
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    Some(out)
}

/// The directory of `cgroup_path` through `mount`, if the mount shows it.
fn locate(mount: &CgroupMount, cgroup_path: &str) -> Option<PathBuf> {
    let relative = Path::new(cgroup_path).strip_prefix(&mount.root).ok()?;
    let mut dir = PathBuf::from(&mount.mount_point);
    if !relative.as_os_str().is_empty() {
        dir.push(relative);
    }
    Some(dir)
}

fn locate_v2(mounts: &[CgroupMount], cgroup_path: &str) -> Option<PathBuf> {
    mounts
        .iter()
        .filter(|m| m.v2)
        .find_map(|m| locate(m, cgroup_path))
}

fn validate_session_id(id: &str) -> Result<(), CgroupError> {
    let ok = (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(CgroupError::InvalidSessionId { id: id.to_owned() })
    }
}

/// Why cgroup v2 could not supply the controllers, for the error.
fn describe_v2(
    mounts: &[CgroupMount],
    path: Option<&str>,
    dir: Option<&Path>,
    controllers: Option<&str>,
) -> String {
    if !mounts.iter().any(|m| m.v2) {
        return "no cgroup2 mount".to_owned();
    }
    match (path, dir, controllers) {
        (None, _, _) => {
            "sandboxd's v2 cgroup is unknown: no `0::` line in /proc/self/cgroup".to_owned()
        }
        (Some(path), None, _) => format!("the parent {path} is outside every cgroup2 mount"),
        (Some(_), Some(dir), None) => format!(
            "{}/cgroup.controllers cannot be read; does the parent exist?",
            dir.display()
        ),
        (Some(_), Some(dir), Some(text)) => {
            let offered = text.split_whitespace().collect::<Vec<_>>().join(" ");
            if offered.is_empty() {
                format!("{} offers no controllers", dir.display())
            } else {
                format!("{} offers only: {offered}", dir.display())
            }
        }
    }
}

/// What cgroup v1 offers, for the error.
fn describe_v1(mounts: &[CgroupMount]) -> String {
    let controllers: BTreeSet<&str> = mounts
        .iter()
        .filter(|m| !m.v2)
        .flat_map(|m| m.controllers.iter().map(String::as_str))
        .collect();
    if controllers.is_empty() {
        "no v1 hierarchy is mounted".to_owned()
    } else {
        format!(
            "hierarchies mounted for {}, or the parent is outside them",
            controllers.into_iter().collect::<Vec<_>>().join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// `/proc/self/mountinfo` of the development host (cgroup v1 plus an
    /// empty cgroup2 at /sys/fs/cgroup/unified).
    const HOST_MOUNTINFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw,size=12334460k,nr_inodes=3083615,mode=755
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard,resv_strict,resuid=65534,resgid=65534
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    /// `/proc/self/cgroup` of the development host.
    const HOST_CGROUP: &str = "\
9:name=systemd:/
8:pids:/
7:blkio:/
6:freezer:/
5:devices:/
4:memory:/process_api/2ccc31105dc2ef676489954cf78a299b
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
";

    /// The development host's /sys/fs/cgroup/unified/cgroup.controllers.
    const HOST_V2_CONTROLLERS: &str = "hugetlb\n";

    /// A systemd host with only cgroup v2, sandboxd delegated with
    /// `DelegateSubgroup=supervisor`.
    const V2_MOUNTINFO: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";
    const V2_CGROUP: &str = "0::/system.slice/sandboxd.service/supervisor\n";
    const V2_CONTROLLERS: &str = "cpuset cpu io memory pids\n";

    fn v1(controllers: &[Controller], parent_cgroup: &str, parent_dir: &str) -> Hierarchy {
        Hierarchy {
            version: CgroupVersion::V1,
            controllers: controllers.to_vec(),
            parent_cgroup: parent_cgroup.to_owned(),
            parent_dir: PathBuf::from(parent_dir),
        }
    }

    fn host() -> CgroupHierarchy {
        CgroupHierarchy::detect(HOST_MOUNTINFO, HOST_CGROUP, None, Some(HOST_V2_CONTROLLERS))
            .unwrap()
    }

    fn v2_delegated() -> CgroupHierarchy {
        CgroupHierarchy::detect(
            V2_MOUNTINFO,
            V2_CGROUP,
            Some("/system.slice/sandboxd.service"),
            Some(V2_CONTROLLERS),
        )
        .unwrap()
    }

    const MEMORY_PARENT: &str =
        "/sys/fs/cgroup/memory/process_api/2ccc31105dc2ef676489954cf78a299b";

    #[test]
    fn this_host_uses_v1_under_sandboxd_own_cgroups_with_the_freezer() {
        assert_eq!(
            host(),
            CgroupHierarchy {
                hierarchies: vec![
                    v1(
                        &[Controller::Memory],
                        "/process_api/2ccc31105dc2ef676489954cf78a299b",
                        MEMORY_PARENT,
                    ),
                    v1(&[Controller::Pids], "/", "/sys/fs/cgroup/pids"),
                    v1(&[Controller::Cpu], "/", "/sys/fs/cgroup/cpu"),
                    v1(&[Controller::Freezer], "/", "/sys/fs/cgroup/freezer"),
                ]
            }
        );
    }

    #[test]
    fn this_host_with_a_configured_parent_uses_it_in_every_hierarchy() {
        let detected = CgroupHierarchy::detect(
            HOST_MOUNTINFO,
            HOST_CGROUP,
            Some("harness/"),
            Some(HOST_V2_CONTROLLERS),
        )
        .unwrap();
        assert_eq!(
            detected,
            CgroupHierarchy {
                hierarchies: vec![
                    v1(
                        &[Controller::Memory],
                        "/harness",
                        "/sys/fs/cgroup/memory/harness"
                    ),
                    v1(
                        &[Controller::Pids],
                        "/harness",
                        "/sys/fs/cgroup/pids/harness"
                    ),
                    v1(&[Controller::Cpu], "/harness", "/sys/fs/cgroup/cpu/harness"),
                    v1(
                        &[Controller::Freezer],
                        "/harness",
                        "/sys/fs/cgroup/freezer/harness"
                    ),
                ]
            }
        );
    }

    #[test]
    fn the_v2_parent_dir_follows_the_configured_parent_or_the_0_line() {
        assert_eq!(
            CgroupHierarchy::v2_parent_dir(HOST_MOUNTINFO, HOST_CGROUP, None).unwrap(),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            CgroupHierarchy::v2_parent_dir(V2_MOUNTINFO, V2_CGROUP, None).unwrap(),
            Some(PathBuf::from(
                "/sys/fs/cgroup/system.slice/sandboxd.service/supervisor"
            ))
        );
        assert_eq!(
            CgroupHierarchy::v2_parent_dir(V2_MOUNTINFO, V2_CGROUP, Some("/harness")).unwrap(),
            Some(PathBuf::from("/sys/fs/cgroup/harness"))
        );
        let v1_only = HOST_MOUNTINFO.replace("cgroup2 cgroup2", "tmpfs tmpfs");
        assert_eq!(
            CgroupHierarchy::v2_parent_dir(&v1_only, HOST_CGROUP, None).unwrap(),
            None
        );
    }

    #[test]
    fn pure_v2_with_controllers_uses_v2_for_everything() {
        assert_eq!(
            v2_delegated(),
            CgroupHierarchy {
                hierarchies: vec![Hierarchy {
                    version: CgroupVersion::V2,
                    controllers: Controller::REQUIRED.to_vec(),
                    parent_cgroup: "/system.slice/sandboxd.service".to_owned(),
                    parent_dir: PathBuf::from("/sys/fs/cgroup/system.slice/sandboxd.service"),
                }]
            }
        );
    }

    #[test]
    fn v2_is_preferred_over_v1_when_it_has_every_controller() {
        let detected =
            CgroupHierarchy::detect(HOST_MOUNTINFO, HOST_CGROUP, None, Some(V2_CONTROLLERS))
                .unwrap();
        assert_eq!(
            detected,
            CgroupHierarchy {
                hierarchies: vec![Hierarchy {
                    version: CgroupVersion::V2,
                    controllers: Controller::REQUIRED.to_vec(),
                    parent_cgroup: "/".to_owned(),
                    parent_dir: PathBuf::from("/sys/fs/cgroup/unified"),
                }]
            }
        );
    }

    #[test]
    fn a_controller_missing_from_v1_comes_from_v2() {
        // Hybrid host whose memory controller was moved to v2
        // (cgroup_no_v1=memory); cpu and cpuacct share one v1 hierarchy.
        let mountinfo = "\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";
        let self_cgroup = "2:cpu,cpuacct:/sd\n1:pids:/sd\n0::/sd\n";
        let detected =
            CgroupHierarchy::detect(mountinfo, self_cgroup, None, Some("memory")).unwrap();
        assert_eq!(
            detected,
            CgroupHierarchy {
                hierarchies: vec![
                    Hierarchy {
                        version: CgroupVersion::V2,
                        controllers: vec![Controller::Memory],
                        parent_cgroup: "/sd".to_owned(),
                        parent_dir: PathBuf::from("/sys/fs/cgroup/unified/sd"),
                    },
                    v1(&[Controller::Pids], "/sd", "/sys/fs/cgroup/pids/sd"),
                    v1(&[Controller::Cpu], "/sd", "/sys/fs/cgroup/cpu,cpuacct/sd"),
                ]
            }
        );
    }

    #[test]
    fn a_container_mount_root_is_stripped_from_the_own_path() {
        let mountinfo = "\
35 31 0:32 /docker/abc /sys/fs/cgroup/memory ro - cgroup cgroup rw,memory
36 31 0:33 /docker/abc /sys/fs/cgroup/pids ro - cgroup cgroup rw,pids
37 31 0:34 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct
";
        let self_cgroup = "3:memory:/docker/abc\n2:pids:/docker/abc\n1:cpu,cpuacct:/docker/abc\n";
        let detected = CgroupHierarchy::detect(mountinfo, self_cgroup, None, None).unwrap();
        assert_eq!(
            detected,
            CgroupHierarchy {
                hierarchies: vec![
                    v1(
                        &[Controller::Memory],
                        "/docker/abc",
                        "/sys/fs/cgroup/memory"
                    ),
                    v1(&[Controller::Pids], "/docker/abc", "/sys/fs/cgroup/pids"),
                    v1(
                        &[Controller::Cpu],
                        "/docker/abc",
                        "/sys/fs/cgroup/cpu,cpuacct"
                    ),
                ]
            }
        );
        // A parent outside what the container sees cannot be used.
        let err =
            CgroupHierarchy::detect(mountinfo, self_cgroup, Some("/harness"), None).unwrap_err();
        assert!(
            matches!(&err, CgroupError::ControllersMissing { missing, .. } if missing == "memory, pids, cpu"),
            "{err}"
        );
    }

    #[test]
    fn v2_without_controllers_and_no_v1_fails_naming_the_fix() {
        let err = CgroupHierarchy::detect(V2_MOUNTINFO, V2_CGROUP, None, Some("")).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(&err, CgroupError::ControllersMissing { missing, .. } if missing == "memory, pids, cpu"),
            "{message}"
        );
        for needle in [
            "/sys/fs/cgroup/system.slice/sandboxd.service/supervisor offers no controllers",
            "no v1 hierarchy is mounted",
            "Delegate=yes",
            "cgroup.subtree_control",
            "fix:",
        ] {
            assert!(message.contains(needle), "{needle:?} not in: {message}");
        }
    }

    #[test]
    fn v1_without_pids_and_an_empty_v2_fails_naming_pids() {
        let mountinfo: String = HOST_MOUNTINFO
            .lines()
            .filter(|line| !line.contains("rw,pids"))
            .map(|line| format!("{line}\n"))
            .collect();
        let err = CgroupHierarchy::detect(&mountinfo, HOST_CGROUP, None, Some(HOST_V2_CONTROLLERS))
            .unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with("cgroup controllers pids are available neither"),
            "{message}"
        );
        assert!(
            message.contains("/sys/fs/cgroup/unified offers only: hugetlb"),
            "{message}"
        );
        assert!(message.contains("mount -t cgroup -o pids"), "{message}");
        // An unreadable v2 parent is reported as such.
        let err = CgroupHierarchy::detect(&mountinfo, HOST_CGROUP, None, None).unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot be read; does the parent exist?"),
            "{err}"
        );
    }

    #[test]
    fn bad_parents_and_self_cgroup_lines_are_refused() {
        for parent in ["/a/../b", "..", "./x"] {
            let err = CgroupHierarchy::detect(HOST_MOUNTINFO, HOST_CGROUP, Some(parent), None)
                .unwrap_err();
            assert!(
                matches!(err, CgroupError::InvalidParent { .. }),
                "{parent}: {err}"
            );
        }
        for line in ["garbage", "4:memory:relative", "4:memory:/a/../b"] {
            let err = CgroupHierarchy::detect(HOST_MOUNTINFO, line, None, None).unwrap_err();
            assert!(
                matches!(err, CgroupError::SelfCgroup { .. }),
                "{line}: {err}"
            );
        }
    }

    #[test]
    fn a_v2_parent_holding_processes_is_refused_unless_it_is_the_root() {
        let delegated = v2_delegated();
        let parent = &delegated.hierarchies()[0];
        assert!(check_v2_parent(parent, "").is_ok());
        let err = check_v2_parent(parent, "4242\n").unwrap_err();
        assert!(matches!(err, CgroupError::ParentHasProcesses { .. }));
        assert!(
            err.to_string().contains("configure a cgroup parent"),
            "{err}"
        );
        let root = Hierarchy {
            parent_cgroup: "/".to_owned(),
            ..parent.clone()
        };
        assert!(check_v2_parent(&root, "1\n2\n").is_ok());
    }

    const SESSION: &str = "sbx-0123456789abcdef0123456789abcdef";

    fn limits() -> CgroupLimits {
        CgroupLimits {
            memory_bytes: Some(64 << 20),
            pids: Some(32),
            cpu_millis: Some(500),
        }
    }

    fn write(file: &str, value: &str) -> CgroupStep {
        CgroupStep::Write {
            file: PathBuf::from(file),
            value: value.to_owned(),
        }
    }

    fn dir(version: CgroupVersion, controllers: &[Controller], path: &str) -> SessionDir {
        SessionDir {
            version,
            controllers: controllers.to_vec(),
            path: PathBuf::from(path),
        }
    }

    #[test]
    fn v1_plan_for_this_host() {
        let mem = format!("{MEMORY_PARENT}/harness-sandboxd");
        let mem_session = format!("{mem}/{SESSION}");
        let pids = format!("/sys/fs/cgroup/pids/harness-sandboxd/{SESSION}");
        let cpu = format!("/sys/fs/cgroup/cpu/harness-sandboxd/{SESSION}");
        let freezer = format!("/sys/fs/cgroup/freezer/harness-sandboxd/{SESSION}");
        assert_eq!(
            host().plan(SESSION, &limits()).unwrap(),
            CgroupPlan {
                dirs: vec![
                    dir(CgroupVersion::V1, &[Controller::Memory], &mem_session),
                    dir(CgroupVersion::V1, &[Controller::Pids], &pids),
                    dir(CgroupVersion::V1, &[Controller::Cpu], &cpu),
                    dir(CgroupVersion::V1, &[Controller::Freezer], &freezer),
                ],
                steps: vec![
                    CgroupStep::EnsureDir(PathBuf::from(&mem)),
                    CgroupStep::CreateDir(PathBuf::from(&mem_session)),
                    write(&format!("{mem_session}/memory.limit_in_bytes"), "67108864"),
                    CgroupStep::WriteIfPresent {
                        file: PathBuf::from(format!("{mem_session}/memory.memsw.limit_in_bytes")),
                        value: "67108864".to_owned(),
                    },
                    CgroupStep::EnsureDir(PathBuf::from("/sys/fs/cgroup/pids/harness-sandboxd")),
                    CgroupStep::CreateDir(PathBuf::from(&pids)),
                    write(&format!("{pids}/pids.max"), "32"),
                    CgroupStep::EnsureDir(PathBuf::from("/sys/fs/cgroup/cpu/harness-sandboxd")),
                    CgroupStep::CreateDir(PathBuf::from(&cpu)),
                    write(&format!("{cpu}/cpu.cfs_period_us"), "100000"),
                    write(&format!("{cpu}/cpu.cfs_quota_us"), "50000"),
                    CgroupStep::EnsureDir(PathBuf::from("/sys/fs/cgroup/freezer/harness-sandboxd")),
                    CgroupStep::CreateDir(PathBuf::from(&freezer)),
                ],
            }
        );
    }

    #[test]
    fn v2_plan_enables_controllers_down_to_the_session() {
        let parent = "/sys/fs/cgroup/system.slice/sandboxd.service";
        let dedicated = format!("{parent}/harness-sandboxd");
        let session = format!("{dedicated}/{SESSION}");
        assert_eq!(
            v2_delegated().plan(SESSION, &limits()).unwrap(),
            CgroupPlan {
                dirs: vec![dir(CgroupVersion::V2, &Controller::REQUIRED, &session)],
                steps: vec![
                    CgroupStep::EnableControllers {
                        dir: PathBuf::from(parent),
                        controllers: Controller::REQUIRED.to_vec(),
                    },
                    CgroupStep::EnsureDir(PathBuf::from(&dedicated)),
                    CgroupStep::EnableControllers {
                        dir: PathBuf::from(&dedicated),
                        controllers: Controller::REQUIRED.to_vec(),
                    },
                    CgroupStep::CreateDir(PathBuf::from(&session)),
                    write(&format!("{session}/memory.max"), "67108864"),
                    CgroupStep::WriteIfPresent {
                        file: PathBuf::from(format!("{session}/memory.swap.max")),
                        value: "0".to_owned(),
                    },
                    write(&format!("{session}/pids.max"), "32"),
                    write(&format!("{session}/cpu.max"), "50000 100000"),
                ],
            }
        );
    }

    #[test]
    fn no_limits_plan_only_directories_and_tiny_cpu_is_raised_to_the_minimum() {
        let parent = "/sys/fs/cgroup/system.slice/sandboxd.service";
        let dedicated = format!("{parent}/harness-sandboxd");
        let session = format!("{dedicated}/{SESSION}");
        let plan = v2_delegated()
            .plan(SESSION, &CgroupLimits::default())
            .unwrap();
        assert_eq!(
            plan.steps,
            vec![
                CgroupStep::EnableControllers {
                    dir: PathBuf::from(parent),
                    controllers: Controller::REQUIRED.to_vec(),
                },
                CgroupStep::EnsureDir(PathBuf::from(&dedicated)),
                CgroupStep::EnableControllers {
                    dir: PathBuf::from(&dedicated),
                    controllers: Controller::REQUIRED.to_vec(),
                },
                CgroupStep::CreateDir(PathBuf::from(&session)),
            ]
        );
        let tiny = CgroupLimits {
            cpu_millis: Some(3),
            ..CgroupLimits::default()
        };
        let plan = v2_delegated().plan(SESSION, &tiny).unwrap();
        assert_eq!(
            plan.steps.last(),
            Some(&write(&format!("{session}/cpu.max"), "1000 100000"))
        );
        let plan = host().plan(SESSION, &tiny).unwrap();
        assert!(plan.steps.contains(&write(
            &format!("/sys/fs/cgroup/cpu/harness-sandboxd/{SESSION}/cpu.cfs_quota_us"),
            "1000"
        )));
        assert_eq!(cpu_quota_us(2000), 200_000);
    }

    #[test]
    fn session_ids_that_could_escape_are_refused() {
        for id in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "a b",
            "sbx.1",
            &"x".repeat(129),
        ] {
            assert!(
                matches!(
                    host().plan(id, &limits()),
                    Err(CgroupError::InvalidSessionId { .. })
                ),
                "{id:?}"
            );
            assert!(host().session(id).is_err(), "{id:?}");
        }
        assert!(host().plan("sbx-AZ_09", &limits()).is_ok());
    }

    #[test]
    fn oom_kill_counts_parse_from_v1_and_v2_files() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        let v2 = "low 0\nhigh 0\nmax 12\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(keyed_value(v1, "oom_kill"), Some(3));
        assert_eq!(keyed_value(v2, "oom_kill"), Some(2));
        assert_eq!(keyed_value("populated 1\nfrozen 0\n", "frozen"), Some(0));
        assert_eq!(keyed_value("oom_kill_disable 0\n", "oom_kill"), None);
        let procs = parse_procs(Path::new("cgroup.procs"), "12\n7\n\n12\n").unwrap();
        assert_eq!(procs.into_iter().collect::<Vec<_>>(), vec![7, 12]);
        assert!(parse_procs(Path::new("cgroup.procs"), "x\n").is_err());
    }

    // ---- Live tests: root and real cgroups (v1 on the development host). ----

    use std::os::unix::process::ExitStatusExt;
    use std::process::{Child, Command, Stdio};

    /// Fails (never skips) when the host cannot run the live tests.
    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "live cgroup tests need root (to create cgroups and move processes); run the \
             tests as root"
        );
    }

    /// A test's own parent cgroup, removed with everything in it on drop.
    struct TestParent {
        hierarchy: CgroupHierarchy,
        /// The v2 parent, made for the test (v2 parents must exist).
        v2_dir: Option<PathBuf>,
    }

    impl TestParent {
        fn new(tag: &str) -> Self {
            require_root();
            let parent = format!("/harness-cgroup-test-{}-{tag}", std::process::id());
            let mountinfo = fs::read_to_string(MOUNTINFO).unwrap();
            let self_cgroup = fs::read_to_string(SELF_CGROUP).unwrap();
            let v2_dir =
                CgroupHierarchy::v2_parent_dir(&mountinfo, &self_cgroup, Some(&parent)).unwrap();
            if let Some(dir) = &v2_dir {
                fs::create_dir_all(dir).unwrap();
            }
            let mut made = Self {
                hierarchy: CgroupHierarchy {
                    hierarchies: Vec::new(),
                },
                v2_dir,
            };
            let detected = CgroupHierarchy::from_host(Some(&parent));
            assert!(
                detected.is_ok(),
                "live cgroup tests need usable cgroups on this host: {}",
                detected
                    .as_ref()
                    .map_or_else(|e| e.to_string(), |_| String::new())
            );
            made.hierarchy = detected.unwrap();
            made
        }

        /// A hierarchy for the same parent built from this host's mountinfo
        /// with some mounts hidden.
        fn without_mounts(&self, hide: &str) -> CgroupHierarchy {
            let mountinfo: String = fs::read_to_string(MOUNTINFO)
                .unwrap()
                .lines()
                .filter(|line| !line.contains(hide))
                .map(|line| format!("{line}\n"))
                .collect();
            let self_cgroup = fs::read_to_string(SELF_CGROUP).unwrap();
            let parent = &self.hierarchy.hierarchies()[0].parent_cgroup;
            let v2_dir =
                CgroupHierarchy::v2_parent_dir(&mountinfo, &self_cgroup, Some(parent)).unwrap();
            let v2 = v2_dir.and_then(|d| fs::read_to_string(d.join("cgroup.controllers")).ok());
            CgroupHierarchy::detect(&mountinfo, &self_cgroup, Some(parent), v2.as_deref()).unwrap()
        }
    }

    impl Drop for TestParent {
        fn drop(&mut self) {
            let _ = self.hierarchy.sweep_leftovers();
            for hierarchy in self.hierarchy.hierarchies() {
                let _ = fs::remove_dir(hierarchy.dedicated_dir());
                let _ = fs::remove_dir(&hierarchy.parent_dir);
            }
            if let Some(dir) = &self.v2_dir {
                let _ = fs::remove_dir(dir);
            }
        }
    }

    fn new_session_id() -> String {
        format!("sbx-{}", uuid::Uuid::new_v4().simple())
    }

    fn sleeper() -> Child {
        Command::new("sleep").arg("300").spawn().unwrap()
    }

    fn read_trimmed(path: &Path) -> String {
        fs::read_to_string(path).unwrap().trim().to_owned()
    }

    fn assert_killed(child: &mut Child) {
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }

    #[test]
    fn live_session_cgroup_limits_a_process_and_is_torn_down() {
        let parent = TestParent::new("create");
        let id = new_session_id();
        let session = parent.hierarchy.create(&id, &limits()).unwrap();

        // The limits read back.
        for dir in session.dirs() {
            assert!(dir.path.is_dir(), "{}", dir.path.display());
            for controller in &dir.controllers {
                let expect: &[(&str, &str)] = match (dir.version, controller) {
                    (CgroupVersion::V1, Controller::Memory) => {
                        &[("memory.limit_in_bytes", "67108864")]
                    }
                    (CgroupVersion::V2, Controller::Memory) => {
                        &[("memory.max", "67108864"), ("memory.swap.max", "0")]
                    }
                    (_, Controller::Pids) => &[("pids.max", "32")],
                    (CgroupVersion::V1, Controller::Cpu) => &[
                        ("cpu.cfs_period_us", "100000"),
                        ("cpu.cfs_quota_us", "50000"),
                    ],
                    (CgroupVersion::V2, Controller::Cpu) => &[("cpu.max", "50000 100000")],
                    (_, Controller::Freezer) => &[("freezer.state", "THAWED")],
                };
                for (file, value) in expect {
                    assert_eq!(read_trimmed(&dir.path.join(file)), *value, "{file}");
                }
                let memsw = dir.path.join("memory.memsw.limit_in_bytes");
                if *controller == Controller::Memory && memsw.exists() {
                    assert_eq!(read_trimmed(&memsw), "67108864");
                }
            }
        }
        // A second session with the same id is refused, and leaves the first intact.
        assert!(matches!(
            parent.hierarchy.create(&id, &limits()),
            Err(CgroupError::CreateDir { .. })
        ));
        assert!(session.dirs().iter().all(|d| d.path.is_dir()));

        let mut child = sleeper();
        session
            .add_process(i32::try_from(child.id()).unwrap())
            .unwrap();
        assert_eq!(session.process_count().unwrap(), 1);
        assert_eq!(session.oom_kills().unwrap(), 0);
        session.peak_memory().unwrap();
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let child_cgroups = fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
        assert_ne!(own, child_cgroups);
        assert!(child_cgroups.contains(&id), "{child_cgroups}");

        let teardown = session.kill_and_remove().unwrap();
        assert_eq!(teardown.processes_killed, 1);
        let mut expected: Vec<PathBuf> = session.dirs().iter().map(|d| d.path.clone()).collect();
        expected.sort();
        let mut removed = teardown.removed.clone();
        removed.sort();
        assert_eq!(removed, expected);
        assert_killed(&mut child);
        assert!(session.dirs().iter().all(|d| !d.path.exists()));

        // Idempotent.
        assert_eq!(
            session.kill_and_remove().unwrap(),
            CgroupTeardown::default()
        );
    }

    #[test]
    fn live_kill_without_a_freezer_signals_in_rounds() {
        let parent = TestParent::new("nofreezer");
        let hierarchy = parent.without_mounts("freezer");
        assert!(
            hierarchy
                .hierarchies()
                .iter()
                .all(|h| !h.controllers.contains(&Controller::Freezer))
        );
        let session = hierarchy
            .create(&new_session_id(), &CgroupLimits::default())
            .unwrap();
        // The shell waits for a line, so it is inside before it forks.
        let mut shell = Command::new("sh")
            .args(["-c", "read go; sleep 300 & sleep 300 & wait"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        session
            .add_process(i32::try_from(shell.id()).unwrap())
            .unwrap();
        shell.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let mut count = 0;
        for _ in 0..200 {
            count = session.process_count().unwrap();
            if count == 3 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(count, 3);

        let teardown = session.kill_and_remove().unwrap();
        assert_eq!(teardown.processes_killed, 3);
        assert_eq!(teardown.removed.len(), session.dirs().len());
        assert_killed(&mut shell);
    }

    #[test]
    fn live_sweep_removes_leftover_cgroups_with_their_processes() {
        let parent = TestParent::new("sweep");
        let hierarchy = &parent.hierarchy;
        // A crashed sandboxd: a session with a process, never torn down ...
        let leftover = hierarchy.create(&new_session_id(), &limits()).unwrap();
        let mut child = sleeper();
        leftover
            .add_process(i32::try_from(child.id()).unwrap())
            .unwrap();
        // ... a child cgroup inside it, and a stray directory of another name.
        let nested = leftover.dirs()[0].path.join("nested");
        fs::create_dir(&nested).unwrap();
        let stray = hierarchy.hierarchies()[0].dedicated_dir().join("stray");
        fs::create_dir(&stray).unwrap();

        let mut removed = hierarchy.sweep_leftovers().unwrap();
        removed.sort();
        let mut expected: Vec<PathBuf> = leftover.dirs().iter().map(|d| d.path.clone()).collect();
        expected.push(nested);
        expected.push(stray);
        expected.sort();
        assert_eq!(removed, expected);
        assert_killed(&mut child);
        assert_eq!(hierarchy.sweep_leftovers().unwrap(), Vec::<PathBuf>::new());
    }
}
