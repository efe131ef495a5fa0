//! Daemon configuration: a TOML file, every key optional.
//!
//! Defaults are written out in [`SandboxdConfig::default`]; see
//! `sandboxd/sandboxd.sample.toml` for a commented example.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Errors reading the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<toml::de::Error>,
    },
}

/// sandboxd configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct SandboxdConfig {
    /// Where to serve gRPC: `unix:/path/to.sock` (the default,
    /// `unix:/run/sandboxd/sandboxd.sock`) or a TCP `host:port` such as
    /// `127.0.0.1:7071`. Prefer the Unix socket on a single host: its file
    /// permissions decide who may call sandboxd.
    pub listen: String,
    /// Directory for session workspaces and daemon state. Anything found under
    /// `<state-dir>/sessions` at start-up was left by a crashed instance and is
    /// deleted. Default `/var/lib/sandboxd`.
    pub state_dir: PathBuf,
    /// Directory of tool components (`*.wasm`, wasm32-wasip2 components).
    /// Default `/var/lib/sandboxd/tools`.
    pub tools_dir: PathBuf,
    /// Directory for compiled components (`.cwasm`), keyed by content digest
    /// and engine version. Default `<state-dir>/cache`.
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
}

impl Default for SandboxdConfig {
    fn default() -> Self {
        Self {
            listen: "unix:/run/sandboxd/sandboxd.sock".to_owned(),
            state_dir: PathBuf::from("/var/lib/sandboxd"),
            tools_dir: PathBuf::from("/var/lib/sandboxd/tools"),
            cache_dir: None,
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
            epoch_tick: Duration::from_micros(500),
            tools_rescan_interval: Duration::from_secs(2),
            static_hosts: BTreeMap::new(),
        }
    }
}

impl SandboxdConfig {
    /// Reads and parses a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Parses config text.
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The directory holding session workspaces.
    pub fn sessions_dir(&self) -> PathBuf {
        self.state_dir.join("sessions")
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

    #[test]
    fn sample_config_parses_to_the_documented_values() {
        let sample = include_str!("../sandboxd.sample.toml");
        let parsed = SandboxdConfig::parse(sample).unwrap();
        let expected = SandboxdConfig {
            listen: "unix:/run/sandboxd/sandboxd.sock".to_owned(),
            state_dir: PathBuf::from("/var/lib/sandboxd"),
            tools_dir: PathBuf::from("/var/lib/sandboxd/tools"),
            cache_dir: Some(PathBuf::from("/var/cache/sandboxd")),
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
            epoch_tick: Duration::from_micros(500),
            tools_rescan_interval: Duration::from_secs(2),
            static_hosts: [(
                "api.internal.test".to_owned(),
                vec![IpAddr::from([10, 0, 0, 5])],
            )]
            .into(),
        };
        assert_eq!(parsed, expected);
    }

    #[test]
    fn empty_config_is_the_default() {
        assert_eq!(
            SandboxdConfig::parse("").unwrap(),
            SandboxdConfig::default()
        );
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = SandboxdConfig::parse("listne = \"x\"").unwrap_err();
        assert!(err.to_string().contains("listne"), "{err}");
    }
}
