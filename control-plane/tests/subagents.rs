//! Subagents end to end through the gRPC control plane: each agent on a
//! fake model server of its own (OpenAI wire format), so the assertions are
//! on the requests each model received.

use std::time::Duration;

use harness_fake_model::{FakeModel, FakeTurn, StreamShape, WireFormat};
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;
use serde_json::{Value, json};

use crate::support::{Sockets, TestPlane, describe, fake_digest};

/// An agent file on the fake model at `model`, with `extra` lines.
fn agent(name: &str, model: &FakeModel, tools: &[&str], extra: &str) -> String {
    format!(
        "name = \"{name}\"\ndescription = \"The {name}.\"\nprovider = \"openai\"\nmodel = \"fake-{name}\"\n\
         base-url = \"{}\"\nsystem-prompt = \"You are the {name}.\"\ntools = {tools:?}\n{extra}",
        model.base_url()
    )
}

async fn model(turns: Vec<FakeTurn>) -> FakeModel {
    FakeModel::start(WireFormat::OpenAi, turns).await.unwrap()
}

async fn start(plane: &TestPlane, agent: &str, input: &str) -> control::Session {
    plane
        .client
        .clone()
        .start_session(control::StartSessionRequest {
            agent: agent.to_owned(),
            input: input.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
}

async fn children(plane: &TestPlane, parent: &str) -> Vec<control::Session> {
    let mut sessions = plane
        .client
        .clone()
        .list_sessions(control::ListSessionsRequest {
            parent_session_id: parent.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sessions;
    sessions.sort_by(|a, b| a.agent.cmp(&b.agent));
    sessions
}

/// The tool results (role "tool") of an OpenAI request body.
fn tool_results(body: &Value) -> Vec<Value> {
    body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|message| message["role"] == "tool")
        .cloned()
        .collect()
}

fn tool_names(body: &Value) -> Vec<String> {
    body["tools"]
        .as_array()
        .map(|tools| {
            tools
                .iter()
                .map(|tool| tool["function"]["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn receipt(result: &Value) -> Value {
    serde_json::from_str(result["content"].as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn children_start_from_their_task_alone_and_the_parent_gets_one_receipt_each() {
    let supervisor = model(vec![
        FakeTurn::text("Writing the brief.").with_call(
            "write_file",
            r#"{"path":"brief.md","content":"Find the bug in parser.rs."}"#,
        ),
        FakeTurn::text("Delegating.")
            .with_call(
                "delegate_to_researcher",
                r#"{"task":"Investigate the bug.","files":["brief.md"]}"#,
            )
            .with_call("delegate_to_reviewer", r#"{"task":"Review the fix."}"#),
        FakeTurn::text("Synthesis."),
    ])
    .await;
    let researcher = model(vec![
        FakeTurn::text("Noting.").with_call(
            "write_file",
            r#"{"path":"notes/a.md","content":"The bug is on line 3."}"#,
        ),
        FakeTurn::text("I wrote notes/a.md."),
    ])
    .await;
    let reviewer = model(vec![FakeTurn::text("I saved the review to review.md.")]).await;
    let files = [
        (
            "supervisor.toml",
            agent(
                "supervisor",
                &supervisor,
                &["write_file"],
                "subagents = [\"researcher\", \"reviewer\"]\n",
            ),
        ),
        (
            "researcher.toml",
            agent("researcher", &researcher, &["write_file", "read_file"], ""),
        ),
        (
            "reviewer.toml",
            agent(
                "reviewer",
                &reviewer,
                &["read_file"],
                "workspace = \"isolated\"\n",
            ),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let plane = TestPlane::start_with_agents(Sockets::Tcp, &files).await;
    let session = start(&plane, "supervisor", "Fix the parser.").await;
    let events = plane.events(&session.session_id, 0).await;
    let described: Vec<String> = events.iter().map(describe).collect();
    assert!(
        described
            .last()
            .unwrap()
            .ends_with("finished STOP_REASON_COMPLETED \"Synthesis.\""),
        "{described:#?}"
    );

    // The researcher's first request: its own prompt and the task with the
    // brief packed in; nothing of the supervisor's conversation.
    let first = &researcher.requests()[0].body;
    assert_eq!(
        first["messages"],
        json!([
            {"role": "system", "content": "You are the researcher."},
            {"role": "user", "content": "Investigate the bug.\n\nFiles from the workspace:\n\
              --- brief.md (26 bytes) ---\nFind the bug in parser.rs.\n--- end of brief.md ---\n"},
        ])
    );
    assert_eq!(tool_names(first), ["write_file", "read_file"]);
    assert_eq!(
        reviewer.requests()[0].body["messages"],
        json!([
            {"role": "system", "content": "You are the reviewer."},
            {"role": "user", "content": "Review the fix."},
        ])
    );

    // The supervisor's last request: its own write's result and exactly one
    // receipt per delegation, none of the children's intermediate results.
    let requests = supervisor.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(
        tool_names(&requests[0].body),
        [
            "write_file",
            "delegate_to_researcher",
            "delegate_to_reviewer"
        ]
    );
    let results = tool_results(&requests[2].body);
    assert_eq!(results.len(), 3, "{results:#?}");
    let body = requests[2].body.to_string();
    assert_eq!(body.matches("bytes_written").count(), 1, "{body}");
    let kids = children(&plane, &session.session_id).await;
    let researcher_receipt = receipt(&results[1]);
    assert_eq!(
        researcher_receipt,
        json!({
            "subagent": "researcher",
            "session_id": kids[0].session_id,
            "status": "completed",
            "stop_reason": "completed",
            "final_text": "I wrote notes/a.md.",
            "tool_calls": [{"tool": "write_file", "ok": true}],
            "files": [{"path": "notes/a.md", "size": 21, "sha256": fake_digest("The bug is on line 3.")}],
            "usage": researcher_receipt["usage"].clone(),
        })
    );
    assert_eq!(researcher_receipt["usage"]["turns"], 2);
    let reviewer_receipt = receipt(&results[2]);
    assert_eq!(reviewer_receipt["status"], "completed_with_errors");
    assert_eq!(
        reviewer_receipt["problems"],
        json!([
            "the final text claims review.md was written, but no write_file or edit_file call of the subagent wrote it"
        ])
    );

    // Both children are listed under their parent, with their lineage.
    assert_eq!(
        kids.iter()
            .map(|kid| (
                kid.agent.as_str(),
                kid.parent_session_id.as_str(),
                kid.lineage.clone()
            ))
            .collect::<Vec<_>>(),
        [
            (
                "researcher",
                session.session_id.as_str(),
                vec![session.session_id.clone()]
            ),
            (
                "reviewer",
                session.session_id.as_str(),
                vec![session.session_id.clone()]
            ),
        ]
    );
    let shown = plane.session(&kids[0].session_id).await;
    assert_eq!(shown.parent_session_id, session.session_id);
    assert!(
        plane
            .session(&session.session_id)
            .await
            .parent_session_id
            .is_empty()
    );

    // The researcher worked in the supervisor's sandbox and left it; the
    // reviewer got one of its own, destroyed when it finished.
    {
        let record = plane.sandboxd.record.lock().unwrap();
        let wrote_notes = record
            .invocations
            .iter()
            .find(|(_, _, _, input)| input["path"] == "notes/a.md")
            .unwrap();
        assert_eq!(wrote_notes.0, "sb-1");
        assert_eq!(record.created.len(), 2);
        let mut destroyed = record.destroyed.clone();
        destroyed.sort();
        assert_eq!(destroyed, ["sb-1", "sb-2"]);
    }

    // The parent's usage includes its children's.
    let usage = plane.session(&session.session_id).await.usage.unwrap();
    let children_usage: u64 = kids
        .iter()
        .map(|kid| kid.usage.unwrap().output_tokens)
        .sum();
    let own: u64 = events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::TurnCompleted(turn)) => Some(turn.usage.unwrap().output_tokens),
            _ => None,
        })
        .sum();
    assert!(children_usage > 0);
    assert_eq!(usage.output_tokens, own + children_usage);
    plane.shut_down().await;
}

#[tokio::test]
async fn limits_refuse_a_delegation_with_no_model_request() {
    // Each nester delegates to another nester: depth 0 → 1 → 2, and the
    // one at depth 2 is refused (max-subagent-depth is 2).
    let nester = model(vec![
        FakeTurn::text("Deeper.").with_call("delegate_to_nester", r#"{"task":"Go deeper."}"#),
        FakeTurn::text("Back up."),
    ])
    .await;
    // max-children = 1: the second delegation of one turn is refused.
    let greedy = model(vec![
        FakeTurn::text("Two helpers.")
            .with_call("delegate_to_helper", r#"{"task":"One."}"#)
            .with_call("delegate_to_helper", r#"{"task":"Two."}"#),
        FakeTurn::text("Done."),
    ])
    .await;
    let helper = model(vec![FakeTurn::text("Helped.")]).await;
    let files = [
        (
            "nester.toml",
            agent("nester", &nester, &[], "subagents = [\"nester\"]\n"),
        ),
        (
            "greedy.toml",
            agent(
                "greedy",
                &greedy,
                &[],
                "subagents = [\"helper\"]\nmax-children = 1\n",
            ),
        ),
        ("helper.toml", agent("helper", &helper, &[], "")),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let plane = TestPlane::start_with_agents(Sockets::Tcp, &files).await;

    let top = start(&plane, "nester", "Start.").await;
    plane.events(&top.session_id, 0).await;
    let depth1 = children(&plane, &top.session_id).await;
    assert_eq!(depth1.len(), 1);
    let depth2 = children(&plane, &depth1[0].session_id).await;
    assert_eq!(depth2.len(), 1);
    assert_eq!(
        depth2[0].lineage,
        [top.session_id.clone(), depth1[0].session_id.clone()]
    );
    assert!(children(&plane, &depth2[0].session_id).await.is_empty());
    // Three sessions, two requests each, and no fourth session asked.
    assert_eq!(nester.requests().len(), 6);
    let refused = nester
        .requests()
        .iter()
        .flat_map(|request| tool_results(&request.body))
        .map(|result| result["content"].as_str().unwrap().to_owned())
        .filter(|content| content.starts_with("limit_exceeded: max-subagent-depth is 2"))
        .count();
    assert_eq!(refused, 1);

    let session = start(&plane, "greedy", "Go.").await;
    let events = plane.events(&session.session_id, 0).await;
    let described: Vec<String> = events.iter().map(describe).collect();
    assert!(
        described.iter().any(|line| line.contains(
            "TOOL_ERROR_KIND_LIMIT_EXCEEDED max-children is 1 and this session has started 1 subagents"
        )),
        "{described:#?}"
    );
    assert_eq!(helper.requests().len(), 1);
    assert_eq!(children(&plane, &session.session_id).await.len(), 1);
    plane.shut_down().await;
}

#[tokio::test]
async fn parallel_children_run_at_once() {
    let delegations: Vec<(String, String)> = (0..4)
        .map(|index| {
            (
                "delegate_to_worker".to_owned(),
                format!(r#"{{"task":"Part {index}."}}"#),
            )
        })
        .collect();
    let mut fan_out = FakeTurn::text("Fanning out.");
    for (tool, arguments) in &delegations {
        fan_out = fan_out.with_call(tool, arguments);
    }
    let boss = model(vec![fan_out, FakeTurn::text("All parts done.")]).await;
    let worker = model(vec![FakeTurn::text("Part done.")]).await;
    worker.set_shape(StreamShape {
        first_byte_delay: Duration::from_millis(300),
        ..StreamShape::default()
    });
    let files = [
        (
            "boss.toml",
            agent("boss", &boss, &[], "subagents = [\"worker\"]\n"),
        ),
        ("worker.toml", agent("worker", &worker, &[], "")),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let plane = TestPlane::start_with_agents(Sockets::Tcp, &files).await;
    let session = start(&plane, "boss", "Go.").await;
    let events = plane.events(&session.session_id, 0).await;
    let time = |event: &control::SessionEvent| {
        let time = event.time.unwrap();
        Duration::new(time.seconds as u64, time.nanos as u32)
    };
    let started: Vec<Duration> = events
        .iter()
        .filter(|event| matches!(event.kind, Some(Kind::SubagentStarted(_))))
        .map(time)
        .collect();
    let finished: Vec<Duration> = events
        .iter()
        .filter(|event| matches!(event.kind, Some(Kind::SubagentFinished(_))))
        .map(time)
        .collect();
    assert_eq!((started.len(), finished.len()), (4, 4));
    let span = *finished.iter().max().unwrap() - *started.iter().min().unwrap();
    assert!(
        span < Duration::from_millis(450),
        "4 children of 300 ms took {span:?}"
    );
    assert_eq!(worker.requests().len(), 4);
    plane.shut_down().await;
}

#[tokio::test]
async fn a_child_over_its_token_budget_reports_budget_exhausted() {
    let spender = model(
        (0..6)
            .map(|turn| {
                FakeTurn::text("Looking.")
                    .with_call("read_file", &format!(r#"{{"path":"file-{turn}"}}"#))
            })
            .collect(),
    )
    .await;
    let parent = model(vec![
        FakeTurn::text("Delegating.").with_call("delegate_to_spender", r#"{"task":"Spend."}"#),
        FakeTurn::text("It ran out."),
    ])
    .await;
    let files = [
        (
            "parent.toml",
            agent(
                "parent",
                &parent,
                &[],
                "subagents = [\"spender\"]\n[budget]\nmax-output-tokens = 1000\n",
            ),
        ),
        (
            // Each turn reports 9 output tokens: two requests use 18.
            "spender.toml",
            agent(
                "spender",
                &spender,
                &["read_file"],
                "[budget]\nmax-output-tokens = 18\n",
            ),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let plane = TestPlane::start_with_agents(Sockets::Tcp, &files).await;
    let session = start(&plane, "parent", "Go.").await;
    let events = plane.events(&session.session_id, 0).await;
    assert!(
        spender.requests().len() <= 3,
        "{} requests",
        spender.requests().len()
    );
    let reserved: Vec<control::BudgetLimits> = events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::SubagentStarted(started)) => started.budget,
            _ => None,
        })
        .collect();
    // The child gets its own limit (below the parent's 1000 left).
    assert_eq!(reserved.len(), 1);
    assert_eq!(reserved[0].max_output_tokens, Some(18));
    let receipt = receipt(&tool_results(&parent.requests()[1].body)[0]);
    assert_eq!(receipt["status"], "failed");
    assert_eq!(receipt["stop_reason"], "budget_exhausted");
    let kids = children(&plane, &session.session_id).await;
    assert_eq!(kids[0].budget.unwrap().max_output_tokens, Some(18));
    assert_eq!(kids[0].stop_reason(), control::StopReason::BudgetExhausted);
    plane.shut_down().await;
}

/// Waits until the session's log holds a `subagent_started`.
async fn wait_for_child(plane: &TestPlane, session_id: &str) {
    for _ in 0..500 {
        if !children(plane, session_id).await.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no subagent started");
}

#[tokio::test]
async fn cancelling_the_parent_cancels_its_children() {
    let parent = model(vec![
        FakeTurn::text("Delegating.").with_call("delegate_to_slow", r#"{"task":"Take ages."}"#),
        FakeTurn::text("Never reached."),
    ])
    .await;
    let slow = model(vec![FakeTurn::text("Finally.")]).await;
    slow.set_shape(StreamShape {
        first_byte_delay: Duration::from_secs(30),
        ..StreamShape::default()
    });
    let files = [
        (
            "parent.toml",
            agent("parent", &parent, &[], "subagents = [\"slow\"]\n"),
        ),
        ("slow.toml", agent("slow", &slow, &[], "")),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let plane = TestPlane::start_with_agents(Sockets::Tcp, &files).await;
    let session = start(&plane, "parent", "Go.").await;
    wait_for_child(&plane, &session.session_id).await;
    let cancelled = plane
        .client
        .clone()
        .cancel_session(control::CancelSessionRequest {
            session_id: session.session_id.clone(),
            reason: "changed my mind".to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    assert_eq!(cancelled.stop_reason(), control::StopReason::Cancelled);
    let child = &children(&plane, &session.session_id).await[0];
    let events = plane.events(&child.session_id, 0).await;
    let Some(Kind::Finished(finished)) = &events.last().unwrap().kind else {
        panic!("the child did not finish");
    };
    assert_eq!(finished.stop_reason(), control::StopReason::Cancelled);
    assert_eq!(
        finished.message,
        "its parent session ended: changed my mind"
    );
    assert_eq!(parent.requests().len(), 1);
    plane.shut_down().await;
}

#[tokio::test]
async fn an_escalating_child_returns_its_reason_to_the_parent() {
    let parent = model(vec![
        FakeTurn::text("Delegating.")
            .with_call("delegate_to_cautious", r#"{"task":"Delete production."}"#),
        FakeTurn::text("It escalated."),
    ])
    .await;
    let cautious =
        model(vec![FakeTurn::text("No.").with_call(
            "escalate",
            r#"{"reason":"needs a human's approval"}"#,
        )])
        .await;
    let files = [
        (
            "parent.toml",
            agent("parent", &parent, &[], "subagents = [\"cautious\"]\n"),
        ),
        (
            "cautious.toml",
            agent("cautious", &cautious, &["escalate"], ""),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let plane = TestPlane::start_with_agents(Sockets::Tcp, &files).await;
    let session = start(&plane, "parent", "Go.").await;
    plane.events(&session.session_id, 0).await;
    let receipt = receipt(&tool_results(&parent.requests()[1].body)[0]);
    assert_eq!(
        (
            &receipt["status"],
            &receipt["stop_reason"],
            &receipt["message"]
        ),
        (
            &json!("failed"),
            &json!("escalated"),
            &json!("needs a human's approval")
        )
    );
    assert_eq!(cautious.requests().len(), 1);
    plane.shut_down().await;
}

/// The session's first `approval_requested`, once it is recorded.
async fn approval_requested(plane: &TestPlane, session_id: &str) -> control::ApprovalRequested {
    use futures::StreamExt as _;
    let mut stream = plane
        .client
        .clone()
        .stream_events(control::StreamEventsRequest {
            session_id: session_id.to_owned(),
            after_seq: 0,
            follow: true,
        })
        .await
        .unwrap()
        .into_inner();
    let found = async {
        while let Some(event) = stream.next().await {
            if let Some(Kind::ApprovalRequested(requested)) = event.unwrap().kind {
                return requested;
            }
        }
        panic!("the session ended without asking for approval");
    };
    tokio::time::timeout(Duration::from_secs(10), found)
        .await
        .expect("an approval is requested within 10s")
}

#[tokio::test]
async fn a_childs_approval_is_listed_with_its_lineage_and_resolved_through_the_parent() {
    let lead = model(vec![
        FakeTurn::text("Delegating.").with_call("delegate_to_writer", r#"{"task":"Write it."}"#),
        FakeTurn::text("Done."),
    ])
    .await;
    let writer = model(vec![
        FakeTurn::text("Writing.")
            .with_call("write_file", r#"{"path":"notes/tally.txt","content":"1"}"#),
        FakeTurn::text("Finished."),
    ])
    .await;
    let policy = "[[policy.rule]]\ntool = \"write_file\"\nverdict = \"ask\"\nreason = \"writes need a human\"\n";
    let files = [
        (
            "lead.toml",
            agent("lead", &lead, &[], "subagents = [\"writer\"]\n"),
        ),
        (
            "writer.toml",
            agent("writer", &writer, &["write_file"], policy),
        ),
    ];
    let files: Vec<(&str, &str)> = files.iter().map(|(n, c)| (*n, c.as_str())).collect();
    let plane = TestPlane::start_with_agents(Sockets::Tcp, &files).await;
    let writes = |plane: &TestPlane| {
        plane
            .sandboxd
            .record
            .lock()
            .unwrap()
            .invocations
            .iter()
            .filter(|(_, _, tool, _)| tool == "write_file")
            .count()
    };
    let resolve = |parent: &str, child: &str, call: &str, decision: control::ApprovalDecision| {
        let mut client = plane.client.clone();
        let request = control::ResolveApprovalRequest {
            session_id: parent.to_owned(),
            call_id: call.to_owned(),
            decision: decision.into(),
            reason: "checked".to_owned(),
            subagent_session_id: child.to_owned(),
        };
        async move { client.resolve_approval(request).await }
    };

    for (decision, writes_after) in [
        (control::ApprovalDecision::Allow, 1),
        (control::ApprovalDecision::Deny, 1),
    ] {
        let session = start(&plane, "lead", "Go.").await;
        wait_for_child(&plane, &session.session_id).await;
        let child = children(&plane, &session.session_id).await.remove(0);
        let requested = approval_requested(&plane, &child.session_id).await;
        let call_id = requested.call_id.clone();
        assert_eq!(
            (requested.session_id.as_str(), requested.lineage.clone()),
            (child.session_id.as_str(), vec![session.session_id.clone()])
        );
        let waiting = plane
            .client
            .clone()
            .list_sessions(control::ListSessionsRequest {
                parent_session_id: session.session_id.clone(),
                status: control::SessionStatus::AwaitingApproval.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .sessions;
        assert_eq!(waiting.len(), 1);
        // Only an ancestor may answer for the child.
        let stranger = start(&plane, "writer", "Elsewhere.").await;
        let refused = resolve(&stranger.session_id, &child.session_id, &call_id, decision)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
        resolve(&session.session_id, &child.session_id, &call_id, decision)
            .await
            .unwrap();
        plane.events(&session.session_id, 0).await;
        // The stranger asks too; deny it so it ends.
        let stranger_call = plane.pending_approval(&stranger.session_id).await;
        resolve(
            &stranger.session_id,
            "",
            &stranger_call,
            control::ApprovalDecision::Deny,
        )
        .await
        .unwrap();
        plane.events(&stranger.session_id, 0).await;
        assert_eq!(writes(&plane), writes_after, "{decision:?}");
    }
    // The denied child's model was told so (the approved one got the
    // write's result).
    let results: Vec<String> = writer
        .requests()
        .iter()
        .filter(|request| request.body["messages"][1]["content"] == "Write it.")
        .flat_map(|request| tool_results(&request.body))
        .map(|result| result["content"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        results,
        [
            r#"{"bytes_written":1}"#,
            "denied: denied by default: checked"
        ]
    );
    plane.shut_down().await;
}
