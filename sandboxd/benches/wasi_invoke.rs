//! Benchmarks of the WASI backend (issue: production-grade WASI runtime).
//! Not run in CI. Run with
//!
//! ```sh
//! cargo bench -p harness-sandboxd --bench wasi_invoke
//! WASMTIME=/path/to/wasmtime cargo bench -p harness-sandboxd --bench wasi_invoke
//! ```
//!
//! It measures, in one run:
//! 1. a warm invocation in process (instantiate + call of a trivial tool),
//! 2. `Invoke` end to end over gRPC on a Unix socket (one caller), and a
//!    unary `GetSession` on the same channel as the transport's floor,
//! 3. `wasmtime run` of the same component, as a separate process per call
//!    (the peer), when `WASMTIME` points at wasmtime-cli of the same version,
//! 4. throughput with concurrent callers,
//! 5. RSS with 10,000 idle sessions.
//!
//! and prints a Markdown table for docs/BENCHMARKS.md. `BENCH_WORKSPACE_STORAGE`
//! (`tmpfs`, the default, or `directory`) picks the workspace storage.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    clippy::print_stderr
)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use harness_proto::sandbox::v1 as pb;
use harness_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient;
use harness_sandboxd::config::SandboxdConfig;
use harness_sandboxd::probe::HostProbe;
use harness_sandboxd::server::{Listener, serve};
use harness_sandboxd::service::Sandboxd;
use tonic::transport::Channel;

use common::{connect, summary};

const ECHO_INPUT: &str = r#"{"action":"echo","value":{"n":1}}"#;

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

fn invoke_request(session: &str, n: u64) -> pb::InvokeRequest {
    pb::InvokeRequest {
        session_id: session.to_owned(),
        invocation_id: format!("bench-{n}"),
        target: Some(pb::invoke_request::Target::Wasi(pb::WasiCall {
            tool: "misbehave".to_owned(),
            input_json: ECHO_INPUT.to_owned(),
        })),
        timeout: None,
    }
}

async fn grpc_invoke(client: &mut SandboxServiceClient<Channel>, session: &str, n: u64) {
    let mut stream = client
        .invoke(invoke_request(session, n))
        .await
        .unwrap()
        .into_inner();
    let mut ok = false;
    while let Some(event) = stream.message().await.unwrap() {
        if let Some(pb::invoke_event::Event::Result(result)) = event.event {
            ok = matches!(result.outcome, Some(pb::invoke_result::Outcome::Ok(_)));
        }
    }
    assert!(ok, "invocation failed");
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let tools = dir.path().join("tools");
    std::fs::create_dir_all(&tools).unwrap();
    let component = harness_tool_artifacts::test_tool_path("misbehave");
    std::fs::copy(&component, tools.join("misbehave.wasm")).unwrap();
    let config = SandboxdConfig {
        listen: vec![
            format!("unix:{}", dir.path().join("bench.sock").display())
                .parse()
                .unwrap(),
        ],
        state_dir: dir.path().join("state"),
        // A fresh compile cache per run: <state-dir>/cache.
        cache_dir: None,
        tools_dir: tools,
        max_sessions: 20_000,
        workspace_storage: common::workspace_storage(SandboxdConfig::default().workspace_storage),
        ..SandboxdConfig::default()
    };
    let daemon = Sandboxd::start(config.clone(), HostProbe::default())
        .await
        .unwrap();
    let session = daemon
        .sessions
        .create(&pb::SessionPolicy::default(), Default::default())
        .unwrap();
    let call = pb::WasiCall {
        tool: "misbehave".to_owned(),
        input_json: ECHO_INPUT.to_owned(),
    };

    // 1. In process: instantiate + call.
    let timeout = session.policy.invocation_timeout;
    for _ in 0..500 {
        daemon
            .wasi
            .invoke(
                session.workspace_root(),
                &session.policy,
                None,
                &call,
                timeout,
            )
            .await;
    }
    let iterations: usize = std::env::var("BENCH_IN_PROCESS_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let mut in_process = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let started = Instant::now();
        let done = daemon
            .wasi
            .invoke(
                session.workspace_root(),
                &session.policy,
                None,
                &call,
                timeout,
            )
            .await;
        in_process.push(started.elapsed());
        assert!(matches!(
            done.result.outcome,
            Some(pb::invoke_result::Outcome::Ok(_))
        ));
    }
    let (in_median, in_p99) = summary(in_process);
    if std::env::var_os("BENCH_IN_PROCESS_ONLY").is_some() {
        println!(
            "in process: median {}, p99 {}",
            micros(in_median),
            micros(in_p99)
        );
        return;
    }

    // 2. Over gRPC on a Unix socket, one caller.
    let listener = Listener::bind(&config.listen[0]).await.unwrap();
    let endpoint = listener.endpoint();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(Arc::clone(&daemon), listener, async {
        let _ = stopped.await;
    }));
    let channel = connect(&endpoint).await;
    let mut client = SandboxServiceClient::new(channel.clone());
    let session_id = session.id.to_string();
    for n in 0..500 {
        grpc_invoke(&mut client, &session_id, n).await;
    }
    let mut grpc = Vec::with_capacity(5000);
    for n in 1_000..6_000 {
        let started = Instant::now();
        grpc_invoke(&mut client, &session_id, n).await;
        grpc.push(started.elapsed());
    }
    let (grpc_median, grpc_p99) = summary(grpc);
    // The transport's floor on the same channel: a unary call that runs nothing.
    let mut unary = Vec::with_capacity(5000);
    for _ in 0..5_000 {
        let started = Instant::now();
        client
            .get_session(pb::GetSessionRequest {
                session_id: session_id.clone(),
            })
            .await
            .unwrap();
        unary.push(started.elapsed());
    }
    let (unary_median, _) = summary(unary);

    // 3. The peer: `wasmtime run` of the same component, one process per call.
    let peer = std::env::var_os("WASMTIME").map(PathBuf::from);
    let peer_median = peer.as_ref().map(|wasmtime| {
        let run = || {
            let started = Instant::now();
            let output = std::process::Command::new(wasmtime)
                .arg("run")
                .arg("--invoke")
                .arg(format!(
                    "invoke({})",
                    serde_json::to_string(ECHO_INPUT).unwrap()
                ))
                .arg(&component)
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "wasmtime run failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            started.elapsed()
        };
        for _ in 0..3 {
            run();
        }
        summary((0..50).map(|_| run()).collect()).0
    });

    // 4. Throughput: 16 concurrent callers for 5 seconds.
    let callers = 16;
    let window = Duration::from_secs(5);
    let started = Instant::now();
    let tasks: Vec<_> = (0..callers)
        .map(|c| {
            let channel = channel.clone();
            let session_id = session_id.clone();
            tokio::spawn(async move {
                let mut client = SandboxServiceClient::new(channel);
                let mut done = 0_u64;
                while started.elapsed() < window {
                    grpc_invoke(&mut client, &session_id, 1_000_000 * (c + 1) + done).await;
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    let throughput = total as f64 / started.elapsed().as_secs_f64();

    // 5. 10,000 idle sessions.
    let rss_before = rss_bytes();
    let policy = pb::SessionPolicy::default();
    for _ in 0..10_000 {
        daemon.sessions.create(&policy, Default::default()).unwrap();
    }
    let rss_after = rss_bytes();

    let _ = stop.send(());
    server.await.unwrap().unwrap();

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name\t: ").map(str::to_owned))
        .unwrap_or_default();
    println!(
        "machine: {} cores, {cpu}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!();
    println!("| measure | result | target |");
    println!("|---|---|---|");
    println!(
        "| warm invocation in process (instantiate + call), median | {} (p99 {}) | ≤ 30 µs |",
        micros(in_median),
        micros(in_p99)
    );
    println!(
        "| `Invoke` over gRPC on a Unix socket, median | {} | ≤ 300 µs |",
        micros(grpc_median)
    );
    println!(
        "| `Invoke` over gRPC on a Unix socket, p99 | {} | ≤ 1 ms |",
        micros(grpc_p99)
    );
    println!(
        "| unary `GetSession` on the same channel (the transport's floor), median | {} | |",
        micros(unary_median)
    );
    match peer_median {
        Some(peer) => println!(
            "| `wasmtime run --invoke` of the same component, median | {} ({:.0}× slower than `Invoke`) | ≥ 20× |",
            micros(peer),
            peer.as_secs_f64() / grpc_median.as_secs_f64()
        ),
        None => println!(
            "| `wasmtime run` peer | not measured: set WASMTIME=/path/to/wasmtime | ≥ 20× |"
        ),
    }
    println!(
        "| throughput, {callers} concurrent callers | {throughput:.0} invocations/s | ≥ 5,000/s |"
    );
    println!(
        "| RSS growth for 10,000 idle sessions | {:.1} MiB (process RSS {:.1} MiB) | ≤ 512 MiB |",
        (rss_after.saturating_sub(rss_before)) as f64 / (1 << 20) as f64,
        rss_after as f64 / (1 << 20) as f64
    );
}
