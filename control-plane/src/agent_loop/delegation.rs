//! The parent's side of a delegation (see [`crate::subagent`]): deciding
//! it — limits, the child's budget, its id and place in the tree — before
//! it is recorded, and, for a session that is itself a subagent, recording
//! the files it wrote before its sandbox goes away.

use std::time::SystemTime;

use harness_proto::control::v1 as control;
use harness_proto::sandbox::v1 as sandbox;

use super::SessionRun;
use super::resolved::SessionAgent;
use crate::error_report::error_chain;
use crate::ids::SessionId;
use crate::provider::ToolCall;
use crate::subagent::{limits, reserve};

impl SessionRun<'_> {
    /// The delegation `call` to `subagent` asks for, one of `sharing`
    /// delegations this batch still starts; a refusal says why, for the
    /// model (no child is created).
    pub(super) fn decide_delegation(
        &self,
        call: &ToolCall,
        subagent: &control::ResolvedSubagent,
        agent: &SessionAgent,
        sharing: u32,
    ) -> Result<control::Delegation, String> {
        limits::admit(
            self.session.lineage.len(),
            self.agent_loop.settings.max_subagent_depth,
            self.state.children_started,
            agent.max_children,
        )
        .map_err(|refused| refused.to_string())?;
        let usage = self.state.usage_with_open_turn();
        let outstanding: Vec<control::BudgetLimits> =
            self.state.reservations.values().copied().collect();
        let time_left = self.wall_deadline.map(|deadline| {
            deadline
                .duration_since(SystemTime::now())
                .unwrap_or_default()
        });
        let parent = reserve::ParentBudget {
            limits: &self.session.budget,
            used: &usage,
            outstanding: &outstanding,
            time_left,
        };
        let own = self.step_budget(&call.call_id, subagent.budget.unwrap_or_default());
        let budget = reserve::reserve(parent, sharing, &own).map_err(|kind| {
            format!(
                "no {} budget left to reserve for a subagent ({}, counting the subagents \
                     still running); finish with what you have",
                kind.name(),
                self.exhausted_message(kind)
            )
        })?;
        // The arguments were validated against the tool's schema.
        let arguments: serde_json::Value =
            serde_json::from_str(&call.arguments_json).unwrap_or_default();
        let files = arguments["files"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(serde_json::Value::as_str)
            .map(str::to_owned)
            .collect();
        let mut lineage: Vec<String> = self
            .session
            .lineage
            .iter()
            .map(|id| id.as_str().to_owned())
            .collect();
        lineage.push(self.session_id().as_str().to_owned());
        Ok(control::Delegation {
            parent_session_id: self.session_id().as_str().to_owned(),
            child_session_id: SessionId::generate().as_str().to_owned(),
            agent: subagent.name.clone(),
            task: arguments["task"].as_str().unwrap_or_default().to_owned(),
            files,
            budget: Some(budget),
            lineage,
            parent_sandbox_session_id: self.sandbox_session_id.clone().unwrap_or_default(),
            tenant: self.session.tenant.as_str().to_owned(),
            workspace: subagent.workspace,
        })
    }

    /// For a subagent: the files its successful write calls wrote, with
    /// size and digest as its workspace has them now (before an isolated
    /// one is destroyed). Nothing for a top-level session. A failure is
    /// logged and leaves the list empty: the receipt then reports each
    /// claimed file as unwritten, never the reverse.
    pub(super) async fn files_written(&self) -> Vec<control::WrittenFile> {
        let Some(sandbox_session_id) = self.sandbox_session_id.clone() else {
            return Vec::new();
        };
        if self.session.parent_session_id().is_none() {
            return Vec::new();
        }
        // Staged events are applied to the state as they are staged.
        let paths = self.state.receipt.written_paths().to_vec();
        if paths.is_empty() {
            return Vec::new();
        }
        let request = sandbox::ReadFilesRequest {
            session_id: sandbox_session_id,
            paths,
            max_bytes_per_file: 1,
            allow_missing: true,
        };
        match self.agent_loop.sandbox.read_files(request).await {
            Ok(files) => files
                .into_iter()
                .filter(|file| !file.missing)
                .map(|file| control::WrittenFile {
                    path: file.path,
                    size: file.size,
                    sha256: file.sha256,
                })
                .collect(),
            Err(error) => {
                tracing::warn!(session_id = self.session_id().as_str(), error = %error_chain(&error), "cannot read the subagent's written files");
                Vec::new()
            }
        }
    }
}
