//! The agent a session runs as: resolved once, when the session starts, from
//! the agent file and sandboxd's tool descriptions, and recorded in its
//! `started` event ([`control::ResolvedAgent`]). Every run of the session —
//! the first, and each resume after a restart — rebuilds what its model
//! requests and decisions depend on from that record, never from the agent
//! file as it is by then: editing an agent's prompt, model, limits, policy
//! or sandbox settings changes new sessions, not running ones.
//!
//! What the record cannot fix is checked instead: sandboxd must still offer
//! every recorded tool with the recorded input schema, and the agent must
//! still use a provider of the recorded kind (its wire format shapes the
//! requests). Either change fails the session with a typed error rather than
//! resuming with requests it never sent before.

use std::collections::HashMap;
use std::sync::Arc;

use harness_proto::control::v1 as control;
use harness_proto::sandbox::v1 as sandbox;

use super::executor::HarnessRegistry;
use super::tools::ToolSchema;
use crate::agent::{Agent, ConversationSettings, delegate_tool_name, transfer_tool_name};
use crate::budget::ModelPrice;
use crate::policy::{Policy, PolicyError, PolicySettings};
use crate::prompt::StaticPrefix;
use crate::provider::{ModelProvider, ToolDefinition};
use crate::skill::{self, LOAD_SKILL};

/// Why a session's agent cannot be resolved or rebuilt from its record.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The agent names a tool neither the harness nor sandboxd has.
    #[error("agent tool \"{tool}\" is not offered by sandboxd (it has: {available})")]
    ToolUnavailable {
        /// The missing tool.
        tool: String,
        /// What sandboxd offers, comma-separated.
        available: String,
    },
    /// A harness tool the session started with is no longer registered.
    #[error("harness tool \"{tool}\" is no longer registered (the harness has: {available})")]
    HarnessToolGone {
        /// The tool.
        tool: String,
        /// The registered harness tools, comma-separated.
        available: String,
    },
    /// A tool's input schema is not JSON.
    #[error("sandboxd's input schema of tool \"{tool}\" is not valid JSON")]
    BadToolSchema {
        /// The tool.
        tool: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A tool's input schema is not a JSON Schema.
    #[error("sandboxd's input schema of tool \"{tool}\" is not a usable JSON Schema: {problem}")]
    UnusableToolSchema {
        /// The tool.
        tool: String,
        /// What the validator said.
        problem: String,
    },
    /// sandboxd describes a tool differently from when the session started.
    #[error(
        "tool \"{tool}\" changed its input schema since the session started, so the session \
         cannot resume with the requests it made before (recorded: {recorded}; sandboxd now: \
         {current})"
    )]
    ToolSchemaChanged {
        /// The tool.
        tool: String,
        /// The schema the session started with.
        recorded: String,
        /// The schema sandboxd has now.
        current: String,
    },
    /// The agent now uses another kind of provider.
    #[error(
        "the session started on provider \"{recorded}\" but its agent now uses \"{current}\"; \
         another wire format cannot continue the session's requests"
    )]
    ProviderChanged {
        /// The recorded provider kind.
        recorded: String,
        /// The agent file's provider kind now.
        current: String,
    },
    /// The recorded policy does not compile.
    #[error("the session's recorded policy is unusable")]
    Policy(#[source] PolicyError),
}

/// What a session runs as, rebuilt from its record.
#[derive(Debug)]
pub struct SessionAgent {
    /// The agent's name (policy decisions name it).
    pub name: String,
    /// Model name sent to the provider.
    pub model: String,
    /// Output-token cap of one model call.
    pub max_output_tokens: Option<u32>,
    /// The tools' names, in the model's order.
    pub tool_names: Vec<String>,
    /// The executor of each tool.
    pub executors: HashMap<String, control::ToolExecutor>,
    /// The tools as the model sees them (shared by every request).
    pub tools: Arc<Vec<ToolDefinition>>,
    /// Compiled input schemas, by tool name.
    pub schemas: HashMap<String, ToolSchema>,
    /// The compiled tool-call policy.
    pub policy: Policy,
    /// The model's price.
    pub price: Option<ModelPrice>,
    /// The policy of the session's sandbox sessions.
    pub sandbox_policy: sandbox::SessionPolicy,
    /// The provider answering model calls (the agent's, as loaded now).
    pub provider: Arc<dyn ModelProvider>,
    /// Whether the session waits for `SendMessage` after a final answer.
    pub conversation: ConversationSettings,
    /// Identical calls in a row that stop the session (0: never).
    pub max_repeated_calls: u32,
    /// The subagents it may delegate to, by their `delegate_to_*` tool.
    pub subagents: HashMap<String, control::ResolvedSubagent>,
    /// Most delegations over the session's life.
    pub max_children: u32,
    /// Most delegations running at once.
    pub max_parallel_subagents: u32,
    /// Most handoffs over the session's life.
    pub max_handoffs: u32,
    /// The schema final answers must match (structured output).
    pub output_schema: Option<OutputSchema>,
    /// Mismatching answers sent back to the model before the session fails.
    pub output_retries: u32,
    /// It runs a supervised plan.
    pub plan: bool,
    /// The skills it may load, by name.
    pub skills: Vec<String>,
    /// The model's context window (from the catalog, when the agent still
    /// uses the recorded model); `None`: never compacted.
    pub context_window: Option<u64>,
    /// The digested static part of its requests (tools, system prompt,
    /// skills index, memory).
    pub prompt_prefix: StaticPrefix,
}

/// A session's output schema, compiled.
#[derive(Debug)]
pub struct OutputSchema {
    /// As sent to the provider.
    pub schema: Arc<serde_json::Value>,
    /// Its validator.
    pub validator: jsonschema::Validator,
}

/// The record of `agent` for a new session: its tools in the agent's order,
/// each bound to the harness if `harness` has it, else to sandboxd (as
/// `offered` describes it).
pub fn record(
    agent: &Agent,
    offered: &[sandbox::Tool],
    harness: &HarnessRegistry,
) -> Result<control::ResolvedAgent, ResolveError> {
    let definition = &agent.definition;
    let mut tools: Vec<control::ResolvedTool> = definition
        .tools
        .iter()
        .map(|name| match harness.describe(name) {
            Some(tool) => Ok(tool),
            None => find_tool(offered, name).map(sandbox_tool),
        })
        .collect::<Result<_, ResolveError>>()?;
    let mut subagents = Vec::with_capacity(definition.delegation.subagents.len());
    for name in &definition.delegation.subagents {
        let tool_name = delegate_tool_name(name);
        let missing = || ResolveError::HarnessToolGone {
            tool: tool_name.clone(),
            available: harness.names().collect::<Vec<_>>().join(", "),
        };
        tools.push(harness.describe(&tool_name).ok_or_else(missing)?);
        subagents.push(harness.subagent(&tool_name).ok_or_else(missing)?);
    }
    if definition.delegation.plan {
        let tool_name = crate::plan::SUBMIT_PLAN;
        tools.push(described(harness, tool_name)?);
    }
    for name in &definition.delegation.handoffs {
        let tool_name = transfer_tool_name(name);
        tools.push(described(harness, &tool_name)?);
    }
    if !agent.skills.is_empty() {
        tools.push(described(harness, LOAD_SKILL)?);
    }
    Ok(control::ResolvedAgent {
        system_prompt: definition.system_prompt.clone(),
        provider: definition.provider.as_str().to_owned(),
        endpoint: agent.provider.endpoint(),
        model: definition.model.clone(),
        max_tokens_per_turn: definition
            .max_tokens_per_turn
            .or(agent.model_spec.and_then(|spec| spec.max_output_tokens)),
        tools,
        policy: Some(definition.policy.to_proto()),
        sandbox_policy: Some(definition.sandbox.session_policy()),
        price: agent.price.as_ref().map(ModelPrice::to_proto),
        conversation: definition.conversation.to_proto(),
        max_repeated_calls: definition.max_repeated_calls,
        subagents,
        max_children: definition.delegation.max_children,
        max_parallel_subagents: definition.delegation.max_parallel_subagents,
        handoffs: definition.delegation.handoffs.clone(),
        max_handoffs: definition.delegation.max_handoffs,
        output_schema_json: definition.output.schema_json.clone().unwrap_or_default(),
        output_retries: definition.output.retries,
        plan: definition.delegation.plan,
        skills: agent.skills.clone(),
    })
}

/// A sandboxd tool as a session records it.
fn sandbox_tool(tool: &sandbox::Tool) -> control::ResolvedTool {
    control::ResolvedTool {
        name: tool.name.clone(),
        description: tool.description.clone(),
        input_schema_json: tool.input_schema_json.clone(),
        digest: tool.digest.clone(),
        executor: control::ToolExecutor::Sandbox.into(),
    }
}

/// Checks that each recorded tool's executor (sandboxd, as `offered`
/// describes its tools, or `harness`) still has it with the recorded input
/// schema: the requests the session sent depend on it, and calls are
/// validated against it.
pub fn check_tools(
    record: &control::ResolvedAgent,
    offered: &[sandbox::Tool],
    harness: &HarnessRegistry,
) -> Result<(), ResolveError> {
    for recorded in &record.tools {
        let current = match recorded.executor() {
            control::ToolExecutor::Sandbox => {
                find_tool(offered, &recorded.name).map(sandbox_tool)?
            }
            control::ToolExecutor::Harness => described(harness, &recorded.name)?,
        };
        if current.input_schema_json != recorded.input_schema_json {
            return Err(ResolveError::ToolSchemaChanged {
                tool: recorded.name.clone(),
                recorded: recorded.input_schema_json.clone(),
                current: current.input_schema_json.clone(),
            });
        }
        if current.digest != recorded.digest {
            tracing::warn!(
                tool = recorded.name,
                recorded = recorded.digest,
                current = current.digest,
                "a session's tool was replaced by one with the same input schema; resuming"
            );
        }
    }
    Ok(())
}

/// The harness tool `name` as a session records it.
fn described(harness: &HarnessRegistry, name: &str) -> Result<control::ResolvedTool, ResolveError> {
    harness
        .describe(name)
        .ok_or_else(|| ResolveError::HarnessToolGone {
            tool: name.to_owned(),
            available: harness.names().collect::<Vec<_>>().join(", "),
        })
}

fn find_tool<'a>(
    offered: &'a [sandbox::Tool],
    name: &str,
) -> Result<&'a sandbox::Tool, ResolveError> {
    offered
        .iter()
        .find(|tool| tool.name == name)
        .ok_or_else(|| ResolveError::ToolUnavailable {
            tool: name.to_owned(),
            available: offered
                .iter()
                .map(|tool| tool.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

impl SessionAgent {
    /// The executor of tool `name`. Only the session's own tools are ever
    /// started (policy denies the rest); anything else is sandboxd's, as
    /// every tool was before there were executors.
    pub fn executor_of(&self, name: &str) -> control::ToolExecutor {
        self.executors.get(name).copied().unwrap_or_default()
    }

    /// What session `name` runs as, from its record; model calls go to
    /// `current`'s provider, which must be of the recorded kind.
    pub fn from_record(
        name: &str,
        record: &control::ResolvedAgent,
        current: &Agent,
    ) -> Result<Self, ResolveError> {
        let kind = current.definition.provider.as_str();
        if record.provider != kind {
            return Err(ResolveError::ProviderChanged {
                recorded: record.provider.clone(),
                current: kind.to_owned(),
            });
        }
        let endpoint = current.provider.endpoint();
        if record.endpoint != endpoint {
            tracing::info!(
                agent = name,
                recorded = record.endpoint,
                current = endpoint,
                "the session's provider moved; its requests go to the new endpoint"
            );
        }
        let mut tools = Vec::with_capacity(record.tools.len());
        let mut schemas = HashMap::with_capacity(record.tools.len());
        for tool in &record.tools {
            let input_schema: serde_json::Value = serde_json::from_str(&tool.input_schema_json)
                .map_err(|source| ResolveError::BadToolSchema {
                    tool: tool.name.clone(),
                    source,
                })?;
            let validator = jsonschema::validator_for(&input_schema).map_err(|error| {
                ResolveError::UnusableToolSchema {
                    tool: tool.name.clone(),
                    problem: error.to_string(),
                }
            })?;
            schemas.insert(
                tool.name.clone(),
                ToolSchema {
                    name: tool.name.clone(),
                    validator,
                },
            );
            tools.push(ToolDefinition {
                name: tool.name.clone(),
                description: tool.description.clone(),
                input_schema,
            });
        }
        let settings = PolicySettings::from_proto(&record.policy.clone().unwrap_or_default())
            .map_err(ResolveError::Policy)?;
        let policy = Policy::new(&settings).map_err(ResolveError::Policy)?;
        let prompt_prefix = StaticPrefix::new(
            name,
            &record.model,
            &tools,
            &record.system_prompt,
            &skill::index(&record.skills),
            "",
        );
        Ok(Self {
            context_window: current
                .model_spec
                .filter(|_| current.definition.model == record.model)
                .map(|spec| spec.context_window),
            prompt_prefix,
            name: name.to_owned(),
            model: record.model.clone(),
            max_output_tokens: record.max_tokens_per_turn,
            tool_names: record.tools.iter().map(|tool| tool.name.clone()).collect(),
            executors: record
                .tools
                .iter()
                .map(|tool| (tool.name.clone(), tool.executor()))
                .collect(),
            tools: Arc::new(tools),
            schemas,
            policy,
            price: record.price.as_ref().map(ModelPrice::from_proto),
            sandbox_policy: record.sandbox_policy.clone().unwrap_or_default(),
            provider: Arc::clone(&current.provider),
            conversation: conversation_of(record),
            max_repeated_calls: record.max_repeated_calls,
            subagents: record
                .subagents
                .iter()
                .map(|subagent| (delegate_tool_name(&subagent.name), subagent.clone()))
                .collect(),
            max_children: record.max_children,
            max_parallel_subagents: record.max_parallel_subagents,
            max_handoffs: record.max_handoffs,
            output_schema: output_schema_of(record)?,
            output_retries: record.output_retries,
            plan: record.plan,
            skills: record
                .skills
                .iter()
                .map(|skill| skill.name.clone())
                .collect(),
        })
    }
}

/// The output schema a session recorded, compiled (none: any answer).
fn output_schema_of(record: &control::ResolvedAgent) -> Result<Option<OutputSchema>, ResolveError> {
    if record.output_schema_json.is_empty() {
        return Ok(None);
    }
    let tool = "(output schema)".to_owned();
    let schema: serde_json::Value =
        serde_json::from_str(&record.output_schema_json).map_err(|source| {
            ResolveError::BadToolSchema {
                tool: tool.clone(),
                source,
            }
        })?;
    let validator =
        jsonschema::validator_for(&schema).map_err(|error| ResolveError::UnusableToolSchema {
            tool,
            problem: error.to_string(),
        })?;
    Ok(Some(OutputSchema {
        schema: Arc::new(schema),
        validator,
    }))
}

/// The conversation settings a session recorded (none: it is no conversation).
fn conversation_of(record: &control::ResolvedAgent) -> ConversationSettings {
    match &record.conversation {
        Some(settings) if settings.enabled => ConversationSettings {
            enabled: true,
            input_timeout: settings
                .input_timeout
                .as_ref()
                .map(harness_proto::duration_from_proto),
        },
        _ => ConversationSettings::default(),
    }
}
