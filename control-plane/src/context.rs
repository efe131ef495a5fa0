//! Context settings: how much of an input reaches the model and when a long
//! session's history is compacted (the `[context]` table of the control
//! plane's configuration).

use serde::Deserialize;

/// The `[context]` table.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct ContextSettings {
    /// Longest StartSession input or SendMessage message the model receives,
    /// in estimated tokens (characters / 4). A longer one is cut at the last
    /// paragraph break or heading before the limit (never inside a line),
    /// with a marker telling the model so, and its event records how much
    /// was cut. Default: 50000.
    pub max_input_tokens: u64,
}

impl Default for ContextSettings {
    fn default() -> Self {
        Self {
            max_input_tokens: 50_000,
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
