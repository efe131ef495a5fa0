//! Finding and opening the `sandbox-init` program.
//!
//! sandboxd opens the program once, as itself, and every sandbox's first
//! process executes it through that descriptor (see [`crate::sys::InitExec`]).
//! So the directories it is installed under may be private to sandboxd's user
//! (a clone in a `0700` directory, `mktemp -d`); what still must hold is that
//! the file itself is a regular file that *other* users may execute, because
//! it runs as the session's unprivileged host uid, which is neither its owner
//! nor in its group. [`check_mode`] owns that rule.

use std::os::fd::OwnedFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The file name looked for next to the sandboxd binary.
pub const FILE_NAME: &str = "sandbox-init";

/// The opened `sandbox-init` program.
#[derive(Debug, Clone)]
pub struct InitProgram {
    path: PathBuf,
    descriptor: Arc<OwnedFd>,
}

/// Why `sandbox-init` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum InitProgramError {
    /// Where sandboxd runs from is unknown, so the default cannot be found.
    #[error("cannot locate sandbox-init next to sandboxd: {0}")]
    Locate(#[source] std::io::Error),
    /// Nothing at the path.
    #[error(
        "the sandbox-init program is missing at {}: install it next to sandboxd or set \
         [process] init-program",
        path.display()
    )]
    Missing {
        /// Where it was looked for.
        path: PathBuf,
    },
    /// It exists but cannot be opened.
    #[error("cannot open the sandbox-init program at {}", path.display())]
    Open {
        /// The program.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It is a directory, a device, ...
    #[error(
        "the sandbox-init program at {} is not a regular file: point [process] init-program \
         at the sandbox-init binary",
        path.display()
    )]
    NotAFile {
        /// The program.
        path: PathBuf,
    },
    /// Sessions could not execute it.
    #[error(
        "the sandbox-init program at {} has mode {mode:04o}, which other users cannot execute; \
         sandboxes run it as an unprivileged uid: `chmod o+x {}`",
        path.display(),
        path.display()
    )]
    NotExecutableByOthers {
        /// The program.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

impl InitProgramError {
    /// Whether the program is simply not installed where it is looked for
    /// by default: the process backend is then unavailable (WASI still
    /// serves). Anything else is a broken installation or setting, and
    /// sandboxd refuses to start.
    pub fn is_absent_default(&self, configured: bool) -> bool {
        !configured && matches!(self, Self::Missing { .. } | Self::Locate(_))
    }
}

/// Where `sandbox-init` is looked for when `[process] init-program` is not
/// set: next to the `sandboxd` binary at `sandboxd`.
pub fn default_path(sandboxd: &Path) -> PathBuf {
    sandboxd.with_file_name(FILE_NAME)
}

impl InitProgram {
    /// Opens `configured`, or `sandbox-init` next to the running binary.
    pub fn find(configured: Option<&Path>) -> Result<Self, InitProgramError> {
        let path = match configured {
            Some(path) => path.to_owned(),
            None => default_path(&std::env::current_exe().map_err(InitProgramError::Locate)?),
        };
        Self::open(path)
    }

    /// Opens the program at `path` (`O_PATH`: nothing is read) and checks
    /// that sandboxes may execute it.
    pub fn open(path: PathBuf) -> Result<Self, InitProgramError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&path);
        let file = match file {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(InitProgramError::Missing { path });
            }
            Err(source) => return Err(InitProgramError::Open { path, source }),
        };
        let metadata = match file.metadata() {
            Ok(metadata) => metadata,
            Err(source) => return Err(InitProgramError::Open { path, source }),
        };
        if let Err(problem) = check_mode(metadata.is_file(), metadata.mode()) {
            return Err(match problem {
                ModeProblem::NotAFile => InitProgramError::NotAFile { path },
                ModeProblem::NotExecutableByOthers { mode } => {
                    InitProgramError::NotExecutableByOthers { path, mode }
                }
            });
        }
        Ok(Self {
            path,
            descriptor: Arc::new(OwnedFd::from(file)),
        })
    }

    /// Where it was found.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `O_PATH` descriptor sandboxes execute.
    pub fn descriptor(&self) -> Arc<OwnedFd> {
        Arc::clone(&self.descriptor)
    }
}

/// What [`check_mode`] objects to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeProblem {
    /// Not a regular file.
    NotAFile,
    /// The "others" execute bit is clear.
    NotExecutableByOthers {
        /// The permission bits (`st_mode & 0o7777`).
        mode: u32,
    },
}

/// The rule: a regular file with the others-execute bit, since sandboxes
/// run it as a uid that is never its owner nor in its group.
pub fn check_mode(is_file: bool, st_mode: u32) -> Result<(), ModeProblem> {
    if !is_file {
        return Err(ModeProblem::NotAFile);
    }
    if st_mode & 0o001 == 0 {
        return Err(ModeProblem::NotExecutableByOthers {
            mode: st_mode & 0o7777,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn only_a_regular_file_others_may_execute_is_accepted() {
        assert_eq!(check_mode(true, 0o100755), Ok(()));
        assert_eq!(check_mode(true, 0o100711), Ok(()));
        assert_eq!(
            check_mode(true, 0o100750),
            Err(ModeProblem::NotExecutableByOthers { mode: 0o750 })
        );
        assert_eq!(
            check_mode(true, 0o104700),
            Err(ModeProblem::NotExecutableByOthers { mode: 0o4700 })
        );
        assert_eq!(check_mode(false, 0o040755), Err(ModeProblem::NotAFile));
    }

    #[test]
    fn a_program_under_a_private_directory_opens() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.path().join(FILE_NAME);
        std::fs::write(&path, b"\x7fELF").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let program = InitProgram::open(path.clone()).unwrap();
        assert_eq!(program.path(), path);
    }

    #[test]
    fn each_unusable_program_is_named_with_its_fix() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nothing-here");
        let error = InitProgram::open(missing.clone()).unwrap_err();
        assert!(matches!(&error, InitProgramError::Missing { path } if *path == missing));
        assert!(error.is_absent_default(false));
        assert!(!error.is_absent_default(true));

        let private = dir.path().join(FILE_NAME);
        std::fs::write(&private, b"\x7fELF").unwrap();
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o750)).unwrap();
        let error = InitProgram::open(private.clone()).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "the sandbox-init program at {0} has mode 0750, which other users cannot \
                 execute; sandboxes run it as an unprivileged uid: `chmod o+x {0}`",
                private.display()
            )
        );
        assert!(!error.is_absent_default(false));

        let error = InitProgram::open(dir.path().to_owned()).unwrap_err();
        assert!(matches!(error, InitProgramError::NotAFile { .. }));
    }
}
