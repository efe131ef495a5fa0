//! When to try a model call again: exponential backoff with full jitter,
//! overridden by the wait a provider asks for (`Retry-After`).

use std::time::{Duration, SystemTime};

use reqwest::header::HeaderMap;

/// Retry settings of one provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in total, including the first (at least 1).
    pub max_attempts: u32,
    /// Backoff ceiling before the first retry; doubles per retry.
    pub initial_backoff: Duration,
    /// Largest backoff ceiling.
    pub max_backoff: Duration,
    /// Longest `Retry-After` honoured; a provider asking for more fails the
    /// call at once with a clear error instead of stalling the session.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(20),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Wait this long, then try again.
    RetryAfter(Duration),
    /// The provider asked for a longer wait than allowed.
    WaitTooLong(Duration),
}

impl RetryPolicy {
    /// The wait before retry number `retry` (1 for the first retry). A wait
    /// the provider asked for is honoured exactly; otherwise the wait is
    /// drawn uniformly from zero to the backoff ceiling ("full jitter"), so
    /// many sessions failing together do not retry in lockstep.
    pub fn decide(&self, retry: u32, asked: Option<Duration>) -> RetryDecision {
        if let Some(asked) = asked {
            return if asked > self.max_retry_after {
                RetryDecision::WaitTooLong(asked)
            } else {
                RetryDecision::RetryAfter(asked)
            };
        }
        let ceiling = self.ceiling(retry);
        let jittered = ceiling.mul_f64(fastrand::f64());
        RetryDecision::RetryAfter(jittered)
    }

    /// The backoff ceiling before retry number `retry`.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(30);
        self.initial_backoff
            .saturating_mul(1_u32 << doublings)
            .min(self.max_backoff)
    }
}

/// The wait a response asks for: OpenAI's `retry-after-ms`, else
/// `Retry-After` as seconds or as an HTTP date.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let text = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    if let Some(millis) = text("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        return Duration::try_from_secs_f64(millis / 1000.0).ok();
    }
    let value = text("retry-after")?.trim();
    if let Ok(seconds) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(seconds).ok();
    }
    let date = httpdate::parse_http_date(value).ok()?;
    Some(date.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use reqwest::header::HeaderValue;

    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_ceiling_and_jitter_stays_below_it() {
        let policy = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            max_retry_after: Duration::from_secs(5),
        };
        let ceilings: Vec<u128> = (1..=5).map(|n| policy.ceiling(n).as_millis()).collect();
        assert_eq!(ceilings, [100, 200, 400, 500, 500]);
        for retry in 1..=5 {
            for _ in 0..50 {
                let RetryDecision::RetryAfter(wait) = policy.decide(retry, None) else {
                    unreachable!("no Retry-After given");
                };
                assert!(wait <= policy.ceiling(retry), "{wait:?}");
            }
        }
    }

    #[test]
    fn retry_after_is_honoured_up_to_the_limit() {
        let policy = RetryPolicy::default();
        assert_eq!(
            policy.decide(1, Some(Duration::from_secs(3))),
            RetryDecision::RetryAfter(Duration::from_secs(3))
        );
        assert_eq!(
            policy.decide(1, Some(Duration::from_secs(600))),
            RetryDecision::WaitTooLong(Duration::from_secs(600))
        );
    }

    #[test]
    fn retry_after_headers_parse_as_seconds_milliseconds_or_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, HeaderValue::from_str(value).unwrap());
            }
            map
        };
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2")]), now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(
                &headers(&[("retry-after", "2"), ("retry-after-ms", "250")]),
                now
            ),
            Some(Duration::from_millis(250))
        );
        let in_ten_seconds = httpdate::fmt_http_date(now + Duration::from_secs(10));
        assert_eq!(
            retry_after(&headers(&[("retry-after", &in_ten_seconds)]), now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")]), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }
}
