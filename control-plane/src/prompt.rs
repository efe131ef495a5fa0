//! Prompt assembly: the one path every model request takes, for every
//! provider and every agent (top-level, subagent, after a handoff).
//!
//! A request is laid out static before dynamic, so providers' prompt caches
//! see the same prefix on every turn:
//!
//! 1. tool definitions, in the agent's stable order;
//! 2. the system prompt;
//! 3. the skills index (part of the system message, after the prompt);
//! 4. pinned memory (empty until memory exists);
//! 5. the history, oldest first, which only grows at its end between
//!    compactions;
//! 6. the newest dynamic input (the user message or tool results after the
//!    last assistant turn).
//!
//! Nothing time- or session-dependent is put in sections 1–4. Anthropic gets
//! `cache_control` breakpoints ([`Breakpoint`], at most four) at the end of
//! the tools, of the system prompt, of the stable history and of the newest
//! input; OpenAI-compatible servers a `prompt_cache_key` that is stable per
//! agent version.
//!
//! Each request is recorded ([`control::ModelRequest`]) with a sha256
//! digest per section, a token estimate calibrated by the session's last
//! measured request, and, when the prefix is not the previous request's
//! extended, which section changed (`cache_miss_reason`). Everything here is
//! pure; the loop records and sends what it returns. Digests and character
//! counts of the history are kept per message in a [`HistoryIndex`], so a
//! request only digests the messages added since the previous one.

use harness_proto::control::v1 as control;
use sha2::{Digest as _, Sha256};

use crate::provider::{Message, ToolDefinition};

/// A sha256 digest.
pub type Digest = [u8; 32];

/// Most `cache_control` breakpoints Anthropic accepts in one request.
pub const MAX_BREAKPOINTS: usize = 4;

/// Characters counted per message and per tool for the framing a wire
/// format adds around its content (role, ids, JSON punctuation).
const FRAMING_CHARS: u64 = 24;

/// Where a provider's prompt cache may end a cached prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breakpoint {
    /// After the last tool definition.
    Tools,
    /// After the system prompt (and the skills index in it).
    System,
    /// After the message at this index of the request's messages.
    Message(usize),
}

/// How a request is laid out for providers' prompt caches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheLayout {
    /// The OpenAI-compatible `prompt_cache_key`; empty: none sent.
    pub key: String,
    /// Anthropic breakpoints, in prompt order.
    pub breakpoints: Vec<Breakpoint>,
}

/// The sections every request of one agent version shares, digested once
/// when the session's agent is rebuilt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticPrefix {
    /// Tool definitions, in the model's order.
    pub tools: Digest,
    /// The system prompt.
    pub system: Digest,
    /// The skills index.
    pub skills: Digest,
    /// Pinned memory.
    pub memory: Digest,
    /// All of the above, in prompt order.
    pub combined: Digest,
    /// The `prompt_cache_key`: the agent's name and a digest of its
    /// version (model and static prefix).
    pub cache_key: String,
    /// Characters of the tool definitions (the system message is counted
    /// with the messages).
    pub tool_chars: u64,
}

impl StaticPrefix {
    /// The static prefix of agent `agent` calling `model`.
    pub fn new(
        agent: &str,
        model: &str,
        tools: &[ToolDefinition],
        system_prompt: &str,
        skills_index: &str,
        memory: &str,
    ) -> Self {
        let mut tool_hasher = Sha256::new();
        let mut tool_chars = 0;
        for tool in tools {
            let schema = tool.input_schema.to_string();
            for part in [&tool.name, &tool.description, &schema] {
                feed(&mut tool_hasher, part);
                tool_chars += chars(part);
            }
            tool_chars += FRAMING_CHARS;
        }
        let tools: Digest = tool_hasher.finalize().into();
        let system = digest_of(system_prompt);
        let skills = digest_of(skills_index);
        let memory = digest_of(memory);
        let mut combined = Sha256::new();
        for section in [&tools, &system, &skills, &memory] {
            combined.update(section);
        }
        let combined: Digest = combined.finalize().into();
        let mut version = Sha256::new();
        feed(&mut version, model);
        version.update(combined);
        let version: Digest = version.finalize().into();
        Self {
            tools,
            system,
            skills,
            memory,
            combined,
            cache_key: format!("{agent}-{}", &hex::encode(version)[..16]),
            tool_chars,
        }
    }
}

/// Per-message digests and character counts of a session's history, kept
/// across requests so each request digests only what was added.
#[derive(Debug, Clone, Default)]
pub struct HistoryIndex {
    /// The history generation these entries belong to.
    generation: u64,
    /// `chain[n]`: the digest of the first `n + 1` messages.
    chain: Vec<Digest>,
    /// `total_chars[n]`: characters (framing included) of the first `n + 1`
    /// messages.
    total_chars: Vec<u64>,
}

impl HistoryIndex {
    /// Brings the index up to `messages`. `generation` changes whenever the
    /// history is rewritten rather than extended (a handoff, a
    /// compaction); the index then starts over.
    pub fn update(&mut self, generation: u64, messages: &[Message]) {
        if generation != self.generation || self.chain.len() > messages.len() {
            *self = Self {
                generation,
                ..Self::default()
            };
        }
        for message in &messages[self.chain.len()..] {
            let previous = self.chain.last().copied().unwrap_or_default();
            let digest = match message {
                // The system prompt has its own sections.
                Message::System { .. } => previous,
                _ => chained(&previous, message),
            };
            let total = self.total_chars.last().copied().unwrap_or_default();
            self.chain.push(digest);
            self.total_chars.push(total + message_chars(message));
        }
    }

    /// The digest of the first `count` messages (zero for none).
    pub fn digest_at(&self, count: usize) -> Digest {
        count
            .checked_sub(1)
            .and_then(|index| self.chain.get(index))
            .copied()
            .unwrap_or_default()
    }

    /// Characters of every indexed message.
    pub fn chars(&self) -> u64 {
        self.total_chars.last().copied().unwrap_or_default()
    }
}

/// The last measured request of a session: its uncalibrated estimate and
/// the input tokens the provider reported for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Calibration {
    /// Estimated input tokens (characters / 4).
    pub raw_estimate: u64,
    /// Measured input tokens.
    pub measured: u64,
}

impl Calibration {
    /// `raw` corrected by the measured-to-estimated ratio.
    pub fn apply(self, raw: u64) -> u64 {
        if self.raw_estimate == 0 || self.measured == 0 {
            return raw;
        }
        let scaled = u128::from(raw) * u128::from(self.measured) / u128::from(self.raw_estimate);
        u64::try_from(scaled).unwrap_or(u64::MAX)
    }
}

/// One assembled request: its cache layout and its record.
#[derive(Debug, Clone, PartialEq)]
pub struct Assembled {
    /// How the request is laid out for prompt caches.
    pub cache: CacheLayout,
    /// What the request log records for it.
    pub record: control::ModelRequest,
}

/// Lays out the request of `model` over `messages` (which `history` has
/// indexed) and records it; `previous` is the session's last request,
/// `calibration` its last measured one.
pub fn assemble(
    prefix: &StaticPrefix,
    model: &str,
    history: &HistoryIndex,
    messages: &[Message],
    previous: Option<&control::ModelRequest>,
    calibration: Option<Calibration>,
) -> Assembled {
    let stable = stable_messages(messages);
    let breakpoints = breakpoints(prefix.tool_chars > 0, messages, stable);
    let raw = estimate_tokens(prefix.tool_chars + history.chars());
    let digests = control::PromptDigests {
        tools: hex::encode(prefix.tools),
        system: hex::encode(prefix.system),
        skills: hex::encode(prefix.skills),
        memory: hex::encode(prefix.memory),
        history: hex::encode(history.digest_at(messages.len())),
        static_prefix: hex::encode(prefix.combined),
    };
    let cache_miss_reason = previous
        .map(|previous| miss_reason(previous, model, &digests, history))
        .unwrap_or_default();
    Assembled {
        record: control::ModelRequest {
            model: model.to_owned(),
            digests: Some(digests),
            estimated_input_tokens: calibration.map_or(raw, |calibration| calibration.apply(raw)),
            raw_estimated_input_tokens: raw,
            cache_miss_reason,
            prompt_cache_key: prefix.cache_key.clone(),
            cache_breakpoints: u32::try_from(breakpoints.len()).unwrap_or(u32::MAX),
            messages: u32::try_from(messages.len()).unwrap_or(u32::MAX),
            stable_messages: u32::try_from(stable).unwrap_or(u32::MAX),
        },
        cache: CacheLayout {
            key: prefix.cache_key.clone(),
            breakpoints,
        },
    }
}

/// Tokens in `chars` characters: one per four, rounded up.
pub fn estimate_tokens(chars: u64) -> u64 {
    chars.div_ceil(4)
}

/// Messages before the newest dynamic input: through the last assistant
/// turn, or the system prompt when there is none yet.
pub fn stable_messages(messages: &[Message]) -> usize {
    match messages
        .iter()
        .rposition(|message| matches!(message, Message::Assistant { .. }))
    {
        Some(last_assistant) => last_assistant + 1,
        None => messages
            .iter()
            .take_while(|message| matches!(message, Message::System { .. }))
            .count(),
    }
}

/// The breakpoints of a request: the tools, the system prompt, the end of
/// the stable history and the end of the newest input, each where it
/// exists and is not the one before it.
pub fn breakpoints(has_tools: bool, messages: &[Message], stable: usize) -> Vec<Breakpoint> {
    let mut points = Vec::with_capacity(MAX_BREAKPOINTS);
    if has_tools {
        points.push(Breakpoint::Tools);
    }
    if messages
        .iter()
        .any(|message| matches!(message, Message::System { .. }))
    {
        points.push(Breakpoint::System);
    }
    let conversational = |index: usize| {
        messages
            .get(index)
            .is_some_and(|message| !matches!(message, Message::System { .. }))
    };
    for end in [stable, messages.len()] {
        if let Some(index) = end.checked_sub(1)
            && conversational(index)
            && !points.contains(&Breakpoint::Message(index))
        {
            points.push(Breakpoint::Message(index));
        }
    }
    points
}

/// Which sections differ from `previous`'s, comma-separated; empty when
/// this request's prefix is `previous`'s, extended.
fn miss_reason(
    previous: &control::ModelRequest,
    model: &str,
    digests: &control::PromptDigests,
    history: &HistoryIndex,
) -> String {
    let before = previous.digests.clone().unwrap_or_default();
    let mut changed = Vec::new();
    if previous.model != model {
        changed.push("model");
    }
    for (name, was, now) in [
        ("tools", &before.tools, &digests.tools),
        ("system", &before.system, &digests.system),
        ("skills", &before.skills, &digests.skills),
        ("memory", &before.memory, &digests.memory),
    ] {
        if was != now {
            changed.push(name);
        }
    }
    let count = usize::try_from(previous.messages).unwrap_or(usize::MAX);
    if hex::encode(history.digest_at(count)) != before.history {
        changed.push("history");
    }
    changed.join(",")
}

fn digest_of(text: &str) -> Digest {
    let mut hasher = Sha256::new();
    feed(&mut hasher, text);
    hasher.finalize().into()
}

/// Feeds `text` with its length, so adjacent parts cannot run together.
fn feed(hasher: &mut Sha256, text: &str) {
    hasher.update((text.len() as u64).to_le_bytes());
    hasher.update(text.as_bytes());
}

fn chained(previous: &Digest, message: &Message) -> Digest {
    let mut hasher = Sha256::new();
    hasher.update(previous);
    match message {
        Message::System { text } => {
            hasher.update([0]);
            feed(&mut hasher, text);
        }
        Message::User { text } => {
            hasher.update([1]);
            feed(&mut hasher, text);
        }
        Message::Assistant { text, tool_calls } => {
            hasher.update([2]);
            feed(&mut hasher, text);
            for call in tool_calls {
                feed(&mut hasher, &call.call_id);
                feed(&mut hasher, &call.tool);
                feed(&mut hasher, &call.arguments_json);
            }
        }
        Message::ToolResult {
            call_id,
            tool,
            content,
            is_error,
        } => {
            hasher.update([3, u8::from(*is_error)]);
            feed(&mut hasher, call_id);
            feed(&mut hasher, tool);
            feed(&mut hasher, content);
        }
    }
    hasher.finalize().into()
}

fn chars(text: &str) -> u64 {
    u64::try_from(text.chars().count()).unwrap_or(u64::MAX)
}

/// Characters a message adds to a request, framing included.
pub fn message_chars(message: &Message) -> u64 {
    FRAMING_CHARS
        + match message {
            Message::System { text } | Message::User { text } => chars(text),
            Message::Assistant { text, tool_calls } => {
                chars(text)
                    + tool_calls
                        .iter()
                        .map(|call| {
                            FRAMING_CHARS
                                + chars(&call.call_id)
                                + chars(&call.tool)
                                + chars(&call.arguments_json)
                        })
                        .sum::<u64>()
            }
            Message::ToolResult {
                call_id, content, ..
            } => chars(call_id) + chars(content),
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ToolCall;

    fn tool(name: &str) -> ToolDefinition {
        ToolDefinition {
            name: name.to_owned(),
            description: format!("{name} things"),
            input_schema: serde_json::json!({"type": "object"}),
        }
    }

    fn user(text: &str) -> Message {
        Message::User {
            text: text.to_owned(),
        }
    }

    fn assistant(call: &str) -> Message {
        Message::Assistant {
            text: String::new(),
            tool_calls: vec![ToolCall {
                call_id: call.to_owned(),
                tool: "read_file".to_owned(),
                arguments_json: "{}".to_owned(),
            }],
        }
    }

    fn result(call: &str) -> Message {
        Message::ToolResult {
            call_id: call.to_owned(),
            tool: "read_file".to_owned(),
            content: "contents".to_owned(),
            is_error: false,
        }
    }

    fn conversation(turns: usize) -> Vec<Message> {
        let mut messages = vec![
            Message::System {
                text: "You read.".to_owned(),
            },
            user("Read it."),
        ];
        for turn in 0..turns {
            let call = format!("call_{turn}");
            messages.push(assistant(&call));
            messages.push(result(&call));
        }
        messages
    }

    fn prefix() -> StaticPrefix {
        StaticPrefix::new("reader", "m", &[tool("read_file")], "You read.", "", "")
    }

    fn assembled(
        messages: &[Message],
        previous: Option<&control::ModelRequest>,
        history: &mut HistoryIndex,
        generation: u64,
    ) -> Assembled {
        history.update(generation, messages);
        assemble(&prefix(), "m", history, messages, previous, None)
    }

    #[test]
    fn breakpoints_end_tools_system_stable_history_and_newest_input() {
        let messages = conversation(2);
        let mut history = HistoryIndex::default();
        let first = assembled(&messages[..2], None, &mut history, 0);
        assert_eq!(
            first.cache.breakpoints,
            [
                Breakpoint::Tools,
                Breakpoint::System,
                Breakpoint::Message(1)
            ]
        );
        let later = assembled(&messages, None, &mut history, 0);
        assert_eq!(
            later.cache.breakpoints,
            [
                Breakpoint::Tools,
                Breakpoint::System,
                Breakpoint::Message(4),
                Breakpoint::Message(5)
            ]
        );
        assert_eq!(later.record.stable_messages, 5);
        assert_eq!(later.record.cache_breakpoints, 4);
    }

    #[test]
    fn a_growing_history_keeps_the_prefix_and_a_rewritten_one_names_history() {
        let messages = conversation(3);
        let mut history = HistoryIndex::default();
        let first = assembled(&messages[..4], None, &mut history, 0);
        let second = assembled(&messages, Some(&first.record), &mut history, 0);
        assert_eq!(second.record.cache_miss_reason, "");
        assert_eq!(
            second.record.digests.as_ref().map(|d| &d.static_prefix),
            first.record.digests.as_ref().map(|d| &d.static_prefix)
        );
        let mut rewritten = messages.clone();
        rewritten[3] = Message::ToolResult {
            call_id: "call_0".to_owned(),
            tool: "read_file".to_owned(),
            content: "[cleared]".to_owned(),
            is_error: false,
        };
        let third = assembled(&rewritten, Some(&second.record), &mut history, 1);
        assert_eq!(third.record.cache_miss_reason, "history");
    }

    #[test]
    fn the_incremental_index_equals_one_built_from_scratch() {
        let messages = conversation(5);
        let mut incremental = HistoryIndex::default();
        for end in 1..=messages.len() {
            incremental.update(0, &messages[..end]);
        }
        let mut whole = HistoryIndex::default();
        whole.update(0, &messages);
        assert_eq!(incremental.chain, whole.chain);
        assert_eq!(incremental.total_chars, whole.total_chars);
        // The system message digests as nothing: the history starts after it.
        assert_eq!(whole.digest_at(1), Digest::default());
    }

    #[test]
    fn a_changed_section_is_named() {
        let messages = conversation(1);
        let mut history = HistoryIndex::default();
        history.update(0, &messages);
        let before = assemble(&prefix(), "m", &history, &messages, None, None);
        let other_tools = StaticPrefix::new(
            "reader",
            "m",
            &[tool("read_file"), tool("write_file")],
            "You read.",
            "",
            "",
        );
        let after = assemble(
            &other_tools,
            "m2",
            &history,
            &messages,
            Some(&before.record),
            None,
        );
        assert_eq!(after.record.cache_miss_reason, "model,tools");
        assert_ne!(after.cache.key, before.cache.key);
    }

    #[test]
    fn calibration_scales_by_the_last_measured_ratio() {
        let calibration = Calibration {
            raw_estimate: 100,
            measured: 130,
        };
        assert_eq!(calibration.apply(200), 260);
        let unmeasured = Calibration {
            raw_estimate: 100,
            measured: 0,
        };
        assert_eq!(unmeasured.apply(200), 200);
    }
}
