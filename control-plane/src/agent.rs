//! Agent definitions: one TOML file per agent in the agents directory.
//!
//! ```toml
//! name = "demo"
//! description = "Writes a note, lists the directory, reads the note back."
//! provider = "scripted"          # "openai" and "anthropic" are not implemented yet
//! model = "scripted-demo"
//! script = "demo.script.toml"    # scripted provider only; relative to this file
//! system-prompt = "You are a careful assistant."
//! tools = ["write_file", "list_dir", "read_file"]
//! max-turns = 20                 # default 20
//!
//! [sandbox]
//! workspace-size-limit-bytes = 16777216   # 0 or absent: sandboxd's default
//! invocation-timeout = "30s"              # absent: sandboxd's default
//! memory-bytes = 67108864                 # 0 or absent: sandboxd's default
//! ```
//!
//! Every `*.toml` file of the directory is an agent except `*.script.toml`
//! files, which hold scripted-provider replies. Loading fails on the first bad
//! file with an error naming it: a control plane never runs with half its
//! agents silently missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use harness_proto::control::v1 as control;
use harness_proto::sandbox::v1 as sandbox;
use serde::Deserialize;

use crate::provider::ModelProvider;
use crate::provider::scripted::{ScriptError, ScriptedProvider};

/// Turn limit of an agent that does not set `max-turns`.
pub const DEFAULT_MAX_TURNS: u32 = 20;

const SCRIPT_SUFFIX: &str = ".script.toml";

/// The model provider an agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Replies read from a script file (tests, offline demo).
    Scripted,
    /// OpenAI-compatible Chat Completions. Not implemented yet.
    Openai,
    /// Anthropic Messages. Not implemented yet.
    Anthropic,
}

impl ProviderKind {
    /// The name used in agent files and in `ListAgents`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scripted => "scripted",
            Self::Openai => "openai",
            Self::Anthropic => "anthropic",
        }
    }
}

/// The `[sandbox]` table: the sandbox policy of the agent's sessions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SandboxSettings {
    /// Maximum total size of the workspace in bytes; 0 means sandboxd's default.
    #[serde(default)]
    pub workspace_size_limit_bytes: u64,
    /// Default and maximum deadline of one tool invocation, e.g. `"30s"`.
    #[serde(default, with = "humantime_serde")]
    pub invocation_timeout: Option<Duration>,
    /// Memory limit of one invocation in bytes; 0 means sandboxd's default.
    #[serde(default)]
    pub memory_bytes: u64,
}

impl SandboxSettings {
    /// The sandboxd policy for a session of this agent: WASI tools only, no
    /// network, the limits above.
    pub fn session_policy(&self) -> sandbox::SessionPolicy {
        sandbox::SessionPolicy {
            backends: vec![sandbox::Backend::Wasi.into()],
            workspace: Some(sandbox::WorkspacePolicy {
                size_limit_bytes: self.workspace_size_limit_bytes,
                ..Default::default()
            }),
            limits: Some(sandbox::ResourceLimits {
                memory_bytes: self.memory_bytes,
                invocation_timeout: self
                    .invocation_timeout
                    .map(harness_proto::duration_to_proto),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// The file format, before paths are resolved and the provider is checked.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct AgentFile {
    name: String,
    #[serde(default)]
    description: String,
    provider: ProviderKind,
    model: String,
    script: Option<PathBuf>,
    #[serde(default)]
    system_prompt: String,
    #[serde(default)]
    tools: Vec<String>,
    #[serde(default = "default_max_turns")]
    max_turns: u32,
    #[serde(default)]
    sandbox: SandboxSettings,
}

fn default_max_turns() -> u32 {
    DEFAULT_MAX_TURNS
}

/// A validated agent definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentDefinition {
    /// Unique name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// Model provider.
    pub provider: ProviderKind,
    /// Model name passed to the provider.
    pub model: String,
    /// Scripted replies (scripted provider), resolved against the agent file's directory.
    pub script: Option<PathBuf>,
    /// The system prompt.
    pub system_prompt: String,
    /// Tools the agent may call, in the order they are shown to the model.
    pub tools: Vec<String>,
    /// Model turns before the session stops with `MAX_TURNS`.
    pub max_turns: u32,
    /// Sandbox policy of its sessions.
    pub sandbox: SandboxSettings,
    /// The file it was loaded from.
    pub source: PathBuf,
}

impl AgentDefinition {
    /// The definition as served by `ListAgents`.
    pub fn to_proto(&self) -> control::Agent {
        control::Agent {
            name: self.name.clone(),
            description: self.description.clone(),
            provider: self.provider.as_str().to_owned(),
            model: self.model.clone(),
            tools: self.tools.clone(),
            budget: Some(self.budget()),
            subagents: Vec::new(),
        }
    }

    /// The agent's default budget.
    pub fn budget(&self) -> control::BudgetLimits {
        control::BudgetLimits {
            max_turns: Some(self.max_turns),
            ..Default::default()
        }
    }
}

/// A runnable agent: its definition and its model provider.
#[derive(Debug, Clone)]
pub struct Agent {
    /// The definition.
    pub definition: AgentDefinition,
    /// The provider answering its model calls.
    pub provider: Arc<dyn ModelProvider>,
}

/// Why the agents could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agents directory could not be listed.
    #[error("cannot list agents directory {dir}")]
    ReadDir {
        /// The directory.
        dir: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An agent file could not be read.
    #[error("cannot read agent file {file}")]
    Read {
        /// The agent file.
        file: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An agent file is not valid TOML or has unknown or mistyped keys.
    #[error("invalid agent file {file}")]
    Parse {
        /// The agent file.
        file: PathBuf,
        /// What is wrong, with line and column.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// An agent file parsed but a value is unusable.
    #[error("invalid agent file {file}: {problem}")]
    Invalid {
        /// The agent file.
        file: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The agent names a provider that is not implemented yet.
    #[error(
        "agent file {file}: provider \"{}\" is not implemented yet (only \"scripted\" is)",
        provider.as_str()
    )]
    ProviderNotImplemented {
        /// The agent file.
        file: PathBuf,
        /// The provider it asks for.
        provider: ProviderKind,
    },
    /// The agent's script could not be loaded.
    #[error("agent file {file}: bad script")]
    Script {
        /// The agent file.
        file: PathBuf,
        /// What is wrong with the script (names the script file).
        #[source]
        source: ScriptError,
    },
    /// Two files define the same agent name.
    #[error("agent \"{name}\" is defined twice: in {first} and in {second}")]
    DuplicateName {
        /// The name.
        name: String,
        /// The first file defining it.
        first: PathBuf,
        /// The second file defining it.
        second: PathBuf,
    },
}

/// The agents a control plane can run, by name.
#[derive(Debug, Clone, Default)]
pub struct AgentCatalog {
    agents: BTreeMap<String, Arc<Agent>>,
}

impl AgentCatalog {
    /// Loads every agent file of `dir` (see the module docs for the format).
    pub fn load_dir(dir: &Path) -> Result<Self, AgentError> {
        let mut catalog = Self::default();
        for file in agent_files(dir)? {
            catalog.insert(load_agent_file(&file)?)?;
        }
        Ok(catalog)
    }

    /// Builds a catalog from agents made in code (tests, embedding).
    pub fn from_agents(agents: impl IntoIterator<Item = Agent>) -> Result<Self, AgentError> {
        let mut catalog = Self::default();
        for agent in agents {
            catalog.insert(agent)?;
        }
        Ok(catalog)
    }

    fn insert(&mut self, agent: Agent) -> Result<(), AgentError> {
        if let Some(existing) = self.agents.get(&agent.definition.name) {
            return Err(AgentError::DuplicateName {
                name: agent.definition.name.clone(),
                first: existing.definition.source.clone(),
                second: agent.definition.source.clone(),
            });
        }
        self.agents
            .insert(agent.definition.name.clone(), Arc::new(agent));
        Ok(())
    }

    /// The agent called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Agent>> {
        self.agents.get(name).cloned()
    }

    /// All agents, sorted by name.
    pub fn agents(&self) -> impl Iterator<Item = &Arc<Agent>> {
        self.agents.values()
    }

    /// Number of agents.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// True if there are no agents.
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }
}

/// The agent files of `dir`, sorted so that errors are reproducible.
fn agent_files(dir: &Path) -> Result<Vec<PathBuf>, AgentError> {
    let read_dir_error = |source| AgentError::ReadDir {
        dir: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_dir_error)? {
        let path = entry.map_err(read_dir_error)?.path();
        let file_name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        if file_name.ends_with(".toml") && !file_name.ends_with(SCRIPT_SUFFIX) && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Loads and validates one agent file, including its provider.
pub fn load_agent_file(file: &Path) -> Result<Agent, AgentError> {
    let text = std::fs::read_to_string(file).map_err(|source| AgentError::Read {
        file: file.to_owned(),
        source,
    })?;
    let parsed: AgentFile = toml::from_str(&text).map_err(|source| AgentError::Parse {
        file: file.to_owned(),
        source: Box::new(source),
    })?;
    let definition = validate(parsed, file)?;
    let provider = build_provider(&definition)?;
    Ok(Agent {
        definition,
        provider,
    })
}

fn validate(parsed: AgentFile, file: &Path) -> Result<AgentDefinition, AgentError> {
    let invalid = |problem: String| AgentError::Invalid {
        file: file.to_owned(),
        problem,
    };
    if parsed.name.trim().is_empty() {
        return Err(invalid("name must not be empty".to_owned()));
    }
    if parsed.max_turns == 0 {
        return Err(invalid("max-turns must be at least 1".to_owned()));
    }
    if let Some(duplicate) = first_duplicate(&parsed.tools) {
        return Err(invalid(format!("tool \"{duplicate}\" is listed twice")));
    }
    let base = file.parent().unwrap_or(Path::new("."));
    Ok(AgentDefinition {
        name: parsed.name,
        description: parsed.description,
        provider: parsed.provider,
        model: parsed.model,
        script: parsed.script.map(|script| base.join(script)),
        system_prompt: parsed.system_prompt,
        tools: parsed.tools,
        max_turns: parsed.max_turns,
        sandbox: parsed.sandbox,
        source: file.to_owned(),
    })
}

fn first_duplicate(names: &[String]) -> Option<&str> {
    names
        .iter()
        .enumerate()
        .find(|(index, name)| names[..*index].contains(name))
        .map(|(_, name)| name.as_str())
}

fn build_provider(definition: &AgentDefinition) -> Result<Arc<dyn ModelProvider>, AgentError> {
    let file = &definition.source;
    match definition.provider {
        ProviderKind::Scripted => {
            let script = definition
                .script
                .as_deref()
                .ok_or_else(|| AgentError::Invalid {
                    file: file.clone(),
                    problem: "provider \"scripted\" needs `script = \"<file>\"`".to_owned(),
                })?;
            let provider =
                ScriptedProvider::from_file(script).map_err(|source| AgentError::Script {
                    file: file.clone(),
                    source,
                })?;
            Ok(Arc::new(provider))
        }
        provider @ (ProviderKind::Openai | ProviderKind::Anthropic) => {
            Err(AgentError::ProviderNotImplemented {
                file: file.clone(),
                provider,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn shipped_agents_dir_loads_the_demo_agent() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("agents");
        let catalog = AgentCatalog::load_dir(&dir).expect("shipped agents load");
        let names: Vec<&str> = catalog
            .agents()
            .map(|agent| agent.definition.name.as_str())
            .collect();
        assert_eq!(names, ["demo"]);
        let demo = catalog.get("demo").unwrap();
        assert_eq!(
            demo.definition,
            AgentDefinition {
                name: "demo".to_owned(),
                description: "Writes a note into its workspace, lists the directory, reads the \
                              note back and sums up. Runs offline on the scripted provider."
                    .to_owned(),
                provider: ProviderKind::Scripted,
                model: "scripted-demo".to_owned(),
                script: Some(dir.join("demo.script.toml")),
                system_prompt: "You are a careful assistant working in a sandboxed workspace. \
                                Use the tools to act, then report what you did."
                    .to_owned(),
                tools: vec![
                    "write_file".to_owned(),
                    "list_dir".to_owned(),
                    "read_file".to_owned()
                ],
                max_turns: 10,
                sandbox: SandboxSettings {
                    workspace_size_limit_bytes: 16 * 1024 * 1024,
                    invocation_timeout: Some(Duration::from_secs(30)),
                    memory_bytes: 64 * 1024 * 1024,
                },
                source: dir.join("demo.toml"),
            }
        );
    }

    #[test]
    fn relative_script_resolves_against_the_agent_file_and_defaults_apply() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "mini.script.toml", "[[turn]]\ntext = \"hi\"\n");
        let file = write(
            dir.path(),
            "mini.toml",
            "name = \"mini\"\nprovider = \"scripted\"\nmodel = \"m\"\nscript = \"mini.script.toml\"\n",
        );
        let agent = load_agent_file(&file).unwrap();
        assert_eq!(
            agent.definition,
            AgentDefinition {
                name: "mini".to_owned(),
                description: String::new(),
                provider: ProviderKind::Scripted,
                model: "m".to_owned(),
                script: Some(dir.path().join("mini.script.toml")),
                system_prompt: String::new(),
                tools: Vec::new(),
                max_turns: DEFAULT_MAX_TURNS,
                sandbox: SandboxSettings::default(),
                source: file,
            }
        );
    }

    #[test]
    fn unimplemented_provider_is_a_clear_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "gpt.toml",
            "name = \"gpt\"\nprovider = \"openai\"\nmodel = \"gpt-4o\"\n",
        );
        let error = AgentCatalog::load_dir(dir.path()).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "agent file {}: provider \"openai\" is not implemented yet (only \"scripted\" is)",
                file.display()
            )
        );
    }

    #[test]
    fn unknown_key_is_a_parse_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "typo.toml",
            "name = \"t\"\nprovider = \"scripted\"\nmodel = \"m\"\nmax_turns = 3\n",
        );
        let error = AgentCatalog::load_dir(dir.path()).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("invalid agent file {}", file.display())
        );
        let source = std::error::Error::source(&error).unwrap().to_string();
        assert!(source.contains("max_turns"), "{source}");
    }

    #[test]
    fn missing_script_file_names_the_agent_file_and_the_script() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "a.toml",
            "name = \"a\"\nprovider = \"scripted\"\nmodel = \"m\"\nscript = \"gone.script.toml\"\n",
        );
        let error = AgentCatalog::load_dir(dir.path()).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("agent file {}: bad script", file.display())
        );
        let source = std::error::Error::source(&error).unwrap().to_string();
        assert_eq!(
            source,
            format!(
                "cannot read script {}",
                dir.path().join("gone.script.toml").display()
            )
        );
    }

    #[test]
    fn duplicate_names_are_rejected_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "s.script.toml", "[[turn]]\ntext = \"hi\"\n");
        let body =
            "name = \"same\"\nprovider = \"scripted\"\nmodel = \"m\"\nscript = \"s.script.toml\"\n";
        let first = write(dir.path(), "a.toml", body);
        let second = write(dir.path(), "b.toml", body);
        let error = AgentCatalog::load_dir(dir.path()).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "agent \"same\" is defined twice: in {} and in {}",
                first.display(),
                second.display()
            )
        );
    }

    #[test]
    fn sandbox_settings_map_to_a_wasi_session_policy() {
        let settings = SandboxSettings {
            workspace_size_limit_bytes: 1024,
            invocation_timeout: Some(Duration::from_secs(5)),
            memory_bytes: 2048,
        };
        assert_eq!(
            settings.session_policy(),
            sandbox::SessionPolicy {
                backends: vec![sandbox::Backend::Wasi.into()],
                workspace: Some(sandbox::WorkspacePolicy {
                    size_limit_bytes: 1024,
                    ..Default::default()
                }),
                limits: Some(sandbox::ResourceLimits {
                    memory_bytes: 2048,
                    invocation_timeout: Some(prost_types::Duration {
                        seconds: 5,
                        nanos: 0
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }
        );
    }
}
