//! Capped capture of a guest's stdout or stderr.
//!
//! Everything the guest writes is accepted (so a chatty tool is never blocked
//! or trapped for writing), the first `cap` bytes are kept, and the total is
//! counted, so memory stays bounded however much is written and the caller
//! can mark the output as truncated.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

#[derive(Debug, Default)]
struct Captured {
    kept: Vec<u8>,
    total: u64,
}

/// A stdout/stderr sink that keeps at most `cap` bytes.
#[derive(Debug, Clone)]
pub struct CappedOutput {
    cap: usize,
    inner: Arc<Mutex<Captured>>,
}

/// What a [`CappedOutput`] captured.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CapturedOutput {
    /// The kept prefix.
    pub bytes: Vec<u8>,
    /// Total bytes written, kept or not.
    pub total: u64,
}

impl CapturedOutput {
    /// True if bytes were dropped.
    pub fn truncated(&self) -> bool {
        self.total > self.bytes.len() as u64
    }
}

impl CappedOutput {
    /// A sink keeping at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            inner: Arc::new(Mutex::new(Captured::default())),
        }
    }

    /// Takes what was captured so far.
    pub fn take(&self) -> CapturedOutput {
        let mut captured = self.lock();
        CapturedOutput {
            bytes: std::mem::take(&mut captured.kept),
            total: captured.total,
        }
    }

    fn accept(&self, buf: &[u8]) {
        let mut captured = self.lock();
        captured.total += buf.len() as u64;
        let room = self.cap.saturating_sub(captured.kept.len());
        let keep = room.min(buf.len());
        captured.kept.extend_from_slice(&buf[..keep]);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Captured> {
        // A poisoned lock only means a writer panicked mid-append; the bytes
        // are still a valid prefix.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl IsTerminal for CappedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for CappedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.accept(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_prefix_and_counts_everything() {
        let out = CappedOutput::new(4);
        out.accept(b"abc");
        out.accept(b"defgh");
        let captured = out.take();
        assert_eq!(
            captured,
            CapturedOutput {
                bytes: b"abcd".to_vec(),
                total: 8
            }
        );
        assert!(captured.truncated());
    }
}
