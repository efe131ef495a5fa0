//! Delegation benchmarks (a bench binary, not run in CI).
//!
//! ```text
//! cargo bench -p harness-control-plane --bench delegation             # both
//! cargo bench -p harness-control-plane --bench delegation -- overhead  # (c)
//! cargo bench -p harness-control-plane --bench delegation -- tree      # (d)
//! ```
//!
//! A whole control plane in-process (`ControlPlane::from_parts`: SQLite
//! store, supervisor, the `delegate_to_*` tools), sessions started through
//! its `ControlService`, an instant fake sandbox and fake models.
//!
//! (c) **Harness overhead of one delegation.** A supervisor whose model
//! answers at once delegates one task to a worker whose model answers at
//! once; the delegation's cost is the time from the parent's
//! `subagent_started` to its `subagent_finished` (both recorded by the
//! store): creating the child session, its whole durable lifecycle (started,
//! one model turn, finished), following its log and building the receipt.
//! Compared in the same run with a top-level one-turn session of the same
//! worker (StartSession → finished), the cost a delegation cannot avoid.
//!
//! (d) **Trees under load.** `BENCH_SUPERVISORS` (default 100) supervisors
//! at once, each delegating to 4 workers in one turn; every model answers
//! after 50 ms; each worker makes one tool call. The overhead of a step is
//! the time from a model's answer to the session's next model request; for
//! a supervisor's delegation step, the span its children's model calls
//! covered (first child request to last child answer) is subtracted. It
//! also prints the CPU the burst used, and the delegation step phase by
//! phase (from the logs' event times and the model's request and answer
//! times): to the first `subagent_started`, to the last child's `started`,
//! to the first child request, from the last child answer to its
//! `finished`, to the parent's last `subagent_finished`, to its next
//! request.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use harness_control_plane::agent::{
    Agent, AgentCatalog, AgentDefinition, ConversationSettings, DelegationSettings, ProviderKind,
    SandboxSettings, StructuredOutput,
};
use harness_control_plane::agent_loop::LoopSettings;
use harness_control_plane::provider::{
    CompletedTurn, Message, ModelProvider, ModelRequest, ModelStream, ModelStreamEvent, TokenUsage,
    ToolCall,
};
use harness_control_plane::sandbox::{InvocationOutcome, SandboxDispatch, SandboxError};
use harness_control_plane::server::{ControlPlane, ControlPlaneParts};
use harness_control_plane::store::SqliteStore;
use harness_proto::control::v1 as control;
use harness_proto::control::v1::control_service_server::ControlService;
use harness_proto::control::v1::session_event::Kind;
use harness_proto::sandbox::v1 as sandbox;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|arg| !arg.starts_with('-'))
        .collect();
    let wants = |name: &str| which.is_empty() || which.iter().any(|arg| arg == name);
    harness_control_plane::server::disable_transparent_huge_pages();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "machine: {} cores, tokio multi-thread runtime",
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    if wants("overhead") {
        runtime.block_on(delegation_overhead(env_number("BENCH_DELEGATIONS", 300)));
    }
    if wants("tree") {
        runtime.block_on(trees(env_number("BENCH_SUPERVISORS", 100), 4));
    }
}

/// (request, answer) times of each model call, by the session's first user
/// message.
type Timings = Arc<Mutex<HashMap<String, Vec<(Instant, Option<Instant>)>>>>;

/// A model that answers after `latency`: a supervisor delegates `children`
/// tasks in its first turn; a worker makes `worker_calls` tool calls first.
#[derive(Debug)]
struct FakeModel {
    latency: Duration,
    children: usize,
    worker_calls: usize,
    timings: Timings,
}

impl ModelProvider for FakeModel {
    fn stream_turn(&self, request: ModelRequest) -> ModelStream {
        let requested = Instant::now();
        let input = request
            .messages
            .iter()
            .find_map(|message| match message {
                Message::User { text } => Some(text.clone()),
                _ => None,
            })
            .unwrap_or_default();
        let turn = request
            .messages
            .iter()
            .filter(|message| matches!(message, Message::Assistant { .. }))
            .count();
        let index = {
            let mut timings = self.timings.lock().unwrap();
            let calls = timings.entry(input.clone()).or_default();
            calls.push((requested, None));
            calls.len() - 1
        };
        let tool_calls: Vec<ToolCall> = if input.starts_with("boss") {
            if turn == 0 {
                (0..self.children)
                    .map(|part| ToolCall {
                        call_id: format!("call_{part}"),
                        tool: "delegate_to_worker".to_owned(),
                        arguments_json: format!(r#"{{"task":"work for {input} part {part}"}}"#),
                    })
                    .collect()
            } else {
                Vec::new()
            }
        } else if turn < self.worker_calls {
            vec![ToolCall {
                call_id: format!("call_{turn}"),
                tool: "echo".to_owned(),
                arguments_json: "{}".to_owned(),
            }]
        } else {
            Vec::new()
        };
        let timings = Arc::clone(&self.timings);
        let latency = self.latency;
        Box::pin(futures::stream::once(async move {
            if !latency.is_zero() {
                tokio::time::sleep(latency).await;
            }
            if let Some(call) = timings
                .lock()
                .unwrap()
                .get_mut(&input)
                .and_then(|calls| calls.get_mut(index))
            {
                call.1 = Some(Instant::now());
            }
            Ok(ModelStreamEvent::Completed(CompletedTurn {
                text: format!("turn {turn}"),
                stop_reason: if tool_calls.is_empty() {
                    "end_turn"
                } else {
                    "tool_use"
                }
                .to_owned(),
                tool_calls,
                usage: TokenUsage {
                    input_tokens: 100,
                    output_tokens: 10,
                    cached_input_tokens: 0,
                    cache_write_tokens: 0,
                },
            }))
        }))
    }
}

/// A sandbox that answers every call at once.
#[derive(Debug, Default)]
struct InstantSandbox;

impl SandboxDispatch for InstantSandbox {
    fn create_session(
        &self,
        _request: sandbox::CreateSessionRequest,
    ) -> BoxFuture<'_, Result<String, SandboxError>> {
        Box::pin(async { Ok(format!("sb-{}", fastrand::u64(..))) })
    }

    fn list_tools(&self) -> BoxFuture<'_, Result<Vec<sandbox::Tool>, SandboxError>> {
        Box::pin(async {
            Ok(vec![sandbox::Tool {
                name: "echo".to_owned(),
                description: "echo".to_owned(),
                input_schema_json: r#"{"type":"object"}"#.to_owned(),
                ..Default::default()
            }])
        })
    }

    fn invoke(
        &self,
        _request: sandbox::InvokeRequest,
    ) -> BoxFuture<'_, Result<InvocationOutcome, SandboxError>> {
        Box::pin(async {
            Ok(InvocationOutcome {
                output: Vec::new(),
                result: sandbox::InvokeResult {
                    outcome: Some(sandbox::invoke_result::Outcome::Ok(
                        sandbox::InvokeSuccess {
                            output_json: "{}".to_owned(),
                            exit_status: None,
                        },
                    )),
                    usage: None,
                    replayed: false,
                },
            })
        })
    }

    fn destroy_session(
        &self,
        _session_id: String,
        _reason: String,
    ) -> BoxFuture<'_, Result<sandbox::TeardownReport, SandboxError>> {
        Box::pin(async { Ok(sandbox::TeardownReport::default()) })
    }

    fn read_files(
        &self,
        request: sandbox::ReadFilesRequest,
    ) -> BoxFuture<'_, Result<Vec<sandbox::FileContent>, SandboxError>> {
        let files = request
            .paths
            .into_iter()
            .map(|path| sandbox::FileContent {
                path,
                missing: true,
                ..Default::default()
            })
            .collect();
        Box::pin(async move { Ok(files) })
    }
}

fn definition(name: &str, tools: &[&str], subagents: &[&str], parallel: u32) -> AgentDefinition {
    AgentDefinition {
        name: name.to_owned(),
        description: format!("the {name}"),
        provider: ProviderKind::Scripted,
        model: "fake".to_owned(),
        script: None,
        base_url: None,
        api_key_env: None,
        max_tokens_per_turn: None,
        system_prompt: format!("You are the {name}."),
        skills: Vec::new(),
        tools: tools.iter().map(|tool| (*tool).to_owned()).collect(),
        budget: control::BudgetLimits {
            max_turns: Some(10),
            ..Default::default()
        },
        policy: Default::default(),
        sandbox: SandboxSettings::default(),
        conversation: ConversationSettings::default(),
        max_repeated_calls: 0,
        delegation: DelegationSettings {
            subagents: subagents.iter().map(|name| (*name).to_owned()).collect(),
            max_parallel_subagents: parallel,
            max_children: 64,
            ..DelegationSettings::default()
        },
        output: StructuredOutput::default(),
        source: PathBuf::from(format!("{name}.toml")),
    }
}

struct Plane {
    _dir: tempfile::TempDir,
    plane: ControlPlane,
}

async fn plane(model: Arc<FakeModel>, children: u32) -> Plane {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("cp.db")).await.unwrap();
    let boss = Agent::new(
        definition("boss", &[], &["worker"], children.max(1)),
        model.clone(),
    )
    .unwrap();
    let worker = Agent::new(definition("worker", &["echo"], &[], 1), model).unwrap();
    let agents = AgentCatalog::from_agents([boss, worker]).unwrap();
    let plane = ControlPlane::from_parts(ControlPlaneParts {
        store: Arc::new(store),
        sandbox: Arc::new(InstantSandbox),
        agents,
        settings: LoopSettings::new(Duration::from_secs(30), 4),
    })
    .await
    .unwrap();
    Plane { _dir: dir, plane }
}

/// Starts a session and returns its whole log once it finished.
async fn run_session(plane: &ControlPlane, agent: &str, input: &str) -> Vec<control::SessionEvent> {
    let service = plane.service();
    let session = service
        .start_session(tonic::Request::new(control::StartSessionRequest {
            agent: agent.to_owned(),
            input: input.to_owned(),
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap();
    let mut stream = service
        .stream_events(tonic::Request::new(control::StreamEventsRequest {
            session_id: session.session_id,
            after_seq: 0,
            follow: false,
        }))
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = futures::StreamExt::next(&mut stream).await {
        events.push(event.unwrap());
    }
    let finished = matches!(
        events.last().and_then(|event| event.kind.as_ref()),
        Some(Kind::Finished(finished)) if finished.stop_reason() == control::StopReason::Completed
    );
    assert!(finished, "the benchmark session completed");
    events
}

fn time(event: &control::SessionEvent) -> Duration {
    let time = event.time.unwrap();
    Duration::new(
        u64::try_from(time.seconds).unwrap(),
        u32::try_from(time.nanos).unwrap(),
    )
}

fn percentile(sorted: &[Duration], percent: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((percent / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    format!(
        "p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} samples)",
        percentile(&samples, 50.0).as_secs_f64() * 1e3,
        percentile(&samples, 99.0).as_secs_f64() * 1e3,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        samples.len()
    )
}

async fn delegation_overhead(delegations: usize) {
    println!(
        "\n(c) harness overhead of one delegation: {delegations} supervisors, one at a time, each delegating once (instant model and sandbox)"
    );
    let model = Arc::new(FakeModel {
        latency: Duration::ZERO,
        children: 1,
        worker_calls: 0,
        timings: Arc::default(),
    });
    let plane = plane(model, 1).await;
    // Warm up.
    for index in 0..20 {
        run_session(&plane.plane, "boss", &format!("boss warm {index}")).await;
    }
    let mut delegation = Vec::with_capacity(delegations);
    let mut baseline = Vec::with_capacity(delegations);
    for index in 0..delegations {
        let events = run_session(&plane.plane, "boss", &format!("boss {index}")).await;
        let at = |wanted: fn(&Kind) -> bool| {
            events
                .iter()
                .find(|event| event.kind.as_ref().is_some_and(wanted))
                .map(time)
                .unwrap()
        };
        let started = at(|kind| matches!(kind, Kind::SubagentStarted(_)));
        let finished = at(|kind| matches!(kind, Kind::SubagentFinished(_)));
        delegation.push(finished.saturating_sub(started));
        // The same worker as a top-level session, start to finish.
        let begun = Instant::now();
        run_session(&plane.plane, "worker", &format!("solo {index}")).await;
        baseline.push(begun.elapsed());
    }
    println!(
        "  one delegation (subagent_started → subagent_finished): {}",
        summary(delegation.clone())
    );
    println!(
        "  peer: the worker as a top-level session (StartSession → finished): {}",
        summary(baseline.clone())
    );
    delegation.sort();
    baseline.sort();
    println!(
        "  ratio delegation / top-level session: p50 {:.2}x, p99 {:.2}x",
        percentile(&delegation, 50.0).as_secs_f64() / percentile(&baseline, 50.0).as_secs_f64(),
        percentile(&delegation, 99.0).as_secs_f64() / percentile(&baseline, 99.0).as_secs_f64()
    );
}

async fn trees(supervisors: usize, children: usize) {
    println!(
        "\n(d) {supervisors} supervisors at once x {children} workers each, every model answer after 50 ms, one tool call per worker"
    );
    let timings: Timings = Arc::default();
    let model = Arc::new(FakeModel {
        latency: Duration::from_millis(50),
        children,
        worker_calls: 1,
        timings: Arc::clone(&timings),
    });
    let plane = Arc::new(plane(model, u32::try_from(children).unwrap()).await);
    let cpu_before = process_cpu();
    let started = Instant::now();
    let wall_started = std::time::SystemTime::now();
    let mut runs = Vec::new();
    for index in 0..supervisors {
        let plane = Arc::clone(&plane);
        runs.push(tokio::spawn(async move {
            // Independent callers: starts spread over one model latency.
            tokio::time::sleep(Duration::from_micros((index * 500) as u64 % 50_000)).await;
            let input = format!("boss {index}");
            let events = run_session(&plane.plane, "boss", &input).await;
            (input, events)
        }));
    }
    let mut logs = HashMap::new();
    for run in runs {
        let (input, events) = run.await.unwrap();
        logs.insert(input, events);
    }
    let elapsed = started.elapsed();
    let cpu = process_cpu().saturating_sub(cpu_before);
    let since_start = |instant: Instant| {
        instant.duration_since(started)
            + wall_started.duration_since(std::time::UNIX_EPOCH).unwrap()
    };
    // Each supervisor's children's logs, read before the timings are locked.
    let mut child_logs: HashMap<String, Vec<Vec<control::SessionEvent>>> = HashMap::new();
    for (input, events) in &logs {
        for event in events {
            if let Some(Kind::SubagentStarted(started)) = &event.kind {
                let child_events = child_log(&plane.plane, &started.child_session_id).await;
                child_logs
                    .entry(input.clone())
                    .or_default()
                    .push(child_events);
            }
        }
    }
    let mut phases: Vec<Vec<Duration>> = vec![Vec::new(); 6];
    {
        let timings = timings.lock().unwrap();
        for (input, events) in &logs {
            let calls = &timings[input];
            let of_kind = |events: &[control::SessionEvent], wanted: fn(&Kind) -> bool| {
                events
                    .iter()
                    .filter(|event| event.kind.as_ref().is_some_and(wanted))
                    .map(time)
                    .collect::<Vec<_>>()
            };
            let started_at = of_kind(events, |kind| matches!(kind, Kind::SubagentStarted(_)));
            let finished_at = of_kind(events, |kind| matches!(kind, Kind::SubagentFinished(_)));
            let mut child_started = Vec::new();
            let mut child_finished = Vec::new();
            for child_events in &child_logs[input] {
                child_started.extend(of_kind(child_events, |kind| {
                    matches!(kind, Kind::Started(_))
                }));
                child_finished.extend(of_kind(child_events, |kind| {
                    matches!(kind, Kind::Finished(_))
                }));
            }
            let prefix = format!("work for {input} part ");
            let child_calls: Vec<&(Instant, Option<Instant>)> = timings
                .iter()
                .filter(|(child, _)| child.starts_with(&prefix))
                .flat_map(|(_, calls)| calls)
                .collect();
            let first_child_request =
                since_start(child_calls.iter().map(|call| call.0).min().unwrap());
            let last_child_answer =
                since_start(child_calls.iter().filter_map(|call| call.1).max().unwrap());
            let answer = since_start(calls[0].1.unwrap());
            let next_request = since_start(calls[1].0);
            let min = |times: &[Duration]| times.iter().min().copied().unwrap();
            let max = |times: &[Duration]| times.iter().max().copied().unwrap();
            phases[0].push(min(&started_at).saturating_sub(answer));
            phases[1].push(max(&child_started).saturating_sub(min(&started_at)));
            phases[2].push(first_child_request.saturating_sub(min(&child_started)));
            phases[3].push(max(&child_finished).saturating_sub(last_child_answer));
            phases[4].push(max(&finished_at).saturating_sub(max(&child_finished)));
            phases[5].push(next_request.saturating_sub(max(&finished_at)));
        }
    }
    let timings = timings.lock().unwrap();
    let mut worker_steps = Vec::new();
    let mut supervisor_steps = Vec::new();
    for (input, calls) in timings.iter() {
        let gaps: Vec<Duration> = calls
            .windows(2)
            .map(|pair| pair[1].0.duration_since(pair[0].1.unwrap()))
            .collect();
        if !input.starts_with("boss") {
            worker_steps.extend(gaps);
            continue;
        }
        // The children's model calls during the delegation step.
        let prefix = format!("work for {input} part ");
        let child_calls: Vec<&(Instant, Option<Instant>)> = timings
            .iter()
            .filter(|(child, _)| child.starts_with(&prefix))
            .flat_map(|(_, calls)| calls)
            .collect();
        let first = child_calls.iter().map(|call| call.0).min().unwrap();
        let last = child_calls.iter().filter_map(|call| call.1).max().unwrap();
        for gap in gaps {
            supervisor_steps.push(gap.saturating_sub(last.duration_since(first)));
        }
    }
    println!(
        "  {} sessions in {:.2} s, {:.2} CPU-s ({:.2} ms of CPU per session)",
        timings.len(),
        elapsed.as_secs_f64(),
        cpu.as_secs_f64(),
        cpu.as_secs_f64() * 1e3 / timings.len() as f64
    );
    println!(
        "  worker step overhead (answer → next request): {}",
        summary(worker_steps)
    );
    println!(
        "  supervisor delegation step overhead (answer → next request, minus the span of its children's model calls): {}",
        summary(supervisor_steps)
    );
    let names = [
        "supervisor answer -> first subagent_started",
        "first subagent_started -> last child started",
        "first child started -> first child model request",
        "last child answer -> last child finished",
        "last child finished -> last subagent_finished",
        "last subagent_finished -> supervisor's next request",
    ];
    for (name, samples) in names.iter().zip(phases) {
        println!("    {name}: {}", summary(samples));
    }
}

/// CPU time (user + system) this process used so far.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The fields after the command name (which may hold spaces).
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // Linux reports these in USER_HZ, 100 per second on every architecture it runs here.
    Duration::from_millis(ticks * 10)
}

/// A finished session's whole log.
async fn child_log(plane: &ControlPlane, session_id: &str) -> Vec<control::SessionEvent> {
    let mut stream = plane
        .service()
        .stream_events(tonic::Request::new(control::StreamEventsRequest {
            session_id: session_id.to_owned(),
            after_seq: 0,
            follow: false,
        }))
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = futures::StreamExt::next(&mut stream).await {
        events.push(event.unwrap());
    }
    events
}
