//! The `sandboxd` binary: parse flags, load config, probe the host, serve.

// A command-line program reports to its operator on stdout by design.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use harness_sandboxd::config::SandboxdConfig;
use harness_sandboxd::probe::probe_host;
use harness_sandboxd::server::{Listener, serve};
use harness_sandboxd::service::Sandboxd;

/// sandboxd: runs agent tool calls in WASI and namespaced-process sandboxes.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve gRPC (the default).
    Serve(ServeArgs),
    /// Print what this host can isolate, as the Capabilities rpc would.
    Probe,
}

#[derive(Debug, Clone, clap::Args)]
struct ServeArgs {
    /// Config file (TOML). Without it, built-in defaults apply.
    #[arg(long, env = "SANDBOXD_CONFIG")]
    config: Option<PathBuf>,
    /// Override `listen` (unix:/path or host:port).
    #[arg(long)]
    listen: Option<String>,
    /// Override `state-dir`.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Override `tools-dir`.
    #[arg(long)]
    tools_dir: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Probe) => {
            let probe = probe_host();
            println!("{:#?}", probe.to_proto());
            Ok(())
        }
        Some(Command::Serve(args)) => run(args),
        None => run(cli.serve),
    }
}

fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let mut config = match &args.config {
        Some(path) => SandboxdConfig::load(path)?,
        None => SandboxdConfig::default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(state_dir) = args.state_dir {
        config.state_dir = state_dir;
    }
    if let Some(tools_dir) = args.tools_dir {
        config.tools_dir = tools_dir;
    }
    raise_open_file_limit();
    // Probe before the runtime starts threads, so the probe's fork happens in
    // a single-threaded process.
    let host = probe_host();
    for missing in &host.missing {
        tracing::warn!("host lacks {missing}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start tokio")?;
    runtime.block_on(async move {
        let daemon = Sandboxd::start(config.clone(), host).await?;
        let tools = daemon.wasi.list_tools();
        tracing::info!(
            tools = tools.tools.len(),
            load_errors = tools.load_errors.len(),
            "tools loaded"
        );
        let listener = Listener::bind(&config.listen).await?;
        tracing::info!(endpoint = %listener.endpoint(), "sandboxd listening");
        serve(daemon, listener, shutdown_signal()).await?;
        tracing::info!("sandboxd stopped");
        anyhow::Ok(())
    })
}

/// Each running invocation holds a few descriptors (its workspace preopen,
/// streams); the default soft limit of 1024 would cap concurrency long before
/// the instance pool does, so take the hard limit.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(error) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(%error, soft, hard, "cannot raise the open-file limit");
            }
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot read the open-file limit"),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop sandboxd with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
