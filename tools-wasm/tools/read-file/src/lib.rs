//! Standard tool `read_file`: returns the UTF-8 text of one file in the session workspace.

use std::io::Read;

use harness_tool_sdk::{Tool, ToolError, export_tool, workspace};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Largest file `read_file` returns; bigger files would swamp a model's context.
const MAX_BYTES: u64 = 1024 * 1024;

/// Which file to read.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// Path of the file, relative to /workspace (e.g. `src/main.rs`) or absolute under
    /// /workspace.
    pub path: String,
}

/// The file's contents.
#[derive(Serialize, JsonSchema)]
pub struct Output {
    /// The file's path relative to /workspace.
    pub path: String,
    /// The whole file as UTF-8 text.
    pub content: String,
    /// Size of the file in bytes.
    pub size: u64,
}

/// The `read_file` tool.
pub struct ReadFile;

impl Tool for ReadFile {
    const NAME: &str = "read_file";
    const DESCRIPTION: &str = "Reads a UTF-8 text file from the workspace (/workspace) and \
        returns its contents. Files larger than 1 MiB and binary files are refused.";
    type Input = Input;
    type Output = Output;

    fn run(input: Input) -> Result<Output, ToolError> {
        let resolved = workspace::resolve(&input.path)?;
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
                "`{}` is larger than the 1 MiB read_file limit",
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
        let content = String::from_utf8(bytes).map_err(|err| {
            ToolError::failed(format!(
                "`{}` is not UTF-8 text (invalid byte sequence at offset {}); read_file only \
                 returns text",
                input.path,
                err.utf8_error().valid_up_to()
            ))
        })?;
        Ok(Output {
            path: workspace::relative(&resolved),
            content,
            size,
        })
    }
}

export_tool!(ReadFile);
