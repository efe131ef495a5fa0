//! Standard tool `read_file`: returns the UTF-8 text of one file in the session workspace,
//! or a range of its lines.

use std::io::Read;
use std::path::Path;

use harness_tool_sdk::{Tool, ToolError, export_tool, workspace};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Largest file `read_file` reads; bigger files would swamp a model's context.
const MAX_BYTES: u64 = 1024 * 1024;

/// Which file to read, and optionally which lines.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// Path of the file, relative to /workspace (e.g. `src/main.rs`) or absolute under
    /// /workspace.
    pub path: String,
    /// Line number (1-based) of the first line to return. Defaults to 1.
    #[schemars(range(min = 1))]
    pub offset: Option<u64>,
    /// Maximum number of lines to return, starting at `offset`. Defaults to all remaining
    /// lines.
    #[schemars(range(min = 1))]
    pub limit: Option<u64>,
}

/// The file's contents, or the requested lines of it.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Output {
    /// The file's path relative to /workspace.
    pub path: String,
    /// The requested lines exactly as they are in the file, line endings included; the whole
    /// file when neither `offset` nor `limit` is given.
    pub content: String,
    /// Size of the whole file in bytes.
    pub size: u64,
    /// Number of lines in the whole file (a last line without a trailing newline counts).
    pub total_lines: u64,
    /// True when the file has more lines after the returned ones (`limit` cut it short);
    /// continue with `offset` set to the line after the last one returned.
    pub truncated: bool,
}

/// The `read_file` tool.
pub struct ReadFile;

impl Tool for ReadFile {
    const NAME: &str = "read_file";
    const DESCRIPTION: &str = "Reads a UTF-8 text file from the workspace (/workspace) and \
        returns its contents, or only the lines from `offset` (1-based) up to `limit` lines. \
        Reports the file's total line count. Files larger than 1 MiB and binary files are \
        refused; use grep to search them.";
    type Input = Input;
    type Output = Output;

    fn run(input: Input) -> Result<Output, ToolError> {
        read_in(Path::new(workspace::ROOT), &input)
    }
}

/// What `run` does, with the workspace at `root`.
pub fn read_in(root: &Path, input: &Input) -> Result<Output, ToolError> {
    if input.offset == Some(0) {
        return Err(ToolError::invalid_input(
            "offset is 1-based: the first line is 1",
        ));
    }
    if input.limit == Some(0) {
        return Err(ToolError::invalid_input(
            "limit must be at least 1; omit it to read to the end of the file",
        ));
    }
    let resolved = workspace::resolve_in(root, &input.path)?;
    let io_err = |err| workspace::io_error(&input.path, err);
    let file = std::fs::File::open(&resolved).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if meta.is_dir() {
        return Err(ToolError::invalid_input(format!(
            "`{}` is a directory; use list_dir to see its entries",
            input.path
        )));
    }
    let too_big = || {
        ToolError::failed(format!(
            "`{}` is larger than the 1 MiB read_file limit; use grep to find the lines you \
             need",
            input.path
        ))
    };
    if meta.len() > MAX_BYTES {
        return Err(too_big());
    }
    // The size check above can race with a writer, so the read is capped as well.
    let mut bytes = Vec::new();
    file.take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    let size = u64::try_from(bytes.len()).map_err(|_| too_big())?;
    if size > MAX_BYTES {
        return Err(too_big());
    }
    let text = String::from_utf8(bytes).map_err(|err| {
        ToolError::failed(format!(
            "`{}` is not UTF-8 text (invalid byte sequence at offset {}); read_file only \
             returns text",
            input.path,
            err.utf8_error().valid_up_to()
        ))
    })?;
    let (content, total_lines, truncated) = select_lines(&text, input.offset, input.limit)
        .ok_or_else(|| {
            ToolError::invalid_input(format!(
                "offset {} is past the end of `{}`, which has {} lines",
                input.offset.unwrap_or(1),
                input.path,
                count_lines(&text)
            ))
        })?;
    Ok(Output {
        path: workspace::relative_in(root, &resolved),
        content: content.to_owned(),
        size,
        total_lines,
        truncated,
    })
}

fn count_lines(text: &str) -> u64 {
    text.split_inclusive('\n').map(|_| 1).sum()
}

/// The slice of `text` holding lines `offset..offset + limit` (1-based, line endings kept),
/// the total line count, and whether lines follow the slice. `None` when `offset` is past
/// the last line; offset 1 is always valid, so an empty file reads as empty.
fn select_lines(text: &str, offset: Option<u64>, limit: Option<u64>) -> Option<(&str, u64, bool)> {
    let total = count_lines(text);
    let first = offset.unwrap_or(1).max(1);
    if first > total && first != 1 {
        return None;
    }
    // Byte offset where each line starts; the selected range is one contiguous slice.
    let mut start = text.len();
    let mut end = text.len();
    let mut position = 0;
    for (index, line) in (1u64..).zip(text.split_inclusive('\n')) {
        if index == first {
            start = position;
        }
        position += line.len();
        if let Some(limit) = limit
            && index == first.saturating_add(limit).saturating_sub(1)
        {
            end = position;
            break;
        }
    }
    let last_returned = match limit {
        Some(limit) => first.saturating_add(limit).saturating_sub(1),
        None => total,
    };
    Some((&text[start.min(end)..end], total, last_returned < total))
}

export_tool!(ReadFile);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use harness_tool_sdk::ErrorKind;

    #[test]
    fn selects_line_ranges() {
        let text = "one\ntwo\nthree\n";
        assert_eq!(select_lines(text, None, None), Some((text, 3, false)));
        assert_eq!(
            select_lines(text, Some(2), None),
            Some(("two\nthree\n", 3, false))
        );
        assert_eq!(
            select_lines(text, Some(2), Some(1)),
            Some(("two\n", 3, true))
        );
        assert_eq!(
            select_lines(text, Some(1), Some(2)),
            Some(("one\ntwo\n", 3, true))
        );
        assert_eq!(
            select_lines(text, Some(3), Some(10)),
            Some(("three\n", 3, false))
        );
        assert_eq!(
            select_lines(text, Some(1), Some(u64::MAX)),
            Some((text, 3, false))
        );
        assert_eq!(select_lines(text, Some(4), None), None);
    }

    #[test]
    fn counts_a_last_line_without_newline() {
        assert_eq!(select_lines("a\nb", None, None), Some(("a\nb", 2, false)));
        assert_eq!(select_lines("a\nb", Some(2), None), Some(("b", 2, false)));
        assert_eq!(
            select_lines("a\r\nb\r\n", Some(1), Some(1)),
            Some(("a\r\n", 2, true))
        );
        assert_eq!(select_lines("", None, None), Some(("", 0, false)));
        assert_eq!(select_lines("", Some(1), Some(5)), Some(("", 0, false)));
        assert_eq!(select_lines("", Some(2), None), None);
    }

    fn input(path: &str, offset: Option<u64>, limit: Option<u64>) -> Input {
        Input {
            path: path.to_owned(),
            offset,
            limit,
        }
    }

    #[test]
    fn reads_files_under_root() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("src")).unwrap();
        std::fs::write(tmp.path().join("src/a.txt"), "1\n2\n3\n4\n").unwrap();

        let out = read_in(tmp.path(), &input("src/a.txt", Some(2), Some(2))).unwrap();
        assert_eq!(out.path, "src/a.txt");
        assert_eq!(out.content, "2\n3\n");
        assert_eq!(out.size, 8);
        assert_eq!(out.total_lines, 4);
        assert!(out.truncated);

        let out = read_in(tmp.path(), &input("/workspace/src/a.txt", None, None)).unwrap();
        assert_eq!(out.content, "1\n2\n3\n4\n");
        assert!(!out.truncated);
    }

    #[test]
    fn refusals_are_typed() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("a.txt"), "x\n").unwrap();
        std::fs::write(tmp.path().join("bin"), [0xff, 0xfe]).unwrap();
        std::fs::write(
            tmp.path().join("big"),
            vec![b'a'; usize::try_from(MAX_BYTES).unwrap() + 1],
        )
        .unwrap();
        let kind = |i: Input| read_in(tmp.path(), &i).unwrap_err().kind;

        assert_eq!(kind(input("a.txt", Some(0), None)), ErrorKind::InvalidInput);
        assert_eq!(kind(input("a.txt", None, Some(0))), ErrorKind::InvalidInput);
        assert_eq!(kind(input("a.txt", Some(3), None)), ErrorKind::InvalidInput);
        assert_eq!(kind(input("missing", None, None)), ErrorKind::NotFound);
        assert_eq!(kind(input("../x", None, None)), ErrorKind::Denied);
        assert_eq!(kind(input(".", None, None)), ErrorKind::InvalidInput);
        assert_eq!(kind(input("bin", None, None)), ErrorKind::Failed);
        assert_eq!(kind(input("big", None, None)), ErrorKind::Failed);
    }

    #[test]
    fn schema_describes_the_range_fields() {
        let json: serde_json::Value =
            serde_json::from_str(&harness_tool_sdk::describe::<ReadFile>()).unwrap();
        let props = &json["input_schema"]["properties"];
        assert_eq!(props["offset"]["minimum"], 1);
        assert!(props["limit"]["description"].is_string());
        assert_eq!(
            json["input_schema"]["required"],
            serde_json::json!(["path"])
        );
        let out = &json["output_schema"]["properties"];
        assert!(out["total_lines"].is_object() && out["truncated"].is_object());
    }
}
