//! The offline demo: builds and starts sandboxd and the control plane on temp
//! Unix sockets, runs the scripted `demo` agent (write a note, list the
//! directory, read the note back), prints the event stream as a transcript,
//! tears everything down and exits 0.
//!
//! `demo -- orchestra` runs the multi-agent demo instead (a handoff, then a
//! supervised plan run by parallel subagents; see `demo/orchestra.rs`).

// The demo's whole job is to print a transcript for a person.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;

#[path = "demo/orchestra.rs"]
mod orchestra;

use anyhow::{Context, bail};
use harness_control_plane::transcript::render_event;
use harness_e2e::{Cluster, demo_agents_dir, repo_root};
use harness_proto::control::v1 as control;
use harness_proto::control::v1::session_event::Kind;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demo failed: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let orchestra = match std::env::args().nth(1).as_deref() {
        None => false,
        Some("orchestra") => true,
        Some(other) => bail!("unknown demo {other:?}; run `demo` or `demo orchestra`"),
    };
    println!("harness demo{}", if orchestra { ": orchestra" } else { "" });
    let scripts = if orchestra {
        "control-plane/agents/orchestra/*.script.toml"
    } else {
        "control-plane/agents/demo.script.toml"
    };
    println!("  model: the SCRIPTED provider (no API key, no network): its replies are read from");
    println!("         {scripts}");
    println!("  tools: real WASI components run by sandboxd in the session's workspace\n");

    build_daemons()?;
    let agents = if orchestra {
        orchestra::agents_dir()
    } else {
        demo_agents_dir()
    };
    let cluster = Cluster::start(&agents).await?;
    println!("sandboxd      listening on {}", cluster.sandboxd_endpoint);
    println!("control-plane listening on {}\n", cluster.control_endpoint);

    let outcome = if orchestra {
        orchestra::run(&cluster).await
    } else {
        run_session(&cluster).await
    };
    if outcome.is_err() {
        eprintln!("{}", cluster.logs());
    }
    let (control_status, sandboxd_status) = cluster.stop().await?;
    let summary = outcome?;
    if !control_status.success() || !sandboxd_status.success() {
        bail!(
            "daemons did not stop cleanly: control-plane {control_status}, sandboxd {sandboxd_status}"
        );
    }
    println!("\n{summary}");
    println!("both daemons stopped; temp sockets, database and workspaces removed");
    Ok(())
}

/// `cargo run --bin demo` builds only the demo; the daemons are separate
/// binaries, so build them too (a no-op when they are fresh).
fn build_daemons() -> anyhow::Result<()> {
    let Some(cargo) = std::env::var_os("CARGO") else {
        // Not started by cargo: use whatever binaries sit next to the demo.
        return Ok(());
    };
    println!(
        "building sandboxd and control-plane (cargo build --bin sandboxd --bin control-plane) ..."
    );
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--bin",
            "sandboxd",
            "--bin",
            "control-plane",
        ])
        .current_dir(repo_root())
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build of the daemons failed ({status})");
    }
    Ok(())
}

async fn run_session(cluster: &Cluster) -> anyhow::Result<String> {
    let mut control = cluster.control().await?;
    let input = "Leave a note in the workspace, check it is there, and read it back.";
    let started = control
        .start_session(control::StartSessionRequest {
            agent: "demo".to_owned(),
            input: input.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let session = started
        .session
        .context("StartSession returned no session")?;
    println!("session {} (agent demo)\n", session.session_id);

    let mut stream = control
        .stream_events(control::StreamEventsRequest {
            session_id: session.session_id.clone(),
            after_seq: 0,
            follow: false,
        })
        .await?
        .into_inner();
    let mut tool_calls_ok = 0;
    let mut final_message = None;
    let mut finished = None;
    let mut assistant_text = String::new();
    while let Some(event) = stream.message().await? {
        if let Some(Kind::TextDelta(delta)) = &event.kind {
            // Deltas are folded into one readable line per turn.
            assistant_text.push_str(&delta.text);
            continue;
        }
        if !assistant_text.is_empty() {
            println!("    assistant: {}", std::mem::take(&mut assistant_text));
        }
        match &event.kind {
            Some(Kind::ToolFinished(done))
                if matches!(
                    done.outcome,
                    Some(control::tool_finished::Outcome::OutputJson(_))
                ) =>
            {
                tool_calls_ok += 1;
            }
            Some(Kind::Finished(end)) => {
                final_message = Some(end.final_output.clone());
                finished = Some(end.stop_reason());
            }
            _ => {}
        }
        println!("{}", render_event(&event));
    }
    let stop = finished.context("the event stream ended without a finished event")?;
    if stop != control::StopReason::Completed {
        bail!("the session stopped with {stop:?}");
    }
    if tool_calls_ok < 3 {
        bail!("expected at least 3 successful tool calls, saw {tool_calls_ok}");
    }
    Ok(format!(
        "session completed: {tool_calls_ok} tool calls executed by sandboxd as WASI components\nfinal assistant message: {}",
        final_message.unwrap_or_default()
    ))
}
