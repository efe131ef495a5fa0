//! Standard tool `list_dir`: lists one directory of the session workspace without following
//! symlinks.

use harness_tool_sdk::{Tool, ToolError, export_tool, workspace};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which directory to list.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// Path of the directory, relative to /workspace or absolute under /workspace.
    /// Defaults to `.`, the workspace root.
    #[serde(default = "default_path")]
    pub path: String,
}

fn default_path() -> String {
    ".".to_owned()
}

/// The directory's entries.
#[derive(Serialize, JsonSchema)]
pub struct Output {
    /// The directory's path relative to /workspace.
    pub path: String,
    /// The entries, sorted by name. `.` and `..` are not listed.
    pub entries: Vec<Entry>,
}

/// One directory entry.
#[derive(Serialize, JsonSchema)]
pub struct Entry {
    /// The entry's file name (not a full path).
    pub name: String,
    /// What the entry is. Symlinks are reported as `symlink` and not followed.
    pub kind: EntryKind,
    /// Size in bytes for files; 0 for directories, symlinks and other kinds.
    pub size: u64,
}

/// Kind of a directory entry.
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
    /// A symbolic link (not followed).
    Symlink,
    /// Anything else (device, socket, fifo).
    Other,
}

/// The `list_dir` tool.
pub struct ListDir;

impl Tool for ListDir {
    const NAME: &str = "list_dir";
    const DESCRIPTION: &str = "Lists the entries of a directory in the workspace (/workspace) \
        with their kind and size, sorted by name. Symlinks are listed, not followed.";
    type Input = Input;
    type Output = Output;

    fn run(input: Input) -> Result<Output, ToolError> {
        let resolved = workspace::resolve(&input.path)?;
        let io_err = |err| workspace::io_error(&input.path, err);
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(&resolved).map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            // symlink_metadata so a link is reported as a link and its target is never
            // touched, whether or not it points outside the workspace.
            let meta = std::fs::symlink_metadata(entry.path()).map_err(io_err)?;
            let file_type = meta.file_type();
            let (kind, size) = if file_type.is_symlink() {
                (EntryKind::Symlink, 0)
            } else if file_type.is_dir() {
                (EntryKind::Dir, 0)
            } else if file_type.is_file() {
                (EntryKind::File, meta.len())
            } else {
                (EntryKind::Other, 0)
            };
            entries.push(Entry {
                name: entry.file_name().to_string_lossy().into_owned(),
                kind,
                size,
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Output {
            path: workspace::relative(&resolved),
            entries,
        })
    }
}

export_tool!(ListDir);
