//! The event log as the loop and the API see it: the [`EventStore`] plus live
//! change notification, and the reader behind `StreamEvents`.
//!
//! Followers never receive in-memory copies of events. Each session has a
//! `watch` channel carrying its latest sequence number; a follower marks the
//! channel seen, reads everything after its cursor from the store, and only
//! then waits for a change. An append that lands between the read and the wait
//! still flips the channel, so nothing is missed, and since every event comes
//! from the store in `seq` order after the cursor, nothing is sent twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use futures::stream::BoxStream;
use harness_proto::control::v1::session_event::Kind;
use harness_proto::control::v1::{SessionEvent, SessionStatus};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::crash_hook;
use crate::store::{EventStore, NewEvent, StepRecord, StoreError};

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
    SessionGone(String),
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

type Watchers = Arc<Mutex<HashMap<String, watch::Sender<u64>>>>;

/// The event store with live notification of appends.
#[derive(Debug, Clone)]
pub struct EventLog {
    store: Arc<dyn EventStore>,
    watchers: Watchers,
    shutdown: watch::Receiver<bool>,
}

impl EventLog {
    /// Wraps `store`; followers end with [`FollowError::ShuttingDown`] once
    /// `shutdown` turns true.
    pub fn new(store: Arc<dyn EventStore>, shutdown: watch::Receiver<bool>) -> Self {
        Self {
            store,
            watchers: Arc::default(),
            shutdown,
        }
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// Appends an event durably, then wakes the session's followers.
    pub async fn append(
        &self,
        session_id: &str,
        turn: u32,
        kind: Kind,
    ) -> Result<SessionEvent, StoreError> {
        let mut events = self
            .append_batch(session_id, vec![NewEvent::new(turn, kind)], Vec::new())
            .await?;
        events
            .pop()
            .ok_or_else(|| StoreError::UnknownSession(session_id.to_owned()))
    }

    /// Appends events and step records durably in one transaction, then
    /// wakes the session's followers.
    pub async fn append_batch(
        &self,
        session_id: &str,
        events: Vec<NewEvent>,
        steps: Vec<StepRecord>,
    ) -> Result<Vec<SessionEvent>, StoreError> {
        let stored = self
            .store
            .append_events(session_id.to_owned(), events, steps)
            .await?;
        if let (Some(first), Some(last)) = (stored.first(), stored.last()) {
            crash_hook::events_committed(first.seq, last.seq);
            let watchers = self.watchers.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(sender) = watchers.get(session_id) {
                sender.send_replace(last.seq);
            }
        }
        Ok(stored)
    }

    /// Streams the session's events with `seq > after_seq` in order, then live
    /// events until `mode` says stop. The caller checks that the session
    /// exists and belongs to `tenant` first.
    pub fn follow(
        &self,
        tenant: &str,
        session_id: &str,
        after_seq: u64,
        mode: FollowMode,
    ) -> BoxStream<'static, Result<SessionEvent, FollowError>> {
        let (sender, receiver) = mpsc::channel(FOLLOWER_BUFFER);
        let follower = Follower {
            store: Arc::clone(&self.store),
            subscription: self.subscribe(session_id),
            shutdown: self.shutdown.clone(),
            tenant: tenant.to_owned(),
            session_id: session_id.to_owned(),
            cursor: after_seq,
            mode,
            sender,
        };
        tokio::spawn(follower.run());
        Box::pin(ReceiverStream::new(receiver))
    }

    fn subscribe(&self, session_id: &str) -> Subscription {
        let mut watchers = self.watchers.lock().unwrap_or_else(PoisonError::into_inner);
        let sender = watchers
            .entry(session_id.to_owned())
            .or_insert_with(|| watch::channel(0).0);
        Subscription {
            changes: sender.subscribe(),
            session_id: session_id.to_owned(),
            watchers: Arc::clone(&self.watchers),
        }
    }
}

/// A follower's view of one session's watch channel; the channel is dropped
/// with its last subscriber.
struct Subscription {
    changes: watch::Receiver<u64>,
    session_id: String,
    watchers: Watchers,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut watchers = self.watchers.lock().unwrap_or_else(PoisonError::into_inner);
        // Our own receiver is still alive here, so 1 means "only us".
        let only_us = watchers
            .get(&self.session_id)
            .is_some_and(|sender| sender.receiver_count() <= 1);
        if only_us {
            watchers.remove(&self.session_id);
        }
    }
}

struct Follower {
    store: Arc<dyn EventStore>,
    subscription: Subscription,
    shutdown: watch::Receiver<bool>,
    tenant: String,
    session_id: String,
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
        self.subscription.changes.borrow_and_update();
        let batch = self
            .store
            .read_events(self.session_id.clone(), self.cursor, READ_BATCH)
            .await?;
        if batch.is_empty() {
            return self.next_when_caught_up().await;
        }
        for event in batch {
            self.cursor = event.seq;
            let ends_stream = self.ends_stream(&event);
            if self.sender.send(Ok(event)).await.is_err() || ends_stream {
                return Ok(Next::Stop);
            }
        }
        Ok(Next::ReadAgain)
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

    fn ends_stream(&self, event: &SessionEvent) -> bool {
        match event.kind {
            Some(Kind::Finished(_)) => true,
            Some(Kind::WaitingForInput(_)) => self.mode == FollowMode::UntilIdle,
            _ => false,
        }
    }

    /// Waits for an append; false if the follower should stop instead.
    async fn wait_for_change(&mut self) -> bool {
        if *self.shutdown.borrow() {
            let _ = self.sender.send(Err(FollowError::ShuttingDown)).await;
            return false;
        }
        tokio::select! {
            changed = self.subscription.changes.changed() => changed.is_ok(),
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
    use harness_proto::control::v1::{ModelTextDelta, SessionFinished, SessionStarted};

    use super::*;
    use crate::store::{NewSession, SqliteStore};

    async fn log_with_session() -> (tempfile::TempDir, EventLog, watch::Sender<bool>) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("cp.db")).await.unwrap();
        store
            .create_session(NewSession {
                session_id: "s1".to_owned(),
                tenant: "default".to_owned(),
                agent: "demo".to_owned(),
                input: String::new(),
                metadata: HashMap::new(),
                budget: Default::default(),
                idempotency_key: None,
            })
            .await
            .unwrap();
        let (shutdown_sender, shutdown) = watch::channel(false);
        (
            dir,
            EventLog::new(Arc::new(store), shutdown),
            shutdown_sender,
        )
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
        log.append("s1", 0, Kind::Started(SessionStarted::default()))
            .await
            .unwrap();
        let early = log.follow("default", "s1", 0, FollowMode::UntilIdle);
        let writer = {
            let log = log.clone();
            tokio::spawn(async move {
                for i in 0..200 {
                    log.append("s1", 1, delta(i)).await.unwrap();
                    if i % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
                log.append("s1", 1, finished()).await.unwrap();
            })
        };
        // A second follower joins halfway through, resuming from seq 100.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let late = log.follow("default", "s1", 100, FollowMode::UntilIdle);
        let early: Vec<u64> = early.map(|e| e.unwrap().seq).collect().await;
        let late: Vec<u64> = late.map(|e| e.unwrap().seq).collect().await;
        writer.await.unwrap();
        assert_eq!(early, (1..=202).collect::<Vec<u64>>());
        assert_eq!(late, (101..=202).collect::<Vec<u64>>());
    }

    #[tokio::test]
    async fn following_a_finished_session_from_its_end_returns_nothing_and_ends() {
        let (_dir, log, _shutdown) = log_with_session().await;
        log.append("s1", 0, finished()).await.unwrap();
        let events: Vec<_> = log
            .follow("default", "s1", 1, FollowMode::UntilIdle)
            .collect()
            .await;
        assert_eq!(events.len(), 0);
    }

    #[tokio::test]
    async fn shutdown_ends_a_waiting_follower_with_a_reconnect_hint() {
        let (_dir, log, shutdown) = log_with_session().await;
        let mut stream = log.follow("default", "s1", 0, FollowMode::UntilIdle);
        shutdown.send_replace(true);
        let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(end, Err(FollowError::ShuttingDown)));
        assert!(stream.next().await.is_none());
    }

    #[tokio::test]
    async fn watch_channel_is_released_with_its_last_follower() {
        let (_dir, log, _shutdown) = log_with_session().await;
        let stream = log.follow("default", "s1", 0, FollowMode::UntilIdle);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(log.watchers.lock().unwrap().len(), 1);
        log.append("s1", 0, finished()).await.unwrap();
        let _: Vec<_> = stream.collect().await;
        // The follower task drops its subscription as it returns.
        for _ in 0..100 {
            if log.watchers.lock().unwrap().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(log.watchers.lock().unwrap().len(), 0);
    }
}
