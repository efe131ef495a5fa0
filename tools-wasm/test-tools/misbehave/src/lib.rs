//! Test tool `misbehave`: does, on request, the things a sandbox must contain (spinning,
//! eating memory, flooding stdout, panicking, opening sockets, reading outside the
//! workspace), plus `echo`, the trivial call the benchmarks time.
//!
//! Not a standard tool: sandboxd's adversarial tests load it from
//! `harness_tool_artifacts::test_tools_dir()`. Everything here is deliberately naive; the
//! sandbox, not the tool, must stop it.

use std::io::Write;
use std::time::Duration;

use harness_tool_sdk::{Tool, ToolError, export_tool};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};

/// Granularity of `grow_memory` and `flood_stdout`: one wasm page, and a write size that
/// keeps the host's output pipe busy.
const STEP: usize = 64 * 1024;

/// What to do: `{"action": "<name>", ...that action's fields}`.
#[derive(Deserialize, JsonSchema)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Loops forever without yielding; only the host's deadline ends the call.
    // A struct variant, not a unit one: serde ignores unknown fields next to the tag of a
    // unit variant, and a typo must not silently start an endless loop.
    Spin {},
    /// Allocates and touches memory in 64 KiB steps up to `bytes`; returns
    /// `{"allocated": n}` with how much it got if an allocation fails without trapping.
    GrowMemory {
        /// Total bytes to allocate, e.g. 4294967296.
        bytes: u64,
    },
    /// Writes `bytes` bytes to stdout in 64 KiB writes, stopping at the first failed write;
    /// returns `{"written": n}`.
    FloodStdout {
        /// Total bytes to write, e.g. 104857600.
        bytes: u64,
    },
    /// Panics with `message`.
    Panic {
        /// The panic message.
        message: String,
    },
    /// Opens a TCP connection with `std::net::TcpStream` (so `wasi:sockets`, not
    /// `wasi:http`); returns `{"connected": "ip:port"}`, or `denied` / `failed` with the io
    /// error kind and message.
    Connect {
        /// Numeric `ip:port`, e.g. `127.0.0.1:8080` or `[::1]:80`.
        address: String,
    },
    /// Sleeps `ms` milliseconds, then returns `{"slept_ms": ms}`.
    Sleep {
        /// Milliseconds to sleep.
        ms: u64,
    },
    /// Returns `value` unchanged as the whole output.
    Echo {
        /// Any JSON value.
        value: Value,
    },
    /// Returns `{"value": ...}`: the environment variable, or null when unset.
    Env {
        /// Variable name.
        name: String,
    },
    /// Reads any path with `std::fs`, without the SDK's path check, to show the preopen
    /// alone confines the tool; returns `{"size": n, "content": lossy text}`.
    ReadPath {
        /// Any path, e.g. `/etc/passwd` or `/workspace/../etc/passwd`.
        path: String,
    },
}

/// The `misbehave` tool.
pub struct Misbehave;

impl Tool for Misbehave {
    const NAME: &str = "misbehave";
    const DESCRIPTION: &str = "Test tool: misbehaves as asked (spin, grow_memory, \
        flood_stdout, panic, connect, sleep, echo, env, read_path) so the sandbox's limits \
        can be tested.";
    type Input = Action;
    /// Depends on the action; see each action's description.
    type Output = Value;

    fn run(action: Action) -> Result<Value, ToolError> {
        Ok(match action {
            Action::Spin {} => spin(),
            Action::GrowMemory { bytes } => json!({ "allocated": grow_memory(bytes) }),
            Action::FloodStdout { bytes } => json!({ "written": flood_stdout(bytes) }),
            Action::Panic { message } => panic_with(&message),
            Action::Connect { address } => json!({ "connected": connect(&address)? }),
            Action::Sleep { ms } => {
                std::thread::sleep(Duration::from_millis(ms));
                json!({ "slept_ms": ms })
            }
            Action::Echo { value } => value,
            Action::Env { name } => json!({ "value": std::env::var(&name).ok() }),
            Action::ReadPath { path } => read_path(&path)?,
        })
    }
}

fn spin() -> ! {
    let mut counter = 0u64;
    loop {
        // `black_box` keeps the loop from being proven side-effect free and removed.
        counter = std::hint::black_box(counter.wrapping_add(1));
    }
}

fn grow_memory(bytes: u64) -> u64 {
    let mut held: Vec<Vec<u8>> = Vec::new();
    let mut allocated = 0u64;
    while allocated < bytes {
        let mut chunk = Vec::new();
        // `try_reserve` reports a failed memory.grow instead of aborting, in case the host
        // fails the grow rather than trapping.
        if chunk.try_reserve_exact(STEP).is_err() {
            break;
        }
        chunk.resize(STEP, 1);
        held.push(std::hint::black_box(chunk));
        allocated += STEP as u64;
    }
    std::hint::black_box(&held);
    allocated
}

fn flood_stdout(bytes: u64) -> u64 {
    let block = [b'x'; STEP];
    let mut stdout = std::io::stdout().lock();
    let mut written = 0u64;
    while written < bytes {
        let take = usize::try_from((bytes - written).min(STEP as u64)).unwrap_or(STEP);
        if stdout.write_all(&block[..take]).is_err() {
            break;
        }
        written += take as u64;
    }
    let _ = stdout.flush();
    written
}

#[allow(clippy::panic)] // Panicking is the point: the host must report it as `failed`.
fn panic_with(message: &str) -> ! {
    panic!("{message}")
}

fn connect(address: &str) -> Result<String, ToolError> {
    let addr: std::net::SocketAddr = address.parse().map_err(|err| {
        ToolError::invalid_input(format!("`{address}` is not a numeric ip:port: {err}"))
    })?;
    match std::net::TcpStream::connect(addr) {
        Ok(stream) => Ok(stream
            .peer_addr()
            .map_or_else(|_| addr.to_string(), |peer| peer.to_string())),
        Err(err) => Err(io_failure(&format!("connect to {addr}"), &err)),
    }
}

fn read_path(path: &str) -> Result<Value, ToolError> {
    let bytes = std::fs::read(path).map_err(|err| io_failure(&format!("read {path}"), &err))?;
    Ok(json!({
        "size": bytes.len(),
        "content": String::from_utf8_lossy(&bytes),
    }))
}

/// `denied` for the errors a sandbox refusal produces, `not_found` for a missing file,
/// `failed` otherwise; the message keeps the io error kind so tests can tell them apart.
fn io_failure(what: &str, err: &std::io::Error) -> ToolError {
    // ENOTCAPABLE: WASI's "outside every preopen"; std has no ErrorKind for it.
    const ENOTCAPABLE: i32 = 76;
    let message = format!("{what}: {:?}: {err}", err.kind());
    match err.kind() {
        std::io::ErrorKind::PermissionDenied => ToolError::denied(message),
        std::io::ErrorKind::NotFound => ToolError::not_found(message),
        _ if cfg!(target_os = "wasi") && err.raw_os_error() == Some(ENOTCAPABLE) => {
            ToolError::denied(message)
        }
        _ => ToolError::failed(message),
    }
}

export_tool!(Misbehave);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use harness_tool_sdk::{ErrorKind, invoke};

    #[test]
    fn echo_returns_the_value_itself() {
        assert_eq!(
            invoke::<Misbehave>(r#"{"action": "echo", "value": {"a": [1, "x"]}}"#).unwrap(),
            r#"{"a":[1,"x"]}"#
        );
    }

    #[test]
    fn small_doses_work_on_the_host() {
        assert_eq!(
            invoke::<Misbehave>(r#"{"action": "grow_memory", "bytes": 200000}"#).unwrap(),
            r#"{"allocated":262144}"#
        );
        assert_eq!(
            invoke::<Misbehave>(r#"{"action": "sleep", "ms": 1}"#).unwrap(),
            r#"{"slept_ms":1}"#
        );
        assert_eq!(
            invoke::<Misbehave>(r#"{"action": "env", "name": "HARNESS_SURELY_UNSET"}"#).unwrap(),
            r#"{"value":null}"#
        );
        let err = invoke::<Misbehave>(r#"{"action": "read_path", "path": "/surely/missing"}"#)
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::NotFound);
        let err =
            invoke::<Misbehave>(r#"{"action": "connect", "address": "localhost:80"}"#).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidInput);
    }

    #[test]
    fn unknown_actions_and_fields_are_invalid_input() {
        // Decoded only: running a mistakenly accepted `spin` would hang the test.
        assert!(serde_json::from_str::<Action>(r#"{"action": "spin"}"#).is_ok());
        for input in [
            r#"{"action": "explode"}"#,
            r#"{"action": "spin", "extra": 1}"#,
            r#"{"action": "sleep"}"#,
            r#"{"action": "sleep", "ms": 1, "extra": 1}"#,
            r#"{}"#,
        ] {
            assert!(serde_json::from_str::<Action>(input).is_err(), "{input}");
        }
        let err = invoke::<Misbehave>(r#"{"action": "echo"}"#).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidInput);
    }

    #[test]
    fn schema_lists_every_action() {
        let json: serde_json::Value =
            serde_json::from_str(&harness_tool_sdk::describe::<Misbehave>()).unwrap();
        let text = json["input_schema"].to_string();
        for action in [
            "spin",
            "grow_memory",
            "flood_stdout",
            "panic",
            "connect",
            "sleep",
            "echo",
            "env",
            "read_path",
        ] {
            assert!(text.contains(&format!("\"{action}\"")), "{action}: {text}");
        }
    }
}
