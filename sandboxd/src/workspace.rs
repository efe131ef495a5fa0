//! A session's workspace directory and the file operations the daemon performs
//! in it on behalf of callers.
//!
//! The sandbox can plant symlinks in its workspace, so the daemon must never
//! become a confused deputy: every path is checked lexically (relative, no `..`
//! that climbs out) and then opened through a `cap_std::fs::Dir` rooted at the
//! workspace, which refuses to follow any symlink or `..` that leads outside.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use cap_std::fs::Dir;

/// Errors of workspace operations.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    /// The path is absolute, empty, or climbs out of the workspace.
    #[error("path {path:?} is outside the workspace: {why}")]
    OutsideWorkspace {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The path resolved (through a symlink) to a place outside the workspace.
    #[error("path {path:?} escapes the workspace through a symlink or `..`")]
    Escape {
        /// The path as given.
        path: String,
        /// The refusal from the beneath-resolver.
        #[source]
        source: std::io::Error,
    },
    /// The file does not exist.
    #[error("no such file in the workspace: {path:?}")]
    NotFound {
        /// The path as given.
        path: String,
    },
    /// The file is larger than allowed.
    #[error("file {path:?} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// The path.
        path: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The write would take the workspace over its size cap.
    #[error(
        "writing {path:?} would take the workspace to {would_be} bytes, over its cap of {cap} bytes"
    )]
    QuotaExceeded {
        /// The path.
        path: String,
        /// Workspace size after the write.
        would_be: u64,
        /// The cap.
        cap: u64,
    },
    /// Any other I/O failure.
    #[error("{op} {path:?} failed")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What deleting a workspace removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RemovalStats {
    /// Files (and symlinks) removed.
    pub files: u64,
    /// Bytes in those files.
    pub bytes: u64,
}

/// A session workspace on the host. It holds no open descriptor between
/// operations, so idle sessions cost no file descriptors.
#[derive(Debug)]
pub struct Workspace {
    root: PathBuf,
    size_cap: u64,
    owner: Option<(u32, u32)>,
}

impl Workspace {
    /// Creates the workspace directory (mode 0700) and opens it.
    pub fn create(root: PathBuf, size_cap: u64) -> Result<Self, WorkspaceError> {
        let io = |op, source| WorkspaceError::Io {
            op,
            path: root.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&root).map_err(|e| io("create workspace", e))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("chmod workspace", e))?;
        Ok(Self {
            root,
            size_cap,
            owner: None,
        })
    }

    /// Opens the workspace root for beneath-resolution. The root path itself
    /// is sandboxd's own (under its state dir), so reopening it is safe.
    fn dir(&self) -> Result<Dir, WorkspaceError> {
        Dir::open_ambient_dir(&self.root, cap_std::ambient_authority()).map_err(|source| {
            WorkspaceError::Io {
                op: "open workspace",
                path: self.root.display().to_string(),
                source,
            }
        })
    }

    /// Hands the workspace to a process sandbox's user: chowns everything
    /// in it now (only sandboxd has written to it so far, so walking paths is
    /// safe), and every file or directory written later.
    pub fn set_owner(&mut self, uid: u32, gid: u32) -> Result<(), WorkspaceError> {
        chown_tree(&self.root, uid, gid).map_err(|source| WorkspaceError::Io {
            op: "chown",
            path: self.root.display().to_string(),
            source,
        })?;
        self.owner = Some((uid, gid));
        Ok(())
    }

    /// Gives `rel` and the directories leading to it to the owner: each
    /// entry is changed through its parent directory, opened beneath the
    /// root, without following a final symlink (a planted link is changed
    /// itself, never its target).
    fn chown_written(&self, dir: &Dir, path: &str, rel: &Path) -> Result<(), WorkspaceError> {
        let Some((uid, gid)) = self.owner else {
            return Ok(());
        };
        let owner = (
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        );
        let mut parent = PathBuf::new();
        for component in rel.components() {
            let opened;
            let parent_dir = if parent.as_os_str().is_empty() {
                dir
            } else {
                opened = dir
                    .open_dir(&parent)
                    .map_err(|e| classify(path, "open for chown", e))?;
                &opened
            };
            nix::unistd::fchownat(
                parent_dir,
                component.as_os_str(),
                owner.0,
                owner.1,
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| classify(path, "chown", e.into()))?;
            parent.push(component);
        }
        Ok(())
    }

    /// The workspace's host path.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes a whole file, creating parent directories. `mode` 0 means 0644;
    /// only permission bits are honoured (no setuid, setgid or sticky).
    pub fn write_file(&self, path: &str, content: &[u8], mode: u32) -> Result<u64, WorkspaceError> {
        let rel = checked_relative(path)?;
        let dir = self.dir()?;
        let existing = existing_file_size(&dir, path, &rel)?;
        let used = self.usage()?.bytes;
        let content_len = content.len() as u64;
        let would_be = used.saturating_sub(existing).saturating_add(content_len);
        if would_be > self.size_cap {
            return Err(WorkspaceError::QuotaExceeded {
                path: path.to_owned(),
                would_be,
                cap: self.size_cap,
            });
        }
        if let Some(parent) = rel.parent().filter(|p| !p.as_os_str().is_empty()) {
            dir.create_dir_all(parent)
                .map_err(|e| classify(path, "create parent directories of", e))?;
        }
        dir.write(&rel, content)
            .map_err(|e| classify(path, "write", e))?;
        let mode = if mode == 0 { 0o644 } else { mode & 0o777 };
        dir.set_permissions(
            &rel,
            cap_std::fs::Permissions::from_std(std::fs::Permissions::from_mode(mode)),
        )
        .map_err(|e| classify(path, "chmod", e))?;
        self.chown_written(&dir, path, &rel)?;
        Ok(content_len)
    }

    /// Reads up to `limit` bytes of a file; returns the bytes, the full size
    /// and whether the content was cut.
    pub fn read_file(
        &self,
        path: &str,
        limit: u64,
    ) -> Result<(Vec<u8>, u64, bool), WorkspaceError> {
        let rel = checked_relative(path)?;
        let file = self
            .dir()?
            .open(&rel)
            .map_err(|e| classify(path, "open", e))?;
        let size = file
            .metadata()
            .map_err(|e| classify(path, "stat", e))?
            .len();
        let mut content = Vec::with_capacity(usize::try_from(size.min(limit)).unwrap_or(0));
        file.take(limit)
            .read_to_end(&mut content)
            .map_err(|e| classify(path, "read", e))?;
        Ok((content, size, size > limit))
    }

    /// Total files and bytes in the workspace (symlinks are counted, never
    /// followed).
    pub fn usage(&self) -> Result<RemovalStats, WorkspaceError> {
        tree_stats(&self.root).map_err(|source| WorkspaceError::Io {
            op: "measure",
            path: self.root.display().to_string(),
            source,
        })
    }

    /// Deletes the workspace and everything in it.
    pub fn remove(self) -> Result<RemovalStats, WorkspaceError> {
        let stats = self.usage()?;
        // std's remove_dir_all never follows symlinks, so a planted link to a
        // host directory is unlinked, not recursed into.
        std::fs::remove_dir_all(&self.root).map_err(|source| WorkspaceError::Io {
            op: "remove",
            path: self.root.display().to_string(),
            source,
        })?;
        Ok(stats)
    }
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if std::fs::symlink_metadata(path)?.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

fn existing_file_size(dir: &Dir, path: &str, rel: &Path) -> Result<u64, WorkspaceError> {
    match dir.symlink_metadata(rel) {
        Ok(meta) if meta.is_file() => Ok(meta.len()),
        Ok(_) => Ok(0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(classify(path, "stat", e)),
    }
}

/// Checks a caller-supplied path lexically: relative, non-empty, and no `..`
/// that would climb above the workspace root. Returns it normalised.
pub fn checked_relative(path: &str) -> Result<PathBuf, WorkspaceError> {
    let outside = |why| WorkspaceError::OutsideWorkspace {
        path: path.to_owned(),
        why,
    };
    if path.is_empty() {
        return Err(outside("the path is empty"));
    }
    if path.contains('\0') {
        return Err(outside("the path contains a NUL byte"));
    }
    let mut normal = PathBuf::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => normal.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                if !normal.pop() {
                    return Err(outside("`..` climbs above the workspace root"));
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(outside(
                    "absolute paths are not allowed; use a path relative to the workspace",
                ));
            }
        }
    }
    if normal.as_os_str().is_empty() {
        return Err(outside("the path names the workspace root itself"));
    }
    Ok(normal)
}

/// Maps an I/O error from a beneath-resolved operation to a workspace error.
fn classify(path: &str, op: &'static str, source: std::io::Error) -> WorkspaceError {
    if source.kind() == std::io::ErrorKind::NotFound {
        return WorkspaceError::NotFound {
            path: path.to_owned(),
        };
    }
    // cap-std reports an escape as PermissionDenied ("a path led outside of
    // the filesystem"); the kernel's RESOLVE_BENEATH as EXDEV.
    if source.kind() == std::io::ErrorKind::PermissionDenied
        || source.raw_os_error() == Some(libc::EXDEV)
    {
        return WorkspaceError::Escape {
            path: path.to_owned(),
            source,
        };
    }
    WorkspaceError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Counts files and bytes below `root` without following symlinks.
fn tree_stats(root: &Path) -> std::io::Result<RemovalStats> {
    let mut stats = RemovalStats::default();
    let mut pending = vec![root.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = entry.path().symlink_metadata()?;
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                stats.files += 1;
                stats.bytes += meta.len();
            }
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn workspace() -> (tempfile::TempDir, Workspace) {
        let tmp = tempfile::tempdir().unwrap();
        let ws = Workspace::create(tmp.path().join("ws"), 1 << 20).unwrap();
        (tmp, ws)
    }

    #[test]
    fn lexical_check_normalises_and_refuses_escapes() {
        assert_eq!(
            checked_relative("a/./b/../c").unwrap(),
            PathBuf::from("a/c")
        );
        for bad in ["", "/etc/passwd", "../x", "a/../../x", ".", "a/.."] {
            assert!(
                matches!(
                    checked_relative(bad),
                    Err(WorkspaceError::OutsideWorkspace { .. })
                ),
                "{bad:?} was accepted"
            );
        }
    }

    #[test]
    fn write_then_read_round_trips() {
        let (_tmp, ws) = workspace();
        assert_eq!(ws.write_file("dir/a.txt", b"hello", 0).unwrap(), 5);
        assert_eq!(
            ws.read_file("dir/a.txt", 100).unwrap(),
            (b"hello".to_vec(), 5, false)
        );
        assert_eq!(
            ws.read_file("dir/a.txt", 2).unwrap(),
            (b"he".to_vec(), 5, true)
        );
    }

    #[test]
    fn symlink_to_host_directory_is_refused_for_read_and_write() {
        let (tmp, ws) = workspace();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"host secret").unwrap();
        std::os::unix::fs::symlink(&outside, ws.root().join("link")).unwrap();

        let read = ws.read_file("link/secret", 100);
        assert!(
            matches!(read, Err(WorkspaceError::Escape { .. })),
            "{read:?}"
        );
        let write = ws.write_file("link/planted", b"x", 0);
        assert!(
            matches!(write, Err(WorkspaceError::Escape { .. })),
            "{write:?}"
        );
        assert!(!outside.join("planted").exists());
    }

    #[test]
    fn quota_is_enforced_and_overwrites_count_once() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = Workspace::create(tmp.path().join("ws"), 10).unwrap();
        ws.write_file("a", b"12345678", 0).unwrap();
        ws.write_file("a", b"1234567890", 0).unwrap();
        let err = ws.write_file("b", b"1", 0).unwrap_err();
        assert!(
            matches!(
                err,
                WorkspaceError::QuotaExceeded {
                    would_be: 11,
                    cap: 10,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn remove_deletes_everything_but_not_symlink_targets() {
        let (tmp, ws) = workspace();
        let outside = tmp.path().join("keep");
        std::fs::write(&outside, b"keep me").unwrap();
        ws.write_file("x/y", b"abc", 0).unwrap();
        std::os::unix::fs::symlink(&outside, ws.root().join("link")).unwrap();
        let root = ws.root().to_owned();
        let stats = ws.remove().unwrap();
        assert_eq!(stats.files, 2);
        assert!(!root.exists());
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep me");
    }

    #[test]
    fn setuid_bits_are_stripped() {
        let (_tmp, ws) = workspace();
        ws.write_file("tool", b"#!/bin/sh", 0o4755).unwrap();
        let mode = std::fs::metadata(ws.root().join("tool"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);
    }
}
