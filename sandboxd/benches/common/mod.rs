//! Shared by the sandboxd bench binaries: latency summaries, a gRPC
//! channel over a Unix socket, and the workspace-storage knob.

use std::path::PathBuf;
use std::time::Duration;

use tonic::transport::Channel;

/// The value at fraction `p` of `sorted`.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// Median and p99.
pub fn summary(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    (percentile(&samples, 0.5), percentile(&samples, 0.99))
}

/// A channel to a `unix:` endpoint.
pub async fn connect(endpoint: &str) -> Channel {
    let path = PathBuf::from(endpoint.strip_prefix("unix:").unwrap());
    tonic::transport::Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

/// `workspace-storage` from `BENCH_WORKSPACE_STORAGE` (`tmpfs` or
/// `directory`), else `default`: compares the two in one build.
pub fn workspace_storage(
    default: harness_sandboxd::config::WorkspaceStorage,
) -> harness_sandboxd::config::WorkspaceStorage {
    std::env::var("BENCH_WORKSPACE_STORAGE")
        .map(|storage| toml::Value::String(storage).try_into().unwrap())
        .unwrap_or(default)
}
