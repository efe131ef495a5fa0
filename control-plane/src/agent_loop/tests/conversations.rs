//! Conversations (waiting for input between answers, across restarts, until
//! cancelled, timed out or out of budget) and loop detection.

use super::*;

const THREE_ANSWERS: &str = r#"
    [[turn]]
    text = "First."
    [[turn]]
    text = "Second."
    [[turn]]
    text = "Third."
"#;

fn conversation(input_timeout: Duration) -> AgentDefinition {
    AgentDefinition {
        conversation: ConversationSettings::waiting(input_timeout),
        ..definition(&[])
    }
}

async fn conversation_harness(input_timeout: Duration) -> Harness {
    let provider =
        ScriptedProvider::new(toml::from_str(THREE_ANSWERS).unwrap(), "test.script.toml");
    Harness::with(
        Arc::new(provider),
        conversation(input_timeout),
        FakeSandbox::new(&[]),
    )
    .await
}

impl Harness {
    /// Waits until the session waits for input, then answers the wait as
    /// SendMessage does; returns the message's seq.
    async fn send_when_waiting(&self, text: &str) -> u64 {
        for _ in 0..1000 {
            let session = self.session().await;
            if session.status == control::SessionStatus::WaitingForInput {
                let message = control::UserMessage {
                    text: text.to_owned(),
                    idempotency_key: String::new(),
                    reply_to_seq: session.last_seq,
                    truncated: None,
                };
                let event = self
                    .log
                    .append(&session.session_id, 0, Kind::UserMessage(message))
                    .await
                    .unwrap();
                return event.seq;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the session never waited for input");
    }

    /// Runs the stored session while `messages` are sent, one per wait;
    /// once it has answered the last (`answers` model requests in all) and
    /// waits again, cancels it with `reason`.
    async fn converse(&self, messages: &[&str], answers: usize, reason: &str) {
        let (cancel, cancel_signal) = watch::channel(None);
        let agent_loop = self.agent_loop(2);
        let run = agent_loop.run(self.session().await, self.agent.clone(), cancel_signal);
        let talk = async {
            for message in messages {
                self.send_when_waiting(message).await;
            }
            while self.provider.requests.lock().unwrap().len() < answers
                || self.session().await.status != control::SessionStatus::WaitingForInput
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            cancel.send_replace(Some(reason.to_owned()));
        };
        tokio::time::timeout(Duration::from_secs(10), futures::future::join(run, talk))
            .await
            .unwrap();
    }

    /// The user and assistant texts of the last model request.
    fn last_request_dialogue(&self) -> Vec<String> {
        let requests = self.provider.requests.lock().unwrap();
        requests
            .last()
            .unwrap()
            .messages
            .iter()
            .filter_map(|message| match message {
                Message::User { text } => Some(format!("user: {text}")),
                Message::Assistant { text, .. } => Some(format!("assistant: {text}")),
                _ => None,
            })
            .collect()
    }
}

#[tokio::test]
async fn a_conversation_answers_each_message_with_the_whole_history() {
    let harness = conversation_harness(Duration::from_secs(30)).await;
    harness.create_session(10).await;
    // Answered, then waiting again: the caller ends the conversation.
    harness
        .converse(&["and then?", "last one"], 3, "done talking")
        .await;
    assert_eq!(
        harness.last_request_dialogue(),
        [
            "user: go",
            "assistant: First.",
            "user: and then?",
            "assistant: Second.",
            "user: last one",
        ]
    );
    let summary = harness.summary().await;
    let kinds: Vec<&str> = summary
        .iter()
        .map(|line| line.split(' ').nth(2).unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "started",
            "text",
            "turn",
            "waiting_for_input",
            "user_message",
            "text",
            "turn",
            "waiting_for_input",
            "user_message",
            "text",
            "turn",
            "waiting_for_input",
            "end",
        ]
    );
    assert_eq!(
        summary.last().unwrap(),
        "13 t3 end STOP_REASON_CANCELLED \"Third.\" \"done talking\""
    );
    let usage = harness.session().await.usage;
    assert_eq!(usage.turns, 3, "budgets count the whole conversation");
}

#[tokio::test]
async fn a_conversation_resumed_while_waiting_waits_again_and_answers() {
    let harness = conversation_harness(Duration::from_secs(30)).await;
    harness.create_session(10).await;
    // Crash while waiting: the loop is dropped once the wait is recorded.
    {
        let (_cancel, cancel_signal) = watch::channel(None);
        let agent_loop = harness.agent_loop(2);
        let session = harness.session().await;
        let run = agent_loop.run(session, harness.agent.clone(), cancel_signal);
        let waited = async {
            while harness.session().await.status != control::SessionStatus::WaitingForInput {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                _ = run => panic!("the conversation ended on its own"),
                () = waited => {}
            }
        })
        .await
        .unwrap();
    }
    harness.converse(&["still there?"], 2, "bye").await;
    assert_eq!(
        harness.provider.requests.lock().unwrap().len(),
        2,
        "the first answer is not asked for again"
    );
    assert_eq!(
        harness.last_request_dialogue(),
        ["user: go", "assistant: First.", "user: still there?"]
    );
}

#[tokio::test]
async fn a_wait_without_a_message_closes_the_input_and_completes() {
    let harness = conversation_harness(Duration::from_millis(200)).await;
    harness.create_session(10).await;
    harness.resume().await;
    let summary = harness.summary().await;
    assert_eq!(
        summary[summary.len() - 3..],
        [
            "4 t1 waiting_for_input".to_owned(),
            "5 t1 input_closed".to_owned(),
            "6 t1 end STOP_REASON_COMPLETED \"First.\" \"no message arrived within the input \
             timeout of 200ms\""
                .to_owned(),
        ]
    );
    // The closed wait accepts no message.
    let late = control::UserMessage {
        text: "late".to_owned(),
        idempotency_key: String::new(),
        reply_to_seq: 4,
        truncated: None,
    };
    assert!(matches!(
        harness
            .log
            .append(&SessionId::new("s1"), 1, Kind::UserMessage(late))
            .await,
        Err(StoreError::SessionFinished(_))
    ));
}

#[tokio::test]
async fn a_message_that_lands_first_keeps_the_wait_from_closing() {
    let harness = conversation_harness(Duration::from_secs(30)).await;
    harness.create_session(10).await;
    harness.run_and_crash_after(4).await;
    assert_eq!(harness.last().await, "4 t1 waiting_for_input");
    harness.send_when_waiting("quick").await;
    let closing = Kind::InputClosed(control::InputClosed {
        reason: "timed out".to_owned(),
    });
    assert!(matches!(
        harness.log.append(&SessionId::new("s1"), 1, closing).await,
        Err(StoreError::NotWaitingForInput(_))
    ));
}

#[tokio::test]
async fn a_conversation_out_of_turns_finishes_instead_of_waiting() {
    let harness = conversation_harness(Duration::from_secs(30)).await;
    harness.create_session(1).await;
    harness.resume().await;
    assert_eq!(
        harness.last().await,
        "5 t1 end STOP_REASON_MAX_TURNS \"First.\" \"stopped after 1 turns\""
    );
}

const REPEATING: &str = r#"
    [[turn]]
    text = "Reading."
    [[turn.tool-calls]]
    tool = "read"
    arguments = { path = "a.txt" }
    [[turn]]
    text = "Reading again."
    [[turn.tool-calls]]
    tool = "read"
    arguments = { path = "a.txt" }
    [[turn]]
    text = "And again."
    [[turn.tool-calls]]
    tool = "read"
    arguments = { path = "a.txt" }
    [[turn]]
    text = "Never asked."
"#;

#[tokio::test]
async fn the_same_call_three_times_in_a_row_stops_the_session_before_the_third_runs() {
    let provider = ScriptedProvider::new(toml::from_str(REPEATING).unwrap(), "test.script.toml");
    let definition = AgentDefinition {
        max_repeated_calls: 3,
        ..definition(&["read"])
    };
    let harness = Harness::with(Arc::new(provider), definition, FakeSandbox::new(&["read"])).await;
    harness.run(10, 2).await;
    assert_eq!(harness.sandbox.executions(), 2);
    let summary = harness.summary().await;
    let message = "the model asked for the same call 3 times in a row (read with arguments \
                   {\"path\":\"a.txt\"}); stopped before running it again";
    assert_eq!(
        summary[summary.len() - 3..],
        [
            format!("20 t3 finished call_3_0 TOOL_ERROR_KIND_DENIED not run: {message}"),
            "21 t3 turn 3 tool_use".to_owned(),
            format!("22 t3 end STOP_REASON_LOOP_DETECTED \"And again.\" {message:?}"),
        ]
    );
    assert_eq!(harness.provider.requests.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn a_different_call_in_between_resets_the_count() {
    let script = REPEATING.replacen(
        "tool = \"read\"\n    arguments = { path = \"a.txt\" }\n    [[turn]]\n    text = \"And again.\"",
        "tool = \"read\"\n    arguments = { path = \"b.txt\" }\n    [[turn]]\n    text = \"And again.\"",
        1,
    );
    assert_ne!(script, REPEATING);
    let provider = ScriptedProvider::new(toml::from_str(&script).unwrap(), "test.script.toml");
    let definition = AgentDefinition {
        max_repeated_calls: 2,
        ..definition(&["read"])
    };
    let harness = Harness::with(Arc::new(provider), definition, FakeSandbox::new(&["read"])).await;
    harness.run(10, 2).await;
    // a, b, a: never twice in a row.
    assert_eq!(harness.sandbox.executions(), 3);
    assert!(
        harness
            .last()
            .await
            .contains("STOP_REASON_COMPLETED \"Never asked.\""),
        "{:?}",
        harness.last().await
    );
}

const ESCALATING: &str = r#"
    [[turn]]
    text = "I cannot do this."
    [[turn.tool-calls]]
    tool = "escalate"
    arguments = { reason = "no access to the billing system" }
    [[turn]]
    text = "Thanks, going on."
"#;

async fn escalating_harness(definition: AgentDefinition) -> Harness {
    let provider = ScriptedProvider::new(toml::from_str(ESCALATING).unwrap(), "test.script.toml");
    let mut harness = Harness::with(Arc::new(provider), definition, FakeSandbox::new(&[])).await;
    harness.harness_tools = crate::harness_tools::standard().unwrap();
    harness
}

#[tokio::test]
async fn an_escalation_ends_the_session_with_its_reason_and_no_more_model_calls() {
    let harness = escalating_harness(definition(&["escalate"])).await;
    harness.run(10, 2).await;
    assert_eq!(
        harness.last().await,
        "9 t1 end STOP_REASON_ESCALATED \"I cannot do this.\" \"no access to the billing system\""
    );
    assert_eq!(harness.provider.requests.lock().unwrap().len(), 1);
    assert_eq!(
        harness.sandbox.executions(),
        0,
        "escalate runs in the harness"
    );
}

#[tokio::test]
async fn an_escalating_conversation_waits_for_the_person_and_goes_on() {
    let harness = escalating_harness(AgentDefinition {
        conversation: ConversationSettings::waiting(Duration::from_secs(30)),
        ..definition(&["escalate"])
    })
    .await;
    harness.create_session(10).await;
    harness.converse(&["Access granted."], 2, "done").await;
    assert_eq!(
        harness.last_request_dialogue(),
        [
            "user: go",
            "assistant: I cannot do this.",
            "user: Access granted."
        ]
    );
    assert!(harness.last().await.contains("STOP_REASON_CANCELLED"));
}
