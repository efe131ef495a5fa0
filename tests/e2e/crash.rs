//! The crash test: the control plane is killed at 20 different points of a
//! session and restarted each time; every run must end with the transcript
//! of an uninterrupted run, without running any tool call twice and with a
//! gap-free, duplicate-free event sequence.
//!
//! The session: 11 model turns with 14 tool calls (one turn with two in
//! parallel, one asking for approval, one reading everything back), then a
//! final answer. The model is a fake OpenAI-compatible server in this test
//! process, streaming slowly over HTTP, so a kill mid-stream is a kill
//! mid-stream. The tool is sandboxd's `tally` test tool, which appends a
//! line to a workspace file and returns the line count: a call run twice
//! shows as a doubled line and shifted counts.
//!
//! Kill points come in two kinds. Deterministic ones use the control
//! plane's `HARNESS_CRASH_AT` test hook (it SIGKILLs itself right after a
//! given event is committed, once sandboxd acknowledged its nth invocation,
//! or once its nth model response started). The others are SIGKILLs sent by
//! this test the moment it sees a given event on `StreamEvents`, wherever
//! the control plane happens to be by then.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use harness_e2e::{Cluster, ClusterOptions};
use harness_fake_model::{FakeModel, FakeTurn, StreamShape, WireFormat};
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;

use crate::support::kinds;

/// The labels tallied into `count.txt`, in order.
const COUNT_LABELS: [&str; 9] = [
    "step-01",
    "step-02",
    "approve-04",
    "step-05",
    "step-06",
    "step-07",
    "step-08",
    "step-09",
    "step-10",
];

fn tally(file: &str, label: &str) -> String {
    format!(r#"{{"file":"{file}","label":"{label}"}}"#)
}

/// Turn N (1-based) is `script()[N - 1]`.
fn script() -> Vec<FakeTurn> {
    let mut turns = vec![
        FakeTurn::text("Step one: tally.").with_call("tally", &tally("count.txt", "step-01")),
        FakeTurn::text("Step two.").with_call("tally", &tally("count.txt", "step-02")),
        FakeTurn::text("Two files at once.")
            .with_call("tally", &tally("a.txt", "p-a"))
            .with_call("tally", &tally("b.txt", "p-b")),
        FakeTurn::text("This one needs approval.")
            .with_call("tally", &tally("count.txt", "approve-04")),
    ];
    for step in 5..=10 {
        turns.push(
            FakeTurn::text(&format!("Step {step}, carefully."))
                .with_call("tally", &tally("count.txt", &format!("step-{step:02}"))),
        );
    }
    turns.push(
        FakeTurn::text("Reading everything back.")
            .with_call("read_file", r#"{"path":"count.txt"}"#)
            .with_call("read_file", r#"{"path":"a.txt"}"#)
            .with_call("read_file", r#"{"path":"b.txt"}"#),
    );
    turns.push(FakeTurn::text("All steps done, each exactly once."));
    turns
}

fn agent_file(base_url: &str) -> String {
    format!(
        r#"
name = "crasher"
description = "Tallies ten steps, one with approval, and reads the tallies back"
provider = "openai"
model = "fake-crash-model"
base-url = "{base_url}"
system-prompt = "Count carefully."
tools = ["tally", "read_file"]
max-turns = 20

[[policy.rule]]
tool = "tally"
when = {{ label = "approve-*" }}
verdict = "ask"
reason = "approval test"
"#
    )
}

/// Where a run is killed.
#[derive(Debug, Clone)]
enum Kill {
    /// The control plane SIGKILLs itself at this `HARNESS_CRASH_AT` point.
    Hook(String),
    /// The test SIGKILLs it on seeing the `nth` (0-based) event of `kind` in `turn`.
    OnEvent {
        kind: &'static str,
        turn: u32,
        nth: usize,
    },
}

impl Kill {
    fn matches(&self, event: &control::SessionEvent, seen: &[control::SessionEvent]) -> bool {
        let Self::OnEvent { kind, turn, nth } = self else {
            return false;
        };
        let is = |e: &control::SessionEvent| {
            e.turn == *turn
                && e.kind.as_ref().map(harness_control_plane::event::kind_name) == Some(*kind)
        };
        is(event) && seen.iter().filter(|e| is(e)).count() == nth + 1
    }
}

/// The seq of the `nth` event of `kind` in `turn` of the baseline.
fn seq_of(baseline: &[control::SessionEvent], kind: &str, turn: u32, nth: usize) -> u64 {
    baseline
        .iter()
        .filter(|event| {
            event.turn == turn
                && event
                    .kind
                    .as_ref()
                    .map(harness_control_plane::event::kind_name)
                    == Some(kind)
        })
        .nth(nth)
        .unwrap_or_else(|| panic!("no {kind} #{nth} in turn {turn}"))
        .seq
}

/// Twenty kill points: between events, mid model stream, mid tool call and
/// while awaiting approval.
fn kill_points(baseline: &[control::SessionEvent]) -> Vec<(&'static str, Kill)> {
    let after =
        |kind, turn, nth| Kill::Hook(format!("after-event:{}", seq_of(baseline, kind, turn, nth)));
    vec![
        ("after `started`", after("started", 0, 0)),
        (
            "mid model stream: after turn 1's first text delta",
            after("text_delta", 1, 0),
        ),
        (
            "after turn 1's call is recorded, before it is sent",
            after("tool_started", 1, 0),
        ),
        (
            "after turn 1's result, before the next model call",
            after("tool_finished", 1, 0),
        ),
        (
            "mid model stream: after a text delta of the parallel turn",
            after("text_delta", 3, 1),
        ),
        (
            "after both parallel calls are recorded",
            after("tool_started", 3, 1),
        ),
        (
            "while awaiting approval (hook)",
            after("approval_requested", 4, 0),
        ),
        (
            "right after the approval is committed, before the loop sees it",
            after("approval_resolved", 4, 0),
        ),
        (
            "after the approved call's result",
            after("tool_finished", 4, 0),
        ),
        (
            "after the last text delta of the final answer",
            after("text_delta", 12, 3),
        ),
        (
            "mid tool call: sandboxd acknowledged the 1st invocation",
            Kill::Hook("after-invoke-sent:1".to_owned()),
        ),
        (
            "mid tool call: a parallel invocation in flight",
            Kill::Hook("after-invoke-sent:4".to_owned()),
        ),
        (
            "mid tool call: a read_file in flight",
            Kill::Hook("after-invoke-sent:13".to_owned()),
        ),
        (
            "model response 1 started, nothing recorded",
            Kill::Hook("after-model-response:1".to_owned()),
        ),
        (
            "model response 7 started, nothing recorded",
            Kill::Hook("after-model-response:7".to_owned()),
        ),
        (
            "SIGKILL on turn 6's first text delta (mid stream)",
            Kill::OnEvent {
                kind: "text_delta",
                turn: 6,
                nth: 0,
            },
        ),
        (
            "SIGKILL on approval_requested (awaiting approval)",
            Kill::OnEvent {
                kind: "approval_requested",
                turn: 4,
                nth: 0,
            },
        ),
        (
            "SIGKILL on turn 8's tool_started (mid tool call)",
            Kill::OnEvent {
                kind: "tool_started",
                turn: 8,
                nth: 0,
            },
        ),
        (
            "SIGKILL on turn 9's tool_finished",
            Kill::OnEvent {
                kind: "tool_finished",
                turn: 9,
                nth: 0,
            },
        ),
        (
            "SIGKILL on turn 11's second text delta (mid stream)",
            Kill::OnEvent {
                kind: "text_delta",
                turn: 11,
                nth: 1,
            },
        ),
    ]
}

/// What one run saw.
struct Run {
    /// The session's whole log, read after it finished.
    events: Vec<control::SessionEvent>,
    /// Sequence numbers as a follower saw them, across every reconnect.
    streamed: Vec<u64>,
    /// Control-plane restarts during the run.
    restarts: usize,
}

/// How one StreamEvents connection ended.
enum StreamEnd {
    Finished,
    Broken,
    KillNow,
}

/// Starts the session (idempotent by `key`). A kill point may take the
/// control plane down while it answers, so a connection-level failure is
/// retried: once the dying process has exited it is restarted and the same
/// request (same key, same session) is sent again. Returns the session id
/// and the restarts this took.
async fn start_session(cluster: &mut Cluster, key: &str) -> (String, usize) {
    let mut restarts = 0;
    loop {
        let answer = match cluster.control().await {
            Ok(mut client) => client
                .start_session(control::StartSessionRequest {
                    agent: "crasher".to_owned(),
                    input: "Tally the steps.".to_owned(),
                    idempotency_key: key.to_owned(),
                    ..Default::default()
                })
                .await
                .map_err(|status| format!("{status:?}")),
            Err(error) => Err(format!("{error:#}")),
        };
        let failure = match answer {
            Ok(response) => {
                let session = response.into_inner().session.unwrap();
                return (session.session_id, restarts);
            }
            Err(failure) => failure,
        };
        // Only a control plane that died (or is dying) explains a failed
        // StartSession; one that lives and refused it is a real failure.
        if let Err(error) = cluster
            .wait_control_plane_exit(Duration::from_secs(10))
            .await
        {
            panic!(
                "StartSession failed ({failure}) and {error:#}\n{}",
                cluster.logs()
            );
        }
        assert!(
            restarts < 3,
            "StartSession failed after {restarts} restarts: {failure}"
        );
        cluster.restart_control_plane(&[]).await.unwrap();
        restarts += 1;
    }
}

/// Allows the pending call; false if the control plane could not be asked.
async fn approve(cluster: &Cluster, session_id: &str, call_id: &str) -> bool {
    let Ok(mut client) = cluster.control().await else {
        return false;
    };
    let answer = client
        .resolve_approval(control::ResolveApprovalRequest {
            session_id: session_id.to_owned(),
            call_id: call_id.to_owned(),
            decision: control::ApprovalDecision::Allow.into(),
            reason: "ok".to_owned(),
            ..Default::default()
        })
        .await;
    match answer {
        Ok(_) => true,
        // Already resolved (the answer got in before a crash): fine.
        Err(status) => status.code() == tonic::Code::FailedPrecondition,
    }
}

/// Follows the session from `after` until it finishes, the stream breaks, or
/// the kill trigger is seen; approves what waits for approval.
async fn follow(
    cluster: &Cluster,
    session_id: &str,
    seen: &mut Vec<control::SessionEvent>,
    waiting_approval: &mut Option<String>,
    kill: Option<&Kill>,
) -> StreamEnd {
    if let Some(call_id) = waiting_approval.clone()
        && !approve(cluster, session_id, &call_id).await
    {
        return StreamEnd::Broken;
    }
    let Ok(mut client) = cluster.control().await else {
        return StreamEnd::Broken;
    };
    let after_seq = seen.last().map_or(0, |event| event.seq);
    let stream = client
        .stream_events(control::StreamEventsRequest {
            session_id: session_id.to_owned(),
            after_seq,
            follow: true,
        })
        .await;
    let Ok(stream) = stream else {
        return StreamEnd::Broken;
    };
    let mut stream = stream.into_inner();
    while let Some(item) = stream.next().await {
        let Ok(event) = item else {
            return StreamEnd::Broken;
        };
        seen.push(event.clone());
        match &event.kind {
            Some(Kind::ApprovalRequested(request)) => {
                *waiting_approval = Some(request.call_id.clone());
            }
            Some(Kind::ApprovalResolved(_)) => *waiting_approval = None,
            _ => {}
        }
        if kill.is_some_and(|kill| kill.matches(&event, seen)) {
            return StreamEnd::KillNow;
        }
        if let Some(Kind::ApprovalRequested(request)) = &event.kind
            && !approve(cluster, session_id, &request.call_id).await
        {
            return StreamEnd::Broken;
        }
        if matches!(event.kind, Some(Kind::Finished(_))) {
            return StreamEnd::Finished;
        }
    }
    StreamEnd::Broken
}

/// Runs one session to its end, killing the control plane at `kill` (if
/// any) and restarting it after every death.
async fn run(cluster: &mut Cluster, key: &str, kill: Option<&Kill>) -> Run {
    if let Some(Kill::Hook(point)) = kill {
        cluster.kill_control_plane().await.unwrap();
        let hook = [("HARNESS_CRASH_AT".to_owned(), point.clone())];
        cluster.restart_control_plane(&hook).await.unwrap();
    }
    let (session_id, mut restarts) = start_session(cluster, key).await;
    let mut seen = Vec::new();
    let mut waiting_approval = None;
    let mut trigger = kill.filter(|kill| matches!(kill, Kill::OnEvent { .. }));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let followed = tokio::time::timeout_at(
            deadline.into(),
            follow(
                cluster,
                &session_id,
                &mut seen,
                &mut waiting_approval,
                trigger,
            ),
        )
        .await;
        let Ok(end) = followed else {
            panic!("run {key} did not finish in 60s\n{}", cluster.logs());
        };
        match end {
            StreamEnd::Finished => break,
            StreamEnd::KillNow => {
                cluster.kill_control_plane().await.unwrap();
                trigger = None;
            }
            StreamEnd::Broken => {
                // The hook killed it (or it is about to die): wait for that.
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
    let events = crate::support::events(cluster, &session_id, 0).await;
    Run {
        events,
        streamed: seen.iter().map(|event| event.seq).collect(),
        restarts,
    }
}

/// The transcript with what legitimately differs between runs removed:
/// times, ids of the session and its sandbox, tool wall time and memory.
pub(crate) fn transcript(events: &[control::SessionEvent]) -> Vec<String> {
    let session_id = events
        .first()
        .map(|e| e.session_id.clone())
        .unwrap_or_default();
    events
        .iter()
        .map(|event| {
            let mut kind = event.kind.clone().unwrap();
            match &mut kind {
                Kind::ToolStarted(started) => {
                    started.sandbox_session_id.clear();
                    started.invocation_id = started.invocation_id.replace(&session_id, "S");
                }
                Kind::ToolFinished(finished) => {
                    finished.wall_time = None;
                    finished.peak_memory_bytes = 0;
                }
                Kind::ApprovalRequested(request) => {
                    request.deadline = None;
                    request.session_id.clear();
                }
                Kind::Finished(finished) => {
                    if let Some(usage) = finished.usage.as_mut() {
                        usage.wall_clock = None;
                    }
                }
                Kind::SubagentFinished(finished) => {
                    if let Some(usage) = finished.usage.as_mut() {
                        usage.wall_clock = None;
                    }
                }
                _ => {}
            }
            format!("{} t{} {kind:?}", event.seq, event.turn)
        })
        .collect()
}

/// Outputs of the calls of `tool`, in order, as JSON.
fn outputs(events: &[control::SessionEvent], tool: &str) -> Vec<serde_json::Value> {
    events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::ToolFinished(finished)) if finished.tool == tool => {
                match &finished.outcome {
                    Some(control::tool_finished::Outcome::OutputJson(json)) => {
                        Some(serde_json::from_str(json).unwrap())
                    }
                    other => panic!("{tool} failed: {other:?}"),
                }
            }
            _ => None,
        })
        .collect()
}

/// Checks the tally: every label once, counts rising by one per call.
fn assert_each_call_ran_once(events: &[control::SessionEvent], run: &str) {
    let counts: Vec<u64> = outputs(events, "tally")
        .iter()
        .map(|output| output["count"].as_u64().unwrap())
        .collect();
    assert_eq!(
        counts,
        [1, 2, 1, 1, 3, 4, 5, 6, 7, 8, 9],
        "{run}: tally counts"
    );
    let files: BTreeMap<String, Vec<String>> = outputs(events, "read_file")
        .iter()
        .map(|output| {
            let lines = output["content"]
                .as_str()
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect();
            (output["path"].as_str().unwrap().to_owned(), lines)
        })
        .collect();
    assert_eq!(
        files,
        BTreeMap::from([
            ("a.txt".to_owned(), vec!["p-a".to_owned()]),
            ("b.txt".to_owned(), vec!["p-b".to_owned()]),
            (
                "count.txt".to_owned(),
                COUNT_LABELS.map(str::to_owned).to_vec()
            ),
        ]),
        "{run}: every tally label exactly once"
    );
}

pub(crate) fn assert_gap_free(seqs: &[u64], what: &str) {
    let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
    assert_eq!(
        seqs, expected,
        "{what}: sequence numbers must be 1..=N, no gap, no duplicate"
    );
}

#[tokio::test]
async fn killed_at_twenty_points_every_run_ends_like_an_uninterrupted_one() {
    let model = FakeModel::start(WireFormat::OpenAi, script())
        .await
        .unwrap();
    // Every run shares this server: its cache would report reads to later
    // runs that the reference run never saw.
    model.set_prompt_cache(false);
    // A slow stream, so that a kill on seeing a delta lands mid-stream.
    model.set_shape(StreamShape {
        event_delay: Duration::from_millis(3),
        ..StreamShape::default()
    });
    let agents = tempfile::tempdir().unwrap();
    std::fs::write(
        agents.path().join("crasher.toml"),
        agent_file(&model.base_url()),
    )
    .unwrap();
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
    let started = Instant::now();

    let baseline = run(&mut cluster, "baseline", None).await;
    assert_eq!(baseline.restarts, 0);
    assert_gap_free(&baseline.streamed, "baseline stream");
    assert_each_call_ran_once(&baseline.events, "baseline");
    let expected = transcript(&baseline.events);
    let last = baseline.events.last().unwrap();
    let Some(Kind::Finished(finished)) = &last.kind else {
        panic!("baseline did not finish: {:?}", kinds(&baseline.events));
    };
    assert_eq!(
        (finished.stop_reason(), finished.final_output.as_str()),
        (
            control::StopReason::Completed,
            "All steps done, each exactly once."
        )
    );
    let points = kill_points(&baseline.events);
    assert_eq!(points.len(), 20);

    for (index, (name, kill)) in points.iter().enumerate() {
        let label = format!("kill point {}: {name}", index + 1);
        let result = run(&mut cluster, &format!("run-{index}"), Some(kill)).await;
        assert_eq!(
            result.restarts,
            1,
            "{label}: the control plane died once\n{}",
            cluster.logs()
        );
        assert_gap_free(
            &result.streamed,
            &format!("{label}: stream across the restart"),
        );
        assert_gap_free(
            &result
                .events
                .iter()
                .map(|event| event.seq)
                .collect::<Vec<_>>(),
            &format!("{label}: stored log"),
        );
        assert_each_call_ran_once(&result.events, &label);
        let actual = transcript(&result.events);
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
    // The whole test (21 sessions, 20 kills and restarts) stays well inside CI's budget.
    assert!(
        started.elapsed() < Duration::from_secs(150),
        "took {:?}",
        started.elapsed()
    );
    cluster.stop().await.unwrap();
}
