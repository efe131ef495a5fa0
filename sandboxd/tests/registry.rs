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
    assert_eq!(names, vec!["list_dir", "read_file", "write_file"]);
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
    assert_eq!(listed.tools.len(), 3);
    let id = daemon.create_session().await.session_id;
    daemon
        .invoke(&id, "1", "list_dir", json!({}))
        .await
        .ok_json();
    daemon.shutdown().await;
}

#[tokio::test]
async fn removed_and_added_components_are_picked_up_without_restart() {
    let mut daemon =
        TestDaemon::start_with(|config| config.tools_rescan_interval = Duration::from_millis(100))
            .await;
    std::fs::remove_file(daemon.tools_dir().join("list_dir.wasm")).unwrap();
    std::fs::copy(
        harness_tool_artifacts::tool_path("list_dir"),
        daemon.tools_dir().join("ls_again.wasm"),
    )
    .unwrap();
    std::fs::remove_file(daemon.tools_dir().join("read_file.wasm")).unwrap();
    let mut names = Vec::new();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let listed = daemon
            .client
            .list_tools(pb::ListToolsRequest {})
            .await
            .unwrap()
            .into_inner();
        names = listed.tools.iter().map(|t| t.name.clone()).collect();
        if names == ["list_dir", "write_file"] && listed.tools[0].digest.starts_with("sha256:") {
            break;
        }
    }
    assert_eq!(names, vec!["list_dir", "write_file"]);
    let id = daemon.create_session().await.session_id;
    let missing = daemon
        .invoke(&id, "r", "read_file", json!({"path": "x"}))
        .await;
    assert_eq!(missing.error_kind(), pb::ErrorKind::NotFound);
    daemon.shutdown().await;
}
