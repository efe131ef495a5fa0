#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! The loop against a fake sandboxd, an in-memory provider and a real SQLite
//! store; shared fixtures here, the tests by phase in the submodules.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::future::BoxFuture;

use super::*;
use crate::agent::{AgentDefinition, ConversationSettings, SandboxSettings};
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
    /// Files `write_file` calls wrote, by (sandbox session, path).
    files: Mutex<HashMap<(String, String), String>>,
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
            if call.tool == "write_file"
                && let Ok(input) = serde_json::from_str::<serde_json::Value>(&call.input_json)
                && let (Some(path), Some(content)) =
                    (input["path"].as_str(), input["content"].as_str())
            {
                self.files.lock().unwrap().insert(
                    (request.session_id.clone(), path.to_owned()),
                    content.to_owned(),
                );
            }
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

    /// What `write_file` calls wrote; the digest is a stand-in naming the
    /// contents.
    fn read_files(
        &self,
        request: sandbox::ReadFilesRequest,
    ) -> BoxFuture<'_, Result<Vec<sandbox::FileContent>, SandboxError>> {
        let files = self.files.lock().unwrap();
        let mut read = Vec::new();
        for path in request.paths {
            match files.get(&(request.session_id.clone(), path.clone())) {
                Some(content) => read.push(sandbox::FileContent {
                    path,
                    content: content.as_bytes().to_vec(),
                    size: content.len() as u64,
                    truncated: false,
                    sha256: format!("digest of {content:?}"),
                    missing: false,
                }),
                None if request.allow_missing => read.push(sandbox::FileContent {
                    path,
                    missing: true,
                    ..Default::default()
                }),
                None => {
                    return Box::pin(async move {
                        Err(SandboxError::ReadFiles(tonic::Status::not_found(path)))
                    });
                }
            }
        }
        Box::pin(async move { Ok(read) })
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
        tenant: TenantId,
        key: String,
    ) -> BoxFuture<'_, Result<Option<SessionRecord>, StoreError>> {
        self.inner.find_by_idempotency_key(tenant, key)
    }
    fn get_session(
        &self,
        tenant: TenantId,
        session_id: SessionId,
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
        session_id: SessionId,
        sandbox_session_id: String,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner
            .set_sandbox_session(session_id, sandbox_session_id)
    }
    fn append_events(
        &self,
        session_id: SessionId,
        events: Vec<NewEvent>,
        steps: Vec<StepRecord>,
    ) -> BoxFuture<'_, Result<Vec<SessionEvent>, StoreError>> {
        Box::pin(async move {
            if !self.commit {
                let session = self
                    .inner
                    .get_session(TenantId::new("default"), session_id.clone())
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
    fn read_steps(
        &self,
        session_id: SessionId,
    ) -> BoxFuture<'_, Result<Vec<StepRecord>, StoreError>> {
        self.inner.read_steps(session_id)
    }
    fn pending_approvals(
        &self,
        session_id: SessionId,
    ) -> BoxFuture<'_, Result<Vec<PendingApproval>, StoreError>> {
        self.inner.pending_approvals(session_id)
    }
    fn request_cancel(
        &self,
        session_id: SessionId,
        reason: String,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        self.inner.request_cancel(session_id, reason)
    }
    fn read_events(
        &self,
        session_id: SessionId,
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
    context: crate::context::ContextSettings,
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
        skills: Vec::new(),
        tools: tools.iter().map(|tool| (*tool).to_owned()).collect(),
        budget: control::BudgetLimits {
            max_turns: Some(5),
            ..Default::default()
        },
        policy: PolicySettings::default(),
        sandbox: SandboxSettings::default(),
        conversation: ConversationSettings::default(),
        // Tests repeat calls on purpose; loop detection has tests of its own.
        max_repeated_calls: 0,
        delegation: crate::agent::DelegationSettings::default(),
        output: crate::agent::StructuredOutput::default(),
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
            context: crate::context::ContextSettings::default(),
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
                session_id: SessionId::new("s1"),
                tenant: TenantId::new("default"),
                agent: "tester".to_owned(),
                input: "go".to_owned(),
                metadata: HashMap::new(),
                budget,
                idempotency_key: None,
                parent: None,
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
            .get_session(TenantId::new("default"), SessionId::new("s1"))
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
                max_subagent_depth: DEFAULT_MAX_SUBAGENT_DEPTH,
                context: self.context.clone(),
            },
            self.harness_tools.clone(),
        )
    }

    /// Runs the stored session (from wherever its log ends) to its end; the
    /// receipt builder the loop hands over.
    async fn resume(&self) -> Option<ReceiptBuilder> {
        let (_cancel, cancel_signal) = watch::channel(None);
        let session = self.session().await;
        tokio::time::timeout(
            Duration::from_secs(10),
            self.agent_loop(2)
                .run(session, self.agent.clone(), cancel_signal),
        )
        .await
        .expect("the session ends within 10s")
    }

    async fn run_with(&self, budget: control::BudgetLimits) {
        self.create_session_with(budget).await;
        self.resume().await;
    }

    async fn run(&self, max_turns: u32, max_parallel_tool_calls: usize) -> Option<ReceiptBuilder> {
        let session = self.create_session(max_turns).await;
        let (_cancel, cancel_signal) = watch::channel(None);
        self.agent_loop(max_parallel_tool_calls)
            .run(session, self.agent.clone(), cancel_signal)
            .await
    }

    /// The receipt builder folded from the stored log, as a delegator
    /// that was not handed one builds it.
    async fn receipt_from_log(&self) -> ReceiptBuilder {
        let mut receipt = ReceiptBuilder::default();
        for event in self.events().await {
            if let Some(kind) = &event.kind {
                receipt.apply(kind);
            }
        }
        receipt
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
                _ = run => {}
                () = died.notified() => {}
            }
        })
        .await
        .expect("the loop ends or dies within 10s");
    }

    async fn events(&self) -> Vec<control::SessionEvent> {
        self.store
            .read_events(SessionId::new("s1"), 0, 10_000)
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
            let pending = self
                .store
                .pending_approvals(SessionId::new("s1"))
                .await
                .unwrap();
            if let Some(approval) = pending.first() {
                let resolved = control::ApprovalResolved {
                    call_id: approval.call_id.clone(),
                    decision: decision.into(),
                    reason: reason.to_owned(),
                    resolved_by: "alice".to_owned(),
                };
                self.log
                    .append(
                        &SessionId::new("s1"),
                        approval.turn,
                        Kind::ApprovalResolved(resolved),
                    )
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

mod approvals;
mod budgets;
mod compaction;
mod conversations;
mod harness_tools;
mod resume;
mod turns;
