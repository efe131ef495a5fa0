//! A test hook: kill this process at a chosen point, to test crash recovery
//! deterministically.
//!
//! Set `HARNESS_CRASH_AT` before starting the control plane:
//!
//! | value | the process kills itself with SIGKILL … |
//! |---|---|
//! | `after-event:<seq>` | right after the write holding event `<seq>` (of any session) committed |
//! | `after-invoke-sent:<n>` | once sandboxd acknowledged this process's `<n>`th `Invoke` (it runs; its result is not read) |
//! | `after-model-response:<n>` | once the `<n>`th model response of this process started streaming, before anything of it is recorded |
//!
//! It is SIGKILL, not a panic or an exit: nothing is flushed, no destructor
//! runs, exactly like the OOM killer or a power switch (minus the disk). The
//! hook costs one atomic load per check when unset. Unknown values
//! are logged and ignored. Never set it in production.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The environment variable read once, at first use.
pub const CRASH_AT_VARIABLE: &str = "HARNESS_CRASH_AT";

/// Where to crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashPoint {
    /// After the write holding event `seq` committed.
    AfterEvent(u64),
    /// Once the nth `Invoke` was acknowledged by sandboxd.
    AfterInvokeSent(u64),
    /// Once the nth model response started.
    AfterModelResponse(u64),
}

impl CrashPoint {
    /// Parses a `HARNESS_CRASH_AT` value.
    pub fn parse(value: &str) -> Option<Self> {
        let (point, number) = value.trim().split_once(':')?;
        let number: u64 = number.parse().ok()?;
        match point {
            "after-event" => Some(Self::AfterEvent(number)),
            "after-invoke-sent" => Some(Self::AfterInvokeSent(number)),
            "after-model-response" => Some(Self::AfterModelResponse(number)),
            _ => None,
        }
    }
}

static CONFIGURED: OnceLock<Option<CrashPoint>> = OnceLock::new();
static INVOKES: AtomicU64 = AtomicU64::new(0);
static MODEL_RESPONSES: AtomicU64 = AtomicU64::new(0);

fn configured() -> Option<CrashPoint> {
    *CONFIGURED.get_or_init(|| {
        let value = std::env::var(CRASH_AT_VARIABLE).ok()?;
        let point = CrashPoint::parse(&value);
        match point {
            Some(point) => tracing::warn!(?point, "crash test hook armed"),
            None => tracing::error!(value, "ignoring unknown {CRASH_AT_VARIABLE} value"),
        }
        point
    })
}

fn crash(point: CrashPoint) {
    tracing::warn!(?point, "crash test hook reached: SIGKILL");
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    // Not reached: SIGKILL cannot be caught.
    std::process::abort();
}

/// Events `first..=last` were committed.
pub fn events_committed(first: u64, last: u64) {
    if let Some(point @ CrashPoint::AfterEvent(seq)) = configured()
        && (first..=last).contains(&seq)
    {
        crash(point);
    }
}

/// sandboxd acknowledged an `Invoke`.
pub fn invoke_acknowledged() {
    if let Some(point @ CrashPoint::AfterInvokeSent(n)) = configured()
        && INVOKES.fetch_add(1, Ordering::Relaxed) + 1 == n
    {
        crash(point);
    }
}

/// A model response started streaming.
pub fn model_response_started() {
    if let Some(point @ CrashPoint::AfterModelResponse(n)) = configured()
        && MODEL_RESPONSES.fetch_add(1, Ordering::Relaxed) + 1 == n
    {
        crash(point);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_into_points() {
        assert_eq!(
            CrashPoint::parse("after-event:17"),
            Some(CrashPoint::AfterEvent(17))
        );
        assert_eq!(
            CrashPoint::parse("after-invoke-sent:2"),
            Some(CrashPoint::AfterInvokeSent(2))
        );
        assert_eq!(
            CrashPoint::parse("after-model-response:1"),
            Some(CrashPoint::AfterModelResponse(1))
        );
        assert_eq!(CrashPoint::parse("after-event:x"), None);
        assert_eq!(CrashPoint::parse("somewhere:1"), None);
    }
}
