//! Agent definitions: one TOML file per agent in the agents directory.
//!
//! ```toml
//! name = "demo"
//! description = "Writes a note, lists the directory, reads the note back."
//! provider = "scripted"          # "scripted", "openai" or "anthropic"
//! model = "scripted-demo"
//! script = "demo.script.toml"    # scripted provider only; relative to this file
//! # base-url = "http://127.0.0.1:8000/v1"  # network providers: overrides the control plane's
//! # api-key-env = "VLLM_API_KEY"           # network providers: variable holding the key
//! # max-tokens-per-turn = 4096             # output-token cap of one model call
//! system-prompt = "You are a careful assistant."
//! tools = ["write_file", "list_dir", "read_file"]   # sandboxd's, or the harness's own:
//!                                # "escalate" ends the session with ESCALATED and a reason
//! max-turns = 20                 # default 20
//! # skills = ["release-notes"]   # skills of the skills directory: their names and
//!                                # descriptions are in every request, and the
//!                                # `load_skill` tool reads one (see `skill`)
//! # conversation = true          # wait for SendMessage after each final answer
//! # input-timeout = "1h"         # conversations: how long one wait lasts (default 1h)
//! # max-repeated-calls = 3       # same call, same arguments, this many times in a row
//!                                # stops the session (LOOP_DETECTED); 0: never; default 3
//! # subagents = ["researcher"]   # agents it may delegate to: the model sees one
//!                                # `delegate_to_<name>` tool each ({task, files?})
//! # max-children = 8             # delegations over a session's life (default 8)
//! # max-parallel-subagents = 4   # delegations running at once (default 4)
//! # workspace = "shared"         # as a subagent: work in the parent's sandbox session
//!                                # ("shared", default) or a fresh one ("isolated")
//! # plan = true                  # supervised plan: plan read-only, submit_plan, get it
//!                                # approved, then the harness runs the steps as
//!                                # delegations to its subagents (see `plan`)
//! # handoffs = ["billing"]       # agents it may hand the session over to: the model
//!                                # sees one `transfer_to_<name>` tool each ({reason})
//! # max-handoffs = 4             # handoffs over a session's life (default 4)
//! # output-schema = "answer.schema.json"  # JSON Schema its final answer must match
//!                                # (relative to this file); a mismatch goes back to
//!                                # the model, at most output-retries times (default 2)
//! # handoff-history = "full"     # what this agent receives when a session is handed
//!                                # to it: "full" (default), "summary" (the transferring
//!                                # model's summary) or "last-user" (the user's latest
//!                                # message only)
//!
//! [budget]                       # every limit optional; StartSession may lower them
//! max-tool-calls = 50
//! max-input-tokens = 200000
//! max-output-tokens = 20000
//! max-cost-usd = 1.50            # needs a [prices."<model>"] entry in the control-plane config
//! max-wall-clock = "30m"
//!
//! [policy]                       # see the `policy` module
//! default = "allow"
//! [[policy.rule]]
//! tool = "write_file"
//! when = { path = "secrets/*" }
//! verdict = "deny"
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

use crate::budget::ModelPrice;
use crate::context::ModelSpec;
use crate::policy::{Policy, PolicyError, PolicySettings};
use crate::provider::ModelProvider;
pub use crate::provider::ProviderKind;
use crate::provider::factory::{FactoryError, ProviderFactory};
use crate::provider::scripted::{ScriptError, ScriptedProvider};
use crate::skill::{LOAD_SKILL, SkillCatalog};

/// Turn limit of an agent that does not set `max-turns`.
pub const DEFAULT_MAX_TURNS: u32 = 20;
/// How long a conversation waits for a message unless it sets `input-timeout`.
pub const DEFAULT_INPUT_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// Identical calls in a row that stop a session unless it sets
/// `max-repeated-calls`.
pub const DEFAULT_MAX_REPEATED_CALLS: u32 = 3;
/// Delegations over a session's life unless it sets `max-children`.
pub const DEFAULT_MAX_CHILDREN: u32 = 8;
/// Delegations at once unless it sets `max-parallel-subagents`.
pub const DEFAULT_MAX_PARALLEL_SUBAGENTS: u32 = 4;
/// Prefix of the harness tool that delegates to a subagent.
pub const DELEGATE_PREFIX: &str = "delegate_to_";
/// Prefix of the harness tool that hands the session to another agent.
pub const TRANSFER_PREFIX: &str = "transfer_to_";
/// Handoffs over a session's life unless its agent sets `max-handoffs`.
pub const DEFAULT_MAX_HANDOFFS: u32 = 4;
/// Longest subagent name (the tool name `delegate_to_<name>` stays within
/// the 64 characters model APIs accept).
const MAX_SUBAGENT_NAME: usize = 52;

const SCRIPT_SUFFIX: &str = ".script.toml";

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
    /// Memory limit of one invocation in bytes (of the whole process
    /// sandbox, with `process = true`); 0 means sandboxd's default.
    #[serde(default)]
    pub memory_bytes: u64,
    /// Also give each session a namespaced Linux process sandbox, so the
    /// agent can list the `exec` tool. Default false (WASI tools only).
    #[serde(default)]
    pub process: bool,
}

impl SandboxSettings {
    /// The sandboxd policy for a session of this agent: WASI tools (and a
    /// process sandbox with `process = true`), no network, the limits above.
    pub fn session_policy(&self) -> sandbox::SessionPolicy {
        let mut backends = vec![sandbox::Backend::Wasi.into()];
        if self.process {
            backends.push(sandbox::Backend::Process.into());
        }
        sandbox::SessionPolicy {
            backends,
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
    base_url: Option<String>,
    api_key_env: Option<String>,
    max_tokens_per_turn: Option<u32>,
    #[serde(default)]
    system_prompt: String,
    #[serde(default)]
    tools: Vec<String>,
    #[serde(default)]
    skills: Vec<String>,
    #[serde(default = "default_max_turns")]
    max_turns: u32,
    #[serde(default)]
    conversation: bool,
    #[serde(default, with = "humantime_serde")]
    input_timeout: Option<Duration>,
    #[serde(default = "default_max_repeated_calls")]
    max_repeated_calls: u32,
    #[serde(default)]
    subagents: Vec<String>,
    #[serde(default = "default_max_children")]
    max_children: u32,
    #[serde(default = "default_max_parallel_subagents")]
    max_parallel_subagents: u32,
    #[serde(default)]
    workspace: Workspace,
    #[serde(default)]
    plan: bool,
    #[serde(default)]
    handoffs: Vec<String>,
    #[serde(default = "default_max_handoffs")]
    max_handoffs: u32,
    #[serde(default)]
    handoff_history: HandoffHistory,
    output_schema: Option<PathBuf>,
    #[serde(default = "default_output_retries")]
    output_retries: u32,
    #[serde(default)]
    budget: BudgetSettings,
    #[serde(default)]
    policy: PolicySettings,
    #[serde(default)]
    sandbox: SandboxSettings,
}

/// The `[budget]` table: session limits besides `max-turns`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct BudgetSettings {
    max_tool_calls: Option<u32>,
    max_input_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    max_cost_usd: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    max_wall_clock: Option<Duration>,
}

fn default_max_turns() -> u32 {
    DEFAULT_MAX_TURNS
}

fn default_max_repeated_calls() -> u32 {
    DEFAULT_MAX_REPEATED_CALLS
}

fn default_max_children() -> u32 {
    DEFAULT_MAX_CHILDREN
}

fn default_max_parallel_subagents() -> u32 {
    DEFAULT_MAX_PARALLEL_SUBAGENTS
}

fn default_max_handoffs() -> u32 {
    DEFAULT_MAX_HANDOFFS
}

fn default_output_retries() -> u32 {
    DEFAULT_OUTPUT_RETRIES
}

/// Mismatching final answers sent back to the model unless an agent sets
/// `output-retries`.
pub const DEFAULT_OUTPUT_RETRIES: u32 = 2;

/// Structured output: the JSON Schema an agent's final answers must match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StructuredOutput {
    /// The schema, as text (as the file has it); `None`: any answer.
    pub schema_json: Option<String>,
    /// Mismatching answers sent back to the model before the session fails.
    pub retries: u32,
}

impl Default for StructuredOutput {
    fn default() -> Self {
        Self {
            schema_json: None,
            retries: DEFAULT_OUTPUT_RETRIES,
        }
    }
}

/// What an agent receives of the conversation when a session is handed to it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HandoffHistory {
    /// Everything so far.
    #[default]
    Full,
    /// The summary the transferring model writes with its transfer call.
    Summary,
    /// The user's latest message only.
    LastUser,
}

impl HandoffHistory {
    /// As a session records it.
    pub fn to_proto(self) -> control::HandoffHistory {
        match self {
            Self::Full => control::HandoffHistory::Full,
            Self::Summary => control::HandoffHistory::Summary,
            Self::LastUser => control::HandoffHistory::LastUser,
        }
    }
}

/// Where an agent works when it runs as a subagent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workspace {
    /// In its parent's sandbox session: work product passes as files.
    #[default]
    Shared,
    /// In a fresh sandbox session of its own.
    Isolated,
}

impl Workspace {
    /// As a session records it.
    pub fn to_proto(self) -> control::SubagentWorkspace {
        match self {
            Self::Shared => control::SubagentWorkspace::Shared,
            Self::Isolated => control::SubagentWorkspace::Isolated,
        }
    }
}

/// The other agents an agent works with: subagents it delegates to,
/// agents it hands sessions over to, and the limits of both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelegationSettings {
    /// Agents it may delegate to, in the order their tools follow its own.
    pub subagents: Vec<String>,
    /// Most delegations over a session's life.
    pub max_children: u32,
    /// Most delegations running at once (at least 1).
    pub max_parallel_subagents: u32,
    /// Where it works when another agent delegates to it.
    pub workspace: Workspace,
    /// Agents it may hand a session over to, in the order their tools
    /// follow its own.
    pub handoffs: Vec<String>,
    /// Most handoffs over a session's life.
    pub max_handoffs: u32,
    /// What it receives when a session is handed to it.
    pub handoff_history: HandoffHistory,
    /// It runs supervised plans (see [`crate::plan`]).
    pub plan: bool,
}

impl Default for DelegationSettings {
    fn default() -> Self {
        Self {
            subagents: Vec::new(),
            max_children: DEFAULT_MAX_CHILDREN,
            max_parallel_subagents: DEFAULT_MAX_PARALLEL_SUBAGENTS,
            workspace: Workspace::Shared,
            handoffs: Vec::new(),
            max_handoffs: DEFAULT_MAX_HANDOFFS,
            handoff_history: HandoffHistory::Full,
            plan: false,
        }
    }
}

/// The harness tool that delegates to `agent`.
pub fn delegate_tool_name(agent: &str) -> String {
    format!("{DELEGATE_PREFIX}{agent}")
}

/// The harness tool that hands the session to `agent`.
pub fn transfer_tool_name(agent: &str) -> String {
    format!("{TRANSFER_PREFIX}{agent}")
}

/// How a conversation agent's sessions wait for `SendMessage`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConversationSettings {
    /// After a final answer, wait for a message instead of finishing.
    pub enabled: bool,
    /// How long one wait lasts before the session finishes.
    pub input_timeout: Option<Duration>,
}

impl ConversationSettings {
    /// A conversation whose waits last `input_timeout`.
    pub fn waiting(input_timeout: Duration) -> Self {
        Self {
            enabled: true,
            input_timeout: Some(input_timeout),
        }
    }

    /// As a session records it; `None` for an agent that is no conversation.
    pub fn to_proto(&self) -> Option<control::ConversationSettings> {
        self.enabled.then(|| control::ConversationSettings {
            enabled: true,
            input_timeout: self.input_timeout.map(harness_proto::duration_to_proto),
        })
    }
}

/// A validated agent definition.
#[derive(Debug, Clone, PartialEq)]
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
    /// Network providers: base URL overriding the control plane's.
    pub base_url: Option<String>,
    /// Network providers: the environment variable holding the API key.
    pub api_key_env: Option<String>,
    /// Output-token cap of one model call.
    pub max_tokens_per_turn: Option<u32>,
    /// The system prompt.
    pub system_prompt: String,
    /// Tools the agent may call, in the order they are shown to the model.
    pub tools: Vec<String>,
    /// Skills of the control plane's skills directory it may load.
    pub skills: Vec<String>,
    /// Its default budget (`max-turns` plus the `[budget]` table); cost in
    /// micro-dollars.
    pub budget: control::BudgetLimits,
    /// Tool-call policy.
    pub policy: PolicySettings,
    /// Sandbox policy of its sessions.
    pub sandbox: SandboxSettings,
    /// Whether its sessions wait for `SendMessage` after a final answer.
    pub conversation: ConversationSettings,
    /// Identical calls in a row that stop a session (0: never).
    pub max_repeated_calls: u32,
    /// Its subagents and delegation limits.
    pub delegation: DelegationSettings,
    /// The schema its final answers must match.
    pub output: StructuredOutput,
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
            budget: Some(self.budget),
            subagents: self.delegation.subagents.clone(),
        }
    }
}

/// A runnable agent: its definition, model provider, policy and price.
#[derive(Debug, Clone)]
pub struct Agent {
    /// The definition.
    pub definition: AgentDefinition,
    /// The provider answering its model calls.
    pub provider: Arc<dyn ModelProvider>,
    /// The compiled tool-call policy.
    pub policy: Policy,
    /// The model's price, if the control plane has one.
    pub price: Option<ModelPrice>,
    /// What the model catalog says of its model (context window, output
    /// limit), if it has an entry.
    pub model_spec: Option<ModelSpec>,
    /// Its skills as sessions record them, in the definition's order (set
    /// when the agent joins a catalog that has them).
    pub skills: Vec<control::ResolvedSkill>,
}

impl Agent {
    /// An agent from a definition and a provider (tests, embedding); the
    /// policy is compiled from the definition, and there is no price.
    pub fn new(
        definition: AgentDefinition,
        provider: Arc<dyn ModelProvider>,
    ) -> Result<Self, AgentError> {
        let policy = Policy::new(&definition.policy).map_err(|source| AgentError::Policy {
            file: definition.source.clone(),
            source,
        })?;
        Ok(Self {
            definition,
            provider,
            policy,
            price: None,
            model_spec: None,
            skills: Vec::new(),
        })
    }
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
    /// The agent's network provider could not be set up.
    #[error("agent file {file}: cannot set up provider \"{}\"", provider.as_str())]
    Provider {
        /// The agent file.
        file: PathBuf,
        /// The provider it asks for.
        provider: ProviderKind,
        /// Why.
        #[source]
        source: FactoryError,
    },
    /// The agent's policy does not compile.
    #[error("agent file {file}: bad policy")]
    Policy {
        /// The agent file.
        file: PathBuf,
        /// What is wrong.
        #[source]
        source: PolicyError,
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
    skills: Arc<SkillCatalog>,
}

impl AgentCatalog {
    /// Loads every agent file of `dir` (see the module docs for the format),
    /// with network providers and prices from `providers`, for a control
    /// plane without skills.
    pub fn load_dir(dir: &Path, providers: &mut ProviderFactory) -> Result<Self, AgentError> {
        Self::load_dir_with_skills(dir, Arc::new(SkillCatalog::default()), providers)
    }

    /// Loads every agent file of `dir`; the skills the agents list must be
    /// in `skills`.
    pub fn load_dir_with_skills(
        dir: &Path,
        skills: Arc<SkillCatalog>,
        providers: &mut ProviderFactory,
    ) -> Result<Self, AgentError> {
        let mut catalog = Self {
            agents: BTreeMap::new(),
            skills,
        };
        for file in agent_files(dir)? {
            catalog.insert(load_agent_file(&file, providers)?)?;
        }
        catalog.check_subagents()?;
        Ok(catalog)
    }

    /// Builds a catalog from agents made in code (tests, embedding).
    pub fn from_agents(agents: impl IntoIterator<Item = Agent>) -> Result<Self, AgentError> {
        Self::from_agents_with_skills(agents, Arc::new(SkillCatalog::default()))
    }

    /// Builds a catalog from agents and skills made in code.
    pub fn from_agents_with_skills(
        agents: impl IntoIterator<Item = Agent>,
        skills: Arc<SkillCatalog>,
    ) -> Result<Self, AgentError> {
        let mut catalog = Self {
            agents: BTreeMap::new(),
            skills,
        };
        for agent in agents {
            catalog.insert(agent)?;
        }
        catalog.check_subagents()?;
        Ok(catalog)
    }

    /// The skills its agents may load.
    pub fn skills(&self) -> &Arc<SkillCatalog> {
        &self.skills
    }

    /// Whether some agent lists a skill.
    pub fn uses_skills(&self) -> bool {
        self.agents
            .values()
            .any(|agent| !agent.definition.skills.is_empty())
    }

    /// `agent`'s skills, looked up in the catalog's skills.
    fn resolve_skills(&self, agent: &Agent) -> Result<Vec<control::ResolvedSkill>, AgentError> {
        agent
            .definition
            .skills
            .iter()
            .map(|name| {
                self.skills
                    .get(name)
                    .map(|skill| skill.resolved())
                    .ok_or_else(|| AgentError::Invalid {
                        file: agent.definition.source.clone(),
                        problem: format!(
                            "skill \"{name}\" is not in the {} (skills: {})",
                            self.skills.describe_source(),
                            if self.skills.is_empty() {
                                "none".to_owned()
                            } else {
                                self.skills.names().collect::<Vec<_>>().join(", ")
                            }
                        ),
                    })
            })
            .collect()
    }

    /// Every subagent an agent lists is an agent of the catalog.
    fn check_subagents(&self) -> Result<(), AgentError> {
        for agent in self.agents.values() {
            let definition = &agent.definition;
            let delegation = &definition.delegation;
            let named = delegation
                .subagents
                .iter()
                .map(|name| ("subagent", name))
                .chain(delegation.handoffs.iter().map(|name| ("handoff", name)));
            for (what, name) in named {
                if !self.agents.contains_key(name) {
                    return Err(AgentError::Invalid {
                        file: definition.source.clone(),
                        problem: format!(
                            "{what} \"{name}\" is not an agent of this control plane (agents: {})",
                            self.agents.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Names of the agents some agent hands sessions over to, sorted.
    pub fn handoff_names(&self) -> std::collections::BTreeSet<&str> {
        self.agents
            .values()
            .flat_map(|agent| &agent.definition.delegation.handoffs)
            .map(String::as_str)
            .collect()
    }

    /// Names of the agents some agent delegates to, sorted.
    pub fn subagent_names(&self) -> std::collections::BTreeSet<&str> {
        self.agents
            .values()
            .flat_map(|agent| &agent.definition.delegation.subagents)
            .map(String::as_str)
            .collect()
    }

    fn insert(&mut self, mut agent: Agent) -> Result<(), AgentError> {
        agent.skills = self.resolve_skills(&agent)?;
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
pub fn load_agent_file(file: &Path, providers: &mut ProviderFactory) -> Result<Agent, AgentError> {
    let text = std::fs::read_to_string(file).map_err(|source| AgentError::Read {
        file: file.to_owned(),
        source,
    })?;
    let parsed: AgentFile = toml::from_str(&text).map_err(|source| AgentError::Parse {
        file: file.to_owned(),
        source: Box::new(source),
    })?;
    let definition = validate(parsed, file)?;
    let provider = build_provider(&definition, providers)?;
    let price = providers.price(&definition.model);
    if definition.budget.max_cost_micros.is_some() && price.is_none() {
        return Err(AgentError::Invalid {
            file: file.to_owned(),
            problem: format!(
                "budget.max-cost-usd needs a price for model \"{}\" in the control plane's [prices] table",
                definition.model
            ),
        });
    }
    let model_spec = providers.model_spec(&definition.model);
    let mut agent = Agent::new(definition, provider)?;
    agent.price = price;
    agent.model_spec = model_spec;
    Ok(agent)
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
    let max_cost_micros = match parsed.budget.max_cost_usd {
        Some(usd) if !usd.is_finite() || usd < 0.0 => {
            return Err(invalid(
                "budget.max-cost-usd must be zero or more".to_owned(),
            ));
        }
        // Whole micro-dollars; far below any real price granularity.
        Some(usd) => Some((usd * 1e6).round() as u64),
        None => None,
    };
    if parsed.input_timeout.is_some() && !parsed.conversation {
        return Err(invalid(
            "input-timeout applies only to conversations; set conversation = true or remove it"
                .to_owned(),
        ));
    }
    if parsed
        .input_timeout
        .is_some_and(|timeout| timeout.is_zero())
    {
        return Err(invalid("input-timeout must be longer than 0s".to_owned()));
    }
    validate_delegation(&parsed).map_err(invalid)?;
    validate_skills(&parsed).map_err(invalid)?;
    let base = file.parent().unwrap_or(Path::new("."));
    let output_schema = parsed
        .output_schema
        .as_ref()
        .map(|schema| read_output_schema(&base.join(schema)))
        .transpose()
        .map_err(invalid)?;
    let conversation = ConversationSettings {
        enabled: parsed.conversation,
        input_timeout: parsed
            .conversation
            .then(|| parsed.input_timeout.unwrap_or(DEFAULT_INPUT_TIMEOUT)),
    };
    Ok(AgentDefinition {
        name: parsed.name,
        description: parsed.description,
        provider: parsed.provider,
        model: parsed.model,
        script: parsed.script.map(|script| base.join(script)),
        base_url: parsed.base_url,
        api_key_env: parsed.api_key_env,
        max_tokens_per_turn: parsed.max_tokens_per_turn,
        system_prompt: parsed.system_prompt,
        tools: parsed.tools,
        skills: parsed.skills,
        budget: control::BudgetLimits {
            max_turns: Some(parsed.max_turns),
            max_tool_calls: parsed.budget.max_tool_calls,
            max_input_tokens: parsed.budget.max_input_tokens,
            max_output_tokens: parsed.budget.max_output_tokens,
            max_cost_micros,
            max_wall_clock: parsed
                .budget
                .max_wall_clock
                .map(harness_proto::duration_to_proto),
        },
        policy: parsed.policy,
        sandbox: parsed.sandbox,
        conversation,
        max_repeated_calls: parsed.max_repeated_calls,
        delegation: DelegationSettings {
            subagents: parsed.subagents,
            max_children: parsed.max_children,
            max_parallel_subagents: parsed.max_parallel_subagents,
            workspace: parsed.workspace,
            handoffs: parsed.handoffs,
            max_handoffs: parsed.max_handoffs,
            handoff_history: parsed.handoff_history,
            plan: parsed.plan,
        },
        output: StructuredOutput {
            schema_json: output_schema,
            retries: parsed.output_retries,
        },
        source: file.to_owned(),
    })
}

/// The output schema at `file`: JSON, and a schema a validator accepts.
fn read_output_schema(file: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|error| format!("cannot read output-schema {}: {error}", file.display()))?;
    let schema: serde_json::Value = serde_json::from_str(&text)
        .map_err(|error| format!("output-schema {} is not JSON: {error}", file.display()))?;
    jsonschema::validator_for(&schema).map_err(|error| {
        format!(
            "output-schema {} is not a usable JSON Schema: {error}",
            file.display()
        )
    })?;
    Ok(text)
}

/// Subagent names fit in a tool name, are listed once, and their tools are
/// not listed by hand; the limits leave room for a delegation.
fn validate_skills(parsed: &AgentFile) -> Result<(), String> {
    if parsed.tools.iter().any(|tool| tool == LOAD_SKILL) {
        return Err(format!(
            "tool \"{LOAD_SKILL}\" is the harness's: list skills in `skills` instead"
        ));
    }
    if let Some(duplicate) = first_duplicate(&parsed.skills) {
        return Err(format!("skill \"{duplicate}\" is listed twice"));
    }
    Ok(())
}

fn validate_delegation(parsed: &AgentFile) -> Result<(), String> {
    for (prefix, list) in [
        (DELEGATE_PREFIX, "subagents"),
        (TRANSFER_PREFIX, "handoffs"),
    ] {
        if let Some(tool) = parsed.tools.iter().find(|tool| tool.starts_with(prefix)) {
            return Err(format!(
                "tool \"{tool}\" is the harness's: list the agent in `{list}` instead"
            ));
        }
    }
    if let Some(duplicate) = first_duplicate(&parsed.subagents) {
        return Err(format!("subagent \"{duplicate}\" is listed twice"));
    }
    if let Some(duplicate) = first_duplicate(&parsed.handoffs) {
        return Err(format!("handoff \"{duplicate}\" is listed twice"));
    }
    if parsed.handoffs.contains(&parsed.name) {
        return Err("an agent cannot hand a session over to itself".to_owned());
    }
    let bad_name = |name: &&String| {
        name.is_empty()
            || name.len() > MAX_SUBAGENT_NAME
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if let Some(name) = parsed
        .subagents
        .iter()
        .chain(&parsed.handoffs)
        .find(bad_name)
    {
        return Err(format!(
            "agent name \"{name}\" cannot name a tool: use 1 to {MAX_SUBAGENT_NAME} letters, \
             digits, '_' or '-'"
        ));
    }
    if parsed.plan && parsed.subagents.is_empty() {
        return Err("plan = true needs subagents to run the plan's steps".to_owned());
    }
    if parsed
        .tools
        .iter()
        .any(|tool| tool == crate::plan::SUBMIT_PLAN)
    {
        return Err(format!(
            "tool \"{}\" is the harness's: set plan = true instead",
            crate::plan::SUBMIT_PLAN
        ));
    }
    if !parsed.subagents.is_empty() && parsed.max_parallel_subagents == 0 {
        return Err("max-parallel-subagents must be at least 1".to_owned());
    }
    Ok(())
}

fn first_duplicate(names: &[String]) -> Option<&str> {
    names
        .iter()
        .enumerate()
        .find(|(index, name)| names[..*index].contains(name))
        .map(|(_, name)| name.as_str())
}

fn build_provider(
    definition: &AgentDefinition,
    providers: &mut ProviderFactory,
) -> Result<Arc<dyn ModelProvider>, AgentError> {
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
        provider @ (ProviderKind::Openai | ProviderKind::Anthropic) => providers
            .network(
                provider,
                definition.base_url.as_deref(),
                definition.api_key_env.as_deref(),
            )
            .map_err(|source| AgentError::Provider {
                file: file.clone(),
                provider,
                source,
            }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeMap;

    use super::*;
    use crate::provider::config::ProvidersConfig;

    fn providers() -> ProviderFactory {
        let prices = BTreeMap::from([(
            "priced".to_owned(),
            ModelPrice {
                input_usd_per_mtok: 1.0,
                cached_input_usd_per_mtok: None,
                output_usd_per_mtok: 2.0,
            },
        )]);
        ProviderFactory::with_env(ProvidersConfig::default(), prices, Box::new(|_: &str| None))
    }

    fn limits(max_turns: u32) -> control::BudgetLimits {
        control::BudgetLimits {
            max_turns: Some(max_turns),
            ..Default::default()
        }
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn the_orchestra_demo_agents_load_with_their_subagents_handoffs_and_plan() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("agents/orchestra");
        let catalog = AgentCatalog::load_dir(&dir, &mut providers()).expect("orchestra loads");
        let names: Vec<&str> = catalog
            .agents()
            .map(|agent| agent.definition.name.as_str())
            .collect();
        assert_eq!(
            names,
            [
                "billing",
                "config-investigator",
                "log-investigator",
                "supervisor",
                "triage"
            ]
        );
        let supervisor = &catalog.get("supervisor").unwrap().definition.delegation;
        assert!(supervisor.plan);
        assert_eq!(
            supervisor.subagents,
            ["log-investigator", "config-investigator"]
        );
        assert_eq!(
            catalog.handoff_names().into_iter().collect::<Vec<_>>(),
            ["billing"]
        );
        assert_eq!(
            catalog
                .get("billing")
                .unwrap()
                .definition
                .delegation
                .handoff_history,
            HandoffHistory::LastUser
        );
    }

    #[test]
    fn an_unknown_subagent_or_handoff_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.script.toml", "[[turn]]\ntext = \"hi\"\n");
        write(
            dir.path(),
            "a.toml",
            "name = \"a\"\nprovider = \"scripted\"\nmodel = \"m\"\nscript = \"a.script.toml\"\nhandoffs = [\"ghost\"]\n",
        );
        let error = AgentCatalog::load_dir(dir.path(), &mut providers()).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "invalid agent file {}: handoff \"ghost\" is not an agent of this control plane (agents: a)",
                dir.path().join("a.toml").display()
            )
        );
        write(
            dir.path(),
            "a.toml",
            "name = \"a\"\nprovider = \"scripted\"\nmodel = \"m\"\nscript = \"a.script.toml\"\ntools = [\"delegate_to_a\"]\n",
        );
        let error = load_agent_file(&dir.path().join("a.toml"), &mut providers()).unwrap_err();
        assert!(
            error.to_string().ends_with(
                "tool \"delegate_to_a\" is the harness's: list the agent in `subagents` instead"
            ),
            "{error}"
        );
    }

    #[test]
    fn skills_are_resolved_from_the_skills_catalog_and_an_unknown_one_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.script.toml", "[[turn]]\ntext = \"hi\"\n");
        let agent = |skills: &str| {
            format!(
                "name = \"a\"\nprovider = \"scripted\"\nmodel = \"m\"\nscript = \"a.script.toml\"\nskills = {skills}\n"
            )
        };
        write(dir.path(), "a.toml", &agent("[\"notes\"]"));
        let skills_dir = dir.path().join("skills");
        std::fs::create_dir_all(skills_dir.join("notes")).unwrap();
        std::fs::write(
            skills_dir.join("notes/SKILL.md"),
            "---\nname: notes\ndescription: Take notes.\n---\nBody.\n",
        )
        .unwrap();
        let skills = Arc::new(SkillCatalog::load_dir(&skills_dir).unwrap());
        let catalog =
            AgentCatalog::load_dir_with_skills(dir.path(), Arc::clone(&skills), &mut providers())
                .unwrap();
        assert_eq!(
            catalog.get("a").unwrap().skills,
            [control::ResolvedSkill {
                name: "notes".to_owned(),
                description: "Take notes.".to_owned(),
            }]
        );
        assert!(catalog.uses_skills());

        write(dir.path(), "a.toml", &agent("[\"ghost\"]"));
        let error =
            AgentCatalog::load_dir_with_skills(dir.path(), skills, &mut providers()).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "invalid agent file {}: skill \"ghost\" is not in the skills directory {} (skills: notes)",
                dir.path().join("a.toml").display(),
                skills_dir.display()
            )
        );
        write(dir.path(), "a.toml", &agent("[\"notes\", \"notes\"]"));
        let error = load_agent_file(&dir.path().join("a.toml"), &mut providers()).unwrap_err();
        assert!(
            error
                .to_string()
                .ends_with("skill \"notes\" is listed twice"),
            "{error}"
        );
    }

    #[test]
    fn shipped_agents_dir_loads_the_demo_agent() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("agents");
        let catalog = AgentCatalog::load_dir(&dir, &mut providers()).expect("shipped agents load");
        let names: Vec<&str> = catalog
            .agents()
            .map(|agent| agent.definition.name.as_str())
            .collect();
        assert_eq!(names, ["chat", "demo"]);
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
                base_url: None,
                api_key_env: None,
                max_tokens_per_turn: None,
                system_prompt: "You are a careful assistant working in a sandboxed workspace. \
                                Use the tools to act, then report what you did."
                    .to_owned(),
                skills: Vec::new(),
                tools: vec![
                    "write_file".to_owned(),
                    "list_dir".to_owned(),
                    "read_file".to_owned()
                ],
                budget: limits(10),
                policy: PolicySettings::default(),
                sandbox: SandboxSettings {
                    workspace_size_limit_bytes: 16 * 1024 * 1024,
                    invocation_timeout: Some(Duration::from_secs(30)),
                    memory_bytes: 64 * 1024 * 1024,
                    process: false,
                },
                conversation: ConversationSettings::default(),
                max_repeated_calls: DEFAULT_MAX_REPEATED_CALLS,
                delegation: DelegationSettings::default(),
                output: StructuredOutput::default(),
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
        let agent = load_agent_file(&file, &mut providers()).unwrap();
        assert_eq!(
            agent.definition,
            AgentDefinition {
                name: "mini".to_owned(),
                description: String::new(),
                provider: ProviderKind::Scripted,
                model: "m".to_owned(),
                script: Some(dir.path().join("mini.script.toml")),
                base_url: None,
                api_key_env: None,
                max_tokens_per_turn: None,
                system_prompt: String::new(),
                skills: Vec::new(),
                tools: Vec::new(),
                budget: limits(DEFAULT_MAX_TURNS),
                policy: PolicySettings::default(),
                sandbox: SandboxSettings::default(),
                conversation: ConversationSettings::default(),
                max_repeated_calls: DEFAULT_MAX_REPEATED_CALLS,
                delegation: DelegationSettings::default(),
                output: StructuredOutput::default(),
                source: file,
            }
        );
    }

    #[test]
    fn a_network_agent_loads_with_budget_policy_and_price() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "gpt.toml",
            r#"
            name = "gpt"
            provider = "openai"
            model = "priced"
            base-url = "http://127.0.0.1:9/v1"
            max-tokens-per-turn = 512
            tools = ["exec"]
            max-turns = 7

            [budget]
            max-tool-calls = 12
            max-input-tokens = 1000
            max-output-tokens = 200
            max-cost-usd = 0.25
            max-wall-clock = "90s"

            [policy]
            default = "ask"
            approval-timeout = "5m"
            [[policy.rule]]
            tool = "exec"
            when = { command = "cargo test*" }
            verdict = "allow"
            "#,
        );
        let agent = load_agent_file(&file, &mut providers()).unwrap();
        assert_eq!(
            agent.definition.budget,
            control::BudgetLimits {
                max_turns: Some(7),
                max_tool_calls: Some(12),
                max_input_tokens: Some(1000),
                max_output_tokens: Some(200),
                max_cost_micros: Some(250_000),
                max_wall_clock: Some(harness_proto::duration_to_proto(Duration::from_secs(90))),
            }
        );
        assert_eq!(
            (
                agent.definition.base_url.as_deref(),
                agent.definition.max_tokens_per_turn
            ),
            (Some("http://127.0.0.1:9/v1"), Some(512))
        );
        assert_eq!(
            agent.price.map(|price| price.output_usd_per_mtok),
            Some(2.0)
        );
        let decision = agent.policy.decide(
            "gpt",
            &agent.definition.tools,
            "exec",
            &serde_json::json!({"command": "rm x"}),
        );
        assert_eq!(decision.verdict, crate::policy::Verdict::Ask);
        assert_eq!(
            agent.policy.approval_timeout,
            Some(Duration::from_secs(300))
        );
    }

    #[test]
    fn a_cost_budget_without_a_price_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "gpt.toml",
            "name = \"gpt\"\nprovider = \"anthropic\"\nmodel = \"unpriced\"\n[budget]\nmax-cost-usd = 1.0\n",
        );
        let error = AgentCatalog::load_dir(dir.path(), &mut providers()).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "invalid agent file {}: budget.max-cost-usd needs a price for model \"unpriced\" in the control plane's [prices] table",
                file.display()
            )
        );
    }

    #[test]
    fn a_bad_policy_pattern_names_the_file_and_the_rule() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "s.script.toml", "[[turn]]\ntext = \"hi\"\n");
        let file = write(
            dir.path(),
            "a.toml",
            "name = \"a\"\nprovider = \"scripted\"\nmodel = \"m\"\nscript = \"s.script.toml\"\n\
             [[policy.rule]]\ntool = \"[x\"\nverdict = \"deny\"\n",
        );
        let error = AgentCatalog::load_dir(dir.path(), &mut providers()).unwrap_err();
        assert_eq!(
            crate::error_report::error_chain(&error),
            format!(
                "agent file {}: bad policy: policy.rule[0]: bad pattern \"[x\": error parsing glob '[x': unclosed character class; missing ']'",
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
        let error = AgentCatalog::load_dir(dir.path(), &mut providers()).unwrap_err();
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
        let error = AgentCatalog::load_dir(dir.path(), &mut providers()).unwrap_err();
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
        let error = AgentCatalog::load_dir(dir.path(), &mut providers()).unwrap_err();
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
        let mut settings = SandboxSettings {
            workspace_size_limit_bytes: 1024,
            invocation_timeout: Some(Duration::from_secs(5)),
            memory_bytes: 2048,
            process: false,
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
        settings.process = true;
        assert_eq!(
            settings.session_policy().backends,
            vec![
                i32::from(sandbox::Backend::Wasi),
                i32::from(sandbox::Backend::Process)
            ]
        );
    }
}
