//! Compaction in the loop: a 200-turn session in a 16k-token window, both
//! steps, at most one compaction per turn, and a crash right after a
//! summary replays it without asking the model again.

use super::*;
use crate::compaction::SUMMARY_INSTRUCTIONS;
use crate::context::ModelSpec;

const WINDOW: u64 = 16_000;
const TURNS: usize = 200;

fn long_script() -> String {
    let mut script = String::new();
    for turn in 1..TURNS {
        script.push_str(&format!(
            "[[turn]]\ntext = \"Reading chunk {turn}; then I compare it with the chunks before it, note anything unusual in its wording, its numbers or its structure, and keep a running list of the differences to report at the end.\"\n[[turn.tool-calls]]\ntool = \"fast\"\n\
             arguments = {{ chunk = {turn} }}\n"
        ));
    }
    script.push_str("[[turn]]\ntext = \"Every chunk read.\"\n");
    script
}

/// A tool whose every result is about 1,600 characters.
fn chunk_sandbox() -> FakeSandbox {
    let output: &'static str = Box::leak(
        format!("{{\"content\":\"{}\"}}", "lorem ipsum dolor ".repeat(90)).into_boxed_str(),
    );
    FakeSandbox::new(&["fast"]).with(
        "fast",
        Behaviour::Ok {
            output_json: output,
            delay: Duration::ZERO,
        },
    )
}

async fn long_harness() -> Harness {
    let mut harness = Harness::new(&long_script(), &["fast"], chunk_sandbox()).await;
    let mut agent = (*harness.agent).clone();
    agent.model_spec = Some(ModelSpec {
        context_window: WINDOW,
        max_output_tokens: None,
    });
    harness.agent = Arc::new(agent);
    harness.context.keep_turns = 4;
    harness
}

fn compactions(events: &[control::SessionEvent]) -> Vec<(u32, control::Compaction)> {
    events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::Compaction(compaction)) => Some((event.turn, compaction.clone())),
            _ => None,
        })
        .collect()
}

fn summary_requests(harness: &Harness) -> usize {
    harness
        .provider
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|request| {
            matches!(request.messages.first(), Some(Message::System { text }) if text == SUMMARY_INSTRUCTIONS)
        })
        .count()
}

#[tokio::test]
async fn a_200_turn_session_in_a_16k_window_completes_compacting_at_the_threshold() {
    let harness = long_harness().await;
    harness.create_session(250).await;
    harness.resume().await;
    let events = harness.events().await;
    let finished = match events.last().and_then(|event| event.kind.clone()) {
        Some(Kind::Finished(finished)) => finished,
        other => panic!("not finished: {other:?}"),
    };
    assert_eq!(
        (finished.stop_reason(), finished.final_output.as_str()),
        (control::StopReason::Completed, "Every chunk read."),
        "{}",
        finished.message
    );
    let compactions = compactions(&events);
    let threshold = WINDOW * 8 / 10;
    for (turn, compaction) in &compactions {
        assert!(
            compaction.tokens_before >= threshold,
            "turn {turn}: compacted at {} tokens, under {threshold}",
            compaction.tokens_before
        );
        assert!(compaction.tokens_after < compaction.tokens_before);
    }
    let mut turns: Vec<u32> = compactions.iter().map(|(turn, _)| *turn).collect();
    turns.dedup();
    assert_eq!(
        turns.len(),
        compactions.len(),
        "two compactions in one turn"
    );
    let step = |wanted: control::CompactionStep| {
        compactions
            .iter()
            .filter(|(_, compaction)| compaction.step() == wanted)
            .count()
    };
    let summaries = step(control::CompactionStep::Summarise);
    assert!(step(control::CompactionStep::ClearToolResults) > 0);
    assert!(
        summaries > 0,
        "{:?}",
        compactions
            .iter()
            .map(|(turn, c)| (*turn, c.step, c.tokens_before))
            .collect::<Vec<_>>()
    );
    assert_eq!(summary_requests(&harness), summaries);
    // Every request of the session stayed inside the window.
    let estimates: Vec<u64> = events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::TurnCompleted(turn)) => turn.request.as_ref(),
            _ => None,
        })
        .map(|request| request.estimated_input_tokens)
        .collect();
    assert_eq!(estimates.len(), TURNS);
    assert!(
        estimates.iter().all(|estimate| *estimate < WINDOW),
        "{estimates:?}"
    );
}

#[tokio::test]
async fn a_crash_right_after_a_summary_resumes_with_the_same_requests_and_no_second_summary() {
    let reference = long_harness().await;
    reference.create_session(250).await;
    reference.resume().await;
    let expected = reference.summary().await;
    let expected_bodies: Vec<String> = reference
        .request_bodies()
        .into_iter()
        .map(|(_, body)| body)
        .collect();
    let events = reference.events().await;
    let first_summary = events
        .iter()
        .find(|event| {
            matches!(&event.kind, Some(Kind::Compaction(compaction)) if compaction.step() == control::CompactionStep::Summarise)
        })
        .unwrap()
        .seq;

    let harness = long_harness().await;
    harness.create_session(250).await;
    harness.run_and_crash_after(first_summary).await;
    assert!(
        harness
            .summary()
            .await
            .last()
            .unwrap()
            .ends_with("compaction"),
        "the crash came right after the summary"
    );
    let summaries_before_resume = summary_requests(&harness);
    harness.resume().await;
    assert_eq!(harness.summary().await, expected);
    assert_eq!(summary_requests(&harness), summary_requests(&reference));
    assert_eq!(summaries_before_resume, 1);
    // The requests are the uninterrupted run's; at most the one in flight
    // at the crash was sent twice.
    let mut bodies: Vec<String> = harness
        .request_bodies()
        .into_iter()
        .map(|(_, body)| body)
        .collect();
    bodies.dedup();
    assert_eq!(bodies, expected_bodies);
}

/// Answers from the script, but refuses the first request of turn 11 as
/// too long for the model's context.
#[derive(Debug)]
struct TooLongOnce {
    inner: ScriptedProvider,
    refused: std::sync::atomic::AtomicBool,
}

impl ModelProvider for TooLongOnce {
    fn stream_turn(&self, request: ModelRequest) -> crate::provider::ModelStream {
        let turn = request
            .messages
            .iter()
            .filter(|message| matches!(message, Message::Assistant { .. }))
            .count()
            + request.summarised_turns as usize;
        let summary = matches!(request.messages.first(), Some(Message::System { text }) if text == SUMMARY_INSTRUCTIONS);
        if turn == 10 && !summary && !self.refused.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Box::pin(futures::stream::iter([Err(ProviderError::Status {
                endpoint: "test".to_owned(),
                status: 400,
                message: "prompt is too long: 210000 tokens > 200000 maximum".to_owned(),
                retry_after: None,
            })]));
        }
        self.inner.stream_turn(request)
    }
}

#[tokio::test]
async fn a_context_too_long_refusal_compacts_once_and_retries() {
    let provider = TooLongOnce {
        inner: ScriptedProvider::new(toml::from_str(&long_script()).unwrap(), "long.script.toml"),
        refused: std::sync::atomic::AtomicBool::new(false),
    };
    let mut harness =
        Harness::with(Arc::new(provider), definition(&["fast"]), chunk_sandbox()).await;
    let mut agent = (*harness.agent).clone();
    // A window the estimates never come near: only the refusal compacts.
    agent.model_spec = Some(ModelSpec {
        context_window: 10_000_000,
        max_output_tokens: None,
    });
    harness.agent = Arc::new(agent);
    harness.create_session(250).await;
    harness.resume().await;
    let events = harness.events().await;
    let compactions = compactions(&events);
    assert_eq!(compactions.len(), 1, "{compactions:?}");
    assert_eq!(compactions[0].0, 11);
    assert_eq!(
        compactions[0].1.step(),
        control::CompactionStep::ClearToolResults
    );
    let finished = match events.last().and_then(|event| event.kind.clone()) {
        Some(Kind::Finished(finished)) => finished,
        other => panic!("not finished: {other:?}"),
    };
    assert_eq!(finished.stop_reason(), control::StopReason::Completed);
}
