//! Default paths of both daemons, derived from one base so that the defaults
//! connect: sandboxd listens where the control plane dials.
//!
//! `HARNESS_HOME` unset (or empty): the system layout.
//!
//! | what                         | path                                   |
//! |------------------------------|----------------------------------------|
//! | sandboxd socket              | `/run/harness/sandboxd.sock`           |
//! | control-plane socket         | `/run/harness/control-plane.sock`      |
//! | control-plane database       | `/var/lib/harness/control-plane.db`    |
//! | sandboxd state               | `/var/lib/harness/sandboxd`            |
//! | sandboxd tools               | `/var/lib/harness/sandboxd/tools`      |
//! | sandboxd compiled components | `/var/cache/harness/sandboxd`          |
//! | agent definitions            | `/etc/harness/agents`                  |
//!
//! `HARNESS_HOME=X`: the same tree under `X`: `X/run/…` for sockets,
//! `X/lib/…` for state, `X/cache/…` for caches and `X/etc/agents`. A
//! developer (or a test) runs both daemons without root this way. Flags and
//! config keys still override each path.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use crate::address::ListenAddress;

/// The environment variable that moves every default path.
pub const HOME_VARIABLE: &str = "HARNESS_HOME";

/// Every default path of both daemons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefaultPaths {
    /// Where both sockets live.
    pub run_dir: PathBuf,
    /// sandboxd's socket.
    pub sandboxd_socket: PathBuf,
    /// The control plane's socket.
    pub control_plane_socket: PathBuf,
    /// The control plane's SQLite database.
    pub control_plane_database: PathBuf,
    /// sandboxd's state directory (session workspaces).
    pub sandboxd_state_dir: PathBuf,
    /// sandboxd's tool components.
    pub sandboxd_tools_dir: PathBuf,
    /// sandboxd's compiled-component cache.
    pub sandboxd_cache_dir: PathBuf,
    /// The control plane's agent definitions.
    pub agents_dir: PathBuf,
}

impl DefaultPaths {
    /// The paths for a `HARNESS_HOME` value: `None` (or empty) is the system
    /// layout. Pure: reads nothing.
    pub fn for_home(home: Option<&OsStr>) -> Self {
        let (run, lib, cache, etc) = match home.filter(|home| !home.is_empty()) {
            None => (
                PathBuf::from("/run/harness"),
                PathBuf::from("/var/lib/harness"),
                PathBuf::from("/var/cache/harness"),
                PathBuf::from("/etc/harness"),
            ),
            Some(home) => {
                let home = Path::new(home);
                (
                    home.join("run"),
                    home.join("lib"),
                    home.join("cache"),
                    home.join("etc"),
                )
            }
        };
        Self {
            sandboxd_socket: run.join("sandboxd.sock"),
            control_plane_socket: run.join("control-plane.sock"),
            run_dir: run,
            control_plane_database: lib.join("control-plane.db"),
            sandboxd_tools_dir: lib.join("sandboxd/tools"),
            sandboxd_state_dir: lib.join("sandboxd"),
            sandboxd_cache_dir: cache.join("sandboxd"),
            agents_dir: etc.join("agents"),
        }
    }

    /// The paths for this process's `HARNESS_HOME`.
    pub fn from_env() -> Self {
        Self::for_home(std::env::var_os(HOME_VARIABLE).as_deref())
    }

    /// Where sandboxd listens by default.
    pub fn sandboxd_listen(&self) -> ListenAddress {
        ListenAddress::Unix(self.sandboxd_socket.clone())
    }

    /// Where the control plane listens by default.
    pub fn control_plane_listen(&self) -> ListenAddress {
        ListenAddress::Unix(self.control_plane_socket.clone())
    }

    /// The endpoint the control plane dials for sandboxd by default.
    pub fn sandboxd_endpoint(&self) -> String {
        self.sandboxd_listen().endpoint()
    }

    /// The endpoint clients (the CLI) dial for the control plane by default.
    pub fn control_plane_endpoint(&self) -> String {
        self.control_plane_listen().endpoint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_home_is_the_system_layout() {
        assert_eq!(
            DefaultPaths::for_home(None),
            DefaultPaths {
                run_dir: PathBuf::from("/run/harness"),
                sandboxd_socket: PathBuf::from("/run/harness/sandboxd.sock"),
                control_plane_socket: PathBuf::from("/run/harness/control-plane.sock"),
                control_plane_database: PathBuf::from("/var/lib/harness/control-plane.db"),
                sandboxd_state_dir: PathBuf::from("/var/lib/harness/sandboxd"),
                sandboxd_tools_dir: PathBuf::from("/var/lib/harness/sandboxd/tools"),
                sandboxd_cache_dir: PathBuf::from("/var/cache/harness/sandboxd"),
                agents_dir: PathBuf::from("/etc/harness/agents"),
            }
        );
    }

    #[test]
    fn an_empty_home_counts_as_unset() {
        assert_eq!(
            DefaultPaths::for_home(Some(OsStr::new(""))),
            DefaultPaths::for_home(None)
        );
    }

    #[test]
    fn a_home_moves_every_path_beneath_it() {
        assert_eq!(
            DefaultPaths::for_home(Some(OsStr::new("/home/dev/.harness"))),
            DefaultPaths {
                run_dir: PathBuf::from("/home/dev/.harness/run"),
                sandboxd_socket: PathBuf::from("/home/dev/.harness/run/sandboxd.sock"),
                control_plane_socket: PathBuf::from("/home/dev/.harness/run/control-plane.sock"),
                control_plane_database: PathBuf::from("/home/dev/.harness/lib/control-plane.db"),
                sandboxd_state_dir: PathBuf::from("/home/dev/.harness/lib/sandboxd"),
                sandboxd_tools_dir: PathBuf::from("/home/dev/.harness/lib/sandboxd/tools"),
                sandboxd_cache_dir: PathBuf::from("/home/dev/.harness/cache/sandboxd"),
                agents_dir: PathBuf::from("/home/dev/.harness/etc/agents"),
            }
        );
    }

    #[test]
    fn the_control_plane_dials_where_sandboxd_listens() {
        for home in [None, Some(OsStr::new("/tmp/h"))] {
            let paths = DefaultPaths::for_home(home);
            assert_eq!(
                paths.sandboxd_endpoint(),
                paths.sandboxd_listen().endpoint()
            );
        }
        let system = DefaultPaths::for_home(None);
        assert_eq!(
            (system.sandboxd_endpoint(), system.control_plane_endpoint()),
            (
                "unix:/run/harness/sandboxd.sock".to_owned(),
                "unix:/run/harness/control-plane.sock".to_owned()
            )
        );
    }
}
