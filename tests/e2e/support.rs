//! Helpers shared by the e2e tests.

use std::path::Path;

use harness_control_plane::event::kind_name;
use harness_e2e::Cluster;
use harness_proto::control::v1 as control;

/// Writes an agent `name` whose scripted model makes `tool_calls` (tool,
/// arguments as TOML inline tables), one per turn, then says `final_text`.
pub fn write_agent(dir: &Path, name: &str, tool_calls: &[(&str, &str)], final_text: &str) {
    let tools: Vec<&str> = ["read_file", "write_file", "list_dir"].to_vec();
    let agent = format!(
        "name = \"{name}\"\nprovider = \"scripted\"\nmodel = \"scripted-test\"\nscript = \"{name}.script.toml\"\n\
         tools = {tools:?}\nmax-turns = 10\n"
    );
    std::fs::write(dir.join(format!("{name}.toml")), agent).unwrap();
    let mut script = String::new();
    for (n, (tool, arguments)) in tool_calls.iter().enumerate() {
        script.push_str(&format!(
            "[[turn]]\ntext = \"step {n}\"\n[[turn.tool-calls]]\ntool = \"{tool}\"\narguments = {arguments}\n\n"
        ));
    }
    script.push_str(&format!("[[turn]]\ntext = \"{final_text}\"\n"));
    std::fs::write(dir.join(format!("{name}.script.toml")), script).unwrap();
}

/// Starts a session and returns its id.
pub async fn start(cluster: &Cluster, agent: &str, input: &str) -> String {
    let mut client = cluster.control().await.unwrap();
    client
        .start_session(control::StartSessionRequest {
            agent: agent.to_owned(),
            input: input.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
        .session_id
}

/// Reads the event stream from `after_seq` until the server ends it.
pub async fn events(
    cluster: &Cluster,
    session_id: &str,
    after_seq: u64,
) -> Vec<control::SessionEvent> {
    let mut client = cluster.control().await.unwrap();
    let mut stream = client
        .stream_events(control::StreamEventsRequest {
            session_id: session_id.to_owned(),
            after_seq,
            follow: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(event) = stream.message().await.unwrap() {
        events.push(event);
    }
    events
}

/// The kind names of a list of events.
pub fn kinds(events: &[control::SessionEvent]) -> Vec<&'static str> {
    events
        .iter()
        .map(|e| kind_name(e.kind.as_ref().unwrap()))
        .collect()
}

/// The tool_finished payloads, in order.
pub fn finished_calls(events: &[control::SessionEvent]) -> Vec<control::ToolFinished> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(control::session_event::Kind::ToolFinished(done)) => Some(done.clone()),
            _ => None,
        })
        .collect()
}

/// The first line of the host's /etc/passwd: present in output only if a
/// sandbox leaked it.
pub fn host_secret() -> String {
    std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned()
}
