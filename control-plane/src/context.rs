//! Context settings: how much of an input reaches the model and when a long
//! session's history is compacted (the `[context]` table of the control
//! plane's configuration).

use serde::Deserialize;

/// The `[context]` table.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ContextSettings {
    /// Longest StartSession input or SendMessage message the model receives,
    /// in estimated tokens (characters / 4). A longer one is cut at the last
    /// paragraph break or heading before the limit (never inside a line),
    /// with a marker telling the model so, and its event records how much
    /// was cut. Default: 50000.
    pub max_input_tokens: u64,
    /// Share of the model's context window (from `[models]`) at which a
    /// session's history is compacted before its next request: first old
    /// tool results become stubs, then, if that is not enough, older turns
    /// are summarised. Default: 0.8.
    pub compaction_threshold: f64,
    /// Tool results the first step keeps verbatim. Default: 3.
    pub keep_tool_results: usize,
    /// Turns a summary keeps verbatim. Default: 4.
    pub keep_turns: usize,
    /// The model that writes summaries, on the agent's provider (a cheaper
    /// one saves money). Default: the agent's own model.
    pub compaction_model: Option<String>,
}

impl Default for ContextSettings {
    fn default() -> Self {
        Self {
            max_input_tokens: 50_000,
            compaction_threshold: 0.8,
            keep_tool_results: 3,
            keep_turns: 4,
            compaction_model: None,
        }
    }
}

/// What the control plane knows of one model (`[models."<name>"]`), beside
/// its price in `[prices]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ModelSpec {
    /// Tokens the model reads and writes in one request, e.g. `128000`.
    /// Compaction keeps a session's requests under
    /// `compaction-threshold` of it.
    pub context_window: u64,
    /// Most tokens it generates in one request; an agent without
    /// `max-tokens-per-turn` gets this. Absent: the provider's default.
    pub max_output_tokens: Option<u32>,
}
