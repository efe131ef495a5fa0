//! The process backend end to end: a namespaced sandbox per session, commands
//! as fork+exec inside it, and complete teardown.

use harness_proto::sandbox::v1 as pb;

use crate::support::{Invoked, TestDaemon, exec_on, sh};

pub fn process_policy() -> pb::SessionPolicy {
    pb::SessionPolicy {
        backends: vec![pb::Backend::Process as i32],
        ..Default::default()
    }
}

pub fn exit_code(invoked: &Invoked) -> Option<i32> {
    match invoked.result.as_ref().and_then(|r| r.outcome.clone()) {
        Some(pb::invoke_result::Outcome::Ok(ok)) => ok.exit_status.and_then(|s| s.code),
        other => panic!(
            "expected a finished command, got {other:?}; stderr: {}",
            String::from_utf8_lossy(&invoked.stderr)
        ),
    }
}

#[tokio::test]
async fn a_command_runs_in_the_session_sandbox_and_teardown_removes_everything() {
    let mut daemon = TestDaemon::start_process(|_| {}).await;
    let session = daemon.create_session_with(process_policy()).await;
    let id = &session.session_id;
    let invoked = exec_on(
        &mut daemon.client,
        id,
        "one",
        sh("echo hello from $(id -un) > note.txt; cat note.txt; echo oops >&2; exit 3"),
        None,
    )
    .await;
    assert_eq!(exit_code(&invoked), Some(3), "{invoked:?}");
    assert_eq!(
        String::from_utf8_lossy(&invoked.stdout),
        "hello from sandbox\n"
    );
    assert_eq!(String::from_utf8_lossy(&invoked.stderr), "oops\n");
    let workspace = daemon.workspace_of(id);
    assert_eq!(
        std::fs::read_to_string(workspace.join("note.txt")).unwrap(),
        "hello from sandbox\n"
    );
    let init_pid = daemon.held(id).unwrap().process().unwrap().init_pid();
    let report = destroy(&mut daemon, id).await;
    assert!(report.errors.is_empty(), "{report:?}");
    assert!(report.workspace_removed);
    assert!(!report.cgroups_removed.is_empty(), "{report:?}");
    for cgroup in &report.cgroups_removed {
        assert!(
            !std::path::Path::new(cgroup).exists(),
            "{cgroup} still exists"
        );
    }
    assert!(
        !std::path::Path::new(&format!("/proc/{init_pid}")).exists(),
        "sandbox init {init_pid} still alive"
    );
    assert!(!workspace.exists());
    daemon.shutdown().await;
}

/// Runs `command` in a fresh session's sandbox of `daemon`.
async fn run(daemon: &mut TestDaemon, session: &str, command: &str) -> Invoked {
    let id = format!("inv-{}", uuid::Uuid::new_v4().simple());
    exec_on(&mut daemon.client, session, &id, sh(command), None).await
}

fn stdout(invoked: &Invoked) -> String {
    String::from_utf8_lossy(&invoked.stdout).into_owned()
}

fn error_kind(invoked: &Invoked) -> pb::ErrorKind {
    invoked.error_kind()
}

#[tokio::test]
async fn the_host_file_system_is_read_only_and_symlinks_reach_nothing_outside() {
    let mut daemon = TestDaemon::start_process(|_| {}).await;
    let session = daemon
        .create_session_with(process_policy())
        .await
        .session_id;
    let marker = format!("/tmp/harness-host-marker-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(&marker, "host").unwrap();
    let invoked = run(
        &mut daemon,
        &session,
        &format!(
            "for d in / /usr /usr/bin /etc /bin /proc/sys; do \
               if touch $d/planted 2>/dev/null; then echo WROTE $d; else echo refused $d; fi; done; \
             ln -s {marker} link; echo sandbox-tmp > link; \
             ln -s /etc/passwd pw; echo x >> pw 2>/dev/null && echo WROTE-PASSWD; \
             ln -s / root-link; ls root-link/ | tr '\\n' ' '"
        ),
    )
    .await;
    let out = stdout(&invoked);
    // The link's target path names the sandbox's own /tmp, never the host's.
    assert!(!out.contains("WROTE"), "{out}");
    assert_eq!(out.matches("refused").count(), 6, "{out}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "host");
    assert!(!std::path::Path::new("/usr/planted").exists());
    assert!(
        !out.contains("harness-host-marker"),
        "the host's /tmp is visible: {out}"
    );
    // The daemon's own file API refuses to follow the planted links.
    for path in ["link", "pw", "root-link/etc/passwd"] {
        let read = daemon
            .client
            .read_files(pb::ReadFilesRequest {
                session_id: session.clone(),
                paths: vec![path.to_owned()],
                max_bytes_per_file: 0,
                allow_missing: false,
            })
            .await;
        let status = read.unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{path}: {status:?}"
        );
    }
    let written = daemon
        .client
        .write_files(pb::WriteFilesRequest {
            session_id: session.clone(),
            files: vec![pb::FileWrite {
                path: "link".to_owned(),
                content: b"through the daemon".to_vec(),
                mode: 0,
            }],
        })
        .await;
    assert!(written.is_err(), "{written:?}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "host");
    std::fs::remove_file(&marker).unwrap();
    daemon.shutdown().await;
}

#[tokio::test]
async fn proc_shows_only_the_sandbox_and_privileges_are_gone() {
    let mut daemon = TestDaemon::start_process(|_| {}).await;
    let session = daemon
        .create_session_with(process_policy())
        .await
        .session_id;
    let invoked = run(
        &mut daemon,
        &session,
        "ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '; echo; \
         tr '\\0' ' ' < /proc/1/cmdline; echo; \
         grep -E '^(NoNewPrivs|Cap(Inh|Prm|Eff|Bnd|Amb)|Seccomp):' /proc/self/status | tr -s '\\t' ' '; \
         cp /usr/bin/id ./id && chmod u+s ./id && ls -l ./id | cut -c1-4 && ./id -u && id -u",
    )
    .await;
    let out = stdout(&invoked);
    let lines: Vec<&str> = out.lines().collect();
    let pids: Vec<u32> = lines[0]
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids[0], 1, "{out}");
    assert!(pids.len() <= 6, "only the sandbox's processes: {out}");
    assert!(
        lines[1].contains("sandbox-init"),
        "pid 1 is the sandbox init: {out}"
    );
    for expected in [
        "NoNewPrivs: 1",
        "CapInh: 0000000000000000",
        "CapPrm: 0000000000000000",
        "CapEff: 0000000000000000",
        "CapBnd: 0000000000000000",
        "CapAmb: 0000000000000000",
        "Seccomp: 2",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in {out}");
    }
    assert!(out.contains("-rws"), "the copy is setuid: {out}");
    let ids: Vec<&str> = lines[lines.len() - 2..].to_vec();
    assert_eq!(
        ids,
        vec!["1000", "1000"],
        "setuid copy ran unprivileged: {out}"
    );
    daemon.shutdown().await;
}

/// Tries each dangerous call; prints one `name result` line each.
const SYSCALL_PROBE: &str = r#"
import ctypes, os, socket, subprocess, time
libc = ctypes.CDLL(None, use_errno=True)
def call(name, nr, *args):
    ret = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    print(name, "ALLOWED" if ret >= 0 else "refused:" + os.strerror(ctypes.get_errno()))
sibling = subprocess.Popen(["sleep", "30"])
time.sleep(0.1)
buf = ctypes.create_string_buffer(256)
local = (ctypes.c_void_p * 2)(ctypes.cast(buf, ctypes.c_void_p), 16)
remote = (ctypes.c_void_p * 2)(0x400000, 16)
call("ptrace", 101, 16, sibling.pid, 0, 0)
call("process_vm_readv", 310, sibling.pid, ctypes.addressof(local), 1, ctypes.addressof(remote), 1, 0)
call("mount", 165, ctypes.addressof(ctypes.create_string_buffer(b"none")), ctypes.addressof(ctypes.create_string_buffer(b"/tmp")), ctypes.addressof(ctypes.create_string_buffer(b"tmpfs")), 0, 0)
call("unshare", 272, 0x10000000)
call("pivot_root", 155, ctypes.addressof(ctypes.create_string_buffer(b"/tmp")), ctypes.addressof(ctypes.create_string_buffer(b"/tmp")))
call("io_uring_setup", 425, 4, ctypes.addressof(ctypes.create_string_buffer(120)))
call("bpf", 321, 0, ctypes.addressof(ctypes.create_string_buffer(128)), 128)
call("keyctl", 250, 0, -3, 1)
call("perf_event_open", 298, ctypes.addressof(ctypes.create_string_buffer(128)), 0, -1, -1, 0)
for name, family in (("AF_NETLINK", 16), ("AF_PACKET", 17)):
    try:
        socket.socket(family, socket.SOCK_RAW, 0).close()
        print(name, "ALLOWED")
    except OSError as e:
        print(name, "refused:" + e.strerror)
import fcntl, termios
try:
    fcntl.ioctl(0, termios.TIOCSTI, b"x")
    print("TIOCSTI ALLOWED")
except OSError as e:
    print("TIOCSTI refused:" + e.strerror)
try:
    os.open("/dev/tty", os.O_RDWR)
    print("controlling-tty ALLOWED")
except OSError as e:
    print("controlling-tty refused:" + e.strerror)
sibling.kill()
"#;

#[tokio::test]
async fn dangerous_system_calls_and_socket_families_are_refused() {
    let mut daemon = TestDaemon::start_process(|_| {}).await;
    let session = daemon
        .create_session_with(process_policy())
        .await
        .session_id;
    let invoked = exec_on(
        &mut daemon.client,
        &session,
        "probe",
        pb::ProcessCall {
            argv: vec!["python3".into(), "-c".into(), SYSCALL_PROBE.into()],
            ..Default::default()
        },
        None,
    )
    .await;
    let out = stdout(&invoked);
    let names = [
        "ptrace",
        "process_vm_readv",
        "mount",
        "unshare",
        "pivot_root",
        "io_uring_setup",
        "bpf",
        "keyctl",
        "perf_event_open",
        "AF_NETLINK",
        "AF_PACKET",
        "TIOCSTI",
        "controlling-tty",
    ];
    for name in names {
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| {
                panic!(
                    "no result for {name}: {out}\n{}",
                    String::from_utf8_lossy(&invoked.stderr)
                )
            });
        assert!(line.contains("refused"), "{line}");
    }
    assert_eq!(
        exit_code(&invoked),
        Some(0),
        "{}",
        String::from_utf8_lossy(&invoked.stderr)
    );
    daemon.shutdown().await;
}

fn limited(limits: pb::ResourceLimits) -> pb::SessionPolicy {
    pb::SessionPolicy {
        limits: Some(limits),
        ..process_policy()
    }
}

/// A process session with `limits`; returns its id.
async fn limited_session(daemon: &mut TestDaemon, limits: pb::ResourceLimits) -> String {
    daemon.create_session_with(limited(limits)).await.session_id
}

/// Destroys a session through the API and returns its teardown report.
async fn destroy(daemon: &mut TestDaemon, session: &str) -> pb::TeardownReport {
    daemon
        .client
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

/// The session's cgroup directories, one per hierarchy.
fn cgroup_dirs(daemon: &TestDaemon, session: &str) -> Vec<std::path::PathBuf> {
    let held = daemon.held(session).unwrap();
    let sandbox = held.process().unwrap();
    sandbox
        .cgroup()
        .dirs()
        .iter()
        .map(|d| d.path.clone())
        .collect()
}

#[tokio::test]
async fn a_fork_bomb_is_capped_by_the_pids_limit_and_others_are_unaffected() {
    let mut daemon = TestDaemon::start_process(|_| {}).await;
    let bombed = limited_session(
        &mut daemon,
        pb::ResourceLimits {
            pids: 32,
            ..Default::default()
        },
    )
    .await;
    let bystander = daemon
        .create_session_with(process_policy())
        .await
        .session_id;
    let mut client = daemon.client.clone();
    let bomb = tokio::spawn({
        let bombed = bombed.clone();
        async move {
            exec_on(
                &mut client,
                &bombed,
                "bomb",
                sh("bomb() { bomb | bomb & }; bomb; sleep 5"),
                Some(std::time::Duration::from_secs(3)),
            )
            .await
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let sandbox_cgroup = daemon.held(&bombed).unwrap();
    let count = sandbox_cgroup
        .process()
        .unwrap()
        .cgroup()
        .process_count()
        .unwrap();
    assert!(count <= 32, "{count} processes in a session limited to 32");
    let calm = run(&mut daemon, &bystander, "echo still fine").await;
    assert_eq!(stdout(&calm), "still fine\n");
    // Either the deadline killed the bomb's process group, or the shell
    // itself could no longer fork `sleep` and gave up: both are the cap.
    let bombed_result = bomb.await.unwrap();
    let capped = match bombed_result
        .result
        .as_ref()
        .and_then(|r| r.outcome.clone())
    {
        Some(pb::invoke_result::Outcome::Error(error)) => {
            error.kind == pb::ErrorKind::Timeout as i32
        }
        Some(pb::invoke_result::Outcome::Ok(ok)) => ok.exit_status.and_then(|s| s.code) != Some(0),
        None => false,
    };
    assert!(capped, "{bombed_result:?}");
    daemon.shutdown().await;
}

#[tokio::test]
async fn a_memory_bomb_is_killed_by_the_cgroup_and_reported_as_resource_exhausted() {
    let mut daemon = TestDaemon::start_process(|_| {}).await;
    let session = limited_session(
        &mut daemon,
        pb::ResourceLimits {
            memory_bytes: 64 << 20,
            ..Default::default()
        },
    )
    .await;
    let invoked = run(
        &mut daemon,
        &session,
        "python3 -c 'b = bytearray(1 << 30); print(len(b))'",
    )
    .await;
    assert_eq!(
        error_kind(&invoked),
        pb::ErrorKind::ResourceExhausted,
        "{invoked:?}"
    );
    let after = run(&mut daemon, &session, "echo alive").await;
    assert_eq!(stdout(&after), "alive\n");
    daemon.shutdown().await;
}

#[tokio::test]
async fn endless_writes_are_stopped_by_the_size_limits() {
    let mut daemon = TestDaemon::start_process(|config| {
        config.process.tmp_bytes = 8 << 20;
    })
    .await;
    let session = limited_session(
        &mut daemon,
        pb::ResourceLimits {
            disk_bytes: 16 << 20,
            ..Default::default()
        },
    )
    .await;
    let file = run(
        &mut daemon,
        &session,
        "dd if=/dev/zero of=big bs=1M 2>/dev/null",
    )
    .await;
    assert_eq!(
        error_kind(&file),
        pb::ErrorKind::ResourceExhausted,
        "{file:?}"
    );
    let size = std::fs::metadata(daemon.workspace_of(&session).join("big"))
        .unwrap()
        .len();
    assert!(size <= 16 << 20, "{size}");
    let tmp = run(
        &mut daemon,
        &session,
        "dd if=/dev/zero of=/tmp/big bs=1M 2>&1 | grep -c 'No space left on device'; stat -c %s /tmp/big",
    )
    .await;
    let out = stdout(&tmp);
    assert!(out.starts_with("1\n"), "dd stops at a full /tmp: {out}");
    let tmp_size: u64 = out.lines().last().unwrap().trim().parse().unwrap();
    assert!(tmp_size <= 8 << 20, "{tmp_size}");
    daemon.shutdown().await;
}

/// Many files, each under the per-file limit, cannot add up past the
/// workspace cap: the workspace is a tmpfs of that size.
#[tokio::test]
async fn many_files_cannot_add_up_past_the_workspace_cap() {
    let mut daemon = TestDaemon::start_process(|_| {}).await;
    let cap: u64 = 1 << 20;
    let session = limited_session(
        &mut daemon,
        pb::ResourceLimits {
            disk_bytes: cap,
            ..Default::default()
        },
    )
    .await;
    let filled = run(
        &mut daemon,
        &session,
        "for i in 1 2 3 4 5 6; do head -c 400000 /dev/zero > f$i || { echo full at $i; exit 7; }; done",
    )
    .await;
    assert_eq!(
        (exit_code(&filled), stdout(&filled)),
        (Some(7), "full at 3\n".to_owned()),
        "{filled:?}"
    );
    assert!(
        String::from_utf8_lossy(&filled.stderr).contains("No space left on device"),
        "{filled:?}"
    );
    daemon.assert_workspace_within(&session, cap);
    let after_cleanup = run(
        &mut daemon,
        &session,
        "rm f*; head -c 400000 /dev/zero > g && echo ok",
    )
    .await;
    assert_eq!(stdout(&after_cleanup), "ok\n", "{after_cleanup:?}");
    daemon.shutdown().await;
}

#[tokio::test]
async fn timeouts_kill_the_process_group_and_teardown_kills_background_processes() {
    let mut daemon = TestDaemon::start_process(|_| {}).await;
    let session = daemon
        .create_session_with(process_policy())
        .await
        .session_id;
    let started = std::time::Instant::now();
    let timed_out = exec_on(
        &mut daemon.client,
        &session,
        "slow",
        sh("sleep 60 & sleep 60"),
        Some(std::time::Duration::from_millis(500)),
    )
    .await;
    assert_eq!(error_kind(&timed_out), pb::ErrorKind::Timeout);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // A background process that keeps stdout open does not hold the call
    // up, and nothing the command wrote is lost.
    let started = std::time::Instant::now();
    let held_open = run(&mut daemon, &session, "sleep 5 & echo visible").await;
    assert_eq!(stdout(&held_open), "visible\n");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // No pipeline here: the shell would hold pipe ends while `ls` looks.
    let fds = run(&mut daemon, &session, "ls /proc/$$/fd").await;
    assert_eq!(stdout(&fds), "0\n1\n2\n", "only stdio is inherited");
    let background = run(
        &mut daemon,
        &session,
        "nohup sleep 600 >/dev/null 2>&1 & echo started",
    )
    .await;
    assert_eq!(stdout(&background), "started\n");
    let cgroup_dirs = cgroup_dirs(&daemon, &session);
    let procs = std::fs::read_to_string(cgroup_dirs[0].join("cgroup.procs")).unwrap();
    let host_pids: Vec<i32> = procs.lines().map(|p| p.parse().unwrap()).collect();
    assert!(
        host_pids.len() >= 2,
        "init and the background sleep: {host_pids:?}"
    );
    let report = destroy(&mut daemon, &session).await;
    assert!(report.processes_killed >= 2, "{report:?}");
    for pid in host_pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let alive = !stat.is_empty() && !stat.contains(") Z ");
        assert!(!alive, "process {pid} survived teardown: {stat}");
    }
    for dir in cgroup_dirs {
        assert!(!dir.exists(), "{} survived teardown", dir.display());
    }
    daemon.shutdown().await;
}

#[tokio::test]
async fn two_sessions_cannot_see_each_other() {
    let mut daemon = TestDaemon::start_process(|_| {}).await;
    let first = daemon
        .create_session_with(process_policy())
        .await
        .session_id;
    let second = daemon
        .create_session_with(process_policy())
        .await
        .session_id;
    let _ = run(
        &mut daemon,
        &first,
        "echo secret > mine.txt; nohup sleep 600 >/dev/null 2>&1 &",
    )
    .await;
    let first_workspace = daemon.workspace_of(&first);
    let peek = run(
        &mut daemon,
        &second,
        &format!(
            "cat /workspace/mine.txt 2>&1; ls {} 2>&1; ls /proc | grep -E '^[0-9]+$' | wc -l; \
             cat /proc/[0-9]*/comm 2>/dev/null | grep -c '^sleep$'",
            first_workspace.display()
        ),
    )
    .await;
    let out = stdout(&peek);
    assert!(!out.contains("secret"), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[lines.len() - 1].trim(),
        "0",
        "the other session's sleep is visible: {out}"
    );
    daemon.shutdown().await;
}

#[tokio::test]
async fn without_an_allowlist_there_is_no_network_at_all() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut daemon = TestDaemon::start_process(|_| {}).await;
    let session = daemon
        .create_session_with(process_policy())
        .await
        .session_id;
    let invoked = run(
        &mut daemon,
        &session,
        &format!(
            "curl -sS --max-time 3 http://127.0.0.1:{port}/ >/dev/null 2>&1 && echo REACHED-HOST; \
             getent hosts example.com >/dev/null && echo RESOLVED; \
             curl -sS --max-time 3 http://10.0.0.1/ >/dev/null 2>&1 && echo REACHED-IP; \
             ip -o link 2>/dev/null | wc -l; echo done"
        ),
    )
    .await;
    let out = stdout(&invoked);
    assert!(
        !out.contains("REACHED") && !out.contains("RESOLVED"),
        "{out}"
    );
    assert!(out.ends_with("done\n"), "{out}");
    drop(listener);
    daemon.shutdown().await;
}

/// A loopback HTTP server answering every request with `hello`.
async fn hello_server() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut request = Vec::new();
                let mut buffer = [0_u8; 1024];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buffer[..n]),
                    }
                }
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
                    )
                    .await;
            });
        }
    });
    (port, task)
}

fn allowlisted(allow: &[String], cidrs: &[&str]) -> pb::SessionPolicy {
    pb::SessionPolicy {
        network: Some(pb::NetworkPolicy {
            allow: allow.to_vec(),
            deny: Vec::new(),
            allow_cidrs: cidrs.iter().map(|c| (*c).to_owned()).collect(),
        }),
        ..process_policy()
    }
}

#[tokio::test]
async fn an_allowlist_is_enforced_by_the_egress_proxy_and_there_is_no_way_around_it() {
    let (port, server) = hello_server().await;
    let (other_port, other_server) = hello_server().await;
    let mut daemon = TestDaemon::start_process(|config| {
        for name in ["api.allowed.test", "allowed.test", "evil-allowed.test"] {
            config.static_hosts.insert(
                name.to_owned(),
                vec![std::net::IpAddr::from([127, 0, 0, 1])],
            );
        }
        config.static_hosts.insert(
            "metadata.allowed.test".to_owned(),
            vec![std::net::IpAddr::from([169, 254, 169, 254])],
        );
    })
    .await;
    let rules = vec![format!("*.allowed.test:{port}")];
    let session = daemon
        .create_session_with(allowlisted(&rules, &["127.0.0.1/32"]))
        .await
        .session_id;
    let curl = |url: String, tunnel: bool| {
        format!(
            "curl -sS -f --noproxy '' --max-time 5 {} {url} 2>/dev/null || echo REFUSED",
            if tunnel { "-p" } else { "" }
        )
    };
    for (url, tunnel, expected) in [
        (format!("http://api.allowed.test:{port}/"), false, "hello"),
        (format!("http://api.allowed.test:{port}/"), true, "hello"),
        (format!("http://allowed.test:{port}/"), false, "REFUSED"),
        (format!("http://evil-allowed.test:{port}/"), true, "REFUSED"),
        (format!("http://127.0.0.1:{port}/"), false, "REFUSED"),
        (
            format!("http://api.allowed.test:{other_port}/"),
            false,
            "REFUSED",
        ),
        (
            format!("http://metadata.allowed.test:{port}/"),
            true,
            "REFUSED",
        ),
    ] {
        let invoked = run(&mut daemon, &session, &curl(url.clone(), tunnel)).await;
        assert_eq!(
            stdout(&invoked).trim(),
            expected,
            "{url} (tunnel: {tunnel})"
        );
    }
    let around = run(
        &mut daemon,
        &session,
        &format!(
            "curl -sS --noproxy '*' --max-time 3 http://127.0.0.1:{port}/ 2>/dev/null || echo REFUSED; \
             curl -sS --noproxy '*' --max-time 3 http://10.0.0.1/ 2>/dev/null || echo REFUSED"
        ),
    )
    .await;
    assert_eq!(
        stdout(&around),
        "REFUSED\nREFUSED\n",
        "going around the proxy"
    );
    let log = daemon
        .held(&session)
        .unwrap()
        .egress
        .as_ref()
        .unwrap()
        .log
        .records();
    assert_eq!(log.iter().filter(|r| r.allowed).count(), 2, "{log:#?}");
    assert!(log.iter().filter(|r| !r.allowed).count() >= 5, "{log:#?}");
    // Without the CIDR grant, the allowed name's loopback answer is refused.
    let strict = daemon
        .create_session_with(allowlisted(&rules, &[]))
        .await
        .session_id;
    let refused = run(
        &mut daemon,
        &strict,
        &curl(format!("http://api.allowed.test:{port}/"), true),
    )
    .await;
    assert_eq!(stdout(&refused).trim(), "REFUSED");
    server.abort();
    other_server.abort();
    daemon.shutdown().await;
}

#[tokio::test]
async fn commands_get_stdin_stream_output_and_report_signals_and_usage() {
    let mut daemon = TestDaemon::start_process(|_| {}).await;
    let session = daemon
        .create_session_with(process_policy())
        .await
        .session_id;
    // The exec tool is listed and callable by name, as models call it.
    let tools = daemon
        .client
        .list_tools(pb::ListToolsRequest {})
        .await
        .unwrap()
        .into_inner()
        .tools;
    let exec = tools.iter().find(|t| t.name == "exec").unwrap();
    assert_eq!(exec.backend, pb::Backend::Process as i32);
    let by_name = crate::support::invoke_on(
        &mut daemon.client,
        &session,
        "by-name",
        "exec",
        serde_json::json!({"argv": ["tr", "a-z", "A-Z"], "stdin": "shout"}),
    )
    .await;
    let output = by_name.ok_json();
    assert_eq!(
        output,
        serde_json::json!({"exit_code": 0, "signal": null, "stdout": "SHOUT", "stderr": ""})
    );
    let invalid = crate::support::invoke_on(
        &mut daemon.client,
        &session,
        "invalid",
        "exec",
        serde_json::json!({"argv": []}),
    )
    .await;
    assert_eq!(invalid.error_kind(), pb::ErrorKind::InvalidInput);
    let missing = exec_on(
        &mut daemon.client,
        &session,
        "missing",
        pb::ProcessCall {
            argv: vec!["no-such-program".into()],
            ..Default::default()
        },
        None,
    )
    .await;
    assert_eq!(missing.error_kind(), pb::ErrorKind::NotFound);
    let killed = run(&mut daemon, &session, "kill -9 $$").await;
    let status = match killed.result.unwrap().outcome.unwrap() {
        pb::invoke_result::Outcome::Ok(ok) => ok.exit_status.unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!((status.code, status.signal), (None, Some(9)));
    let busy = run(
        &mut daemon,
        &session,
        "python3 -c 'b = bytearray(32 << 20); x = sum(range(3_000_000))'",
    )
    .await;
    let usage = busy.result.unwrap().usage.unwrap();
    let cpu = harness_proto::duration_from_proto(&usage.cpu_time.unwrap());
    assert!(cpu > std::time::Duration::from_millis(10), "{usage:?}");
    assert!(usage.peak_memory_bytes > 32 << 20, "{usage:?}");
    assert!(usage.wall_time.is_some());
    // Output arrives while the command still runs.
    let mut stream = daemon
        .client
        .invoke(pb::InvokeRequest {
            session_id: session.clone(),
            invocation_id: "stream".to_owned(),
            target: Some(pb::invoke_request::Target::Process(sh(
                "echo first; sleep 1; echo second",
            ))),
            timeout: None,
        })
        .await
        .unwrap()
        .into_inner();
    let started = std::time::Instant::now();
    let first_output = loop {
        let event = stream.message().await.unwrap().unwrap();
        if let Some(pb::invoke_event::Event::Output(chunk)) = event.event {
            break (chunk.data, started.elapsed());
        }
    };
    assert_eq!(first_output.0, b"first\n");
    assert!(
        first_output.1 < std::time::Duration::from_millis(800),
        "{:?}",
        first_output.1
    );
    while stream.message().await.unwrap().is_some() {}
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    daemon.shutdown().await;
}

#[tokio::test]
async fn policy_binds_are_read_only_or_writable_as_asked() {
    let host = tempfile::tempdir().unwrap();
    let readable = host.path().join("readable");
    let writable = host.path().join("writable");
    for dir in [&readable, &writable] {
        std::fs::create_dir(dir).unwrap();
    }
    std::fs::write(readable.join("data.txt"), "host data").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut daemon = TestDaemon::start_process(|_| {}).await;
    let policy = pb::SessionPolicy {
        filesystem: Some(pb::FilesystemPolicy {
            binds: vec![
                pb::BindMount {
                    host_path: readable.display().to_string(),
                    sandbox_path: "/opt/data".to_owned(),
                    writable: false,
                },
                pb::BindMount {
                    host_path: writable.display().to_string(),
                    sandbox_path: "/srv/out".to_owned(),
                    writable: true,
                },
            ],
        }),
        ..process_policy()
    };
    let session = daemon.create_session_with(policy).await.session_id;
    let invoked = run(
        &mut daemon,
        &session,
        "cat /opt/data/data.txt; echo; \
         touch /opt/data/new 2>/dev/null && echo WROTE-READ-ONLY; \
         echo result > /srv/out/result.txt && echo wrote",
    )
    .await;
    assert_eq!(stdout(&invoked), "host data\nwrote\n");
    assert_eq!(
        std::fs::read_to_string(writable.join("result.txt")).unwrap(),
        "result\n"
    );
    assert!(!readable.join("new").exists());
    // Targets that would cover the sandbox's own layout are refused.
    let bad = daemon
        .client
        .create_session(pb::CreateSessionRequest {
            policy: Some(pb::SessionPolicy {
                filesystem: Some(pb::FilesystemPolicy {
                    binds: vec![pb::BindMount {
                        host_path: readable.display().to_string(),
                        sandbox_path: "/etc".to_owned(),
                        writable: false,
                    }],
                }),
                ..process_policy()
            }),
            labels: Default::default(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");
    daemon.shutdown().await;
}

#[tokio::test]
async fn idle_sessions_are_torn_down_completely() {
    let mut daemon = TestDaemon::start_process(|_| {}).await;
    let policy = pb::SessionPolicy {
        idle_timeout: Some(harness_proto::duration_to_proto(
            std::time::Duration::from_millis(300),
        )),
        ..process_policy()
    };
    let session = daemon.create_session_with(policy).await.session_id;
    let _ = run(&mut daemon, &session, "nohup sleep 600 >/dev/null 2>&1 &").await;
    let cgroups = cgroup_dirs(&daemon, &session);
    let init_pid = daemon.held(&session).unwrap().process().unwrap().init_pid();
    let workspace = daemon.workspace_of(&session);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while daemon.held(&session).is_ok() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(daemon.held(&session).is_err(), "not reaped");
    // Reaping destroys asynchronously; give it a moment to finish.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let stat = std::fs::read_to_string(format!("/proc/{init_pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z "),
        "init survived: {stat}"
    );
    for dir in cgroups {
        assert!(!dir.exists(), "{}", dir.display());
    }
    assert!(!workspace.exists());
    daemon.shutdown().await;
}

#[tokio::test]
async fn commands_see_only_granted_environment_and_run_where_asked() {
    // The daemon runs inside cargo's test process, whose environment
    // (CARGO_*, RUST_*) must not reach the sandbox.
    let mut daemon = TestDaemon::start_process(|_| {}).await;
    let policy = pb::SessionPolicy {
        environment: [("GRANTED".to_owned(), "yes".to_owned())].into(),
        secrets: vec![pb::Secret {
            env_var: "API_TOKEN".to_owned(),
            value: "s3cret".to_owned(),
        }],
        ..process_policy()
    };
    let session = daemon.create_session_with(policy).await.session_id;
    let invoked = exec_on(
        &mut daemon.client,
        &session,
        "env",
        pb::ProcessCall {
            shell:
                "pwd; echo $GRANTED $API_TOKEN $CALL_ONLY; env | cut -d= -f1 | sort | tr '\\n' ' '"
                    .to_owned(),
            cwd: "/tmp".to_owned(),
            environment: [("CALL_ONLY".to_owned(), "here".to_owned())].into(),
            ..Default::default()
        },
        None,
    )
    .await;
    let out = stdout(&invoked);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "/tmp");
    assert_eq!(lines[1], "yes s3cret here");
    let names: Vec<&str> = lines[2].split_whitespace().collect();
    for leaked in ["CARGO", "CARGO_PKG_NAME", "RUST_BACKTRACE", "SSH_AUTH_SOCK"] {
        assert!(!names.contains(&leaked), "{leaked} leaked: {names:?}");
    }
    assert!(
        names.contains(&"PATH") && names.contains(&"HOME"),
        "{names:?}"
    );
    daemon.shutdown().await;
}

#[tokio::test]
async fn the_cpu_limit_throttles_a_busy_loop() {
    let mut daemon = TestDaemon::start_process(|_| {}).await;
    let session = limited_session(
        &mut daemon,
        pb::ResourceLimits {
            cpu_millis: 100,
            ..Default::default()
        },
    )
    .await;
    let invoked = run(
        &mut daemon,
        &session,
        "python3 -c 'import time\nt = time.time()\nwhile time.time() - t < 1: pass'",
    )
    .await;
    let usage = invoked.result.unwrap().usage.unwrap();
    let cpu = harness_proto::duration_from_proto(&usage.cpu_time.unwrap());
    let wall = harness_proto::duration_from_proto(&usage.wall_time.unwrap());
    assert!(wall >= std::time::Duration::from_secs(1), "{usage:?}");
    // 10% of one CPU over about a second, with slack for the interpreter's
    // start before the quota period kicks in.
    assert!(cpu < std::time::Duration::from_millis(400), "{usage:?}");
    daemon.shutdown().await;
}

#[tokio::test]
async fn files_written_by_the_daemon_belong_to_the_sandbox_user() {
    let mut daemon = TestDaemon::start_process(|_| {}).await;
    let policy = pb::SessionPolicy {
        workspace: Some(pb::WorkspacePolicy {
            initial_files: vec![pb::FileWrite {
                path: "seed/initial.txt".to_owned(),
                content: b"initial\n".to_vec(),
                mode: 0,
            }],
            ..Default::default()
        }),
        ..process_policy()
    };
    let session = daemon.create_session_with(policy).await.session_id;
    daemon
        .client
        .write_files(pb::WriteFilesRequest {
            session_id: session.clone(),
            files: vec![pb::FileWrite {
                path: "later/written.txt".to_owned(),
                content: b"written\n".to_vec(),
                mode: 0,
            }],
        })
        .await
        .unwrap();
    let invoked = run(
        &mut daemon,
        &session,
        "echo more >> seed/initial.txt && echo more >> later/written.txt && \
         touch seed/new later/new && stat -c '%U' seed/initial.txt later/written.txt later | tr '\\n' ' '",
    )
    .await;
    assert_eq!(stdout(&invoked), "sandbox sandbox sandbox ", "{invoked:?}");
    daemon.shutdown().await;
}

#[tokio::test]
async fn two_hundred_concurrent_sessions_leave_nothing_behind() {
    let mut daemon = TestDaemon::start_process(|_| {}).await;
    let channel = daemon.channel.clone();
    let mut tasks = Vec::new();
    for n in 0..200 {
        let mut client =
            harness_proto::sandbox::v1::sandbox_service_client::SandboxServiceClient::new(
                channel.clone(),
            );
        tasks.push(tokio::spawn(async move {
            let session = client
                .create_session(pb::CreateSessionRequest {
                    policy: Some(process_policy()),
                    labels: Default::default(),
                })
                .await
                .unwrap()
                .into_inner()
                .session
                .unwrap()
                .session_id;
            let invoked = exec_on(&mut client, &session, "n", sh(&format!("echo {n}")), None).await;
            assert_eq!(String::from_utf8_lossy(&invoked.stdout), format!("{n}\n"));
            session
        }));
    }
    let mut sessions = Vec::new();
    for task in tasks {
        sessions.push(task.await.unwrap());
    }
    let mut inits = Vec::new();
    let mut cgroups = Vec::new();
    for session in &sessions {
        inits.push(daemon.held(session).unwrap().process().unwrap().init_pid());
        cgroups.extend(cgroup_dirs(&daemon, session));
    }
    for session in &sessions {
        let report = destroy(&mut daemon, session).await;
        assert!(report.errors.is_empty(), "{report:?}");
    }
    let alive: Vec<i32> = inits
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| !stat.contains(") Z "))
        })
        .collect();
    assert!(
        alive.is_empty(),
        "sandbox inits alive after teardown: {alive:?}"
    );
    let left: Vec<_> = cgroups.iter().filter(|dir| dir.exists()).collect();
    assert!(left.is_empty(), "cgroups left: {left:?}");
    let workspaces = std::fs::read_dir(daemon.daemon.config.sessions_dir())
        .unwrap()
        .count();
    assert_eq!(workspaces, 0);
    daemon.shutdown().await;
}

/// Any descriptor sandboxd opens may get the number the init's control
/// socket is moved to before the exec; the init must still execute. This
/// builds that layout in a re-executed copy of this test binary, where the
/// descriptor numbers are predictable, and runs a process session there.
#[test]
fn an_init_program_descriptor_numbered_like_the_control_socket_still_executes() {
    const CHILD: &str = "HARNESS_TEST_INIT_DESCRIPTOR_LAYOUT";
    const NAME: &str =
        "process::an_init_program_descriptor_numbered_like_the_control_socket_still_executes";
    if std::env::var_os(CHILD).is_none() {
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args([NAME, "--exact", "--test-threads=1", "--nocapture"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&output.stdout);
        let err = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{out}\n{err}");
        assert!(
            out.contains("test result: ok. 1 passed"),
            "the re-executed test did not run: {out}\n{err}"
        );
        return;
    }
    let control_fd = harness_sandboxd::sys::INIT_CONTROL_FD;
    // Hold the number while the runtime opens its descriptors, then free it
    // so the next descriptor opened (the init program's) takes it.
    let placeholder = std::fs::File::open("/dev/null").unwrap();
    assert_eq!(
        std::os::fd::AsRawFd::as_raw_fd(&placeholder),
        control_fd,
        "descriptor {control_fd} is taken in the re-executed test process"
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // A first daemon opens what stays open for the whole process
        // (wasmtime's page map reader), so the next daemon's first
        // descriptor is the init program's.
        TestDaemon::start().await.shutdown().await;
        drop(placeholder);
        let mut daemon = TestDaemon::start_process(|config| config.process.warm_pool = 0).await;
        use std::os::unix::fs::MetadataExt;
        let at_control_fd = std::fs::metadata(format!("/proc/self/fd/{control_fd}")).unwrap();
        let program = std::fs::metadata(crate::support::sandbox_init_program()).unwrap();
        assert_eq!(
            (at_control_fd.dev(), at_control_fd.ino()),
            (program.dev(), program.ino()),
            "the layout under test was not built: descriptor {control_fd} is {:?}, not sandbox-init",
            std::fs::read_link(format!("/proc/self/fd/{control_fd}"))
        );
        let session = daemon
            .create_session_with(process_policy())
            .await
            .session_id;
        let invoked = run(&mut daemon, &session, "echo ran").await;
        assert_eq!(stdout(&invoked), "ran\n");
        daemon.shutdown().await;
    });
}
