//! The event log as the loop and the API see it: the [`EventStore`] plus live
//! change notification, and the reader behind `StreamEvents`.
//!
//! Followers never receive in-memory copies of events. Appends are announced
//! on a [`ChangeFeed`] (in one process: a `watch` channel per followed
//! session); a follower marks its subscription seen, reads everything after
//! its cursor from the store, and only then waits for a change. An append
//! that lands between the read and the wait still wakes it, so nothing is
//! missed, and since every event comes from the store in `seq` order after
//! the cursor, nothing is sent twice (a spurious wake-up costs one read).

use std::sync::Arc;

use futures::stream::BoxStream;
use harness_proto::control::v1::session_event::Kind;
use harness_proto::control::v1::{SessionEvent, SessionStatus};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::crash_hook;
use crate::ids::{SessionId, TenantId};
use crate::store::{
    ChangeFeed, ChangeSubscription, EventStore, InProcessChangeFeed, NewEvent, StepRecord,
    StoreError,
};

/// Events read from the store per query while catching up.
const READ_BATCH: usize = 256;
/// Events buffered per follower before it waits for the client.
const FOLLOWER_BUFFER: usize = 64;

/// Why a follower stream ended early.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    /// Reading the log failed.
    #[error("reading the event log failed")]
    Store(#[from] StoreError),
    /// The session disappeared while being followed.
    #[error("session {0} no longer exists")]
    SessionGone(SessionId),
    /// The control plane is shutting down; the client should reconnect with
    /// the last sequence number it saw.
    #[error("the control plane is shutting down; reconnect with after_seq")]
    ShuttingDown,
}

/// Where a follower stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowMode {
    /// Stop at `finished` or `waiting_for_input`.
    UntilIdle,
    /// Stop only at `finished`.
    UntilFinished,
}

/// The event store with live notification of appends.
#[derive(Debug, Clone)]
pub struct EventLog {
    store: Arc<dyn EventStore>,
    changes: Arc<dyn ChangeFeed>,
    shutdown: watch::Receiver<bool>,
}

impl EventLog {
    /// Wraps `store`, announcing appends within this process; followers end
    /// with [`FollowError::ShuttingDown`] once `shutdown` turns true.
    pub fn new(store: Arc<dyn EventStore>, shutdown: watch::Receiver<bool>) -> Self {
        Self::with_change_feed(store, Arc::new(InProcessChangeFeed::new()), shutdown)
    }

    /// Wraps `store`, announcing appends and cancellations on `changes`
    /// (shared with other replicas, for one).
    pub fn with_change_feed(
        store: Arc<dyn EventStore>,
        changes: Arc<dyn ChangeFeed>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Self {
            store,
            changes,
            shutdown,
        }
    }

    /// Where changes to sessions are announced.
    pub fn change_feed(&self) -> &Arc<dyn ChangeFeed> {
        &self.changes
    }

    /// Records that the session is to be cancelled (see
    /// [`EventStore::request_cancel`]), then wakes whoever watches it.
    pub async fn request_cancel(
        &self,
        session_id: &SessionId,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.store
            .request_cancel(session_id.clone(), reason.to_owned())
            .await?;
        self.changes.notify(&[session_id]);
        Ok(())
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// Appends an event durably, then wakes the session's followers.
    pub async fn append(
        &self,
        session_id: &SessionId,
        turn: u32,
        kind: Kind,
    ) -> Result<SessionEvent, StoreError> {
        let mut events = self
            .append_batch(session_id, vec![NewEvent::new(turn, kind)], Vec::new())
            .await?;
        events
            .pop()
            .ok_or_else(|| StoreError::UnknownSession(session_id.clone()))
    }

    /// Appends events and step records durably in one transaction, then
    /// wakes the session's followers.
    pub async fn append_batch(
        &self,
        session_id: &SessionId,
        events: Vec<NewEvent>,
        steps: Vec<StepRecord>,
    ) -> Result<Vec<SessionEvent>, StoreError> {
        let stored = self
            .store
            .append_events(session_id.clone(), events, steps)
            .await?;
        if let (Some(first), Some(last)) = (stored.first(), stored.last()) {
            crash_hook::events_committed(first.seq, last.seq);
            self.changes.notify(&[session_id]);
        }
        Ok(stored)
    }

    /// Streams the session's events with `seq > after_seq` in order, then live
    /// events until `mode` says stop. The caller checks that the session
    /// exists and belongs to `tenant` first.
    pub fn follow(
        &self,
        tenant: &TenantId,
        session_id: &SessionId,
        after_seq: u64,
        mode: FollowMode,
    ) -> BoxStream<'static, Result<SessionEvent, FollowError>> {
        let (sender, receiver) = mpsc::channel(FOLLOWER_BUFFER);
        let follower = Follower {
            store: Arc::clone(&self.store),
            subscription: self.changes.subscribe(session_id),
            shutdown: self.shutdown.clone(),
            tenant: tenant.clone(),
            session_id: session_id.clone(),
            cursor: after_seq,
            mode,
            sender,
        };
        tokio::spawn(follower.run());
        Box::pin(ReceiverStream::new(receiver))
    }
}

struct Follower {
    store: Arc<dyn EventStore>,
    subscription: Box<dyn ChangeSubscription>,
    shutdown: watch::Receiver<bool>,
    tenant: TenantId,
    session_id: SessionId,
    cursor: u64,
    mode: FollowMode,
    sender: mpsc::Sender<Result<SessionEvent, FollowError>>,
}

/// What the follower does after a round of reading.
enum Next {
    ReadAgain,
    Wait,
    Stop,
}

impl Follower {
    async fn run(mut self) {
        loop {
            let next = match self.forward_new_events().await {
                Ok(next) => next,
                Err(error) => {
                    // The client may already be gone; nothing else to do then.
                    let _ = self.sender.send(Err(error)).await;
                    return;
                }
            };
            match next {
                Next::ReadAgain => {}
                Next::Stop => return,
                Next::Wait => {
                    if !self.wait_for_change().await {
                        return;
                    }
                }
            }
        }
    }

    /// Sends every stored event after the cursor and says what to do next.
    async fn forward_new_events(&mut self) -> Result<Next, FollowError> {
        self.subscription.mark_seen();
        let batch = self
            .store
            .read_events(self.session_id.clone(), self.cursor, READ_BATCH)
            .await?;
        if batch.is_empty() {
            return self.next_when_caught_up().await;
        }
        let full = batch.len() == READ_BATCH;
        let mut waits_for_input = false;
        for event in batch {
            self.cursor = event.seq;
            let ends_stream = self.ends_stream(&event);
            waits_for_input = matches!(event.kind, Some(Kind::WaitingForInput(_)));
            if self.sender.send(Ok(event)).await.is_err() || ends_stream {
                return Ok(Next::Stop);
            }
        }
        if full {
            return Ok(Next::ReadAgain);
        }
        if waits_for_input && self.mode == FollowMode::UntilIdle {
            // Only the session's status says whether this wait is the latest.
            return self.next_when_caught_up().await;
        }
        // The read saw everything committed before it, and the subscription
        // was marked seen before it: whatever commits later wakes us. Reading
        // again now would find nothing (one read and one status check per
        // wake-up, for nothing, under load most of a follower's cost).
        Ok(Next::Wait)
    }

    /// Nothing new in the log: stop if nothing more can come, otherwise wait.
    async fn next_when_caught_up(&self) -> Result<Next, FollowError> {
        let session = self
            .store
            .get_session(self.tenant.clone(), self.session_id.clone())
            .await?
            .ok_or_else(|| FollowError::SessionGone(self.session_id.clone()))?;
        let idle = match session.status {
            SessionStatus::Finished => true,
            SessionStatus::WaitingForInput => self.mode == FollowMode::UntilIdle,
            _ => false,
        };
        Ok(match (idle, session.last_seq > self.cursor) {
            // Appended between our read and this check: read it.
            (_, true) => Next::ReadAgain,
            (true, false) => Next::Stop,
            (false, false) => Next::Wait,
        })
    }

    /// `finished` ends every stream. A `waiting_for_input` does not end one
    /// by itself: a conversation has one per answer, and only the latest
    /// (the session waits now) ends an [`FollowMode::UntilIdle`] stream,
    /// which [`Self::next_when_caught_up`] sees from the session's status.
    fn ends_stream(&self, event: &SessionEvent) -> bool {
        matches!(event.kind, Some(Kind::Finished(_)))
    }

    /// Waits for an append; false if the follower should stop instead.
    async fn wait_for_change(&mut self) -> bool {
        if *self.shutdown.borrow() {
            let _ = self.sender.send(Err(FollowError::ShuttingDown)).await;
            return false;
        }
        tokio::select! {
            changed = self.subscription.changed() => changed.is_ok(),
            _ = self.shutdown.changed() => {
                let _ = self.sender.send(Err(FollowError::ShuttingDown)).await;
                false
            }
            () = self.sender.closed() => false,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use futures::StreamExt;
    use harness_proto::control::v1::{
        ModelTextDelta, SessionFinished, SessionStarted, UserMessage, WaitingForInput,
    };

    use std::collections::HashMap;

    use super::*;
    use crate::store::{NewSession, SqliteStore};

    /// The session every test follows.
    fn s1() -> SessionId {
        SessionId::new("s1")
    }

    /// Its tenant.
    fn tenant() -> TenantId {
        TenantId::new("default")
    }

    async fn log_with_session() -> (tempfile::TempDir, EventLog, watch::Sender<bool>) {
        let (dir, log, shutdown, _) = log_with_feed().await;
        (dir, log, shutdown)
    }

    async fn log_with_feed() -> (
        tempfile::TempDir,
        EventLog,
        watch::Sender<bool>,
        InProcessChangeFeed,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("cp.db")).await.unwrap();
        store
            .create_session(NewSession {
                session_id: s1(),
                tenant: tenant(),
                agent: "demo".to_owned(),
                input: String::new(),
                metadata: HashMap::new(),
                budget: Default::default(),
                idempotency_key: None,
                parent: None,
            })
            .await
            .unwrap();
        let (shutdown_sender, shutdown) = watch::channel(false);
        let feed = InProcessChangeFeed::new();
        let log = EventLog::with_change_feed(Arc::new(store), Arc::new(feed.clone()), shutdown);
        (dir, log, shutdown_sender, feed)
    }

    fn delta(i: usize) -> Kind {
        Kind::TextDelta(ModelTextDelta {
            text: i.to_string(),
        })
    }

    fn finished() -> Kind {
        Kind::Finished(SessionFinished::default())
    }

    #[tokio::test]
    async fn follower_sees_every_event_once_while_appends_race_with_it() {
        let (_dir, log, _shutdown) = log_with_session().await;
        log.append(&s1(), 0, Kind::Started(SessionStarted::default()))
            .await
            .unwrap();
        let early = log.follow(&tenant(), &s1(), 0, FollowMode::UntilIdle);
        let writer = {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..200 {
                    log.append(&s1(), 1, delta(i)).await.unwrap();
                    if i % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                log.append(&s1(), 1, finished()).await.unwrap();
            })
        };
        // A second follower joins halfway through, resuming from seq 100.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let late = log.follow(&tenant(), &s1(), 100, FollowMode::UntilIdle);
        let early: Vec<u64> = early.map(|e| e.unwrap().seq).collect().await;
        let late: Vec<u64> = late.map(|e| e.unwrap().seq).collect().await;
        writer.await.unwrap();
        assert_eq!(early, (1..=202).collect::<Vec<u64>>());
        assert_eq!(late, (101..=202).collect::<Vec<u64>>());
    }

    #[tokio::test]
    async fn a_stream_without_follow_reads_past_earlier_waits_and_ends_at_the_latest() {
        let (_dir, log, _shutdown) = log_with_session().await;
        let waiting = || Kind::WaitingForInput(WaitingForInput::default());
        log.append(&s1(), 0, Kind::Started(SessionStarted::default()))
            .await
            .unwrap();
        log.append(&s1(), 1, waiting()).await.unwrap();
        let message = UserMessage {
            text: "more".to_owned(),
            idempotency_key: String::new(),
            reply_to_seq: 2,
            truncated: None,
        };
        log.append(&s1(), 1, Kind::UserMessage(message))
            .await
            .unwrap();
        log.append(&s1(), 2, delta(0)).await.unwrap();
        log.append(&s1(), 2, waiting()).await.unwrap();
        let seqs: Vec<u64> = log
            .follow(&tenant(), &s1(), 0, FollowMode::UntilIdle)
            .map(|event| event.unwrap().seq)
            .collect()
            .await;
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn following_a_finished_session_from_its_end_returns_nothing_and_ends() {
        let (_dir, log, _shutdown) = log_with_session().await;
        log.append(&s1(), 0, finished()).await.unwrap();
        let events: Vec<_> = log
            .follow(&tenant(), &s1(), 1, FollowMode::UntilIdle)
            .collect()
            .await;
        assert_eq!(events.len(), 0);
    }

    #[tokio::test]
    async fn shutdown_ends_a_waiting_follower_with_a_reconnect_hint() {
        let (_dir, log, shutdown) = log_with_session().await;
        let mut stream = log.follow(&tenant(), &s1(), 0, FollowMode::UntilIdle);
        shutdown.send_replace(true);
        let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(end, Err(FollowError::ShuttingDown)));
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn a_session_is_unwatched_once_its_last_follower_ends() {
        let (_dir, log, _shutdown, feed) = log_with_feed().await;
        let stream = log.follow(&tenant(), &s1(), 0, FollowMode::UntilIdle);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(feed.watched_sessions(), 1);
        log.append(&s1(), 0, finished()).await.unwrap();
        let _: Vec<_> = stream.collect().await;
        // The follower task drops its subscription as it returns.
        for _ in 0..100 {
            if feed.watched_sessions() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(feed.watched_sessions(), 0);
    }

    #[tokio::test]
    async fn a_recorded_cancellation_wakes_the_sessions_watchers() {
        let (_dir, log, _shutdown, feed) = log_with_feed().await;
        let mut watcher = feed.subscribe(&s1());
        watcher.mark_seen();
        log.request_cancel(&s1(), "enough").await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), watcher.changed())
            .await
            .unwrap()
            .unwrap();
        let session = log
            .store()
            .get_session(tenant(), s1())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(session.cancel_reason.as_deref(), Some("enough"));
    }
}
