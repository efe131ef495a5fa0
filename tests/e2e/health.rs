//! Both daemons answer the standard gRPC health check.

use harness_e2e::{Cluster, demo_agents_dir, health};

#[tokio::test]
async fn both_daemons_answer_the_health_check_and_stop_cleanly() {
    let cluster = Cluster::start(&demo_agents_dir()).await.unwrap();
    assert!(
        health(&cluster.sandboxd_endpoint).await.unwrap(),
        "sandboxd not SERVING"
    );
    assert!(
        health(&cluster.control_endpoint).await.unwrap(),
        "control-plane not SERVING"
    );
    let (control, sandboxd) = cluster.stop().await.unwrap();
    assert!(
        control.success() && sandboxd.success(),
        "exit statuses: {control}, {sandboxd}"
    );
}
