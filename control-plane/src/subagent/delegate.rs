//! The `delegate_to_<name>` harness tools and what runs them.
//!
//! [`Delegator`] holds what every delegation needs: the event log (to
//! create and follow child sessions), sandboxd (to read the context pack),
//! the agents, and the supervisor that runs sessions. The supervisor runs
//! the loop that runs these tools, so it is reached through a [`Weak`]
//! set once it exists ([`Delegator::set_launcher`]): no reference cycle.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};

use futures::StreamExt as _;
use futures::future::BoxFuture;
use harness_proto::control::v1 as control;
use harness_proto::sandbox::v1 as sandbox;

use super::context_pack::{self, MAX_PACK_BYTES};
use super::receipt::ReceiptBuilder;
use crate::agent::{Agent, AgentCatalog, delegate_tool_name};
use crate::agent_loop::executor::{HarnessCallError, HarnessOutput, HarnessTool, HarnessToolError};
use crate::error_report::error_chain;
use crate::event_log::{EventLog, FollowError, FollowMode};
use crate::ids::{SessionId, TenantId};
use crate::sandbox::SandboxDispatch;
use crate::store::{NewSession, Parentage, SessionRecord};
use crate::supervisor::SessionSupervisor;

/// Most files one delegation may name.
const MAX_FILES: usize = 32;

/// Runs delegations: shared by every `delegate_to_*` tool of a control plane.
#[derive(Debug)]
pub struct Delegator {
    log: EventLog,
    sandbox: Arc<dyn SandboxDispatch>,
    agents: Arc<AgentCatalog>,
    launcher: OnceLock<Weak<SessionSupervisor>>,
}

impl Delegator {
    /// A delegator for the sessions of `log`, reading files from `sandbox`.
    pub fn new(
        log: EventLog,
        sandbox: Arc<dyn SandboxDispatch>,
        agents: Arc<AgentCatalog>,
    ) -> Arc<Self> {
        Arc::new(Self {
            log,
            sandbox,
            agents,
            launcher: OnceLock::new(),
        })
    }

    /// The supervisor that runs child sessions (set once, right after it
    /// is made; later calls change nothing).
    pub fn set_launcher(&self, supervisor: &Arc<SessionSupervisor>) {
        let _ = self.launcher.set(Arc::downgrade(supervisor));
    }

    /// One `delegate_to_<name>` tool per agent some agent delegates to.
    pub fn tools(self: &Arc<Self>) -> Vec<Arc<dyn HarnessTool>> {
        self.agents
            .subagent_names()
            .into_iter()
            .filter_map(|name| self.agents.get(name))
            .map(|agent| {
                Arc::new(DelegateTool::new(agent, Arc::clone(self))) as Arc<dyn HarnessTool>
            })
            .collect()
    }

    fn launcher(&self) -> Result<Arc<SessionSupervisor>, HarnessCallError> {
        self.launcher
            .get()
            .and_then(Weak::upgrade)
            .ok_or(HarnessCallError::ShuttingDown)
    }

    /// Runs one delegation to its receipt.
    async fn run(&self, call: control::HarnessToolCall) -> Result<HarnessOutput, HarnessCallError> {
        let delegation = call
            .delegation
            .as_ref()
            .ok_or_else(|| internal("the call was recorded without its delegation".to_owned()))?;
        let tenant = TenantId::new(&delegation.tenant);
        let child_id = SessionId::new(&delegation.child_session_id);
        let agent = self
            .agents
            .get(&delegation.agent)
            .ok_or_else(|| HarnessToolError {
                kind: control::ToolErrorKind::NotFound,
                message: format!(
                    "subagent \"{}\" is no longer defined in this control plane",
                    delegation.agent
                ),
            })?;
        // Creating is idempotent (by the call's key), so a delegation without
        // files creates or finds its child in one write. With files, a child
        // made before a restart is looked up first: its files were packed
        // then, and reading them again could fail for nothing.
        let existing = if delegation.files.is_empty() {
            None
        } else {
            self.log
                .store()
                .get_session(tenant.clone(), child_id.clone())
                .await
                .map_err(|error| internal(error_chain(&error)))?
        };
        let child = match existing {
            Some(child) => child,
            None => self.create_child(&call.invocation_id, delegation).await?,
        };
        // Wait for the child's loop to end rather than follow its log: a
        // woken follower reads the store, and under load those reads were
        // most of a delegation's cost. A loop that recorded the child's end
        // hands over what the receipt is built from; otherwise (a child
        // finished before, or stopped by a shutdown) its log is read.
        let ended = if child.status == control::SessionStatus::Finished {
            None
        } else {
            let launcher = self.launcher()?;
            launcher.launch(child, Arc::clone(&agent));
            let ended = launcher.loop_ended(&child_id);
            drop(launcher);
            ended.await
        };
        let receipt = match ended {
            Some(receipt) => receipt,
            None => Arc::new(self.receipt_from_log(&tenant, &child_id).await?),
        };
        let receipt = receipt
            .build(child_id.as_str(), &agent.definition.name)
            .ok_or(HarnessCallError::ShuttingDown)?;
        let call_id = call
            .invocation_id
            .strip_prefix(&format!("{}:", delegation.parent_session_id))
            .unwrap_or(&call.invocation_id);
        Ok(HarnessOutput {
            output_json: receipt.to_json(),
            subagent: Some(receipt.to_event(call_id)),
            skill: None,
        })
    }

    /// Folds the child's log, to its `finished`, into a receipt builder.
    async fn receipt_from_log(
        &self,
        tenant: &TenantId,
        child_id: &SessionId,
    ) -> Result<ReceiptBuilder, HarnessCallError> {
        let mut events = self
            .log
            .follow(tenant, child_id, 0, FollowMode::UntilFinished);
        let mut receipt = ReceiptBuilder::default();
        while let Some(event) = events.next().await {
            match event {
                Ok(event) => {
                    if let Some(kind) = &event.kind {
                        receipt.apply(kind);
                    }
                }
                Err(FollowError::ShuttingDown) => return Err(HarnessCallError::ShuttingDown),
                Err(error) => return Err(internal(error_chain(&error)).into()),
            }
        }
        Ok(receipt)
    }

    /// Creates the child session: its task with the context pack, its
    /// reserved budget, its place in the tree. Idempotent by the call's
    /// invocation id, so a repeat after a restart finds the same child.
    async fn create_child(
        &self,
        invocation_id: &str,
        delegation: &control::Delegation,
    ) -> Result<SessionRecord, HarnessToolError> {
        let files = self.read_pack(delegation).await?;
        let input = context_pack::task_input(&delegation.task, &files, MAX_PACK_BYTES);
        let shared = delegation.workspace() == control::SubagentWorkspace::Shared;
        let new = NewSession {
            session_id: SessionId::new(&delegation.child_session_id),
            tenant: TenantId::new(&delegation.tenant),
            agent: delegation.agent.clone(),
            input,
            metadata: HashMap::new(),
            budget: delegation.budget.unwrap_or_default(),
            idempotency_key: Some(format!("delegation:{invocation_id}")),
            parent: Some(Parentage {
                lineage: delegation.lineage.iter().map(SessionId::new).collect(),
                borrowed_sandbox: shared.then(|| delegation.parent_sandbox_session_id.clone()),
            }),
        };
        let created = self
            .log
            .store()
            .create_session(new)
            .await
            .map_err(|error| internal(error_chain(&error)))?;
        if created.session.session_id.as_str() != delegation.child_session_id {
            return Err(internal(format!(
                "the delegation's key is held by session {}, not by its child {}",
                created.session.session_id, delegation.child_session_id
            )));
        }
        tracing::info!(
            parent_session_id = delegation.parent_session_id,
            session_id = delegation.child_session_id,
            agent = delegation.agent,
            "subagent session created"
        );
        Ok(created.session)
    }

    /// The files the delegation names, read from the parent's workspace.
    async fn read_pack(
        &self,
        delegation: &control::Delegation,
    ) -> Result<Vec<sandbox::FileContent>, HarnessToolError> {
        if delegation.files.is_empty() {
            return Ok(Vec::new());
        }
        if delegation.files.len() > MAX_FILES {
            return Err(invalid(format!(
                "name at most {MAX_FILES} files; the subagent can read others itself"
            )));
        }
        let files = self
            .sandbox
            .read_files(sandbox::ReadFilesRequest {
                session_id: delegation.parent_sandbox_session_id.clone(),
                paths: delegation.files.clone(),
                max_bytes_per_file: u64::try_from(MAX_PACK_BYTES).unwrap_or(u64::MAX),
                allow_missing: true,
            })
            .await
            .map_err(|error| internal(error_chain(&error)))?;
        let missing: Vec<&str> = files
            .iter()
            .filter(|file| file.missing)
            .map(|file| file.path.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(invalid(format!(
                "not in the workspace: {}; name files that exist (nothing was delegated)",
                missing.join(", ")
            )));
        }
        Ok(files)
    }

    /// Cancels the child of an abandoned delegation, durably first.
    async fn cancel_child(&self, call: &control::HarnessToolCall, reason: &str) {
        let Some(delegation) = &call.delegation else {
            return;
        };
        let child_id = SessionId::new(&delegation.child_session_id);
        let reason = format!("its parent session ended: {reason}");
        match self.log.request_cancel(&child_id, &reason).await {
            Ok(()) => {}
            // Never created, or already done: nothing to stop.
            Err(crate::store::StoreError::UnknownSession(_))
            | Err(crate::store::StoreError::SessionFinished(_)) => return,
            Err(error) => {
                tracing::warn!(session_id = child_id.as_str(), error = %error_chain(&error), "could not record the cancellation of an abandoned subagent");
            }
        }
        if let Ok(launcher) = self.launcher() {
            launcher.cancel(&child_id, &reason);
        }
    }
}

fn internal(message: String) -> HarnessToolError {
    HarnessToolError {
        kind: control::ToolErrorKind::Internal,
        message,
    }
}

fn invalid(message: String) -> HarnessToolError {
    HarnessToolError {
        kind: control::ToolErrorKind::InvalidInput,
        message,
    }
}

/// `delegate_to_<name>`: runs a task as a child session of agent `<name>`.
#[derive(Debug)]
pub struct DelegateTool {
    name: String,
    description: String,
    subagent: control::ResolvedSubagent,
    delegator: Arc<Delegator>,
}

impl DelegateTool {
    /// The tool delegating to `agent`.
    pub fn new(agent: Arc<Agent>, delegator: Arc<Delegator>) -> Self {
        let definition = &agent.definition;
        let what = if definition.description.is_empty() {
            String::new()
        } else {
            format!(" {}", definition.description.trim_end_matches('.'))
        };
        let workspace = match definition.delegation.workspace {
            crate::agent::Workspace::Shared => {
                "It works in your workspace: pass work product as files."
            }
            crate::agent::Workspace::Isolated => {
                "It works in a fresh workspace of its own: name the files it needs."
            }
        };
        Self {
            name: delegate_tool_name(&definition.name),
            description: format!(
                "Delegate a task to the \"{}\" subagent.{what}. It starts with only the task and \
                 the files you name (none of this conversation) and returns a receipt: its final \
                 answer, stop reason, the files it wrote (size, sha256) and the tools it called. \
                 {workspace}",
                definition.name
            ),
            subagent: control::ResolvedSubagent {
                name: definition.name.clone(),
                workspace: definition.delegation.workspace.to_proto().into(),
                budget: Some(definition.budget),
            },
            delegator,
        }
    }
}

impl HarnessTool for DelegateTool {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> &str {
        &self.description
    }

    fn input_schema_json(&self) -> &str {
        r#"{"type":"object","properties":{"task":{"type":"string","minLength":1,"description":"What the subagent is to do, complete in itself: it sees nothing else of this conversation."},"files":{"type":"array","items":{"type":"string","minLength":1},"maxItems":32,"description":"Workspace paths whose contents are given to the subagent with the task."}},"required":["task"],"additionalProperties":false}"#
    }

    fn call(
        &self,
        call: control::HarnessToolCall,
    ) -> BoxFuture<'static, Result<HarnessOutput, HarnessCallError>> {
        let delegator = Arc::clone(&self.delegator);
        Box::pin(async move { delegator.run(call).await })
    }

    fn long_running(&self) -> bool {
        true
    }

    fn subagent(&self) -> Option<control::ResolvedSubagent> {
        Some(self.subagent.clone())
    }

    fn abandon(&self, call: &control::HarnessToolCall, reason: &str) -> BoxFuture<'static, ()> {
        let delegator = Arc::clone(&self.delegator);
        let call = call.clone();
        let reason = reason.to_owned();
        Box::pin(async move { delegator.cancel_child(&call, &reason).await })
    }
}
