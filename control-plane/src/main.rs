//! The `control-plane` binary: `serve` runs the daemon; the other subcommands
//! are a small gRPC client for a running control plane.

// A CLI prints by design; the library never does.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use harness_control_plane::config::ControlPlaneConfig;
use harness_control_plane::transcript::{render_event, session_status_label, stop_reason_label};
use harness_control_plane::{server, transport};
use harness_daemon::logging::LogFormat;
use harness_daemon::{DefaultPaths, ListenAddress};
use harness_proto::control::v1 as control;
use harness_proto::control::v1::control_service_client::ControlServiceClient;
use harness_proto::control::v1::session_event::Kind;
use tonic::transport::Channel;

/// Every event crosses threads (a session's task allocates it, the SQLite
/// writer thread frees it); glibc's allocator serialises such frees on its
/// arena locks, mimalloc does not (see docs/BENCHMARKS.md, control-plane).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "control-plane",
    version,
    about = "Runs agent sessions and records every step"
)]
struct Cli {
    /// Log format (logs go to stderr).
    #[arg(long, value_enum, default_value_t = LogFormat::Pretty, global = true)]
    log_format: LogFormat,
    #[command(flatten)]
    client: ClientArgs,
    #[command(subcommand)]
    command: Command,
}

/// Which pending tool call an approve or deny answers.
#[derive(Debug, clap::Args)]
struct Resolution {
    /// Session id.
    session: String,
    /// The call id (from the approval_requested event).
    call: String,
    /// Why (recorded; passed to the model on denial).
    #[arg(long, default_value = "")]
    reason: String,
    /// The call is a subagent's: the id of that descendant session of
    /// `session` (shown in its approval_requested event and by
    /// `list --parent`).
    #[arg(long)]
    subagent: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane.
    Serve(ServeArgs),
    /// Start a session of an agent.
    Start {
        /// Agent name (see `agents`).
        #[arg(long)]
        agent: String,
        /// The first user message.
        #[arg(long)]
        input: String,
        /// Idempotency key: repeating it returns the same session.
        #[arg(long, default_value = "")]
        idempotency_key: String,
        /// Lower the agent's limits for this session (never raise them).
        #[command(flatten)]
        budget: BudgetArgs,
        /// Print the session's events until it finishes (or, for a conversation,
        /// until it answers and waits for the next message).
        #[arg(long)]
        follow: bool,
    },
    /// Print a session's events as a transcript, one line each: those
    /// recorded so far, or with --follow until it finishes.
    Events {
        /// Session id.
        session: String,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Keep following until the session finishes, reconnecting (from the
        /// last event seen) if the control plane restarts.
        #[arg(long)]
        follow: bool,
    },
    /// Send the next message to a conversation session that waits for input.
    Send {
        /// Session id.
        session: String,
        /// The message.
        message: String,
        /// Idempotency key: repeating it sends the message once.
        #[arg(long, default_value = "")]
        idempotency_key: String,
        /// Print the session's events until it answers (waits again) or
        /// finishes.
        #[arg(long)]
        follow: bool,
    },
    /// Allow a tool call that is awaiting approval.
    Approve(Resolution),
    /// Deny a tool call that is awaiting approval; the model is told why.
    Deny(Resolution),
    /// Cancel a session; running tool calls are stopped.
    Cancel {
        /// Session id.
        session: String,
        /// Why (recorded in the finished event).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Show one session.
    Get {
        /// Session id.
        session: String,
    },
    /// List sessions, newest first.
    List {
        /// Only sessions of this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Only sessions in this status: pending, running, awaiting_approval,
        /// waiting_for_input or finished.
        #[arg(long)]
        status: Option<String>,
        /// Only the subagent sessions this session delegated to.
        #[arg(long)]
        parent: Option<String>,
        /// Maximum sessions to show.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// List the agents the control plane can run.
    Agents,
}

/// Budget overrides of `start`.
#[derive(Debug, clap::Args)]
struct BudgetArgs {
    /// Maximum model turns.
    #[arg(long)]
    max_turns: Option<u32>,
    /// Maximum tool calls.
    #[arg(long)]
    max_tool_calls: Option<u32>,
    /// Maximum input tokens over the session.
    #[arg(long)]
    max_input_tokens: Option<u64>,
    /// Maximum output tokens over the session.
    #[arg(long)]
    max_output_tokens: Option<u64>,
    /// Maximum cost in US dollars.
    #[arg(long)]
    max_cost_usd: Option<f64>,
    /// Maximum wall-clock time, e.g. "10m".
    #[arg(long, value_parser = humantime::parse_duration)]
    max_wall_clock: Option<Duration>,
}

impl BudgetArgs {
    fn to_proto(&self) -> Option<control::BudgetLimits> {
        let limits = control::BudgetLimits {
            max_turns: self.max_turns,
            max_tool_calls: self.max_tool_calls,
            max_input_tokens: self.max_input_tokens,
            max_output_tokens: self.max_output_tokens,
            // Whole micro-dollars.
            max_cost_micros: self.max_cost_usd.map(|usd| (usd * 1e6).round() as u64),
            max_wall_clock: self.max_wall_clock.map(harness_proto::duration_to_proto),
        };
        (limits != control::BudgetLimits::default()).then_some(limits)
    }
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Configuration file (TOML); defaults apply without one.
    #[arg(long, env = "CONTROL_PLANE_CONFIG")]
    config: Option<PathBuf>,
    /// Where to listen, `unix:<path>` or `<ip>:<port>`; repeat to listen on
    /// several (e.g. `--listen unix:/run/harness/control-plane.sock --listen
    /// 127.0.0.1:7070`). Replaces `listen` of the file.
    #[arg(long, value_name = "ADDRESS")]
    listen: Vec<ListenAddress>,
    /// Allow TCP listeners off loopback. The control plane does not
    /// authenticate its callers: anyone who can reach the port can start
    /// sessions.
    #[arg(long)]
    insecure_listen: bool,
    /// sandboxd endpoint, `unix:<path>` or `http://<host>:<port>` (overrides the file).
    #[arg(long)]
    sandboxd: Option<String>,
    /// SQLite database path (overrides the file).
    #[arg(long)]
    database: Option<PathBuf>,
    /// Agents directory (overrides the file).
    #[arg(long)]
    agents_dir: Option<PathBuf>,
}

/// Where the client subcommands find the control plane; a global flag, so
/// it goes before or after the subcommand.
#[derive(Debug, clap::Args)]
struct ClientArgs {
    /// Control plane endpoint, `unix:<path>` or `http://<host>:<port>`.
    /// Default: `unix:/run/harness/control-plane.sock`
    /// (`unix:$HARNESS_HOME/run/control-plane.sock`).
    #[arg(long, global = true, env = "HARNESS_ENDPOINT", value_name = "ENDPOINT")]
    endpoint: Option<String>,
}

impl ClientArgs {
    /// The endpoint given, else the control plane's default socket.
    fn endpoint(&self) -> String {
        self.endpoint
            .clone()
            .unwrap_or_else(|| DefaultPaths::from_env().control_plane_endpoint())
    }

    fn client(&self) -> anyhow::Result<ControlServiceClient<Channel>> {
        let endpoint = self.endpoint();
        let channel = transport::connect_lazy(&endpoint)
            .with_context(|| format!("bad endpoint {endpoint}"))?;
        Ok(ControlServiceClient::new(channel))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    harness_daemon::logging::init(cli.log_format)?;
    let client = cli.client;
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Start {
            agent,
            input,
            idempotency_key,
            budget,
            follow,
        } => {
            let request = control::StartSessionRequest {
                agent,
                input,
                idempotency_key,
                budget: budget.to_proto(),
                ..Default::default()
            };
            start(&client, request, follow).await
        }
        Command::Events {
            session,
            after,
            follow,
        } => {
            let until = if follow {
                PrintUntil::Finished
            } else {
                PrintUntil::Recorded
            };
            print_events(&client, session, after, until).await
        }
        Command::Send {
            session,
            message,
            idempotency_key,
            follow,
        } => {
            let request = control::SendMessageRequest {
                session_id: session,
                message,
                idempotency_key,
            };
            send(&client, request, follow).await
        }
        Command::Approve(resolution) => {
            resolve(
                client.client()?,
                resolution,
                control::ApprovalDecision::Allow,
            )
            .await
        }
        Command::Deny(resolution) => {
            resolve(
                client.client()?,
                resolution,
                control::ApprovalDecision::Deny,
            )
            .await
        }
        Command::Cancel { session, reason } => cancel(client.client()?, session, reason).await,
        Command::Get { session } => get(client.client()?, session).await,
        Command::List {
            agent,
            status,
            parent,
            limit,
        } => list(client.client()?, agent, status, parent, limit).await,
        Command::Agents => agents(client.client()?).await,
    }
}

impl ServeArgs {
    /// The config file (or the defaults) with the flags applied.
    fn config(self) -> anyhow::Result<ControlPlaneConfig> {
        let mut config = match &self.config {
            Some(path) => ControlPlaneConfig::load(path)?,
            None => ControlPlaneConfig::default(),
        };
        if !self.listen.is_empty() {
            config.listen = self.listen;
        }
        config.insecure_listen |= self.insecure_listen;
        if let Some(sandboxd) = self.sandboxd {
            config.sandboxd = sandboxd;
        }
        if let Some(database) = self.database {
            config.database = database;
        }
        if let Some(agents_dir) = self.agents_dir {
            config.agents_dir = agents_dir;
        }
        Ok(config)
    }
}

/// Runs the daemon; once every listener is bound, prints one line per
/// listener on stdout, `listening on <address>` (with the real port when
/// asked for port 0), so a supervisor or test learns where it is.
async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let shutdown =
        harness_daemon::shutdown::shutdown_signal().context("cannot handle SIGTERM and SIGINT")?;
    server::run(
        &config,
        async {
            shutdown.await;
        },
        |addresses| {
            for address in addresses {
                println!("listening on {address}");
            }
        },
    )
    .await
    .context("control plane failed")
}

async fn start(
    client_args: &ClientArgs,
    request: control::StartSessionRequest,
    follow: bool,
) -> anyhow::Result<()> {
    let response = client_args
        .client()?
        .start_session(request)
        .await
        .map_err(rpc_error("StartSession"))?
        .into_inner();
    let session = response
        .session
        .context("StartSession returned no session")?;
    let how = if response.created {
        "started"
    } else {
        "existing"
    };
    println!("session {} ({how})", session.session_id);
    if follow {
        print_events(client_args, session.session_id, 0, PrintUntil::Answered).await?;
    }
    Ok(())
}

/// Sends a message; with `follow`, prints what follows it until the
/// session has answered (waits again) or finishes.
async fn send(
    client_args: &ClientArgs,
    request: control::SendMessageRequest,
    follow: bool,
) -> anyhow::Result<()> {
    let session_id = request.session_id.clone();
    let seq = client_args
        .client()?
        .send_message(request)
        .await
        .map_err(rpc_error("SendMessage"))?
        .into_inner()
        .seq;
    println!("message #{seq} sent to session {session_id}");
    if follow {
        print_events(client_args, session_id, seq, PrintUntil::Answered).await?;
    }
    Ok(())
}

/// How far `print_events` goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PrintUntil {
    /// The events recorded so far.
    Recorded,
    /// Until the session finishes (a conversation's waits included).
    Finished,
    /// Until the session finishes or waits for input now.
    Answered,
}

/// How long `events --follow` keeps trying to reconnect.
const RECONNECT_FOR: Duration = Duration::from_secs(60);

/// Prints events from `after_seq` on: those recorded so far, or with
/// `follow` every one until the session finishes. A broken stream (the
/// control plane restarting) is resumed from the last event printed, so the
/// transcript has no gaps and no repeats.
async fn print_events(
    client_args: &ClientArgs,
    session_id: String,
    mut after_seq: u64,
    print_until: PrintUntil,
) -> anyhow::Result<()> {
    let follow = print_until != PrintUntil::Recorded;
    let stop_at_wait = print_until == PrintUntil::Answered;
    let until = if follow {
        None
    } else {
        let session = client_args
            .client()?
            .get_session(control::GetSessionRequest {
                session_id: session_id.clone(),
            })
            .await
            .map_err(rpc_error("GetSession"))?
            .into_inner()
            .session
            .context("GetSession returned no session")?;
        if session.last_seq <= after_seq {
            return Ok(());
        }
        Some(session.last_seq)
    };
    let mut broken_since: Option<std::time::Instant> = None;
    loop {
        let before = after_seq;
        let outcome = stream_once(
            client_args,
            &session_id,
            &mut after_seq,
            until,
            stop_at_wait,
        )
        .await;
        if after_seq > before {
            broken_since = None;
        }
        match outcome {
            Ok(()) => return Ok(()),
            Err(status) if follow && reconnectable(&status) => {
                let since = *broken_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > RECONNECT_FOR {
                    return Err(rpc_error("StreamEvents")(status));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(status) => return Err(rpc_error("StreamEvents")(status)),
        }
    }
}

fn reconnectable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
    )
}

/// One StreamEvents call; advances `after_seq` past every event printed and
/// stops after `until`, if given, or (with `stop_at_wait`) at a
/// `waiting_for_input` the session is still in.
async fn stream_once(
    client_args: &ClientArgs,
    session_id: &str,
    after_seq: &mut u64,
    until: Option<u64>,
    stop_at_wait: bool,
) -> Result<(), tonic::Status> {
    let mut client = client_args
        .client()
        .map_err(|error| tonic::Status::invalid_argument(error.to_string()))?;
    let mut events = client
        .stream_events(control::StreamEventsRequest {
            session_id: session_id.to_owned(),
            after_seq: *after_seq,
            follow: true,
        })
        .await?
        .into_inner();
    while let Some(event) = events.next().await {
        let event = event?;
        *after_seq = event.seq;
        println!("{}", render_event(&event));
        if until.is_some_and(|last| event.seq >= last) {
            break;
        }
        let waits = matches!(event.kind, Some(Kind::WaitingForInput(_)));
        if stop_at_wait && waits && still_waiting_at(&mut client, session_id, event.seq).await? {
            break;
        }
    }
    Ok(())
}

/// True if the session waits for input and `seq` is its latest event.
async fn still_waiting_at(
    client: &mut ControlServiceClient<Channel>,
    session_id: &str,
    seq: u64,
) -> Result<bool, tonic::Status> {
    let session = client
        .get_session(control::GetSessionRequest {
            session_id: session_id.to_owned(),
        })
        .await?
        .into_inner()
        .session;
    Ok(session.is_some_and(|session| {
        session.status() == control::SessionStatus::WaitingForInput && session.last_seq == seq
    }))
}

async fn resolve(
    mut client: ControlServiceClient<Channel>,
    resolution: Resolution,
    decision: control::ApprovalDecision,
) -> anyhow::Result<()> {
    let call_id = resolution.call.clone();
    let response = client
        .resolve_approval(control::ResolveApprovalRequest {
            session_id: resolution.session,
            call_id: resolution.call,
            decision: decision.into(),
            reason: resolution.reason,
            subagent_session_id: resolution.subagent.unwrap_or_default(),
        })
        .await
        .map_err(rpc_error("ResolveApproval"))?
        .into_inner();
    let verb = match decision {
        control::ApprovalDecision::Allow => "allowed",
        _ => "denied",
    };
    println!("{call_id} {verb} (event #{})", response.seq);
    Ok(())
}

async fn cancel(
    mut client: ControlServiceClient<Channel>,
    session_id: String,
    reason: String,
) -> anyhow::Result<()> {
    let session = client
        .cancel_session(control::CancelSessionRequest { session_id, reason })
        .await
        .map_err(rpc_error("CancelSession"))?
        .into_inner()
        .session
        .context("CancelSession returned no session")?;
    println!(
        "session {}  {}  {}",
        session.session_id,
        session_status_label(session.status()),
        stop_reason_label(session.stop_reason())
    );
    Ok(())
}

async fn get(mut client: ControlServiceClient<Channel>, session_id: String) -> anyhow::Result<()> {
    let session = client
        .get_session(control::GetSessionRequest { session_id })
        .await
        .map_err(rpc_error("GetSession"))?
        .into_inner()
        .session
        .context("GetSession returned no session")?;
    let usage = session.usage.unwrap_or_default();
    println!("session      {}", session.session_id);
    println!("agent        {}", session.agent);
    println!("status       {}", session_status_label(session.status()));
    println!("stop reason  {}", stop_reason_label(session.stop_reason()));
    println!("created      {}", optional(session.created_at));
    println!("updated      {}", optional(session.updated_at));
    println!("events       {}", session.last_seq);
    println!(
        "usage        turns={} tool_calls={} input_tokens={} (cached {}) output_tokens={} cost_usd={:.6} wall_clock={}",
        usage.turns,
        usage.tool_calls,
        usage.input_tokens,
        usage.cached_input_tokens,
        usage.output_tokens,
        usage.cost_micros as f64 / 1e6,
        optional(usage.wall_clock)
    );
    println!("final output {}", session.final_output);
    Ok(())
}

async fn list(
    mut client: ControlServiceClient<Channel>,
    agent: Option<String>,
    status: Option<String>,
    parent: Option<String>,
    limit: u32,
) -> anyhow::Result<()> {
    let status = match status {
        Some(name) => {
            let full = format!("SESSION_STATUS_{}", name.to_ascii_uppercase());
            control::SessionStatus::from_str_name(&full)
                .with_context(|| format!("unknown status {name:?}"))?
        }
        None => control::SessionStatus::Unspecified,
    };
    let response = client
        .list_sessions(control::ListSessionsRequest {
            page_size: limit,
            agent: agent.unwrap_or_default(),
            status: status.into(),
            parent_session_id: parent.unwrap_or_default(),
            ..Default::default()
        })
        .await
        .map_err(rpc_error("ListSessions"))?
        .into_inner();
    for session in response.sessions {
        println!(
            "{}  {}  {}  {}  {}",
            session.session_id,
            session.agent,
            session_status_label(session.status()),
            stop_reason_label(session.stop_reason()),
            optional(session.created_at)
        );
    }
    Ok(())
}

async fn agents(mut client: ControlServiceClient<Channel>) -> anyhow::Result<()> {
    let response = client
        .list_agents(control::ListAgentsRequest {})
        .await
        .map_err(rpc_error("ListAgents"))?
        .into_inner();
    for agent in response.agents {
        println!(
            "{}  {}/{}  tools={}  {}",
            agent.name,
            agent.provider,
            agent.model,
            agent.tools.join(","),
            agent.description
        );
    }
    Ok(())
}

/// A failed rpc as `<Rpc> failed (<Code>): <message>`, without tonic's
/// metadata and details noise.
fn rpc_error(rpc: &'static str) -> impl FnOnce(tonic::Status) -> anyhow::Error {
    move |status| anyhow::anyhow!("{rpc} failed ({:?}): {}", status.code(), status.message())
}

fn optional<T: std::fmt::Display>(value: Option<T>) -> String {
    value.map_or_else(|| "-".to_owned(), |value| value.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn endpoint_of(args: &[&str]) -> Option<String> {
        Cli::try_parse_from(args).unwrap().client.endpoint
    }

    #[test]
    fn endpoint_goes_before_or_after_the_subcommand() {
        let start = ["start", "--agent", "demo", "--input", "hi", "--follow"];
        let before: Vec<&str> = [
            "control-plane",
            "--endpoint",
            "unix:/tmp/control-plane.sock",
        ]
        .into_iter()
        .chain(start)
        .collect();
        let after: Vec<&str> = ["control-plane"]
            .into_iter()
            .chain(start)
            .chain(["--endpoint", "unix:/tmp/control-plane.sock"])
            .collect();
        for args in [before, after] {
            let cli = Cli::try_parse_from(&args).unwrap();
            assert_eq!(
                cli.client.endpoint.as_deref(),
                Some("unix:/tmp/control-plane.sock"),
                "{args:?}"
            );
            let Command::Start { agent, follow, .. } = cli.command else {
                panic!("not start: {args:?}");
            };
            assert_eq!((agent.as_str(), follow), ("demo", true));
        }
    }

    #[test]
    fn endpoint_works_with_every_client_subcommand() {
        for sub in [
            &["agents"][..],
            &["list", "--limit", "3"],
            &["get", "s1"],
            &["events", "s1", "--follow"],
            &["cancel", "s1"],
            &["approve", "s1", "c1"],
            &["deny", "s1", "c1"],
        ] {
            let args: Vec<&str> = ["control-plane", "--endpoint", "http://127.0.0.1:7070"]
                .into_iter()
                .chain(sub.iter().copied())
                .collect();
            assert_eq!(
                endpoint_of(&args).as_deref(),
                Some("http://127.0.0.1:7070"),
                "{args:?}"
            );
        }
    }

    #[test]
    fn without_endpoint_the_default_socket_is_dialled() {
        let cli = Cli::try_parse_from(["control-plane", "agents"]).unwrap();
        // HARNESS_ENDPOINT may be set in the environment of a developer's shell.
        if std::env::var_os("HARNESS_ENDPOINT").is_none() {
            assert_eq!(cli.client.endpoint, None);
            assert_eq!(
                cli.client.endpoint(),
                DefaultPaths::from_env().control_plane_endpoint()
            );
        }
    }

    #[test]
    fn serve_listens_on_every_listen_flag() {
        let cli = Cli::try_parse_from([
            "control-plane",
            "serve",
            "--listen",
            "unix:/tmp/cp.sock",
            "--listen",
            "127.0.0.1:0",
            "--agents-dir",
            "/agents",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve");
        };
        let config = args.config().unwrap();
        assert_eq!(
            (config.listen, config.insecure_listen, config.agents_dir),
            (
                vec![
                    ListenAddress::Unix(PathBuf::from("/tmp/cp.sock")),
                    "127.0.0.1:0".parse().unwrap()
                ],
                false,
                PathBuf::from("/agents")
            )
        );
    }

    #[test]
    fn insecure_listen_is_a_flag() {
        let cli = Cli::try_parse_from([
            "control-plane",
            "serve",
            "--listen",
            "0.0.0.0:7070",
            "--insecure-listen",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve");
        };
        assert!(args.config().unwrap().insecure_listen);
    }
}
