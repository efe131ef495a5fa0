//! The messages between sandboxd and a session's `sandbox-init`, over a
//! `SOCK_SEQPACKET` socket pair: one JSON document per packet, with file
//! descriptors (stdio pipes, bind sources) riding along as `SCM_RIGHTS`.
//!
//! The init is not trusted to stay honest once sandboxed code runs beside
//! it (it shares a uid with that code), so sandboxd treats every reply as
//! untrusted input: sizes are capped and unknown ids are ignored.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::{Deserialize, Serialize};

use crate::mount_plan::MountPlan;

/// Largest packet either side accepts.
pub const MAX_PACKET_BYTES: usize = 1024 * 1024;

/// Most descriptors one packet carries.
pub const MAX_PACKET_FDS: usize = 64;

/// Everything the init needs to build the sandbox; sent once, right after
/// it starts, with the bind sources' descriptors attached in the order of
/// [`MountPlan::passed_sources`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InitSpec {
    /// The mounts, files and links making up the sandbox root.
    pub plan: MountPlan,
    /// Host name inside the sandbox.
    pub hostname: String,
    /// The unprivileged user commands run as (inside the namespace).
    pub sandbox_uid: u32,
    /// Its group.
    pub sandbox_gid: u32,
    /// Resource limits set on the init and inherited by every command.
    pub rlimits: Vec<Rlimit>,
    /// Refuse to start unless landlock fully enforces the ruleset.
    pub require_landlock: bool,
    /// The seccomp program to install, as `(code, jt, jf, k)` instructions:
    /// compiled once by sandboxd from [`crate::seccomp::DENIED`] rather
    /// than by every init.
    pub seccomp_filter: Vec<crate::seccomp::Instruction>,
}

/// One resource limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// Which resource.
    pub resource: RlimitResource,
    /// Soft and hard value.
    pub value: u64,
}

/// The resources the sandbox limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RlimitResource {
    /// Open descriptors per process.
    Nofile,
    /// Processes of the sandbox user (its host uid is unique to the session).
    Nproc,
    /// Largest file a process may write, in bytes.
    Fsize,
    /// Core dump size (always 0).
    Core,
}

/// sandboxd → init.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum Request {
    /// Start a command; stdin, stdout and stderr ride along as descriptors.
    Spawn {
        /// sandboxd's id for this command.
        id: u64,
        /// Program and arguments; the program is looked up in `PATH`.
        argv: Vec<String>,
        /// The complete environment, `NAME=value`.
        env: Vec<String>,
        /// Working directory.
        cwd: String,
    },
    /// SIGKILL the command's whole process group.
    Kill {
        /// The command.
        id: u64,
    },
}

/// init → sandboxd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum Reply {
    /// The sandbox is built; commands may be spawned.
    Ready {
        /// What landlock enforced, for the session's record.
        landlock: String,
    },
    /// Building the sandbox failed at `step`.
    SetupFailed {
        /// The set-up step (see THREAT_MODEL.md for the order).
        step: String,
        /// Why, with the OS error.
        error: String,
    },
    /// The command is running as `pid` (inside the sandbox).
    Spawned {
        /// The command.
        id: u64,
        /// Its pid in the sandbox's pid namespace.
        pid: i32,
    },
    /// The command could not be started.
    SpawnFailed {
        /// The command.
        id: u64,
        /// The errno of the failed step.
        errno: i32,
        /// What failed.
        message: String,
    },
    /// The command's main process ended.
    Exited {
        /// The command.
        id: u64,
        /// Exit code, if it exited.
        code: Option<i32>,
        /// Signal, if it was killed by one.
        signal: Option<i32>,
        /// User CPU time, µs (of it and its reaped descendants).
        user_micros: u64,
        /// System CPU time, µs.
        system_micros: u64,
        /// Peak resident set, bytes.
        max_rss_bytes: u64,
    },
}

/// Errors moving packets.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// Sending failed.
    #[error("cannot send to the sandbox init")]
    Send(#[source] std::io::Error),
    /// Receiving failed.
    #[error("cannot receive from the sandbox init")]
    Receive(#[source] std::io::Error),
    /// The peer closed its end.
    #[error("the sandbox init closed its control socket")]
    Closed,
    /// The packet is not a valid message.
    #[error("malformed message from the sandbox init")]
    Malformed(#[source] serde_json::Error),
    /// The packet exceeds [`MAX_PACKET_BYTES`] or was cut short.
    #[error("message of {0} bytes exceeds the {MAX_PACKET_BYTES}-byte limit")]
    TooLarge(usize),
}

/// Sends `message` with `fds` attached. Blocking or not depends on the
/// socket; a non-blocking socket may fail with `WouldBlock`.
pub fn send<T: Serialize>(
    socket: BorrowedFd<'_>,
    message: &T,
    fds: &[RawFd],
) -> Result<(), ProtocolError> {
    let bytes = serde_json::to_vec(message).map_err(ProtocolError::Malformed)?;
    if bytes.len() > MAX_PACKET_BYTES {
        return Err(ProtocolError::TooLarge(bytes.len()));
    }
    let iov = [IoSlice::new(&bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let control: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(
        socket.as_raw_fd(),
        &iov,
        control,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(|e| ProtocolError::Send(e.into()))?;
    Ok(())
}

/// Receives one packet: the message and any descriptors attached (owned,
/// close-on-exec).
pub fn receive<T: for<'de> Deserialize<'de>>(
    socket: BorrowedFd<'_>,
    buffer: &mut Vec<u8>,
) -> Result<(T, Vec<OwnedFd>), ProtocolError> {
    buffer.resize(MAX_PACKET_BYTES + 1, 0);
    let mut control = nix::cmsg_space!([RawFd; MAX_PACKET_FDS]);
    let (len, fds, truncated) = {
        let mut iov = [IoSliceMut::new(buffer.as_mut_slice())];
        let msg = recvmsg::<()>(
            socket.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )
        .map_err(|e| ProtocolError::Receive(e.into()))?;
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().map_err(|e| ProtocolError::Receive(e.into()))? {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: recvmsg just installed these descriptors for this
                // message, and each is taken once, here.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { crate::sys::own_received_fd(fd) }),
                );
            }
        }
        (
            msg.bytes,
            fds,
            msg.flags
                .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC),
        )
    };
    if len == 0 {
        return Err(ProtocolError::Closed);
    }
    if truncated || len > MAX_PACKET_BYTES {
        return Err(ProtocolError::TooLarge(len));
    }
    let message = serde_json::from_slice(&buffer[..len]).map_err(ProtocolError::Malformed)?;
    Ok((message, fds))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::os::fd::AsFd;

    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};

    use super::*;

    #[test]
    fn requests_round_trip_with_descriptors() {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let (pipe_read, pipe_write) = nix::unistd::pipe().unwrap();
        let request = Request::Spawn {
            id: 7,
            argv: vec!["echo".into(), "hi".into()],
            env: vec!["PATH=/usr/bin".into()],
            cwd: "/workspace".into(),
        };
        send(
            a.as_fd(),
            &request,
            &[pipe_read.as_raw_fd(), pipe_write.as_raw_fd()],
        )
        .unwrap();
        let mut buffer = Vec::new();
        let (received, fds): (Request, _) = receive(b.as_fd(), &mut buffer).unwrap();
        assert_eq!(received, request);
        assert_eq!(fds.len(), 2);
        drop(a);
        let closed = receive::<Request>(b.as_fd(), &mut buffer);
        assert!(matches!(closed, Err(ProtocolError::Closed)), "{closed:?}");
    }
}
