//! Harness tools: offered in order, recorded as harness steps, replayed not re-run.

use super::*;

/// A harness tool for the tests: notes what it is told, counting its runs.
#[derive(Debug, Default)]
struct NoteTool {
    runs: AtomicUsize,
}

impl crate::agent_loop::executor::HarnessTool for NoteTool {
    fn name(&self) -> &str {
        "note"
    }

    fn description(&self) -> &str {
        "Notes a line."
    }

    fn input_schema_json(&self) -> &str {
        r#"{"type":"object","required":["line"]}"#
    }

    fn call(
        &self,
        call: control::HarnessToolCall,
    ) -> BoxFuture<
        'static,
        Result<
            crate::agent_loop::executor::HarnessOutput,
            crate::agent_loop::executor::HarnessCallError,
        >,
    > {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let input: serde_json::Value = serde_json::from_str(&call.input_json).unwrap();
            let output =
                serde_json::json!({"noted": input["line"], "invocation": call.invocation_id});
            Ok(crate::agent_loop::executor::HarnessOutput::json(
                output.to_string(),
            ))
        })
    }
}

const NOTE_SCRIPT: &str = r#"
    [[turn]]
    text = "Noting."
    [[turn.tool-calls]]
    tool = "note"
    arguments = { line = "hello" }
    [[turn.tool-calls]]
    tool = "fast"
    arguments = { n = 1 }

    [[turn]]
    text = "Noted."
"#;

async fn note_harness() -> (Harness, Arc<NoteTool>) {
    let mut harness =
        Harness::new(NOTE_SCRIPT, &["fast", "note"], FakeSandbox::new(&["fast"])).await;
    let tool = Arc::new(NoteTool::default());
    harness.harness_tools.register(tool.clone()).unwrap();
    (harness, tool)
}

#[tokio::test]
async fn a_harness_tool_is_offered_in_the_agents_order_and_its_call_recorded_as_a_harness_step() {
    let (harness, tool) = note_harness().await;
    harness.run(5, 2).await;
    assert_eq!(
        harness.summary().await,
        [
            "1 t0 started",
            "2 t1 text \"Noting.\"",
            "3 t1 requested call_1_0 note",
            "4 t1 requested call_1_1 fast",
            "5 t1 policy call_1_0 VERDICT_ALLOW default",
            "6 t1 policy call_1_1 VERDICT_ALLOW default",
            "7 t1 started s1:call_1_0",
            "8 t1 started s1:call_1_1",
            "9 t1 finished call_1_0 ok {\"invocation\":\"s1:call_1_0\",\"noted\":\"hello\"}",
            "10 t1 output call_1_1 stderr",
            "11 t1 finished call_1_1 ok {}",
            "12 t1 turn 1 tool_use",
            "13 t2 text \"Noted.\"",
            "14 t2 turn 2 end_turn",
            "15 t2 end STOP_REASON_COMPLETED \"Noted.\" \"\"",
        ]
    );
    assert_eq!(tool.runs.load(Ordering::SeqCst), 1);
    // sandboxd saw only its own tool.
    assert_eq!(
        harness
            .sandbox
            .calls()
            .into_iter()
            .filter(|call| call.starts_with("invoke"))
            .collect::<Vec<_>>(),
        ["invoke s1:call_1_1 fast"]
    );
    let offered: Vec<(String, String)> = harness.provider.requests.lock().unwrap()[0]
        .tools
        .iter()
        .map(|tool| (tool.name.clone(), tool.description.clone()))
        .collect();
    assert_eq!(
        offered,
        [
            ("fast".to_owned(), "the fast tool".to_owned()),
            ("note".to_owned(), "Notes a line.".to_owned())
        ]
    );
    let steps = harness
        .store
        .read_steps(SessionId::new("s1"))
        .await
        .unwrap();
    let step = steps
        .iter()
        .find(|step| step.step == "harness:call_1_0")
        .unwrap();
    assert_eq!(
        control::HarnessToolCall::decode(step.payload.as_slice()).unwrap(),
        control::HarnessToolCall {
            invocation_id: "s1:call_1_0".to_owned(),
            tool: "note".to_owned(),
            input_json: r#"{"line":"hello"}"#.to_owned(),
            delegation: None,
        }
    );
    assert!(steps.iter().any(|step| step.step == "invoke:call_1_1"));
}

#[tokio::test]
async fn a_finished_harness_call_is_replayed_after_a_restart_not_run_again() {
    let (reference, _) = note_harness().await;
    reference.run(5, 2).await;
    let expected = reference.summary().await;
    // Event 9 is the harness call's result.
    for crash_after in 9..expected.len() as u64 {
        let (harness, tool) = note_harness().await;
        harness.create_session(5).await;
        harness.run_and_crash_after(crash_after).await;
        assert_eq!(tool.runs.load(Ordering::SeqCst), 1);
        harness.resume().await;
        assert_eq!(
            harness.summary().await,
            expected,
            "crash after {crash_after}"
        );
        assert_eq!(
            tool.runs.load(Ordering::SeqCst),
            1,
            "run once (crash after {crash_after})"
        );
    }
}

#[test]
fn harness_tool_names_are_unique_in_a_registry() {
    let mut registry = HarnessRegistry::default();
    registry.register(Arc::new(NoteTool::default())).unwrap();
    assert_eq!(
        registry
            .register(Arc::new(NoteTool::default()))
            .unwrap_err()
            .to_string(),
        "harness tool \"note\" is registered twice"
    );
    assert_eq!(registry.names().collect::<Vec<_>>(), ["note"]);
}
