//! Standard tool `edit_file`: replaces an exact string in one file of the session workspace.

use std::io::Read;
use std::path::Path;

use harness_tool_sdk::{Tool, ToolError, export_tool, workspace};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Largest file `edit_file` edits; the whole file is held in memory twice.
const MAX_BYTES: u64 = 4 * 1024 * 1024;

/// Which file to edit, and the replacement.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// Path of the file, relative to /workspace (e.g. `src/main.rs`) or absolute under
    /// /workspace. The file must exist.
    pub path: String,
    /// The exact text to replace, including whitespace and indentation. Must occur in the
    /// file exactly once unless `replace_all` is true; include surrounding lines to make it
    /// unique.
    pub old_string: String,
    /// The text to put in its place. May be empty to delete `old_string`.
    pub new_string: String,
    /// Replace every occurrence of `old_string` instead of requiring exactly one. Defaults to
    /// false.
    #[serde(default)]
    pub replace_all: bool,
}

/// What was changed.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Output {
    /// The file's path relative to /workspace.
    pub path: String,
    /// How many occurrences of `old_string` were replaced.
    pub replacements: u64,
}

/// The `edit_file` tool.
pub struct EditFile;

impl Tool for EditFile {
    const NAME: &str = "edit_file";
    const DESCRIPTION: &str = "Edits a UTF-8 text file in the workspace (/workspace) by \
        replacing an exact string. Fails without changing anything if `old_string` is not \
        found, or is found more than once and `replace_all` is not set. Read the file first \
        so `old_string` matches it exactly.";
    type Input = Input;
    type Output = Output;

    fn run(input: Input) -> Result<Output, ToolError> {
        edit_in(Path::new(workspace::ROOT), &input)
    }
}

/// What `run` does, with the workspace at `root`.
pub fn edit_in(root: &Path, input: &Input) -> Result<Output, ToolError> {
    let resolved = workspace::resolve_in(root, &input.path)?;
    let io_err = |err| workspace::io_error(&input.path, err);
    let file = std::fs::File::open(&resolved).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if meta.is_dir() {
        return Err(ToolError::invalid_input(format!(
            "`{}` is a directory; edit_file edits one file",
            input.path
        )));
    }
    let too_big = || {
        ToolError::failed(format!(
            "`{}` is larger than the 4 MiB edit_file limit",
            input.path
        ))
    };
    if meta.len() > MAX_BYTES {
        return Err(too_big());
    }
    let mut bytes = Vec::new();
    file.take(MAX_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if u64::try_from(bytes.len()).map_err(|_| too_big())? > MAX_BYTES {
        return Err(too_big());
    }
    let text = String::from_utf8(bytes).map_err(|err| {
        ToolError::failed(format!(
            "`{}` is not UTF-8 text (invalid byte sequence at offset {}); edit_file only edits \
             text",
            input.path,
            err.utf8_error().valid_up_to()
        ))
    })?;

    let (edited, replacements) = replace(
        &text,
        &input.old_string,
        &input.new_string,
        input.replace_all,
    )
    .map_err(|err| ToolError::invalid_input(format!("`{}`: {err}", input.path)))?;

    // Written in place rather than to a temporary file renamed over the original: WASI can
    // neither read nor set permission bits, so a renamed copy would silently drop the
    // executable bit of a script, and it would replace a symlink instead of editing its
    // target. One write of the whole text keeps the window for a torn file small.
    std::fs::write(&resolved, edited.as_bytes()).map_err(io_err)?;
    Ok(Output {
        path: workspace::relative_in(root, &resolved),
        replacements: u64::try_from(replacements)
            .map_err(|_| ToolError::failed("replacement count does not fit in u64"))?,
    })
}

/// Replaces `old` with `new` in `text`: the single occurrence, or every occurrence when
/// `all`. Returns the new text and the number of replacements, or why nothing was replaced.
fn replace(text: &str, old: &str, new: &str, all: bool) -> Result<(String, usize), String> {
    if old.is_empty() {
        return Err("old_string is empty; give the exact text to replace".to_owned());
    }
    if old == new {
        return Err("old_string and new_string are the same; nothing to change".to_owned());
    }
    let count = text.matches(old).count();
    match count {
        0 => Err(
            "no match for old_string; it must match the file exactly, including whitespace \
             and indentation (read the file again to check)"
                .to_owned(),
        ),
        1 => Ok((text.replacen(old, new, 1), 1)),
        _ if all => Ok((text.replace(old, new), count)),
        _ => Err(format!(
            "{count} matches; make old_string unique or set replace_all"
        )),
    }
}

export_tool!(EditFile);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use harness_tool_sdk::ErrorKind;

    #[test]
    fn replaces_exactly_one_or_all() {
        assert_eq!(
            replace("a b c", "b", "x", false).unwrap(),
            ("a x c".into(), 1)
        );
        assert_eq!(
            replace("a b b", "b", "x", true).unwrap(),
            ("a x x".into(), 2)
        );
        assert_eq!(
            replace("a b c", "b", "x", true).unwrap(),
            ("a x c".into(), 1)
        );
        assert_eq!(
            replace("a b c", " b", "", false).unwrap(),
            ("a c".into(), 1)
        );
        // Non-overlapping, left to right, like `str::replace`.
        assert_eq!(replace("aaa", "aa", "b", true).unwrap(), ("ba".into(), 1));
    }

    #[test]
    fn refuses_empty_missing_ambiguous_and_no_op() {
        assert!(
            replace("abc", "", "x", false)
                .unwrap_err()
                .contains("empty")
        );
        assert!(
            replace("abc", "z", "x", false)
                .unwrap_err()
                .contains("no match")
        );
        assert_eq!(
            replace("b b b", "b", "x", false).unwrap_err(),
            "3 matches; make old_string unique or set replace_all"
        );
        assert!(
            replace("abc", "b", "b", false)
                .unwrap_err()
                .contains("same")
        );
    }

    fn input(path: &str, old: &str, new: &str, all: bool) -> Input {
        Input {
            path: path.to_owned(),
            old_string: old.to_owned(),
            new_string: new.to_owned(),
            replace_all: all,
        }
    }

    #[test]
    fn edits_files_under_root() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("main.rs");
        std::fs::write(&file, "fn main() {\n    old();\n    old();\n}\n").unwrap();

        let err = edit_in(tmp.path(), &input("main.rs", "old()", "new()", false)).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidInput);
        assert!(err.message.contains("2 matches"), "{}", err.message);
        assert!(err.message.contains("`main.rs`"), "{}", err.message);
        // A refused edit leaves the file alone.
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "fn main() {\n    old();\n    old();\n}\n"
        );

        let out = edit_in(tmp.path(), &input("main.rs", "old()", "new()", true)).unwrap();
        assert_eq!(out.path, "main.rs");
        assert_eq!(out.replacements, 2);
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "fn main() {\n    new();\n    new();\n}\n"
        );
    }

    #[test]
    fn keeps_permissions_and_edits_through_links() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let script = tmp.path().join("run.sh");
        std::fs::write(&script, "echo hi\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("run.sh", tmp.path().join("link.sh")).unwrap();

        edit_in(tmp.path(), &input("link.sh", "hi", "bye", false)).unwrap();
        assert_eq!(std::fs::read_to_string(&script).unwrap(), "echo bye\n");
        let mode = std::fs::metadata(&script).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
        assert!(
            std::fs::symlink_metadata(tmp.path().join("link.sh"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn path_errors_are_typed() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("bin"), [0xff]).unwrap();
        let kind = |i: Input| edit_in(tmp.path(), &i).unwrap_err().kind;
        assert_eq!(kind(input("missing", "a", "b", false)), ErrorKind::NotFound);
        assert_eq!(kind(input("../x", "a", "b", false)), ErrorKind::Denied);
        assert_eq!(kind(input(".", "a", "b", false)), ErrorKind::InvalidInput);
        assert_eq!(kind(input("bin", "a", "b", false)), ErrorKind::Failed);
    }
}
