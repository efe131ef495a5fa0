//! The crash test over a session tree: a supervisor that tallies, then
//! delegates to two children in parallel (one of them asks for approval),
//! then reads every tally back. The control plane is SIGKILLed at 20
//! points spread over parent and children — mid child model stream, mid
//! child tool call, while a child waits for approval, between the parent's
//! events — and restarted. Every run must end with the uninterrupted
//! transcript of every session of the tree, no tally line doubled, and no
//! model turn asked again except the ones in flight at the kill.
//!
//! Kill points use the control plane's `HARNESS_CRASH_AT` hook (counted
//! over the whole process: whichever session reaches the point first) and
//! SIGKILLs sent by this test on seeing an event of the parent or the
//! approval request of a child.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use harness_e2e::{Cluster, ClusterOptions};
use harness_fake_model::{FakeModel, FakeTurn, StreamShape, WireFormat};
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;

use crate::crash::{assert_gap_free, transcript};

fn tally(file: &str, label: &str) -> String {
    format!(r#"{{"file":"{file}","label":"{label}"}}"#)
}

fn boss_script() -> Vec<FakeTurn> {
    vec![
        FakeTurn::text("First my own tally.").with_call("tally", &tally("boss.txt", "b-01")),
        FakeTurn::text("Now both sides at once.")
            .with_call("delegate_to_left", r#"{"task":"Tally the left side."}"#)
            .with_call("delegate_to_right", r#"{"task":"Tally the right side."}"#),
        FakeTurn::text("Reading everything back.")
            .with_call("read_file", r#"{"path":"boss.txt"}"#)
            .with_call("read_file", r#"{"path":"left.txt"}"#)
            .with_call("read_file", r#"{"path":"right.txt"}"#),
        FakeTurn::text("The whole tree tallied, each step once."),
    ]
}

fn child_script(side: &str, second: &str) -> Vec<FakeTurn> {
    let file = format!("{side}.txt");
    vec![
        FakeTurn::text(&format!("Tallying {side}, step one."))
            .with_call("tally", &tally(&file, &format!("{side}-01"))),
        FakeTurn::text(&format!("Tallying {side}, step two."))
            .with_call("tally", &tally(&file, second)),
        FakeTurn::text(&format!("The {side} side is tallied.")),
    ]
}

fn agent_file(name: &str, model: &FakeModel, tools: &str, extra: &str) -> String {
    format!(
        "name = \"{name}\"\nprovider = \"openai\"\nmodel = \"fake-{name}\"\nbase-url = \"{}\"\n\
         system-prompt = \"You are {name}.\"\ntools = {tools}\nmax-turns = 8\n{extra}",
        model.base_url()
    )
}

/// Where a run is killed.
#[derive(Debug, Clone)]
enum Kill {
    /// The control plane SIGKILLs itself at this `HARNESS_CRASH_AT` point.
    Hook(String),
    /// The test SIGKILLs it on the parent's `nth` (0-based) event of `kind`.
    OnParentEvent { kind: &'static str, nth: usize },
    /// The test SIGKILLs it when it sees a child waiting for approval.
    OnChildApproval,
}

fn kill_points() -> Vec<(&'static str, Kill)> {
    let hook = |point: &str| Kill::Hook(point.to_owned());
    vec![
        ("after the parent's `started`", hook("after-event:1")),
        ("after some session's 6th event", hook("after-event:6")),
        ("after some session's 10th event", hook("after-event:10")),
        ("after some session's 14th event", hook("after-event:14")),
        ("after some session's 18th event", hook("after-event:18")),
        ("after some session's 24th event", hook("after-event:24")),
        ("after some session's 30th event", hook("after-event:30")),
        (
            "mid tool call: the parent's tally acknowledged",
            hook("after-invoke-sent:1"),
        ),
        (
            "mid child tool call: a child's first tally",
            hook("after-invoke-sent:2"),
        ),
        (
            "mid child tool call: the other child's first tally",
            hook("after-invoke-sent:3"),
        ),
        (
            "mid child tool call: a child's second tally",
            hook("after-invoke-sent:4"),
        ),
        (
            "mid tool call: a read_file of the parent",
            hook("after-invoke-sent:6"),
        ),
        (
            "model response 2 (the delegating turn) started",
            hook("after-model-response:2"),
        ),
        (
            "mid child model stream: response 3 started",
            hook("after-model-response:3"),
        ),
        (
            "mid child model stream: response 4 started",
            hook("after-model-response:4"),
        ),
        (
            "mid child model stream: response 6 started",
            hook("after-model-response:6"),
        ),
        (
            "SIGKILL on the parent's first subagent_started",
            Kill::OnParentEvent {
                kind: "subagent_started",
                nth: 0,
            },
        ),
        (
            "SIGKILL on the parent's first subagent_finished",
            Kill::OnParentEvent {
                kind: "subagent_finished",
                nth: 0,
            },
        ),
        (
            "SIGKILL on a text delta of the parent's reading turn",
            Kill::OnParentEvent {
                kind: "text_delta",
                nth: 6,
            },
        ),
        (
            "SIGKILL while a child waits for approval",
            Kill::OnChildApproval,
        ),
    ]
}

/// The session tree's logs: the parent's, then each child's by agent name.
struct Tree {
    parent: Vec<control::SessionEvent>,
    children: BTreeMap<String, Vec<control::SessionEvent>>,
}

/// `line` with the request's history digest blanked: the history holds
/// child session ids, which differ between runs, and a digest cannot be
/// renamed like the ids themselves.
fn without_history_digest(line: String) -> String {
    const FIELD: &str = "history: \"";
    let Some(start) = line.find(FIELD).map(|at| at + FIELD.len()) else {
        return line;
    };
    let Some(length) = line[start..].find('"') else {
        return line;
    };
    format!(
        "{}<run-specific>{}",
        &line[..start],
        &line[start + length..]
    )
}

impl Tree {
    /// Every session's transcript, with the ids that differ between runs
    /// replaced by the agent they belong to.
    fn transcripts(&self) -> Vec<String> {
        let mut ids: Vec<(String, String)> = Vec::new();
        for (agent, events) in &self.children {
            if let Some(first) = events.first() {
                ids.push((first.session_id.clone(), format!("<{agent}>")));
            }
        }
        let rename = |line: String| {
            let line = ids
                .iter()
                .fold(line, |line, (id, name)| line.replace(id.as_str(), name));
            without_history_digest(line)
        };
        let mut lines: Vec<String> = transcript(&self.parent).into_iter().map(rename).collect();
        for (agent, events) in &self.children {
            lines.push(format!("== {agent}"));
            lines.extend(transcript(events).into_iter().map(rename));
        }
        // The parent's id appears inside child logs (lineage).
        let parent = self
            .parent
            .first()
            .map(|event| event.session_id.clone())
            .unwrap_or_default();
        lines
            .into_iter()
            .map(|line| {
                let line = line.replace(&parent, "<parent>");
                strip_sandbox_ids(&line)
            })
            .collect()
    }
}

/// `sbx-<hex>` ids differ between runs.
fn strip_sandbox_ids(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find("sbx-") {
        out.push_str(&rest[..at]);
        out.push_str("sbx-*");
        rest = rest[at + 4..].trim_start_matches(|c: char| c.is_ascii_hexdigit());
    }
    out.push_str(rest);
    out
}

async fn start(cluster: &mut Cluster, key: &str) -> (String, usize) {
    let mut restarts = 0;
    loop {
        let answer = match cluster.control().await {
            Ok(mut client) => client
                .start_session(control::StartSessionRequest {
                    agent: "boss".to_owned(),
                    input: "Tally the tree.".to_owned(),
                    idempotency_key: key.to_owned(),
                    ..Default::default()
                })
                .await
                .map_err(|status| format!("{status:?}")),
            Err(error) => Err(format!("{error:#}")),
        };
        match answer {
            Ok(response) => return (response.into_inner().session.unwrap().session_id, restarts),
            Err(failure) => {
                cluster
                    .wait_control_plane_exit(Duration::from_secs(10))
                    .await
                    .unwrap_or_else(|error| panic!("StartSession failed ({failure}): {error:#}"));
                cluster.restart_control_plane(&[]).await.unwrap();
                restarts += 1;
            }
        }
    }
}

async fn children_of(cluster: &Cluster, parent: &str) -> Option<Vec<control::Session>> {
    let mut client = cluster.control().await.ok()?;
    let sessions = client
        .list_sessions(control::ListSessionsRequest {
            parent_session_id: parent.to_owned(),
            ..Default::default()
        })
        .await
        .ok()?
        .into_inner()
        .sessions;
    Some(sessions)
}

/// The pending approval of `child`, if it waits for one.
async fn child_approval(cluster: &Cluster, child: &str) -> Option<String> {
    let mut client = cluster.control().await.ok()?;
    let mut stream = client
        .stream_events(control::StreamEventsRequest {
            session_id: child.to_owned(),
            after_seq: 0,
            follow: true,
        })
        .await
        .ok()?
        .into_inner();
    let mut pending = None;
    let read = async {
        while let Some(Ok(event)) = stream.next().await {
            match event.kind {
                Some(Kind::ApprovalRequested(request)) => pending = Some(request.call_id),
                Some(Kind::ApprovalResolved(_)) => pending = None,
                _ => {}
            }
        }
    };
    // The stream stays open while the child waits: read what is there.
    let _ = tokio::time::timeout(Duration::from_millis(100), read).await;
    pending
}

/// What one step of watching the tree found.
enum Watch {
    Finished,
    Broken,
    KillNow,
}

/// Follows the parent until it finishes (answering children's approvals
/// through it), the control plane goes away, or the kill trigger is seen.
async fn watch(
    cluster: &Cluster,
    parent: &str,
    seen: &mut Vec<control::SessionEvent>,
    kill: Option<&Kill>,
) -> Watch {
    loop {
        let Ok(mut client) = cluster.control().await else {
            return Watch::Broken;
        };
        let after_seq = seen.last().map_or(0, |event| event.seq);
        let Ok(stream) = client
            .stream_events(control::StreamEventsRequest {
                session_id: parent.to_owned(),
                after_seq,
                follow: true,
            })
            .await
        else {
            return Watch::Broken;
        };
        let mut stream = stream.into_inner();
        // Read the parent's new events for a moment, then look at the children.
        let deadline = tokio::time::sleep(Duration::from_millis(50));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                item = stream.next() => {
                    let Some(Ok(event)) = item else {
                        return Watch::Broken;
                    };
                    seen.push(event.clone());
                    if let Some(Kill::OnParentEvent { kind, nth }) = kill {
                        let is = |e: &control::SessionEvent| {
                            e.kind.as_ref().map(harness_control_plane::event::kind_name) == Some(*kind)
                        };
                        if is(&event) && seen.iter().filter(|e| is(e)).count() == nth + 1 {
                            return Watch::KillNow;
                        }
                    }
                    if matches!(event.kind, Some(Kind::Finished(_))) {
                        return Watch::Finished;
                    }
                }
                () = &mut deadline => break,
            }
        }
        let Some(children) = children_of(cluster, parent).await else {
            return Watch::Broken;
        };
        for child in children
            .iter()
            .filter(|child| child.status() == control::SessionStatus::AwaitingApproval)
        {
            let Some(call_id) = child_approval(cluster, &child.session_id).await else {
                continue;
            };
            if matches!(kill, Some(Kill::OnChildApproval)) {
                return Watch::KillNow;
            }
            let resolved = client
                .resolve_approval(control::ResolveApprovalRequest {
                    session_id: parent.to_owned(),
                    call_id,
                    decision: control::ApprovalDecision::Allow.into(),
                    reason: "ok".to_owned(),
                    subagent_session_id: child.session_id.clone(),
                })
                .await;
            if let Err(status) = resolved
                && status.code() != tonic::Code::FailedPrecondition
            {
                return Watch::Broken;
            }
        }
    }
}

struct Run {
    tree: Tree,
    streamed: Vec<u64>,
    restarts: usize,
}

async fn run(cluster: &mut Cluster, key: &str, kill: Option<&Kill>) -> Run {
    if let Some(Kill::Hook(point)) = kill {
        cluster.kill_control_plane().await.unwrap();
        let hook = [("HARNESS_CRASH_AT".to_owned(), point.clone())];
        cluster.restart_control_plane(&hook).await.unwrap();
    }
    let (parent, mut restarts) = start(cluster, key).await;
    let mut seen = Vec::new();
    let mut trigger = kill.filter(|kill| !matches!(kill, Kill::Hook(_)));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let watched =
            tokio::time::timeout_at(deadline.into(), watch(cluster, &parent, &mut seen, trigger))
                .await;
        let Ok(end) = watched else {
            panic!("run {key} did not finish in 60s\n{}", cluster.logs());
        };
        match end {
            Watch::Finished => break,
            Watch::KillNow => {
                cluster.kill_control_plane().await.unwrap();
                trigger = None;
            }
            Watch::Broken => {
                if let Err(error) = cluster
                    .wait_control_plane_exit(Duration::from_secs(10))
                    .await
                {
                    panic!(
                        "{error:#}: the stream broke but the control plane lives\n{}",
                        cluster.logs()
                    );
                }
            }
        }
        cluster.restart_control_plane(&[]).await.unwrap();
        restarts += 1;
    }
    let parent_events = crate::support::events(cluster, &parent, 0).await;
    let mut children = BTreeMap::new();
    for child in children_of(cluster, &parent).await.unwrap() {
        let events = crate::support::events(cluster, &child.session_id, 0).await;
        children.insert(child.agent.clone(), events);
    }
    Run {
        tree: Tree {
            parent: parent_events,
            children,
        },
        streamed: seen.iter().map(|event| event.seq).collect(),
        restarts,
    }
}

/// The contents `read_file` returned in the parent's reading turn.
fn read_back(events: &[control::SessionEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::ToolFinished(finished)) if finished.tool == "read_file" => {
                match &finished.outcome {
                    Some(control::tool_finished::Outcome::OutputJson(json)) => {
                        let output: serde_json::Value = serde_json::from_str(json).unwrap();
                        Some(output["content"].as_str().unwrap().to_owned())
                    }
                    other => panic!("read_file failed: {other:?}"),
                }
            }
            _ => None,
        })
        .collect()
}

/// (model, turn) → how often it was asked, among `requests`.
fn asked(models: &[(&str, &FakeModel)], before: &[usize]) -> BTreeMap<(String, usize), usize> {
    let mut asked = BTreeMap::new();
    for ((name, model), skip) in models.iter().zip(before) {
        for request in model.requests().iter().skip(*skip) {
            let turn = request.body["messages"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|message| message["role"] == "assistant")
                .count();
            *asked.entry(((*name).to_owned(), turn)).or_default() += 1;
        }
    }
    asked
}

#[tokio::test]
async fn a_tree_killed_at_twenty_points_ends_like_an_uninterrupted_one() {
    let boss = FakeModel::start(WireFormat::OpenAi, boss_script())
        .await
        .unwrap();
    let left = FakeModel::start(WireFormat::OpenAi, child_script("left", "approve-left-02"))
        .await
        .unwrap();
    let right = FakeModel::start(WireFormat::OpenAi, child_script("right", "right-02"))
        .await
        .unwrap();
    for model in [&boss, &left, &right] {
        // Every run shares these servers: their caches would report reads
        // to later runs that the reference run never saw.
        model.set_prompt_cache(false);
        model.set_shape(StreamShape {
            event_delay: Duration::from_millis(3),
            ..StreamShape::default()
        });
    }
    let agents = tempfile::tempdir().unwrap();
    let files = [
        (
            "boss.toml",
            agent_file(
                "boss",
                &boss,
                r#"["tally", "read_file"]"#,
                "subagents = [\"left\", \"right\"]\n",
            ),
        ),
        (
            "left.toml",
            agent_file(
                "left",
                &left,
                r#"["tally"]"#,
                "[[policy.rule]]\ntool = \"tally\"\nwhen = { label = \"approve-*\" }\nverdict = \"ask\"\nreason = \"approval test\"\n",
            ),
        ),
        (
            "right.toml",
            agent_file("right", &right, r#"["tally"]"#, ""),
        ),
    ];
    for (name, contents) in &files {
        std::fs::write(agents.path().join(name), contents).unwrap();
    }
    let tools = ["tally", "read_file"]
        .map(|name| match name {
            "tally" => harness_tool_artifacts::test_tool_path(name),
            _ => harness_tool_artifacts::tool_path(name),
        })
        .to_vec();
    let mut cluster = Cluster::start_with(ClusterOptions {
        tools: Some(tools),
        ..ClusterOptions::new(agents.path())
    })
    .await
    .unwrap();
    let models = [("boss", &boss), ("left", &left), ("right", &right)];
    let counts = || {
        models
            .iter()
            .map(|(_, model)| model.requests().len())
            .collect::<Vec<_>>()
    };
    let started = Instant::now();

    let before = counts();
    let baseline = run(&mut cluster, "baseline", None).await;
    assert_eq!(baseline.restarts, 0);
    let expected = baseline.tree.transcripts();
    let baseline_asks = asked(&models, &before);
    assert!(
        baseline_asks.values().all(|count| *count == 1),
        "{baseline_asks:?}"
    );
    assert_eq!(baseline_asks.len(), 4 + 3 + 3);
    assert_eq!(
        read_back(&baseline.tree.parent),
        [
            "b-01\n",
            "left-01\napprove-left-02\n",
            "right-01\nright-02\n"
        ]
    );
    assert_eq!(baseline.tree.children.len(), 2);

    for (index, (name, kill)) in kill_points().iter().enumerate() {
        let label = format!("kill point {}: {name}", index + 1);
        let before = counts();
        let result = run(&mut cluster, &format!("run-{index}"), Some(kill)).await;
        assert_eq!(
            result.restarts,
            1,
            "{label}: the control plane died once\n{}",
            cluster.logs()
        );
        assert_gap_free(
            &result.streamed,
            &format!("{label}: parent stream across the restart"),
        );
        for (agent, events) in std::iter::once(("boss", &result.tree.parent)).chain(
            result
                .tree
                .children
                .iter()
                .map(|(agent, events)| (agent.as_str(), events)),
        ) {
            let seqs: Vec<u64> = events.iter().map(|event| event.seq).collect();
            assert_gap_free(&seqs, &format!("{label}: {agent}'s log"));
        }
        // Each tally line once: nothing ran twice.
        assert_eq!(
            read_back(&result.tree.parent),
            [
                "b-01\n",
                "left-01\napprove-left-02\n",
                "right-01\nright-02\n"
            ],
            "{label}"
        );
        // Every model turn asked once, except those in flight at the kill
        // (at most the two children's at once, or the parent's).
        let asks = asked(&models, &before);
        assert_eq!(asks.len(), 10, "{label}: {asks:?}");
        let repeated: Vec<_> = asks.iter().filter(|(_, count)| **count > 1).collect();
        assert!(
            repeated.len() <= 2 && repeated.iter().all(|(_, count)| **count == 2),
            "{label}: turns asked again: {repeated:?}"
        );
        let actual = result.tree.transcripts();
        if actual != expected {
            let first_difference = actual
                .iter()
                .zip(&expected)
                .position(|(a, e)| a != e)
                .unwrap_or(actual.len().min(expected.len()));
            panic!(
                "{label}: transcript differs from the uninterrupted run at line {first_difference}:\n  got:      {:?}\n  expected: {:?}\n{}",
                actual.get(first_difference),
                expected.get(first_difference),
                cluster.logs()
            );
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(240),
        "took {:?}",
        started.elapsed()
    );
    cluster.stop().await.unwrap();
}
