//! Tools and file rpcs cannot reach outside the session workspace.

use harness_proto::sandbox::v1 as pb;
use serde_json::json;

use crate::support::TestDaemon;

/// A marker that would only appear if a host file leaked.
fn host_passwd_first_line() -> String {
    std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn read_file_refuses_parent_absolute_and_symlink_escapes() {
    let mut daemon = TestDaemon::start().await;
    let id = daemon.create_session().await.session_id;
    std::os::unix::fs::symlink("/etc", daemon.workspace_of(&id).join("etc_link")).unwrap();
    std::os::unix::fs::symlink("/", daemon.workspace_of(&id).join("root_link")).unwrap();
    let leak = host_passwd_first_line();
    for (n, path) in [
        "../../etc/passwd",
        "/etc/passwd",
        "etc_link/passwd",
        "root_link/etc/passwd",
        "/workspace/../etc/passwd",
    ]
    .into_iter()
    .enumerate()
    {
        let invoked = daemon
            .invoke(
                &id,
                &format!("esc{n}"),
                "read_file",
                json!({ "path": path }),
            )
            .await;
        let error = invoked.error();
        let kind = pb::ErrorKind::try_from(error.kind).unwrap();
        assert!(
            matches!(kind, pb::ErrorKind::Denied | pb::ErrorKind::NotFound),
            "{path}: {error:?}"
        );
        let everything = format!(
            "{error:?}{}{}",
            String::from_utf8_lossy(&invoked.stdout),
            String::from_utf8_lossy(&invoked.stderr)
        );
        assert!(!everything.contains(&leak), "{path} leaked host content");
    }
    daemon.shutdown().await;
}

#[tokio::test]
async fn write_file_through_a_symlink_touches_no_host_file() {
    let mut daemon = TestDaemon::start().await;
    let id = daemon.create_session().await.session_id;
    let outside = daemon.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, daemon.workspace_of(&id).join("out")).unwrap();
    let invoked = daemon
        .invoke(
            &id,
            "w",
            "write_file",
            json!({"path": "out/planted.txt", "content": "x"}),
        )
        .await;
    assert_eq!(
        invoked.error_kind(),
        pb::ErrorKind::Denied,
        "{:?}",
        invoked.error()
    );
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "a file was written outside the workspace"
    );
    daemon.shutdown().await;
}

#[tokio::test]
async fn file_rpcs_refuse_escapes() {
    let mut daemon = TestDaemon::start().await;
    let id = daemon.create_session().await.session_id;
    std::os::unix::fs::symlink("/etc", daemon.workspace_of(&id).join("etc_link")).unwrap();
    for path in ["../../etc/passwd", "/etc/passwd", "etc_link/passwd"] {
        let status = daemon
            .client
            .read_files(pb::ReadFilesRequest {
                session_id: id.clone(),
                paths: vec![path.to_owned()],
                max_bytes_per_file: 0,
                allow_missing: false,
            })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "{path}: {status:?}"
        );
        let write = daemon
            .client
            .write_files(pb::WriteFilesRequest {
                session_id: id.clone(),
                files: vec![pb::FileWrite {
                    path: path.to_owned(),
                    content: b"x".to_vec(),
                    mode: 0,
                }],
            })
            .await
            .unwrap_err();
        assert_eq!(
            write.code(),
            tonic::Code::PermissionDenied,
            "{path}: {write:?}"
        );
    }
    daemon.shutdown().await;
}
