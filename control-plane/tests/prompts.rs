//! Cache-aware prompt assembly on the requests the fake model servers
//! recorded: a stable static prefix over ten turns, Anthropic breakpoints,
//! the OpenAI cache key, cache reads from turn 2, and token estimates
//! within 10% of the servers' counts once calibrated.

use harness_fake_model::{FakeModel, FakeTurn, WireFormat};
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;
use serde_json::Value;

use crate::support::{Sockets, TestPlane, describe};

const TURNS: usize = 10;

fn agent(format: WireFormat, model: &FakeModel) -> String {
    format!(
        "name = \"reader\"\nprovider = \"{}\"\nmodel = \"fake-reader\"\nbase-url = \"{}\"\n\
         system-prompt = \"You read files, one at a time, and report what they hold.\"\n\
         tools = [\"read_file\", \"write_file\"]\nmax-turns = 20\n",
        match format {
            WireFormat::OpenAi => "openai",
            WireFormat::Anthropic => "anthropic",
        },
        model.base_url()
    )
}

fn script() -> Vec<FakeTurn> {
    let mut turns: Vec<FakeTurn> = (1..TURNS)
        .map(|turn| {
            FakeTurn::text(&format!("Reading part {turn}."))
                .with_call("read_file", &format!(r#"{{"path":"part-{turn}.txt"}}"#))
        })
        .collect();
    turns.push(FakeTurn::text("All parts read."));
    turns
}

/// The turn records of a finished session: its requests and usage.
fn turns(events: &[control::SessionEvent]) -> Vec<(control::ModelRequest, control::TurnUsage)> {
    events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::TurnCompleted(turn)) => {
                Some((turn.request.clone().unwrap(), turn.usage.unwrap()))
            }
            _ => None,
        })
        .collect()
}

/// The body's JSON text up to (without) its last `cache_control` marker.
fn before_last_breakpoint(body: &Value) -> String {
    let text = body.to_string();
    let end = text.rfind("\"cache_control\"").unwrap();
    text[..end].to_owned()
}

async fn ten_turns(format: WireFormat) {
    let model = FakeModel::start(format, script()).await.unwrap();
    let files = [("reader.toml", agent(format, &model))];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let plane = TestPlane::start_with_agents(Sockets::Tcp, &files).await;
    let session = plane.start_session("reader", "k1").await.session.unwrap();
    let events = plane.events(&session.session_id, 0).await;
    let described: Vec<String> = events.iter().map(describe).collect();
    assert!(
        described.last().unwrap().contains("STOP_REASON_COMPLETED"),
        "{described:#?}"
    );
    let requests = model.requests();
    assert_eq!(requests.len(), TURNS);
    let turns = turns(&events);
    assert_eq!(turns.len(), TURNS);

    // The static prefix is the same on every request, and each request's
    // history extends the one before.
    let first = &turns[0].0;
    for (request, _) in &turns {
        assert_eq!(
            request.digests.as_ref().unwrap().static_prefix,
            first.digests.as_ref().unwrap().static_prefix
        );
        assert_eq!(request.prompt_cache_key, first.prompt_cache_key);
        assert_eq!(request.cache_miss_reason, "", "{request:?}");
    }
    assert!(first.prompt_cache_key.starts_with("reader-"));
    for window in turns.windows(2) {
        assert_ne!(
            window[0].0.digests.as_ref().unwrap().history,
            window[1].0.digests.as_ref().unwrap().history
        );
    }

    // The static sections are byte for byte the same on the wire.
    let first_body = &requests[0].body;
    for request in &requests {
        assert_eq!(request.body["tools"], first_body["tools"]);
        match format {
            WireFormat::OpenAi => {
                assert_eq!(request.body["messages"][0], first_body["messages"][0]);
                assert_eq!(
                    request.body["prompt_cache_key"],
                    Value::String(first.prompt_cache_key.clone())
                );
            }
            WireFormat::Anthropic => {
                assert_eq!(request.body["system"], first_body["system"]);
                let text = request.body.to_string();
                let breakpoints = text.matches("\"cache_control\"").count();
                assert!((1..=4).contains(&breakpoints), "{breakpoints}: {text}");
                let prefix = before_last_breakpoint(&request.body);
                for dynamic in [&session.session_id, "202"] {
                    assert!(
                        !prefix.contains(dynamic),
                        "{dynamic:?} before the last breakpoint: {prefix}"
                    );
                }
            }
        }
    }
    let anthropic_breakpoints: Vec<u32> = turns
        .iter()
        .map(|(request, _)| request.cache_breakpoints)
        .collect();
    assert_eq!(anthropic_breakpoints[0], 3);
    assert!(anthropic_breakpoints[1..].iter().all(|points| *points == 4));

    // The server's cache reads are recorded from turn 2 on.
    assert_eq!(turns[0].1.cached_input_tokens, 0);
    for (index, (_, usage)) in turns.iter().enumerate().skip(1) {
        assert!(
            usage.cached_input_tokens > 0,
            "turn {}: {usage:?}",
            index + 1
        );
    }
    if format == WireFormat::Anthropic {
        assert!(turns[0].1.cache_write_tokens > 0, "{:?}", turns[0].1);
    }

    // Estimates: within 10% of the server's count once calibrated (turn 2 on).
    for (index, (request, usage)) in turns.iter().enumerate().skip(1) {
        let estimated = request.estimated_input_tokens as f64;
        let measured = usage.input_tokens as f64;
        let error = (estimated - measured).abs() / measured;
        assert!(
            error <= 0.10,
            "turn {}: estimated {estimated}, measured {measured} ({:.1}%)",
            index + 1,
            error * 100.0
        );
    }
    plane.shut_down().await;
}

#[tokio::test]
async fn openai_ten_turns_keep_one_prefix_and_estimates_track_the_server() {
    ten_turns(WireFormat::OpenAi).await;
}

#[tokio::test]
async fn anthropic_ten_turns_keep_one_prefix_with_four_breakpoints_at_most() {
    ten_turns(WireFormat::Anthropic).await;
}

/// A 3 MB input of paragraphs and a log line each, over a 20k-token limit.
fn huge_input() -> String {
    let mut text = String::with_capacity(3 << 20);
    let mut paragraph = 0;
    while text.len() < 3 << 20 {
        paragraph += 1;
        text.push_str(&format!("## Section {paragraph}\n"));
        for line in 0..8 {
            text.push_str(&format!(
                "Paragraph {paragraph}, line {line}: the quick brown fox reads the report.\n"
            ));
        }
        text.push('\n');
    }
    text
}

#[tokio::test]
async fn a_3_mb_input_reaches_the_model_cut_at_a_paragraph_with_the_marker() {
    let model = FakeModel::start(WireFormat::OpenAi, vec![FakeTurn::text("Read the start.")])
        .await
        .unwrap();
    let files = [("reader.toml", agent(WireFormat::OpenAi, &model))];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let plane = TestPlane::start_configured(Sockets::Tcp, &files, |config| {
        config.context.max_input_tokens = 20_000;
    })
    .await;
    let input = huge_input();
    assert!(input.len() >= 3 << 20);
    let session = plane
        .client
        .clone()
        .start_session(control::StartSessionRequest {
            agent: "reader".to_owned(),
            input: input.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let events = plane.events(&session.session_id, 0).await;
    let requests = model.requests();
    assert_eq!(requests.len(), 1);
    let sent = requests[0].body["messages"][1]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let (kept, marker) = sent
        .split_once("\n\n[harness] The input was truncated here: ")
        .unwrap();
    assert!(input.starts_with(kept));
    assert!(
        input[kept.len()..].starts_with("\n\n"),
        "cut at a paragraph break: {:?}",
        &input[kept.len()..kept.len() + 40]
    );
    assert!(sent.chars().count() <= 20_000 * 4, "{}", sent.len());
    assert!(sent.chars().count() > 19_000 * 4, "{}", sent.len());
    let truncated = events
        .iter()
        .find_map(|event| match &event.kind {
            Some(Kind::Started(started)) => started.input_truncated.clone(),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        truncated,
        control::InputTruncated {
            original_chars: input.chars().count() as u64,
            kept_chars: kept.chars().count() as u64,
            original_tokens: (input.chars().count() as u64).div_ceil(4),
            max_input_tokens: 20_000,
            original_sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(input.as_bytes())),
        }
    );
    assert!(marker.starts_with(&format!(
        "{} of {} characters",
        truncated.kept_chars, truncated.original_chars
    )));
    plane.shut_down().await;
}
