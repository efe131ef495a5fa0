//! Shutdown signals: SIGTERM (what service managers send) and SIGINT
//! (Ctrl-C) as one future.

use std::future::Future;

use tokio::signal::unix::{SignalKind, signal};

/// The signal that asked the daemon to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM.
    Terminate,
    /// SIGINT.
    Interrupt,
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Terminate => "SIGTERM",
            Self::Interrupt => "SIGINT",
        })
    }
}

/// Installs the SIGTERM and SIGINT handlers now (so a failure is reported
/// at start-up, not when a signal arrives) and returns a future that
/// resolves with the first of them. Needs a running tokio runtime.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = Signal> + Send + 'static> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(async move {
        let received = tokio::select! {
            _ = terminate.recv() => Signal::Terminate,
            _ = interrupt.recv() => Signal::Interrupt,
        };
        tracing::info!(signal = %received, "shutting down");
        received
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn sigterm_resolves_the_future() {
        let stopped = shutdown_signal().unwrap();
        // The handler is installed: raising SIGTERM no longer kills the process.
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGTERM).unwrap();
        let received = tokio::time::timeout(Duration::from_secs(10), stopped)
            .await
            .unwrap();
        assert_eq!(received, Signal::Terminate);
    }
}
