//! Fake model provider servers for tests: an HTTP/1.1 server on loopback that
//! speaks the OpenAI Chat Completions streaming format or the Anthropic
//! Messages streaming format, answers from a script, and injects faults on
//! request.
//!
//! The server is written against the wire formats, not against the
//! control plane's client code, so the client is tested against an
//! independent implementation.
//!
//! Which scripted turn a request gets is derived from the request itself: the
//! number of assistant messages already in its conversation. The server keeps
//! no conversation state, so a client that crashes and re-sends a request gets
//! the same answer — what a deterministic model would do.
//!
//! Reported usage follows the request: input tokens are a quarter of the body's
//! bytes, and a simulated prompt cache (see `cache`) reports cache reads and
//! writes the way each provider does for the request's layout.
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! use harness_fake_model::{FakeModel, FakeTurn, Fault, WireFormat};
//! let model = FakeModel::start(
//!     WireFormat::OpenAi,
//!     vec![
//!         FakeTurn::text("Let me look.").with_call("read_file", r#"{"path":"a.txt"}"#),
//!         FakeTurn::text("Done."),
//!     ],
//! )
//! .await?;
//! model.push_fault(Fault::Status { code: 429, retry_after: Some("1".to_owned()) });
//! let base_url = model.base_url(); // http://127.0.0.1:<port>/v1
//! # Ok(()) }
//! ```

mod anthropic;
mod cache;
mod openai;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

/// The wire format a fake server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireFormat {
    /// `POST /v1/chat/completions` with `stream: true` (OpenAI and compatibles).
    OpenAi,
    /// `POST /v1/messages` with `stream: true` (Anthropic).
    Anthropic,
}

/// How a scripted turn ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FakeStop {
    /// `end_turn`/`stop`, or `tool_use`/`tool_calls` when the turn has calls.
    #[default]
    Natural,
    /// The output-token limit was hit (`max_tokens` / `length`).
    MaxTokens,
    /// Anthropic's `pause_turn` (a long turn paused; the client continues it).
    PauseTurn,
}

/// One tool call of a scripted turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeToolCall {
    /// Tool name.
    pub name: String,
    /// Arguments as raw JSON text, streamed in pieces; may be malformed on purpose.
    pub arguments: String,
}

/// One scripted assistant turn.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FakeTurn {
    /// Assistant text, streamed in pieces.
    pub text: String,
    /// Tool calls, in order.
    pub tool_calls: Vec<FakeToolCall>,
    /// How the turn ends.
    pub stop: FakeStop,
    /// Prompt tokens reported as read from the cache.
    pub cached_input_tokens: u64,
}

impl FakeTurn {
    /// A turn saying `text`.
    pub fn text(text: &str) -> Self {
        Self {
            text: text.to_owned(),
            ..Self::default()
        }
    }

    /// Adds a tool call with raw JSON `arguments`.
    pub fn with_call(mut self, name: &str, arguments: &str) -> Self {
        self.tool_calls.push(FakeToolCall {
            name: name.to_owned(),
            arguments: arguments.to_owned(),
        });
        self
    }

    /// Sets how the turn ends.
    pub fn stopping(mut self, stop: FakeStop) -> Self {
        self.stop = stop;
        self
    }

    /// Reports `tokens` prompt tokens as cache reads.
    pub fn with_cached_tokens(mut self, tokens: u64) -> Self {
        self.cached_input_tokens = tokens;
        self
    }
}

/// A fault applied to the next request (faults queue up, one per request).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this HTTP status and an error body instead of a stream,
    /// with a `Retry-After` header if given (seconds or an HTTP date).
    Status {
        /// The status code, e.g. 429 or 503.
        code: u16,
        /// The `Retry-After` value.
        retry_after: Option<String>,
    },
    /// Send this many SSE events, then reset the connection.
    DisconnectAfter {
        /// Events sent before the reset.
        events: usize,
    },
    /// After this many events, send a `data:` line that is not JSON.
    MalformedEvent {
        /// Events sent before the malformed one.
        after: usize,
    },
    /// After this many events, send the format's in-stream error event and end
    /// the stream (Anthropic `event: error` with `overloaded_error`; OpenAI a
    /// `data: {"error": ...}` chunk).
    StreamError {
        /// Events sent before the error.
        after: usize,
    },
}

/// How responses are streamed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamShape {
    /// Characters of assistant text per delta event.
    pub text_chunk_chars: usize,
    /// Characters of tool-call arguments per delta event.
    pub argument_chunk_chars: usize,
    /// OpenAI only: interleave the argument pieces of parallel calls
    /// (as some compatible servers do) instead of sending calls one by one.
    pub interleave_tool_calls: bool,
    /// Pause before the response headers (model latency).
    pub first_byte_delay: Duration,
    /// Pause between events (a slow stream).
    pub event_delay: Duration,
}

impl Default for StreamShape {
    fn default() -> Self {
        Self {
            text_chunk_chars: 8,
            argument_chunk_chars: 7,
            interleave_tool_calls: false,
            first_byte_delay: Duration::ZERO,
            event_delay: Duration::ZERO,
        }
    }
}

/// A request the server received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// Request path, e.g. `/v1/chat/completions`.
    pub path: String,
    /// The `Authorization` header (OpenAI) or `x-api-key` (Anthropic), if any.
    pub credential: Option<String>,
    /// The `anthropic-version` header, if any.
    pub anthropic_version: Option<String>,
    /// The JSON body.
    pub body: Value,
}

#[derive(Debug)]
struct State {
    format: WireFormat,
    script: Vec<FakeTurn>,
    faults: Mutex<VecDeque<Fault>>,
    requests: Mutex<Vec<RecordedRequest>>,
    shape: Mutex<StreamShape>,
    cache: Mutex<cache::PromptCache>,
    caching: std::sync::atomic::AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A running fake server; stops accepting connections when dropped.
#[derive(Debug)]
pub struct FakeModel {
    address: SocketAddr,
    state: Arc<State>,
    accept: JoinHandle<()>,
}

impl Drop for FakeModel {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl FakeModel {
    /// Starts a server on `127.0.0.1:0` answering from `script`.
    pub async fn start(format: WireFormat, script: Vec<FakeTurn>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let address = listener.local_addr()?;
        let state = Arc::new(State {
            format,
            script,
            faults: Mutex::default(),
            requests: Mutex::default(),
            shape: Mutex::new(StreamShape::default()),
            cache: Mutex::default(),
            caching: std::sync::atomic::AtomicBool::new(true),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&state)));
        Ok(Self {
            address,
            state,
            accept,
        })
    }

    /// The base URL a client is configured with: `http://127.0.0.1:<port>/v1`
    /// for OpenAI (clients append `/chat/completions`) and
    /// `http://127.0.0.1:<port>` for Anthropic (clients append `/v1/messages`).
    pub fn base_url(&self) -> String {
        match self.state.format {
            WireFormat::OpenAi => format!("http://{}/v1", self.address),
            WireFormat::Anthropic => format!("http://{}", self.address),
        }
    }

    /// Queues a fault for the next request that has none yet.
    pub fn push_fault(&self, fault: Fault) {
        lock(&self.state.faults).push_back(fault);
    }

    /// Changes how responses are streamed from now on.
    pub fn set_shape(&self, shape: StreamShape) {
        *lock(&self.state.shape) = shape;
    }

    /// Turns the simulated prompt cache on (the default) or off. Tests that
    /// run several sessions against one server and compare their recorded
    /// usage turn it off: a cache warmed by an earlier session changes the
    /// cache reads a later one is told of.
    pub fn set_prompt_cache(&self, on: bool) {
        self.state
            .caching
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state.requests).clone()
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(state, request).await) }
            });
            // A reset injected by a fault ends the connection with an error.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

fn full(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

fn error_body(format: WireFormat, kind: &str, message: &str) -> String {
    match format {
        WireFormat::OpenAi => serde_json::json!({
            "error": {"message": message, "type": kind, "param": null, "code": null}
        }),
        WireFormat::Anthropic => serde_json::json!({
            "type": "error",
            "error": {"type": kind, "message": message}
        }),
    }
    .to_string()
}

fn header(request: &Request<Incoming>, name: &str) -> Option<String> {
    request
        .headers()
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

async fn handle(state: Arc<State>, request: Request<Incoming>) -> Response<Body> {
    let format = state.format;
    let path = request.uri().path().to_owned();
    let expected_path = match format {
        WireFormat::OpenAi => "/v1/chat/completions",
        WireFormat::Anthropic => "/v1/messages",
    };
    if request.method() != hyper::Method::POST || path != expected_path {
        return full(
            StatusCode::NOT_FOUND,
            error_body(format, "not_found_error", &format!("no route {path}")),
        );
    }
    let credential = match format {
        WireFormat::OpenAi => header(&request, "authorization"),
        WireFormat::Anthropic => header(&request, "x-api-key"),
    };
    let anthropic_version = header(&request, "anthropic-version");
    let bytes = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            return full(
                StatusCode::BAD_REQUEST,
                error_body(format, "invalid_request_error", &error.to_string()),
            );
        }
    };
    let body: Value = match serde_json::from_slice(&bytes) {
        Ok(body) => body,
        Err(error) => {
            return full(
                StatusCode::BAD_REQUEST,
                error_body(
                    format,
                    "invalid_request_error",
                    &format!("body is not JSON: {error}"),
                ),
            );
        }
    };
    let assistant_messages = body["messages"].as_array().map_or(0, |messages| {
        messages
            .iter()
            .filter(|message| message["role"] == "assistant")
            .count()
    });
    lock(&state.requests).push(RecordedRequest {
        path,
        credential,
        anthropic_version,
        body: body.clone(),
    });
    let fault = lock(&state.faults).pop_front();
    let shape = *lock(&state.shape);
    if let Some(Fault::Status { code, retry_after }) = &fault {
        tokio::time::sleep(shape.first_byte_delay).await;
        let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let kind = if *code == 429 {
            "rate_limit_error"
        } else {
            "api_error"
        };
        let mut response = full(
            status,
            error_body(format, kind, &format!("injected status {code}")),
        );
        if let Some(value) = retry_after
            .as_deref()
            .and_then(|value| hyper::header::HeaderValue::from_str(value).ok())
        {
            response
                .headers_mut()
                .insert(hyper::header::RETRY_AFTER, value);
        }
        return response;
    }
    let Some(turn) = state.script.get(assistant_messages) else {
        return full(
            StatusCode::BAD_REQUEST,
            error_body(
                format,
                "invalid_request_error",
                &format!(
                    "fake model script has {} turns; request has {assistant_messages} assistant messages",
                    state.script.len()
                ),
            ),
        );
    };
    let turn_number = assistant_messages + 1;
    let input_tokens = u64::try_from(bytes.len().div_ceil(4)).unwrap_or(u64::MAX);
    let cached = if state.caching.load(std::sync::atomic::Ordering::SeqCst) {
        lock(&state.cache).serve(format, &body)
    } else {
        cache::CacheUse::default()
    };
    // A turn scripted with cache reads reports those instead.
    let (cache_read, cache_write) = if turn.cached_input_tokens > 0 {
        (turn.cached_input_tokens, 0)
    } else {
        (cached.read, cached.written)
    };
    let usage = Usage {
        input_tokens,
        output_tokens: output_tokens(turn),
        cached_input_tokens: cache_read.min(input_tokens),
        cache_write_tokens: cache_write.min(input_tokens - cache_read.min(input_tokens)),
    };
    let model = body["model"].as_str().unwrap_or("fake").to_owned();
    let events = match format {
        WireFormat::OpenAi => openai::events(turn_number, turn, &model, usage, &shape),
        WireFormat::Anthropic => anthropic::events(turn_number, turn, &model, usage, &shape),
    };
    tokio::time::sleep(shape.first_byte_delay).await;
    stream_response(format, events, fault, shape.event_delay)
}

/// Token counts the fake reports for a turn.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Usage {
    /// All prompt tokens (a quarter of the request body's bytes).
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
    /// Prompt tokens read from the cache (part of `input_tokens`).
    pub cached_input_tokens: u64,
    /// Prompt tokens written to the cache (part of `input_tokens`;
    /// Anthropic only).
    pub cache_write_tokens: u64,
}

fn output_tokens(turn: &FakeTurn) -> u64 {
    let chars = turn.text.chars().count()
        + turn
            .tool_calls
            .iter()
            .map(|call| call.name.len() + call.arguments.chars().count())
            .sum::<usize>();
    u64::try_from(chars.div_ceil(4)).unwrap_or(u64::MAX)
}

/// Splits `text` into pieces of at most `size` characters (at least one piece
/// for empty text only if `keep_empty`).
pub(crate) fn pieces(text: &str, size: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks(size.max(1))
        .map(|chunk| chunk.iter().collect())
        .collect()
}

/// An SSE frame with a `data:` line and an optional `event:` line.
pub(crate) fn frame(event: Option<&str>, data: &str) -> String {
    match event {
        Some(event) => format!("event: {event}\ndata: {data}\n\n"),
        None => format!("data: {data}\n\n"),
    }
}

fn stream_response(
    format: WireFormat,
    events: Vec<String>,
    fault: Option<Fault>,
    event_delay: Duration,
) -> Response<Body> {
    let (sender, receiver) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(16);
    tokio::spawn(async move {
        for (index, event) in events.into_iter().enumerate() {
            match &fault {
                Some(Fault::DisconnectAfter { events }) if *events == index => {
                    let reset = std::io::Error::new(
                        std::io::ErrorKind::ConnectionReset,
                        "injected connection reset",
                    );
                    let _ = sender.send(Err(reset)).await;
                    return;
                }
                Some(Fault::MalformedEvent { after }) if *after == index => {
                    let garbage = frame(None, "{\"choices\": [ this is not json");
                    if sender
                        .send(Ok(Frame::data(Bytes::from(garbage))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Some(Fault::StreamError { after }) if *after == index => {
                    let error = match format {
                        WireFormat::OpenAi => frame(
                            None,
                            &error_body(format, "server_error", "injected mid-stream error"),
                        ),
                        WireFormat::Anthropic => frame(
                            Some("error"),
                            &error_body(format, "overloaded_error", "Overloaded"),
                        ),
                    };
                    let _ = sender.send(Ok(Frame::data(Bytes::from(error)))).await;
                    return;
                }
                _ => {}
            }
            if !event_delay.is_zero() && index > 0 {
                tokio::time::sleep(event_delay).await;
            }
            if sender
                .send(Ok(Frame::data(Bytes::from(event))))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let body = StreamBody::new(ReceiverStream::new(receiver)).boxed();
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_split_by_characters() {
        assert_eq!(pieces("héllo wörld", 4), ["héll", "o wö", "rld"]);
        assert_eq!(pieces("", 4), Vec::<String>::new());
    }
}
