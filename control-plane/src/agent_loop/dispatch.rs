//! Dispatch: each admitted call's request recorded (tagged with its
//! executor) before it runs, the calls run in parallel (bounded), and their
//! results recorded in call order.

use std::sync::Arc;

use futures::FutureExt;
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;
use tokio::sync::Semaphore;

use super::approvals::refusal;
use super::executor::{CallTarget, DispatchSettings};
use super::resolved::SessionAgent;
use super::tools::{self, CallResult};
use super::{LoopError, Plan, SANDBOX_ANSWER_GRACE, SessionRun};
use crate::agent::TRANSFER_PREFIX;
use crate::budget::{self, BudgetKind};
use crate::provider::ToolCall;
use crate::sandbox::SandboxError;
use crate::skill;

impl SessionRun<'_> {
    /// Records `tool_started` (and the request, as a step) for every allowed
    /// call the budget still permits, then writes everything before dispatch.
    pub(super) async fn start_calls(
        &mut self,
        turn: u32,
        agent: &SessionAgent,
    ) -> Result<(), LoopError> {
        let Some(open) = &self.state.open else {
            return Ok(());
        };
        let pending: Vec<(ToolCall, Option<String>)> = open
            .calls
            .iter()
            .filter(|call| call.started.is_none() && call.finished.is_none())
            .filter(|call| !self.plans.contains_key(&call.call.call_id))
            .map(|call| (call.call.clone(), refusal(call)))
            .collect();
        // Delegations started together split what the parent has left.
        let mut sharing = u32::try_from(
            pending
                .iter()
                .filter(|(call, refused)| {
                    refused.is_none() && agent.subagents.contains_key(&call.tool)
                })
                .count(),
        )
        .unwrap_or(u32::MAX);
        for (call, refused) in pending {
            let call_id = call.call_id.clone();
            if let Some(denial) = refused {
                self.plans.insert(call_id, Plan::Denied(denial));
                continue;
            }
            if let Some(kind) = self.dispatch_budget_stop() {
                let message = format!("not run: {}", self.exhausted_message(kind));
                self.plans.insert(call_id, Plan::Denied(message));
                continue;
            }
            if self.sandbox_lost {
                if self.session.sandbox_borrowed {
                    return Err(LoopError::BorrowedSandboxLost);
                }
                self.create_sandbox(agent).await?;
                self.sandbox_lost = false;
            }
            let delegation = match agent.subagents.get(&call.tool) {
                Some(subagent) => {
                    let decided = self.decide_delegation(&call, subagent, agent, sharing);
                    sharing = sharing.saturating_sub(1);
                    match decided {
                        Ok(delegation) => Some(delegation),
                        Err(refusal) => {
                            self.plans.insert(call_id, Plan::Limit(refusal));
                            continue;
                        }
                    }
                }
                None => None,
            };
            if let Some(refusal) = self.handoff_refusal(&call, agent) {
                self.plans.insert(call_id, Plan::Limit(refusal));
                continue;
            }
            let invocation_id = format!("{}:{}", self.session_id(), call_id);
            let request = self.agent_loop.executors.request(
                agent.executor_of(&call.tool),
                &call,
                CallTarget {
                    invocation_id: &invocation_id,
                    sandbox_session_id: self.sandbox_session_id.as_deref().unwrap_or_default(),
                    timeout: self.agent_loop.settings.tool_timeout,
                    delegation: delegation.as_ref(),
                },
            );
            self.staged_steps.push(request.step_record(&call_id));
            self.stage(
                turn,
                Kind::ToolStarted(control::ToolStarted {
                    call_id: call_id.clone(),
                    sandbox_session_id: request.sandbox_session_id().to_owned(),
                    invocation_id,
                    tool: call.tool,
                }),
            );
            if let Some(delegation) = delegation {
                self.stage(
                    turn,
                    Kind::SubagentStarted(control::SubagentStarted {
                        child_session_id: delegation.child_session_id,
                        agent: delegation.agent,
                        task: delegation.task,
                        call_id: call_id.clone(),
                        budget: delegation.budget,
                        lineage: delegation.lineage,
                        workspace: delegation.workspace,
                    }),
                );
            }
            if let Some(call) = self
                .state
                .open
                .as_mut()
                .and_then(|open| open.call_mut(&call_id))
            {
                call.request = Some(request);
            }
        }
        self.flush().await
    }

    /// Why a transfer call may not run: one handoff per turn, and at most
    /// the agent's `max-handoffs` over the session.
    fn handoff_refusal(&self, call: &ToolCall, agent: &SessionAgent) -> Option<String> {
        if !call.tool.starts_with(TRANSFER_PREFIX) {
            return None;
        }
        let transfers_this_turn = self
            .state
            .open
            .iter()
            .flat_map(|open| &open.calls)
            .filter(|other| other.started.is_some() && other.call.tool.starts_with(TRANSFER_PREFIX))
            .count();
        if transfers_this_turn > 0 {
            return Some(
                "one handoff per turn: another transfer of this turn already hands the session                  over"
                    .to_owned(),
            );
        }
        (self.state.handoffs >= agent.max_handoffs).then(|| {
            format!(
                "max-handoffs is {}: this session was handed over {} times already; answer                  yourself or escalate",
                agent.max_handoffs, self.state.handoffs
            )
        })
    }

    /// A budget (other than turns, which limit model calls) used up, counting
    /// the open turn's model call and what running subagents hold reserved.
    pub(super) fn dispatch_budget_stop(&self) -> Option<BudgetKind> {
        let usage = self.state.usage_with_open_turn();
        let elapsed = self.elapsed();
        budget::ALL_KINDS
            .into_iter()
            .filter(|kind| *kind != BudgetKind::Turns)
            .find(|kind| {
                let reserved: u64 = match kind {
                    // Children run alongside: time is not shared out.
                    BudgetKind::WallClock | BudgetKind::Turns => 0,
                    kind => self
                        .state
                        .reservations
                        .values()
                        .filter_map(|reserved| kind.limit(reserved))
                        .fold(0, u64::saturating_add),
                };
                kind.limit(&self.session.budget).is_some_and(|limit| {
                    kind.used(&usage, elapsed).saturating_add(reserved) >= limit
                })
            })
    }

    /// Dispatches the calls in flight (bounded), and records every call's
    /// result in call order.
    pub(super) async fn collect_results(
        &mut self,
        turn: u32,
        agent: &SessionAgent,
    ) -> Result<(), LoopError> {
        let Some(open) = &self.state.open else {
            return Ok(());
        };
        let calls: Vec<(ToolCall, bool)> = open
            .calls
            .iter()
            .filter(|call| call.finished.is_none())
            .map(|call| (call.call.clone(), call.in_flight()))
            .collect();
        let settings = &self.agent_loop.settings;
        let slots = Arc::new(Semaphore::new(settings.max_parallel_tool_calls.max(1)));
        let long_running_slots = Arc::new(Semaphore::new(
            usize::try_from(agent.max_parallel_subagents.max(1)).unwrap_or(1),
        ));
        let deadline = settings.tool_timeout + SANDBOX_ANSWER_GRACE;
        // All calls are polled; the semaphore bounds how many run at once (in
        // call order: it is fair), and `FuturesOrdered` yields results in
        // call order, which is the order they are recorded in.
        let mut dispatches: FuturesOrdered<_> = open
            .calls
            .iter()
            .filter(|call| call.finished.is_none() && call.in_flight())
            .map(|call| match call.request.clone() {
                Some(request) => self.agent_loop.executors.dispatch(
                    request,
                    DispatchSettings {
                        slots: Arc::clone(&slots),
                        long_running_slots: Arc::clone(&long_running_slots),
                        deadline,
                        retry: settings.dispatch_retry,
                    },
                ),
                None => Box::pin(std::future::ready(CallResult::MissingRequest)),
            })
            .collect();
        for (call, in_flight) in calls {
            let call_id = call.call_id.clone();
            let finished = if in_flight {
                let result = match dispatches.next().now_or_never() {
                    Some(result) => result,
                    // Write what is recorded while waiting: a commit delayed
                    // by a busy store then no longer delays the results
                    // that arrive meanwhile.
                    None => self.flush_while(dispatches.next()).await?,
                };
                let result = result.unwrap_or(CallResult::Failed(SandboxError::MissingResult));
                if matches!(result, CallResult::ShuttingDown) {
                    return Err(LoopError::ShuttingDown);
                }
                if let CallResult::Harness(Ok(output)) = &result
                    && let Some(subagent) = &output.subagent
                {
                    let subagent = control::SubagentFinished {
                        call_id: call_id.clone(),
                        ..subagent.clone()
                    };
                    self.stage(turn, Kind::SubagentFinished(subagent));
                }
                if let CallResult::Harness(Ok(output)) = &result
                    && let Some(loaded) = &output.skill
                {
                    let loaded = skill::recorded_load(loaded, &call_id, &agent.tool_names);
                    self.stage(turn, Kind::SkillLoaded(loaded));
                }
                if let CallResult::Outcome(outcome) = &result {
                    for chunk in &outcome.output {
                        self.stage(turn, Kind::ToolOutput(tools::tool_output(&call_id, chunk)));
                    }
                }
                if matches!(result, CallResult::SandboxLost(_)) {
                    self.sandbox_lost = true;
                }
                let resumed = self.resumed_calls.contains(&call_id);
                let finished = tools::finished_from_failure(&call, &result, resumed);
                if let CallResult::Failed(source) = result {
                    self.stage(turn, Kind::ToolFinished(finished));
                    return Err(LoopError::Dispatch { call_id, source });
                }
                finished
            } else {
                let (kind, message) = match self.plans.get(&call_id) {
                    Some(Plan::Invalid(message)) => {
                        (control::ToolErrorKind::InvalidInput, message.clone())
                    }
                    Some(Plan::Denied(message)) => {
                        (control::ToolErrorKind::Denied, message.clone())
                    }
                    Some(Plan::Limit(message)) => {
                        (control::ToolErrorKind::LimitExceeded, message.clone())
                    }
                    None => (
                        control::ToolErrorKind::Internal,
                        "the call was neither dispatched nor refused".to_owned(),
                    ),
                };
                tools::finished_with_error(&call, kind, message)
            };
            self.stage(turn, Kind::ToolFinished(finished));
        }
        Ok(())
    }
}
