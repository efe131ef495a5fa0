//! A simulated provider prompt cache, so clients' cache layouts are tested
//! against a server that rewards them the way the real ones do.
//!
//! - Anthropic: a prefix is cached only where the request marks a
//!   `cache_control` breakpoint. The prefix is every block up to and
//!   including the marked one, in prompt order (tools, system, messages),
//!   with the markers themselves left out. A request reads the longest of
//!   its breakpoint prefixes seen before and writes the rest up to its last
//!   breakpoint.
//! - OpenAI: prefixes are cached automatically at message boundaries, per
//!   `prompt_cache_key`; a request reads the longest prefix (tools, then
//!   whole messages) seen before under its key.
//!
//! Tokens are a quarter of the prefix's canonical JSON bytes. Unlike the real
//! services there is no minimum cacheable length and no expiry: tests use
//! short prompts.

use std::collections::HashSet;

use serde_json::Value;

use crate::WireFormat;

/// Prefixes cached so far, by their canonical text.
#[derive(Debug, Default)]
pub(crate) struct PromptCache {
    prefixes: HashSet<String>,
}

/// What a request read from and wrote to the cache, in tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CacheUse {
    pub read: u64,
    pub written: u64,
}

fn tokens(text: &str) -> u64 {
    u64::try_from(text.len().div_ceil(4)).unwrap_or(u64::MAX)
}

/// `block` without its `cache_control`, as compact JSON.
fn canonical(block: &Value) -> String {
    let mut block = block.clone();
    if let Some(object) = block.as_object_mut() {
        object.remove("cache_control");
    }
    block.to_string()
}

impl PromptCache {
    /// Looks `body` up and caches its prefixes.
    pub(crate) fn serve(&mut self, format: WireFormat, body: &Value) -> CacheUse {
        match format {
            WireFormat::Anthropic => self.serve_anthropic(body),
            WireFormat::OpenAi => self.serve_openai(body),
        }
    }

    fn serve_anthropic(&mut self, body: &Value) -> CacheUse {
        let blocks = body["tools"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(body["system"].as_array().into_iter().flatten())
            .chain(
                body["messages"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .flat_map(|message| message["content"].as_array().into_iter().flatten()),
            );
        let mut running = String::new();
        let mut breakpoints = Vec::new();
        for block in blocks {
            running.push_str(&canonical(block));
            running.push('\n');
            if block.get("cache_control").is_some() {
                breakpoints.push(running.clone());
            }
        }
        let read = breakpoints
            .iter()
            .rev()
            .find(|prefix| self.prefixes.contains(*prefix))
            .map_or(0, |prefix| tokens(prefix));
        let written = breakpoints
            .last()
            .map_or(0, |last| tokens(last).saturating_sub(read));
        self.prefixes.extend(breakpoints);
        CacheUse { read, written }
    }

    fn serve_openai(&mut self, body: &Value) -> CacheUse {
        let mut running = format!(
            "key={}\n{}\n",
            body["prompt_cache_key"].as_str().unwrap_or_default(),
            body["tools"]
        );
        let mut read = 0;
        let mut prefixes = Vec::new();
        for message in body["messages"].as_array().into_iter().flatten() {
            running.push_str(&canonical(message));
            running.push('\n');
            if self.prefixes.contains(&running) {
                read = tokens(&running);
            }
            prefixes.push(running.clone());
        }
        self.prefixes.extend(prefixes);
        CacheUse { read, written: 0 }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn anthropic_reads_the_longest_marked_prefix_seen_before() {
        let mut cache = PromptCache::default();
        let first = json!({
            "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}],
        });
        let used = cache.serve(WireFormat::Anthropic, &first);
        assert_eq!(used.read, 0);
        assert!(used.written > 0);
        let second = json!({
            "system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]},
                {"role": "assistant", "content": [{"type": "text", "text": "yo"}]},
                {"role": "user", "content": [{"type": "text", "text": "more", "cache_control": {"type": "ephemeral"}}]},
            ],
        });
        let again = cache.serve(WireFormat::Anthropic, &second);
        assert_eq!(again.read, used.written);
        // Without markers nothing is cached.
        let unmarked =
            json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]});
        assert_eq!(
            cache.serve(WireFormat::Anthropic, &unmarked),
            CacheUse::default()
        );
    }

    #[test]
    fn openai_reads_whole_message_prefixes_under_the_same_key() {
        let mut cache = PromptCache::default();
        let first =
            json!({"prompt_cache_key": "a", "messages": [{"role": "system", "content": "s"}]});
        assert_eq!(cache.serve(WireFormat::OpenAi, &first).read, 0);
        let second = json!({"prompt_cache_key": "a", "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]});
        assert!(cache.serve(WireFormat::OpenAi, &second).read > 0);
        let other_key =
            json!({"prompt_cache_key": "b", "messages": [{"role": "system", "content": "s"}]});
        assert_eq!(cache.serve(WireFormat::OpenAi, &other_key).read, 0);
    }
}
