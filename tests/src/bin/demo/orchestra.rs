//! `demo -- orchestra`: several agents behaving as one organisation, offline.
//!
//! 1. A triage agent hands a billing question over to the billing agent
//!    (a handoff: same session, billing's prompt and tools from then on).
//! 2. A supervisor plans read-only, submits its plan, the demo approves it
//!    (as a person would, through ResolveApproval), the harness runs two
//!    investigators in parallel as child sessions that write files to the
//!    shared workspace, and the supervisor writes the synthesis from their
//!    receipts. Every session of the tree is printed with its lineage.

use anyhow::{Context, bail};
use harness_control_plane::transcript::render_event;
use harness_e2e::Cluster;
use harness_proto::control::v1 as control;
use harness_proto::control::v1::control_service_client::ControlServiceClient;
use harness_proto::control::v1::session_event::Kind;
use tonic::transport::Channel;

/// The agents of the orchestra demo.
pub fn agents_dir() -> std::path::PathBuf {
    harness_e2e::repo_root().join("control-plane/agents/orchestra")
}

/// Runs both scenes; returns the summary line.
pub async fn run(cluster: &Cluster) -> anyhow::Result<String> {
    let mut control = cluster.control().await?;
    println!("== scene 1: a handoff ==\n");
    let triage = start(
        &mut control,
        "triage",
        "I was charged twice for invoice 1042.",
    )
    .await?;
    let events = print_session(&mut control, &triage, "", None).await?;
    let handoffs = events
        .iter()
        .filter(|event| matches!(event.kind, Some(Kind::Handoff(_))))
        .count();
    expect_completed(&events, "triage")?;
    if handoffs != 1 {
        bail!("expected one handoff, saw {handoffs}");
    }

    println!("\n== scene 2: a supervised plan ==\n");
    let supervisor = start(
        &mut control,
        "supervisor",
        "Find out why the service went down at 03:00.",
    )
    .await?;
    let events = print_session(&mut control, &supervisor, "", Some(&supervisor)).await?;
    expect_completed(&events, "supervisor")?;
    let children = control
        .list_sessions(control::ListSessionsRequest {
            parent_session_id: supervisor.clone(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .sessions;
    for child in children.iter().rev() {
        println!(
            "\n  -- child session {} (agent {}, lineage {}) --",
            child.session_id,
            child.agent,
            child.lineage.join(" > ")
        );
        let events = print_session(&mut control, &child.session_id, "  ", None).await?;
        expect_completed(&events, &child.agent)?;
    }
    let files: usize = events
        .iter()
        .filter_map(|event| match &event.kind {
            Some(Kind::SubagentFinished(finished)) => Some(finished.files.len()),
            _ => None,
        })
        .sum();
    if children.len() != 2 || files != 2 {
        bail!(
            "expected 2 investigators writing 2 files, saw {} writing {files}",
            children.len()
        );
    }
    Ok(format!(
        "orchestra completed: 1 handoff; a plan approved and run as {} child sessions in \
         parallel, which wrote {files} files; a synthesis",
        children.len()
    ))
}

async fn start(
    control: &mut ControlServiceClient<Channel>,
    agent: &str,
    input: &str,
) -> anyhow::Result<String> {
    let session = control
        .start_session(control::StartSessionRequest {
            agent: agent.to_owned(),
            input: input.to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .session
        .context("StartSession returned no session")?;
    println!(
        "session {} (agent {agent})\n    user: {input}",
        session.session_id
    );
    Ok(session.session_id)
}

/// Prints a session's events until it finishes; approves its approval
/// requests when `approve_for` names it (the demo plays the person).
async fn print_session(
    control: &mut ControlServiceClient<Channel>,
    session_id: &str,
    indent: &str,
    approve_for: Option<&str>,
) -> anyhow::Result<Vec<control::SessionEvent>> {
    let mut stream = control
        .stream_events(control::StreamEventsRequest {
            session_id: session_id.to_owned(),
            after_seq: 0,
            follow: false,
        })
        .await?
        .into_inner();
    let mut events = Vec::new();
    let mut assistant_text = String::new();
    while let Some(event) = stream.message().await? {
        if let Some(Kind::TextDelta(delta)) = &event.kind {
            assistant_text.push_str(&delta.text);
            continue;
        }
        if !assistant_text.is_empty() {
            println!(
                "{indent}    assistant: {}",
                std::mem::take(&mut assistant_text)
            );
        }
        println!("{indent}{}", render_event(&event));
        if let (Some(Kind::ApprovalRequested(request)), Some(session)) = (&event.kind, approve_for)
        {
            println!("{indent}    (the demo reviews the plan and approves it)");
            control
                .resolve_approval(control::ResolveApprovalRequest {
                    session_id: session.to_owned(),
                    call_id: request.call_id.clone(),
                    decision: control::ApprovalDecision::Allow.into(),
                    reason: "plan reviewed by the demo".to_owned(),
                    ..Default::default()
                })
                .await?;
        }
        events.push(event);
    }
    Ok(events)
}

fn expect_completed(events: &[control::SessionEvent], agent: &str) -> anyhow::Result<()> {
    match events.last().and_then(|event| event.kind.as_ref()) {
        Some(Kind::Finished(finished))
            if finished.stop_reason() == control::StopReason::Completed =>
        {
            Ok(())
        }
        Some(Kind::Finished(finished)) => bail!(
            "{agent} stopped with {:?}: {}",
            finished.stop_reason(),
            finished.message
        ),
        _ => bail!("{agent}'s event stream ended without a finished event"),
    }
}
