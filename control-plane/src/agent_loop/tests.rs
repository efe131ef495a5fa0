#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::BoxFuture;

use super::*;
use crate::agent::{AgentDefinition, SandboxSettings};
use crate::budget::ModelPrice;
use crate::event;
use crate::policy::PolicySettings;
use crate::provider::ProviderKind;
use crate::provider::scripted::ScriptedProvider;
use crate::provider::{
    CompletedTurn, Message, ModelProvider, ModelRequest, ModelStream, ModelStreamEvent, TokenUsage,
};
use crate::sandbox::InvocationOutcome;
use crate::store::{
    EventStore, NewSession, PendingApproval, SessionPage, SessionQuery, SqliteStore,
};
use prost::Message as _;

/// How the fake sandbox answers one tool.
#[derive(Debug, Clone)]
enum Behaviour {
    Ok {
        output_json: &'static str,
        delay: Duration,
    },
    ToolError(sandbox::ToolError),
    Unreachable,
    Hang,
    /// The sandbox session is unknown (sandboxd restarted).
    SessionGone,
}

/// A sandboxd stand-in that, like sandboxd, runs an invocation id once and
/// answers repeats with the recorded result.
#[derive(Debug, Default)]
struct FakeSandbox {
    tools: Vec<&'static str>,
    schemas: HashMap<&'static str, &'static str>,
    behaviours: HashMap<&'static str, Behaviour>,
    log: Mutex<Vec<String>>,
    policies: Mutex<Vec<sandbox::SessionPolicy>>,
    recorded: Mutex<HashMap<String, InvocationOutcome>>,
    executions: AtomicUsize,
    running: AtomicUsize,
    max_running: AtomicUsize,
    sessions: AtomicUsize,
}

impl FakeSandbox {
    fn new(tools: &[&'static str]) -> Self {
        Self {
            tools: tools.to_vec(),
            ..Default::default()
        }
    }

    fn with(mut self, tool: &'static str, behaviour: Behaviour) -> Self {
        self.behaviours.insert(tool, behaviour);
        self
    }

    fn with_schema(mut self, tool: &'static str, schema: &'static str) -> Self {
        self.schemas.insert(tool, schema);
        self
    }

    fn calls(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn note(&self, entry: String) {
        self.log.lock().unwrap().push(entry);
    }

    fn executions(&self) -> usize {
        self.executions.load(Ordering::SeqCst)
    }
}

fn ok_result(output_json: &str) -> InvocationOutcome {
    InvocationOutcome {
        output: vec![sandbox::OutputChunk {
            stream: sandbox::OutputStream::Stderr.into(),
            data: b"log line\n".to_vec(),
            truncated: false,
        }],
        result: sandbox::InvokeResult {
            outcome: Some(sandbox::invoke_result::Outcome::Ok(
                sandbox::InvokeSuccess {
                    output_json: output_json.to_owned(),
                    exit_status: None,
                },
            )),
            usage: Some(sandbox::Usage {
                peak_memory_bytes: 4096,
                ..Default::default()
            }),
            replayed: false,
        },
    }
}

impl SandboxDispatch for FakeSandbox {
    fn create_session(
        &self,
        request: sandbox::CreateSessionRequest,
    ) -> BoxFuture<'_, Result<String, SandboxError>> {
        let label = request
            .labels
            .get(SESSION_LABEL)
            .cloned()
            .unwrap_or_default();
        let number = self.sessions.fetch_add(1, Ordering::SeqCst) + 1;
        self.note(format!("create label={label}"));
        self.policies
            .lock()
            .unwrap()
            .push(request.policy.unwrap_or_default());
        Box::pin(async move { Ok(format!("sb-{number}")) })
    }

    fn list_tools(&self) -> BoxFuture<'_, Result<Vec<sandbox::Tool>, SandboxError>> {
        let tools = self
            .tools
            .iter()
            .map(|name| sandbox::Tool {
                name: (*name).to_owned(),
                description: format!("the {name} tool"),
                input_schema_json: self
                    .schemas
                    .get(name)
                    .copied()
                    .unwrap_or(r#"{"type":"object"}"#)
                    .to_owned(),
                ..Default::default()
            })
            .collect();
        Box::pin(async { Ok(tools) })
    }

    fn invoke(
        &self,
        request: sandbox::InvokeRequest,
    ) -> BoxFuture<'_, Result<InvocationOutcome, SandboxError>> {
        Box::pin(async move {
            let Some(sandbox::invoke_request::Target::Wasi(call)) = request.target else {
                return Err(SandboxError::MissingResult);
            };
            self.note(format!("invoke {} {}", request.invocation_id, call.tool));
            let behaviour = self.behaviours.get(call.tool.as_str()).cloned();
            if matches!(behaviour, Some(Behaviour::SessionGone)) {
                return Err(SandboxError::Invoke(tonic::Status::not_found(format!(
                    "no sandbox session {}",
                    request.session_id
                ))));
            }
            if let Some(recorded) = self.recorded.lock().unwrap().get(&request.invocation_id) {
                let mut replay = recorded.clone();
                replay.output.clear();
                replay.result.replayed = true;
                return Ok(replay);
            }
            let running = self.running.fetch_add(1, Ordering::SeqCst) + 1;
            self.max_running.fetch_max(running, Ordering::SeqCst);
            let result = match behaviour {
                Some(Behaviour::Ok { output_json, delay }) => {
                    tokio::time::sleep(delay).await;
                    Ok(ok_result(output_json))
                }
                Some(Behaviour::ToolError(error)) => Ok(InvocationOutcome {
                    output: Vec::new(),
                    result: sandbox::InvokeResult {
                        outcome: Some(sandbox::invoke_result::Outcome::Error(error)),
                        usage: None,
                        replayed: false,
                    },
                }),
                Some(Behaviour::Unreachable) => Err(SandboxError::Invoke(
                    tonic::Status::unavailable("connection refused"),
                )),
                Some(Behaviour::Hang) => std::future::pending().await,
                Some(Behaviour::SessionGone) | None => Ok(ok_result("{}")),
            };
            self.running.fetch_sub(1, Ordering::SeqCst);
            if let Ok(outcome) = &result {
                self.executions.fetch_add(1, Ordering::SeqCst);
                self.recorded
                    .lock()
                    .unwrap()
                    .insert(request.invocation_id.clone(), outcome.clone());
            }
            result
        })
    }

    fn destroy_session(
        &self,
        session_id: String,
        _reason: String,
    ) -> BoxFuture<'_, Result<sandbox::TeardownReport, SandboxError>> {
        self.note(format!("destroy {session_id}"));
        Box::pin(async { Ok(sandbox::TeardownReport::default()) })
    }
}

/// A provider that keeps every request it gets.
#[derive(Debug)]
struct RecordingProvider {
    inner: Arc<dyn ModelProvider>,
    requests: Mutex<Vec<ModelRequest>>,
}

impl ModelProvider for RecordingProvider {
    fn endpoint(&self) -> String {
        self.inner.endpoint()
    }

    fn stream_turn(&self, request: ModelRequest) -> ModelStream {
        self.requests.lock().unwrap().push(request.clone());
        self.inner.stream_turn(request)
    }
}

/// Turns given in code, for stop reasons the scripted provider never gives.
#[derive(Debug)]
struct FixedTurns(Vec<CompletedTurn>);

impl ModelProvider for FixedTurns {
    fn stream_turn(&self, request: ModelRequest) -> ModelStream {
        let taken = request
            .messages
            .iter()
            .filter(|message| matches!(message, Message::Assistant { .. }))
            .count();
        let item = match self.0.get(taken) {
            Some(turn) => Ok(ModelStreamEvent::Completed(turn.clone())),
            None => Err(ProviderError::Incomplete),
        };
        Box::pin(futures::stream::iter([item]))
    }
}

/// An event store that "dies" at event `crash_at`: it commits the write
/// holding it (or, with `commit` false, does not) and then never answers
/// again, like a process killed right after (or right before) that commit.
#[derive(Debug)]
struct DyingStore {
    inner: Arc<SqliteStore>,
    crash_at: u64,
    commit: bool,
    died: Arc<tokio::sync::Notify>,
}

impl DyingStore {
    async fn die(&self) {
        self.died.notify_one();
        std::future::pending::<()>().await;
    }
}

impl EventStore for DyingStore {
    fn create_session(
        &self,
        new: NewSession,
    ) -> BoxFuture<'_, Result<crate::store::CreatedSession, StoreError>> {
        self.inner.create_session(new)
    }
    fn find_by_idempotency_key(
        &self,
        tenant: String,
        key: String,
    ) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>> {
        self.inner.find_by_idempotency_key(tenant, key)
    }
    fn get_session(
        &self,
        tenant: String,
        session_id: String,
    ) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>> {
        self.inner.get_session(tenant, session_id)
    }
    fn list_sessions(&self, query: SessionQuery) -> BoxFuture<'_, Result<SessionPage, StoreError>> {
        self.inner.list_sessions(query)
    }
    fn list_unfinished_sessions(&self) -> BoxFuture<'_, Result<Vec<SessionRecord>, StoreError>> {
        self.inner.list_unfinished_sessions()
    }
    fn set_sandbox_session(
        &self,
        session_id: String,
        sandbox_session_id: String,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner
            .set_sandbox_session(session_id, sandbox_session_id)
    }
    fn append_events(
        &self,
        session_id: String,
        events: Vec<NewEvent>,
        steps: Vec<StepRecord>,
    ) -> BoxFuture<'_, Result<Vec<SessionEvent>, StoreError>> {
        Box::pin(async move {
            if !self.commit {
                let session = self
                    .inner
                    .get_session("default".to_owned(), session_id.clone())
                    .await?
                    .ok_or_else(|| StoreError::UnknownSession(session_id.clone()))?;
                if session.last_seq + events.len() as u64 >= self.crash_at {
                    self.die().await;
                }
            }
            let stored = self.inner.append_events(session_id, events, steps).await?;
            if stored
                .last()
                .is_some_and(|event| event.seq >= self.crash_at)
            {
                self.die().await;
            }
            Ok(stored)
        })
    }
    fn read_steps(&self, session_id: String) -> BoxFuture<'_, Result<Vec<StepRecord>, StoreError>> {
        self.inner.read_steps(session_id)
    }
    fn pending_approvals(
        &self,
        session_id: String,
    ) -> BoxFuture<'_, Result<Vec<PendingApproval>, StoreError>> {
        self.inner.pending_approvals(session_id)
    }
    fn request_cancel(
        &self,
        session_id: String,
        reason: String,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.request_cancel(session_id, reason)
    }
    fn read_events(
        &self,
        session_id: String,
        after_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<SessionEvent>, StoreError>> {
        self.inner.read_events(session_id, after_seq, limit)
    }
}

use harness_proto::control::v1::SessionEvent;

struct Harness {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    log: EventLog,
    sandbox: Arc<FakeSandbox>,
    provider: Arc<RecordingProvider>,
    agent: Arc<Agent>,
    harness_tools: HarnessRegistry,
    shutdown: watch::Sender<bool>,
}

fn definition(tools: &[&str]) -> AgentDefinition {
    AgentDefinition {
        name: "tester".to_owned(),
        description: String::new(),
        provider: ProviderKind::Scripted,
        model: "scripted".to_owned(),
        script: None,
        base_url: None,
        api_key_env: None,
        max_tokens_per_turn: None,
        system_prompt: "Be brief.".to_owned(),
        tools: tools.iter().map(|tool| (*tool).to_owned()).collect(),
        budget: control::BudgetLimits {
            max_turns: Some(5),
            ..Default::default()
        },
        policy: PolicySettings::default(),
        sandbox: SandboxSettings::default(),
        source: PathBuf::from("tester.toml"),
    }
}

impl Harness {
    async fn new(script: &str, tools: &[&str], sandbox: FakeSandbox) -> Self {
        let provider = ScriptedProvider::new(toml::from_str(script).unwrap(), "test.script.toml");
        Self::with(Arc::new(provider), definition(tools), sandbox).await
    }

    async fn with(
        provider: Arc<dyn ModelProvider>,
        definition: AgentDefinition,
        sandbox: FakeSandbox,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(&dir.path().join("cp.db")).await.unwrap());
        let (shutdown, shutdown_signal) = watch::channel(false);
        let log = EventLog::new(store.clone(), shutdown_signal);
        let provider = Arc::new(RecordingProvider {
            inner: provider,
            requests: Mutex::new(Vec::new()),
        });
        let agent = Arc::new(Agent::new(definition, provider.clone()).unwrap());
        Self {
            _dir: dir,
            store,
            log,
            sandbox: Arc::new(sandbox),
            provider,
            agent,
            harness_tools: HarnessRegistry::default(),
            shutdown,
        }
    }

    /// The agent file edited: later runs load `definition` (same provider).
    fn edit_agent(&mut self, definition: AgentDefinition) {
        self.agent = Arc::new(Agent::new(definition, self.provider.clone()).unwrap());
    }

    /// What each model request carried, by the turn it asked for.
    fn request_bodies(&self) -> Vec<(usize, String)> {
        self.provider
            .requests
            .lock()
            .unwrap()
            .iter()
            .map(|request| {
                let turn = request
                    .messages
                    .iter()
                    .filter(|message| matches!(message, Message::Assistant { .. }))
                    .count();
                let body = format!(
                    "{} {:?} {:?} {:?}",
                    request.model, request.max_output_tokens, request.tools, request.messages
                );
                (turn, body)
            })
            .collect()
    }

    fn priced(mut self, price: ModelPrice) -> Self {
        let mut agent = (*self.agent).clone();
        agent.price = Some(price);
        self.agent = Arc::new(agent);
        self
    }

    async fn create_session_with(&self, budget: control::BudgetLimits) -> SessionRecord {
        self.store
            .create_session(NewSession {
                session_id: "s1".to_owned(),
                tenant: "default".to_owned(),
                agent: "tester".to_owned(),
                input: "go".to_owned(),
                metadata: HashMap::new(),
                budget,
                idempotency_key: None,
            })
            .await
            .unwrap()
            .session
    }

    async fn create_session(&self, max_turns: u32) -> SessionRecord {
        self.create_session_with(control::BudgetLimits {
            max_turns: Some(max_turns),
            ..Default::default()
        })
        .await
    }

    async fn session(&self) -> SessionRecord {
        self.store
            .get_session("default".to_owned(), "s1".to_owned())
            .await
            .unwrap()
            .unwrap()
    }

    fn agent_loop(&self, max_parallel_tool_calls: usize) -> AgentLoop {
        self.loop_on(self.log.clone(), max_parallel_tool_calls)
    }

    fn loop_on(&self, log: EventLog, max_parallel_tool_calls: usize) -> AgentLoop {
        AgentLoop::with_harness_tools(
            log,
            self.sandbox.clone(),
            LoopSettings {
                tool_timeout: Duration::from_secs(30),
                max_parallel_tool_calls,
                dispatch_retry: DispatchRetry {
                    attempts: 2,
                    backoff: Duration::from_millis(1),
                },
            },
            self.harness_tools.clone(),
        )
    }

    /// Runs the stored session (from wherever its log ends) to its end.
    async fn resume(&self) {
        let (_cancel, cancel_signal) = watch::channel(None);
        let session = self.session().await;
        tokio::time::timeout(
            Duration::from_secs(10),
            self.agent_loop(2)
                .run(session, self.agent.clone(), cancel_signal),
        )
        .await
        .expect("the session ends within 10s");
    }

    async fn run_with(&self, budget: control::BudgetLimits) {
        self.create_session_with(budget).await;
        self.resume().await;
    }

    async fn run(&self, max_turns: u32, max_parallel_tool_calls: usize) {
        let session = self.create_session(max_turns).await;
        let (_cancel, cancel_signal) = watch::channel(None);
        self.agent_loop(max_parallel_tool_calls)
            .run(session, self.agent.clone(), cancel_signal)
            .await;
    }

    /// Runs the session until event `crash_after` is committed, then drops
    /// the loop mid-step, as a crash would.
    async fn run_and_crash_after(&self, crash_after: u64) {
        self.run_and_crash(crash_after, true).await;
    }

    /// Runs the session until the write holding event `crash_at` would be
    /// committed, and crashes without committing it.
    async fn run_and_crash_before(&self, crash_at: u64) {
        self.run_and_crash(crash_at, false).await;
    }

    async fn run_and_crash(&self, crash_at: u64, commit: bool) {
        let died = Arc::new(tokio::sync::Notify::new());
        let dying = Arc::new(DyingStore {
            inner: self.store.clone(),
            crash_at,
            commit,
            died: Arc::clone(&died),
        });
        let (_shutdown, shutdown_signal) = watch::channel(false);
        let log = EventLog::new(dying, shutdown_signal);
        let session = self.session().await;
        let agent_loop = self.loop_on(log, 2);
        let (_cancel, cancel_signal) = watch::channel(None);
        let run = agent_loop.run(session, self.agent.clone(), cancel_signal);
        // The loop finishes first, or is dropped once the store "died".
        tokio::time::timeout(Duration::from_secs(10), async {
            tokio::select! {
                () = run => {}
                () = died.notified() => {}
            }
        })
        .await
        .expect("the loop ends or dies within 10s");
    }

    async fn events(&self) -> Vec<control::SessionEvent> {
        self.store
            .read_events("s1".to_owned(), 0, 10_000)
            .await
            .unwrap()
    }

    async fn summary(&self) -> Vec<String> {
        self.events().await.iter().map(describe).collect()
    }

    async fn last(&self) -> String {
        self.summary().await.pop().unwrap()
    }

    /// Waits for an `approval_requested` and answers it as a human would.
    async fn resolve_next_approval(&self, decision: control::ApprovalDecision, reason: &str) {
        for _ in 0..500 {
            let pending = self.store.pending_approvals("s1".to_owned()).await.unwrap();
            if let Some(approval) = pending.first() {
                let resolved = control::ApprovalResolved {
                    call_id: approval.call_id.clone(),
                    decision: decision.into(),
                    reason: reason.to_owned(),
                    resolved_by: "alice".to_owned(),
                };
                self.log
                    .append("s1", approval.turn, Kind::ApprovalResolved(resolved))
                    .await
                    .unwrap();
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("no approval was requested");
    }
}

/// The kind and the fields the tests care about, one string per event.
fn describe(event: &control::SessionEvent) -> String {
    let what = match event.kind.as_ref().unwrap() {
        Kind::Started(_) => "started".to_owned(),
        Kind::TextDelta(delta) => format!("text {:?}", delta.text),
        Kind::ToolCallRequested(call) => format!("requested {} {}", call.call_id, call.tool),
        Kind::PolicyDecision(decision) => format!(
            "policy {} {} {}",
            decision.call_id,
            decision.verdict().as_str_name(),
            decision.rule
        ),
        Kind::ApprovalRequested(request) => {
            format!("approval? {} {}", request.call_id, request.reason)
        }
        Kind::ApprovalResolved(resolved) => format!(
            "approval {} {} by {} {:?}",
            resolved.call_id,
            resolved.decision().as_str_name(),
            resolved.resolved_by,
            resolved.reason
        ),
        Kind::ToolStarted(started) => format!("started {}", started.invocation_id),
        Kind::ToolOutput(output) => format!("output {} {}", output.call_id, output.stream),
        Kind::ToolFinished(finished) => match finished.outcome.as_ref().unwrap() {
            control::tool_finished::Outcome::OutputJson(json) => {
                format!("finished {} ok {json}", finished.call_id)
            }
            control::tool_finished::Outcome::Error(error) => format!(
                "finished {} {} {}",
                finished.call_id,
                error.kind().as_str_name(),
                error.message
            ),
        },
        Kind::TurnCompleted(turn) => format!("turn {} {}", turn.turn, turn.model_stop_reason),
        Kind::BudgetWarning(warning) => format!(
            "warning {} {}/{}",
            warning.budget, warning.used, warning.limit
        ),
        Kind::Finished(finished) => format!(
            "end {} {:?} {:?}",
            finished.stop_reason().as_str_name(),
            finished.final_output,
            finished.message
        ),
        other => event::kind_name(other).to_owned(),
    };
    format!("{} t{} {what}", event.seq, event.turn)
}

const PARALLEL_SCRIPT: &str = r#"
    [[turn]]
    text = "Three things."
    [[turn.tool-calls]]
    tool = "slow"
    [[turn.tool-calls]]
    tool = "exec"
    [[turn.tool-calls]]
    tool = "fast"
    [[turn.tool-calls]]
    tool = "fast"

    [[turn]]
    text = "Done."
"#;

#[tokio::test]
async fn parallel_tool_calls_are_bounded_and_recorded_in_call_order() {
    let sandbox = FakeSandbox::new(&["slow", "fast", "exec"]).with(
        "slow",
        Behaviour::Ok {
            output_json: r#"{"slow":true}"#,
            delay: Duration::from_millis(100),
        },
    );
    let harness = Harness::new(PARALLEL_SCRIPT, &["slow", "fast"], sandbox).await;
    harness.run(5, 2).await;
    let denial = "tool \"exec\" is not available to agent \"tester\"; its tools are: slow, fast";
    assert_eq!(
        harness.summary().await,
        [
            "1 t0 started".to_owned(),
            "2 t1 text \"Three \"".to_owned(),
            "3 t1 text \"things.\"".to_owned(),
            "4 t1 requested call_1_0 slow".to_owned(),
            "5 t1 requested call_1_1 exec".to_owned(),
            "6 t1 requested call_1_2 fast".to_owned(),
            "7 t1 requested call_1_3 fast".to_owned(),
            "8 t1 policy call_1_0 VERDICT_ALLOW default".to_owned(),
            "9 t1 policy call_1_1 VERDICT_DENY agent.tools".to_owned(),
            "10 t1 policy call_1_2 VERDICT_ALLOW default".to_owned(),
            "11 t1 policy call_1_3 VERDICT_ALLOW default".to_owned(),
            "12 t1 started s1:call_1_0".to_owned(),
            "13 t1 started s1:call_1_2".to_owned(),
            "14 t1 started s1:call_1_3".to_owned(),
            "15 t1 output call_1_0 stderr".to_owned(),
            "16 t1 finished call_1_0 ok {\"slow\":true}".to_owned(),
            format!("17 t1 finished call_1_1 TOOL_ERROR_KIND_DENIED {denial}"),
            "18 t1 output call_1_2 stderr".to_owned(),
            "19 t1 finished call_1_2 ok {}".to_owned(),
            "20 t1 output call_1_3 stderr".to_owned(),
            "21 t1 finished call_1_3 ok {}".to_owned(),
            "22 t1 turn 1 tool_use".to_owned(),
            "23 t2 text \"Done.\"".to_owned(),
            "24 t2 turn 2 end_turn".to_owned(),
            "25 t2 end STOP_REASON_COMPLETED \"Done.\" \"\"".to_owned(),
        ]
    );
    assert_eq!(harness.sandbox.max_running.load(Ordering::SeqCst), 2);
    let calls = harness.sandbox.calls();
    assert_eq!(calls.first().unwrap(), "create label=s1");
    assert_eq!(calls.last().unwrap(), "destroy sb-1");
    assert_eq!(harness.sandbox.executions(), 3);
}

#[tokio::test]
async fn tool_results_and_errors_reach_the_model_in_call_order() {
    let invalid = sandbox::ToolError {
        kind: sandbox::ErrorKind::InvalidInput.into(),
        message: "input does not match the schema".to_owned(),
        violations: vec![sandbox::SchemaViolation {
            instance_path: "/path".to_owned(),
            message: "123 is not of type \"string\"".to_owned(),
        }],
    };
    let sandbox =
        FakeSandbox::new(&["slow", "fast", "exec"]).with("slow", Behaviour::ToolError(invalid));
    let harness = Harness::new(PARALLEL_SCRIPT, &["slow", "fast"], sandbox).await;
    harness.run(5, 4).await;
    let requests = harness.provider.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2);
    let tool_names: Vec<&str> = requests[0].tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(tool_names, ["slow", "fast"]);
    let second = &requests[1].messages;
    assert_eq!(
        second[..2],
        [
            Message::System {
                text: "Be brief.".to_owned()
            },
            Message::User {
                text: "go".to_owned()
            }
        ]
    );
    let results: Vec<(&str, &str, bool)> = second[3..]
        .iter()
        .map(|message| match message {
            Message::ToolResult {
                call_id,
                content,
                is_error,
                ..
            } => (call_id.as_str(), content.as_str(), *is_error),
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        results,
        [
            (
                "call_1_0",
                "invalid_input: input does not match the schema; at /path: 123 is not of type \"string\"",
                true
            ),
            (
                "call_1_1",
                "denied: tool \"exec\" is not available to agent \"tester\"; its tools are: slow, fast",
                true
            ),
            ("call_1_2", "{}", false),
            ("call_1_3", "{}", false),
        ]
    );
}

#[tokio::test]
async fn arguments_are_validated_before_dispatch_and_bad_ones_never_reach_sandboxd() {
    let script = r#"
        [[turn]]
        text = "Reading."
        [[turn.tool-calls]]
        tool = "read"
        arguments = { path = 42 }
        [[turn.tool-calls]]
        tool = "read"
        arguments = { path = "a.txt" }

        [[turn]]
        text = "Done."
    "#;
    let schema = r#"{"type":"object","required":["path"],"properties":{"path":{"type":"string"}}}"#;
    let sandbox = FakeSandbox::new(&["read"]).with_schema("read", schema);
    let harness = Harness::new(script, &["read"], sandbox).await;
    harness.run(5, 2).await;
    assert_eq!(
        harness.summary().await[2..9],
        [
            "3 t1 requested call_1_0 read",
            "4 t1 requested call_1_1 read",
            "5 t1 policy call_1_1 VERDICT_ALLOW default",
            "6 t1 started s1:call_1_1",
            "7 t1 finished call_1_0 TOOL_ERROR_KIND_INVALID_INPUT the arguments do not match the input schema of \"read\": at /path: 42 is not of type \"string\"",
            "8 t1 output call_1_1 stderr",
            "9 t1 finished call_1_1 ok {}",
        ]
    );
    assert_eq!(harness.sandbox.executions(), 1);
}

#[tokio::test]
async fn malformed_argument_json_is_an_error_result_and_the_session_goes_on() {
    let provider = FixedTurns(vec![
        CompletedTurn {
            text: "Trying.".to_owned(),
            tool_calls: vec![ToolCall {
                call_id: "c1".to_owned(),
                tool: "read".to_owned(),
                arguments_json: r#"{"path": "a"#.to_owned(),
            }],
            usage: TokenUsage::default(),
            stop_reason: "tool_use".to_owned(),
        },
        CompletedTurn {
            text: "Sorry.".to_owned(),
            tool_calls: Vec::new(),
            usage: TokenUsage::default(),
            stop_reason: "end_turn".to_owned(),
        },
    ]);
    let harness = Harness::with(
        Arc::new(provider),
        definition(&["read"]),
        FakeSandbox::new(&["read"]),
    )
    .await;
    harness.run(5, 1).await;
    let summary = harness.summary().await;
    assert!(
        summary[2].starts_with("3 t1 finished c1 TOOL_ERROR_KIND_INVALID_INPUT the arguments are not valid JSON (EOF while parsing"),
        "{summary:?}"
    );
    assert_eq!(
        summary.last().unwrap(),
        "6 t2 end STOP_REASON_COMPLETED \"Sorry.\" \"\""
    );
    assert_eq!(harness.sandbox.executions(), 0);
}

#[tokio::test]
async fn pause_turn_continues_and_max_tokens_ends_with_a_note() {
    let turn = |text: &str, stop: &str| CompletedTurn {
        text: text.to_owned(),
        tool_calls: Vec::new(),
        usage: TokenUsage::default(),
        stop_reason: stop.to_owned(),
    };
    let provider = FixedTurns(vec![
        turn("Thinking…", STOP_PAUSE_TURN),
        turn("The answer is cut", STOP_MAX_TOKENS),
    ]);
    let harness = Harness::with(Arc::new(provider), definition(&[]), FakeSandbox::new(&[])).await;
    harness.run(5, 1).await;
    assert_eq!(
        harness.summary().await,
        [
            "1 t0 started",
            "2 t1 turn 1 pause_turn",
            "3 t2 turn 2 max_tokens",
            "4 t2 end STOP_REASON_COMPLETED \"The answer is cut\" \"the last reply was cut off at the model's output-token limit\"",
        ]
    );
}

#[tokio::test]
async fn repeated_or_missing_call_ids_are_made_unique() {
    let call = |id: &str| ToolCall {
        call_id: id.to_owned(),
        tool: "read".to_owned(),
        arguments_json: "{}".to_owned(),
    };
    let turn = |calls: Vec<ToolCall>| CompletedTurn {
        text: String::new(),
        tool_calls: calls,
        usage: TokenUsage::default(),
        stop_reason: "tool_use".to_owned(),
    };
    let provider = FixedTurns(vec![
        turn(vec![call("x"), call("x"), call("")]),
        turn(vec![call("x")]),
        turn(Vec::new()),
    ]);
    let harness = Harness::with(
        Arc::new(provider),
        definition(&["read"]),
        FakeSandbox::new(&["read"]),
    )
    .await;
    harness.run(5, 1).await;
    let requested: Vec<String> = harness
        .events()
        .await
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::ToolCallRequested(call)) => Some(call.call_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(requested, ["x", "call_1_1", "call_1_2", "call_2_0"]);
    assert_eq!(harness.sandbox.executions(), 4);
}

#[tokio::test]
async fn exhausted_script_ends_the_session_with_an_error_and_destroys_the_sandbox() {
    let script = "[[turn]]\ntext = \"Once.\"\n[[turn.tool-calls]]\ntool = \"fast\"\n";
    let harness = Harness::new(script, &["fast"], FakeSandbox::new(&["fast"])).await;
    harness.run(5, 1).await;
    assert_eq!(
        harness.last().await,
        "9 t2 end STOP_REASON_ERROR \"Once.\" \"model provider failed: script exhausted after 1 turns (test.script.toml)\""
    );
    assert_eq!(harness.sandbox.calls().last().unwrap(), "destroy sb-1");
}

#[tokio::test]
async fn turn_limit_stops_with_max_turns_and_the_partial_answer() {
    let script = "[[turn]]\ntext = \"One.\"\n[[turn.tool-calls]]\ntool = \"fast\"\n\
                  [[turn]]\ntext = \"Two.\"\n[[turn.tool-calls]]\ntool = \"fast\"\n\
                  [[turn]]\ntext = \"Three.\"\n";
    let harness = Harness::new(script, &["fast"], FakeSandbox::new(&["fast"])).await;
    harness.run(2, 1).await;
    let summary = harness.summary().await;
    assert_eq!(
        summary[summary.len() - 2..],
        [
            "16 t2 warning turns 2/2",
            "17 t2 end STOP_REASON_MAX_TURNS \"Two.\" \"stopped after 2 turns\"",
        ]
    );
    let record = harness.session().await;
    assert_eq!(
        (
            record.status,
            record.stop_reason,
            record.usage.turns,
            record.usage.tool_calls
        ),
        (
            control::SessionStatus::Finished,
            control::StopReason::MaxTurns,
            2,
            2
        )
    );
}

#[tokio::test]
async fn a_tool_sandboxd_lacks_fails_the_session_before_the_first_turn() {
    let harness = Harness::new(
        "[[turn]]\ntext = \"x\"\n",
        &["fast", "exec"],
        FakeSandbox::new(&["fast"]),
    )
    .await;
    harness.run(5, 1).await;
    assert_eq!(
        harness.summary().await,
        [
            "1 t0 started",
            "2 t0 end STOP_REASON_ERROR \"\" \"agent tool \\\"exec\\\" is not offered by sandboxd (it has: fast)\"",
        ]
    );
    // No sandbox session is made for an agent that cannot run.
    assert!(harness.sandbox.calls().is_empty());
    assert!(harness.provider.requests.lock().unwrap().is_empty());
}

#[tokio::test]
async fn unreachable_sandboxd_is_retried_then_fails_the_call_and_the_session() {
    let script = "[[turn]]\ntext = \"Try.\"\n[[turn.tool-calls]]\ntool = \"fast\"\n\
                  [[turn.tool-calls]]\ntool = \"fast\"\n";
    let sandbox = FakeSandbox::new(&["fast"]).with("fast", Behaviour::Unreachable);
    let harness = Harness::new(script, &["fast"], sandbox).await;
    harness.run(5, 1).await;
    let summary = harness.summary().await;
    assert_eq!(
        summary[8..],
        [
            "9 t1 finished call_1_0 TOOL_ERROR_KIND_INTERNAL could not reach sandboxd: sandboxd Invoke failed (Unavailable): connection refused",
            "10 t1 finished call_1_1 TOOL_ERROR_KIND_INTERRUPTED the session ended before this call finished; its side effects may or may not have happened",
            "11 t1 end STOP_REASON_ERROR \"Try.\" \"tool call call_1_0 could not be dispatched: sandboxd Invoke failed (Unavailable): connection refused\"",
        ]
    );
    let attempts = harness
        .sandbox
        .calls()
        .iter()
        .filter(|call| call.starts_with("invoke s1:call_1_0"))
        .count();
    assert_eq!(attempts, 2);
}

#[tokio::test]
async fn cancelling_interrupts_running_calls_and_records_why() {
    let script = "[[turn]]\ntext = \"Wait.\"\n[[turn.tool-calls]]\ntool = \"stuck\"\n";
    let sandbox = FakeSandbox::new(&["stuck"]).with("stuck", Behaviour::Hang);
    let harness = Harness::new(script, &["stuck"], sandbox).await;
    let session = harness.create_session(5).await;
    let (cancel, cancel_signal) = watch::channel(None);
    let agent_loop = harness.agent_loop(1);
    let run = agent_loop.run(session, harness.agent.clone(), cancel_signal);
    let canceller = async {
        while !harness
            .sandbox
            .calls()
            .iter()
            .any(|c| c.starts_with("invoke"))
        {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        cancel.send_replace(Some("user pressed stop".to_owned()));
    };
    tokio::time::timeout(
        Duration::from_secs(10),
        futures::future::join(run, canceller),
    )
    .await
    .unwrap();
    let summary = harness.summary().await;
    assert_eq!(
        summary[summary.len() - 2..],
        [
            "6 t1 finished call_1_0 TOOL_ERROR_KIND_INTERRUPTED the session ended before this call finished; its side effects may or may not have happened",
            "7 t1 end STOP_REASON_CANCELLED \"Wait.\" \"user pressed stop\"",
        ]
    );
    assert_eq!(harness.sandbox.calls().last().unwrap(), "destroy sb-1");
}

#[tokio::test]
async fn a_recorded_cancellation_survives_a_restart() {
    let script = "[[turn]]\ntext = \"x\"\n";
    let harness = Harness::new(script, &[], FakeSandbox::new(&[])).await;
    harness.create_session(5).await;
    harness
        .store
        .request_cancel("s1".to_owned(), "stop it".to_owned())
        .await
        .unwrap();
    harness.resume().await;
    assert_eq!(
        harness.summary().await,
        [
            "1 t0 started",
            "2 t0 end STOP_REASON_CANCELLED \"\" \"stop it\""
        ]
    );
}

// ---------------------------------------------------------------------------
// Crash and resume

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
            "s1".to_owned(),
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
        .set_sandbox_session("s1".to_owned(), "sb-1".to_owned())
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

// ---------------------------------------------------------------------------
// Policy and approvals

fn policy_definition(policy: &str) -> AgentDefinition {
    AgentDefinition {
        policy: toml::from_str(policy).unwrap(),
        ..definition(&["exec"])
    }
}

const EXEC_SCRIPT: &str = r#"
    [[turn]]
    text = "Testing."
    [[turn.tool-calls]]
    tool = "exec"
    arguments = { command = "cargo test --workspace" }
    [[turn.tool-calls]]
    tool = "exec"
    arguments = { command = "rm -rf target" }

    [[turn]]
    text = "Done."
"#;

const EXEC_POLICY: &str = r#"
    approval-timeout = "300ms"
    [[rule]]
    tool = "exec"
    when = { command = "cargo test*" }
    verdict = "allow"
    [[rule]]
    tool = "exec"
    when = { command = "rm *" }
    verdict = "ask"
    reason = "deletes files"
"#;

async fn exec_harness(policy: &str) -> Harness {
    let provider = ScriptedProvider::new(toml::from_str(EXEC_SCRIPT).unwrap(), "exec.script.toml");
    Harness::with(
        Arc::new(provider),
        policy_definition(policy),
        FakeSandbox::new(&["exec"]),
    )
    .await
}

#[tokio::test]
async fn a_denied_call_is_explained_to_the_model_and_never_dispatched() {
    let harness = exec_harness(
        r#"
        [[rule]]
        tool = "exec"
        when = { command = "rm *" }
        verdict = "deny"
        reason = "never delete files"
        "#,
    )
    .await;
    harness.run(5, 2).await;
    let summary = harness.summary().await;
    assert_eq!(
        summary[4..10],
        [
            "5 t1 policy call_1_0 VERDICT_ALLOW default",
            "6 t1 policy call_1_1 VERDICT_DENY policy.rule[0]",
            "7 t1 started s1:call_1_0",
            "8 t1 output call_1_0 stderr",
            "9 t1 finished call_1_0 ok {}",
            "10 t1 finished call_1_1 TOOL_ERROR_KIND_DENIED never delete files",
        ]
    );
    assert_eq!(harness.sandbox.executions(), 1);
}

#[tokio::test]
async fn ask_then_approve_runs_the_call() {
    let harness = exec_harness(&EXEC_POLICY.replace("approval-timeout = \"300ms\"", "")).await;
    let run = harness.run(5, 2);
    let approve = harness.resolve_next_approval(control::ApprovalDecision::Allow, "looks fine");
    let (_, ()) =
        tokio::time::timeout(Duration::from_secs(10), futures::future::join(run, approve))
            .await
            .unwrap();
    let summary = harness.summary().await;
    assert_eq!(
        summary[4..12],
        [
            "5 t1 policy call_1_0 VERDICT_ALLOW policy.rule[0]",
            "6 t1 policy call_1_1 VERDICT_ASK policy.rule[1]",
            "7 t1 approval? call_1_1 deletes files",
            "8 t1 approval call_1_1 APPROVAL_DECISION_ALLOW by alice \"looks fine\"",
            "9 t1 started s1:call_1_0",
            "10 t1 started s1:call_1_1",
            "11 t1 output call_1_0 stderr",
            "12 t1 finished call_1_0 ok {}",
        ]
    );
    assert_eq!(harness.sandbox.executions(), 2);
    assert_eq!(
        summary.last().unwrap(),
        "18 t2 end STOP_REASON_COMPLETED \"Done.\" \"\""
    );
}

#[tokio::test]
async fn ask_then_deny_tells_the_model_who_denied_and_why() {
    let harness = exec_harness(EXEC_POLICY).await;
    let run = harness.run(5, 2);
    let deny = harness.resolve_next_approval(control::ApprovalDecision::Deny, "not today");
    tokio::time::timeout(Duration::from_secs(10), futures::future::join(run, deny))
        .await
        .unwrap();
    let summary = harness.summary().await;
    assert_eq!(
        summary[7..12],
        [
            "8 t1 approval call_1_1 APPROVAL_DECISION_DENY by alice \"not today\"",
            "9 t1 started s1:call_1_0",
            "10 t1 output call_1_0 stderr",
            "11 t1 finished call_1_0 ok {}",
            "12 t1 finished call_1_1 TOOL_ERROR_KIND_DENIED denied by alice: not today",
        ]
    );
    assert_eq!(harness.sandbox.executions(), 1);
}

#[tokio::test]
async fn an_unanswered_approval_is_denied_at_its_deadline() {
    let harness = exec_harness(EXEC_POLICY).await;
    harness.run(5, 2).await;
    let summary = harness.summary().await;
    assert_eq!(
        summary[6..12],
        [
            "7 t1 approval? call_1_1 deletes files",
            "8 t1 approval call_1_1 APPROVAL_DECISION_DENY by timeout \"no decision within 300ms\"",
            "9 t1 started s1:call_1_0",
            "10 t1 output call_1_0 stderr",
            "11 t1 finished call_1_0 ok {}",
            "12 t1 finished call_1_1 TOOL_ERROR_KIND_DENIED denied by timeout: no decision within 300ms",
        ]
    );
    let session = harness.session().await;
    assert_eq!(session.status, control::SessionStatus::Finished);
}

#[tokio::test]
async fn a_session_awaiting_approval_survives_a_restart() {
    let harness = exec_harness(&EXEC_POLICY.replace("approval-timeout = \"300ms\"", "")).await;
    harness.create_session(5).await;
    // Crash while waiting: after approval_requested (event 7) was written.
    harness.run_and_crash_after(7).await;
    let session = harness.session().await;
    assert_eq!(session.status, control::SessionStatus::AwaitingApproval);
    assert_eq!(
        harness
            .store
            .pending_approvals("s1".to_owned())
            .await
            .unwrap(),
        [PendingApproval {
            call_id: "call_1_1".to_owned(),
            turn: 1
        }]
    );
    let resume = harness.resume();
    let approve = harness.resolve_next_approval(control::ApprovalDecision::Allow, "");
    tokio::time::timeout(
        Duration::from_secs(10),
        futures::future::join(resume, approve),
    )
    .await
    .unwrap();
    let summary = harness.summary().await;
    assert_eq!(
        summary[7],
        "8 t1 approval call_1_1 APPROVAL_DECISION_ALLOW by alice \"\""
    );
    assert_eq!(harness.sandbox.executions(), 2);
    assert_eq!(
        summary.last().unwrap(),
        "18 t2 end STOP_REASON_COMPLETED \"Done.\" \"\""
    );
}

#[tokio::test]
async fn a_second_resolution_of_one_approval_is_refused() {
    let harness = exec_harness(&EXEC_POLICY.replace("approval-timeout = \"300ms\"", "")).await;
    let run = harness.run(5, 2);
    let answer_twice = async {
        harness
            .resolve_next_approval(control::ApprovalDecision::Allow, "")
            .await;
        let again = control::ApprovalResolved {
            call_id: "call_1_1".to_owned(),
            decision: control::ApprovalDecision::Deny.into(),
            reason: "too late".to_owned(),
            resolved_by: "bob".to_owned(),
        };
        harness
            .log
            .append("s1", 1, Kind::ApprovalResolved(again))
            .await
    };
    let (_, second) = tokio::time::timeout(
        Duration::from_secs(10),
        futures::future::join(run, answer_twice),
    )
    .await
    .unwrap();
    assert!(
        matches!(second, Err(StoreError::ApprovalNotPending { ref call_id, .. }) if call_id == "call_1_1"),
        "{second:?}"
    );
}

// ---------------------------------------------------------------------------
// Budgets

const LOOPING_SCRIPT: &str = r#"
    [[turn]]
    text = "Step one."
    [[turn.tool-calls]]
    tool = "fast"
    [[turn]]
    text = "Step two."
    [[turn.tool-calls]]
    tool = "fast"
    [[turn.tool-calls]]
    tool = "fast"
    [[turn]]
    text = "Step three."
    [[turn.tool-calls]]
    tool = "fast"
    [[turn]]
    text = "Finished."
"#;

async fn budget_run(budget: control::BudgetLimits) -> Harness {
    let harness = Harness::new(LOOPING_SCRIPT, &["fast"], FakeSandbox::new(&["fast"]))
        .await
        .priced(ModelPrice {
            input_usd_per_mtok: 1000.0,
            cached_input_usd_per_mtok: None,
            output_usd_per_mtok: 2000.0,
        });
    harness.run_with(budget).await;
    harness
}

fn finished_event(events: &[control::SessionEvent]) -> control::SessionFinished {
    match events.last().and_then(|event| event.kind.clone()) {
        Some(Kind::Finished(finished)) => finished,
        other => panic!("last event is not finished: {other:?}"),
    }
}

fn warnings(events: &[control::SessionEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::BudgetWarning(warning)) => Some(warning.budget.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn the_tool_call_budget_stops_calls_beyond_it_and_the_session() {
    let harness = budget_run(control::BudgetLimits {
        max_turns: Some(10),
        max_tool_calls: Some(2),
        ..Default::default()
    })
    .await;
    let events = harness.events().await;
    let finished = finished_event(&events);
    assert_eq!(
        (
            finished.stop_reason(),
            finished.final_output.as_str(),
            finished.message.as_str()
        ),
        (
            control::StopReason::BudgetExhausted,
            "Step two.",
            "the tool_calls budget is used up (2 of 2 tool calls)"
        )
    );
    let summary = harness.summary().await;
    assert!(
        summary.iter().any(|line| line.ends_with(
            "t2 finished call_2_1 TOOL_ERROR_KIND_DENIED not run: the tool_calls budget is used up (2 of 2 tool calls)"
        )),
        "{summary:#?}"
    );
    assert_eq!(harness.sandbox.executions(), 2);
    assert_eq!(warnings(&events), ["tool_calls"]);
}

#[tokio::test]
async fn the_model_is_told_to_wrap_up_at_eighty_percent() {
    let unlimited = budget_run(control::BudgetLimits {
        max_turns: Some(10),
        ..Default::default()
    })
    .await;
    let first_input = unlimited.provider.requests.lock().unwrap().len();
    assert_eq!(first_input, 4);
    let turn_inputs: Vec<u64> = unlimited
        .events()
        .await
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::TurnCompleted(turn)) => turn.usage.map(|usage| usage.input_tokens),
            _ => None,
        })
        .collect();
    // Turn 1 uses exactly 80% of this limit.
    let limit = turn_inputs[0] * 5 / 4;
    assert_eq!(
        limit * 4 / 5,
        turn_inputs[0],
        "pick a turn-1 size divisible by 4"
    );
    let harness = budget_run(control::BudgetLimits {
        max_turns: Some(10),
        max_input_tokens: Some(limit),
        ..Default::default()
    })
    .await;
    let requests = harness.provider.requests.lock().unwrap().clone();
    let notice = requests[1].messages.last().unwrap();
    assert_eq!(
        notice,
        &Message::User {
            text: format!(
                "[harness] Budget notice: {} of {limit} input tokens used (input_tokens). Wrap up \
                 now: finish the task with what you have, or summarise your progress and what \
                 remains. The session stops when the budget runs out.",
                turn_inputs[0]
            )
        }
    );
    let finished = finished_event(&harness.events().await);
    assert_eq!(finished.stop_reason(), control::StopReason::BudgetExhausted);
}

#[tokio::test]
async fn the_turn_budget_stops_with_max_turns() {
    let harness = budget_run(control::BudgetLimits {
        max_turns: Some(1),
        ..Default::default()
    })
    .await;
    let finished = finished_event(&harness.events().await);
    assert_eq!(
        (finished.stop_reason(), finished.final_output.as_str()),
        (control::StopReason::MaxTurns, "Step one.")
    );
}

#[tokio::test]
async fn token_and_cost_budgets_stop_the_session_with_the_partial_answer() {
    let unlimited = budget_run(control::BudgetLimits {
        max_turns: Some(10),
        ..Default::default()
    })
    .await;
    let turns: Vec<control::TurnUsage> = unlimited
        .events()
        .await
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::TurnCompleted(turn)) => turn.usage,
            _ => None,
        })
        .collect();
    assert_eq!(turns.len(), 4);
    let first = turns[0];
    assert_eq!(
        first.cost_micros,
        first.input_tokens * 1000 + first.output_tokens * 2000
    );
    let cases = [
        (
            "input_tokens",
            control::BudgetLimits {
                max_input_tokens: Some(first.input_tokens),
                ..Default::default()
            },
        ),
        (
            "output_tokens",
            control::BudgetLimits {
                max_output_tokens: Some(first.output_tokens),
                ..Default::default()
            },
        ),
        (
            "cost",
            control::BudgetLimits {
                max_cost_micros: Some(first.cost_micros),
                ..Default::default()
            },
        ),
    ];
    for (name, limits) in cases {
        let harness = budget_run(control::BudgetLimits {
            max_turns: Some(10),
            ..limits
        })
        .await;
        let events = harness.events().await;
        let finished = finished_event(&events);
        assert_eq!(
            (finished.stop_reason(), finished.final_output.as_str()),
            (control::StopReason::BudgetExhausted, "Step one."),
            "{name}"
        );
        assert!(
            finished
                .message
                .starts_with(&format!("the {name} budget is used up")),
            "{name}: {}",
            finished.message
        );
        // The budget ran out with turn 1's model call, so its tool call did not run.
        assert_eq!(harness.sandbox.executions(), 0, "{name}");
        assert_eq!(warnings(&events), [name], "{name}");
    }
}

#[tokio::test]
async fn the_wall_clock_budget_stops_a_session_mid_tool_call() {
    let sandbox = FakeSandbox::new(&["fast"]).with("fast", Behaviour::Hang);
    let harness = Harness::new(LOOPING_SCRIPT, &["fast"], sandbox).await;
    harness
        .run_with(control::BudgetLimits {
            max_turns: Some(10),
            max_wall_clock: Some(harness_proto::duration_to_proto(Duration::from_millis(300))),
            ..Default::default()
        })
        .await;
    let summary = harness.summary().await;
    assert_eq!(
        summary[summary.len() - 2],
        "7 t1 finished call_1_0 TOOL_ERROR_KIND_INTERRUPTED the session ended before this call finished; its side effects may or may not have happened"
    );
    let finished = finished_event(&harness.events().await);
    assert_eq!(
        (finished.stop_reason(), finished.final_output.as_str()),
        (control::StopReason::BudgetExhausted, "Step one.")
    );
    assert!(
        finished
            .message
            .starts_with("the wall_clock budget is used up"),
        "{}",
        finished.message
    );
    drop(harness.shutdown);
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
    assert!(supervisor.is_running("s1"));
    tokio::time::timeout(Duration::from_secs(10), async {
        while supervisor.is_running("s1") {
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

// ---------------------------------------------------------------------------
// Harness tools

/// A harness tool for the tests: notes what it is told, counting its runs.
#[derive(Debug, Default)]
struct NoteTool {
    runs: AtomicUsize,
}

impl crate::agent_loop::executor::HarnessTool for NoteTool {
    fn name(&self) -> &str {
        "note"
    }

    fn description(&self) -> &str {
        "Notes a line."
    }

    fn input_schema_json(&self) -> &str {
        r#"{"type":"object","required":["line"]}"#
    }

    fn call(
        &self,
        call: control::HarnessToolCall,
    ) -> BoxFuture<'static, Result<String, crate::agent_loop::executor::HarnessToolError>> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let input: serde_json::Value = serde_json::from_str(&call.input_json).unwrap();
            Ok(
                serde_json::json!({"noted": input["line"], "invocation": call.invocation_id})
                    .to_string(),
            )
        })
    }
}

const NOTE_SCRIPT: &str = r#"
    [[turn]]
    text = "Noting."
    [[turn.tool-calls]]
    tool = "note"
    arguments = { line = "hello" }
    [[turn.tool-calls]]
    tool = "fast"
    arguments = { n = 1 }

    [[turn]]
    text = "Noted."
"#;

async fn note_harness() -> (Harness, Arc<NoteTool>) {
    let mut harness =
        Harness::new(NOTE_SCRIPT, &["fast", "note"], FakeSandbox::new(&["fast"])).await;
    let tool = Arc::new(NoteTool::default());
    harness.harness_tools.register(tool.clone()).unwrap();
    (harness, tool)
}

#[tokio::test]
async fn a_harness_tool_is_offered_in_the_agents_order_and_its_call_recorded_as_a_harness_step() {
    let (harness, tool) = note_harness().await;
    harness.run(5, 2).await;
    assert_eq!(
        harness.summary().await,
        [
            "1 t0 started",
            "2 t1 text \"Noting.\"",
            "3 t1 requested call_1_0 note",
            "4 t1 requested call_1_1 fast",
            "5 t1 policy call_1_0 VERDICT_ALLOW default",
            "6 t1 policy call_1_1 VERDICT_ALLOW default",
            "7 t1 started s1:call_1_0",
            "8 t1 started s1:call_1_1",
            "9 t1 finished call_1_0 ok {\"invocation\":\"s1:call_1_0\",\"noted\":\"hello\"}",
            "10 t1 output call_1_1 stderr",
            "11 t1 finished call_1_1 ok {}",
            "12 t1 turn 1 tool_use",
            "13 t2 text \"Noted.\"",
            "14 t2 turn 2 end_turn",
            "15 t2 end STOP_REASON_COMPLETED \"Noted.\" \"\"",
        ]
    );
    assert_eq!(tool.runs.load(Ordering::SeqCst), 1);
    // sandboxd saw only its own tool.
    assert_eq!(
        harness
            .sandbox
            .calls()
            .into_iter()
            .filter(|call| call.starts_with("invoke"))
            .collect::<Vec<_>>(),
        ["invoke s1:call_1_1 fast"]
    );
    let offered: Vec<(String, String)> = harness.provider.requests.lock().unwrap()[0]
        .tools
        .iter()
        .map(|tool| (tool.name.clone(), tool.description.clone()))
        .collect();
    assert_eq!(
        offered,
        [
            ("fast".to_owned(), "the fast tool".to_owned()),
            ("note".to_owned(), "Notes a line.".to_owned())
        ]
    );
    let steps = harness.store.read_steps("s1".to_owned()).await.unwrap();
    let step = steps
        .iter()
        .find(|step| step.step == "harness:call_1_0")
        .unwrap();
    assert_eq!(
        control::HarnessToolCall::decode(step.payload.as_slice()).unwrap(),
        control::HarnessToolCall {
            invocation_id: "s1:call_1_0".to_owned(),
            tool: "note".to_owned(),
            input_json: r#"{"line":"hello"}"#.to_owned(),
        }
    );
    assert!(steps.iter().any(|step| step.step == "invoke:call_1_1"));
}

#[tokio::test]
async fn a_finished_harness_call_is_replayed_after_a_restart_not_run_again() {
    let (reference, _) = note_harness().await;
    reference.run(5, 2).await;
    let expected = reference.summary().await;
    // Event 9 is the harness call's result.
    for crash_after in 9..expected.len() as u64 {
        let (harness, tool) = note_harness().await;
        harness.create_session(5).await;
        harness.run_and_crash_after(crash_after).await;
        assert_eq!(tool.runs.load(Ordering::SeqCst), 1);
        harness.resume().await;
        assert_eq!(
            harness.summary().await,
            expected,
            "crash after {crash_after}"
        );
        assert_eq!(
            tool.runs.load(Ordering::SeqCst),
            1,
            "run once (crash after {crash_after})"
        );
    }
}

#[test]
fn harness_tool_names_are_unique_in_a_registry() {
    let mut registry = HarnessRegistry::default();
    registry.register(Arc::new(NoteTool::default())).unwrap();
    assert_eq!(
        registry
            .register(Arc::new(NoteTool::default()))
            .unwrap_err()
            .to_string(),
        "harness tool \"note\" is registered twice"
    );
    assert_eq!(registry.names().collect::<Vec<_>>(), ["note"]);
}
