//! Standard tool `glob`: finds workspace paths matching a glob pattern, without following
//! symlinks.

use std::path::{Path, PathBuf};

use globset::GlobBuilder;
use harness_tool_sdk::workspace::{self, Walk};
use harness_tool_sdk::{Tool, ToolError, export_tool};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How many directory entries one call looks at before giving up and reporting
/// `truncated`, so a pattern over a huge tree returns instead of running into the deadline.
const MAX_VISITED: usize = 200_000;

/// What to look for, and where.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// Glob pattern matched against paths relative to `path`, e.g. `**/*.rs`, `src/*.toml`,
    /// `docs/**/*.{md,txt}`. `*` and `?` stay within one path component, `**` spans any
    /// number of directories, `[abc]` matches one listed character, `{a,b}` either
    /// alternative. Matching is case-sensitive.
    pub pattern: String,
    /// Directory to search, relative to /workspace or absolute under /workspace. Defaults to
    /// `.`, the workspace root.
    #[serde(default = "default_path")]
    pub path: String,
    /// Maximum number of paths to return. Defaults to 1000.
    #[serde(default = "default_limit")]
    #[schemars(range(min = 1))]
    pub limit: u32,
}

fn default_path() -> String {
    ".".to_owned()
}

fn default_limit() -> u32 {
    1000
}

/// The matching paths.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Output {
    /// Matching files, directories and symlinks, as paths relative to /workspace, sorted
    /// component by component (a directory's contents come right after the directory).
    /// Symlinks are listed but never followed.
    pub matches: Vec<String>,
    /// True when there were more matches than `limit`, or the tree was too large to search
    /// completely; narrow `path` or `pattern` to see the rest.
    pub truncated: bool,
}

/// The `glob` tool.
pub struct Glob;

impl Tool for Glob {
    const NAME: &str = "glob";
    const DESCRIPTION: &str = "Finds files and directories in the workspace (/workspace) whose \
        path matches a glob pattern such as `**/*.rs` or `src/**/test_*.py`, and returns \
        their paths sorted. Symlinks are listed, never followed.";
    type Input = Input;
    type Output = Output;

    fn run(input: Input) -> Result<Output, ToolError> {
        glob_in(Path::new(workspace::ROOT), &input)
    }
}

/// What `run` does, with the workspace at `root`.
pub fn glob_in(root: &Path, input: &Input) -> Result<Output, ToolError> {
    if input.limit == 0 {
        return Err(ToolError::invalid_input("limit must be at least 1"));
    }
    let limit = usize::try_from(input.limit).unwrap_or(usize::MAX);
    let (prefix, rest) = split_pattern(&input.pattern)?;
    let matcher = GlobBuilder::new(&rest)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map_err(|err| {
            ToolError::invalid_input(format!("invalid glob pattern `{}`: {err}", input.pattern))
        })?
        .compile_matcher();

    let dir = workspace::resolve_in(root, &input.path)?;
    let meta =
        std::fs::symlink_metadata(&dir).map_err(|err| workspace::io_error(&input.path, err))?;
    if !meta.is_dir() {
        return Err(ToolError::invalid_input(format!(
            "`{}` is not a directory; glob searches below a directory",
            input.path
        )));
    }
    // The pattern's literal leading components (`src` in `src/**/*.rs`) name the only
    // directory that can hold matches, so the walk starts there.
    let base = dir.join(&prefix);
    if !prefix.as_os_str().is_empty() {
        match std::fs::symlink_metadata(&base) {
            Ok(meta) if meta.is_dir() => {}
            // A missing directory, or a symlink, which the walk would not follow either.
            _ => {
                return Ok(Output {
                    matches: Vec::new(),
                    truncated: false,
                });
            }
        }
    }
    // Without `**`, nothing deeper than the pattern's own depth can match.
    let max_depth = if rest.contains("**") {
        None
    } else {
        Some(Path::new(&rest).components().count())
    };

    let mut matches = Vec::new();
    let mut truncated = false;
    let mut visited = 0usize;
    let walked = workspace::walk(&base, max_depth, &mut |path, relative, _| {
        visited += 1;
        if visited > MAX_VISITED {
            truncated = true;
            return Walk::Stop;
        }
        if matcher.is_match(relative) {
            if matches.len() == limit {
                truncated = true;
                return Walk::Stop;
            }
            matches.push(workspace::relative_in(root, path));
        }
        Walk::Continue
    });
    walked.map_err(|err| workspace::io_error(&input.path, err))?;
    Ok(Output { matches, truncated })
}

/// Splits `pattern` into its leading literal directories and the glob for the rest
/// (`src/lib/**/*.rs` into `src/lib` and `**/*.rs`). The last component always stays in the
/// glob, so a fully literal pattern still matches something. Refuses patterns that could
/// climb out of the search directory.
fn split_pattern(pattern: &str) -> Result<(PathBuf, String), ToolError> {
    if pattern.is_empty() {
        return Err(ToolError::invalid_input(
            "pattern is empty; use `*` for the entries of a directory or `**` for everything \
             below it",
        ));
    }
    if pattern.starts_with('/') {
        return Err(ToolError::invalid_input(format!(
            "pattern `{pattern}` is absolute; patterns are matched against paths relative to \
             `path`, so pass the directory as `path` and a relative pattern"
        )));
    }
    let components: Vec<&str> = pattern
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect();
    if components.contains(&"..") {
        return Err(ToolError::invalid_input(format!(
            "pattern `{pattern}` contains `..`; to search elsewhere, change `path`"
        )));
    }
    let is_literal = |c: &&&str| !c.contains(['*', '?', '[', ']', '{', '}', '\\']);
    let literal = components
        .iter()
        .take(components.len().saturating_sub(1))
        .take_while(is_literal)
        .count();
    let prefix: PathBuf = components[..literal].iter().collect();
    let rest = components[literal..].join("/");
    Ok((prefix, rest))
}

export_tool!(Glob);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use harness_tool_sdk::ErrorKind;

    #[test]
    fn splits_literal_prefixes() {
        let split = |p: &str| {
            let (prefix, rest) = split_pattern(p).unwrap();
            (prefix.to_string_lossy().into_owned(), rest)
        };
        assert_eq!(split("**/*.rs"), ("".into(), "**/*.rs".into()));
        assert_eq!(split("src/**/*.rs"), ("src".into(), "**/*.rs".into()));
        assert_eq!(split("./a/b/c.txt"), ("a/b".into(), "c.txt".into()));
        assert_eq!(split("Cargo.toml"), ("".into(), "Cargo.toml".into()));
        assert_eq!(split("a/[bc]/d"), ("a".into(), "[bc]/d".into()));
        assert_eq!(split("src//*.rs"), ("src".into(), "*.rs".into()));
        for bad in ["", "/etc/*", "../*", "a/../../b"] {
            assert_eq!(
                split_pattern(bad).unwrap_err().kind,
                ErrorKind::InvalidInput,
                "{bad}"
            );
        }
    }

    fn tree() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for dir in ["src/bin", "docs", "sub/deep/er"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        for file in [
            "Cargo.toml",
            "src/lib.rs",
            "src/main.rs",
            "src/bin/tool.rs",
            "docs/a.md",
            "docs/b.txt",
            "sub/deep/er/x.rs",
        ] {
            std::fs::write(root.join(file), "x").unwrap();
        }
        std::os::unix::fs::symlink("/", root.join("escape")).unwrap();
        std::os::unix::fs::symlink("..", root.join("src/up")).unwrap();
        tmp
    }

    fn run(root: &Path, pattern: &str, path: &str, limit: u32) -> Result<Output, ToolError> {
        glob_in(
            root,
            &Input {
                pattern: pattern.to_owned(),
                path: path.to_owned(),
                limit,
            },
        )
    }

    #[test]
    fn matches_sorted_relative_to_the_workspace() {
        let tmp = tree();
        let out = run(tmp.path(), "**/*.rs", ".", 1000).unwrap();
        assert_eq!(
            out.matches,
            [
                "src/bin/tool.rs",
                "src/lib.rs",
                "src/main.rs",
                "sub/deep/er/x.rs"
            ]
        );
        assert!(!out.truncated);

        let out = run(tmp.path(), "*.rs", "src", 1000).unwrap();
        assert_eq!(out.matches, ["src/lib.rs", "src/main.rs"]);

        let out = run(tmp.path(), "src/*", ".", 1000).unwrap();
        assert_eq!(
            out.matches,
            ["src/bin", "src/lib.rs", "src/main.rs", "src/up"]
        );

        let out = run(tmp.path(), "docs/*.{md,txt}", "/workspace", 1000).unwrap();
        assert_eq!(out.matches, ["docs/a.md", "docs/b.txt"]);

        let out = run(tmp.path(), "Cargo.toml", ".", 1000).unwrap();
        assert_eq!(out.matches, ["Cargo.toml"]);

        let out = run(tmp.path(), "nope/**", ".", 1000).unwrap();
        assert!(out.matches.is_empty());
    }

    #[test]
    fn never_follows_symlinks() {
        let tmp = tree();
        let out = run(tmp.path(), "**", ".", 1000).unwrap();
        assert!(out.matches.contains(&"escape".to_owned()));
        assert!(out.matches.contains(&"src/up".to_owned()));
        assert!(
            out.matches
                .iter()
                .all(|m| !m.starts_with("escape/") && !m.starts_with("src/up/")),
            "{:?}",
            out.matches
        );
        // A literal prefix through a symlink is not followed either.
        let out = run(tmp.path(), "escape/*", ".", 1000).unwrap();
        assert!(out.matches.is_empty());
    }

    #[test]
    fn limit_truncates_in_order() {
        let tmp = tree();
        let out = run(tmp.path(), "**/*.rs", ".", 2).unwrap();
        assert_eq!(out.matches, ["src/bin/tool.rs", "src/lib.rs"]);
        assert!(out.truncated);
        let out = run(tmp.path(), "**/*.rs", ".", 4).unwrap();
        assert!(!out.truncated);
    }

    #[test]
    fn bad_inputs_are_typed() {
        let tmp = tree();
        let kind = |pattern: &str, path: &str, limit| {
            run(tmp.path(), pattern, path, limit).unwrap_err().kind
        };
        assert_eq!(kind("*", "missing", 10), ErrorKind::NotFound);
        assert_eq!(kind("*", "Cargo.toml", 10), ErrorKind::InvalidInput);
        assert_eq!(kind("*", "escape", 10), ErrorKind::InvalidInput);
        assert_eq!(kind("*", "..", 10), ErrorKind::Denied);
        assert_eq!(kind("a[", ".", 10), ErrorKind::InvalidInput);
        assert_eq!(kind("*", ".", 0), ErrorKind::InvalidInput);
    }

    #[test]
    fn invoke_uses_defaults() {
        let json: serde_json::Value =
            serde_json::from_str(&harness_tool_sdk::describe::<Glob>()).unwrap();
        assert_eq!(json["input_schema"]["properties"]["limit"]["default"], 1000);
        assert_eq!(json["input_schema"]["properties"]["path"]["default"], ".");
        assert_eq!(
            json["input_schema"]["required"],
            serde_json::json!(["pattern"])
        );
    }
}
