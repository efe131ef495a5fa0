//! Test tool `tally`: appends a label line to a workspace file and returns how many lines
//! the file now has, so crash and retry tests can count how often a call really ran.
//!
//! Not a standard tool: sandboxd's tests load it from
//! `harness_tool_artifacts::test_tools_dir()`.

use std::io::{Read, Write};
use std::path::Path;

use harness_tool_sdk::{Tool, ToolError, export_tool, workspace};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where to count, and what to record.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// The tally file, relative to /workspace; created if missing.
    pub file: String,
    /// Text of the line to append (no line breaks).
    pub label: String,
}

/// The count after this call.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Output {
    /// Number of lines in the file, including the one just appended.
    pub count: u64,
}

/// The `tally` tool.
pub struct Tally;

impl Tool for Tally {
    const NAME: &str = "tally";
    const DESCRIPTION: &str = "Test tool: appends `label` as a line to `file` in the \
        workspace and returns the file's line count.";
    type Input = Input;
    type Output = Output;

    fn run(input: Input) -> Result<Output, ToolError> {
        tally_in(Path::new(workspace::ROOT), &input)
    }
}

/// What `run` does, with the workspace at `root`.
pub fn tally_in(root: &Path, input: &Input) -> Result<Output, ToolError> {
    if input.label.contains(['\n', '\r']) {
        return Err(ToolError::invalid_input("label must be a single line"));
    }
    let path = workspace::resolve_in(root, &input.file)?;
    let io_err = |err| workspace::io_error(&input.file, err);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io_err)?;
    // One write, so a line is either there whole or not at all.
    file.write_all(format!("{}\n", input.label).as_bytes())
        .map_err(io_err)?;
    let mut text = Vec::new();
    std::fs::File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut text))
        .map_err(io_err)?;
    let count = text.iter().filter(|&&b| b == b'\n').count();
    Ok(Output {
        count: u64::try_from(count).unwrap_or(u64::MAX),
    })
}

export_tool!(Tally);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use harness_tool_sdk::ErrorKind;

    fn input(file: &str, label: &str) -> Input {
        Input {
            file: file.to_owned(),
            label: label.to_owned(),
        }
    }

    #[test]
    fn counts_every_call() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(tally_in(tmp.path(), &input("t.log", "a")).unwrap().count, 1);
        assert_eq!(tally_in(tmp.path(), &input("t.log", "b")).unwrap().count, 2);
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("t.log")).unwrap(),
            "a\nb\n"
        );
    }

    #[test]
    fn refuses_bad_labels_and_escapes() {
        let tmp = tempfile::tempdir().unwrap();
        let kind = |i: Input| tally_in(tmp.path(), &i).unwrap_err().kind;
        assert_eq!(kind(input("t", "a\nb")), ErrorKind::InvalidInput);
        assert_eq!(kind(input("../t", "a")), ErrorKind::Denied);
    }
}
