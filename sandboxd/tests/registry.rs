//! The tools directory: listing, broken components, runtime changes.

use std::time::Duration;

use harness_proto::sandbox::v1 as pb;
use serde_json::json;

use crate::support::TestDaemon;

#[tokio::test]
async fn standard_tools_are_listed_with_schemas_and_digests() {
    let mut daemon = TestDaemon::start().await;
    let listed = daemon
        .client
        .list_tools(pb::ListToolsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = listed.tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, harness_tool_artifacts::STANDARD_TOOLS.to_vec());
    assert!(listed.load_errors.is_empty(), "{:?}", listed.load_errors);
    for tool in &listed.tools {
        assert!(
            tool.digest.starts_with("sha256:") && tool.digest.len() == 71,
            "{tool:?}"
        );
        let schema: serde_json::Value = serde_json::from_str(&tool.input_schema_json).unwrap();
        assert_eq!(schema["type"], json!("object"), "{}", tool.name);
        assert!(!tool.description.is_empty());
        assert_eq!(tool.backend, pb::Backend::Wasi as i32);
    }
    daemon.shutdown().await;
}

#[tokio::test]
async fn broken_components_are_reported_and_skipped() {
    let mut daemon = TestDaemon::start_with(|config| {
        std::fs::write(config.tools_dir.join("garbage.wasm"), b"this is not wasm").unwrap();
        let good = std::fs::read(harness_tool_artifacts::tool_path("read_file")).unwrap();
        std::fs::write(
            config.tools_dir.join("truncated.wasm"),
            &good[..good.len() / 2],
        )
        .unwrap();
    })
    .await;
    let listed = daemon
        .client
        .list_tools(pb::ListToolsRequest {})
        .await
        .unwrap()
        .into_inner();
    let failed: Vec<String> = listed
        .load_errors
        .iter()
        .map(|e| {
            std::path::Path::new(&e.path)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(failed, vec!["garbage.wasm", "truncated.wasm"]);
    assert_eq!(
        listed.tools.len(),
        harness_tool_artifacts::STANDARD_TOOLS.len()
    );
    let id = daemon.create_session().await.session_id;
    daemon
        .invoke(&id, "1", "list_dir", json!({}))
        .await
        .ok_json();
    daemon.shutdown().await;
}

/// The component with a custom section appended: the same tool, new bytes.
fn with_custom_section(mut component: Vec<u8>) -> Vec<u8> {
    let name = b"harness-test";
    let payload = b"v2";
    component.push(0); // custom section id
    component.push((1 + name.len() + payload.len()) as u8);
    component.push(name.len() as u8);
    component.extend_from_slice(name);
    component.extend_from_slice(payload);
    component
}

#[tokio::test]
async fn removed_added_and_replaced_components_are_picked_up_without_restart() {
    let mut daemon =
        TestDaemon::start_with(|config| config.tools_rescan_interval = Duration::from_millis(100))
            .await;
    let digest_of = |tools: &[pb::Tool], name: &str| {
        tools
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.digest.clone())
    };
    let before = daemon
        .client
        .list_tools(pb::ListToolsRequest {})
        .await
        .unwrap()
        .into_inner()
        .tools;
    let old_write_digest = digest_of(&before, "write_file").unwrap();

    std::fs::remove_file(daemon.tools_dir().join("list_dir.wasm")).unwrap();
    std::fs::copy(
        harness_tool_artifacts::tool_path("list_dir"),
        daemon.tools_dir().join("ls_again.wasm"),
    )
    .unwrap();
    std::fs::remove_file(daemon.tools_dir().join("read_file.wasm")).unwrap();
    let replaced = with_custom_section(
        std::fs::read(harness_tool_artifacts::tool_path("write_file")).unwrap(),
    );
    std::fs::write(daemon.tools_dir().join("write_file.wasm"), &replaced).unwrap();

    let expected: Vec<&str> = harness_tool_artifacts::STANDARD_TOOLS
        .iter()
        .copied()
        .filter(|name| *name != "read_file")
        .collect();
    let mut tools = Vec::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        tools = daemon
            .client
            .list_tools(pb::ListToolsRequest {})
            .await
            .unwrap()
            .into_inner()
            .tools;
        let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
        if names == expected && digest_of(&tools, "write_file") != Some(old_write_digest.clone()) {
            break;
        }
    }
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, expected);
    let new_write_digest = digest_of(&tools, "write_file").unwrap();
    assert_ne!(
        new_write_digest, old_write_digest,
        "replaced component not reloaded"
    );
    let id = daemon.create_session().await.session_id;
    let missing = daemon
        .invoke(&id, "r", "read_file", json!({"path": "x"}))
        .await;
    assert_eq!(missing.error_kind(), pb::ErrorKind::NotFound);
    let written = daemon
        .invoke(&id, "w", "write_file", json!({"path": "x", "content": "y"}))
        .await;
    assert_eq!(written.started.unwrap().digest, new_write_digest);
    daemon.shutdown().await;
}

#[tokio::test]
async fn manifest_defaults_tighten_limits_and_a_bad_manifest_is_reported() {
    let mut daemon = TestDaemon::start_with_test_tools(|config| {
        std::fs::write(
            config.tools_dir.join("tools.toml"),
            "[tool.misbehave]\ntimeout = \"200ms\"\nmax-output-bytes = 10\n",
        )
        .unwrap();
    })
    .await;
    let id = daemon.create_session().await.session_id;
    let spun = daemon
        .invoke(&id, "s", "misbehave", json!({"action": "spin"}))
        .await;
    assert_eq!(spun.error_kind(), pb::ErrorKind::Timeout);
    assert!(
        spun.error().message.contains("200 ms"),
        "{}",
        spun.error().message
    );
    let flooded = daemon
        .invoke(
            &id,
            "f",
            "misbehave",
            json!({"action": "flood_stdout", "bytes": 100}),
        )
        .await;
    assert_eq!(flooded.stdout.len(), 10);
    assert!(flooded.truncated);

    std::fs::write(
        daemon.tools_dir().join("tools.toml"),
        "[tool.misbehave]\ntimeot = 1\n",
    )
    .unwrap();
    daemon.daemon.wasi.rescan().await;
    let listed = daemon
        .client
        .list_tools(pb::ListToolsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.load_errors.len(), 1, "{:?}", listed.load_errors);
    assert!(listed.load_errors[0].path.ends_with("tools.toml"));
    assert!(
        listed.load_errors[0].message.contains("timeot"),
        "{}",
        listed.load_errors[0].message
    );
    daemon.shutdown().await;
}
