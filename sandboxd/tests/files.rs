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
            allow_missing: false,
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
            // sha256("from the tool"): the whole file, not the 4 bytes read.
            sha256: "7ac5ba94468d44337f385677e2a21bc217f5838147b6bf644a25eff650329ff4".to_owned(),
            missing: false,
        }]
    );
    daemon.shutdown().await;
}

#[tokio::test]
async fn a_missing_file_fails_the_read_unless_allowed() {
    let mut daemon = TestDaemon::start().await;
    let id = daemon.create_session().await.session_id;
    daemon
        .invoke(
            &id,
            "w",
            "write_file",
            json!({"path": "a.txt", "content": "a"}),
        )
        .await
        .ok_json();
    let request = |allow_missing| pb::ReadFilesRequest {
        session_id: id.clone(),
        paths: vec!["a.txt".to_owned(), "gone.txt".to_owned()],
        max_bytes_per_file: 0,
        allow_missing,
    };
    let refused = daemon.client.read_files(request(false)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::NotFound, "{refused:?}");
    let files = daemon
        .client
        .read_files(request(true))
        .await
        .unwrap()
        .into_inner()
        .files;
    assert_eq!(
        files,
        vec![
            pb::FileContent {
                path: "a.txt".to_owned(),
                content: b"a".to_vec(),
                size: 1,
                truncated: false,
                // sha256("a")
                sha256: "ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"
                    .to_owned(),
                missing: false,
            },
            pb::FileContent {
                path: "gone.txt".to_owned(),
                missing: true,
                ..Default::default()
            },
        ]
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

/// The cap holds for a WASI tool writing through its preopen, which never
/// passes through WriteFiles: the kernel (tmpfs) refuses the write.
#[tokio::test]
async fn wasi_tools_are_held_to_the_workspace_cap() {
    let mut daemon = TestDaemon::start().await;
    let cap = 64 << 10;
    let id = daemon
        .create_session_with(pb::SessionPolicy {
            workspace: Some(pb::WorkspacePolicy {
                size_limit_bytes: cap,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .session_id;
    let content = "x".repeat(40 << 10);
    let first = daemon
        .invoke(
            &id,
            "a",
            "write_file",
            json!({"path": "a", "content": content}),
        )
        .await;
    assert_eq!(first.ok_json()["bytes_written"], json!(40 << 10));
    let second = daemon
        .invoke(
            &id,
            "b",
            "write_file",
            json!({"path": "b", "content": content}),
        )
        .await;
    let error = second.error();
    assert_eq!(
        (
            second.error_kind(),
            error
                .message
                .ends_with("(the workspace is full: its size cap of 65536 bytes is reached)")
        ),
        (pb::ErrorKind::ResourceExhausted, true),
        "{error:?}"
    );
    daemon.assert_workspace_within(&id, cap);
    daemon.shutdown().await;
}
