//! Cutting an input that is too long for the model, at a structural
//! boundary: the last paragraph break or heading before the limit, else the
//! last line break; never inside a line. The model sees the kept part and a
//! marker that says what was cut, and the event carrying the text records
//! it ([`control::InputTruncated`]). Pure: the service and the loop apply
//! it.

use harness_proto::control::v1 as control;
use sha2::{Digest as _, Sha256};

use crate::prompt::estimate_tokens;

/// `text` cut to about `max_tokens` tokens (marker included), or `None` if
/// it fits.
pub fn truncate_input(text: &str, max_tokens: u64) -> Option<(String, control::InputTruncated)> {
    let original_chars = u64::try_from(text.chars().count()).unwrap_or(u64::MAX);
    let original_tokens = estimate_tokens(original_chars);
    if original_tokens <= max_tokens {
        return None;
    }
    // The marker's own length does not depend much on the numbers in it.
    let marker_room = u64::try_from(
        marker(original_chars, original_chars, original_tokens, max_tokens)
            .chars()
            .count(),
    )
    .unwrap_or(u64::MAX);
    let budget_chars = max_tokens.saturating_mul(4).saturating_sub(marker_room);
    let limit = byte_index_of_char(text, usize::try_from(budget_chars).unwrap_or(usize::MAX));
    let kept = &text[..boundary_before(text, limit)];
    let kept = kept.trim_end();
    let kept_chars = u64::try_from(kept.chars().count()).unwrap_or(u64::MAX);
    let cut = format!(
        "{kept}{}",
        marker(kept_chars, original_chars, original_tokens, max_tokens)
    );
    let record = control::InputTruncated {
        original_chars,
        kept_chars,
        original_tokens,
        max_input_tokens: max_tokens,
        original_sha256: hex::encode(Sha256::digest(text.as_bytes())),
    };
    Some((cut, record))
}

/// What the model reads where the input was cut.
fn marker(kept_chars: u64, original_chars: u64, original_tokens: u64, max_tokens: u64) -> String {
    format!(
        "\n\n[harness] The input was truncated here: {kept_chars} of {original_chars} characters \
         kept (the whole input is about {original_tokens} tokens; the limit is {max_tokens}). The \
         rest was not sent to you; say so if your answer depends on it."
    )
}

/// The byte index of the `chars`-th character (the end if there are fewer).
fn byte_index_of_char(text: &str, chars: usize) -> usize {
    text.char_indices()
        .nth(chars)
        .map_or(text.len(), |(index, _)| index)
}

/// The end of the kept part: the last paragraph break or heading start at
/// or before `limit`, else the last line break, else nothing.
fn boundary_before(text: &str, limit: usize) -> usize {
    let window = &text[..limit];
    let paragraph = window.rfind("\n\n");
    let heading = window.rfind("\n#");
    match paragraph.max(heading) {
        Some(index) => index,
        None => window.rfind('\n').unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_short_input_is_left_alone() {
        assert_eq!(truncate_input("hello", 10), None);
    }

    #[test]
    fn a_long_input_is_cut_at_the_last_paragraph_break_before_the_limit() {
        let paragraph = "word ".repeat(40).trim_end().to_owned() + "\n";
        let text = format!("{paragraph}\n{paragraph}\n{paragraph}\n{paragraph}");
        // Room for about two paragraphs plus the marker.
        let (cut, record) = truncate_input(&text, 160).unwrap();
        let (kept, marker) = cut
            .split_once("\n\n[harness] The input was truncated here")
            .unwrap();
        assert!(text.starts_with(kept));
        assert_eq!(
            &text[kept.len()..kept.len() + 2],
            "\n\n",
            "cut at a paragraph break"
        );
        assert!(marker.contains(&format!(
            "{} of {} characters",
            record.kept_chars, record.original_chars
        )));
        assert!(estimate_tokens(cut.chars().count() as u64) <= 160);
        assert_eq!(record.max_input_tokens, 160);
        assert_eq!(record.original_sha256.len(), 64);
    }

    #[test]
    fn without_paragraphs_the_cut_is_at_a_line_break_never_mid_line() {
        let text: String = (0..200).map(|n| format!("line {n} of the log\n")).collect();
        let (cut, record) = truncate_input(&text, 200).unwrap();
        let kept = &cut[..cut.find("\n\n[harness]").unwrap()];
        assert!(kept.ends_with("of the log"), "{kept}");
        assert_eq!(text.as_bytes()[kept.len()], b'\n');
        assert!(record.kept_chars < record.original_chars);
    }

    #[test]
    fn a_heading_is_a_boundary_and_multibyte_text_is_cut_on_characters() {
        let section = "é".repeat(300);
        let text = format!("# A\n{section}\n# B\n{section}\n# C\n{section}");
        let (cut, _) = truncate_input(&text, 200).unwrap();
        let kept = &cut[..cut.find("\n\n[harness]").unwrap()];
        assert!(kept.ends_with(&section), "ends before a heading");
        assert!(text[kept.len()..].starts_with("\n# "));
    }

    #[test]
    fn one_endless_line_keeps_nothing_but_the_marker() {
        let text = "x".repeat(10_000);
        let (cut, record) = truncate_input(&text, 100).unwrap();
        assert!(cut.starts_with("\n\n[harness] The input was truncated here: 0 of 10000"));
        assert_eq!(record.kept_chars, 0);
    }
}
