//! Supervised plans: the rules, in one place.
//!
//! An agent with `plan = true` first plans, read-only: until its plan is
//! approved the harness denies every tool but the read-only ones
//! ([`READ_ONLY_TOOLS`]), `escalate` and [`SUBMIT_PLAN`] — by refusing the
//! calls, not by asking in the prompt. The plan is the input of one
//! `submit_plan` call: validated against [`PLAN_SCHEMA`] as any tool input
//! is, then by [`validate`] (known subagents, known and acyclic
//! dependencies); an invalid plan goes back to the model with the errors.
//! A valid plan goes through approval — policy `ask` unless a rule of the
//! agent's policy says otherwise — and a denial ends the session with the
//! reason. Once approved, the loop runs the steps as delegations, wave by
//! wave in dependency order ([`next_wave`]), the steps of a wave in
//! parallel; a step whose dependency failed is skipped. Then the agent
//! writes the synthesis from the steps' receipts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::future::BoxFuture;
use harness_proto::control::v1 as control;
use serde::Deserialize;

use crate::agent_loop::executor::{HarnessCallError, HarnessOutput, HarnessTool};
use crate::policy::{Decision, Verdict};

/// The tool a planning agent submits its plan with.
pub const SUBMIT_PLAN: &str = "submit_plan";

/// Tools a planning agent may use before its plan is approved.
pub const READ_ONLY_TOOLS: [&str; 4] = ["read_file", "list_dir", "glob", "grep"];

/// Call ids of plan steps: `plan_<step id>`.
const STEP_CALL_PREFIX: &str = "plan_";

/// The input schema of [`SUBMIT_PLAN`].
pub const PLAN_SCHEMA: &str = r#"{"type":"object","required":["steps"],"additionalProperties":false,"properties":{"steps":{"type":"array","minItems":1,"maxItems":16,"items":{"type":"object","required":["id","objective","agent"],"additionalProperties":false,"properties":{"id":{"type":"string","pattern":"^[A-Za-z0-9_-]{1,32}$","description":"Unique step id."},"objective":{"type":"string","minLength":1,"description":"The step's task for its agent, complete in itself."},"agent":{"type":"string","description":"The subagent that runs the step."},"depends_on":{"type":"array","items":{"type":"string"},"description":"Ids of steps that must finish first."},"files":{"type":"array","items":{"type":"string"},"description":"Workspace files given to the step's agent."},"budget":{"type":"object","additionalProperties":false,"properties":{"max_turns":{"type":"integer","minimum":1},"max_tool_calls":{"type":"integer","minimum":1},"max_output_tokens":{"type":"integer","minimum":1}}}}}}}}"#;

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct PlanStep {
    /// Unique id.
    pub id: String,
    /// The step's task.
    pub objective: String,
    /// The subagent that runs it.
    pub agent: String,
    /// Steps that finish first.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Files given to its agent.
    #[serde(default)]
    pub files: Vec<String>,
    /// Its budget (tightens the subagent's own).
    #[serde(default)]
    pub budget: StepBudget,
}

/// A step's own limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct StepBudget {
    /// Model turns.
    pub max_turns: Option<u32>,
    /// Tool calls.
    pub max_tool_calls: Option<u32>,
    /// Output tokens.
    pub max_output_tokens: Option<u64>,
}

impl StepBudget {
    /// `own` tightened by this budget.
    pub fn tighten(&self, own: &control::BudgetLimits) -> control::BudgetLimits {
        let min32 = |a: Option<u32>, b: Option<u32>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let min64 = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        control::BudgetLimits {
            max_turns: min32(own.max_turns, self.max_turns),
            max_tool_calls: min32(own.max_tool_calls, self.max_tool_calls),
            max_output_tokens: min64(own.max_output_tokens, self.max_output_tokens),
            ..*own
        }
    }
}

#[derive(Deserialize)]
struct PlanInput {
    steps: Vec<PlanStep>,
}

/// The steps of a `submit_plan` input (already schema-valid), checked:
/// unique ids, agents among `subagents`, dependencies that exist and form
/// no cycle. The error lists every problem, for the model.
pub fn validate(arguments_json: &str, subagents: &[String]) -> Result<Vec<PlanStep>, String> {
    let input: PlanInput = serde_json::from_str(arguments_json)
        .map_err(|error| format!("the plan does not parse: {error}"))?;
    let mut problems = Vec::new();
    let mut ids = BTreeSet::new();
    for step in &input.steps {
        if !ids.insert(step.id.as_str()) {
            problems.push(format!("step id \"{}\" is used twice", step.id));
        }
        if !subagents.contains(&step.agent) {
            problems.push(format!(
                "step \"{}\": agent \"{}\" is not one of your subagents ({})",
                step.id,
                step.agent,
                subagents.join(", ")
            ));
        }
    }
    for step in &input.steps {
        for dependency in &step.depends_on {
            if dependency == &step.id {
                problems.push(format!("step \"{}\" depends on itself", step.id));
            } else if !ids.contains(dependency.as_str()) {
                problems.push(format!(
                    "step \"{}\" depends on \"{dependency}\", which is no step of the plan",
                    step.id
                ));
            }
        }
    }
    if problems.is_empty() && has_cycle(&input.steps) {
        problems.push("the steps' dependencies form a cycle".to_owned());
    }
    if problems.is_empty() {
        Ok(input.steps)
    } else {
        Err(format!("the plan is invalid: {}", problems.join("; ")))
    }
}

fn has_cycle(steps: &[PlanStep]) -> bool {
    let mut done: BTreeSet<&str> = BTreeSet::new();
    loop {
        let ready: Vec<&str> = steps
            .iter()
            .filter(|step| !done.contains(step.id.as_str()))
            .filter(|step| {
                step.depends_on
                    .iter()
                    .all(|dep| done.contains(dep.as_str()))
            })
            .map(|step| step.id.as_str())
            .collect();
        if ready.is_empty() {
            return done.len() < steps.len();
        }
        done.extend(ready);
    }
}

/// The steps of an approved `submit_plan` input (validated when it was
/// admitted; nothing if it no longer parses).
pub fn parse_steps(arguments_json: &str) -> Vec<PlanStep> {
    serde_json::from_str::<PlanInput>(arguments_json)
        .map(|input| input.steps)
        .unwrap_or_default()
}

/// The verdict on a call while the plan is not approved yet (`None`: the
/// policy decides as usual). Read-only tools, `escalate` and the plan
/// itself pass; everything else is refused.
pub fn planning_refusal(tool: &str) -> Option<String> {
    let allowed = READ_ONLY_TOOLS.contains(&tool)
        || tool == SUBMIT_PLAN
        || tool == crate::harness_tools::ESCALATE;
    (!allowed).then(|| {
        format!(
            "the planning phase is read-only: \"{tool}\" runs only as part of an approved plan; \
             submit your plan with {SUBMIT_PLAN}"
        )
    })
}

/// The decision on a `submit_plan` call: a plan is asked about unless a
/// rule of the agent's policy decided otherwise.
pub fn plan_decision(decision: Decision) -> Decision {
    if decision.rule != crate::policy::DEFAULT_RULE || decision.verdict != Verdict::Allow {
        return decision;
    }
    Decision {
        verdict: Verdict::Ask,
        rule: "plan.approval".to_owned(),
        reason: "a plan runs only once approved".to_owned(),
    }
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    /// Its receipt says completed.
    Completed,
    /// It failed (or its receipt says it did not complete cleanly).
    Failed,
}

/// The steps to run next: those not run whose dependencies all completed.
/// Steps that can never run (a dependency failed or was skipped) are in
/// the second list.
pub fn next_wave<'a>(
    steps: &'a [PlanStep],
    outcomes: &BTreeMap<String, StepOutcome>,
) -> (Vec<&'a PlanStep>, Vec<&'a PlanStep>) {
    let mut blocked: BTreeSet<&str> = outcomes
        .iter()
        .filter(|(_, outcome)| **outcome == StepOutcome::Failed)
        .map(|(id, _)| id.as_str())
        .collect();
    // Blocking spreads along dependencies.
    loop {
        let more: Vec<&str> = steps
            .iter()
            .filter(|step| !blocked.contains(step.id.as_str()) && !outcomes.contains_key(&step.id))
            .filter(|step| {
                step.depends_on
                    .iter()
                    .any(|dep| blocked.contains(dep.as_str()))
            })
            .map(|step| step.id.as_str())
            .collect();
        if more.is_empty() {
            break;
        }
        blocked.extend(more);
    }
    let pending = steps.iter().filter(|step| !outcomes.contains_key(&step.id));
    let (skipped, open): (Vec<&PlanStep>, Vec<&PlanStep>) =
        pending.partition(|step| blocked.contains(step.id.as_str()));
    let ready = open
        .into_iter()
        .filter(|step| {
            step.depends_on
                .iter()
                .all(|dep| outcomes.get(dep) == Some(&StepOutcome::Completed))
        })
        .collect();
    (ready, skipped)
}

/// The call id of step `id`.
pub fn step_call_id(id: &str) -> String {
    format!("{STEP_CALL_PREFIX}{id}")
}

/// The step id of a plan step's call id.
pub fn step_of_call(call_id: &str) -> Option<&str> {
    call_id.strip_prefix(STEP_CALL_PREFIX)
}

/// What the agent is told once its plan ran, before it writes the
/// synthesis.
pub fn synthesis_notice(steps: &[PlanStep], outcomes: &BTreeMap<String, StepOutcome>) -> String {
    let lines: Vec<String> = steps
        .iter()
        .map(|step| {
            let status = match outcomes.get(&step.id) {
                Some(StepOutcome::Completed) => "completed",
                Some(StepOutcome::Failed) => "failed",
                None => "skipped (a step it depends on did not complete)",
            };
            format!("- {} ({}): {status}", step.id, step.agent)
        })
        .collect();
    format!(
        "[harness] Your plan ran:\n{}\nThe receipts above list the files each step wrote. Write \
         the synthesis now.",
        lines.join("\n")
    )
}

/// `submit_plan {steps}`: what the loop runs once the plan is approved; the
/// tool itself only acknowledges.
#[derive(Debug, Default)]
pub struct SubmitPlanTool;

impl HarnessTool for SubmitPlanTool {
    fn name(&self) -> &str {
        SUBMIT_PLAN
    }

    fn description(&self) -> &str {
        "Submit your plan: steps, each run by one of your subagents (delegate_to_* names them), \
         in the order their depends_on allows, independent steps in parallel. A person approves \
         the plan before any step runs. Until then only read-only tools work."
    }

    fn input_schema_json(&self) -> &str {
        PLAN_SCHEMA
    }

    fn call(
        &self,
        call: control::HarnessToolCall,
    ) -> BoxFuture<'static, Result<HarnessOutput, HarnessCallError>> {
        Box::pin(async move {
            let steps = serde_json::from_str::<PlanInput>(&call.input_json)
                .map(|input| input.steps.len())
                .unwrap_or_default();
            let output = serde_json::json!({"approved": true, "steps": steps});
            Ok(HarnessOutput::json(output.to_string()))
        })
    }
}

/// The tool, for a registry.
pub fn tool() -> Arc<dyn HarnessTool> {
    Arc::new(SubmitPlanTool)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn subagents() -> Vec<String> {
        vec!["investigator".to_owned(), "writer".to_owned()]
    }

    fn plan(steps: serde_json::Value) -> String {
        serde_json::json!({ "steps": steps }).to_string()
    }

    #[test]
    fn the_plan_schema_compiles() {
        let schema: serde_json::Value = serde_json::from_str(PLAN_SCHEMA).unwrap();
        assert!(jsonschema::validator_for(&schema).is_ok());
    }

    #[test]
    fn a_valid_plan_gives_its_steps() {
        let steps = validate(
            &plan(serde_json::json!([
                {"id": "a", "objective": "Look.", "agent": "investigator"},
                {"id": "b", "objective": "Write.", "agent": "writer", "depends_on": ["a"], "budget": {"max_turns": 3}},
            ])),
            &subagents(),
        )
        .unwrap();
        assert_eq!(steps.len(), 2);
        assert_eq!(steps[1].budget.max_turns, Some(3));
    }

    #[test]
    fn every_problem_of_an_invalid_plan_is_named() {
        assert_eq!(
            validate(
                &plan(serde_json::json!([
                    {"id": "a", "objective": "x", "agent": "ghost"},
                    {"id": "a", "objective": "x", "agent": "writer", "depends_on": ["zz", "a"]},
                ])),
                &subagents()
            ),
            Err(
                "the plan is invalid: step \"a\": agent \"ghost\" is not one of your \
                 subagents (investigator, writer); step id \"a\" is used twice; step \"a\" depends \
                 on \"zz\", which is no step of the plan; step \"a\" depends on itself"
                    .to_owned()
            )
        );
        assert_eq!(
            validate(
                &plan(serde_json::json!([
                    {"id": "a", "objective": "x", "agent": "writer", "depends_on": ["b"]},
                    {"id": "b", "objective": "x", "agent": "writer", "depends_on": ["a"]},
                ])),
                &subagents()
            ),
            Err("the plan is invalid: the steps' dependencies form a cycle".to_owned())
        );
    }

    #[test]
    fn waves_follow_dependencies_and_failures_skip_dependents() {
        let steps = validate(
            &plan(serde_json::json!([
                {"id": "a", "objective": "x", "agent": "writer"},
                {"id": "b", "objective": "x", "agent": "writer"},
                {"id": "c", "objective": "x", "agent": "writer", "depends_on": ["a", "b"]},
                {"id": "d", "objective": "x", "agent": "writer", "depends_on": ["c"]},
            ])),
            &subagents(),
        )
        .unwrap();
        let ids = |steps: Vec<&PlanStep>| steps.iter().map(|s| s.id.clone()).collect::<Vec<_>>();
        let (ready, skipped) = next_wave(&steps, &BTreeMap::new());
        assert_eq!(
            (ids(ready), ids(skipped)),
            (vec!["a".to_owned(), "b".to_owned()], vec![])
        );
        let mut outcomes = BTreeMap::from([("a".to_owned(), StepOutcome::Completed)]);
        outcomes.insert("b".to_owned(), StepOutcome::Failed);
        let (ready, skipped) = next_wave(&steps, &outcomes);
        assert_eq!(
            (ids(ready), ids(skipped)),
            (vec![], vec!["c".to_owned(), "d".to_owned()])
        );
    }

    #[test]
    fn planning_allows_only_reading_the_plan_and_escalating() {
        assert_eq!(planning_refusal("read_file"), None);
        assert_eq!(planning_refusal(SUBMIT_PLAN), None);
        assert_eq!(planning_refusal("escalate"), None);
        assert!(planning_refusal("write_file").is_some());
        assert!(planning_refusal("delegate_to_writer").is_some());
    }

    #[test]
    fn a_plan_is_asked_about_unless_a_rule_decides() {
        let default_allow = Decision {
            verdict: Verdict::Allow,
            rule: crate::policy::DEFAULT_RULE.to_owned(),
            reason: String::new(),
        };
        assert_eq!(plan_decision(default_allow).verdict, Verdict::Ask);
        let rule_allow = Decision {
            verdict: Verdict::Allow,
            rule: "policy.rule[0]".to_owned(),
            reason: String::new(),
        };
        assert_eq!(plan_decision(rule_allow.clone()), rule_allow);
    }
}
