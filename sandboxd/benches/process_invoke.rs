//! Benchmarks of the process backend (issue: namespaced process sandbox).
//! Not run in CI; needs root, user namespaces and cgroups. Run with
//!
//! ```sh
//! cargo bench -p harness-sandboxd --bench process_invoke
//! ```
//!
//! It measures, in one run, against `bwrap --unshare-all --die-with-parent
//! --new-session` with read-only binds of `/usr` and friends running
//! `/bin/true` (Debian's bubblewrap; skipped with a note if `bwrap` is not on
//! PATH):
//! 1. `Invoke` of `/bin/true` in an existing session over gRPC;
//! 2. `CreateSession` + first invoke + `DestroySession`;
//! 3. 200 concurrent sessions, each running a command, then all destroyed,
//!    counting what is left behind (processes, cgroups, workspaces, mounts).
//!
//! Knobs: `BENCH_INVOKES` (default 500), `BENCH_LIFECYCLES` (default 100),
//! `BENCH_CONCURRENT` (default 200), `BENCH_WARM_POOL` (`[process]
//! warm-pool`, default as configured: 2), `BENCH_WORKSPACE_STORAGE`
//! (`workspace-storage`: `tmpfs`, the default, or `directory`).

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
use harness_sandboxd::server::{Listener, serve};
use harness_sandboxd::service::Sandboxd;
use tonic::transport::Channel;

use common::{connect, summary};

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn process_policy() -> pb::SessionPolicy {
    pb::SessionPolicy {
        backends: vec![pb::Backend::Process as i32],
        ..Default::default()
    }
}

async fn create(client: &mut SandboxServiceClient<Channel>) -> String {
    client
        .create_session(pb::CreateSessionRequest {
            policy: Some(process_policy()),
            labels: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .session
        .unwrap()
        .session_id
}

async fn run_true(client: &mut SandboxServiceClient<Channel>, session: &str, n: u64) {
    let mut stream = client
        .invoke(pb::InvokeRequest {
            session_id: session.to_owned(),
            invocation_id: format!("bench-{n}"),
            target: Some(pb::invoke_request::Target::Process(pb::ProcessCall {
                argv: vec!["/bin/true".to_owned()],
                ..Default::default()
            })),
            timeout: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut code = None;
    while let Some(event) = stream.message().await.unwrap() {
        if let Some(pb::invoke_event::Event::Result(result)) = event.event
            && let Some(pb::invoke_result::Outcome::Ok(ok)) = result.outcome
        {
            code = ok.exit_status.and_then(|s| s.code);
        }
    }
    assert_eq!(code, Some(0), "/bin/true failed");
}

async fn destroy(client: &mut SandboxServiceClient<Channel>, session: &str) -> pb::TeardownReport {
    client
        .destroy_session(pb::DestroySessionRequest {
            session_id: session.to_owned(),
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .report
        .unwrap()
}

/// bwrap with the same isolation shape: every namespace, read-only system
/// binds, fresh /proc and /dev, new session, dies with its parent.
fn bwrap_true() -> Option<std::process::Command> {
    let bwrap = std::env::var_os("PATH")?
        .to_string_lossy()
        .split(':')
        .map(|dir| PathBuf::from(dir).join("bwrap"))
        .find(|p| p.is_file())?;
    let mut command = std::process::Command::new(bwrap);
    command.args(["--unshare-all", "--die-with-parent", "--new-session"]);
    for path in [
        "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
    ] {
        let meta = std::fs::symlink_metadata(path);
        match meta {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(path).unwrap();
                command.args(["--symlink", target.to_str().unwrap(), path]);
            }
            Ok(_) => {
                command.args(["--ro-bind", path, path]);
            }
            Err(_) => {}
        }
    }
    command.args([
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--tmpfs",
        "/tmp",
        "/bin/true",
    ]);
    command.stdin(std::process::Stdio::null());
    Some(command)
}

fn time_bwrap(command: &mut std::process::Command, runs: usize) -> Vec<Duration> {
    (0..runs)
        .map(|_| {
            let started = Instant::now();
            let status = command.status().unwrap();
            assert!(status.success(), "bwrap failed: {status}");
            started.elapsed()
        })
        .collect()
}

fn count_dirs(pattern_root: &str, parent: &str) -> usize {
    std::fs::read_dir(pattern_root)
        .map(|mounts| {
            mounts
                .flatten()
                .map(|m| {
                    m.path()
                        .join(parent.trim_start_matches('/'))
                        .join("harness-sandboxd")
                })
                .filter_map(|d| std::fs::read_dir(d).ok())
                .map(|entries| entries.flatten().filter(|e| e.path().is_dir()).count())
                .sum()
        })
        .unwrap_or(0)
}

fn children_of(pid: u32) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|stat| {
                    let after = stat
                        .rsplit_once(')')?
                        .1
                        .split_whitespace()
                        .nth(1)?
                        .to_owned();
                    after.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .count()
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
    let parent = format!("/harness-bench-{}", std::process::id());
    let config = SandboxdConfig {
        listen: vec![
            format!("unix:{}", dir.path().join("bench.sock").display())
                .parse()
                .unwrap(),
        ],
        state_dir: dir.path().join("state"),
        // A fresh compile cache per run: <state-dir>/cache.
        cache_dir: None,
        tools_dir: dir.path().join("tools"),
        ..SandboxdConfig::default()
    };
    std::fs::create_dir_all(&config.tools_dir).unwrap();
    let mut config = config;
    // The harness-sandbox-init package's binary: `cargo build -p
    // harness-sandbox-init --release` first.
    let init = harness_sandboxd::process::init_program::default_path(std::path::Path::new(env!(
        "CARGO_BIN_EXE_sandboxd"
    )));
    assert!(
        init.is_file(),
        "{} is missing: `cargo build --release -p harness-sandbox-init`",
        init.display()
    );
    config.process.init_program = Some(init);
    config.process.cgroup_parent = Some(parent.clone());
    config.process.warm_pool = knob("BENCH_WARM_POOL", config.process.warm_pool);
    config.workspace_storage = common::workspace_storage(config.workspace_storage);
    let warm_pool = config.process.warm_pool;
    let daemon: Arc<Sandboxd> =
        Sandboxd::start(config.clone(), harness_sandboxd::probe::probe_host())
            .await
            .unwrap();
    let listener = Listener::bind(&config.listen[0]).await.unwrap();
    let endpoint = listener.endpoint();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(Arc::clone(&daemon), listener, async {
        let _ = stopped.await;
    }));
    let channel = connect(&endpoint).await;
    let mut client = SandboxServiceClient::new(channel.clone());
    let mountinfo_before = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();

    // 1. Invoke of /bin/true in an existing session.
    let invokes = knob("BENCH_INVOKES", 500);
    let session = create(&mut client).await;
    for n in 0..20 {
        run_true(&mut client, &session, 1_000_000 + n).await;
    }
    let mut samples = Vec::with_capacity(invokes);
    for n in 0..invokes as u64 {
        let started = Instant::now();
        run_true(&mut client, &session, n).await;
        samples.push(started.elapsed());
    }
    destroy(&mut client, &session).await;
    let (invoke_p50, invoke_p99) = summary(samples);

    let mut bwrap = bwrap_true();
    let bwrap_runs = invokes.min(300);
    let bwrap_samples = bwrap.as_mut().map(|command| {
        time_bwrap(command, 10);
        summary(time_bwrap(command, bwrap_runs))
    });

    // 2. CreateSession + first invoke + DestroySession.
    let lifecycles = knob("BENCH_LIFECYCLES", 100);
    let mut cycle = Vec::with_capacity(lifecycles);
    let (mut creates, mut firsts, mut destroys_timed) = (Vec::new(), Vec::new(), Vec::new());
    for n in 0..lifecycles as u64 {
        let started = Instant::now();
        let session = create(&mut client).await;
        let created = started.elapsed();
        run_true(&mut client, &session, n).await;
        let ran = started.elapsed();
        let report = destroy(&mut client, &session).await;
        cycle.push(started.elapsed());
        creates.push(created);
        firsts.push(ran - created);
        destroys_timed.push(started.elapsed() - ran);
        assert!(report.errors.is_empty(), "{report:?}");
    }
    let (cycle_p50, cycle_p99) = summary(cycle);
    let parts = [
        summary(creates).0,
        summary(firsts).0,
        summary(destroys_timed).0,
    ];

    // 3. Concurrent sessions, then all destroyed: count leftovers.
    let concurrent = knob("BENCH_CONCURRENT", 200);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for n in 0..concurrent {
        let mut client = SandboxServiceClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            let session = create(&mut client).await;
            run_true(&mut client, &session, n as u64).await;
            session
        }));
    }
    let mut sessions = Vec::new();
    for task in tasks {
        sessions.push(task.await.unwrap());
    }
    let peak_children = children_of(std::process::id());
    let peak_cgroups = count_dirs("/sys/fs/cgroup", &parent);
    let mut destroys = Vec::new();
    for session in sessions {
        let mut client = SandboxServiceClient::new(channel.clone());
        destroys.push(tokio::spawn(
            async move { destroy(&mut client, &session).await },
        ));
    }
    let mut errors = 0;
    for task in destroys {
        errors += task.await.unwrap().errors.len();
    }
    let concurrent_wall = started.elapsed();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The warm pool's inits are this process's children by design.
    let left_children = children_of(std::process::id()).saturating_sub(warm_pool);
    let left_cgroups = count_dirs("/sys/fs/cgroup", &parent);
    let left_workspaces = std::fs::read_dir(config.sessions_dir()).unwrap().count();
    let mountinfo_after = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .count();

    let _ = stop.send(());
    let _ = server.await;
    for mount in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let dir = mount.path().join(parent.trim_start_matches('/'));
        let _ = std::fs::remove_dir(dir.join("harness-sandboxd"));
        let _ = std::fs::remove_dir(dir);
    }

    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "process backend, {cpus} CPUs, warm pool {warm_pool}, {invokes} invokes, {lifecycles} lifecycles, {concurrent} concurrent\n"
    );
    println!("| measure | sandboxd | bwrap (same run) | ratio | target |");
    println!("|---|---|---|---|---|");
    match bwrap_samples {
        Some((bwrap_p50, bwrap_p99)) => {
            println!(
                "| Invoke /bin/true in a session, median (p99) | {} ({}) | {} ({}) | {:.2}× | ≤ 0.5× |",
                ms(invoke_p50),
                ms(invoke_p99),
                ms(bwrap_p50),
                ms(bwrap_p99),
                invoke_p50.as_secs_f64() / bwrap_p50.as_secs_f64()
            );
            println!(
                "| Create + first invoke + Destroy, median (p99) | {} ({}) | {} ({}) | {:.2}× | ≤ 1.5× |",
                ms(cycle_p50),
                ms(cycle_p99),
                ms(bwrap_p50),
                ms(bwrap_p99),
                cycle_p50.as_secs_f64() / bwrap_p50.as_secs_f64()
            );
        }
        None => {
            println!(
                "| Invoke /bin/true in a session, median (p99) | {} ({}) | bwrap not on PATH | | |",
                ms(invoke_p50),
                ms(invoke_p99)
            );
            println!(
                "| Create + first invoke + Destroy, median (p99) | {} ({}) | bwrap not on PATH | | |",
                ms(cycle_p50),
                ms(cycle_p99)
            );
        }
    }
    println!(
        "\nlifecycle parts, medians: create {}, first invoke {}, destroy {}",
        ms(parts[0]),
        ms(parts[1]),
        ms(parts[2])
    );
    println!(
        "\n{concurrent} concurrent sessions, each ran /bin/true, then all destroyed: {:.2} s; \
         at peak {peak_children} sandbox inits and {peak_cgroups} session cgroups; \
         afterwards {left_children} child processes besides the warm pool, {left_cgroups} session cgroups, \
         {left_workspaces} workspaces, {} host mounts added, {errors} teardown errors.",
        concurrent_wall.as_secs_f64(),
        mountinfo_after as i64 - mountinfo_before as i64,
    );
}
