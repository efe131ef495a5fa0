//! Admission of the model's tool calls: arguments validated against the
//! tool's schema, policy's decision, and the durable wait for approvals
//! (resolved by a human through the log, or denied at their deadline).

use std::time::SystemTime;

use futures::StreamExt;
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;

use super::resolved::SessionAgent;
use super::{LoopError, Plan, SessionRun, sleep_until_deadline, state, tools};
use crate::event_log::{FollowError, FollowMode};
use crate::plan;
use crate::policy::Verdict;
use crate::provider::ToolCall;
use crate::skill;
use crate::store::StoreError;

impl SessionRun<'_> {
    /// Validates each undecided call and records policy's decision (and an
    /// approval request when policy asks).
    pub(super) fn admit_calls(&mut self, turn: u32, agent: &SessionAgent) {
        let Some(open) = &self.state.open else {
            return;
        };
        let undecided: Vec<ToolCall> = open
            .calls
            .iter()
            .filter(|call| call.decision.is_none() && call.finished.is_none())
            .map(|call| call.call.clone())
            .collect();
        for call in undecided {
            let known = agent.tool_names.contains(&call.tool);
            let arguments = if known {
                match tools::validate_arguments(&call, agent.schemas.get(&call.tool)) {
                    Ok(arguments) => arguments,
                    Err(problem) => {
                        self.plans
                            .insert(call.call_id.clone(), Plan::Invalid(problem));
                        continue;
                    }
                }
            } else {
                serde_json::Value::Null
            };
            if let Some(refusal) = self.plan_phase_refusal(&call, agent) {
                self.plans.insert(call.call_id.clone(), refusal);
                continue;
            }
            if let Some(problem) = unknown_skill(&call, &arguments, agent) {
                self.plans
                    .insert(call.call_id.clone(), Plan::Invalid(problem));
                continue;
            }
            let mut decision =
                agent
                    .policy
                    .decide(&agent.name, &agent.tool_names, &call.tool, &arguments);
            if decision.verdict != Verdict::Deny
                && let Some(reason) = self.state.skill_restriction.refusal(&call.tool)
            {
                decision = crate::policy::Decision {
                    verdict: Verdict::Deny,
                    rule: skill::SKILL_TOOLS_RULE.to_owned(),
                    reason,
                };
            }
            if agent.plan && call.tool == plan::SUBMIT_PLAN {
                decision = plan::plan_decision(decision);
            }
            let verdict = decision.verdict;
            let reason = decision.reason.clone();
            self.stage(
                turn,
                Kind::PolicyDecision(control::PolicyDecision {
                    call_id: call.call_id.clone(),
                    verdict: verdict.to_proto().into(),
                    rule: decision.rule,
                    reason: decision.reason,
                }),
            );
            if verdict == Verdict::Ask {
                let deadline = agent
                    .policy
                    .approval_timeout
                    .map(|timeout| harness_proto::timestamp_to_proto(SystemTime::now() + timeout));
                self.stage(
                    turn,
                    Kind::ApprovalRequested(control::ApprovalRequested {
                        call_id: call.call_id,
                        tool: call.tool,
                        arguments_json: call.arguments_json,
                        reason,
                        deadline,
                        session_id: self.session.session_id.as_str().to_owned(),
                        lineage: self
                            .session
                            .lineage
                            .iter()
                            .map(|id| id.as_str().to_owned())
                            .collect(),
                    }),
                );
            }
        }
    }

    /// Waits until every approval of the turn is resolved, by a human
    /// (`ResolveApproval` records it in the log) or by its deadline.
    pub(super) async fn await_approvals(
        &mut self,
        turn: u32,
        agent: &SessionAgent,
    ) -> Result<(), LoopError> {
        if !self.waiting_for_approval() {
            return Ok(());
        }
        self.flush().await?;
        let mut resolutions = self.agent_loop.log.follow(
            &self.session.tenant,
            &self.session.session_id,
            self.last_seq,
            FollowMode::UntilFinished,
        );
        while self.waiting_for_approval() {
            let deadline = self.next_approval_deadline();
            let timer = sleep_until_deadline(deadline);
            let next = self
                .until_stopped(async {
                    tokio::select! {
                        event = resolutions.next() => Some(event),
                        () = timer => None,
                    }
                })
                .await?;
            match next {
                Some(Some(Ok(event))) => {
                    self.last_seq = self.last_seq.max(event.seq);
                    if let Some(Kind::ApprovalResolved(resolved)) = &event.kind
                        && self.is_awaiting(&resolved.call_id)
                    {
                        self.state
                            .apply(event.turn, &Kind::ApprovalResolved(resolved.clone()));
                    }
                }
                Some(Some(Err(FollowError::ShuttingDown))) => return Err(LoopError::ShuttingDown),
                Some(Some(Err(error))) => return Err(LoopError::Approval(error)),
                Some(None) => {
                    return Err(LoopError::Approval(FollowError::SessionGone(
                        self.session.session_id.clone(),
                    )));
                }
                None => self.deny_overdue_approvals(turn, agent).await?,
            }
        }
        Ok(())
    }

    pub(super) fn waiting_for_approval(&self) -> bool {
        self.state
            .open
            .as_ref()
            .is_some_and(|open| open.calls.iter().any(state::CallState::awaiting_approval))
    }

    pub(super) fn is_awaiting(&self, call_id: &str) -> bool {
        self.state.open.as_ref().is_some_and(|open| {
            open.calls
                .iter()
                .any(|call| call.call.call_id == call_id && call.awaiting_approval())
        })
    }

    pub(super) fn approval_deadlines(&self) -> Vec<(String, SystemTime)> {
        self.state
            .open
            .iter()
            .flat_map(|open| &open.calls)
            .filter(|call| call.awaiting_approval())
            .filter_map(|call| {
                let deadline = call.approval_requested.as_ref()?.deadline?;
                let deadline = SystemTime::try_from(deadline).ok()?;
                Some((call.call.call_id.clone(), deadline))
            })
            .collect()
    }

    pub(super) fn next_approval_deadline(&self) -> Option<SystemTime> {
        self.approval_deadlines()
            .into_iter()
            .map(|(_, deadline)| deadline)
            .min()
    }

    /// Denies every approval whose deadline has passed, unless someone
    /// resolved it in the meantime (the store refuses a second resolution).
    pub(super) async fn deny_overdue_approvals(
        &mut self,
        turn: u32,
        agent: &SessionAgent,
    ) -> Result<(), LoopError> {
        let now = SystemTime::now();
        let timeout = agent.policy.approval_timeout.unwrap_or_default();
        for (call_id, deadline) in self.approval_deadlines() {
            if deadline > now {
                continue;
            }
            let resolved = control::ApprovalResolved {
                call_id: call_id.clone(),
                decision: control::ApprovalDecision::Deny.into(),
                reason: format!("no decision within {}", humantime::format_duration(timeout)),
                resolved_by: "timeout".to_owned(),
            };
            let kind = Kind::ApprovalResolved(resolved);
            match self
                .agent_loop
                .log
                .append(&self.session.session_id, turn, kind.clone())
                .await
            {
                Ok(event) => {
                    self.last_seq = self.last_seq.max(event.seq);
                    self.state.apply(turn, &kind);
                }
                // A human was quicker; their resolution arrives through the log.
                Err(StoreError::ApprovalNotPending { .. }) => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }
}

impl SessionRun<'_> {
    /// For an agent that plans: a call the planning phase refuses (any but
    /// read-only tools before the plan is approved), a second plan, or a
    /// plan that does not validate.
    fn plan_phase_refusal(&self, call: &ToolCall, agent: &SessionAgent) -> Option<Plan> {
        if !agent.plan {
            return None;
        }
        let approved = self.state.plan.is_some();
        if call.tool == plan::SUBMIT_PLAN {
            if approved {
                return Some(Plan::Denied(
                    "a plan was approved already; this session runs one plan".to_owned(),
                ));
            }
            let mut subagents: Vec<String> = agent
                .subagents
                .values()
                .map(|subagent| subagent.name.clone())
                .collect();
            subagents.sort();
            return plan::validate(&call.arguments_json, &subagents)
                .err()
                .map(Plan::Invalid);
        }
        if approved {
            return None;
        }
        plan::planning_refusal(&call.tool).map(Plan::Denied)
    }
}

/// Why a `load_skill` call names no skill of the session's agent; `None`
/// for any other call, or a skill it has.
fn unknown_skill(
    call: &ToolCall,
    arguments: &serde_json::Value,
    agent: &SessionAgent,
) -> Option<String> {
    if call.tool != skill::LOAD_SKILL {
        return None;
    }
    let name = arguments["name"].as_str().unwrap_or_default();
    if agent.skills.iter().any(|skill| skill == name) {
        return None;
    }
    Some(format!(
        "\"{name}\" is not one of your skills; they are: {}",
        agent.skills.join(", ")
    ))
}

/// Why an undispatched call may not run (policy or a human said no).
pub(super) fn refusal(call: &state::CallState) -> Option<String> {
    let Some(decision) = &call.decision else {
        return Some("no policy decision was recorded for this call".to_owned());
    };
    match decision.verdict() {
        control::Verdict::Allow => None,
        control::Verdict::Ask => match &call.approval {
            Some(approval) if approval.decision() == control::ApprovalDecision::Allow => None,
            Some(approval) if approval.reason.is_empty() => {
                Some(format!("denied by {}", approval.resolved_by))
            }
            Some(approval) => Some(format!(
                "denied by {}: {}",
                approval.resolved_by, approval.reason
            )),
            None => Some("approval was never given".to_owned()),
        },
        control::Verdict::Deny | control::Verdict::Unspecified => Some(decision.reason.clone()),
    }
}
