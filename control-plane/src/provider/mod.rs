//! Model providers: what the agent loop asks for the next assistant turn.
//!
//! A provider receives the whole conversation plus the tool definitions and
//! answers with a stream: zero or more text deltas, then exactly one
//! [`CompletedTurn`] (full text, tool calls, token usage, stop reason). Only
//! the [`scripted`] provider exists so far; network providers (OpenAI-compatible,
//! Anthropic) will implement the same trait.

pub mod scripted;

use futures::stream::BoxStream;

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
    /// The conversation so far, oldest first.
    pub messages: Vec<Message>,
    /// Tools the model may call, in a stable order.
    pub tools: Vec<ToolDefinition>,
}

/// Token counts of one model call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenUsage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
    /// Prompt tokens served from the provider's cache.
    pub cached_input_tokens: u64,
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
    fn token_estimate_rounds_up_per_four_chars() {
        assert_eq!([0, 1, 4, 5, 8].map(estimate_tokens), [0, 1, 1, 2, 2],);
    }
}
