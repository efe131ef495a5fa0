//! StreamEvents: resumable, gap-free, no duplicates.

use crate::support::{Sockets, TestPlane};

#[tokio::test]
async fn resuming_from_the_middle_returns_exactly_the_remaining_events() {
    let plane = TestPlane::start(Sockets::Tcp).await;
    let session = plane.start_session("demo", "").await.session.unwrap();
    let all = plane.events(&session.session_id, 0).await;
    let seqs: Vec<u64> = all.iter().map(|event| event.seq).collect();
    assert_eq!(seqs, (1..=31).collect::<Vec<u64>>());
    for after in [1, 12, 30, 31] {
        let rest = plane.events(&session.session_id, after).await;
        assert_eq!(
            rest,
            all[usize::try_from(after).unwrap()..],
            "after_seq {after}"
        );
    }
}

#[tokio::test]
async fn followers_attached_while_the_session_runs_see_the_same_log() {
    let plane = TestPlane::start(Sockets::Tcp).await;
    // Several followers race with the loop from the moment the session exists.
    let plane = &plane;
    let mut followers = Vec::new();
    for _ in 0..3 {
        let session = plane.start_session("demo", "shared").await.session.unwrap();
        followers.push(async move { plane.events(&session.session_id, 0).await });
    }
    let logs = futures::future::join_all(followers).await;
    let session_id = logs[0][0].session_id.clone();
    let stored = plane.events(&session_id, 0).await;
    for log in &logs {
        assert_eq!(log, &stored);
    }
    assert_eq!(stored.len(), 31);
}
