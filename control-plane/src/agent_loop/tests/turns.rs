//! Turns and tool calls: parallel dispatch, results in call order, argument
//! validation, stop reasons, call ids, sandboxd failures, cancellation.

use super::*;

const PARALLEL_SCRIPT: &str = r#"
    [[turn]]
    text = "Three things."
    [[turn.tool-calls]]
    tool = "slow"
    [[turn.tool-calls]]
    tool = "exec"
    [[turn.tool-calls]]
    tool = "fast"
    [[turn.tool-calls]]
    tool = "fast"

    [[turn]]
    text = "Done."
"#;

#[tokio::test]
async fn parallel_tool_calls_are_bounded_and_recorded_in_call_order() {
    let sandbox = FakeSandbox::new(&["slow", "fast", "exec"]).with(
        "slow",
        Behaviour::Ok {
            output_json: r#"{"slow":true}"#,
            delay: Duration::from_millis(100),
        },
    );
    let harness = Harness::new(PARALLEL_SCRIPT, &["slow", "fast"], sandbox).await;
    harness.run(5, 2).await;
    let denial = "tool \"exec\" is not available to agent \"tester\"; its tools are: slow, fast";
    assert_eq!(
        harness.summary().await,
        [
            "1 t0 started".to_owned(),
            "2 t1 text \"Three \"".to_owned(),
            "3 t1 text \"things.\"".to_owned(),
            "4 t1 requested call_1_0 slow".to_owned(),
            "5 t1 requested call_1_1 exec".to_owned(),
            "6 t1 requested call_1_2 fast".to_owned(),
            "7 t1 requested call_1_3 fast".to_owned(),
            "8 t1 policy call_1_0 VERDICT_ALLOW default".to_owned(),
            "9 t1 policy call_1_1 VERDICT_DENY agent.tools".to_owned(),
            "10 t1 policy call_1_2 VERDICT_ALLOW default".to_owned(),
            "11 t1 policy call_1_3 VERDICT_ALLOW default".to_owned(),
            "12 t1 started s1:call_1_0".to_owned(),
            "13 t1 started s1:call_1_2".to_owned(),
            "14 t1 started s1:call_1_3".to_owned(),
            "15 t1 output call_1_0 stderr".to_owned(),
            "16 t1 finished call_1_0 ok {\"slow\":true}".to_owned(),
            format!("17 t1 finished call_1_1 TOOL_ERROR_KIND_DENIED {denial}"),
            "18 t1 output call_1_2 stderr".to_owned(),
            "19 t1 finished call_1_2 ok {}".to_owned(),
            "20 t1 output call_1_3 stderr".to_owned(),
            "21 t1 finished call_1_3 ok {}".to_owned(),
            "22 t1 turn 1 tool_use".to_owned(),
            "23 t2 text \"Done.\"".to_owned(),
            "24 t2 turn 2 end_turn".to_owned(),
            "25 t2 end STOP_REASON_COMPLETED \"Done.\" \"\"".to_owned(),
        ]
    );
    assert_eq!(harness.sandbox.max_running.load(Ordering::SeqCst), 2);
    let calls = harness.sandbox.calls();
    assert_eq!(calls.first().unwrap(), "create label=s1");
    assert_eq!(calls.last().unwrap(), "destroy sb-1");
    assert_eq!(harness.sandbox.executions(), 3);
}

#[tokio::test]
async fn tool_results_and_errors_reach_the_model_in_call_order() {
    let invalid = sandbox::ToolError {
        kind: sandbox::ErrorKind::InvalidInput.into(),
        message: "input does not match the schema".to_owned(),
        violations: vec![sandbox::SchemaViolation {
            instance_path: "/path".to_owned(),
            message: "123 is not of type \"string\"".to_owned(),
        }],
    };
    let sandbox =
        FakeSandbox::new(&["slow", "fast", "exec"]).with("slow", Behaviour::ToolError(invalid));
    let harness = Harness::new(PARALLEL_SCRIPT, &["slow", "fast"], sandbox).await;
    harness.run(5, 4).await;
    let requests = harness.provider.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2);
    let tool_names: Vec<&str> = requests[0].tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(tool_names, ["slow", "fast"]);
    let second = &requests[1].messages;
    assert_eq!(
        second[..2],
        [
            Message::System {
                text: "Be brief.".to_owned()
            },
            Message::User {
                text: "go".to_owned()
            }
        ]
    );
    let results: Vec<(&str, &str, bool)> = second[3..]
        .iter()
        .map(|message| match message {
            Message::ToolResult {
                call_id,
                content,
                is_error,
                ..
            } => (call_id.as_str(), content.as_str(), *is_error),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        results,
        [
            (
                "call_1_0",
                "invalid_input: input does not match the schema; at /path: 123 is not of type \"string\"",
                true
            ),
            (
                "call_1_1",
                "denied: tool \"exec\" is not available to agent \"tester\"; its tools are: slow, fast",
                true
            ),
            ("call_1_2", "{}", false),
            ("call_1_3", "{}", false),
        ]
    );
}

#[tokio::test]
async fn arguments_are_validated_before_dispatch_and_bad_ones_never_reach_sandboxd() {
    let script = r#"
        [[turn]]
        text = "Reading."
        [[turn.tool-calls]]
        tool = "read"
        arguments = { path = 42 }
        [[turn.tool-calls]]
        tool = "read"
        arguments = { path = "a.txt" }

        [[turn]]
        text = "Done."
    "#;
    let schema = r#"{"type":"object","required":["path"],"properties":{"path":{"type":"string"}}}"#;
    let sandbox = FakeSandbox::new(&["read"]).with_schema("read", schema);
    let harness = Harness::new(script, &["read"], sandbox).await;
    harness.run(5, 2).await;
    assert_eq!(
        harness.summary().await[2..9],
        [
            "3 t1 requested call_1_0 read",
            "4 t1 requested call_1_1 read",
            "5 t1 policy call_1_1 VERDICT_ALLOW default",
            "6 t1 started s1:call_1_1",
            "7 t1 finished call_1_0 TOOL_ERROR_KIND_INVALID_INPUT the arguments do not match the input schema of \"read\": at /path: 42 is not of type \"string\"",
            "8 t1 output call_1_1 stderr",
            "9 t1 finished call_1_1 ok {}",
        ]
    );
    assert_eq!(harness.sandbox.executions(), 1);
}

#[tokio::test]
async fn malformed_argument_json_is_an_error_result_and_the_session_goes_on() {
    let provider = FixedTurns(vec![
        CompletedTurn {
            text: "Trying.".to_owned(),
            tool_calls: vec![ToolCall {
                call_id: "c1".to_owned(),
                tool: "read".to_owned(),
                arguments_json: r#"{"path": "a"#.to_owned(),
            }],
            usage: TokenUsage::default(),
            stop_reason: "tool_use".to_owned(),
        },
        CompletedTurn {
            text: "Sorry.".to_owned(),
            tool_calls: Vec::new(),
            usage: TokenUsage::default(),
            stop_reason: "end_turn".to_owned(),
        },
    ]);
    let harness = Harness::with(
        Arc::new(provider),
        definition(&["read"]),
        FakeSandbox::new(&["read"]),
    )
    .await;
    harness.run(5, 1).await;
    let summary = harness.summary().await;
    assert!(
        summary[2].starts_with("3 t1 finished c1 TOOL_ERROR_KIND_INVALID_INPUT the arguments are not valid JSON (EOF while parsing"),
        "{summary:?}"
    );
    assert_eq!(
        summary.last().unwrap(),
        "6 t2 end STOP_REASON_COMPLETED \"Sorry.\" \"\""
    );
    assert_eq!(harness.sandbox.executions(), 0);
}

#[tokio::test]
async fn pause_turn_continues_and_max_tokens_ends_with_a_note() {
    let turn = |text: &str, stop: &str| CompletedTurn {
        text: text.to_owned(),
        tool_calls: Vec::new(),
        usage: TokenUsage::default(),
        stop_reason: stop.to_owned(),
    };
    let provider = FixedTurns(vec![
        turn("Thinking…", STOP_PAUSE_TURN),
        turn("The answer is cut", STOP_MAX_TOKENS),
    ]);
    let harness = Harness::with(Arc::new(provider), definition(&[]), FakeSandbox::new(&[])).await;
    harness.run(5, 1).await;
    assert_eq!(
        harness.summary().await,
        [
            "1 t0 started",
            "2 t1 turn 1 pause_turn",
            "3 t2 turn 2 max_tokens",
            "4 t2 end STOP_REASON_COMPLETED \"The answer is cut\" \"the last reply was cut off at the model's output-token limit\"",
        ]
    );
}

#[tokio::test]
async fn repeated_or_missing_call_ids_are_made_unique() {
    let call = |id: &str| ToolCall {
        call_id: id.to_owned(),
        tool: "read".to_owned(),
        arguments_json: "{}".to_owned(),
    };
    let turn = |calls: Vec<ToolCall>| CompletedTurn {
        text: String::new(),
        tool_calls: calls,
        usage: TokenUsage::default(),
        stop_reason: "tool_use".to_owned(),
    };
    let provider = FixedTurns(vec![
        turn(vec![call("x"), call("x"), call("")]),
        turn(vec![call("x")]),
        turn(Vec::new()),
    ]);
    let harness = Harness::with(
        Arc::new(provider),
        definition(&["read"]),
        FakeSandbox::new(&["read"]),
    )
    .await;
    harness.run(5, 1).await;
    let requested: Vec<String> = harness
        .events()
        .await
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::ToolCallRequested(call)) => Some(call.call_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(requested, ["x", "call_1_1", "call_1_2", "call_2_0"]);
    assert_eq!(harness.sandbox.executions(), 4);
}

#[tokio::test]
async fn exhausted_script_ends_the_session_with_an_error_and_destroys_the_sandbox() {
    let script = "[[turn]]\ntext = \"Once.\"\n[[turn.tool-calls]]\ntool = \"fast\"\n";
    let harness = Harness::new(script, &["fast"], FakeSandbox::new(&["fast"])).await;
    harness.run(5, 1).await;
    assert_eq!(
        harness.last().await,
        "9 t2 end STOP_REASON_ERROR \"Once.\" \"model provider failed: script exhausted after 1 turns (test.script.toml)\""
    );
    assert_eq!(harness.sandbox.calls().last().unwrap(), "destroy sb-1");
}

#[tokio::test]
async fn turn_limit_stops_with_max_turns_and_the_partial_answer() {
    let script = "[[turn]]\ntext = \"One.\"\n[[turn.tool-calls]]\ntool = \"fast\"\n\
                  [[turn]]\ntext = \"Two.\"\n[[turn.tool-calls]]\ntool = \"fast\"\n\
                  [[turn]]\ntext = \"Three.\"\n";
    let harness = Harness::new(script, &["fast"], FakeSandbox::new(&["fast"])).await;
    harness.run(2, 1).await;
    let summary = harness.summary().await;
    assert_eq!(
        summary[summary.len() - 2..],
        [
            "16 t2 warning turns 2/2",
            "17 t2 end STOP_REASON_MAX_TURNS \"Two.\" \"stopped after 2 turns\"",
        ]
    );
    let record = harness.session().await;
    assert_eq!(
        (
            record.status,
            record.stop_reason,
            record.usage.turns,
            record.usage.tool_calls
        ),
        (
            control::SessionStatus::Finished,
            control::StopReason::MaxTurns,
            2,
            2
        )
    );
}

#[tokio::test]
async fn a_tool_sandboxd_lacks_fails_the_session_before_the_first_turn() {
    let harness = Harness::new(
        "[[turn]]\ntext = \"x\"\n",
        &["fast", "exec"],
        FakeSandbox::new(&["fast"]),
    )
    .await;
    harness.run(5, 1).await;
    assert_eq!(
        harness.summary().await,
        [
            "1 t0 started",
            "2 t0 end STOP_REASON_ERROR \"\" \"agent tool \\\"exec\\\" is not offered by sandboxd (it has: fast)\"",
        ]
    );
    // No sandbox session is made for an agent that cannot run.
    assert!(harness.sandbox.calls().is_empty());
    assert!(harness.provider.requests.lock().unwrap().is_empty());
}

#[tokio::test]
async fn unreachable_sandboxd_is_retried_then_fails_the_call_and_the_session() {
    let script = "[[turn]]\ntext = \"Try.\"\n[[turn.tool-calls]]\ntool = \"fast\"\n\
                  [[turn.tool-calls]]\ntool = \"fast\"\n";
    let sandbox = FakeSandbox::new(&["fast"]).with("fast", Behaviour::Unreachable);
    let harness = Harness::new(script, &["fast"], sandbox).await;
    harness.run(5, 1).await;
    let summary = harness.summary().await;
    assert_eq!(
        summary[8..],
        [
            "9 t1 finished call_1_0 TOOL_ERROR_KIND_INTERNAL could not reach sandboxd: sandboxd Invoke failed (Unavailable): connection refused",
            "10 t1 finished call_1_1 TOOL_ERROR_KIND_INTERRUPTED the session ended before this call finished; its side effects may or may not have happened",
            "11 t1 end STOP_REASON_ERROR \"Try.\" \"tool call call_1_0 could not be dispatched: sandboxd Invoke failed (Unavailable): connection refused\"",
        ]
    );
    let attempts = harness
        .sandbox
        .calls()
        .iter()
        .filter(|call| call.starts_with("invoke s1:call_1_0"))
        .count();
    assert_eq!(attempts, 2);
}

#[tokio::test]
async fn cancelling_interrupts_running_calls_and_records_why() {
    let script = "[[turn]]\ntext = \"Wait.\"\n[[turn.tool-calls]]\ntool = \"stuck\"\n";
    let sandbox = FakeSandbox::new(&["stuck"]).with("stuck", Behaviour::Hang);
    let harness = Harness::new(script, &["stuck"], sandbox).await;
    let session = harness.create_session(5).await;
    let (cancel, cancel_signal) = watch::channel(None);
    let agent_loop = harness.agent_loop(1);
    let run = agent_loop.run(session, harness.agent.clone(), cancel_signal);
    let canceller = async {
        while !harness
            .sandbox
            .calls()
            .iter()
            .any(|c| c.starts_with("invoke"))
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        cancel.send_replace(Some("user pressed stop".to_owned()));
    };
    tokio::time::timeout(
        Duration::from_secs(10),
        futures::future::join(run, canceller),
    )
    .await
    .unwrap();
    let summary = harness.summary().await;
    assert_eq!(
        summary[summary.len() - 2..],
        [
            "6 t1 finished call_1_0 TOOL_ERROR_KIND_INTERRUPTED the session ended before this call finished; its side effects may or may not have happened",
            "7 t1 end STOP_REASON_CANCELLED \"Wait.\" \"user pressed stop\"",
        ]
    );
    assert_eq!(harness.sandbox.calls().last().unwrap(), "destroy sb-1");
}

#[tokio::test]
async fn a_recorded_cancellation_survives_a_restart() {
    let script = "[[turn]]\ntext = \"x\"\n";
    let harness = Harness::new(script, &[], FakeSandbox::new(&[])).await;
    harness.create_session(5).await;
    harness
        .store
        .request_cancel(SessionId::new("s1"), "stop it".to_owned())
        .await
        .unwrap();
    harness.resume().await;
    assert_eq!(
        harness.summary().await,
        [
            "1 t0 started",
            "2 t0 end STOP_REASON_CANCELLED \"\" \"stop it\""
        ]
    );
}
