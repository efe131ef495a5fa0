//! Skills end to end, on the requests a fake model server recorded: only
//! the index before `load_skill`, the same system prompt after it, the body
//! as a tool result, `allowed-tools` narrowing the agent's tools.

use harness_fake_model::{FakeModel, FakeTurn, WireFormat};
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;
use serde_json::Value;

use crate::support::{Sockets, TestPlane, describe};

const SKILL: &str = "---\nname: release-notes\ndescription: Write release notes from a changelog.\nallowed-tools: [read_file]\n---\n# Release notes\n\nRead CHANGELOG.md first. SECRET-BODY-MARKER\n";

fn agent(format: WireFormat, model: &FakeModel) -> String {
    format!(
        "name = \"writer\"\nprovider = \"{}\"\nmodel = \"fake-writer\"\nbase-url = \"{}\"\n\
         system-prompt = \"You write.\"\ntools = [\"read_file\", \"write_file\"]\n\
         skills = [\"release-notes\"]\n",
        match format {
            WireFormat::OpenAi => "openai",
            WireFormat::Anthropic => "anthropic",
        },
        model.base_url()
    )
}

/// The system prompt as the wire format carries it.
fn system(format: WireFormat, body: &Value) -> Value {
    match format {
        WireFormat::OpenAi => body["messages"][0].clone(),
        WireFormat::Anthropic => body["system"].clone(),
    }
}

fn tool_names(format: WireFormat, body: &Value) -> Vec<String> {
    body["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|tool| {
            let name = match format {
                WireFormat::OpenAi => &tool["function"]["name"],
                WireFormat::Anthropic => &tool["name"],
            };
            name.as_str().unwrap().to_owned()
        })
        .collect()
}

async fn load_then_write(format: WireFormat) {
    let model = FakeModel::start(
        format,
        vec![
            FakeTurn::text("Reading the skill.")
                .with_call("load_skill", r#"{"name":"release-notes"}"#),
            FakeTurn::text("Writing.")
                .with_call("write_file", r#"{"path":"NOTES.md","content":"x"}"#)
                .with_call("read_file", r#"{"path":"CHANGELOG.md"}"#),
            FakeTurn::text("Done."),
        ],
    )
    .await
    .unwrap();
    let files = [
        ("writer.toml", agent(format, &model)),
        ("skills/release-notes/SKILL.md", SKILL.to_owned()),
        ("skills/release-notes/template.md", "## Added".to_owned()),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let plane = TestPlane::start_with_agents(Sockets::Tcp, &files).await;
    let session = plane
        .client
        .clone()
        .start_session(control::StartSessionRequest {
            agent: "writer".to_owned(),
            input: "Notes for 1.2, please.".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let events = plane.events(&session.session_id, 0).await;
    let described: Vec<String> = events.iter().map(describe).collect();
    let requests = model.requests();
    assert_eq!(requests.len(), 3, "{described:#?}");
    // The call ids are the model's.
    let id = |turn: u32, index: u32| match format {
        WireFormat::OpenAi => format!("call_{turn}_{index}"),
        WireFormat::Anthropic => format!("toolu_{turn}_{index}"),
    };

    // Before the load: the index (name and description), never the body.
    let first = &requests[0].body;
    let first_text = first.to_string();
    assert!(first_text.contains("release-notes: Write release notes from a changelog."));
    assert!(!first_text.contains("SECRET-BODY-MARKER"), "{first_text}");
    assert_eq!(
        tool_names(format, first),
        ["read_file", "write_file", "load_skill"]
    );
    // After it: the system prompt and the tools are byte for byte the same,
    // and the body came as the tool result.
    for request in &requests[1..] {
        assert_eq!(system(format, &request.body), system(format, first));
        assert_eq!(request.body["tools"], first["tools"]);
    }
    let second = requests[1].body.to_string();
    assert!(second.contains("SECRET-BODY-MARKER"), "{second}");
    assert!(second.contains("template.md"), "{second}");

    let loaded: Vec<&control::SkillLoaded> = events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::SkillLoaded(loaded)) => Some(loaded),
            _ => None,
        })
        .collect();
    assert_eq!(loaded.len(), 1, "{described:#?}");
    assert_eq!(loaded[0].name, "release-notes");
    assert_eq!(loaded[0].call_id, id(1, 0));
    assert_eq!(loaded[0].resources, ["template.md"]);
    assert_eq!(
        loaded[0].allowed_tools,
        Some(control::SkillTools {
            tools: vec!["read_file".to_owned()]
        })
    );
    // allowed-tools narrows: write_file is denied, read_file runs.
    let decisions: Vec<(String, i32, String)> = events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::PolicyDecision(decision)) => Some((
                decision.call_id.clone(),
                decision.verdict,
                decision.rule.clone(),
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        decisions,
        [
            (
                id(1, 0),
                control::Verdict::Allow as i32,
                "default".to_owned()
            ),
            (
                id(2, 0),
                control::Verdict::Deny as i32,
                "skill.allowed-tools".to_owned()
            ),
            (
                id(2, 1),
                control::Verdict::Allow as i32,
                "default".to_owned()
            ),
        ]
    );
    assert!(
        plane
            .sandboxd
            .record
            .lock()
            .unwrap()
            .invocations
            .iter()
            .all(|(_, _, tool, _)| tool != "write_file"),
        "a denied call never reaches sandboxd"
    );
    assert!(
        requests[2].body.to_string().contains(
            "tool \\\"write_file\\\" is not allowed while skill \\\"release-notes\\\" is loaded"
        ),
        "{}",
        requests[2].body
    );
    assert!(described.last().unwrap().contains("STOP_REASON_COMPLETED"));
    plane.shut_down().await;
}

#[tokio::test]
async fn openai_requests_carry_the_index_and_the_same_system_prompt_after_a_load() {
    load_then_write(WireFormat::OpenAi).await;
}

#[tokio::test]
async fn anthropic_requests_carry_the_index_and_the_same_system_prompt_after_a_load() {
    load_then_write(WireFormat::Anthropic).await;
}

#[tokio::test]
async fn loading_a_skill_the_agent_does_not_list_is_refused_before_it_runs() {
    let model = FakeModel::start(
        WireFormat::OpenAi,
        vec![
            FakeTurn::text("Trying.").with_call("load_skill", r#"{"name":"triage"}"#),
            FakeTurn::text("Fine."),
        ],
    )
    .await
    .unwrap();
    let triage = "---\nname: triage\ndescription: Sort bugs.\n---\nTRIAGE-BODY\n";
    let files = [
        ("writer.toml", agent(WireFormat::OpenAi, &model)),
        ("skills/release-notes/SKILL.md", SKILL.to_owned()),
        ("skills/triage/SKILL.md", triage.to_owned()),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let plane = TestPlane::start_with_agents(Sockets::Tcp, &files).await;
    let session = plane.start_session("writer", "k1").await.session.unwrap();
    let events = plane.events(&session.session_id, 0).await;
    let requests = model.requests();
    assert_eq!(requests.len(), 2);
    let first = requests[0].body.to_string();
    assert!(
        !first.contains("Sort bugs."),
        "another agent's skill is not indexed"
    );
    let second = requests[1].body.to_string();
    assert!(
        second.contains("\\\"triage\\\" is not one of your skills; they are: release-notes"),
        "{second}"
    );
    assert!(!second.contains("TRIAGE-BODY"));
    assert!(
        !events
            .iter()
            .any(|event| matches!(event.kind, Some(Kind::SkillLoaded(_))))
    );
    plane.shut_down().await;
}
