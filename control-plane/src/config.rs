//! The control plane's configuration file.
//!
//! A TOML file passed with `control-plane serve --config <file>`; every key is
//! optional and command-line flags override the file. Default paths all
//! derive from `$HARNESS_HOME` (see [`harness_daemon::paths`]). See
//! `control-plane/control-plane.sample.toml` for an annotated example.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use harness_daemon::config::{ConfigFileError, load_toml, parse_toml, string_or_list};
use harness_daemon::{DefaultPaths, Exposure, ListenAddress};
use serde::Deserialize;

use crate::budget::ModelPrice;
use crate::context::{ContextSettings, ModelSpec};
pub use crate::provider::config::{ProviderConfig, ProvidersConfig};
pub use crate::store::sqlite::SqliteSynchronous;

/// Settings of one control-plane process.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ControlPlaneConfig {
    /// Where the gRPC API listens: one address or a list, each
    /// `unix:/path/to.sock` for a Unix socket or `ip:port` (e.g.
    /// `127.0.0.1:7070`; port 0 picks a free one) for TCP. Every listener
    /// serves the same services. Loopback TCP is for gRPC clients that cannot
    /// use Unix sockets (Python grpcio, Java).
    /// Default: `unix:/run/harness/control-plane.sock`
    /// (`unix:$HARNESS_HOME/run/control-plane.sock`).
    #[serde(deserialize_with = "string_or_list")]
    pub listen: Vec<ListenAddress>,
    /// Allow TCP listeners on addresses other hosts can reach (anything but
    /// loopback). The control plane does not authenticate its callers yet,
    /// so anyone who can reach such a port can start sessions: only set this
    /// behind a network boundary you control. Default: false (a non-loopback
    /// TCP listener is refused at start).
    pub insecure_listen: bool,
    /// How to reach sandboxd: `unix:/path/to.sock`, or `http://host:port`.
    /// The control plane connects lazily, so it may start before sandboxd.
    /// Default: `unix:/run/harness/sandboxd.sock`
    /// (`unix:$HARNESS_HOME/run/sandboxd.sock`), where sandboxd listens by
    /// default.
    pub sandboxd: String,
    /// The SQLite database holding sessions and their event logs. Created if
    /// missing. Default: `/var/lib/harness/control-plane.db`
    /// (`$HARNESS_HOME/lib/control-plane.db`).
    pub database: PathBuf,
    /// Directory of agent definitions, one `<name>.toml` per agent (files
    /// ending in `.script.toml` are scripted-provider replies, not agents).
    /// Default: `/etc/harness/agents` (`$HARNESS_HOME/etc/agents`).
    pub agents_dir: PathBuf,
    /// Directory of skills, one folder per skill holding a `SKILL.md` (see
    /// the `skill` module). A directory that does not exist holds no skills;
    /// an agent that lists one then fails to load. Default: the `skills`
    /// folder of the agents directory.
    pub skills_dir: Option<PathBuf>,
    /// Longest a single tool call may take, including the trip to sandboxd,
    /// e.g. `"60s"` or `"2m"`. Default: 60 seconds.
    #[serde(with = "humantime_serde")]
    pub tool_timeout: Duration,
    /// How many tool calls of one model turn run at the same time. Their
    /// results are still recorded in the order the model asked for them.
    /// Default: 4.
    pub max_parallel_tool_calls: usize,
    /// How deep a tree of subagents may grow: a session started through
    /// StartSession is at depth 0, its subagents at 1, theirs at 2. A
    /// delegation deeper than this is refused (the model gets a
    /// limit_exceeded error, no child runs). 0 turns delegation off.
    /// Default: 2.
    pub max_subagent_depth: u32,
    /// How hard SQLite works to keep each committed event: `"normal"` (the
    /// default) survives any crash of the control-plane process — SIGKILL,
    /// OOM kill, panic — because WAL commits reach the OS before the loop
    /// moves on; an operating-system crash or power loss may lose the last
    /// moments (the database stays consistent). `"full"` also survives those
    /// by syncing the disk on every commit, which costs one disk flush per
    /// step (concurrent sessions share flushes through group commit).
    pub sqlite_synchronous: SqliteSynchronous,
    /// Size past which the write-ahead log is copied back into the database
    /// and truncated, holding writes back for a few milliseconds. Without
    /// it the WAL never shrinks while sessions write without pause.
    /// Default: 268435456 (256 MiB).
    pub sqlite_max_wal_bytes: u64,
    /// Settings of the OpenAI-compatible provider (`[providers.openai]`).
    /// Base URL default: `$OPENAI_BASE_URL`, else `https://api.openai.com/v1`;
    /// key: the variable named by `api-key-env` (default `OPENAI_API_KEY`).
    pub providers: ProvidersConfig,
    /// Prices per model name, for cost budgets:
    /// `[prices."gpt-4o-mini"] input-usd-per-mtok = 0.15, output-usd-per-mtok = 0.6`
    /// (and optionally `cached-input-usd-per-mtok`). A model without a price
    /// costs 0, and an agent with a cost budget must have one.
    pub prices: BTreeMap<String, ModelPrice>,
    /// The model catalog: `[models."gpt-4o-mini"] context-window = 128000,
    /// max-output-tokens = 16384`. A model without an entry has no known
    /// context window, and its sessions are never compacted.
    pub models: BTreeMap<String, ModelSpec>,
    /// What reaches the model (`[context]`): `max-input-tokens`.
    pub context: ContextSettings,
}

impl Default for ControlPlaneConfig {
    /// The defaults, with paths from this process's `$HARNESS_HOME`.
    fn default() -> Self {
        Self::with_paths(&DefaultPaths::from_env())
    }
}

impl ControlPlaneConfig {
    /// The skills directory: `skills-dir`, else the agents directory's
    /// `skills` folder.
    pub fn skills_dir(&self) -> PathBuf {
        self.skills_dir
            .clone()
            .unwrap_or_else(|| self.agents_dir.join("skills"))
    }

    /// The defaults, with the listen address, sandboxd endpoint, database
    /// and agents directory taken from `paths`.
    pub fn with_paths(paths: &DefaultPaths) -> Self {
        Self {
            listen: vec![paths.control_plane_listen()],
            insecure_listen: false,
            sandboxd: paths.sandboxd_endpoint(),
            database: paths.control_plane_database.clone(),
            agents_dir: paths.agents_dir.clone(),
            skills_dir: None,
            tool_timeout: Duration::from_secs(60),
            max_parallel_tool_calls: 4,
            max_subagent_depth: crate::agent_loop::DEFAULT_MAX_SUBAGENT_DEPTH,
            sqlite_synchronous: SqliteSynchronous::Normal,
            sqlite_max_wal_bytes: 256 << 20,
            providers: ProvidersConfig::default(),
            prices: BTreeMap::new(),
            models: BTreeMap::new(),
            context: ContextSettings::default(),
        }
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read, is not valid TOML, or has unknown or
    /// mistyped keys (the error names the file, line and column).
    #[error(transparent)]
    File(#[from] ConfigFileError),
    /// A value parsed but makes no sense.
    #[error("invalid config file {path}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

impl ControlPlaneConfig {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::validated(load_toml(path)?, path)
    }

    /// Parses and validates configuration text; `path` only names the source
    /// in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::validated(parse_toml(text, path)?, path)
    }

    /// Whether `listen` may hold TCP addresses off loopback.
    pub fn exposure(&self) -> Exposure {
        if self.insecure_listen {
            Exposure::AllowRemote
        } else {
            Exposure::LoopbackOnly
        }
    }

    fn validated(config: Self, path: &Path) -> Result<Self, ConfigError> {
        config.validate().map_err(|problem| ConfigError::Invalid {
            path: path.to_owned(),
            problem,
        })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.max_parallel_tool_calls == 0 {
            return Err("max-parallel-tool-calls must be at least 1".to_owned());
        }
        if self.tool_timeout.is_zero() {
            return Err("tool-timeout must be longer than zero".to_owned());
        }
        for (name, provider) in [
            ("openai", &self.providers.openai),
            ("anthropic", &self.providers.anthropic),
        ] {
            if provider.max_attempts == 0 {
                return Err(format!("providers.{name}.max-attempts must be at least 1"));
            }
            if provider.circuit_breaker_threshold == 0 {
                return Err(format!(
                    "providers.{name}.circuit-breaker-threshold must be at least 1"
                ));
            }
        }
        for (model, price) in &self.prices {
            let prices = [
                price.input_usd_per_mtok,
                price.output_usd_per_mtok,
                price.cached_input_usd_per_mtok.unwrap_or(0.0),
            ];
            if prices.iter().any(|usd| !usd.is_finite() || *usd < 0.0) {
                return Err(format!("prices.\"{model}\": prices must be zero or more"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn sample_config_parses_to_the_documented_values() {
        let sample = include_str!("../control-plane.sample.toml");
        let config = ControlPlaneConfig::parse(sample, Path::new("control-plane.sample.toml"))
            .expect("sample config parses");
        assert_eq!(
            config,
            ControlPlaneConfig {
                listen: vec![
                    "unix:/run/harness/control-plane.sock".parse().unwrap(),
                    "127.0.0.1:7070".parse().unwrap(),
                ],
                insecure_listen: false,
                sandboxd: "unix:/run/harness/sandboxd.sock".to_owned(),
                database: PathBuf::from("/var/lib/harness/control-plane.db"),
                agents_dir: PathBuf::from("/etc/harness/agents"),
                skills_dir: Some(PathBuf::from("/etc/harness/skills")),
                tool_timeout: Duration::from_secs(90),
                max_parallel_tool_calls: 8,
                max_subagent_depth: 3,
                sqlite_synchronous: SqliteSynchronous::Full,
                sqlite_max_wal_bytes: 64 << 20,
                providers: ProvidersConfig {
                    openai: ProviderConfig {
                        base_url: Some("http://127.0.0.1:8000/v1".to_owned()),
                        api_key_env: Some("VLLM_API_KEY".to_owned()),
                        max_attempts: 5,
                        ..ProviderConfig::default()
                    },
                    anthropic: ProviderConfig {
                        circuit_breaker_cooldown: Duration::from_secs(60),
                        ..ProviderConfig::default()
                    },
                },
                prices: BTreeMap::from([
                    (
                        "claude-sonnet-4-5".to_owned(),
                        ModelPrice {
                            input_usd_per_mtok: 3.0,
                            cached_input_usd_per_mtok: Some(0.3),
                            output_usd_per_mtok: 15.0,
                        }
                    ),
                    (
                        "gpt-4o-mini".to_owned(),
                        ModelPrice {
                            input_usd_per_mtok: 0.15,
                            cached_input_usd_per_mtok: Some(0.075),
                            output_usd_per_mtok: 0.6,
                        }
                    ),
                ]),
                models: BTreeMap::from([(
                    "gpt-4o-mini".to_owned(),
                    ModelSpec {
                        context_window: 128_000,
                        max_output_tokens: Some(16_384),
                    }
                )]),
                context: ContextSettings {
                    max_input_tokens: 20_000,
                    compaction_threshold: 0.75,
                    keep_tool_results: 3,
                    keep_turns: 6,
                    compaction_model: Some("gpt-4o-mini".to_owned()),
                },
            }
        );
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        let config = ControlPlaneConfig::parse("", Path::new("empty.toml")).unwrap();
        assert_eq!(config, ControlPlaneConfig::default());
    }

    #[test]
    fn unknown_key_is_rejected_with_the_file_line_and_column() {
        let error = ControlPlaneConfig::parse(
            "tool-timeout = \"1s\"\nlistn = \"x\"",
            Path::new("/etc/cp.toml"),
        )
        .expect_err("typo is rejected");
        assert!(matches!(error, ConfigError::File(_)));
        let text = error.to_string();
        assert!(
            text.starts_with("/etc/cp.toml:2:1: unknown field `listn`"),
            "{text}"
        );
    }

    #[test]
    fn default_paths_follow_harness_home() {
        let config = ControlPlaneConfig::with_paths(&DefaultPaths::for_home(Some("/h".as_ref())));
        assert_eq!(
            (
                config.listen,
                config.sandboxd,
                config.database,
                config.agents_dir
            ),
            (
                vec![ListenAddress::Unix(PathBuf::from(
                    "/h/run/control-plane.sock"
                ))],
                "unix:/h/run/sandboxd.sock".to_owned(),
                PathBuf::from("/h/lib/control-plane.db"),
                PathBuf::from("/h/etc/agents")
            )
        );
    }

    #[test]
    fn the_default_sandboxd_endpoint_is_where_sandboxd_listens() {
        for home in [None, Some("/h".as_ref())] {
            let paths = DefaultPaths::for_home(home);
            let sandboxd = harness_sandboxd::config::SandboxdConfig::with_paths(&paths);
            assert_eq!(
                vec![ControlPlaneConfig::with_paths(&paths).sandboxd],
                sandboxd
                    .listen
                    .iter()
                    .map(ListenAddress::endpoint)
                    .collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn exposure_follows_insecure_listen() {
        let parse = |text| ControlPlaneConfig::parse(text, Path::new("cp.toml")).unwrap();
        assert_eq!(
            [
                parse("").exposure(),
                parse("insecure-listen = true").exposure()
            ],
            [Exposure::LoopbackOnly, Exposure::AllowRemote]
        );
    }

    #[test]
    fn negative_prices_are_rejected() {
        let text = "[prices.m]\ninput-usd-per-mtok = -1.0\noutput-usd-per-mtok = 1.0\n";
        let error = ControlPlaneConfig::parse(text, Path::new("cp.toml")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "invalid config file cp.toml: prices.\"m\": prices must be zero or more"
        );
    }

    #[test]
    fn zero_parallelism_is_rejected() {
        let error = ControlPlaneConfig::parse("max-parallel-tool-calls = 0", Path::new("cp.toml"))
            .expect_err("zero is rejected");
        assert_eq!(
            error.to_string(),
            "invalid config file cp.toml: max-parallel-tool-calls must be at least 1"
        );
    }
}
