//! The process backend through the real sandboxd binary: an agent's `exec`
//! calls (also with sandboxd installed under a private directory), a crash
//! of sandboxd leaves no sandbox process running, the restarted daemon
//! removes every cgroup and workspace the crashed one left, and an init
//! program sandboxes could not execute stops sandboxd at start-up.

use harness_e2e::{Cluster, ClusterOptions, demo_agents_dir};
use harness_proto::sandbox::v1 as sandbox;

fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z ") && !stat.contains(") X "))
        .unwrap_or(false)
}

#[tokio::test]
async fn a_sandboxd_crash_and_restart_leave_nothing_behind() {
    let mut cluster = Cluster::start(&demo_agents_dir()).await.unwrap();
    let mut client = cluster.sandbox().await.unwrap();
    let session = client
        .create_session(sandbox::CreateSessionRequest {
            policy: Some(sandbox::SessionPolicy {
                backends: vec![sandbox::Backend::Process as i32],
                ..Default::default()
            }),
            labels: Default::default(),
        })
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", cluster.logs()))
        .into_inner()
        .session
        .unwrap();
    let id = session.session_id;
    let mut stream = client
        .invoke(sandbox::InvokeRequest {
            session_id: id.clone(),
            invocation_id: "background".to_owned(),
            target: Some(sandbox::invoke_request::Target::Process(
                sandbox::ProcessCall {
                    shell: "nohup sleep 600 >/dev/null 2>&1 & echo started".to_owned(),
                    ..Default::default()
                },
            )),
            timeout: None,
        })
        .await
        .unwrap()
        .into_inner();
    while stream.message().await.unwrap().is_some() {}
    let cgroups = cluster.session_cgroups(&id);
    assert!(
        !cgroups.is_empty(),
        "no session cgroups found\n{}",
        cluster.logs()
    );
    let pids: Vec<i32> = std::fs::read_to_string(cgroups[0].join("cgroup.procs"))
        .unwrap()
        .lines()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(pids.len() >= 2, "init and the background sleep: {pids:?}");
    let workspace = cluster.workspace_of(&id);
    assert!(workspace.exists());

    cluster.kill_sandboxd().await.unwrap();
    // The sandbox init dies with its parent; killing pid 1 of a pid
    // namespace kills everything in it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while pids.iter().any(|p| process_alive(*p)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let survivors: Vec<i32> = pids.iter().copied().filter(|p| process_alive(*p)).collect();
    assert!(
        survivors.is_empty(),
        "processes outlived sandboxd: {survivors:?}"
    );

    cluster.restart_sandboxd().await.unwrap();
    for dir in &cgroups {
        assert!(!dir.exists(), "{} outlived the restart", dir.display());
    }
    assert!(!workspace.exists(), "the workspace outlived the restart");
    cluster.stop().await.unwrap();
}

#[tokio::test]
async fn an_agent_runs_commands_with_the_exec_tool() {
    an_agent_runs_commands(false).await;
}

/// sandboxd installed under a directory only root may enter, as a clone in
/// `mktemp -d` is: the init runs as an unprivileged host uid, so it must not
/// have to walk that path to start.
#[tokio::test]
async fn process_sandboxes_start_when_sandboxd_is_installed_in_a_private_directory() {
    an_agent_runs_commands(true).await;
}

#[test]
fn an_init_program_others_cannot_execute_is_refused_at_start_up_and_by_the_probe() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let init = dir.path().join("sandbox-init");
    std::fs::copy(harness_e2e::binary("sandbox-init").unwrap(), &init).unwrap();
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o750)).unwrap();
    let config = dir.path().join("sandboxd.toml");
    std::fs::write(
        &config,
        format!("[process]\ninit-program = \"{}\"\n", init.display()),
    )
    .unwrap();
    let fix = format!("`chmod o+x {}`", init.display());
    let sandboxd = harness_e2e::binary("sandboxd").unwrap();

    let probe = std::process::Command::new(&sandboxd)
        .arg("probe")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&probe.stderr);
    assert!(!probe.status.success(), "the probe passed: {stderr}");
    assert!(
        stderr.contains(&fix),
        "the probe does not name the fix: {stderr}"
    );

    let mut serve = std::process::Command::new(&sandboxd)
        .env(harness_daemon::paths::HOME_VARIABLE, dir.path())
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--listen")
        .arg(format!(
            "unix:{}",
            dir.path().join("sandboxd.sock").display()
        ))
        .arg("--tools-dir")
        .arg(harness_tool_artifacts::tools_dir())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            serve.kill().unwrap();
            panic!("sandboxd is still running with an init program it cannot use");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut serve.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "sandboxd started: {stderr}");
    assert!(
        stderr.contains(&fix),
        "start-up does not name the fix: {stderr}"
    );
}

async fn an_agent_runs_commands(private_install: bool) {
    let agents = tempfile::tempdir().unwrap();
    std::fs::write(
        agents.path().join("shell.toml"),
        "name = \"shell\"\nprovider = \"scripted\"\nmodel = \"scripted-test\"\n\
         script = \"shell.script.toml\"\ntools = [\"exec\", \"read_file\"]\nmax-turns = 5\n\
         [sandbox]\nprocess = true\n",
    )
    .unwrap();
    std::fs::write(
        agents.path().join("shell.script.toml"),
        "[[turn]]\ntext = \"running it\"\n[[turn.tool-calls]]\ntool = \"exec\"\n\
         arguments = { command = \"echo built by $(id -un) > out.txt; cat out.txt\" }\n\n\
         [[turn]]\ntext = \"reading it back\"\n[[turn.tool-calls]]\ntool = \"read_file\"\n\
         arguments = { path = \"out.txt\" }\n\n[[turn]]\ntext = \"done\"\n",
    )
    .unwrap();
    let cluster = Cluster::start_with(ClusterOptions {
        private_install,
        ..ClusterOptions::new(agents.path())
    })
    .await
    .unwrap();
    let id = crate::support::start(&cluster, "shell", "run a command").await;
    let events = crate::support::events(&cluster, &id, 0).await;
    let calls = crate::support::finished_calls(&events);
    assert_eq!(calls.len(), 2, "{}", cluster.logs());
    let outputs: Vec<serde_json::Value> = calls
        .iter()
        .map(|call| match &call.outcome {
            Some(harness_proto::control::v1::tool_finished::Outcome::OutputJson(json)) => {
                serde_json::from_str(json).unwrap()
            }
            other => panic!("{} failed: {other:?}\n{}", call.tool, cluster.logs()),
        })
        .collect();
    assert_eq!(outputs[0]["exit_code"], 0, "{outputs:?}");
    assert_eq!(outputs[0]["stdout"], "built by sandbox\n", "{outputs:?}");
    assert!(
        outputs[1].to_string().contains("built by sandbox"),
        "the WASI tool reads what the process wrote: {outputs:?}"
    );
    cluster.stop().await.unwrap();
}
