//! Running a supervised plan (see [`crate::plan`]): the harness plays the
//! model's part for each wave of ready steps — a turn whose recorded model
//! step asks for one delegation per step — so the waves are recorded,
//! replayed and dispatched exactly like the model's own delegations.

use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;
use prost::Message as _;

use super::SessionRun;
use super::state::{ModelStep, model_step};
use crate::agent::delegate_tool_name;
use crate::plan;
use crate::store::StepRecord;

/// The model stop reason of a turn the harness played to run plan steps.
pub const PLAN_STEPS_STOP: &str = "plan_steps";

impl SessionRun<'_> {
    /// Opens turn `turn` as the next wave of the approved plan, if steps
    /// are ready; false when there is no plan or nothing left to run.
    pub(super) fn open_plan_wave(&mut self, turn: u32) -> bool {
        let Some(run) = &self.state.plan else {
            return false;
        };
        let (ready, _) = plan::next_wave(&run.steps, &run.outcomes);
        if ready.is_empty() {
            return false;
        }
        let calls: Vec<control::ToolCallRequested> = ready
            .iter()
            .map(|step| {
                let mut arguments = serde_json::json!({"task": step.objective});
                if !step.files.is_empty() {
                    arguments["files"] = step.files.clone().into();
                }
                control::ToolCallRequested {
                    call_id: plan::step_call_id(&step.id),
                    tool: delegate_tool_name(&step.agent),
                    arguments_json: arguments.to_string(),
                }
            })
            .collect();
        let ids: Vec<&str> = ready.iter().map(|step| step.id.as_str()).collect();
        let record = control::TurnCompleted {
            turn,
            assistant_text: format!("[harness] Running plan steps: {}.", ids.join(", ")),
            tool_calls: u32::try_from(calls.len()).unwrap_or(u32::MAX),
            usage: None,
            model_stop_reason: PLAN_STEPS_STOP.to_owned(),
            request: None,
        };
        self.staged_steps.push(StepRecord {
            step: model_step(turn),
            payload: record.encode_to_vec(),
        });
        self.state.open_turn(turn).model = Some(ModelStep { record });
        for call in calls {
            self.stage(turn, Kind::ToolCallRequested(call));
        }
        true
    }

    /// The budget step `call_id` of the plan asks for, tightening `own`.
    pub(super) fn step_budget(
        &self,
        call_id: &str,
        own: control::BudgetLimits,
    ) -> control::BudgetLimits {
        let step = plan::step_of_call(call_id).and_then(|id| {
            self.state
                .plan
                .as_ref()?
                .steps
                .iter()
                .find(|step| step.id == id)
        });
        match step {
            Some(step) => step.budget.tighten(&own),
            None => own,
        }
    }
}
