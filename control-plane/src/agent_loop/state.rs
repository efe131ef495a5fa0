//! A session's state as a pure function of its event log (and step records).
//!
//! The loop never keeps state of its own beside this: every event it records
//! is applied here the moment it is staged, and a session resumed after a
//! restart applies its stored events in order. Both paths run the same code,
//! so a resumed session has exactly the conversation, usage and turn state
//! an uninterrupted one would have — and sends the model byte-for-byte the
//! same requests.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;
use harness_proto::sandbox::v1 as sandbox;
use prost::Message as _;

use crate::budget::{self, BudgetKind};
use crate::compaction;
use crate::event;
use crate::handoff::{Transfer, history_after_handoff};
use crate::harness_tools;
use crate::plan::{self, PlanStep, StepOutcome};
use crate::prompt::Calibration;
use crate::provider::{Message, ToolCall};
use crate::skill::{self, SkillRestriction};
use crate::store::StepRecord;
use crate::subagent::receipt::ReceiptBuilder;

/// Step-record name of a turn's completed model call.
pub fn model_step(turn: u32) -> String {
    format!("model:{turn:08}")
}

/// Step-record prefix of a sandboxd call's request (the only kind of tool
/// step before harness tools, so it keeps its name).
const SANDBOX_STEP: &str = "invoke:";
/// Step-record prefix of a harness tool call's request.
const HARNESS_STEP: &str = "harness:";

/// Step-record name of a call's sandboxd request.
pub fn invoke_step(call_id: &str) -> String {
    format!("{SANDBOX_STEP}{call_id}")
}

/// The exact request of one tool call, recorded as its step before it runs
/// and tagged (by the step's name) with the executor that runs it.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolRequest {
    /// An `Invoke` for sandboxd.
    Sandbox(sandbox::InvokeRequest),
    /// A call of a tool the control plane runs itself.
    Harness(control::HarnessToolCall),
}

impl ToolRequest {
    /// The sandbox session it runs in (none for harness tools).
    pub fn sandbox_session_id(&self) -> &str {
        match self {
            Self::Sandbox(request) => &request.session_id,
            Self::Harness(_) => "",
        }
    }

    /// Its invocation id.
    pub fn invocation_id(&self) -> &str {
        match self {
            Self::Sandbox(request) => &request.invocation_id,
            Self::Harness(call) => &call.invocation_id,
        }
    }

    /// The step record of call `call_id`.
    pub fn step_record(&self, call_id: &str) -> StepRecord {
        match self {
            Self::Sandbox(request) => StepRecord {
                step: invoke_step(call_id),
                payload: request.encode_to_vec(),
            },
            Self::Harness(call) => StepRecord {
                step: format!("{HARNESS_STEP}{call_id}"),
                payload: call.encode_to_vec(),
            },
        }
    }

    /// The call id and request of a tool step record; `None` for another
    /// kind of step.
    fn from_step(step: &StepRecord) -> Option<(&str, Result<Self, prost::DecodeError>)> {
        let payload = step.payload.as_slice();
        if let Some(call_id) = step.step.strip_prefix(SANDBOX_STEP) {
            let request = sandbox::InvokeRequest::decode(payload).map(Self::Sandbox);
            return Some((call_id, request));
        }
        let call_id = step.step.strip_prefix(HARNESS_STEP)?;
        Some((
            call_id,
            control::HarnessToolCall::decode(payload).map(Self::Harness),
        ))
    }
}

/// One tool call of the open turn and how far it got.
#[derive(Debug, Clone, PartialEq)]
pub struct CallState {
    /// The call (id possibly renamed to be unique in the session).
    pub call: ToolCall,
    /// Policy's verdict, once recorded.
    pub decision: Option<control::PolicyDecision>,
    /// The approval request, if policy asked.
    pub approval_requested: Option<control::ApprovalRequested>,
    /// The approval's resolution.
    pub approval: Option<control::ApprovalResolved>,
    /// Dispatch, once recorded.
    pub started: Option<control::ToolStarted>,
    /// The exact request of the call (its step record).
    pub request: Option<ToolRequest>,
    /// The result, once recorded.
    pub finished: Option<control::ToolFinished>,
}

impl CallState {
    fn new(call: ToolCall) -> Self {
        Self {
            call,
            decision: None,
            approval_requested: None,
            approval: None,
            started: None,
            request: None,
            finished: None,
        }
    }

    /// Waiting for a human.
    pub fn awaiting_approval(&self) -> bool {
        self.approval_requested.is_some() && self.approval.is_none()
    }

    /// Dispatched, result not recorded.
    pub fn in_flight(&self) -> bool {
        self.started.is_some() && self.finished.is_none()
    }
}

/// The completed model call of the open turn.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelStep {
    /// What the step record holds (`turn_completed` to be).
    pub record: control::TurnCompleted,
}

/// The turn in progress: its model call and tool calls.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OpenTurn {
    /// The turn number.
    pub turn: u32,
    /// Text deltas recorded so far (a resumed model call skips them).
    pub recorded_text: String,
    /// The model call, once completed and recorded.
    pub model: Option<ModelStep>,
    /// The tool calls, in the model's order.
    pub calls: Vec<CallState>,
}

impl OpenTurn {
    /// The call with this id.
    pub fn call_mut(&mut self, call_id: &str) -> Option<&mut CallState> {
        self.calls
            .iter_mut()
            .find(|call| call.call.call_id == call_id)
    }
}

/// Everything the loop knows about a session.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SessionState {
    /// `started` is recorded.
    pub started: bool,
    /// The agent the session runs as, from `started` (absent in logs written
    /// before it was recorded).
    pub resolved: Option<control::ResolvedAgent>,
    /// `finished` is recorded.
    pub finished: bool,
    /// The conversation of closed turns (system prompt and input first);
    /// shared with model requests, copied only if one is still in flight
    /// when it grows.
    pub messages: Arc<Vec<Message>>,
    /// Usage so far.
    pub usage: control::BudgetUsage,
    /// Budgets already warned about.
    pub warned: Vec<BudgetKind>,
    /// The last closed turn's assistant text (the partial result).
    pub last_assistant_text: String,
    /// Number of the last closed turn.
    pub closed_turns: u32,
    /// Model stop reason of the last closed turn.
    pub last_stop_reason: String,
    /// The last closed turn asked for no tool calls.
    pub last_turn_without_calls: bool,
    /// The turn in progress.
    pub open: Option<OpenTurn>,
    /// Every call id used in the session.
    pub call_ids: HashSet<String>,
    /// The wait for `SendMessage` in progress (a conversation between
    /// answers).
    pub waiting: Option<control::WaitingForInput>,
    /// The last wait ended without a message, and why: the session finishes.
    pub input_closed: Option<String>,
    /// The last closed turn called `escalate` (successfully), with this
    /// reason; a user message (a conversation going on) clears it.
    pub escalation: Option<String>,
    /// The latest requested call (tool and arguments) and how many times in
    /// a row, across turns, the model asked for exactly it.
    pub repeated_call: Option<(ToolCall, u32)>,
    /// Subagents started over the session's life.
    pub children_started: u32,
    /// What a parent's receipt of this session is built from (the paths
    /// its successful write calls wrote, its calls, its end), so a child
    /// that ends here hands its receipt over without a read of its log.
    pub receipt: ReceiptBuilder,
    /// The budgets reserved for subagents still running, by the call that
    /// delegated.
    pub reservations: std::collections::BTreeMap<String, control::BudgetLimits>,
    /// The last closed turn transferred the session; the handoff is not
    /// recorded yet.
    pub pending_handoff: Option<Transfer>,
    /// Handoffs recorded over the session's life.
    pub handoffs: u32,
    /// The agent running the session after its latest handoff (`None`: the
    /// one it started with).
    pub current_agent: Option<String>,
    /// Final answers rejected for not matching the output schema.
    pub output_rejections: u32,
    /// The approved plan and how far it ran.
    pub plan: Option<PlanRun>,
    /// The plan was denied at approval, with this reason: the session ends.
    pub plan_rejected: Option<String>,
    /// Plans refused as invalid.
    pub invalid_plans: u32,
    /// The tools loaded skills still allow.
    pub skill_restriction: SkillRestriction,
    /// Skills loaded over the session's life (as `skill_loaded` names them).
    pub skills_loaded: Vec<String>,
    /// Bumped whenever `messages` is rewritten rather than extended (the
    /// start, a handoff, a compaction), so indexes of it start over.
    pub history_generation: u64,
    /// The session's latest model request, as recorded.
    pub last_request: Option<control::ModelRequest>,
    /// The latest request whose usage was measured.
    pub calibration: Option<Calibration>,
    /// The turn of the latest compaction (at most one per turn).
    pub compacted_turn: Option<u32>,
    /// Assistant turns summaries replaced over the session's life.
    pub summarised_assistants: u32,
    /// Summaries that failed in a row; the session stops at three.
    pub failed_summaries: u32,
}

/// An approved plan being run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanRun {
    /// Its steps, as approved.
    pub steps: Vec<PlanStep>,
    /// How each step that ran ended.
    pub outcomes: BTreeMap<String, StepOutcome>,
    /// The agent was told the plan ran (every step ended or was skipped).
    pub reported: bool,
}

/// Why stored data cannot be replayed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A step record does not decode.
    #[error("step record {step} does not decode")]
    BadStep {
        /// The step.
        step: String,
        /// The decoding error.
        #[source]
        source: prost::DecodeError,
    },
}

impl SessionState {
    /// A session with nothing recorded yet: the system prompt and the input.
    /// A `started` event carrying the resolved agent replaces the prompt
    /// with the recorded one; `system_prompt` counts only for logs without.
    pub fn new(system_prompt: &str, input: &str) -> Self {
        Self {
            messages: Arc::new(opening(system_prompt, input)),
            ..Self::default()
        }
    }

    /// The open turn numbered `turn`, opened if needed.
    pub fn open_turn(&mut self, turn: u32) -> &mut OpenTurn {
        self.open.get_or_insert_with(|| OpenTurn {
            turn,
            ..OpenTurn::default()
        })
    }

    /// Applies one recorded event.
    pub fn apply(&mut self, turn: u32, kind: &Kind) {
        event::apply_to_usage(&mut self.usage, kind);
        self.receipt.apply(kind);
        match kind {
            Kind::Started(started) => {
                self.started = true;
                if let Some(resolved) = &started.resolved {
                    self.history_generation += 1;
                    self.messages = Arc::new(opening(
                        &skill::system_text(&resolved.system_prompt, &resolved.skills),
                        &started.input,
                    ));
                    self.resolved = Some(resolved.clone());
                }
            }
            Kind::TextDelta(delta) => self.open_turn(turn).recorded_text.push_str(&delta.text),
            Kind::ToolCallRequested(requested) => {
                self.count_repeats(requested);
                self.call_ids.insert(requested.call_id.clone());
                self.open_turn(turn).calls.push(CallState::new(ToolCall {
                    call_id: requested.call_id.clone(),
                    tool: requested.tool.clone(),
                    arguments_json: requested.arguments_json.clone(),
                }));
            }
            Kind::PolicyDecision(decision) => {
                if let Some(call) = self.call_mut(&decision.call_id) {
                    call.decision = Some(decision.clone());
                }
            }
            Kind::ApprovalRequested(requested) => {
                if let Some(call) = self.call_mut(&requested.call_id) {
                    call.approval_requested = Some(requested.clone());
                }
            }
            Kind::ApprovalResolved(resolved) => {
                if let Some(call) = self.call_mut(&resolved.call_id) {
                    call.approval = Some(resolved.clone());
                }
            }
            Kind::ToolStarted(started) => {
                if let Some(call) = self.call_mut(&started.call_id) {
                    call.started = Some(started.clone());
                }
            }
            Kind::ToolFinished(finished) => {
                // A delegation that failed before its child ran holds
                // nothing either.
                self.reservations.remove(&finished.call_id);
                let failed = matches!(
                    finished.outcome,
                    Some(control::tool_finished::Outcome::Error(_))
                );
                if let (Some(step), Some(plan)) =
                    (plan::step_of_call(&finished.call_id), &mut self.plan)
                    && failed
                {
                    plan.outcomes
                        .entry(step.to_owned())
                        .or_insert(StepOutcome::Failed);
                }
                if let Some(call) = self.call_mut(&finished.call_id) {
                    call.finished = Some(finished.clone());
                }
            }
            Kind::SubagentStarted(started) => {
                self.children_started = self.children_started.saturating_add(1);
                self.reservations
                    .insert(started.call_id.clone(), started.budget.unwrap_or_default());
            }
            Kind::SubagentFinished(finished) => {
                self.reservations.remove(&finished.call_id);
                if let (Some(step), Some(plan)) =
                    (plan::step_of_call(&finished.call_id), &mut self.plan)
                {
                    let outcome = if finished.status() == control::ReceiptStatus::Completed {
                        StepOutcome::Completed
                    } else {
                        StepOutcome::Failed
                    };
                    plan.outcomes.insert(step.to_owned(), outcome);
                }
            }
            Kind::OutputRejected(rejected) => {
                self.output_rejections = self.output_rejections.saturating_add(1);
                self.last_turn_without_calls = false;
                Arc::make_mut(&mut self.messages).push(Message::User {
                    text: super::structured::rejection_notice(&rejected.errors),
                });
            }
            Kind::Compaction(compaction) => {
                self.messages = Arc::new(compaction::apply(&self.messages, compaction));
                self.history_generation += 1;
                self.compacted_turn = Some(turn);
                self.failed_summaries = 0;
                self.summarised_assistants = self
                    .summarised_assistants
                    .saturating_add(compaction.summarised_assistant_messages);
            }
            Kind::SkillLoaded(loaded) => {
                self.skill_restriction.apply(loaded);
                self.skills_loaded.push(loaded.name.clone());
            }
            Kind::Handoff(handoff) => {
                let system_text = handoff
                    .resolved
                    .as_ref()
                    .map(|resolved| skill::system_text(&resolved.system_prompt, &resolved.skills))
                    .unwrap_or_default();
                // The new agent's tools: a skill the old one loaded no longer narrows them.
                self.skill_restriction = SkillRestriction::default();
                self.history_generation += 1;
                self.messages = Arc::new(history_after_handoff(
                    &self.messages,
                    handoff.history(),
                    &system_text,
                    &handoff.from_agent,
                    &handoff.summary,
                ));
                if let Some(resolved) = &handoff.resolved {
                    self.resolved = Some(resolved.clone());
                }
                self.pending_handoff = None;
                self.handoffs = self.handoffs.saturating_add(1);
                self.current_agent = Some(handoff.to_agent.clone());
            }
            Kind::TurnCompleted(completed) => {
                self.calibrate(completed);
                self.close_turn(completed);
            }
            Kind::BudgetWarning(warning) => {
                if let Some(kind) = BudgetKind::from_name(&warning.budget) {
                    self.warned.push(kind);
                }
                Arc::make_mut(&mut self.messages).push(Message::User {
                    text: budget::wrap_up_notice(warning),
                });
            }
            Kind::WaitingForInput(waiting) => self.waiting = Some(waiting.clone()),
            Kind::UserMessage(message) => {
                self.waiting = None;
                self.escalation = None;
                self.last_turn_without_calls = false;
                Arc::make_mut(&mut self.messages).push(Message::User {
                    text: message.text.clone(),
                });
            }
            Kind::InputClosed(closed) => {
                self.waiting = None;
                self.input_closed = Some(closed.reason.clone());
            }
            Kind::Finished(_) => self.finished = true,
            _ => {}
        }
    }

    /// Applies a step record of the open turn (replay; steps of closed turns
    /// are not needed).
    pub fn apply_step(&mut self, step: &StepRecord) -> Result<(), ReplayError> {
        let bad = |source| ReplayError::BadStep {
            step: step.step.clone(),
            source,
        };
        let Some(open) = self.open.as_mut() else {
            return Ok(());
        };
        if step.step == model_step(open.turn) {
            let record = control::TurnCompleted::decode(step.payload.as_slice()).map_err(bad)?;
            open.model = Some(ModelStep { record });
        } else if let Some((call_id, request)) = ToolRequest::from_step(step)
            && let Some(call) = open.call_mut(call_id)
        {
            call.request = Some(request.map_err(bad)?);
        }
        Ok(())
    }

    /// Takes the measured input of the turn's request for the next
    /// estimate.
    fn calibrate(&mut self, completed: &control::TurnCompleted) {
        let Some(request) = &completed.request else {
            return;
        };
        self.last_request = Some(request.clone());
        let measured = completed.usage.map_or(0, |usage| usage.input_tokens);
        if measured > 0 {
            self.calibration = Some(Calibration {
                raw_estimate: request.raw_estimated_input_tokens,
                measured,
            });
        }
    }

    /// Counts `requested` into the run of identical calls.
    fn count_repeats(&mut self, requested: &control::ToolCallRequested) {
        match &mut self.repeated_call {
            Some((call, count))
                if call.tool == requested.tool
                    && call.arguments_json == requested.arguments_json =>
            {
                *count += 1;
            }
            _ => {
                self.repeated_call = Some((
                    ToolCall {
                        call_id: requested.call_id.clone(),
                        tool: requested.tool.clone(),
                        arguments_json: requested.arguments_json.clone(),
                    },
                    1,
                ));
            }
        }
    }

    fn call_mut(&mut self, call_id: &str) -> Option<&mut CallState> {
        self.open.as_mut()?.call_mut(call_id)
    }

    fn close_turn(&mut self, completed: &control::TurnCompleted) {
        let open = self.open.take().unwrap_or_default();
        let tool_calls: Vec<ToolCall> = open.calls.iter().map(|call| call.call.clone()).collect();
        let messages = Arc::make_mut(&mut self.messages);
        messages.push(Message::Assistant {
            text: completed.assistant_text.clone(),
            tool_calls,
        });
        messages.extend(
            open.calls
                .iter()
                .filter_map(|call| call.finished.as_ref())
                .map(tool_result_message),
        );
        self.last_assistant_text = completed.assistant_text.clone();
        self.last_stop_reason = completed.model_stop_reason.clone();
        self.last_turn_without_calls = open.calls.is_empty();
        self.escalation = open.calls.iter().find_map(escalated);
        self.pending_handoff = open.calls.iter().find_map(transferred);
        for call in open
            .calls
            .iter()
            .filter(|call| call.call.tool == plan::SUBMIT_PLAN)
        {
            self.note_plan(call);
        }
        if let Some(plan) = &mut self.plan
            && !plan.reported
            && plan::next_wave(&plan.steps, &plan.outcomes).0.is_empty()
        {
            plan.reported = true;
            let notice = plan::synthesis_notice(&plan.steps, &plan.outcomes);
            Arc::make_mut(&mut self.messages).push(Message::User { text: notice });
        }
        self.closed_turns = completed.turn.max(self.closed_turns);
    }

    /// What a finished `submit_plan` call means: an approved plan, a
    /// denied one, or an invalid one.
    fn note_plan(&mut self, call: &CallState) {
        let Some(finished) = &call.finished else {
            return;
        };
        match &finished.outcome {
            Some(control::tool_finished::Outcome::OutputJson(_)) if self.plan.is_none() => {
                let steps = plan::parse_steps(&call.call.arguments_json);
                self.plan = Some(PlanRun {
                    steps,
                    outcomes: BTreeMap::new(),
                    reported: false,
                });
            }
            Some(control::tool_finished::Outcome::Error(error)) => {
                let denied_by_a_person = call
                    .approval
                    .as_ref()
                    .is_some_and(|approval| approval.decision() == control::ApprovalDecision::Deny);
                if denied_by_a_person {
                    self.plan_rejected = Some(error.message.clone());
                } else if error.kind() == control::ToolErrorKind::InvalidInput {
                    self.invalid_plans = self.invalid_plans.saturating_add(1);
                }
            }
            _ => {}
        }
    }

    /// Usage including the open turn's completed model call, which counts
    /// only once its turn closes.
    pub fn usage_with_open_turn(&self) -> control::BudgetUsage {
        let mut usage = self.usage;
        if let Some(model) = self.open.as_ref().and_then(|open| open.model.as_ref()) {
            event::apply_turn_to_usage(&mut usage, &model.record);
            // The turn counts against max-turns when it closes, not before.
            usage.turns = self.usage.turns;
        }
        usage
    }
}

/// The transfer a successful `transfer_to_*` call asked for.
fn transferred(call: &CallState) -> Option<Transfer> {
    let finished = call.finished.as_ref()?;
    let succeeded = matches!(
        finished.outcome,
        Some(control::tool_finished::Outcome::OutputJson(_))
    );
    if !succeeded {
        return None;
    }
    Transfer::of_call(
        &call.call.call_id,
        &call.call.tool,
        &call.call.arguments_json,
    )
}

/// The reason of a call that escalated: a successful `escalate`.
fn escalated(call: &CallState) -> Option<String> {
    let finished = call.finished.as_ref()?;
    let succeeded = matches!(
        finished.outcome,
        Some(control::tool_finished::Outcome::OutputJson(_))
    );
    if call.call.tool != harness_tools::ESCALATE || !succeeded {
        return None;
    }
    harness_tools::escalation_reason(&call.call.arguments_json)
}

/// The conversation's first messages: the system prompt (if any) and the input.
fn opening(system_prompt: &str, input: &str) -> Vec<Message> {
    let system = (!system_prompt.is_empty()).then(|| Message::System {
        text: system_prompt.to_owned(),
    });
    let user = Message::User {
        text: input.to_owned(),
    };
    system.into_iter().chain([user]).collect()
}

/// The conversation entry the model sees for a finished call.
pub fn tool_result_message(finished: &control::ToolFinished) -> Message {
    let (content, is_error) = match &finished.outcome {
        Some(control::tool_finished::Outcome::OutputJson(json)) => (json.clone(), false),
        Some(control::tool_finished::Outcome::Error(error)) => (
            format!("{}: {}", error_kind_for_model(error.kind()), error.message),
            true,
        ),
        None => ("no result".to_owned(), true),
    };
    Message::ToolResult {
        call_id: finished.call_id.clone(),
        tool: finished.tool.clone(),
        content,
        is_error,
    }
}

/// How an error kind is named to the model. Part of every later request, so
/// it is spelled out here, not borrowed from the transcript's rendering for
/// people: changing it would change replayed requests.
fn error_kind_for_model(kind: control::ToolErrorKind) -> &'static str {
    match kind {
        control::ToolErrorKind::Unspecified => "unspecified",
        control::ToolErrorKind::InvalidInput => "invalid_input",
        control::ToolErrorKind::Denied => "denied",
        control::ToolErrorKind::Timeout => "timeout",
        control::ToolErrorKind::ResourceExhausted => "resource_exhausted",
        control::ToolErrorKind::Failed => "failed",
        control::ToolErrorKind::Internal => "internal",
        control::ToolErrorKind::Interrupted => "interrupted",
        control::ToolErrorKind::NotFound => "not_found",
        control::ToolErrorKind::LimitExceeded => "limit_exceeded",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn requested(call_id: &str) -> Kind {
        Kind::ToolCallRequested(control::ToolCallRequested {
            call_id: call_id.to_owned(),
            tool: "read".to_owned(),
            arguments_json: "{}".to_owned(),
        })
    }

    fn finished(call_id: &str, output: &str) -> Kind {
        Kind::ToolFinished(control::ToolFinished {
            call_id: call_id.to_owned(),
            tool: "read".to_owned(),
            outcome: Some(control::tool_finished::Outcome::OutputJson(
                output.to_owned(),
            )),
            wall_time: None,
            peak_memory_bytes: 0,
        })
    }

    #[test]
    fn closed_turns_become_the_conversation_and_the_open_turn_stays_open() {
        let mut state = SessionState::new("Be brief.", "go");
        let events = [
            (0, Kind::Started(control::SessionStarted::default())),
            (
                1,
                Kind::TextDelta(control::ModelTextDelta {
                    text: "Read".to_owned(),
                }),
            ),
            (1, requested("c1")),
            (1, finished("c1", "{\"a\":1}")),
            (
                1,
                Kind::TurnCompleted(control::TurnCompleted {
                    turn: 1,
                    assistant_text: "Read".to_owned(),
                    tool_calls: 1,
                    usage: Some(control::TurnUsage {
                        input_tokens: 10,
                        ..Default::default()
                    }),
                    model_stop_reason: "tool_use".to_owned(),
                    request: None,
                }),
            ),
            (
                1,
                Kind::BudgetWarning(control::BudgetWarning {
                    budget: "turns".to_owned(),
                    used: 1,
                    limit: 1,
                }),
            ),
            (
                2,
                Kind::TextDelta(control::ModelTextDelta {
                    text: "Par".to_owned(),
                }),
            ),
            (2, requested("c2")),
        ];
        for (turn, kind) in &events {
            state.apply(*turn, kind);
        }
        assert_eq!(state.messages.len(), 5);
        assert_eq!(
            state.messages[2],
            Message::Assistant {
                text: "Read".to_owned(),
                tool_calls: vec![ToolCall {
                    call_id: "c1".to_owned(),
                    tool: "read".to_owned(),
                    arguments_json: "{}".to_owned()
                }]
            }
        );
        assert_eq!(
            state.messages[3],
            Message::ToolResult {
                call_id: "c1".to_owned(),
                tool: "read".to_owned(),
                content: "{\"a\":1}".to_owned(),
                is_error: false
            }
        );
        assert!(
            matches!(&state.messages[4], Message::User { text } if text.starts_with("[harness] Budget notice"))
        );
        assert_eq!(state.warned, [BudgetKind::Turns]);
        assert_eq!((state.closed_turns, state.usage.turns), (1, 1));
        let open = state.open.as_ref().unwrap();
        assert_eq!((open.turn, open.recorded_text.as_str()), (2, "Par"));
        assert_eq!(open.calls.len(), 1);
        assert_eq!(
            state.call_ids,
            HashSet::from(["c1".to_owned(), "c2".to_owned()])
        );
    }

    #[test]
    fn subagent_events_track_children_and_reservations() {
        let mut state = SessionState::new("", "go");
        let budget = control::BudgetLimits {
            max_output_tokens: Some(100),
            ..Default::default()
        };
        let started = |call_id: &str| {
            Kind::SubagentStarted(control::SubagentStarted {
                call_id: call_id.to_owned(),
                budget: Some(budget),
                ..Default::default()
            })
        };
        state.apply(1, &started("a"));
        state.apply(1, &started("b"));
        state.apply(
            1,
            &Kind::SubagentFinished(control::SubagentFinished {
                call_id: "a".to_owned(),
                usage: Some(control::BudgetUsage {
                    output_tokens: 40,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        );
        assert_eq!(state.children_started, 2);
        assert_eq!(
            state.reservations,
            std::collections::BTreeMap::from([("b".to_owned(), budget)])
        );
        assert_eq!(state.usage.output_tokens, 40);
        // A delegation whose call failed before its child ran holds nothing.
        state.apply(
            1,
            &Kind::ToolFinished(control::ToolFinished {
                call_id: "b".to_owned(),
                ..Default::default()
            }),
        );
        assert!(state.reservations.is_empty());
    }

    #[test]
    fn error_kinds_are_named_to_the_model_as_the_transcript_names_them() {
        for value in 0..=9 {
            let kind = control::ToolErrorKind::try_from(value).unwrap();
            assert_eq!(
                error_kind_for_model(kind),
                crate::event::tool_error_kind_label(kind)
            );
        }
    }

    #[test]
    fn steps_of_the_open_turn_are_replayed() {
        let mut state = SessionState::new("", "go");
        state.apply(1, &requested("c1"));
        let record = control::TurnCompleted {
            turn: 1,
            assistant_text: "x".to_owned(),
            ..Default::default()
        };
        state
            .apply_step(&StepRecord {
                step: model_step(1),
                payload: record.encode_to_vec(),
            })
            .unwrap();
        let request = sandbox::InvokeRequest {
            invocation_id: "s:c1".to_owned(),
            ..Default::default()
        };
        state
            .apply_step(&StepRecord {
                step: invoke_step("c1"),
                payload: request.encode_to_vec(),
            })
            .unwrap();
        let harness_call = control::HarnessToolCall {
            invocation_id: "s:c2".to_owned(),
            tool: "remember".to_owned(),
            input_json: "{}".to_owned(),
            delegation: None,
        };
        state.apply(1, &requested("c2"));
        let harness_step = ToolRequest::Harness(harness_call.clone()).step_record("c2");
        assert_eq!(harness_step.step, "harness:c2");
        state.apply_step(&harness_step).unwrap();
        let open = state.open.unwrap();
        assert_eq!(open.model, Some(ModelStep { record }));
        assert_eq!(open.calls[0].request, Some(ToolRequest::Sandbox(request)));
        assert_eq!(
            open.calls[1].request,
            Some(ToolRequest::Harness(harness_call))
        );
    }
}
