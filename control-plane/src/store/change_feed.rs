//! Hints that "something changed in session X", for whoever waits on a
//! session: followers of its log (`StreamEvents`, a loop waiting for an
//! approval's resolution), and later a loop watching for its cancellation.
//!
//! A hint carries no data and may be spurious or coalesced: a woken reader
//! always re-reads the store, and a reader marks its subscription seen
//! *before* it reads, so a change committed between its read and its wait
//! still wakes it. Writers notify only after their write committed.
//!
//! [`InProcessChangeFeed`] serves one process (one control-plane replica).
//! Several replicas sharing PostgreSQL plug a `LISTEN/NOTIFY` feed in here:
//! `notify` issues `NOTIFY` on a per-session (or hashed) channel after the
//! commit, or the append's transaction issues it so delivery follows the
//! commit; `subscribe` `LISTEN`s on one shared connection and wakes local
//! subscribers as notifications arrive. Notifications can be lost (a
//! dropped connection), so that feed also wakes every subscriber when it
//! reconnects and after a polling interval; readers re-read anyway.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::ids::SessionId;

/// Where changes to sessions are announced and awaited.
pub trait ChangeFeed: Send + Sync + std::fmt::Debug {
    /// Starts watching `session_id`: every [`ChangeFeed::notify`] of it
    /// from now on wakes the subscription.
    fn subscribe(&self, session_id: &SessionId) -> Box<dyn ChangeSubscription>;

    /// Wakes every subscriber of these sessions. Call it after the change
    /// is committed; it never blocks.
    fn notify(&self, session_ids: &[&SessionId]);
}

/// One reader's interest in one session.
pub trait ChangeSubscription: Send + Sync {
    /// Forgets the changes so far; call it before reading the store, so
    /// that [`ChangeSubscription::changed`] waits only for later ones.
    fn mark_seen(&mut self);

    /// Resolves once a change was notified since the last
    /// [`ChangeSubscription::mark_seen`] (at once if one already was).
    fn changed(&mut self) -> BoxFuture<'_, Result<(), FeedClosed>>;
}

/// The feed is gone; no change will be announced any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the change feed has closed")]
pub struct FeedClosed;

type Watchers = Arc<Mutex<HashMap<SessionId, watch::Sender<()>>>>;

/// The [`ChangeFeed`] of one process: a `watch` channel per watched
/// session, dropped with its last subscriber.
#[derive(Debug, Default, Clone)]
pub struct InProcessChangeFeed {
    watchers: Watchers,
}

impl InProcessChangeFeed {
    /// A feed with no subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many sessions have subscribers.
    pub fn watched_sessions(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, watch::Sender<()>>> {
        self.watchers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ChangeFeed for InProcessChangeFeed {
    fn subscribe(&self, session_id: &SessionId) -> Box<dyn ChangeSubscription> {
        let mut watchers = self.lock();
        let sender = watchers
            .entry(session_id.clone())
            .or_insert_with(|| watch::channel(()).0);
        Box::new(InProcessSubscription {
            changes: sender.subscribe(),
            session_id: session_id.clone(),
            watchers: Arc::clone(&self.watchers),
        })
    }

    fn notify(&self, session_ids: &[&SessionId]) {
        let watchers = self.lock();
        for session_id in session_ids {
            if let Some(sender) = watchers.get(*session_id) {
                sender.send_replace(());
            }
        }
    }
}

/// A subscriber's receiver of one session's watch channel.
struct InProcessSubscription {
    changes: watch::Receiver<()>,
    session_id: SessionId,
    watchers: Watchers,
}

impl ChangeSubscription for InProcessSubscription {
    fn mark_seen(&mut self) {
        self.changes.borrow_and_update();
    }

    fn changed(&mut self) -> BoxFuture<'_, Result<(), FeedClosed>> {
        Box::pin(async move { self.changes.changed().await.map_err(|_| FeedClosed) })
    }
}

impl Drop for InProcessSubscription {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use super::*;

    fn id(session_id: &str) -> SessionId {
        SessionId::new(session_id)
    }

    /// True if `subscription` has a change waiting (without waiting for one).
    async fn woken(subscription: &mut Box<dyn ChangeSubscription>) -> bool {
        tokio::time::timeout(Duration::from_millis(20), subscription.changed())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_notify_wakes_the_subscribers_of_its_sessions_only() {
        let feed = InProcessChangeFeed::new();
        let mut first = feed.subscribe(&id("s1"));
        let mut second = feed.subscribe(&id("s1"));
        let mut other = feed.subscribe(&id("s2"));
        feed.notify(&[&id("s1"), &id("unwatched")]);
        assert_eq!(
            (
                woken(&mut first).await,
                woken(&mut second).await,
                woken(&mut other).await
            ),
            (true, true, false)
        );
    }

    #[tokio::test]
    async fn a_change_before_the_wait_is_not_missed_and_marking_seen_forgets_it() {
        let feed = InProcessChangeFeed::new();
        let mut subscription = feed.subscribe(&id("s1"));
        subscription.mark_seen();
        // Notified between the reader's read and its wait.
        feed.notify(&[&id("s1")]);
        assert!(woken(&mut subscription).await);
        feed.notify(&[&id("s1")]);
        subscription.mark_seen();
        assert!(!woken(&mut subscription).await);
    }

    #[tokio::test]
    async fn a_session_is_unwatched_once_its_last_subscriber_is_dropped() {
        let feed = InProcessChangeFeed::new();
        let first = feed.subscribe(&id("s1"));
        let second = feed.subscribe(&id("s1"));
        let _other = feed.subscribe(&id("s2"));
        assert_eq!(feed.watched_sessions(), 2);
        drop(first);
        assert_eq!(feed.watched_sessions(), 2);
        drop(second);
        assert_eq!(feed.watched_sessions(), 1);
    }
}
