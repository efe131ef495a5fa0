//! The process backend through the real sandboxd binary: a crash of sandboxd
//! leaves no sandbox process running, and the restarted daemon removes every
//! cgroup and workspace the crashed one left.

use harness_e2e::{Cluster, demo_agents_dir};
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
    let cluster = Cluster::start(agents.path()).await.unwrap();
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
