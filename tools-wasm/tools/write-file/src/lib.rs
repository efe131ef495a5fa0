//! Standard tool `write_file`: creates or replaces one file in the session workspace.

use harness_tool_sdk::{Tool, ToolError, export_tool, workspace};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// What to write, and where.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// Path of the file, relative to /workspace (e.g. `src/main.rs`) or absolute under
    /// /workspace. An existing file is replaced.
    pub path: String,
    /// The complete new contents of the file, as UTF-8 text.
    pub content: String,
    /// Create missing parent directories. Defaults to true.
    #[serde(default = "default_create_dirs")]
    pub create_dirs: bool,
}

fn default_create_dirs() -> bool {
    true
}

/// What was written.
#[derive(Serialize, JsonSchema)]
pub struct Output {
    /// The file's path relative to /workspace.
    pub path: String,
    /// Number of bytes written.
    pub bytes_written: u64,
}

/// The `write_file` tool.
pub struct WriteFile;

impl Tool for WriteFile {
    const NAME: &str = "write_file";
    const DESCRIPTION: &str = "Writes UTF-8 text to a file in the workspace (/workspace), \
        replacing the file if it exists and, by default, creating missing parent directories.";
    type Input = Input;
    type Output = Output;

    fn run(input: Input) -> Result<Output, ToolError> {
        let resolved = workspace::resolve(&input.path)?;
        let io_err = |err| workspace::io_error(&input.path, err);
        if input.create_dirs
            && let Some(parent) = resolved.parent()
        {
            match std::fs::create_dir_all(parent) {
                // A parent that exists but is not a directory the guest may use (a file, or a
                // symlink out of the workspace) surfaces as "already exists"; the write below
                // then fails with the error that names the real problem.
                Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
                other => other.map_err(io_err)?,
            }
        }
        std::fs::write(&resolved, input.content.as_bytes()).map_err(io_err)?;
        let bytes_written = u64::try_from(input.content.len())
            .map_err(|_| ToolError::failed("content length does not fit in u64"))?;
        Ok(Output {
            path: workspace::relative(&resolved),
            bytes_written,
        })
    }
}

export_tool!(WriteFile);
