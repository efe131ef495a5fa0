//! The `control-plane` binary: `serve` runs the daemon; the other subcommands
//! are a small gRPC client for a running control plane.

// A CLI prints by design; the library never does.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use futures::StreamExt;
use harness_control_plane::config::ControlPlaneConfig;
use harness_control_plane::transcript::{render_event, session_status_label, stop_reason_label};
use harness_control_plane::{server, transport};
use harness_proto::control::v1 as control;
use harness_proto::control::v1::control_service_client::ControlServiceClient;
use tonic::transport::Channel;

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane.
    Serve(ServeArgs),
    /// Start a session of an agent.
    Start {
        #[command(flatten)]
        client: ClientArgs,
        /// Agent name (see `agents`).
        #[arg(long)]
        agent: String,
        /// The first user message.
        #[arg(long)]
        input: String,
        /// Idempotency key: repeating it returns the same session.
        #[arg(long, default_value = "")]
        idempotency_key: String,
        /// Print the session's events until it finishes.
        #[arg(long)]
        follow: bool,
    },
    /// Print a session's events as a transcript.
    Events {
        #[command(flatten)]
        client: ClientArgs,
        /// Session id.
        session: String,
        /// Only events after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Show one session.
    Get {
        #[command(flatten)]
        client: ClientArgs,
        /// Session id.
        session: String,
    },
    /// List sessions, newest first.
    List {
        #[command(flatten)]
        client: ClientArgs,
        /// Only sessions of this agent.
        #[arg(long)]
        agent: Option<String>,
        /// Maximum sessions to show.
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// List the agents the control plane can run.
    Agents {
        #[command(flatten)]
        client: ClientArgs,
    },
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Configuration file (TOML); defaults apply without one.
    #[arg(long, env = "CONTROL_PLANE_CONFIG")]
    config: Option<PathBuf>,
    /// Listen address, `unix:<path>` or `<ip>:<port>` (overrides the file).
    #[arg(long)]
    listen: Option<String>,
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

#[derive(Debug, clap::Args)]
struct ClientArgs {
    /// Control plane endpoint, `unix:<path>` or `http://<host>:<port>`.
    #[arg(
        long,
        env = "CONTROL_PLANE_ENDPOINT",
        default_value = "unix:/run/harness/control-plane.sock"
    )]
    endpoint: String,
}

impl ClientArgs {
    fn client(&self) -> anyhow::Result<ControlServiceClient<Channel>> {
        let channel = transport::connect_lazy(&self.endpoint)
            .with_context(|| format!("bad endpoint {}", self.endpoint))?;
        Ok(ControlServiceClient::new(channel))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Start {
            client,
            agent,
            input,
            idempotency_key,
            follow,
        } => {
            let request = control::StartSessionRequest {
                agent,
                input,
                idempotency_key,
                ..Default::default()
            };
            start(client.client()?, request, follow).await
        }
        Command::Events {
            client,
            session,
            after,
        } => print_events(&mut client.client()?, session, after).await,
        Command::Get { client, session } => get(client.client()?, session).await,
        Command::List {
            client,
            agent,
            limit,
        } => list(client.client()?, agent, limit).await,
        Command::Agents { client } => agents(client.client()?).await,
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => ControlPlaneConfig::load(path)?,
        None => ControlPlaneConfig::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(sandboxd) = args.sandboxd {
        config.sandboxd = sandboxd;
    }
    if let Some(database) = args.database {
        config.database = database;
    }
    if let Some(agents_dir) = args.agents_dir {
        config.agents_dir = agents_dir;
    }
    let shutdown = shutdown_signal()?;
    server::run(&config, shutdown)
        .await
        .context("control plane failed")
}

/// Resolves on SIGTERM or SIGINT.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

async fn start(
    mut client: ControlServiceClient<Channel>,
    request: control::StartSessionRequest,
    follow: bool,
) -> anyhow::Result<()> {
    let response = client
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
        print_events(&mut client, session.session_id, 0).await?;
    }
    Ok(())
}

async fn print_events(
    client: &mut ControlServiceClient<Channel>,
    session_id: String,
    after_seq: u64,
) -> anyhow::Result<()> {
    let mut events = client
        .stream_events(control::StreamEventsRequest {
            session_id,
            after_seq,
            follow: false,
        })
        .await
        .map_err(rpc_error("StreamEvents"))?
        .into_inner();
    while let Some(event) = events.next().await {
        println!(
            "{}",
            render_event(&event.map_err(rpc_error("StreamEvents"))?)
        );
    }
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
        "usage        turns={} tool_calls={} input_tokens={} output_tokens={} wall_clock={}",
        usage.turns,
        usage.tool_calls,
        usage.input_tokens,
        usage.output_tokens,
        optional(usage.wall_clock)
    );
    println!("final output {}", session.final_output);
    Ok(())
}

async fn list(
    mut client: ControlServiceClient<Channel>,
    agent: Option<String>,
    limit: u32,
) -> anyhow::Result<()> {
    let response = client
        .list_sessions(control::ListSessionsRequest {
            page_size: limit,
            agent: agent.unwrap_or_default(),
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
