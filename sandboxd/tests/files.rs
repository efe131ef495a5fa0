//! WriteFiles / ReadFiles.

use harness_proto::sandbox::v1 as pb;
use serde_json::json;

use crate::support::TestDaemon;

#[tokio::test]
async fn files_written_by_rpc_are_seen_by_tools_and_back() {
    let mut daemon = TestDaemon::start().await;
    let id = daemon.create_session().await.session_id;
    let written = daemon
        .client
        .write_files(pb::WriteFilesRequest {
            session_id: id.clone(),
            files: vec![pb::FileWrite {
                path: "in/data.txt".to_owned(),
                content: b"from the caller".to_vec(),
                mode: 0o600,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        written.written,
        vec![pb::FileWritten {
            path: "in/data.txt".to_owned(),
            bytes: 15
        }]
    );
    let read = daemon
        .invoke(&id, "r", "read_file", json!({"path": "in/data.txt"}))
        .await;
    assert_eq!(read.ok_json()["content"], json!("from the caller"));

    daemon
        .invoke(
            &id,
            "w",
            "write_file",
            json!({"path": "out.txt", "content": "from the tool"}),
        )
        .await
        .ok_json();
    let files = daemon
        .client
        .read_files(pb::ReadFilesRequest {
            session_id: id.clone(),
            paths: vec!["out.txt".to_owned()],
            max_bytes_per_file: 4,
        })
        .await
        .unwrap()
        .into_inner()
        .files;
    assert_eq!(
        files,
        vec![pb::FileContent {
            path: "out.txt".to_owned(),
            content: b"from".to_vec(),
            size: 13,
            truncated: true,
        }]
    );
    daemon.shutdown().await;
}

#[tokio::test]
async fn workspace_quota_applies_to_written_files() {
    let mut daemon = TestDaemon::start().await;
    let id = daemon
        .create_session_with(pb::SessionPolicy {
            workspace: Some(pb::WorkspacePolicy {
                size_limit_bytes: 10,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .session_id;
    let status = daemon
        .client
        .write_files(pb::WriteFilesRequest {
            session_id: id,
            files: vec![pb::FileWrite {
                path: "big".to_owned(),
                content: vec![0; 11],
                mode: 0,
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    daemon.shutdown().await;
}
