//! Daemon configuration: a TOML file, every key optional; flags of
//! `sandboxd serve` override it.
//!
//! Defaults are written out in [`SandboxdConfig::with_paths`]; the default
//! paths all derive from `$HARNESS_HOME` (see [`harness_daemon::paths`]).
//! See `sandboxd/sandboxd.sample.toml` for a commented example.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use harness_daemon::config::{ConfigFileError, load_toml, parse_toml, string_or_list};
use harness_daemon::{DefaultPaths, Exposure, ListenAddress};
use serde::Deserialize;

/// Errors reading the configuration file: they name the file, and the line
/// and column of a mistake.
pub type ConfigError = ConfigFileError;

/// sandboxd configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct SandboxdConfig {
    /// Where to serve gRPC: one address or a list, each `unix:/path/to.sock`
    /// or a TCP `ip:port` such as `127.0.0.1:7071` (port 0 picks a free
    /// one). Every listener serves the same services. Prefer the Unix socket
    /// on a single host: its file permissions (0660) decide who may call
    /// sandboxd. Loopback TCP is for gRPC clients that cannot use Unix
    /// sockets (Python grpcio, Java). Default
    /// `unix:/run/harness/sandboxd.sock` (`unix:$HARNESS_HOME/run/sandboxd.sock`).
    #[serde(deserialize_with = "string_or_list")]
    pub listen: Vec<ListenAddress>,
    /// Allow TCP listeners on addresses other hosts can reach (anything but
    /// loopback). sandboxd does not authenticate its callers, so anyone who
    /// can reach such a port can run tool calls: only set this behind a
    /// network boundary you control. Default false: sandboxd refuses to
    /// start with a non-loopback TCP listener.
    pub insecure_listen: bool,
    /// Directory for session workspaces and daemon state. Anything found under
    /// `<state-dir>/sessions` at start-up was left by a crashed instance and is
    /// deleted. Default `/var/lib/harness/sandboxd`
    /// (`$HARNESS_HOME/lib/sandboxd`).
    pub state_dir: PathBuf,
    /// Directory of tool components (`*.wasm`, wasm32-wasip2 components).
    /// Default `/var/lib/harness/sandboxd/tools`
    /// (`$HARNESS_HOME/lib/sandboxd/tools`).
    pub tools_dir: PathBuf,
    /// Directory for compiled components (`.cwasm`), keyed by content digest
    /// and engine version. Default `/var/cache/harness/sandboxd`
    /// (`$HARNESS_HOME/cache/sandboxd`).
    pub cache_dir: Option<PathBuf>,
    /// Maximum number of sessions held at once. Default 10000.
    pub max_sessions: u32,
    /// Session lifetime when the policy does not set one. Default "1h".
    #[serde(with = "humantime_serde")]
    pub default_ttl: Duration,
    /// Idle timeout when the policy does not set one. Default "15m".
    #[serde(with = "humantime_serde")]
    pub default_idle_timeout: Duration,
    /// Invocation deadline when the policy does not set one. Default "30s".
    #[serde(with = "humantime_serde")]
    pub default_invocation_timeout: Duration,
    /// Largest invocation deadline a policy may ask for. Default "10m".
    #[serde(with = "humantime_serde")]
    pub max_invocation_timeout: Duration,
    /// Linear-memory limit per WASI invocation when the policy does not set
    /// one. Default 256 MiB.
    pub default_memory_bytes: u64,
    /// Largest linear-memory limit a policy may ask for. Default 4 GiB.
    pub max_memory_bytes: u64,
    /// Cap on captured stdout and on stderr per invocation when the policy
    /// does not set one. Default 1 MiB.
    pub default_max_output_bytes: u64,
    /// Largest JSON input accepted by `Invoke`. Default 4 MiB.
    pub max_input_bytes: u64,
    /// Largest file accepted or returned by `WriteFiles`/`ReadFiles`.
    /// Default 64 MiB.
    pub max_file_bytes: u64,
    /// Workspace size cap when the policy does not set one. Default 1 GiB.
    pub default_workspace_bytes: u64,
    /// Largest workspace a policy may ask for. Default 8 GiB.
    pub max_workspace_bytes: u64,
    /// Where workspaces live, and so who holds them to their size cap.
    /// - `"tmpfs"` (the default): each workspace is its own tmpfs mount,
    ///   sized to its cap and limited to `workspace-max-files` entries. The
    ///   kernel refuses any write past either (`ENOSPC`), whoever writes:
    ///   `WriteFiles`, a WASI tool, a command in a process sandbox. The
    ///   bytes are memory (swappable), charged to the memory cgroup of the
    ///   process that writes them, so size `max-workspace-bytes` with the
    ///   host's memory in mind. Needs CAP_SYS_ADMIN: sandboxd refuses to
    ///   start if it cannot mount one.
    /// - `"directory"`: plain directories under `state-dir`. The cap holds
    ///   for `WriteFiles` and initial files only; a tool can fill the disk.
    pub workspace_storage: WorkspaceStorage,
    /// Files, directories and links a tmpfs workspace may hold (each costs
    /// kernel memory, about 1 KiB). Default 65536.
    pub workspace_max_files: u64,
    /// How often the epoch ticker advances; the granularity of WASI
    /// deadlines and of fair sharing between looping guests (each yields to
    /// the executor once per tick). Default "500us".
    #[serde(with = "humantime_serde")]
    pub epoch_tick: Duration,
    /// How often the tools directory is rescanned for added, replaced or
    /// removed components. Default "2s".
    #[serde(with = "humantime_serde")]
    pub tools_rescan_interval: Duration,
    /// Host names sandboxd resolves itself, before asking the system
    /// resolver, for network egress: `{ "api.internal.test" = ["10.0.0.5"] }`.
    /// An allowed name is still refused if it maps to a loopback, private,
    /// link-local or metadata address that the session has no CIDR for.
    /// Default: none.
    pub static_hosts: BTreeMap<String, Vec<IpAddr>>,
    /// The process backend (namespaced Linux sandboxes).
    pub process: ProcessConfig,
}

/// The `workspace-storage` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkspaceStorage {
    /// A size-capped tmpfs mount per workspace.
    Tmpfs,
    /// A plain directory per workspace.
    Directory,
}

/// The `[process]` section: the namespaced process backend.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ProcessConfig {
    /// The `sandbox-init` program started as pid 1 of every process sandbox.
    /// Default: `sandbox-init` next to the running sandboxd binary.
    pub init_program: Option<PathBuf>,
    /// First host uid (and gid) of the ranges sandbox users map to. Session
    /// n gets the 65536 ids from `uid-base + n * 65536`, so no two live
    /// sessions share a host id and none is ever host root. Must not overlap
    /// real users. Default 1000000000 (10000 sessions stay below 2^31).
    pub uid_base: u32,
    /// cgroup under which session cgroups are created, as a path from the
    /// hierarchy root (e.g. "/harness"). Default: sandboxd's own cgroup.
    pub cgroup_parent: Option<String>,
    /// pids limit per session when the policy does not set one. Default 512.
    pub default_pids: u32,
    /// Size of each sandbox's `/tmp` (and `/dev/shm`) tmpfs. Default 64 MiB.
    pub tmp_bytes: u64,
    /// Open-descriptor limit (RLIMIT_NOFILE) of sandboxed commands.
    /// Default 1024.
    pub max_open_files: u64,
    /// How long a sandbox may take to build itself before `CreateSession`
    /// fails. Default "10s".
    #[serde(with = "humantime_serde")]
    pub start_timeout: Duration,
    /// After a command exits, how long to keep reading output that
    /// background processes still write to its pipes. Default "50ms".
    #[serde(with = "humantime_serde")]
    pub output_grace: Duration,
    /// Sandbox inits kept cloned into fresh namespaces ahead of
    /// `CreateSession` (each holds one host id range and a few hundred KiB).
    /// 0 builds every sandbox from scratch. Default 2.
    pub warm_pool: usize,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            init_program: None,
            uid_base: 1_000_000_000,
            cgroup_parent: None,
            default_pids: 512,
            tmp_bytes: 64 << 20,
            max_open_files: 1024,
            start_timeout: Duration::from_secs(10),
            output_grace: Duration::from_millis(50),
            warm_pool: 2,
        }
    }
}

impl Default for SandboxdConfig {
    /// The defaults, with paths from this process's `$HARNESS_HOME`.
    fn default() -> Self {
        Self::with_paths(&DefaultPaths::from_env())
    }
}

impl SandboxdConfig {
    /// The defaults, with the listen address, state, tools and cache
    /// directories taken from `paths`.
    pub fn with_paths(paths: &DefaultPaths) -> Self {
        Self {
            listen: vec![paths.sandboxd_listen()],
            insecure_listen: false,
            state_dir: paths.sandboxd_state_dir.clone(),
            tools_dir: paths.sandboxd_tools_dir.clone(),
            cache_dir: Some(paths.sandboxd_cache_dir.clone()),
            max_sessions: 10_000,
            default_ttl: Duration::from_secs(3600),
            default_idle_timeout: Duration::from_secs(15 * 60),
            default_invocation_timeout: Duration::from_secs(30),
            max_invocation_timeout: Duration::from_secs(600),
            default_memory_bytes: 256 << 20,
            max_memory_bytes: 4 << 30,
            default_max_output_bytes: 1 << 20,
            max_input_bytes: 4 << 20,
            max_file_bytes: 64 << 20,
            default_workspace_bytes: 1 << 30,
            max_workspace_bytes: 8 << 30,
            workspace_storage: WorkspaceStorage::Tmpfs,
            workspace_max_files: 65_536,
            epoch_tick: Duration::from_micros(500),
            tools_rescan_interval: Duration::from_secs(2),
            static_hosts: BTreeMap::new(),
            process: ProcessConfig::default(),
        }
    }

    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        load_toml(path)
    }

    /// Parses config text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        parse_toml(text, path)
    }

    /// Whether `listen` may hold TCP addresses off loopback.
    pub fn exposure(&self) -> Exposure {
        if self.insecure_listen {
            Exposure::AllowRemote
        } else {
            Exposure::LoopbackOnly
        }
    }

    /// The directory holding session workspaces.
    pub fn sessions_dir(&self) -> PathBuf {
        self.state_dir.join("sessions")
    }

    /// How workspaces are created, from `workspace-storage` and
    /// `workspace-max-files`.
    pub fn workspace_storage(&self) -> crate::workspace::Storage {
        match self.workspace_storage {
            WorkspaceStorage::Tmpfs => crate::workspace::Storage::Tmpfs {
                max_files: self.workspace_max_files,
            },
            WorkspaceStorage::Directory => crate::workspace::Storage::Directory,
        }
    }

    /// The compiled-component cache directory.
    pub fn effective_cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("cache"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn parse(text: &str) -> Result<SandboxdConfig, ConfigError> {
        SandboxdConfig::parse(text, Path::new("sandboxd.toml"))
    }

    #[test]
    fn sample_config_parses_to_the_documented_values() {
        let sample = include_str!("../sandboxd.sample.toml");
        let parsed = parse(sample).unwrap();
        let expected = SandboxdConfig {
            listen: vec![
                "unix:/run/harness/sandboxd.sock".parse().unwrap(),
                "127.0.0.1:7071".parse().unwrap(),
            ],
            insecure_listen: false,
            state_dir: PathBuf::from("/var/lib/harness/sandboxd"),
            tools_dir: PathBuf::from("/var/lib/harness/sandboxd/tools"),
            cache_dir: Some(PathBuf::from("/var/cache/harness/sandboxd")),
            max_sessions: 2000,
            default_ttl: Duration::from_secs(2 * 3600),
            default_idle_timeout: Duration::from_secs(10 * 60),
            default_invocation_timeout: Duration::from_secs(20),
            max_invocation_timeout: Duration::from_secs(300),
            default_memory_bytes: 128 << 20,
            max_memory_bytes: 1 << 30,
            default_max_output_bytes: 256 << 10,
            max_input_bytes: 1 << 20,
            max_file_bytes: 16 << 20,
            default_workspace_bytes: 512 << 20,
            max_workspace_bytes: 4 << 30,
            workspace_storage: WorkspaceStorage::Tmpfs,
            workspace_max_files: 100_000,
            epoch_tick: Duration::from_micros(500),
            tools_rescan_interval: Duration::from_secs(2),
            static_hosts: [(
                "api.internal.test".to_owned(),
                vec![IpAddr::from([10, 0, 0, 5])],
            )]
            .into(),
            process: ProcessConfig {
                init_program: Some(PathBuf::from("/usr/libexec/sandboxd/sandbox-init")),
                uid_base: 1_500_000_000,
                cgroup_parent: Some("/harness".to_owned()),
                default_pids: 256,
                tmp_bytes: 32 << 20,
                max_open_files: 4096,
                start_timeout: Duration::from_secs(5),
                output_grace: Duration::from_millis(100),
                warm_pool: 4,
            },
        };
        assert_eq!(parsed, expected);
    }

    #[test]
    fn empty_config_is_the_default() {
        assert_eq!(parse("").unwrap(), SandboxdConfig::default());
    }

    #[test]
    fn default_paths_follow_harness_home() {
        let config = SandboxdConfig::with_paths(&DefaultPaths::for_home(Some("/h".as_ref())));
        assert_eq!(
            (
                config.listen,
                config.state_dir,
                config.tools_dir,
                config.cache_dir
            ),
            (
                vec![ListenAddress::Unix(PathBuf::from("/h/run/sandboxd.sock"))],
                PathBuf::from("/h/lib/sandboxd"),
                PathBuf::from("/h/lib/sandboxd/tools"),
                Some(PathBuf::from("/h/cache/sandboxd"))
            )
        );
    }

    #[test]
    fn one_listen_address_is_a_list_of_one() {
        assert_eq!(
            parse("listen = \"127.0.0.1:7071\"").unwrap().listen,
            vec![ListenAddress::Tcp(([127, 0, 0, 1], 7071).into())]
        );
    }

    #[test]
    fn unknown_keys_are_rejected_with_file_and_line() {
        let err = parse("max-sessions = 1\nlistne = \"x\"").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("sandboxd.toml:2:1: unknown field `listne`"),
            "{err}"
        );
    }

    #[test]
    fn exposure_follows_insecure_listen() {
        assert_eq!(
            [
                parse("").unwrap().exposure(),
                parse("insecure-listen = true").unwrap().exposure()
            ],
            [Exposure::LoopbackOnly, Exposure::AllowRemote]
        );
    }
}
