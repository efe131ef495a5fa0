//! The standard tools and sandboxd's test tools, compiled for `wasm32-wasip2`.
//!
//! The build script builds them from source on every build where their sources changed (see
//! `build.rs`) and copies the components into this crate's `OUT_DIR`, so sandboxd's tests and
//! the demo can point a tools directory at [`tools_dir`] (or [`test_tools_dir`]) without any
//! committed binaries.

use std::path::{Path, PathBuf};

/// Names of the standard tools, sorted; each is a file `<name>.wasm` in [`tools_dir`].
pub const STANDARD_TOOLS: &[&str] = &[
    "edit_file",
    "glob",
    "grep",
    "http_fetch",
    "list_dir",
    "read_file",
    "write_file",
];

/// Names of the tools that exist only for sandboxd's tests, sorted; each is a file
/// `<name>.wasm` in [`test_tools_dir`], never in [`tools_dir`].
///
/// - `misbehave`: input `{"action": ...}` with the actions `spin`, `grow_memory {bytes}`,
///   `flood_stdout {bytes}`, `panic {message}`, `connect {address}`, `sleep {ms}`,
///   `echo {value}`, `env {name}` and `read_path {path}`.
/// - `tally`: input `{file, label}`; appends `label` as a line to `/workspace/<file>` and
///   returns `{count}`, the file's line count.
pub const TEST_TOOLS: &[&str] = &["misbehave", "tally"];

/// The directory holding the standard tool components, suitable as sandboxd's `tools-dir`.
///
/// It lives in this crate's build output, so it exists wherever this crate was built; copy
/// the files elsewhere to deploy them.
pub fn tools_dir() -> &'static Path {
    Path::new(concat!(env!("OUT_DIR"), "/tools"))
}

/// The path of one tool's component, `<tools_dir>/<name>.wasm`. Does not check that the tool
/// exists; see [`STANDARD_TOOLS`].
pub fn tool_path(name: &str) -> PathBuf {
    tools_dir().join(format!("{name}.wasm"))
}

/// The directory holding the test tool components ([`TEST_TOOLS`]); copy the ones a test
/// needs next to the standard tools, or use it as a tools directory of its own.
pub fn test_tools_dir() -> &'static Path {
    Path::new(concat!(env!("OUT_DIR"), "/test-tools"))
}

/// The path of one test tool's component, `<test_tools_dir>/<name>.wasm`. Does not check
/// that the tool exists; see [`TEST_TOOLS`].
pub fn test_tool_path(name: &str) -> PathBuf {
    test_tools_dir().join(format!("{name}.wasm"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// `\0asm` plus the component-model layer/version; a core module has `01 00 00 00`.
    const COMPONENT_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];

    fn file_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn wasm_names(tools: &[&str]) -> Vec<String> {
        tools.iter().map(|name| format!("{name}.wasm")).collect()
    }

    #[test]
    fn lists_are_sorted_and_disjoint() {
        for list in [STANDARD_TOOLS, TEST_TOOLS] {
            assert!(list.is_sorted(), "{list:?}");
        }
        assert!(STANDARD_TOOLS.iter().all(|tool| !TEST_TOOLS.contains(tool)));
    }

    #[test]
    fn every_tool_is_a_component() {
        let paths = STANDARD_TOOLS
            .iter()
            .map(|name| tool_path(name))
            .chain(TEST_TOOLS.iter().map(|name| test_tool_path(name)));
        for path in paths {
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(bytes[..8], COMPONENT_HEADER, "{}", path.display());
        }
    }

    #[test]
    fn tools_dir_holds_exactly_the_standard_tools() {
        assert_eq!(file_names(tools_dir()), wasm_names(STANDARD_TOOLS));
    }

    #[test]
    fn test_tools_dir_holds_exactly_the_test_tools() {
        assert_eq!(file_names(test_tools_dir()), wasm_names(TEST_TOOLS));
    }
}
