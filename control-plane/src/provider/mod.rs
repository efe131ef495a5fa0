//! Model providers: what the agent loop asks for the next assistant turn.
//!
//! A provider receives the whole conversation plus the tool definitions and
//! answers with a stream: zero or more text deltas, then exactly one
//! [`CompletedTurn`] (full text, tool calls, token usage, stop reason).
//!
//! - [`scripted`]: deterministic replies from a file (tests, offline demo).
//! - [`openai`]: OpenAI-compatible Chat Completions (OpenAI, vLLM, Ollama,
//!   llama.cpp, LiteLLM).
//! - [`anthropic`]: Anthropic Messages.
//!
//! Both network providers run on [`http::HttpProvider`], which owns retries
//! (backoff with jitter, `Retry-After`), timeouts and the per-provider
//! [`circuit::CircuitBreaker`]; the wire formats only build request bodies and
//! parse [`sse`] events.
//!
//! Stop reasons are normalised to one vocabulary: `end_turn`, `tool_use`,
//! `max_tokens`, `pause_turn` (Anthropic paused a long turn; the loop
//! continues it), and whatever else a provider says, passed through.

pub mod anthropic;
pub mod circuit;
pub mod config;
pub mod factory;
pub mod http;
pub mod openai;
pub mod retry;
pub mod scripted;
pub mod sse;

use std::sync::Arc;

use futures::stream::BoxStream;
use serde::Deserialize;

/// The model provider an agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Replies read from a script file (tests, offline demo).
    Scripted,
    /// OpenAI-compatible Chat Completions.
    Openai,
    /// Anthropic Messages.
    Anthropic,
}

impl ProviderKind {
    /// The name used in agent files and in `ListAgents`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scripted => "scripted",
            Self::Openai => "openai",
            Self::Anthropic => "anthropic",
        }
    }
}

/// One entry of the conversation sent to the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// The agent's system prompt.
    System {
        /// Prompt text.
        text: String,
    },
    /// A user message.
    User {
        /// Message text.
        text: String,
    },
    /// An earlier assistant turn.
    Assistant {
        /// What the model said.
        text: String,
        /// The tool calls it asked for.
        tool_calls: Vec<ToolCall>,
    },
    /// The result of one tool call, answering an assistant's [`ToolCall`].
    ToolResult {
        /// The call this answers.
        call_id: String,
        /// The tool that ran.
        tool: String,
        /// Output JSON on success, an error explanation otherwise.
        content: String,
        /// True if `content` explains an error.
        is_error: bool,
    },
}

/// A tool call the model asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolCall {
    /// Id unique in the session, echoed in the tool result.
    pub call_id: String,
    /// Tool name.
    pub tool: String,
    /// Arguments as JSON text, exactly as the model produced them.
    pub arguments_json: String,
}

/// A tool the model may call, as described to it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolDefinition {
    /// Tool name.
    pub name: String,
    /// What the tool does, written for a model.
    pub description: String,
    /// JSON Schema of the tool's input.
    pub input_schema: serde_json::Value,
}

/// Everything a provider needs for one model call.
#[derive(Debug, Clone)]
pub struct ModelRequest {
    /// Model name from the agent definition.
    pub model: String,
    /// The conversation so far, oldest first (shared, not copied, per call).
    pub messages: Arc<Vec<Message>>,
    /// Tools the model may call, in a stable order.
    pub tools: Arc<Vec<ToolDefinition>>,
    /// Most tokens the model may generate in this call; `None` leaves it to
    /// the provider (Anthropic requires a value and gets a default).
    pub max_output_tokens: Option<u32>,
    /// The JSON Schema the final answer must match (structured output):
    /// OpenAI-compatible servers get it as `response_format`, Anthropic as
    /// a [`FINAL_ANSWER_TOOL`] it must end with. The completed turn carries
    /// the answer as its text either way.
    pub output_schema: Option<Arc<serde_json::Value>>,
    /// Where prompt caches may end a cached prefix (Anthropic) and the
    /// cache key (OpenAI-compatible), from [`crate::prompt`].
    pub cache: crate::prompt::CacheLayout,
    /// Assistant turns compaction removed from `messages` over the session's
    /// life (the scripted provider counts them to find its next turn).
    pub summarised_turns: u32,
}

/// The tool an Anthropic model gives a structured final answer through; its
/// input becomes the turn's text and it is never dispatched.
pub const FINAL_ANSWER_TOOL: &str = "final_answer";

/// Token counts of one model call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
    /// Prompt tokens served from the provider's cache.
    pub cached_input_tokens: u64,
    /// Prompt tokens written to the provider's cache (part of
    /// `input_tokens`; Anthropic reports them, OpenAI does not).
    pub cache_write_tokens: u64,
}

/// The end result of one model call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedTurn {
    /// The full assistant text (the concatenation of all deltas).
    pub text: String,
    /// Tool calls requested, in the model's order.
    pub tool_calls: Vec<ToolCall>,
    /// Token usage.
    pub usage: TokenUsage,
    /// The provider's stop reason, e.g. `"end_turn"` or `"tool_use"`.
    pub stop_reason: String,
}

/// Normalised stop reason: the model finished its answer.
pub const STOP_END_TURN: &str = "end_turn";
/// Normalised stop reason: the model asked for tool calls.
pub const STOP_TOOL_USE: &str = "tool_use";
/// Normalised stop reason: the output-token limit cut the turn short.
pub const STOP_MAX_TOKENS: &str = "max_tokens";
/// Normalised stop reason: the provider paused a long turn; sending the
/// conversation back (with this turn in it) continues it.
pub const STOP_PAUSE_TURN: &str = "pause_turn";

/// One item of a provider's response stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelStreamEvent {
    /// A fragment of assistant text.
    TextDelta(String),
    /// The turn is complete; always the last item.
    Completed(CompletedTurn),
}

/// A provider's response: deltas, then one [`ModelStreamEvent::Completed`].
pub type ModelStream = BoxStream<'static, Result<ModelStreamEvent, ProviderError>>;

/// A source of assistant turns.
pub trait ModelProvider: Send + Sync + std::fmt::Debug {
    /// Starts one model call. Errors are delivered through the stream.
    fn stream_turn(&self, request: ModelRequest) -> ModelStream;

    /// Where model calls go, for the session record and logs, e.g.
    /// `"openai http://127.0.0.1:8000/v1"`. Providers answering inside this
    /// process (tests) keep the default.
    fn endpoint(&self) -> String {
        "in-process".to_owned()
    }
}

/// Why a model call failed.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The scripted provider was asked for more turns than its script holds.
    #[error("script exhausted after {turns} turns ({script})")]
    ScriptExhausted {
        /// Turns in the script.
        turns: usize,
        /// The script file.
        script: String,
    },
    /// The stream ended without a completed turn.
    #[error("the model response ended before the turn was complete")]
    Incomplete,
    /// The request body could not be built.
    #[error("cannot encode the request for {endpoint}")]
    Encode {
        /// Provider and base URL.
        endpoint: String,
        /// The encoding error.
        #[source]
        source: serde_json::Error,
    },
    /// The request could not be sent or its response headers not read
    /// (connection refused or reset, DNS, TLS).
    #[error("cannot reach {endpoint}")]
    Connect {
        /// Provider and base URL.
        endpoint: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The provider took too long.
    #[error("{endpoint} sent nothing for {}s while waiting for {phase}", waited.as_secs_f64())]
    Timeout {
        /// Provider and base URL.
        endpoint: String,
        /// What was awaited: "response headers" or "the next stream chunk".
        phase: &'static str,
        /// How long we waited.
        waited: std::time::Duration,
    },
    /// The provider answered with an HTTP error status.
    #[error("{endpoint} answered HTTP {status}: {message}")]
    Status {
        /// Provider and base URL.
        endpoint: String,
        /// The HTTP status code.
        status: u16,
        /// The error message from the body (or the body itself).
        message: String,
        /// The wait the provider asked for (`Retry-After`, `retry-after-ms`).
        retry_after: Option<std::time::Duration>,
    },
    /// Reading the response stream failed (connection reset mid-stream).
    #[error("the response stream from {endpoint} broke off")]
    Body {
        /// Provider and base URL.
        endpoint: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The stream carried something that is not the expected format.
    #[error("malformed stream event from {endpoint}: {problem}")]
    Malformed {
        /// Provider and base URL.
        endpoint: String,
        /// What was wrong, with the offending text.
        problem: String,
    },
    /// The provider reported an error inside the stream.
    #[error("{endpoint} reported an error mid-stream ({kind}): {message}")]
    StreamError {
        /// Provider and base URL.
        endpoint: String,
        /// The provider's error type, e.g. "overloaded_error".
        kind: String,
        /// Its message.
        message: String,
    },
    /// The provider's circuit breaker is open after repeated failures.
    #[error("circuit breaker for {endpoint} is open after repeated failures; next try in {}s", retry_in.as_secs_f64())]
    CircuitOpen {
        /// Provider and base URL.
        endpoint: String,
        /// When the breaker lets a trial request through.
        retry_in: std::time::Duration,
    },
    /// The provider asked to wait longer than the configured maximum.
    #[error("{endpoint} asked to retry after {}s, more than max-retry-after ({}s)", retry_after.as_secs_f64(), limit.as_secs_f64())]
    RetryAfterTooLong {
        /// Provider and base URL.
        endpoint: String,
        /// The wait asked for.
        retry_after: std::time::Duration,
        /// The configured maximum.
        limit: std::time::Duration,
    },
    /// Every attempt failed; the last failure is the source.
    #[error("model call to {endpoint} failed after {attempts} attempts")]
    RetriesExhausted {
        /// Provider and base URL.
        endpoint: String,
        /// Attempts made.
        attempts: u32,
        /// The last attempt's failure.
        #[source]
        last: Box<ProviderError>,
    },
}

impl ProviderError {
    /// True if trying the same request again may succeed: network trouble,
    /// timeouts, rate limits, server errors, broken or malformed streams.
    /// Client errors (bad request, auth, unknown model) are final.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Connect { .. }
            | Self::Timeout { .. }
            | Self::Body { .. }
            | Self::Malformed { .. }
            | Self::Incomplete
            | Self::CircuitOpen { .. } => true,
            Self::Status { status, .. } => matches!(status, 408 | 409 | 429 | 500..=599),
            Self::StreamError { kind, .. } => {
                !kind.contains("invalid_request")
                    && !kind.contains("authentication")
                    && !kind.contains("permission")
                    && !kind.contains("not_found")
            }
            Self::ScriptExhausted { .. }
            | Self::Encode { .. }
            | Self::RetryAfterTooLong { .. }
            | Self::RetriesExhausted { .. } => false,
        }
    }

    /// The wait the provider asked for before the next attempt, if any.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            Self::CircuitOpen { retry_in, .. } => Some(*retry_in),
            _ => None,
        }
    }
}

/// Removes from a model's text stream what has already been delivered, so a
/// repeated request (a provider retry after a broken stream, or a session
/// resumed after a crash) does not deliver the same text twice.
///
/// `delivered` is the text already passed on. Each new attempt starts at its
/// beginning: incoming text that matches it is swallowed; text beyond it is
/// passed on (and becomes part of it). If an attempt diverges from what was
/// delivered (a nondeterministic model), the rest of that attempt is passed
/// on from the point of divergence; the turn's authoritative text is always
/// the completed turn's, not the concatenated deltas.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeltaFilter {
    delivered: String,
    /// Byte position of the current attempt within `delivered`.
    position: usize,
    diverged: bool,
}

impl DeltaFilter {
    /// A filter that has already delivered `delivered`.
    pub fn new(delivered: String) -> Self {
        Self {
            delivered,
            position: 0,
            diverged: false,
        }
    }

    /// A new attempt starts from the beginning of the text.
    pub fn restart(&mut self) {
        self.position = 0;
        self.diverged = false;
    }

    /// The part of `delta` not delivered yet, if any.
    pub fn feed(&mut self, delta: &str) -> Option<String> {
        if self.diverged || self.position >= self.delivered.len() {
            self.position = self.delivered.len() + delta.len();
            self.delivered.push_str(delta);
            return (!delta.is_empty()).then(|| delta.to_owned());
        }
        let pending = &self.delivered[self.position..];
        let common: usize = pending
            .chars()
            .zip(delta.chars())
            .take_while(|(a, b)| a == b)
            .map(|(a, _)| a.len_utf8())
            .sum();
        self.position += common;
        if common == delta.len() {
            return None;
        }
        if self.position < self.delivered.len() {
            self.diverged = true;
        }
        let rest = &delta[common..];
        self.delivered.push_str(rest);
        self.position = self.delivered.len();
        Some(rest.to_owned())
    }
}

/// Estimates a token count from text length, deterministically: one token per
/// four characters, rounded up. Good enough for offline providers and tests.
pub fn estimate_tokens(chars: usize) -> u64 {
    u64::try_from(chars.div_ceil(4)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_filter_swallows_what_was_delivered_and_passes_the_rest() {
        let mut filter = DeltaFilter::new(String::new());
        assert_eq!(filter.feed("Hel"), Some("Hel".to_owned()));
        assert_eq!(filter.feed("lo wo"), Some("lo wo".to_owned()));
        // A retry streams the same text in different pieces.
        filter.restart();
        assert_eq!(filter.feed("He"), None);
        assert_eq!(filter.feed("llo"), None);
        assert_eq!(filter.feed(" world"), Some("rld".to_owned()));
        assert_eq!(filter.feed("!"), Some("!".to_owned()));
        // Resuming from recorded text works the same way.
        let mut resumed = DeltaFilter::new("Hello".to_owned());
        let passed: Vec<Option<String>> = ["Hé", "llo", " there"]
            .iter()
            .map(|delta| resumed.feed(delta))
            .collect();
        // "Hé" diverges from "He": the rest of the attempt passes through.
        assert_eq!(
            passed,
            [
                Some("é".to_owned()),
                Some("llo".to_owned()),
                Some(" there".to_owned())
            ]
        );
    }

    #[test]
    fn delta_filter_handles_multibyte_text() {
        let mut filter = DeltaFilter::new("héllo".to_owned());
        assert_eq!(filter.feed("hé"), None);
        assert_eq!(filter.feed("llo wörld"), Some(" wörld".to_owned()));
    }

    #[test]
    fn only_transient_failures_are_retried() {
        let status = |status| ProviderError::Status {
            endpoint: "openai x".to_owned(),
            status,
            message: String::new(),
            retry_after: None,
        };
        let retryable: Vec<bool> = [400, 401, 404, 408, 429, 500, 503]
            .into_iter()
            .map(|code| status(code).is_retryable())
            .collect();
        assert_eq!(retryable, [false, false, false, true, true, true, true]);
        let overloaded = ProviderError::StreamError {
            endpoint: "anthropic x".to_owned(),
            kind: "overloaded_error".to_owned(),
            message: "Overloaded".to_owned(),
        };
        assert!(overloaded.is_retryable());
    }

    #[test]
    fn token_estimate_rounds_up_per_four_chars() {
        assert_eq!([0, 1, 4, 5, 8].map(estimate_tokens), [0, 1, 1, 2, 2],);
    }
}
