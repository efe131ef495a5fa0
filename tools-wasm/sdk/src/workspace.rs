//! Path rules for tools that touch the session workspace.
//!
//! sandboxd preopens the session workspace at [`ROOT`] (`/workspace`) and nothing else, so
//! inside the component that directory is the whole visible filesystem. Tools still check
//! paths themselves, for two reasons: a model that asks for `../../etc/passwd` should get a
//! clear `denied` rather than a confusing "not found", and the check is lexical, so it says
//! the same thing whatever the host's layout.
//!
//! Symlinks are the host's job: wasmtime refuses to follow a link out of the preopen. That
//! refusal reaches the tool as an io error, which [`io_error`] turns into `denied` with a
//! message that names the path and leaks nothing else.

use std::io;
use std::path::{Component, Path, PathBuf};

use crate::ToolError;

/// Where the session workspace is mounted inside the component.
pub const ROOT: &str = "/workspace";

/// Resolves a path given by a model to an absolute path under [`ROOT`].
///
/// Accepts a path relative to `/workspace` (`src/main.rs`, `.`) or an absolute path under it
/// (`/workspace/src/main.rs`). `.` and `..` are resolved lexically; anything that would leave
/// `/workspace` on the way or at the end (`../../etc/passwd`, `/etc/passwd`,
/// `/workspace/../etc`) is refused with [`ErrorKind::Denied`](crate::ErrorKind::Denied).
/// An empty path is [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput).
pub fn resolve(path: &str) -> Result<PathBuf, ToolError> {
    if path.is_empty() {
        return Err(ToolError::invalid_input(
            "path is empty; use `.` for the workspace root",
        ));
    }
    if path.contains('\0') {
        return Err(ToolError::invalid_input(format!(
            "path `{}` contains a NUL byte",
            path.escape_default()
        )));
    }
    let outside = || {
        ToolError::denied(format!(
            "path `{path}` is outside {ROOT}; tools can only reach files under {ROOT}"
        ))
    };

    let given = Path::new(path);
    // Absolute paths are normalised from `/` and must land under `/workspace`; relative
    // paths are normalised from `/workspace` and must never climb above it.
    let absolute = given.is_absolute();
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for component in given.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => parts.push(name),
            Component::ParentDir => {
                if parts.pop().is_none() {
                    return Err(outside());
                }
                if absolute && parts.is_empty() {
                    // Popped `workspace` itself: whatever follows is outside, even if it
                    // climbs back in later, because the lexical walk left the sandbox.
                    return Err(outside());
                }
            }
            // Only exists on Windows; a tool never runs there, but refuse rather than guess.
            Component::Prefix(_) => return Err(outside()),
        }
    }

    let mut resolved = PathBuf::from(ROOT);
    let rest = if absolute {
        match parts.split_first() {
            Some((first, rest)) if *first == "workspace" => rest,
            _ => return Err(outside()),
        }
    } else {
        &parts[..]
    };
    resolved.extend(rest);
    Ok(resolved)
}

/// Like [`resolve`], but the workspace is at `root` instead of [`ROOT`]: the path is checked
/// exactly as [`resolve`] checks it (so `/workspace/a` still means the workspace's `a`) and
/// the result is `root` joined with the part under the workspace.
///
/// Tools call this with `Path::new(ROOT)` from `run` and with a temporary directory from
/// host tests, so the logic that touches files can be tested without a sandbox.
pub fn resolve_in(root: &Path, path: &str) -> Result<PathBuf, ToolError> {
    let resolved = resolve(path)?;
    // `resolve` only ever returns ROOT or a path below it.
    let rest = resolved.strip_prefix(ROOT).unwrap_or(Path::new(""));
    Ok(if rest.as_os_str().is_empty() {
        root.to_path_buf()
    } else {
        root.join(rest)
    })
}

/// The workspace-relative form of a path returned by [`resolve`], for tool output:
/// `/workspace/src/main.rs` becomes `src/main.rs` and `/workspace` becomes `.`.
pub fn relative(path: &Path) -> String {
    match path.strip_prefix(ROOT) {
        Ok(rest) if rest.as_os_str().is_empty() => ".".to_owned(),
        Ok(rest) => rest.to_string_lossy().into_owned(),
        // Not under ROOT: only happens if a caller skipped `resolve`; show it as is.
        Err(_) => path.to_string_lossy().into_owned(),
    }
}

/// Like [`relative`], for a path returned by [`resolve_in`] with the same `root`.
pub fn relative_in(root: &Path, path: &Path) -> String {
    match path.strip_prefix(root) {
        Ok(rest) if rest.as_os_str().is_empty() => ".".to_owned(),
        Ok(rest) => rest.to_string_lossy().into_owned(),
        Err(_) => path.to_string_lossy().into_owned(),
    }
}

/// What a [`walk`] visitor wants to happen next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// Go on; descend into the entry if it is a directory.
    Continue,
    /// Go on, but do not descend into this entry (no effect on non-directories).
    SkipDir,
    /// End the walk now.
    Stop,
}

/// Visits every entry below `dir` depth-first, without following symlinks.
///
/// The visitor gets each entry's full path, its path relative to `dir`, and its file type as
/// the directory listing reports it, which describes a symlink as a symlink. The entries of
/// each directory are visited in byte order of their names, so paths arrive sorted component
/// by component (`a`, `a/b`, `a.txt`), and a walk cut short with [`Walk::Stop`] has seen a
/// prefix of that order. `max_depth` limits how far down the walk goes: 1 visits only the
/// entries of `dir` itself.
///
/// Symlinks are reported and never followed, so a link to `/` or a link loop cannot take the
/// walk anywhere. Only an error listing `dir` itself is returned; a subdirectory that cannot
/// be listed (permissions, removed mid-walk) is skipped, since one unreadable corner should
/// not hide everything else.
pub fn walk(
    dir: &Path,
    max_depth: Option<usize>,
    visit: &mut dyn FnMut(&Path, &Path, std::fs::FileType) -> Walk,
) -> io::Result<()> {
    struct Entry {
        path: PathBuf,
        relative: PathBuf,
        file_type: std::fs::FileType,
    }

    fn list(dir: &Path, relative: &Path) -> io::Result<std::vec::IntoIter<Entry>> {
        let mut entries = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            // `DirEntry::file_type` does not traverse symlinks (unlike `metadata`).
            let file_type = entry.file_type()?;
            let name = entry.file_name();
            entries.push(Entry {
                path: entry.path(),
                relative: relative.join(&name),
                file_type,
            });
        }
        entries.sort_by(|a, b| a.path.file_name().cmp(&b.path.file_name()));
        Ok(entries.into_iter())
    }

    // An explicit stack instead of recursion: a deep tree must not overflow the component's
    // small stack.
    let mut stack = vec![list(dir, Path::new(""))?];
    while let Some(level) = stack.last_mut() {
        let Some(entry) = level.next() else {
            stack.pop();
            continue;
        };
        match visit(&entry.path, &entry.relative, entry.file_type) {
            Walk::Stop => return Ok(()),
            Walk::SkipDir => continue,
            Walk::Continue => {}
        }
        let depth = stack.len();
        if entry.file_type.is_dir()
            && max_depth.is_none_or(|max| depth < max)
            && let Ok(children) = list(&entry.path, &entry.relative)
        {
            stack.push(children);
        }
    }
    Ok(())
}

/// Turns an io error on `path` (as the model gave it) into a [`ToolError`] whose message
/// names the path.
///
/// Permission errors become `denied`: inside the component they mean the workspace is
/// mounted read-only or the path goes through a symlink that leads outside `/workspace`,
/// which wasmtime refuses to follow. Neither case exposes anything beyond the path.
pub fn io_error(path: &str, err: io::Error) -> ToolError {
    match err.kind() {
        io::ErrorKind::NotFound => ToolError::not_found(format!("`{path}` does not exist")),
        io::ErrorKind::PermissionDenied => ToolError::denied(format!(
            "access to `{path}` was refused: either the workspace is read-only for this \
             session or the path goes through a symlink that leads outside {ROOT}"
        )),
        io::ErrorKind::ReadOnlyFilesystem => ToolError::denied(format!(
            "cannot modify `{path}`: the workspace is read-only for this session"
        )),
        io::ErrorKind::NotADirectory => ToolError::invalid_input(format!(
            "`{path}` (or one of its parent components) is not a directory"
        )),
        io::ErrorKind::IsADirectory => ToolError::invalid_input(format!("`{path}` is a directory")),
        io::ErrorKind::StorageFull => ToolError::failed(format!(
            "cannot write `{path}`: the workspace is full (its size or file-count cap for this \
             session is reached); delete files or ask for a larger workspace"
        )),
        _ => ToolError::failed(format!("`{path}`: {err}")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::ErrorKind;

    fn ok(path: &str) -> String {
        resolve(path).unwrap().to_string_lossy().into_owned()
    }

    fn kind(path: &str) -> ErrorKind {
        resolve(path).unwrap_err().kind
    }

    #[test]
    fn relative_paths_land_under_workspace() {
        assert_eq!(ok("."), "/workspace");
        assert_eq!(ok("./"), "/workspace");
        assert_eq!(ok("a.txt"), "/workspace/a.txt");
        assert_eq!(ok("src/main.rs"), "/workspace/src/main.rs");
        assert_eq!(ok("./src//./main.rs"), "/workspace/src/main.rs");
        assert_eq!(ok("src/../README.md"), "/workspace/README.md");
        assert_eq!(ok("a/b/../../c"), "/workspace/c");
        assert_eq!(ok("dir/"), "/workspace/dir");
    }

    #[test]
    fn absolute_paths_under_workspace_are_accepted() {
        assert_eq!(ok("/workspace"), "/workspace");
        assert_eq!(ok("/workspace/"), "/workspace");
        assert_eq!(ok("/workspace/a/b.txt"), "/workspace/a/b.txt");
        assert_eq!(ok("//workspace/./a/../b"), "/workspace/b");
    }

    #[test]
    fn escapes_are_denied() {
        for path in [
            "..",
            "../",
            "../../etc/passwd",
            "a/../../b",
            "a/../..",
            "/etc/passwd",
            "/",
            "/..",
            "/workspace/../etc",
            "/workspace/..",
            "/workspace/../workspace/a",
            "/workspacex/a",
            "/work/space",
            "/tmp/workspace",
        ] {
            assert_eq!(kind(path), ErrorKind::Denied, "{path}");
        }
    }

    #[test]
    fn denial_names_the_path_and_the_root() {
        let err = resolve("../../etc/passwd").unwrap_err();
        assert!(
            err.message.contains("`../../etc/passwd`"),
            "{}",
            err.message
        );
        assert!(
            err.message.contains("outside /workspace"),
            "{}",
            err.message
        );
    }

    #[test]
    fn empty_and_nul_are_invalid_input() {
        assert_eq!(kind(""), ErrorKind::InvalidInput);
        assert_eq!(kind("a\0b"), ErrorKind::InvalidInput);
    }

    #[test]
    fn relative_strips_the_root() {
        assert_eq!(relative(Path::new("/workspace")), ".");
        assert_eq!(relative(Path::new("/workspace/a/b")), "a/b");
        assert_eq!(relative(&resolve("x/../y").unwrap()), "y");
    }

    #[test]
    fn resolve_in_maps_the_workspace_onto_root() {
        let root = Path::new("/tmp/ws");
        assert_eq!(resolve_in(root, ".").unwrap(), Path::new("/tmp/ws"));
        assert_eq!(resolve_in(root, "a/b").unwrap(), Path::new("/tmp/ws/a/b"));
        assert_eq!(
            resolve_in(root, "/workspace/a/../c").unwrap(),
            Path::new("/tmp/ws/c")
        );
        assert_eq!(
            resolve_in(root, "../x").unwrap_err().kind,
            ErrorKind::Denied
        );
        assert_eq!(
            resolve_in(root, "/tmp/ws/a").unwrap_err().kind,
            ErrorKind::Denied
        );
        assert_eq!(relative_in(root, Path::new("/tmp/ws")), ".");
        assert_eq!(relative_in(root, Path::new("/tmp/ws/a/b")), "a/b");
    }

    fn walked(dir: &Path, max_depth: Option<usize>) -> Vec<String> {
        let mut seen = Vec::new();
        walk(dir, max_depth, &mut |path, relative, file_type| {
            assert_eq!(path, dir.join(relative));
            let mark = if file_type.is_symlink() {
                "@"
            } else if file_type.is_dir() {
                "/"
            } else {
                ""
            };
            seen.push(format!("{}{mark}", relative.display()));
            Walk::Continue
        })
        .unwrap();
        seen
    }

    #[test]
    fn walk_visits_in_component_order_without_following_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::write(dir.join("a/b/deep.txt"), "x").unwrap();
        std::fs::write(dir.join("a.txt"), "x").unwrap();
        std::fs::write(dir.join("a/z.txt"), "x").unwrap();
        std::os::unix::fs::symlink("/", dir.join("root")).unwrap();
        std::os::unix::fs::symlink(".", dir.join("a/loop")).unwrap();

        assert_eq!(
            walked(dir, None),
            [
                "a/",
                "a/b/",
                "a/b/deep.txt",
                "a/loop@",
                "a/z.txt",
                "a.txt",
                "root@"
            ]
        );
        assert_eq!(walked(dir, Some(1)), ["a/", "a.txt", "root@"]);
        assert_eq!(
            walked(dir, Some(2)),
            ["a/", "a/b/", "a/loop@", "a/z.txt", "a.txt", "root@"]
        );
    }

    #[test]
    fn walk_obeys_skip_and_stop() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        std::fs::create_dir_all(dir.join("c")).unwrap();
        std::fs::write(dir.join("c/x"), "x").unwrap();

        let mut seen = Vec::new();
        walk(dir, None, &mut |_, relative, _| {
            seen.push(relative.display().to_string());
            if relative == Path::new("a") {
                Walk::SkipDir
            } else if relative == Path::new("c") {
                Walk::Stop
            } else {
                Walk::Continue
            }
        })
        .unwrap();
        assert_eq!(seen, ["a", "c"]);

        let err = walk(&dir.join("missing"), None, &mut |_, _, _| Walk::Continue).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn io_errors_name_the_path() {
        let err = io_error("a.txt", io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(err.kind, ErrorKind::NotFound);
        assert!(err.message.contains("`a.txt`"));

        let err = io_error("link/x", io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(err.kind, ErrorKind::Denied);
        assert!(err.message.contains("`link/x`"));
        assert!(err.message.contains("symlink"));

        let err = io_error("big", io::Error::from(io::ErrorKind::StorageFull));
        assert_eq!(err.kind, ErrorKind::Failed);
        assert!(
            err.message.contains("the workspace is full"),
            "{}",
            err.message
        );

        let err = io_error("f", io::Error::other("disk on fire"));
        assert_eq!(err.kind, ErrorKind::Failed);
        assert!(err.message.contains("disk on fire"));
    }
}
