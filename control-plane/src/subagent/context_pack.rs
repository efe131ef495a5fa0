//! The context pack: the files a delegation names, placed in the child's
//! task so it starts with them instead of the parent's conversation.
//!
//! ```text
//! <task>
//!
//! Files from the workspace:
//! --- notes/brief.md (120 bytes) ---
//! <contents>
//! --- end of notes/brief.md ---
//! ```
//!
//! The pack is bounded: once `max_bytes` of contents are in, later files
//! are cut with a marker saying how much was left out, and a file that is
//! not UTF-8 text is named but not included. The child can read any of
//! them in full with its own tools.

use harness_proto::sandbox::v1 as sandbox;

/// Contents of all files of one pack, at most (64 KiB).
pub const MAX_PACK_BYTES: usize = 64 * 1024;

/// The child's input: `task`, then each file of `files` in order.
pub fn task_input(task: &str, files: &[sandbox::FileContent], max_bytes: usize) -> String {
    if files.is_empty() {
        return task.to_owned();
    }
    let mut input = format!("{task}\n\nFiles from the workspace:\n");
    let mut room = max_bytes;
    for file in files {
        let Ok(text) = std::str::from_utf8(&file.content) else {
            input.push_str(&format!(
                "--- {} ({} bytes, not UTF-8 text: not included) ---\n",
                file.path, file.size
            ));
            continue;
        };
        let kept = prefix_within(text, room);
        room -= kept.len();
        input.push_str(&format!("--- {} ({} bytes) ---\n", file.path, file.size));
        input.push_str(kept);
        if !kept.is_empty() && !kept.ends_with('\n') {
            input.push('\n');
        }
        let shown = u64::try_from(kept.len()).unwrap_or(u64::MAX);
        if shown < file.size {
            input.push_str(&format!(
                "[... cut: {shown} of {} bytes shown; read the file for the rest]\n",
                file.size
            ));
        }
        input.push_str(&format!("--- end of {} ---\n", file.path));
    }
    input
}

/// The longest prefix of `text` of at most `limit` bytes that ends on a
/// character boundary.
fn prefix_within(text: &str, limit: usize) -> &str {
    if text.len() <= limit {
        return text;
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, content: &[u8], size: u64) -> sandbox::FileContent {
        sandbox::FileContent {
            path: path.to_owned(),
            content: content.to_vec(),
            size,
            truncated: u64::try_from(content.len()).unwrap_or(0) < size,
            ..Default::default()
        }
    }

    #[test]
    fn a_task_without_files_is_the_task() {
        assert_eq!(task_input("Check it.", &[], MAX_PACK_BYTES), "Check it.");
    }

    #[test]
    fn files_are_packed_in_order_and_cut_with_a_marker() {
        let files = [
            file("brief.md", b"Find the bug.\n", 14),
            file("data/é.txt", "ééé".as_bytes(), 6),
            file("logo.png", &[0x89, 0x50, 0xff], 3),
            file("big.log", b"abc", 10),
        ];
        // Room for the brief and 3 bytes more: "é" is 2 bytes, so one fits
        // whole, and the last byte goes to the next text file.
        assert_eq!(
            task_input("Investigate.", &files, 17),
            "Investigate.\n\nFiles from the workspace:\n\
             --- brief.md (14 bytes) ---\nFind the bug.\n--- end of brief.md ---\n\
             --- data/é.txt (6 bytes) ---\né\n[... cut: 2 of 6 bytes shown; read the file for the rest]\n--- end of data/é.txt ---\n\
             --- logo.png (3 bytes, not UTF-8 text: not included) ---\n\
             --- big.log (10 bytes) ---\na\n[... cut: 1 of 10 bytes shown; read the file for the rest]\n--- end of big.log ---\n"
        );
    }
}
