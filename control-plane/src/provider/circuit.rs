//! A circuit breaker per provider endpoint: after repeated consecutive
//! failures it stops sending requests for a cool-down, then lets one trial
//! request through; success closes it again.
//!
//! Shared by every session using the endpoint, so a provider outage turns
//! into fast, explained failures (and retries after the cool-down) instead of
//! every session hammering it.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Breaker settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failed attempts that open the breaker (at least 1).
    pub failure_threshold: u32,
    /// How long it stays open before a trial request.
    pub cooldown: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cooldown: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// A trial request is in flight; everyone else waits for its outcome.
    HalfOpen,
}

/// The breaker of one provider endpoint.
#[derive(Debug)]
pub struct CircuitBreaker {
    settings: BreakerSettings,
    state: Mutex<State>,
}

impl CircuitBreaker {
    /// A closed breaker.
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    /// May a request go out now? `Err(wait)` says how long until one may.
    pub fn admit(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match *state {
            State::Closed { .. } => Ok(()),
            State::Open { until } if now >= until => {
                *state = State::HalfOpen;
                Ok(())
            }
            State::Open { until } => Err(until - now),
            // The trial's outcome decides; check back shortly.
            State::HalfOpen => Err(self.settings.cooldown.min(Duration::from_secs(1))),
        }
    }

    /// A request succeeded: close the breaker.
    pub fn record_success(&self) {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = State::Closed { failures: 0 };
    }

    /// A request failed in a way that says the provider is in trouble.
    pub fn record_failure(&self, now: Instant) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let open = State::Open {
            until: now + self.settings.cooldown,
        };
        *state = match *state {
            State::Closed { failures }
                if failures + 1 >= self.settings.failure_threshold.max(1) =>
            {
                open
            }
            State::Closed { failures } => State::Closed {
                failures: failures + 1,
            },
            State::HalfOpen | State::Open { .. } => open,
        };
    }

    /// True if requests are currently refused.
    pub fn is_open(&self, now: Instant) -> bool {
        self.admit_peek(now).is_err()
    }

    fn admit_peek(&self, now: Instant) -> Result<(), Duration> {
        match *self.state.lock().unwrap_or_else(PoisonError::into_inner) {
            State::Closed { .. } => Ok(()),
            State::Open { until } if now >= until => Ok(()),
            State::Open { until } => Err(until - now),
            State::HalfOpen => Err(Duration::ZERO),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_then_lets_one_trial_through_after_the_cooldown() {
        let breaker = CircuitBreaker::new(BreakerSettings {
            failure_threshold: 3,
            cooldown: Duration::from_secs(10),
        });
        let start = Instant::now();
        breaker.record_failure(start);
        breaker.record_failure(start);
        assert_eq!(breaker.admit(start), Ok(()));
        breaker.record_failure(start);
        assert_eq!(breaker.admit(start), Err(Duration::from_secs(10)));
        assert_eq!(
            breaker.admit(start + Duration::from_secs(4)),
            Err(Duration::from_secs(6))
        );
        // After the cool-down exactly one trial goes out.
        let later = start + Duration::from_secs(10);
        assert_eq!(breaker.admit(later), Ok(()));
        assert!(breaker.admit(later).is_err());
        // A failed trial opens it again; a successful one closes it.
        breaker.record_failure(later);
        assert_eq!(breaker.admit(later), Err(Duration::from_secs(10)));
        let much_later = later + Duration::from_secs(10);
        assert_eq!(breaker.admit(much_later), Ok(()));
        breaker.record_success();
        assert_eq!(breaker.admit(much_later), Ok(()));
        assert!(!breaker.is_open(much_later));
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let breaker = CircuitBreaker::new(BreakerSettings {
            failure_threshold: 2,
            cooldown: Duration::from_secs(1),
        });
        let now = Instant::now();
        breaker.record_failure(now);
        breaker.record_success();
        breaker.record_failure(now);
        assert_eq!(breaker.admit(now), Ok(()));
    }
}
