//! Crash and resume: replay from the log without re-running tools, in-flight
//! calls re-sent, lost sandbox sessions; a panicking loop; replay from the
//! resolved agent after its file changed.

use super::*;

const STEPS_SCRIPT: &str = r#"
    [[turn]]
    text = "First a single step."
    [[turn.tool-calls]]
    tool = "fast"
    arguments = { n = 1 }

    [[turn]]
    text = "Now two at once."
    [[turn.tool-calls]]
    tool = "fast"
    arguments = { n = 2 }
    [[turn.tool-calls]]
    tool = "slow"
    arguments = { n = 3 }

    [[turn]]
    text = "And a last one."
    [[turn.tool-calls]]
    tool = "fast"
    arguments = { n = 4 }

    [[turn]]
    text = "All four done."
"#;

fn steps_sandbox() -> FakeSandbox {
    FakeSandbox::new(&["fast", "slow"]).with(
        "slow",
        Behaviour::Ok {
            output_json: r#"{"slow":true}"#,
            delay: Duration::from_millis(20),
        },
    )
}

const WRITES_SCRIPT: &str = r#"
    [[turn]]
    text = "Writing."
    [[turn.tool-calls]]
    tool = "write_file"
    arguments = { path = "/notes/a.md", content = "a" }
    [[turn.tool-calls]]
    tool = "broken_write"
    arguments = { path = "b.md" }
    [[turn.tool-calls]]
    tool = "fast"

    [[turn]]
    text = "Again."
    [[turn.tool-calls]]
    tool = "write_file"
    arguments = { path = "c.md", content = "c" }

    [[turn]]
    text = "I wrote notes/a.md and c.md."
"#;

#[tokio::test]
async fn the_receipt_a_loop_hands_over_is_the_one_its_log_folds_to_after_any_crash() {
    let sandbox = || {
        FakeSandbox::new(&["write_file", "broken_write", "fast"]).with(
            "broken_write",
            Behaviour::ToolError(sandbox::ToolError {
                kind: sandbox::ErrorKind::Failed.into(),
                message: "disk full".to_owned(),
                ..Default::default()
            }),
        )
    };
    let tools = ["write_file", "broken_write", "fast"];
    let reference = Harness::new(WRITES_SCRIPT, &tools, sandbox()).await;
    let handed_over = reference
        .run(10, 2)
        .await
        .expect("a finished run hands over its receipt");
    assert_eq!(handed_over, reference.receipt_from_log().await);
    assert_eq!(handed_over.written_paths(), ["notes/a.md", "c.md"]);
    let events = reference.events().await.len() as u64;
    for crash_after in 1..events {
        let harness = Harness::new(WRITES_SCRIPT, &tools, sandbox()).await;
        harness.create_session(10).await;
        harness.run_and_crash_after(crash_after).await;
        let resumed = harness.resume().await;
        assert_eq!(
            resumed,
            Some(harness.receipt_from_log().await),
            "crash after event {crash_after}"
        );
        // The wall clock is the one figure a second run cannot repeat.
        let without_wall_clock = |receipt: &ReceiptBuilder| {
            let mut receipt = receipt.clone();
            receipt.clear_wall_clock();
            receipt
        };
        assert_eq!(
            resumed.as_ref().map(without_wall_clock),
            Some(without_wall_clock(&handed_over)),
            "crash after event {crash_after}"
        );
    }
}

#[tokio::test]
async fn a_session_crashed_after_any_event_resumes_to_the_same_log_without_rerunning_tools() {
    let reference = Harness::new(STEPS_SCRIPT, &["fast", "slow"], steps_sandbox()).await;
    reference.run(10, 2).await;
    let expected = reference.summary().await;
    let model_calls = reference.provider.requests.lock().unwrap().len();
    assert_eq!(model_calls, 4);
    assert_eq!(reference.sandbox.executions(), 4);
    // Crash after every event but the last, resume, and compare.
    for crash_after in 1..expected.len() as u64 {
        let harness = Harness::new(STEPS_SCRIPT, &["fast", "slow"], steps_sandbox()).await;
        harness.create_session(10).await;
        harness.run_and_crash_after(crash_after).await;
        harness.resume().await;
        assert_eq!(
            harness.summary().await,
            expected,
            "crash after event {crash_after}"
        );
        assert_eq!(
            harness.sandbox.executions(),
            4,
            "tools executed once each (crash after event {crash_after})"
        );
        // A model turn is asked again only if the crash came before it was recorded.
        let requests = harness.provider.requests.lock().unwrap().len();
        assert!(
            requests <= model_calls + 1,
            "at most one model call repeated, got {requests} (crash after {crash_after})"
        );
    }
}

#[tokio::test]
async fn a_call_in_flight_at_a_restart_is_resent_with_its_invocation_id_and_replayed() {
    let harness = Harness::new(STEPS_SCRIPT, &["fast", "slow"], steps_sandbox()).await;
    harness.create_session(10).await;
    // Event 6 is call_1_0's tool_started (written with the turn's first batch).
    harness.run_and_crash_after(6).await;
    let summary = harness.summary().await;
    assert_eq!(summary.last().unwrap(), "6 t1 started s1:call_1_0");
    harness.resume().await;
    let invocations: Vec<String> = harness
        .sandbox
        .calls()
        .into_iter()
        .filter(|call| call.starts_with("invoke s1:call_1_0"))
        .collect();
    // The "dead" process never sent it, the resumed one did, once.
    assert_eq!(invocations, ["invoke s1:call_1_0 fast"]);
    assert_eq!(harness.sandbox.executions(), 4);
}

#[tokio::test]
async fn a_result_lost_in_a_crash_is_replayed_by_sandboxd_not_run_again() {
    let harness = Harness::new(STEPS_SCRIPT, &["fast", "slow"], steps_sandbox()).await;
    harness.create_session(10).await;
    // Events 18-19 are call_2_0's output and result: it ran in sandboxd, and
    // the process dies before writing them (call_2_1 is still running then).
    harness.run_and_crash_before(18).await;
    assert_eq!(
        harness.summary().await.last().unwrap(),
        "17 t2 started s1:call_2_1"
    );
    assert_eq!(harness.sandbox.executions(), 2, "call_1_0 and call_2_0 ran");
    harness.resume().await;
    assert_eq!(harness.sandbox.executions(), 4);
    let sent: Vec<String> = harness
        .sandbox
        .calls()
        .into_iter()
        .filter(|call| call.starts_with("invoke s1:call_2_"))
        .collect();
    assert_eq!(
        sent,
        [
            "invoke s1:call_2_0 fast",
            "invoke s1:call_2_1 slow",
            "invoke s1:call_2_0 fast",
            "invoke s1:call_2_1 slow",
        ],
        "each call of turn 2 was sent again after the restart"
    );
    let summary = harness.summary().await;
    // sandboxd replays the result (not the output chunks) of call_2_0.
    assert_eq!(
        summary[17..20],
        [
            "18 t2 finished call_2_0 ok {}",
            "19 t2 output call_2_1 stderr",
            "20 t2 finished call_2_1 ok {\"slow\":true}"
        ]
    );
    assert_eq!(
        summary.last().unwrap(),
        "34 t4 end STOP_REASON_COMPLETED \"All four done.\" \"\""
    );
}

#[tokio::test]
async fn a_lost_sandbox_session_gives_the_model_an_interrupted_result() {
    let script = "[[turn]]\ntext = \"Do it.\"\n[[turn.tool-calls]]\ntool = \"gone\"\n\
                  [[turn]]\ntext = \"I will check.\"\n";
    let harness = Harness::new(script, &["gone"], FakeSandbox::new(&["gone"])).await;
    harness.create_session(5).await;
    harness.run_and_crash_after(6).await;
    assert_eq!(
        harness.summary().await.last().unwrap(),
        "6 t1 started s1:call_1_0"
    );
    // sandboxd restarted meanwhile: the sandbox session is unknown.
    let gone = FakeSandbox::new(&["gone"]).with("gone", Behaviour::SessionGone);
    let harness = Harness {
        sandbox: Arc::new(gone),
        ..harness
    };
    harness.resume().await;
    let summary = harness.summary().await;
    assert_eq!(
        summary[6],
        "7 t1 finished call_1_0 TOOL_ERROR_KIND_INTERRUPTED the control plane restarted while this call ran, and its sandbox session is gone (no sandbox session sb-1), so its outcome is unknown: its side effects may or may not have happened; verify before relying on them or retrying. Later calls run in a new, empty sandbox session."
    );
    assert_eq!(
        summary.last().unwrap(),
        "13 t2 end STOP_REASON_COMPLETED \"I will check.\" \"\""
    );
}

#[tokio::test]
async fn text_recorded_before_a_crash_mid_stream_is_not_recorded_twice() {
    let harness = Harness::new(STEPS_SCRIPT, &["fast", "slow"], steps_sandbox()).await;
    harness.create_session(10).await;
    let store = harness.store.clone();
    // Pretend the first attempt streamed part of turn 1 and then died.
    store
        .append_events(
            SessionId::new("s1"),
            vec![
                NewEvent::new(0, Kind::Started(control::SessionStarted::default())),
                NewEvent::new(
                    1,
                    Kind::TextDelta(control::ModelTextDelta {
                        text: "First a sin".to_owned(),
                    }),
                ),
            ],
            Vec::new(),
        )
        .await
        .unwrap();
    store
        .set_sandbox_session(SessionId::new("s1"), "sb-1".to_owned())
        .await
        .unwrap();
    harness.resume().await;
    let texts: Vec<String> = harness
        .events()
        .await
        .iter()
        .filter(|event| event.turn == 1)
        .filter_map(|event| match &event.kind {
            Some(Kind::TextDelta(delta)) => Some(delta.text.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(texts.concat(), "First a single step.");
    assert_eq!(texts[0], "First a sin");
}

/// A provider whose every call panics: a bug in a loop's dependency.
#[derive(Debug)]
struct PanickingProvider;

impl ModelProvider for PanickingProvider {
    fn stream_turn(&self, _request: ModelRequest) -> ModelStream {
        panic!("the test provider panics on purpose");
    }
}

#[tokio::test]
async fn a_panicking_loop_leaves_the_running_map_and_finishes_with_an_error() {
    let harness = Harness::with(
        Arc::new(PanickingProvider),
        definition(&["fast"]),
        FakeSandbox::new(&["fast"]),
    )
    .await;
    let session = harness.create_session(5).await;
    let supervisor = crate::supervisor::SessionSupervisor::new(Arc::new(harness.agent_loop(1)));
    supervisor.launch(session, harness.agent.clone());
    assert!(supervisor.is_running(&SessionId::new("s1")));
    tokio::time::timeout(Duration::from_secs(10), async {
        while supervisor.is_running(&SessionId::new("s1")) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the panicked session leaves the running map");
    assert_eq!(
        harness.summary().await,
        [
            "1 t0 started",
            "2 t0 end STOP_REASON_ERROR \"\" \"session loop panicked: the test provider panics on purpose\"",
        ]
    );
    assert_eq!(
        harness.session().await.status,
        control::SessionStatus::Finished
    );
    assert_eq!(harness.sandbox.calls(), ["create label=s1", "destroy sb-1"]);
}

/// The steps agent, and the same file edited: another prompt, model, token
/// cap, tool order, policy and sandbox memory.
fn original_and_edited() -> (AgentDefinition, AgentDefinition) {
    let mut original = definition(&["fast", "slow"]);
    original.max_tokens_per_turn = Some(512);
    original.sandbox.memory_bytes = 1 << 20;
    let mut edited = definition(&["slow", "fast"]);
    edited.system_prompt = "Be verbose.".to_owned();
    edited.model = "another-model".to_owned();
    edited.max_tokens_per_turn = Some(64);
    edited.sandbox.memory_bytes = 2 << 20;
    edited.policy = toml::from_str("default = \"deny\"").unwrap();
    (original, edited)
}

#[tokio::test]
async fn a_resumed_session_sends_the_requests_of_its_original_agent_after_the_file_changed() {
    let (original, edited) = original_and_edited();
    let provider = || -> Arc<dyn ModelProvider> {
        Arc::new(ScriptedProvider::new(
            toml::from_str(STEPS_SCRIPT).unwrap(),
            "test.script.toml",
        ))
    };
    let reference = Harness::with(provider(), original.clone(), steps_sandbox()).await;
    reference.run(10, 2).await;
    let expected = reference.summary().await;
    let expected_requests: HashMap<usize, String> =
        reference.request_bodies().into_iter().collect();
    assert_eq!(expected_requests.len(), 4);
    for crash_after in 1..expected.len() as u64 {
        let mut harness = Harness::with(provider(), original.clone(), steps_sandbox()).await;
        harness.create_session(10).await;
        harness.run_and_crash_after(crash_after).await;
        harness.edit_agent(edited.clone());
        harness.resume().await;
        assert_eq!(
            harness.summary().await,
            expected,
            "crash after event {crash_after}"
        );
        for (turn, body) in harness.request_bodies() {
            assert_eq!(
                Some(&body),
                expected_requests.get(&turn),
                "request for turn {} after a crash after event {crash_after}",
                turn + 1
            );
        }
        let policies = harness.sandbox.policies.lock().unwrap().clone();
        assert_eq!(
            policies,
            [original.sandbox.session_policy()],
            "crash after event {crash_after}"
        );
    }
}

#[tokio::test]
async fn a_tool_whose_schema_changed_while_the_session_was_down_fails_it() {
    let mut harness = Harness::new(STEPS_SCRIPT, &["fast", "slow"], steps_sandbox()).await;
    harness.create_session(10).await;
    // Event 6 is call_1_0's tool_started.
    harness.run_and_crash_after(6).await;
    harness.sandbox = Arc::new(steps_sandbox().with_schema("slow", r#"{"type":"string"}"#));
    harness.resume().await;
    assert_eq!(
        harness.last().await,
        "8 t1 end STOP_REASON_ERROR \"First a single step.\" \"tool \\\"slow\\\" changed its input \
         schema since the session started, so the session cannot resume with the requests it made \
         before (recorded: {\\\"type\\\":\\\"object\\\"}; sandboxd now: {\\\"type\\\":\\\"string\\\"})\""
    );
    // Nothing ran: the in-flight call is closed as interrupted.
    assert_eq!(harness.sandbox.executions(), 0);
}

#[tokio::test]
async fn a_session_whose_agent_changed_provider_kind_fails_on_resume() {
    let mut harness = Harness::new(STEPS_SCRIPT, &["fast", "slow"], steps_sandbox()).await;
    harness.create_session(10).await;
    harness.run_and_crash_after(1).await;
    let mut edited = definition(&["fast", "slow"]);
    edited.provider = ProviderKind::Openai;
    harness.edit_agent(edited);
    harness.resume().await;
    assert_eq!(
        harness.last().await,
        "2 t0 end STOP_REASON_ERROR \"\" \"the session started on provider \\\"scripted\\\" but its \
         agent now uses \\\"openai\\\"; another wire format cannot continue the session's requests\""
    );
}
