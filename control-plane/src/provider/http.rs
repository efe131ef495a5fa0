//! The streaming HTTP client both network providers run on: one POST per
//! attempt, server-sent events parsed by a [`WireFormat`], retries with
//! backoff and jitter (honouring `Retry-After`), timeouts for the response
//! headers and between chunks, and the endpoint's [`CircuitBreaker`].
//!
//! A retry after part of the answer was streamed does not deliver that part
//! twice: a [`DeltaFilter`] swallows the repeated prefix.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::circuit::{BreakerSettings, CircuitBreaker};
use super::retry::{RetryDecision, RetryPolicy, retry_after};
use super::sse::{SseEvent, SseParser};
use super::{
    CompletedTurn, DeltaFilter, ModelProvider, ModelRequest, ModelStream, ModelStreamEvent,
    ProviderError,
};

/// Longest error body kept for an error message.
const MAX_ERROR_BODY: usize = 2000;

/// Timeouts, retries and breaker settings of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpSettings {
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
    /// Longest wait for the response headers (the model's time to first byte).
    pub response_timeout: Duration,
    /// Longest silence between two chunks of a stream.
    pub idle_timeout: Duration,
    /// Retries.
    pub retry: RetryPolicy,
    /// Circuit breaker.
    pub breaker: BreakerSettings,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(120),
            retry: RetryPolicy::default(),
            breaker: BreakerSettings::default(),
        }
    }
}

/// A model API's wire format: request bodies and stream parsing.
pub trait WireFormat: Send + Sync + std::fmt::Debug + 'static {
    /// Short provider name for messages ("openai", "anthropic").
    fn name(&self) -> &'static str;
    /// The URL to POST to, given the configured base URL.
    fn url(&self, base_url: &str) -> String;
    /// Headers carrying the credential and API version.
    fn headers(&self, api_key: Option<&str>) -> Vec<(HeaderName, String)>;
    /// The JSON request body.
    fn body(&self, request: &ModelRequest) -> Result<Vec<u8>, serde_json::Error>;
    /// A parser for one response stream.
    fn parser(&self) -> Box<dyn TurnParser>;

    /// The completed turn as the loop gets it (a format may move parts of
    /// its answer into place, e.g. a structured answer given as a tool call).
    fn complete(&self, _request: &ModelRequest, turn: CompletedTurn) -> CompletedTurn {
        turn
    }
    /// The error message inside an error response body, if it has one.
    fn error_message(&self, body: &str) -> Option<String> {
        let value: serde_json::Value = serde_json::from_str(body).ok()?;
        value["error"]["message"].as_str().map(str::to_owned)
    }
}

/// What a stream event meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Nothing to pass on (metadata, pings, tool-call pieces).
    Nothing,
    /// A fragment of assistant text.
    Text(String),
    /// The stream is complete.
    Done,
}

/// Assembles one streamed turn, event by event.
pub trait TurnParser: Send {
    /// Handles one event. Errors name what was malformed or what the provider
    /// reported; the endpoint is added by the caller.
    fn event(&mut self, event: &SseEvent) -> Result<Parsed, StreamProblem>;
    /// The completed turn, once the stream has ended.
    fn finish(self: Box<Self>) -> Result<CompletedTurn, StreamProblem>;
}

/// A problem with a stream, before the endpoint is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamProblem {
    /// Not the expected format.
    Malformed(String),
    /// The provider reported an error event.
    ProviderError {
        /// The error type.
        kind: String,
        /// The message.
        message: String,
    },
    /// The stream ended before the turn did.
    Incomplete,
}

/// A network model provider: one endpoint (base URL + key) of a wire format.
#[derive(Debug, Clone)]
pub struct HttpProvider {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    format: Box<dyn WireFormat>,
    client: reqwest::Client,
    url: String,
    endpoint: String,
    headers: HeaderMap,
    settings: HttpSettings,
    breaker: CircuitBreaker,
}

/// Why an HTTP provider could not be built.
#[derive(Debug, thiserror::Error)]
pub enum HttpProviderError {
    /// The HTTP client could not be created (TLS set-up).
    #[error("cannot create the HTTP client for {endpoint}")]
    Client {
        /// Provider and base URL.
        endpoint: String,
        /// The error.
        #[source]
        source: reqwest::Error,
    },
    /// The API key is not a valid header value.
    #[error("the API key for {endpoint} contains characters not allowed in an HTTP header")]
    BadKey {
        /// Provider and base URL.
        endpoint: String,
    },
}

impl HttpProvider {
    /// A provider for `base_url` speaking `format`, with its own breaker.
    pub fn new(
        format: Box<dyn WireFormat>,
        base_url: &str,
        api_key: Option<&str>,
        settings: HttpSettings,
    ) -> Result<Self, HttpProviderError> {
        let endpoint = format!("{} {}", format.name(), base_url);
        let client = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .tcp_nodelay(true)
            .build()
            .map_err(|source| HttpProviderError::Client {
                endpoint: endpoint.clone(),
                source,
            })?;
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            reqwest::header::ACCEPT,
            HeaderValue::from_static("text/event-stream"),
        );
        for (name, value) in format.headers(api_key) {
            let mut value =
                HeaderValue::from_str(&value).map_err(|_| HttpProviderError::BadKey {
                    endpoint: endpoint.clone(),
                })?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        Ok(Self {
            inner: Arc::new(Inner {
                url: format.url(base_url),
                format,
                client,
                endpoint,
                headers,
                settings,
                breaker: CircuitBreaker::new(settings.breaker),
            }),
        })
    }

    /// "provider base-url", as errors name it.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }
}

type Sender = mpsc::Sender<Result<ModelStreamEvent, ProviderError>>;

/// Why an attempt stopped.
enum AttemptEnd {
    Failed(ProviderError),
    /// The consumer dropped the stream (the session was cancelled).
    Abandoned,
}

impl ModelProvider for HttpProvider {
    fn endpoint(&self) -> String {
        self.inner.endpoint.clone()
    }

    fn stream_turn(&self, request: ModelRequest) -> ModelStream {
        let (sender, receiver) = mpsc::channel(64);
        let inner = Arc::clone(&self.inner);
        tokio::spawn(async move {
            let closed = sender.clone();
            tokio::select! {
                () = inner.call(request, sender) => {}
                // Stop network work as soon as nobody listens.
                () = closed.closed() => {}
            }
        });
        Box::pin(ReceiverStream::new(receiver))
    }
}

impl Inner {
    async fn call(&self, request: ModelRequest, sender: Sender) {
        let body = match self.format.body(&request) {
            Ok(body) => body,
            Err(source) => {
                let error = ProviderError::Encode {
                    endpoint: self.endpoint.clone(),
                    source,
                };
                let _ = sender.send(Err(error)).await;
                return;
            }
        };
        let mut filter = DeltaFilter::default();
        let max_attempts = self.settings.retry.max_attempts.max(1);
        let mut attempt = 0;
        loop {
            attempt += 1;
            filter.restart();
            let error = match self.attempt(&body, &mut filter, &sender).await {
                Ok(completed) => {
                    self.breaker.record_success();
                    let completed = self.format.complete(&request, completed);
                    let _ = sender
                        .send(Ok(ModelStreamEvent::Completed(completed)))
                        .await;
                    return;
                }
                Err(AttemptEnd::Abandoned) => return,
                Err(AttemptEnd::Failed(error)) => error,
            };
            if !matches!(error, ProviderError::CircuitOpen { .. }) && error.is_retryable() {
                self.breaker.record_failure(Instant::now());
            }
            let final_error = if !error.is_retryable() {
                Some(error)
            } else if attempt >= max_attempts {
                Some(ProviderError::RetriesExhausted {
                    endpoint: self.endpoint.clone(),
                    attempts: attempt,
                    last: Box::new(error),
                })
            } else {
                match self.settings.retry.decide(attempt, error.retry_after()) {
                    RetryDecision::RetryAfter(wait) => {
                        tracing::warn!(
                            endpoint = self.endpoint,
                            attempt,
                            wait_ms = wait.as_millis(),
                            error = %crate::error_report::error_chain(&error),
                            "model call failed; retrying"
                        );
                        tokio::time::sleep(wait).await;
                        None
                    }
                    RetryDecision::WaitTooLong(retry_after) => {
                        Some(ProviderError::RetryAfterTooLong {
                            endpoint: self.endpoint.clone(),
                            retry_after,
                            limit: self.settings.retry.max_retry_after,
                        })
                    }
                }
            };
            if let Some(error) = final_error {
                let _ = sender.send(Err(error)).await;
                return;
            }
        }
    }

    async fn attempt(
        &self,
        body: &[u8],
        filter: &mut DeltaFilter,
        sender: &Sender,
    ) -> Result<CompletedTurn, AttemptEnd> {
        let failed = AttemptEnd::Failed;
        self.breaker.admit(Instant::now()).map_err(|retry_in| {
            failed(ProviderError::CircuitOpen {
                endpoint: self.endpoint.clone(),
                retry_in,
            })
        })?;
        let send = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .body(body.to_vec())
            .send();
        let response = tokio::time::timeout(self.settings.response_timeout, send)
            .await
            .map_err(|_| failed(self.timeout("response headers", self.settings.response_timeout)))?
            .map_err(|source| {
                failed(ProviderError::Connect {
                    endpoint: self.endpoint.clone(),
                    source,
                })
            })?;
        let status = response.status();
        if !status.is_success() {
            return Err(failed(self.status_error(response).await));
        }
        let mut chunks = response.bytes_stream();
        let mut sse = SseParser::new();
        let mut parser = self.format.parser();
        let idle = self.settings.idle_timeout;
        loop {
            let chunk = tokio::time::timeout(idle, chunks.next())
                .await
                .map_err(|_| failed(self.timeout("the next stream chunk", idle)))?;
            let (events, ended) = match chunk {
                Some(Ok(bytes)) => (sse.feed(&bytes), false),
                Some(Err(source)) => {
                    return Err(failed(ProviderError::Body {
                        endpoint: self.endpoint.clone(),
                        source,
                    }));
                }
                None => (sse.finish().into_iter().collect(), true),
            };
            for event in &events {
                match parser.event(event).map_err(|p| failed(self.problem(p)))? {
                    Parsed::Nothing => {}
                    Parsed::Text(text) => {
                        if let Some(new) = filter.feed(&text) {
                            sender
                                .send(Ok(ModelStreamEvent::TextDelta(new)))
                                .await
                                .map_err(|_| AttemptEnd::Abandoned)?;
                        }
                    }
                    Parsed::Done => {
                        return parser.finish().map_err(|p| failed(self.problem(p)));
                    }
                }
            }
            if ended {
                // The connection closed: the turn is complete only if the
                // parser saw its end (some servers omit the final marker).
                return parser.finish().map_err(|p| failed(self.problem(p)));
            }
        }
    }

    fn timeout(&self, phase: &'static str, waited: Duration) -> ProviderError {
        ProviderError::Timeout {
            endpoint: self.endpoint.clone(),
            phase,
            waited,
        }
    }

    fn problem(&self, problem: StreamProblem) -> ProviderError {
        match problem {
            StreamProblem::Malformed(problem) => ProviderError::Malformed {
                endpoint: self.endpoint.clone(),
                problem,
            },
            StreamProblem::ProviderError { kind, message } => ProviderError::StreamError {
                endpoint: self.endpoint.clone(),
                kind,
                message,
            },
            StreamProblem::Incomplete => ProviderError::Incomplete,
        }
    }

    async fn status_error(&self, response: reqwest::Response) -> ProviderError {
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers(), SystemTime::now());
        let body = tokio::time::timeout(self.settings.idle_timeout, response.text())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let message = self
            .format
            .error_message(&body)
            .unwrap_or_else(|| body.chars().take(MAX_ERROR_BODY).collect());
        ProviderError::Status {
            endpoint: self.endpoint.clone(),
            status,
            message,
            retry_after,
        }
    }
}

/// Parses `data` as JSON, or says what was malformed.
pub fn parse_json(data: &str) -> Result<serde_json::Value, StreamProblem> {
    serde_json::from_str(data).map_err(|error| {
        let shown: String = data.chars().take(200).collect();
        StreamProblem::Malformed(format!("{error} in {shown:?}"))
    })
}
