//! Agent-loop benchmarks (a bench binary, not run in CI).
//!
//! ```text
//! cargo bench -p harness-control-plane --bench agent_loop            # both
//! cargo bench -p harness-control-plane --bench agent_loop -- steps     # (a)
//! cargo bench -p harness-control-plane --bench agent_loop -- sessions  # (b)
//! ```
//!
//! (a) **Durable steps in one session.** The scripted provider at zero
//! latency asks for one tool call per turn; the tool is sandboxd's `misbehave`
//! test tool with `{"action":"echo"}`, run by a real sandboxd served
//! in-process on a Unix socket (WASI instantiate + call per step). A step is
//! one model turn plus one tool call, both checkpointed in SQLite before the
//! loop moves on. Compared in the same run with the floor underneath it: the
//! same echo invoked on sandboxd directly, one call after another, with no
//! control plane. Run with SQLite `synchronous = NORMAL` (the default) and
//! `FULL`.
//!
//! (b) **Overhead under concurrency.** 1,000 sessions at once against a fake
//! model that answers after 50 ms, with an instant fake sandbox. The overhead
//! of a step is the time from the model's answer to the session's next
//! model request: recording the turn, dispatching and recording the call,
//! building the next request.
//!
//! Knobs (environment): `BENCH_STEPS` (a, default 1000), `BENCH_SESSIONS`
//! (b, default 1000), `BENCH_SESSION_STEPS` (b, default 10),
//! `BENCH_STAGGER_MS` (b: session starts spread over this, default 50 — one
//! model latency, as independent callers would; 0 starts all at once, which
//! makes every model answer arrive in the same millisecond),
//! `BENCH_SYNCHRONOUS` (b: `normal` or `full` runs only that one; default
//! both), `BENCH_MAX_WAL_BYTES` (the store's WAL limit; default 256 MiB).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use harness_control_plane::agent::{
    Agent, AgentDefinition, ConversationSettings, ProviderKind, SandboxSettings,
};
use harness_control_plane::agent_loop::{AgentLoop, LoopSettings};
use harness_control_plane::config::SqliteSynchronous;
use harness_control_plane::event_log::EventLog;
use harness_control_plane::ids::{SessionId, TenantId};
use harness_control_plane::provider::scripted::{
    Script, ScriptedProvider, ScriptedToolCall, ScriptedTurn,
};
use harness_control_plane::provider::{
    CompletedTurn, Message, ModelProvider, ModelRequest, ModelStream, ModelStreamEvent, TokenUsage,
    ToolCall,
};
use harness_control_plane::sandbox::{
    GrpcSandbox, InvocationOutcome, SandboxDispatch, SandboxError,
};
use harness_control_plane::store::{EventStore, NewSession, SqliteOptions, SqliteStore};
use harness_proto::control::v1 as control;
use harness_proto::sandbox::v1 as sandbox;
use harness_sandboxd::config::SandboxdConfig;
use harness_sandboxd::probe::HostProbe;
use harness_sandboxd::server::{Listener, serve};
use harness_sandboxd::service::Sandboxd;
use tokio::sync::watch;

/// The same allocator as the `control-plane` binary.
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
    // As the `control-plane serve` process does (`server::run`).
    harness_control_plane::server::disable_transparent_huge_pages();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Ok(workers) = std::env::var("BENCH_WORKERS") {
        builder.worker_threads(workers.parse().unwrap());
    }
    let runtime = builder.enable_all().build().unwrap();
    println!(
        "machine: {} cores, tokio multi-thread runtime ({} workers)",
        std::thread::available_parallelism().map_or(0, usize::from),
        std::thread::available_parallelism().map_or(0, usize::from),
    );
    if wants("steps") {
        runtime.block_on(durable_steps(env_number("BENCH_STEPS", 1000)));
    }
    if wants("sessions") {
        runtime.block_on(concurrent_sessions(
            env_number("BENCH_SESSIONS", 1000),
            env_number("BENCH_SESSION_STEPS", 10),
        ));
    }
}

fn definition(name: &str, tools: &[&str], max_turns: u32) -> AgentDefinition {
    AgentDefinition {
        name: name.to_owned(),
        description: String::new(),
        provider: ProviderKind::Scripted,
        model: "bench".to_owned(),
        script: None,
        base_url: None,
        api_key_env: None,
        max_tokens_per_turn: None,
        system_prompt: "Benchmark.".to_owned(),
        skills: Vec::new(),
        tools: tools.iter().map(|tool| (*tool).to_owned()).collect(),
        budget: control::BudgetLimits {
            max_turns: Some(max_turns),
            ..Default::default()
        },
        policy: Default::default(),
        sandbox: SandboxSettings::default(),
        conversation: ConversationSettings::default(),
        // The steps repeat one call on purpose.
        max_repeated_calls: 0,
        delegation: harness_control_plane::agent::DelegationSettings::default(),
        output: harness_control_plane::agent::StructuredOutput::default(),
        source: Path::new("bench.toml").to_owned(),
    }
}

fn new_session(id: &str, agent: &str, input: &str, max_turns: u32) -> NewSession {
    NewSession {
        session_id: SessionId::new(id),
        tenant: TenantId::new("default"),
        agent: agent.to_owned(),
        input: input.to_owned(),
        metadata: HashMap::new(),
        budget: control::BudgetLimits {
            max_turns: Some(max_turns),
            ..Default::default()
        },
        idempotency_key: None,
        parent: None,
    }
}

// ---------------------------------------------------------------------------
// (a) durable steps per second in one session

struct InProcessSandboxd {
    endpoint: String,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn start_sandboxd() -> InProcessSandboxd {
    let dir = tempfile::tempdir().unwrap();
    let tools_dir = dir.path().join("tools");
    std::fs::create_dir_all(&tools_dir).unwrap();
    std::fs::copy(
        harness_tool_artifacts::test_tool_path("misbehave"),
        tools_dir.join("misbehave.wasm"),
    )
    .unwrap();
    let config = SandboxdConfig {
        listen: vec![
            format!("unix:{}", dir.path().join("sandboxd.sock").display())
                .parse()
                .unwrap(),
        ],
        state_dir: dir.path().join("state"),
        // A fresh compile cache per run: <state-dir>/cache.
        cache_dir: None,
        tools_dir,
        ..SandboxdConfig::default()
    };
    let daemon = Sandboxd::start(config.clone(), HostProbe::default())
        .await
        .unwrap();
    let listener = Listener::bind(&config.listen[0]).await.unwrap();
    let endpoint = listener.endpoint();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(daemon, listener, async {
        let _ = stopped.await;
    }));
    InProcessSandboxd {
        endpoint,
        _dir: dir,
        _stop: stop,
    }
}

fn echo_script(steps: usize) -> Script {
    let mut turns: Vec<ScriptedTurn> = (0..steps)
        .map(|step| {
            let mut arguments = toml::Table::new();
            arguments.insert("action".to_owned(), "echo".into());
            arguments.insert("value".to_owned(), i64::try_from(step).unwrap().into());
            ScriptedTurn {
                text: format!("Step {step}."),
                tool_calls: vec![ScriptedToolCall {
                    tool: "misbehave".to_owned(),
                    arguments,
                }],
            }
        })
        .collect();
    turns.push(ScriptedTurn {
        text: "Done.".to_owned(),
        tool_calls: Vec::new(),
    });
    Script { turns }
}

/// Runs one session of `steps` echo steps; returns the loop's wall time.
async fn one_session(
    sandbox: Arc<dyn SandboxDispatch>,
    synchronous: SqliteSynchronous,
    steps: usize,
) -> Duration {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteStore::open_with(&dir.path().join("cp.db"), bench_sqlite_options(synchronous))
            .await
            .unwrap(),
    );
    let (_shutdown, shutdown_signal) = watch::channel(false);
    let log = EventLog::new(store.clone(), shutdown_signal);
    let max_turns = u32::try_from(steps + 1).unwrap();
    let provider = ScriptedProvider::new(echo_script(steps), "bench");
    let agent = Arc::new(
        Agent::new(
            definition("bench", &["misbehave"], max_turns),
            Arc::new(provider),
        )
        .unwrap(),
    );
    let session = store
        .create_session(new_session("s1", "bench", "go", max_turns))
        .await
        .unwrap()
        .session;
    let agent_loop = AgentLoop::new(log, sandbox, LoopSettings::new(Duration::from_secs(30), 4));
    let (_cancel, cancel) = watch::channel(None);
    let started = Instant::now();
    agent_loop.run(session, agent, cancel).await;
    let elapsed = started.elapsed();
    let record = store
        .get_session(TenantId::new("default"), SessionId::new("s1"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (record.stop_reason, record.usage.tool_calls as usize),
        (control::StopReason::Completed, steps),
        "the benchmark session completed every step"
    );
    elapsed
}

async fn durable_steps(steps: usize) {
    println!("\n(a) durable steps in one session: {steps} steps (model turn + echo tool call)");
    let sandboxd = start_sandboxd().await;
    let sandbox: Arc<dyn SandboxDispatch> =
        Arc::new(GrpcSandbox::connect_lazy(&sandboxd.endpoint).unwrap());
    // Warm up: compile caches, connections.
    one_session(Arc::clone(&sandbox), SqliteSynchronous::Normal, 20).await;

    let floor = direct_invokes(&sandbox, steps).await;
    let floor_per_call = floor.as_secs_f64() / steps as f64;
    println!(
        "  floor: sandboxd echo invoked directly, sequentially: {:>6.0} calls/s ({:.3} ms/call)",
        1.0 / floor_per_call,
        floor_per_call * 1000.0
    );
    for (name, synchronous, steps) in [
        (
            "synchronous=NORMAL (default)",
            SqliteSynchronous::Normal,
            steps,
        ),
        ("synchronous=FULL", SqliteSynchronous::Full, steps.min(300)),
    ] {
        let elapsed = one_session(Arc::clone(&sandbox), synchronous, steps).await;
        let per_step = elapsed.as_secs_f64() / steps as f64;
        println!(
            "  control plane, {name:<29} {:>6.0} steps/s ({:.3} ms/step = {:.2}x the bare call; {steps} steps)",
            1.0 / per_step,
            per_step * 1000.0,
            per_step / floor_per_call
        );
    }
}

async fn direct_invokes(sandbox: &Arc<dyn SandboxDispatch>, calls: usize) -> Duration {
    let session_id = sandbox
        .create_session(sandbox::CreateSessionRequest::default())
        .await
        .unwrap();
    let started = Instant::now();
    for call in 0..calls {
        let outcome = sandbox
            .invoke(sandbox::InvokeRequest {
                session_id: session_id.clone(),
                invocation_id: format!("direct-{call}"),
                target: Some(sandbox::invoke_request::Target::Wasi(sandbox::WasiCall {
                    tool: "misbehave".to_owned(),
                    input_json: format!(r#"{{"action":"echo","value":{call}}}"#),
                })),
                timeout: None,
            })
            .await
            .unwrap();
        assert!(matches!(
            outcome.result.outcome,
            Some(sandbox::invoke_result::Outcome::Ok(_))
        ));
    }
    let elapsed = started.elapsed();
    sandbox
        .destroy_session(session_id, "bench done".to_owned())
        .await
        .unwrap();
    elapsed
}

// ---------------------------------------------------------------------------
// (b) 1,000 concurrent sessions against a 50 ms model

/// Per session (by its index, from its input `session <index>`): (request
/// time, answer time) of each turn.
type Timings = Arc<Vec<Mutex<Vec<(Instant, Option<Instant>)>>>>;

/// Answers after `latency` with one tool call per turn until `steps` turns,
/// and notes when each request came and each answer went.
#[derive(Debug)]
struct SlowModel {
    latency: Duration,
    steps: usize,
    timings: Timings,
}

impl ModelProvider for SlowModel {
    fn stream_turn(&self, request: ModelRequest) -> ModelStream {
        let requested = Instant::now();
        let session: usize = request
            .messages
            .iter()
            .find_map(|message| match message {
                Message::User { text } => text.strip_prefix("session ")?.parse().ok(),
                _ => None,
            })
            .expect("a benchmark session's input is `session <index>`");
        let turn = request
            .messages
            .iter()
            .filter(|message| matches!(message, Message::Assistant { .. }))
            .count();
        let index = {
            let mut turns = self.timings[session].lock().unwrap();
            turns.push((requested, None));
            turns.len() - 1
        };
        let timings = Arc::clone(&self.timings);
        let latency = self.latency;
        let tool_calls = if turn < self.steps {
            vec![ToolCall {
                call_id: format!("call_{turn}"),
                tool: "echo".to_owned(),
                arguments_json: "{}".to_owned(),
            }]
        } else {
            Vec::new()
        };
        Box::pin(futures::stream::once(async move {
            tokio::time::sleep(latency).await;
            timings[session].lock().unwrap()[index].1 = Some(Instant::now());
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
        Box::pin(async { Ok(uuid_like()) })
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

    /// Every path is a small text file.
    fn read_files(
        &self,
        request: sandbox::ReadFilesRequest,
    ) -> BoxFuture<'_, Result<Vec<sandbox::FileContent>, SandboxError>> {
        let files = request
            .paths
            .into_iter()
            .map(|path| sandbox::FileContent {
                path,
                content: b"bench file\n".to_vec(),
                size: 11,
                truncated: false,
                sha256: "0".repeat(64),
                missing: false,
            })
            .collect();
        Box::pin(async move { Ok(files) })
    }
}

fn uuid_like() -> String {
    format!("sb-{}", fastrand::u64(..))
}

fn percentile(sorted: &[Duration], percent: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((percent / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

async fn concurrent_sessions(sessions: usize, steps: usize) {
    let stagger = Duration::from_millis(u64::try_from(env_number("BENCH_STAGGER_MS", 50)).unwrap());
    let only = std::env::var("BENCH_SYNCHRONOUS").unwrap_or_default();
    for (name, synchronous) in [
        ("normal", SqliteSynchronous::Normal),
        ("full", SqliteSynchronous::Full),
    ] {
        if only.is_empty() || only.eq_ignore_ascii_case(name) {
            concurrent_run(sessions, steps, synchronous, stagger).await;
        }
    }
}

async fn concurrent_run(
    sessions: usize,
    steps: usize,
    synchronous: SqliteSynchronous,
    stagger: Duration,
) {
    println!(
        "\n(b) {sessions} concurrent sessions x {steps} steps, fake model 50 ms, instant fake \
         sandbox, SQLite {synchronous:?}, starts spread over {stagger:?}; load average before: {}",
        load_average()
    );
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteStore::open_with(&dir.path().join("cp.db"), bench_sqlite_options(synchronous))
            .await
            .unwrap(),
    );
    let (_shutdown, shutdown_signal) = watch::channel(false);
    let log = EventLog::new(store.clone(), shutdown_signal);
    let timings: Timings = Arc::new((0..sessions).map(|_| Mutex::default()).collect());
    let model = SlowModel {
        latency: Duration::from_millis(50),
        steps,
        timings: Arc::clone(&timings),
    };
    let max_turns = u32::try_from(steps + 1).unwrap();
    let agent =
        Arc::new(Agent::new(definition("bench", &["echo"], max_turns), Arc::new(model)).unwrap());
    let agent_loop = Arc::new(AgentLoop::new(
        log,
        Arc::new(InstantSandbox),
        LoopSettings::new(Duration::from_secs(30), 4),
    ));
    let mut records = Vec::with_capacity(sessions);
    for index in 0..sessions {
        let id = format!("s{index}");
        records.push(
            store
                .create_session(new_session(
                    &id,
                    "bench",
                    &format!("session {index}"),
                    max_turns,
                ))
                .await
                .unwrap()
                .session,
        );
    }
    let cpu_before = thread_cpu();
    let started = Instant::now();
    let runs: Vec<_> = records
        .into_iter()
        .enumerate()
        .map(|(index, session)| {
            let agent_loop = Arc::clone(&agent_loop);
            let agent = Arc::clone(&agent);
            // Starts spread evenly over one model latency, as independent
            // callers would start them (`BENCH_STAGGER=0`: all at once).
            let offset = stagger.mul_f64(index as f64 / sessions as f64);
            tokio::spawn(async move {
                tokio::time::sleep(offset).await;
                let (_cancel, cancel) = watch::channel(None);
                agent_loop.run(session, agent, cancel).await;
            })
        })
        .collect();
    for run in runs {
        run.await.unwrap();
    }
    let elapsed = started.elapsed();
    let cpu_after = thread_cpu();
    let timings: Vec<Vec<(Instant, Option<Instant>)>> = timings
        .iter()
        .map(|turns| std::mem::take(&mut *turns.lock().unwrap()))
        .collect();
    let mut overheads: Vec<Duration> = Vec::new();
    for turns in &timings {
        for pair in turns.windows(2) {
            if let (Some(answered), next_request) = (pair[0].1, pair[1].0) {
                overheads.push(next_request.saturating_duration_since(answered));
            }
        }
    }
    if std::env::var_os("BENCH_TIMELINE").is_some() {
        print_timeline(&timings, started);
    }
    overheads.sort();
    let total_steps = sessions * steps;
    assert_eq!(overheads.len(), total_steps, "every step measured");
    let ms = |duration: Duration| duration.as_secs_f64() * 1000.0;
    println!(
        "  {total_steps} steps in {:.2} s ({:.0} steps/s; ideal with zero overhead: {:.2} s)",
        elapsed.as_secs_f64(),
        total_steps as f64 / elapsed.as_secs_f64(),
        0.05 * (steps + 1) as f64 + stagger.as_secs_f64()
    );
    println!(
        "  overhead per step (model answer -> next model request): p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(percentile(&overheads, 50.0)),
        ms(percentile(&overheads, 90.0)),
        ms(percentile(&overheads, 99.0)),
        ms(percentile(&overheads, 100.0)),
    );
    let per_step = |name: &str| {
        let spent = cpu_after.get(name).copied().unwrap_or_default()
            - cpu_before.get(name).copied().unwrap_or_default();
        spent.as_secs_f64() * 1e6 / total_steps as f64
    };
    println!(
        "  CPU per step: tokio workers {:.1} µs, SQLite writer {:.1} µs, checkpoints {:.1} µs, \
         everything {:.1} µs",
        per_step("tokio-rt-worker"),
        per_step("sqlite-writer"),
        per_step("sqlite-checkpoi"),
        cpu_after
            .values()
            .sum::<Duration>()
            .saturating_sub(cpu_before.values().sum())
            .as_secs_f64()
            * 1e6
            / total_steps as f64,
    );
    let size = |name: &str| {
        std::fs::metadata(dir.path().join(name)).map_or(0.0, |meta| meta.len() as f64 / 1048576.0)
    };
    println!(
        "  database {:.1} MiB, WAL {:.1} MiB; load average after: {}",
        size("cp.db"),
        size("cp.db-wal"),
        load_average()
    );
}

/// Per 50 ms of the run (by model answer time): steps answered, and the
/// median and largest overhead of those steps.
fn print_timeline(timings: &[Vec<(Instant, Option<Instant>)>], started: Instant) {
    let mut windows: std::collections::BTreeMap<u128, Vec<Duration>> = Default::default();
    for turns in timings {
        for pair in turns.windows(2) {
            if let (Some(answered), next_request) = (pair[0].1, pair[1].0) {
                let window = answered.saturating_duration_since(started).as_millis() / 50;
                windows
                    .entry(window)
                    .or_default()
                    .push(next_request.saturating_duration_since(answered));
            }
        }
    }
    for (window, mut overheads) in windows {
        overheads.sort();
        println!(
            "    {:>5} ms: {:>4} steps, overhead p50 {:>6.2} ms, max {:>6.2} ms",
            window * 50,
            overheads.len(),
            percentile(&overheads, 50.0).as_secs_f64() * 1000.0,
            percentile(&overheads, 100.0).as_secs_f64() * 1000.0,
        );
    }
}

/// CPU time (user + system) of this process's threads, summed by thread name.
fn thread_cpu() -> HashMap<String, Duration> {
    // Clock ticks per second: 100 on every Linux this runs on.
    const TICK: Duration = Duration::from_millis(10);
    let mut by_name: HashMap<String, Duration> = HashMap::new();
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // Fields 14 and 15 of stat (utime, stime); `fields[0]` is field 3.
        let ticks: u32 = fields
            .get(11..13)
            .map(|times| times.iter().filter_map(|t| t.parse::<u32>().ok()).sum())
            .unwrap_or(0);
        *by_name.entry(name).or_default() += TICK * ticks;
    }
    by_name
}

/// The first three fields of `/proc/loadavg` (empty where there is none).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// The store's options: `synchronous`, and the WAL limit from
/// `BENCH_MAX_WAL_BYTES` if set.
fn bench_sqlite_options(synchronous: SqliteSynchronous) -> SqliteOptions {
    let defaults = SqliteOptions::default();
    SqliteOptions {
        synchronous,
        max_wal_bytes: std::env::var("BENCH_MAX_WAL_BYTES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(defaults.max_wal_bytes),
    }
}
