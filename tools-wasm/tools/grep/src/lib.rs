//! Standard tool `grep`: searches workspace files for lines matching a regular expression,
//! without following symlinks.

use std::io::Read;
use std::path::Path;

use globset::{GlobBuilder, GlobMatcher};
use harness_tool_sdk::workspace::{self, Walk};
use harness_tool_sdk::{Tool, ToolError, export_tool};
use regex::{Regex, RegexBuilder};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Files larger than this are skipped: they are rarely source, and reading them would eat
/// the call's memory and time.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// A NUL byte in this many leading bytes marks a file as binary, as git and ripgrep do.
const BINARY_SNIFF_BYTES: usize = 8 * 1024;
/// Matched and context lines are cut to this many bytes; one minified line could otherwise
/// fill the whole output.
const MAX_LINE_BYTES: usize = 1000;
/// Directory entries looked at before the search stops and reports `truncated`.
const MAX_VISITED: usize = 200_000;
/// Upper bound of `context`.
const MAX_CONTEXT: u32 = 10;

/// What to search for, and where.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Input {
    /// Regular expression (Rust `regex` syntax, like ripgrep's) matched against each line,
    /// e.g. `fn\s+main`, `TODO|FIXME`. A match anywhere in the line counts; use `^` and `$`
    /// to anchor.
    pub pattern: String,
    /// File or directory to search, relative to /workspace or absolute under /workspace.
    /// Directories are searched recursively. Defaults to `.`, the whole workspace.
    #[serde(default = "default_path")]
    pub path: String,
    /// Only search files whose path matches this glob, e.g. `*.rs` or `src/**/*.py`. A glob
    /// without `/` is matched against the file name, one with `/` against the path relative
    /// to `path`.
    pub glob: Option<String>,
    /// Match letters regardless of case. Defaults to false.
    #[serde(default)]
    pub case_insensitive: bool,
    /// Number of lines to include before and after each matching line, 0 to 10. Defaults to
    /// 0.
    #[serde(default)]
    #[schemars(range(max = 10))]
    pub context: u32,
    /// Maximum number of matching lines to return. Defaults to 200.
    #[serde(default = "default_max_matches")]
    #[schemars(range(min = 1))]
    pub max_matches: u32,
}

fn default_path() -> String {
    ".".to_owned()
}

fn default_max_matches() -> u32 {
    200
}

/// The matching lines.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Output {
    /// Matching lines in path order, then line order.
    pub matches: Vec<Match>,
    /// Number of files searched. Binary files, files over 4 MiB and symlinks are skipped
    /// and not counted.
    pub files_searched: u64,
    /// True when there were more matches than `max_matches`, or the tree was too large to
    /// search completely; narrow `path`, `glob` or `pattern` to see the rest.
    pub truncated: bool,
}

/// One matching line.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Match {
    /// The file's path relative to /workspace.
    pub path: String,
    /// Line number, 1-based.
    pub line_number: u64,
    /// The matching line without its line ending; lines over 1000 bytes are cut and end in
    /// `…`.
    pub line: String,
    /// Up to `context` lines before the match, in file order.
    pub before: Vec<String>,
    /// Up to `context` lines after the match, in file order.
    pub after: Vec<String>,
}

/// The `grep` tool.
pub struct Grep;

impl Tool for Grep {
    const NAME: &str = "grep";
    const DESCRIPTION: &str = "Searches files in the workspace (/workspace) for lines matching \
        a regular expression and returns each match with its path, line number and optional \
        context lines. Searches directories recursively; filter files with `glob`. Skips \
        binary files, files over 4 MiB and symlinks.";
    type Input = Input;
    type Output = Output;

    fn run(input: Input) -> Result<Output, ToolError> {
        grep_in(Path::new(workspace::ROOT), &input)
    }
}

/// Where a glob filter is matched.
enum FileFilter {
    /// A pattern without `/`: the file name.
    Name(GlobMatcher),
    /// A pattern with `/`: the path relative to the search directory.
    Path(GlobMatcher),
}

impl FileFilter {
    fn new(glob: &str) -> Result<Self, ToolError> {
        let matcher = GlobBuilder::new(glob.trim_start_matches("./"))
            .literal_separator(true)
            .backslash_escape(true)
            .build()
            .map_err(|err| ToolError::invalid_input(format!("invalid glob `{glob}`: {err}")))?
            .compile_matcher();
        Ok(if glob.contains('/') {
            Self::Path(matcher)
        } else {
            Self::Name(matcher)
        })
    }

    fn accepts(&self, relative: &Path) -> bool {
        match self {
            Self::Name(matcher) => relative
                .file_name()
                .is_some_and(|name| matcher.is_match(name)),
            Self::Path(matcher) => matcher.is_match(relative),
        }
    }
}

/// The search state shared by every file.
struct Search<'a> {
    root: &'a Path,
    regex: Regex,
    context: usize,
    max_matches: usize,
    matches: Vec<Match>,
    files_searched: u64,
    truncated: bool,
}

impl Search<'_> {
    /// Searches one file; returns false once the search should stop.
    fn file(&mut self, path: &Path) -> bool {
        let Some(text) = read_text(path) else {
            return true;
        };
        self.files_searched += 1;
        let lines: Vec<&str> = text
            .split('\n')
            .map(|line| line.strip_suffix('\r').unwrap_or(line))
            .collect();
        // `split` yields an empty piece after a trailing newline (or for an empty file); it
        // is not a line.
        let count = if text.is_empty() || text.ends_with('\n') {
            lines.len().saturating_sub(1)
        } else {
            lines.len()
        };
        let shown = |range: std::ops::Range<usize>| -> Vec<String> {
            lines[range].iter().map(|line| cut(line)).collect()
        };
        for (index, line) in lines.iter().take(count).enumerate() {
            if !self.regex.is_match(line) {
                continue;
            }
            if self.matches.len() == self.max_matches {
                self.truncated = true;
                return false;
            }
            self.matches.push(Match {
                path: workspace::relative_in(self.root, path),
                line_number: u64::try_from(index + 1).unwrap_or(u64::MAX),
                line: cut(line),
                before: shown(index.saturating_sub(self.context)..index),
                after: shown(index + 1..(index + 1 + self.context).min(count)),
            });
        }
        true
    }
}

/// What `run` does, with the workspace at `root`.
pub fn grep_in(root: &Path, input: &Input) -> Result<Output, ToolError> {
    if input.context > MAX_CONTEXT {
        return Err(ToolError::invalid_input(format!(
            "context is {}; at most {MAX_CONTEXT} lines of context are returned",
            input.context
        )));
    }
    if input.max_matches == 0 {
        return Err(ToolError::invalid_input("max_matches must be at least 1"));
    }
    let regex = RegexBuilder::new(&input.pattern)
        .case_insensitive(input.case_insensitive)
        .build()
        .map_err(|err| {
            ToolError::invalid_input(format!(
                "invalid regular expression `{}`: {err}",
                input.pattern
            ))
        })?;
    let filter = input.glob.as_deref().map(FileFilter::new).transpose()?;

    let start = workspace::resolve_in(root, &input.path)?;
    let meta =
        std::fs::symlink_metadata(&start).map_err(|err| workspace::io_error(&input.path, err))?;
    let mut search = Search {
        root,
        regex,
        context: usize::try_from(input.context).unwrap_or(0),
        max_matches: usize::try_from(input.max_matches).unwrap_or(usize::MAX),
        matches: Vec::new(),
        files_searched: 0,
        truncated: false,
    };

    if meta.is_file() {
        // A file named explicitly is searched whatever the glob says.
        search.file(&start);
    } else if meta.is_dir() {
        let mut visited = 0usize;
        let mut too_many = false;
        workspace::walk(&start, None, &mut |path, relative, file_type| {
            visited += 1;
            if visited > MAX_VISITED {
                too_many = true;
                return Walk::Stop;
            }
            if !file_type.is_file() || filter.as_ref().is_some_and(|f| !f.accepts(relative)) {
                return Walk::Continue;
            }
            if search.file(path) {
                Walk::Continue
            } else {
                Walk::Stop
            }
        })
        .map_err(|err| workspace::io_error(&input.path, err))?;
        search.truncated |= too_many;
    } else {
        return Err(ToolError::invalid_input(format!(
            "`{}` is a symlink or special file; grep does not follow symlinks",
            input.path
        )));
    }

    Ok(Output {
        matches: search.matches,
        files_searched: search.files_searched,
        truncated: search.truncated,
    })
}

/// The text of a file worth searching, or `None` for one that is skipped: unreadable, too
/// large, or binary. Invalid UTF-8 in a text file is replaced rather than skipping the file.
fn read_text(path: &Path) -> Option<String> {
    let file = std::fs::File::open(path).ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > MAX_FILE_BYTES {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).ok()?;
    if u64::try_from(bytes.len()).ok()? > MAX_FILE_BYTES {
        return None;
    }
    let sniff = &bytes[..bytes.len().min(BINARY_SNIFF_BYTES)];
    if sniff.contains(&0) {
        return None;
    }
    Some(match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(err) => String::from_utf8_lossy(err.as_bytes()).into_owned(),
    })
}

/// `line`, cut at a character boundary to at most [`MAX_LINE_BYTES`] plus a marker.
fn cut(line: &str) -> String {
    if line.len() <= MAX_LINE_BYTES {
        return line.to_owned();
    }
    let mut end = MAX_LINE_BYTES;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &line[..end])
}

export_tool!(Grep);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use harness_tool_sdk::ErrorKind;

    fn input(pattern: &str) -> Input {
        serde_json::from_value(serde_json::json!({ "pattern": pattern })).unwrap()
    }

    fn tree() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("src/deep")).unwrap();
        std::fs::write(root.join("src/main.rs"), "fn main() {\n    todo!();\n}\n").unwrap();
        std::fs::write(
            root.join("src/deep/lib.rs"),
            "// TODO one\nfn a() {}\r\n// todo two\nfn b() {}\n",
        )
        .unwrap();
        std::fs::write(root.join("notes.md"), "TODO: write docs").unwrap();
        std::fs::write(root.join("blob.bin"), b"TODO\0binary").unwrap();
        std::fs::write(root.join("latin1.txt"), b"caf\xe9 TODO\n").unwrap();
        std::os::unix::fs::symlink("/", root.join("escape")).unwrap();
        std::os::unix::fs::symlink("notes.md", root.join("link.md")).unwrap();
        tmp
    }

    fn found(out: &Output) -> Vec<(String, u64)> {
        out.matches
            .iter()
            .map(|m| (m.path.clone(), m.line_number))
            .collect()
    }

    #[test]
    fn finds_lines_across_the_tree() {
        let tmp = tree();
        let out = grep_in(tmp.path(), &input("TODO")).unwrap();
        assert_eq!(
            found(&out),
            [
                ("latin1.txt".into(), 1),
                ("notes.md".into(), 1),
                ("src/deep/lib.rs".into(), 1)
            ]
        );
        // blob.bin is binary, symlinks are skipped: latin1, notes, lib.rs, main.rs.
        assert_eq!(out.files_searched, 4);
        assert!(!out.truncated);
        assert_eq!(out.matches[0].line, "caf\u{fffd} TODO");

        let mut ci = input("todo");
        ci.case_insensitive = true;
        ci.path = "src".into();
        let out = grep_in(tmp.path(), &ci).unwrap();
        assert_eq!(
            found(&out),
            [
                ("src/deep/lib.rs".into(), 1),
                ("src/deep/lib.rs".into(), 3),
                ("src/main.rs".into(), 2)
            ]
        );
    }

    #[test]
    fn context_lines_stay_inside_the_file() {
        let tmp = tree();
        let mut i = input("^fn a");
        i.context = 2;
        let out = grep_in(tmp.path(), &i).unwrap();
        assert_eq!(out.matches.len(), 1);
        let m = &out.matches[0];
        assert_eq!(m.line, "fn a() {}");
        assert_eq!(m.before, ["// TODO one"]);
        assert_eq!(m.after, ["// todo two", "fn b() {}"]);
    }

    #[test]
    fn glob_filters_by_name_or_path() {
        let tmp = tree();
        let mut i = input("TODO|todo");
        i.glob = Some("*.rs".into());
        let files: Vec<_> = found(&grep_in(tmp.path(), &i).unwrap())
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(files, ["src/deep/lib.rs", "src/deep/lib.rs", "src/main.rs"]);

        i.glob = Some("src/*.rs".into());
        let files: Vec<_> = found(&grep_in(tmp.path(), &i).unwrap())
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(files, ["src/main.rs"]);
    }

    #[test]
    fn max_matches_truncates() {
        let tmp = tree();
        let mut i = input("(?i)todo");
        i.max_matches = 2;
        let out = grep_in(tmp.path(), &i).unwrap();
        assert_eq!(out.matches.len(), 2);
        assert!(out.truncated);
    }

    #[test]
    fn a_single_file_can_be_searched() {
        let tmp = tree();
        let mut i = input("main");
        i.path = "/workspace/src/main.rs".into();
        let out = grep_in(tmp.path(), &i).unwrap();
        assert_eq!(found(&out), [("src/main.rs".into(), 1)]);
        assert_eq!(out.files_searched, 1);
    }

    #[test]
    fn long_lines_are_cut_at_a_char_boundary() {
        let line = "é".repeat(MAX_LINE_BYTES);
        let shown = cut(&line);
        assert!(shown.ends_with('…'));
        assert!(shown.len() <= MAX_LINE_BYTES + '…'.len_utf8());
        assert_eq!(cut("short"), "short");
    }

    #[test]
    fn bad_inputs_are_typed() {
        let tmp = tree();
        let err = grep_in(tmp.path(), &input("a(")).unwrap_err();
        assert_eq!(err.kind, ErrorKind::InvalidInput);
        assert!(err.message.contains("unclosed group"), "{}", err.message);

        let kind = |i: Input| grep_in(tmp.path(), &i).unwrap_err().kind;
        let mut i = input("x");
        i.context = 11;
        assert_eq!(kind(i), ErrorKind::InvalidInput);
        let mut i = input("x");
        i.max_matches = 0;
        assert_eq!(kind(i), ErrorKind::InvalidInput);
        let mut i = input("x");
        i.glob = Some("a[".into());
        assert_eq!(kind(i), ErrorKind::InvalidInput);
        let mut i = input("x");
        i.path = "../etc".into();
        assert_eq!(kind(i), ErrorKind::Denied);
        let mut i = input("x");
        i.path = "missing".into();
        assert_eq!(kind(i), ErrorKind::NotFound);
        let mut i = input("x");
        i.path = "escape".into();
        assert_eq!(kind(i), ErrorKind::InvalidInput);
    }

    #[test]
    fn schema_has_bounds_and_defaults() {
        let json: serde_json::Value =
            serde_json::from_str(&harness_tool_sdk::describe::<Grep>()).unwrap();
        let props = &json["input_schema"]["properties"];
        assert_eq!(props["context"]["maximum"], 10);
        assert_eq!(props["max_matches"]["default"], 200);
        assert_eq!(
            json["input_schema"]["required"],
            serde_json::json!(["pattern"])
        );
    }
}
