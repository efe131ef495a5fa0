//! The standard tools (`list_dir`, `read_file`, `write_file`) compiled for `wasm32-wasip2`.
//!
//! The build script builds them from source on every build where their sources changed (see
//! `build.rs`) and copies the components into this crate's `OUT_DIR`, so sandboxd's tests and
//! the demo can point a tools directory at [`tools_dir`] without any committed binaries.

use std::path::{Path, PathBuf};

/// Names of the standard tools, sorted; each is a file `<name>.wasm` in [`tools_dir`].
pub const STANDARD_TOOLS: &[&str] = &["list_dir", "read_file", "write_file"];

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// `\0asm` plus the component-model layer/version; a core module has `01 00 00 00`.
    const COMPONENT_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];

    #[test]
    fn every_standard_tool_is_a_component() {
        for name in STANDARD_TOOLS {
            let path = tool_path(name);
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(bytes[..8], COMPONENT_HEADER, "{}", path.display());
        }
    }

    #[test]
    fn tools_dir_holds_exactly_the_standard_tools() {
        let mut names: Vec<String> = std::fs::read_dir(tools_dir())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let expected: Vec<String> = STANDARD_TOOLS
            .iter()
            .map(|name| format!("{name}.wasm"))
            .collect();
        assert_eq!(names, expected);
    }
}
