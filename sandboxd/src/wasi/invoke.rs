//! One WASI invocation: a fresh `Store` with the session's limits, the
//! workspace preopened at `/workspace`, then instantiate and call.
//!
//! Defaults deny: no environment beyond what the policy grants, no
//! arguments, stdin closed, no sockets, no name lookups, no other preopens.

use std::path::Path;
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{Engine, ResourceLimiter, Store, UpdateDeadline};
use wasmtime_wasi::sockets::SocketAddrUse;
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::network::allowlist::Verdict;
use crate::network::http_egress::{EgressHooks, EgressPolicy, EgressRecord};

use super::ToolComponentPre;
use super::output::{CappedOutput, CapturedOutput};

/// Where the workspace appears inside every component.
pub const GUEST_WORKSPACE: &str = "/workspace";

/// Per-invocation store state.
pub struct HostState {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    egress: EgressHooks,
    table: ResourceTable,
    limiter: MemoryLimiter,
    timed_out: bool,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.egress,
        }
    }
}

/// Refuses linear-memory growth past the policy's limit and records the peak.
#[derive(Debug)]
struct MemoryLimiter {
    limit: usize,
    peak: usize,
    exhausted: bool,
}

/// Table growth is bounded separately from memory so a guest cannot use
/// tables to allocate host memory without limit.
const MAX_TABLE_ELEMENTS: usize = 1_000_000;

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.exhausted = true;
            wasmtime::bail!(
                "memory limit of {} bytes reached (growing to {desired} bytes)",
                self.limit
            );
        }
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// What one invocation is allowed.
#[derive(Debug, Clone)]
pub struct InvocationLimits {
    /// Wall-clock deadline.
    pub timeout: Duration,
    /// Linear-memory cap.
    pub memory_bytes: u64,
    /// Cap on kept stdout and on kept stderr.
    pub max_output_bytes: u64,
    /// Instruction budget, if any.
    pub fuel: Option<u64>,
}

/// What the invocation may see.
#[derive(Debug, Clone)]
pub struct InvocationScope<'a> {
    /// Host path of the session workspace.
    pub workspace: &'a Path,
    /// Mount the workspace read-only.
    pub read_only: bool,
    /// Environment granted by the policy.
    pub environment: &'a [(String, String)],
    /// Network the policy grants; `None` means none at all.
    pub egress: Option<&'a EgressPolicy>,
}

/// How a call ended, before mapping to the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutcome {
    /// The tool returned JSON.
    Ok(String),
    /// The tool returned a typed error.
    ToolError {
        /// The guest's kind.
        kind: super::GuestErrorKind,
        /// Its message.
        message: String,
    },
    /// The deadline passed.
    Timeout,
    /// The memory limit was hit.
    MemoryExhausted(String),
    /// The fuel budget ran out.
    FuelExhausted,
    /// The guest trapped (panic, unreachable, bad access...).
    Trapped(String),
    /// The host could not set the invocation up.
    Setup(String),
}

/// The full result of an invocation.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// How it ended.
    pub outcome: CallOutcome,
    /// Captured stdout.
    pub stdout: CapturedOutput,
    /// Captured stderr.
    pub stderr: CapturedOutput,
    /// Wall time from store creation to return.
    pub wall_time: Duration,
    /// Peak linear memory.
    pub peak_memory_bytes: u64,
    /// Fuel used, when a budget was set.
    pub fuel_consumed: u64,
}

/// Runs `invoke(input)` on a fresh instance.
pub async fn run_invoke(
    engine: &Engine,
    pre: &ToolComponentPre<HostState>,
    scope: &InvocationScope<'_>,
    limits: &InvocationLimits,
    input: &str,
) -> Invocation {
    let input = input.to_owned();
    run(engine, pre, Some(scope), limits, move |bindings, store| {
        Box::pin(async move {
            match bindings
                .harness_tool_tool()
                .call_invoke(store, &input)
                .await?
            {
                Ok(json) => Ok(CallOutcome::Ok(json)),
                Err(err) => Ok(CallOutcome::ToolError {
                    kind: err.kind,
                    message: err.message,
                }),
            }
        })
    })
    .await
}

/// Runs `describe()` on a fresh instance with no workspace.
pub async fn run_describe(
    engine: &Engine,
    pre: &ToolComponentPre<HostState>,
    limits: &InvocationLimits,
) -> Invocation {
    run(engine, pre, None, limits, |bindings, store| {
        Box::pin(async move {
            Ok(CallOutcome::Ok(
                bindings.harness_tool_tool().call_describe(store).await?,
            ))
        })
    })
    .await
}

type CallFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = wasmtime::Result<CallOutcome>> + Send + 'a>>;

async fn run<F>(
    engine: &Engine,
    pre: &ToolComponentPre<HostState>,
    scope: Option<&InvocationScope<'_>>,
    limits: &InvocationLimits,
    call: F,
) -> Invocation
where
    F: for<'a> FnOnce(&'a super::ToolComponent, &'a mut Store<HostState>) -> CallFuture<'a>,
{
    let started = Instant::now();
    let cap = usize::try_from(limits.max_output_bytes).unwrap_or(usize::MAX);
    let stdout = CappedOutput::new(cap);
    let stderr = CappedOutput::new(cap);
    let outcome = match build_store(engine, scope, limits, &stdout, &stderr, started) {
        Ok(mut store) => {
            let outcome = instantiate_and_call(pre, &mut store, limits.timeout, call).await;
            let fuel_consumed = limits.fuel.map_or(0, |budget| {
                budget.saturating_sub(store.get_fuel().unwrap_or(0))
            });
            let state = store.data();
            let peak = state.limiter.peak as u64;
            let outcome = classify(outcome, state.timed_out, state.limiter.exhausted);
            return Invocation {
                outcome,
                stdout: stdout.take(),
                stderr: stderr.take(),
                wall_time: started.elapsed(),
                peak_memory_bytes: peak,
                fuel_consumed,
            };
        }
        Err(message) => CallOutcome::Setup(message),
    };
    Invocation {
        outcome,
        stdout: stdout.take(),
        stderr: stderr.take(),
        wall_time: started.elapsed(),
        peak_memory_bytes: 0,
        fuel_consumed: 0,
    }
}

async fn instantiate_and_call<F>(
    pre: &ToolComponentPre<HostState>,
    store: &mut Store<HostState>,
    timeout: Duration,
    call: F,
) -> Result<CallOutcome, wasmtime::Error>
where
    F: for<'a> FnOnce(&'a super::ToolComponent, &'a mut Store<HostState>) -> CallFuture<'a>,
{
    // The epoch callback enforces the deadline inside wasm code; this outer
    // timeout catches a guest parked in a host call, with a little slack so
    // the precise in-wasm trap normally wins.
    let backstop = timeout + Duration::from_millis(20);
    let work = async {
        let bindings = pre.instantiate_async(&mut *store).await?;
        call(&bindings, store).await
    };
    match tokio::time::timeout(backstop, work).await {
        Ok(result) => result,
        Err(_) => Ok(CallOutcome::Timeout),
    }
}

fn classify(
    result: Result<CallOutcome, wasmtime::Error>,
    timed_out: bool,
    exhausted: bool,
) -> CallOutcome {
    match result {
        Ok(outcome) => outcome,
        Err(_) if timed_out => CallOutcome::Timeout,
        Err(error) if exhausted => CallOutcome::MemoryExhausted(format!("{error:#}")),
        Err(error)
            if error.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::OutOfFuel) =>
        {
            CallOutcome::FuelExhausted
        }
        Err(error) => CallOutcome::Trapped(format!("{error:#}")),
    }
}

fn build_store(
    engine: &Engine,
    scope: Option<&InvocationScope<'_>>,
    limits: &InvocationLimits,
    stdout: &CappedOutput,
    stderr: &CappedOutput,
    started: Instant,
) -> Result<Store<HostState>, String> {
    let mut builder = WasiCtxBuilder::new();
    // Name lookups inside the guest would bypass sandboxd's resolver, and UDP
    // is never granted; TCP only to addresses an allow rule names literally.
    builder
        .stdout(stdout.clone())
        .stderr(stderr.clone())
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false);
    let egress = scope.and_then(|s| s.egress).cloned();
    if let Some(policy) = &egress {
        builder.allow_tcp(true);
        let policy = policy.clone();
        builder.socket_addr_check(move |address, use_| {
            let verdict = match use_ {
                SocketAddrUse::TcpConnect => {
                    policy.allowlist.check_socket(address.ip(), address.port())
                }
                _ => Verdict::Deny("only outgoing TCP connections can be granted".to_owned()),
            };
            let allowed = matches!(verdict, Verdict::Allow(_));
            policy.log.record(EgressRecord {
                at: std::time::SystemTime::now(),
                destination: address.to_string(),
                address: Some(address),
                allowed,
                detail: match verdict {
                    Verdict::Allow(rule) | Verdict::Deny(rule) => rule,
                },
            });
            Box::pin(async move { allowed })
        });
    }
    if let Some(scope) = scope {
        builder.envs(scope.environment);
        let perms = if scope.read_only {
            FsPerms::ReadOnly
        } else {
            FsPerms::ReadWrite
        };
        builder
            .preopened_dir(scope.workspace, GUEST_WORKSPACE, perms)
            .map_err(|e| format!("cannot preopen the workspace: {e:#}"))?;
        builder.initial_cwd(GUEST_WORKSPACE);
    }
    let state = HostState {
        wasi: builder.build(),
        http: WasiHttpCtx::new(),
        egress: EgressHooks::new(egress),
        table: ResourceTable::new(),
        limiter: MemoryLimiter {
            limit: usize::try_from(limits.memory_bytes).unwrap_or(usize::MAX),
            peak: 0,
            exhausted: false,
        },
        timed_out: false,
    };
    let mut store = Store::new(engine, state);
    store.limiter(|state| &mut state.limiter);
    store
        .set_fuel(limits.fuel.unwrap_or(u64::MAX))
        .map_err(|e| format!("cannot set fuel: {e:#}"))?;
    let deadline = started + limits.timeout;
    store.set_epoch_deadline(1);
    // Every tick: trap if the deadline has passed, otherwise yield to the
    // executor so many looping guests share the worker threads fairly.
    store.epoch_deadline_callback(move |mut ctx| {
        if Instant::now() >= deadline {
            ctx.data_mut().timed_out = true;
            Ok(UpdateDeadline::Interrupt)
        } else {
            Ok(UpdateDeadline::Yield(1))
        }
    });
    Ok(store)
}
