//! A session's workspace directory and the file operations the daemon performs
//! in it on behalf of callers.
//!
//! The sandbox can plant symlinks in its workspace, so the daemon must never
//! become a confused deputy: every path is checked lexically (relative, no `..`
//! that climbs out) and then opened through a `cap_std::fs::Dir` rooted at the
//! workspace, which refuses to follow any symlink or `..` that leads outside.
//!
//! Where the bytes live is the [`Storage`]: by default each workspace is its
//! own size-capped tmpfs mount (the private `tmpfs` module), so the kernel holds every writer
//! to the cap, not only the daemon's own `WriteFiles`.

mod tmpfs;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use cap_std::fs::Dir;
use sha2::{Digest as _, Sha256};

/// A file read from a workspace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRead {
    /// Its contents, up to the byte limit.
    pub content: Vec<u8>,
    /// Its full size.
    pub size: u64,
    /// The contents were cut at the byte limit.
    pub truncated: bool,
    /// SHA-256 of the whole file, lowercase hex.
    pub sha256: String,
}

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
    /// The kernel refused a write: the workspace's size or file-count cap
    /// is reached (counted in whole pages, so many small files fill it
    /// sooner than their byte total suggests).
    #[error("the workspace is full (its size or file-count cap is reached) writing {path:?}")]
    Full {
        /// The path.
        path: String,
        /// The refusal (`ENOSPC`).
        #[source]
        source: std::io::Error,
    },
    /// The workspace's storage could not be set up or taken down (the
    /// source names the mount point).
    #[error("workspace storage")]
    Storage(#[from] tmpfs::TmpfsError),
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

/// Where a workspace's files live, and so who holds it to its size cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Its own tmpfs mount, sized to the workspace cap and limited to
    /// `max_files` inodes: the kernel refuses every write past either, from
    /// any writer. The bytes are memory (swappable), charged to the memory
    /// cgroup of the process that writes them. Needs CAP_SYS_ADMIN.
    Tmpfs {
        /// Files, directories and links the workspace may hold.
        max_files: u64,
    },
    /// A plain directory: the cap holds for the daemon's own writes
    /// (`WriteFiles`, initial files) only; a tool can fill the disk.
    Directory,
}

/// A cap a tmpfs workspace has reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapReached {
    /// No page is left: the size cap, in bytes.
    Bytes(u64),
    /// No inode is left: the file-count cap.
    Files(u64),
}

impl std::fmt::Display for CapReached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Bytes(cap) => write!(f, "its size cap of {cap} bytes is reached"),
            Self::Files(cap) => write!(
                f,
                "its cap of {cap} files, directories and links is reached"
            ),
        }
    }
}

/// A session workspace on the host. It holds no open descriptor between
/// operations, so idle sessions cost no file descriptors.
#[derive(Debug)]
pub struct Workspace {
    root: PathBuf,
    size_cap: u64,
    storage: Storage,
    /// Whether a tmpfs is (still) mounted on `root`.
    mounted: bool,
    owner: Option<(u32, u32)>,
}

impl Workspace {
    /// Creates the workspace directory (mode 0700) on its storage.
    pub fn create(root: PathBuf, size_cap: u64, storage: Storage) -> Result<Self, WorkspaceError> {
        let io = |op, source| WorkspaceError::Io {
            op,
            path: root.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&root).map_err(|e| io("create workspace", e))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("chmod workspace", e))?;
        if let Storage::Tmpfs { max_files } = storage
            && let Err(error) = tmpfs::mount(&root, size_cap, max_files)
        {
            let _ = std::fs::remove_dir(&root);
            return Err(error.into());
        }
        Ok(Self {
            root,
            size_cap,
            mounted: matches!(storage, Storage::Tmpfs { .. }),
            storage,
            owner: None,
        })
    }

    /// Checks at start-up that workspaces can be created on `storage` under
    /// `parent`, by creating and removing one: a host that cannot mount
    /// fails here, with the fix in the error, not at the first session.
    pub fn probe(parent: &Path, storage: Storage) -> Result<(), WorkspaceError> {
        Self::create(parent.join(".storage-probe"), 1 << 20, storage)?.remove()?;
        Ok(())
    }

    /// Removes what a crashed instance left at `path` (a workspace, mounted
    /// or not, or a stray file). Never follows symlinks.
    pub fn remove_leftover(path: &Path) -> Result<(), WorkspaceError> {
        let io = |op, source| WorkspaceError::Io {
            op,
            path: path.display().to_string(),
            source,
        };
        let meta = path
            .symlink_metadata()
            .map_err(|e| io("stat leftover", e))?;
        if !meta.is_dir() {
            return std::fs::remove_file(path).map_err(|e| io("remove leftover", e));
        }
        tmpfs::unmount_if_mounted(path)?;
        std::fs::remove_dir_all(path).map_err(|e| io("remove leftover", e))
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
        if let Err(error) = dir.write(&rel, content) {
            let error = classify(path, "write", error);
            if matches!(error, WorkspaceError::Full { .. }) {
                // A cut-off file would pass for the caller's content.
                let _ = dir.remove_file(&rel);
            }
            return Err(error);
        }
        let mode = if mode == 0 { 0o644 } else { mode & 0o777 };
        dir.set_permissions(
            &rel,
            cap_std::fs::Permissions::from_std(std::fs::Permissions::from_mode(mode)),
        )
        .map_err(|e| classify(path, "chmod", e))?;
        self.chown_written(&dir, path, &rel)?;
        Ok(content_len)
    }

    /// Reads up to `limit` bytes of a file, and hashes all of it (a digest
    /// of a prefix would name no file).
    pub fn read_file(&self, path: &str, limit: u64) -> Result<FileRead, WorkspaceError> {
        let rel = checked_relative(path)?;
        let mut file = self
            .dir()?
            .open(&rel)
            .map_err(|e| classify(path, "open", e))?;
        let size = file
            .metadata()
            .map_err(|e| classify(path, "stat", e))?
            .len();
        let mut content = Vec::with_capacity(usize::try_from(size.min(limit)).unwrap_or(0));
        (&mut file)
            .take(limit)
            .read_to_end(&mut content)
            .map_err(|e| classify(path, "read", e))?;
        let mut hasher = Sha256::new();
        hasher.update(&content);
        let mut rest = [0_u8; 64 * 1024];
        loop {
            let read = file
                .read(&mut rest)
                .map_err(|e| classify(path, "read", e))?;
            if read == 0 {
                break;
            }
            hasher.update(&rest[..read]);
        }
        Ok(FileRead {
            truncated: size > limit,
            content,
            size,
            sha256: hex::encode(hasher.finalize()),
        })
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

    /// Which cap a tmpfs workspace has reached, if any. After a tool's write
    /// failed this tells a full workspace from other I/O errors: a WASI
    /// guest sees only a generic I/O error. `None` for directory storage,
    /// whose fullness is the host disk's, not a cap.
    pub fn cap_reached(&self) -> Option<CapReached> {
        let Storage::Tmpfs { max_files } = self.storage else {
            return None;
        };
        let stats = nix::sys::statvfs::statvfs(&self.root).ok()?;
        if stats.blocks_available() == 0 {
            Some(CapReached::Bytes(self.size_cap))
        } else if stats.files_available() == 0 {
            Some(CapReached::Files(max_files))
        } else {
            None
        }
    }

    /// Deletes the workspace and everything in it.
    pub fn remove(mut self) -> Result<RemovalStats, WorkspaceError> {
        let stats = self.usage()?;
        let io = |source| WorkspaceError::Io {
            op: "remove",
            path: self.root.display().to_string(),
            source,
        };
        match self.storage {
            Storage::Tmpfs { .. } => {
                // Unmounting frees every file at once; the mount point left
                // behind is the empty directory sandboxd made.
                tmpfs::unmount(&self.root)?;
                self.mounted = false;
                std::fs::remove_dir(&self.root).map_err(io)?;
            }
            // std's remove_dir_all never follows symlinks, so a planted link
            // to a host directory is unlinked, not recursed into.
            Storage::Directory => std::fs::remove_dir_all(&self.root).map_err(io)?,
        }
        Ok(stats)
    }
}

impl Drop for Workspace {
    /// A tmpfs workspace dropped without [`Workspace::remove`] (a session
    /// dropped without teardown, a panic) is unmounted all the same: its
    /// files are memory, and no one can reach them any more.
    fn drop(&mut self) {
        if self.mounted {
            let _ = tmpfs::unmount(&self.root);
            let _ = std::fs::remove_dir(&self.root);
        }
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
    if source.raw_os_error() == Some(libc::ENOSPC) {
        return WorkspaceError::Full {
            path: path.to_owned(),
            source,
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
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const TMPFS: Storage = Storage::Tmpfs { max_files: 1024 };

    /// A 1 MiB workspace on the default storage (tmpfs: needs root).
    fn workspace() -> (tempfile::TempDir, Workspace) {
        let tmp = tempfile::tempdir().unwrap();
        let ws = Workspace::create(tmp.path().join("ws"), 1 << 20, TMPFS)
            .expect("a tmpfs workspace (these tests need root, as sandboxd does)");
        (tmp, ws)
    }

    fn is_mount_point(path: &Path) -> bool {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let path = path.to_str().unwrap();
        mountinfo
            .lines()
            .any(|line| line.split(' ').nth(4) == Some(path))
    }

    /// Writes `chunk`-byte pieces into new files, bypassing the daemon as a
    /// tool would, until the kernel refuses; returns the bytes written and
    /// the refusal. Panics past 8 MiB or 10,000 files (no cap at work).
    fn fill(root: &Path, chunk: usize) -> (u64, std::io::Error) {
        use std::io::Write;
        let mut written = 0;
        for n in 0..10_000 {
            assert!(written <= 8 << 20, "{written} bytes written and no refusal");
            let mut file = match std::fs::File::create(root.join(format!("f{n}"))) {
                Ok(file) => file,
                Err(error) => return (written, error),
            };
            for _ in 0..4 {
                match file.write_all(&vec![7u8; chunk]) {
                    Ok(()) => written += chunk as u64,
                    Err(error) => return (written, error),
                }
            }
        }
        panic!("10,000 files written and no refusal")
    }

    #[test]
    fn tmpfs_cap_holds_for_writes_that_bypass_the_daemon() {
        let (_tmp, ws) = workspace();
        let (written, refusal) = fill(ws.root(), 64 << 10);
        assert_eq!(
            (written, refusal.raw_os_error()),
            (1 << 20, Some(libc::ENOSPC))
        );
        assert_eq!(ws.usage().unwrap().bytes, 1 << 20);
        assert_eq!(ws.cap_reached(), Some(CapReached::Bytes(1 << 20)));
        std::fs::remove_file(ws.root().join("f0")).unwrap();
        assert_eq!(ws.cap_reached(), None);
    }

    #[test]
    fn tmpfs_file_count_cap_holds() {
        let tmp = tempfile::tempdir().unwrap();
        let ws = Workspace::create(
            tmp.path().join("ws"),
            1 << 20,
            Storage::Tmpfs { max_files: 8 },
        )
        .unwrap();
        let (_, refusal) = fill(ws.root(), 0);
        assert_eq!(refusal.raw_os_error(), Some(libc::ENOSPC));
        // The root directory takes one of the eight inodes.
        assert_eq!(ws.usage().unwrap().files, 7);
        assert_eq!(ws.cap_reached(), Some(CapReached::Files(8)));
    }

    #[test]
    fn a_workspace_full_in_pages_refuses_write_files_and_leaves_no_partial_file() {
        let tmp = tempfile::tempdir().unwrap();
        let page = 4096;
        let ws = Workspace::create(tmp.path().join("ws"), 4 * page, TMPFS).unwrap();
        for n in 0..4 {
            ws.write_file(&format!("small{n}"), b"x", 0).unwrap();
        }
        // 4 bytes used by the daemon's count, but every page is taken.
        let err = ws.write_file("big", &[1; 100], 0).unwrap_err();
        assert!(matches!(err, WorkspaceError::Full { .. }), "{err}");
        assert_eq!(ws.usage().unwrap(), RemovalStats { files: 4, bytes: 4 });
    }

    #[test]
    fn removing_a_tmpfs_workspace_unmounts_it() {
        let (_tmp, ws) = workspace();
        let root = ws.root().to_owned();
        assert!(is_mount_point(&root));
        ws.write_file("a/b", b"abc", 0).unwrap();
        assert_eq!(ws.remove().unwrap(), RemovalStats { files: 1, bytes: 3 });
        assert!(!is_mount_point(&root));
        assert!(!root.exists());
    }

    #[test]
    fn a_tmpfs_workspace_dropped_without_removal_is_unmounted() {
        let (_tmp, ws) = workspace();
        let root = ws.root().to_owned();
        ws.write_file("a", b"abc", 0).unwrap();
        drop(ws);
        assert!(!is_mount_point(&root));
        assert!(!root.exists());
    }

    #[test]
    fn leftovers_are_unmounted_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let mounted = Workspace::create(tmp.path().join("mounted"), 1 << 20, TMPFS).unwrap();
        mounted.write_file("x", b"1", 0).unwrap();
        let plain =
            Workspace::create(tmp.path().join("plain"), 1 << 20, Storage::Directory).unwrap();
        plain.write_file("y/z", b"2", 0).unwrap();
        std::fs::write(tmp.path().join("stray"), b"3").unwrap();
        for name in ["mounted", "plain", "stray"] {
            Workspace::remove_leftover(&tmp.path().join(name)).unwrap();
        }
        assert!(!is_mount_point(&tmp.path().join("mounted")));
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
    }

    #[test]
    fn probe_leaves_nothing_behind() {
        let tmp = tempfile::tempdir().unwrap();
        Workspace::probe(tmp.path(), TMPFS).unwrap();
        Workspace::probe(tmp.path(), Storage::Directory).unwrap();
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 0);
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
        // sha256("hello")
        let digest = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert_eq!(
            ws.read_file("dir/a.txt", 100).unwrap(),
            FileRead {
                content: b"hello".to_vec(),
                size: 5,
                truncated: false,
                sha256: digest.to_owned(),
            }
        );
        // Cut at the limit, the digest is still the whole file's.
        assert_eq!(
            ws.read_file("dir/a.txt", 2).unwrap(),
            FileRead {
                content: b"he".to_vec(),
                size: 5,
                truncated: true,
                sha256: digest.to_owned(),
            }
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
        let ws = Workspace::create(tmp.path().join("ws"), 10, Storage::Directory).unwrap();
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
        for storage in [TMPFS, Storage::Directory] {
            let tmp = tempfile::tempdir().unwrap();
            let ws = Workspace::create(tmp.path().join("ws"), 1 << 20, storage).unwrap();
            let outside = tmp.path().join("keep");
            std::fs::write(&outside, b"keep me").unwrap();
            ws.write_file("x/y", b"abc", 0).unwrap();
            std::os::unix::fs::symlink(&outside, ws.root().join("link")).unwrap();
            let root = ws.root().to_owned();
            let stats = ws.remove().unwrap();
            assert_eq!(stats.files, 2, "{storage:?}");
            assert!(!root.exists(), "{storage:?}");
            assert_eq!(std::fs::read(&outside).unwrap(), b"keep me");
        }
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
