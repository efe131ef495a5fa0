//! The `sandboxd` binary: parse flags, load config, probe the host, serve.
//!
//! Once every listener is bound it prints one line per listener on stdout,
//! `listening on <address>` (`unix:/path` or `ip:port`, with the real port
//! when asked for port 0), so a supervisor or test learns where it is.

// A command-line program reports to its operator on stdout by design.
#![allow(clippy::print_stdout)]

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use harness_daemon::ListenAddress;
use harness_daemon::listener::check_exposures;
use harness_daemon::logging::LogFormat;
use harness_daemon::shutdown::shutdown_signal;
use harness_sandboxd::config::SandboxdConfig;
use harness_sandboxd::probe::probe_host;
use harness_sandboxd::process::ProcessBackend;
use harness_sandboxd::server::{bind, serve};
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
    /// Print what this host can isolate, as the Capabilities rpc would,
    /// and whether the process backend can run here with this config (its
    /// `sandbox-init` included); exits non-zero when it cannot.
    Probe(ProbeArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct ProbeArgs {
    /// Config file (TOML), for `[process]`. Without it, built-in defaults.
    #[arg(long, env = "SANDBOXD_CONFIG")]
    config: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
struct ServeArgs {
    /// Config file (TOML). Without it, built-in defaults apply.
    #[arg(long, env = "SANDBOXD_CONFIG")]
    config: Option<PathBuf>,
    /// Where to listen, `unix:<path>` or `<ip>:<port>`; repeat to listen on
    /// several (e.g. `--listen unix:/run/harness/sandboxd.sock --listen
    /// 127.0.0.1:7071`). Replaces `listen` of the config file.
    #[arg(long, value_name = "ADDRESS")]
    listen: Vec<ListenAddress>,
    /// Allow TCP listeners off loopback. sandboxd does not authenticate its
    /// callers: anyone who can reach the port can run tool calls.
    #[arg(long)]
    insecure_listen: bool,
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

impl ServeArgs {
    /// The config file (or the defaults) with the flags applied.
    fn config(&self) -> anyhow::Result<SandboxdConfig> {
        let mut config = match &self.config {
            Some(path) => SandboxdConfig::load(path)?,
            None => SandboxdConfig::default(),
        };
        if !self.listen.is_empty() {
            config.listen.clone_from(&self.listen);
        }
        config.insecure_listen |= self.insecure_listen;
        if let Some(state_dir) = &self.state_dir {
            config.state_dir.clone_from(state_dir);
        }
        if let Some(tools_dir) = &self.tools_dir {
            config.tools_dir.clone_from(tools_dir);
        }
        Ok(config)
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Probe(args)) => probe(&args),
        Some(Command::Serve(args)) => run(&args),
        None => run(&cli.serve),
    }
}

fn probe(args: &ProbeArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => SandboxdConfig::load(path)?,
        None => SandboxdConfig::default(),
    };
    let host = probe_host();
    println!("{:#?}", host.to_proto());
    let backend = ProcessBackend::new(&config, std::sync::Arc::new(host))
        .context("the process backend cannot start")?;
    match backend.availability() {
        Ok(()) => {
            println!("process backend: available");
            Ok(())
        }
        Err(reason) => anyhow::bail!("process backend unavailable: {reason}"),
    }
}

fn run(args: &ServeArgs) -> anyhow::Result<()> {
    harness_daemon::logging::init(args.log_format)?;
    let config = args.config()?;
    // Refuse a listener the policy forbids before probing or starting anything.
    check_exposures(&config.listen, config.exposure())?;
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
        let shutdown = shutdown_signal().context("cannot handle SIGTERM and SIGINT")?;
        let daemon = Sandboxd::start(config.clone(), host).await?;
        let tools = daemon.wasi.list_tools();
        tracing::info!(
            tools = tools.tools.len(),
            load_errors = tools.load_errors.len(),
            "tools loaded"
        );
        let listeners = bind(&config).await?;
        for address in listeners.addresses() {
            tracing::info!(%address, "sandboxd listening");
            println!("listening on {address}");
        }
        serve(daemon, listeners, async {
            shutdown.await;
        })
        .await?;
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn serve_args(args: &[&str]) -> ServeArgs {
        let cli = Cli::try_parse_from(args).unwrap();
        match cli.command {
            Some(Command::Serve(serve)) => serve,
            None => cli.serve,
            Some(Command::Probe(_)) => panic!("probe"),
        }
    }

    #[test]
    fn listen_repeats_and_replaces_the_configured_addresses() {
        for prefix in [&["sandboxd"][..], &["sandboxd", "serve"][..]] {
            let args: Vec<&str> = prefix
                .iter()
                .copied()
                .chain([
                    "--listen",
                    "unix:/tmp/s.sock",
                    "--listen",
                    "127.0.0.1:0",
                    "--tools-dir",
                    "/t",
                ])
                .collect();
            let config = serve_args(&args).config().unwrap();
            assert_eq!(
                config.listen,
                vec![
                    ListenAddress::Unix(PathBuf::from("/tmp/s.sock")),
                    "127.0.0.1:0".parse().unwrap()
                ]
            );
            assert_eq!(config.tools_dir, PathBuf::from("/t"));
            assert!(!config.insecure_listen);
        }
    }

    #[test]
    fn insecure_listen_is_explicit() {
        let config = serve_args(&["sandboxd", "--listen", "0.0.0.0:7071", "--insecure-listen"])
            .config()
            .unwrap();
        assert_eq!(config.exposure(), harness_daemon::Exposure::AllowRemote);
    }

    #[test]
    fn a_bad_listen_address_is_rejected_by_the_parser() {
        let error = Cli::try_parse_from(["sandboxd", "--listen", "localhost"]).unwrap_err();
        assert!(
            error.to_string().contains("is not a listen address"),
            "{error}"
        );
    }
}
