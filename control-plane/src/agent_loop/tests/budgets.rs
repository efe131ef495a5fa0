//! Budgets: tool calls, turns, tokens, cost and wall clock; the 80% wrap-up notice.

use super::*;

const LOOPING_SCRIPT: &str = r#"
    [[turn]]
    text = "Step one."
    [[turn.tool-calls]]
    tool = "fast"
    [[turn]]
    text = "Step two."
    [[turn.tool-calls]]
    tool = "fast"
    [[turn.tool-calls]]
    tool = "fast"
    [[turn]]
    text = "Step three."
    [[turn.tool-calls]]
    tool = "fast"
    [[turn]]
    text = "Finished."
"#;

async fn budget_run(budget: control::BudgetLimits) -> Harness {
    let harness = Harness::new(LOOPING_SCRIPT, &["fast"], FakeSandbox::new(&["fast"]))
        .await
        .priced(ModelPrice {
            input_usd_per_mtok: 1000.0,
            cached_input_usd_per_mtok: None,
            output_usd_per_mtok: 2000.0,
        });
    harness.run_with(budget).await;
    harness
}

fn finished_event(events: &[control::SessionEvent]) -> control::SessionFinished {
    match events.last().and_then(|event| event.kind.clone()) {
        Some(Kind::Finished(finished)) => finished,
        other => panic!("last event is not finished: {other:?}"),
    }
}

fn warnings(events: &[control::SessionEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::BudgetWarning(warning)) => Some(warning.budget.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn the_tool_call_budget_stops_calls_beyond_it_and_the_session() {
    let harness = budget_run(control::BudgetLimits {
        max_turns: Some(10),
        max_tool_calls: Some(2),
        ..Default::default()
    })
    .await;
    let events = harness.events().await;
    let finished = finished_event(&events);
    assert_eq!(
        (
            finished.stop_reason(),
            finished.final_output.as_str(),
            finished.message.as_str()
        ),
        (
            control::StopReason::BudgetExhausted,
            "Step two.",
            "the tool_calls budget is used up (2 of 2 tool calls)"
        )
    );
    let summary = harness.summary().await;
    assert!(
        summary.iter().any(|line| line.ends_with(
            "t2 finished call_2_1 TOOL_ERROR_KIND_DENIED not run: the tool_calls budget is used up (2 of 2 tool calls)"
        )),
        "{summary:#?}"
    );
    assert_eq!(harness.sandbox.executions(), 2);
    assert_eq!(warnings(&events), ["tool_calls"]);
}

#[tokio::test]
async fn the_model_is_told_to_wrap_up_at_eighty_percent() {
    let unlimited = budget_run(control::BudgetLimits {
        max_turns: Some(10),
        ..Default::default()
    })
    .await;
    assert_eq!(unlimited.provider.requests.lock().unwrap().len(), 4);
    let turn_outputs: Vec<u64> = turn_usages(&unlimited.events().await)
        .iter()
        .map(|usage| usage.output_tokens)
        .collect();
    // Turn 1 uses exactly 80% of this limit.
    let limit = turn_outputs[0] * 5 / 4;
    assert_eq!(
        limit * 4 / 5,
        turn_outputs[0],
        "pick a turn-1 size divisible by 4"
    );
    let harness = budget_run(control::BudgetLimits {
        max_turns: Some(10),
        max_output_tokens: Some(limit),
        ..Default::default()
    })
    .await;
    let requests = harness.provider.requests.lock().unwrap().clone();
    let notice = requests[1].messages.last().unwrap();
    assert_eq!(
        notice,
        &Message::User {
            text: format!(
                "[harness] Budget notice: {} of {limit} output tokens used (output_tokens). Wrap \
                 up now: finish the task with what you have, or summarise your progress and \
                 what remains. The session stops when the budget runs out.",
                turn_outputs[0]
            )
        }
    );
    let finished = finished_event(&harness.events().await);
    assert_eq!(finished.stop_reason(), control::StopReason::BudgetExhausted);
}

fn turn_usages(events: &[control::SessionEvent]) -> Vec<control::TurnUsage> {
    events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::TurnCompleted(turn)) => turn.usage,
            _ => None,
        })
        .collect()
}

fn turn_requests(events: &[control::SessionEvent]) -> Vec<control::ModelRequest> {
    events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::TurnCompleted(turn)) => turn.request.clone(),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_request_estimated_over_the_input_budget_is_never_sent() {
    let unlimited = budget_run(control::BudgetLimits {
        max_turns: Some(10),
        ..Default::default()
    })
    .await;
    let events = unlimited.events().await;
    let measured_first = turn_usages(&events)[0].input_tokens;
    let second_estimate = turn_requests(&events)[1].estimated_input_tokens;
    // Room for the first request and all but one token of the second.
    let limit = measured_first + second_estimate - 1;
    let harness = budget_run(control::BudgetLimits {
        max_turns: Some(10),
        max_input_tokens: Some(limit),
        ..Default::default()
    })
    .await;
    assert_eq!(harness.provider.requests.lock().unwrap().len(), 1);
    let finished = finished_event(&harness.events().await);
    assert_eq!(
        (
            finished.stop_reason(),
            finished.final_output.as_str(),
            finished.message
        ),
        (
            control::StopReason::BudgetExhausted,
            "Step one.",
            format!(
                "the next model request was not sent: its estimated {second_estimate} input \
                 tokens would bring the input_tokens budget to {} of {limit} input tokens",
                limit + 1
            )
        )
    );
    // Turn 1's call ran: the budget still had room after it.
    assert_eq!(harness.sandbox.executions(), 1);
}

#[tokio::test]
async fn the_turn_budget_stops_with_max_turns() {
    let harness = budget_run(control::BudgetLimits {
        max_turns: Some(1),
        ..Default::default()
    })
    .await;
    let finished = finished_event(&harness.events().await);
    assert_eq!(
        (finished.stop_reason(), finished.final_output.as_str()),
        (control::StopReason::MaxTurns, "Step one.")
    );
}

#[tokio::test]
async fn token_and_cost_budgets_stop_the_session_with_the_partial_answer() {
    let unlimited = budget_run(control::BudgetLimits {
        max_turns: Some(10),
        ..Default::default()
    })
    .await;
    let turns: Vec<control::TurnUsage> = unlimited
        .events()
        .await
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::TurnCompleted(turn)) => turn.usage,
            _ => None,
        })
        .collect();
    assert_eq!(turns.len(), 4);
    let first = turns[0];
    assert_eq!(
        first.cost_micros,
        first.input_tokens * 1000 + first.output_tokens * 2000
    );
    let cases = [(
        "output_tokens",
        control::BudgetLimits {
            max_output_tokens: Some(first.output_tokens),
            ..Default::default()
        },
    )];
    for (name, limits) in cases {
        let harness = budget_run(control::BudgetLimits {
            max_turns: Some(10),
            ..limits
        })
        .await;
        let events = harness.events().await;
        let finished = finished_event(&events);
        assert_eq!(
            (finished.stop_reason(), finished.final_output.as_str()),
            (control::StopReason::BudgetExhausted, "Step one."),
            "{name}"
        );
        assert!(
            finished
                .message
                .starts_with(&format!("the {name} budget is used up")),
            "{name}: {}",
            finished.message
        );
        // The budget ran out with turn 1's model call, so its tool call did not run.
        assert_eq!(harness.sandbox.executions(), 0, "{name}");
        assert_eq!(warnings(&events), [name], "{name}");
    }
}

#[tokio::test]
async fn a_first_request_priced_over_the_cost_budget_is_never_sent() {
    let unlimited = budget_run(control::BudgetLimits {
        max_turns: Some(10),
        ..Default::default()
    })
    .await;
    let events = unlimited.events().await;
    let first_cost = turn_usages(&events)[0].cost_micros;
    let first_estimate = turn_requests(&events)[0].estimated_input_tokens;
    // Priced as uncached input at 1000 micro-dollars per token.
    let estimated_cost = first_estimate * 1000;
    assert!(
        estimated_cost > first_cost,
        "the test needs a first estimate ({first_estimate} tokens) priced over the first turn's cost ({first_cost})"
    );
    let harness = budget_run(control::BudgetLimits {
        max_turns: Some(10),
        max_cost_micros: Some(first_cost),
        ..Default::default()
    })
    .await;
    assert_eq!(harness.provider.requests.lock().unwrap().len(), 0);
    let finished = finished_event(&harness.events().await);
    assert_eq!(
        (finished.stop_reason(), finished.message),
        (
            control::StopReason::BudgetExhausted,
            format!(
                "the next model request was not sent: its estimated {first_estimate} input \
                 tokens would bring the cost budget to {estimated_cost} of {first_cost} \
                 micro-dollars"
            )
        )
    );
}

#[tokio::test]
async fn the_wall_clock_budget_stops_a_session_mid_tool_call() {
    let sandbox = FakeSandbox::new(&["fast"]).with("fast", Behaviour::Hang);
    let harness = Harness::new(LOOPING_SCRIPT, &["fast"], sandbox).await;
    harness
        .run_with(control::BudgetLimits {
            max_turns: Some(10),
            max_wall_clock: Some(harness_proto::duration_to_proto(Duration::from_millis(300))),
            ..Default::default()
        })
        .await;
    let summary = harness.summary().await;
    assert_eq!(
        summary[summary.len() - 2],
        "7 t1 finished call_1_0 TOOL_ERROR_KIND_INTERRUPTED the session ended before this call finished; its side effects may or may not have happened"
    );
    let finished = finished_event(&harness.events().await);
    assert_eq!(
        (finished.stop_reason(), finished.final_output.as_str()),
        (control::StopReason::BudgetExhausted, "Step one.")
    );
    assert!(
        finished
            .message
            .starts_with("the wall_clock budget is used up"),
        "{}",
        finished.message
    );
    drop(harness.shutdown);
}
