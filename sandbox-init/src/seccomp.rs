//! The process sandbox's seccomp filter: a reviewed table of refused system
//! calls, compiled to BPF by a pure builder and installed in the sandbox init.
//!
//! Why a deny list over a default of "allow": the sandbox runs arbitrary
//! Linux userlands (shells, compilers, package managers), whose syscall needs
//! are open-ended; namespaces, capabilities, landlock and cgroups do the
//! confinement, and this filter removes the kernel interfaces that are either
//! escape routes (ptrace, mounts, new namespaces, file handles) or large
//! attack surface nothing in a tool sandbox needs (bpf, io_uring, keyrings,
//! modules). Every entry in [`DENIED`] carries its reason so the list can be
//! reviewed as data.
//!
//! How the program is laid out (see [`sandbox_filter`]):
//!
//! 1. An ABI guard we write ourselves, because seccompiler cannot express it:
//!    on x86_64 any call made under another audit architecture (the i386
//!    `int 0x80` entry, whose syscall numbers differ and would slip past
//!    every rule below) kills the process, and any x32 call (native arch,
//!    syscall number with bit `0x4000_0000`) fails with `ENOSYS` as on a
//!    kernel built without x32. Without this, `ptrace` issued as the x32
//!    number `0x4000_0209` would not match the x86_64 rule for `ptrace`.
//! 2. One seccompiler program per errno used in the table (a seccompiler
//!    filter has a single "match" action). The programs are linked: in every
//!    program but the last, "allow" is rewritten into a jump to the start of
//!    the next one, so a call is allowed only when no program refuses it.
//!
//! Arguments are compared on their low 32 bits only, because every argument
//! the table tests is read by the kernel as a 32-bit value (socket domain,
//! ioctl request, personality, and legacy `clone` flags, which the kernel
//! truncates with `lower_32_bits`). A 64-bit comparison would let a caller
//! dodge a rule by setting upper bits the kernel ignores.

use std::collections::{BTreeMap, BTreeSet};

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch, sock_filter,
};

/// Failures building or installing the filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler does not support the architecture sandboxd was built for.
    #[error("seccomp filters are not supported on the {arch} architecture")]
    UnsupportedArch {
        /// `std::env::consts::ARCH`.
        arch: &'static str,
        /// seccompiler's refusal.
        #[source]
        source: BackendError,
    },
    /// Two table entries name the same syscall; their rules cannot be merged
    /// without changing what either means.
    #[error("the seccomp table lists {syscall} more than once")]
    DuplicateSyscall {
        /// The repeated syscall.
        syscall: &'static str,
    },
    /// A conditional entry has no conditions (it would silently become
    /// unconditional).
    #[error("the seccomp table entry for {syscall} is conditional but has no conditions")]
    NoConditions {
        /// The entry's syscall.
        syscall: &'static str,
    },
    /// An argument condition of an entry was rejected by seccompiler.
    #[error("cannot compile the argument conditions for {syscall}")]
    Rule {
        /// The entry's syscall.
        syscall: &'static str,
        /// seccompiler's refusal.
        #[source]
        source: BackendError,
    },
    /// seccompiler could not assemble or compile one errno group's filter.
    #[error("cannot compile the filter for the syscalls refused with errno {errno}")]
    Compile {
        /// The group's errno.
        errno: u32,
        /// seccompiler's refusal.
        #[source]
        source: BackendError,
    },
    /// The linked program is longer than the kernel accepts.
    #[error(
        "the seccomp program has {instructions} instructions, over the kernel's limit of \
         {MAX_INSTRUCTIONS}"
    )]
    TooLong {
        /// The program's length.
        instructions: usize,
    },
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter")]
    Install {
        /// seccompiler's report of the failing `seccomp(2)` call.
        #[source]
        source: seccompiler::Error,
    },
}

/// One reviewed entry of the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeniedSyscall {
    /// The syscall's name, as in `man 2`.
    pub name: &'static str,
    /// Its number on the architecture sandboxd was built for (`libc::c_long`,
    /// which is `i64` on every architecture seccompiler supports).
    pub number: i64,
    /// The errno the call fails with.
    pub errno: u32,
    /// Which calls are refused.
    pub when: DenyWhen,
    /// Why the sandbox refuses it.
    pub reason: &'static str,
}

/// Which calls of a syscall the filter refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyWhen {
    /// Every call.
    Always,
    /// Calls for which at least one condition holds.
    AnyOf(&'static [ArgCondition]),
    /// Calls for which every condition holds.
    AllOf(&'static [ArgCondition]),
}

/// A test on one syscall argument, on its low 32 bits (see the module
/// header for why).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArgCondition {
    /// Argument index, 0 to 5.
    pub arg: u8,
    /// The test.
    pub test: ArgTest,
}

/// The comparison an [`ArgCondition`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgTest {
    /// The argument equals the value.
    Equals(u32),
    /// The argument differs from the value.
    NotEquals(u32),
    /// Every bit of the mask is set in the argument.
    HasAllBits(u32),
}

/// The kernel's maximum seccomp program length (`BPF_MAXINSNS`).
pub const MAX_INSTRUCTIONS: usize = 4096;

const EPERM: u32 = libc::EPERM.unsigned_abs();
const ENOSYS: u32 = libc::ENOSYS.unsigned_abs();

/// Syscall numbers: libc's, plus those newer than libc's tables.
#[allow(non_upper_case_globals)]
mod nr {
    pub use libc::*;

    /// `open_tree_attr` (Linux 6.15) is not in libc 0.2's tables yet; every
    /// architecture seccompiler supports shares syscall numbers from 424 on.
    pub const SYS_open_tree_attr: libc::c_long = 467;
}

/// `"SYS_ptrace"` → `"ptrace"`, at compile time, so a table entry's name and
/// number come from the same token and cannot disagree.
const fn syscall_name(constant: &'static str) -> &'static str {
    match constant.as_bytes() {
        [b'S', b'Y', b'S', b'_', rest @ ..] => match std::str::from_utf8(rest) {
            Ok(name) => name,
            Err(_) => constant,
        },
        _ => constant,
    }
}

/// One table entry: `SYS_name => errno, when, reason`, where `SYS_name` is
/// the `libc` constant. (The `=>` also keeps rustfmt from spreading each
/// entry over five lines, so the table reads as a table.)
macro_rules! denied {
    ($sys:ident => $errno:expr, $when:expr, $reason:literal $(,)?) => {
        DeniedSyscall {
            name: syscall_name(stringify!($sys)),
            number: nr::$sys,
            errno: $errno,
            when: $when,
            reason: $reason,
        }
    };
}

const fn low_bits_set(mask: libc::c_int) -> ArgCondition {
    ArgCondition {
        arg: 0,
        test: ArgTest::HasAllBits(mask.unsigned_abs()),
    }
}

/// `clone` flag bits that create namespaces, one condition per bit: a
/// masked comparison matches only when all masked bits are set, so "any of
/// these bits" needs one rule each. `CLONE_NEWTIME` overlaps the exit-signal
/// byte of legacy `clone` (the kernel reads it as part of the signal there);
/// refusing it costs nothing, since no valid signal number has bit 0x80.
const NAMESPACE_CLONE_FLAGS: &[ArgCondition] = &[
    low_bits_set(libc::CLONE_NEWUSER),
    low_bits_set(libc::CLONE_NEWNS),
    low_bits_set(libc::CLONE_NEWPID),
    low_bits_set(libc::CLONE_NEWNET),
    low_bits_set(libc::CLONE_NEWIPC),
    low_bits_set(libc::CLONE_NEWUTS),
    low_bits_set(libc::CLONE_NEWCGROUP),
    low_bits_set(libc::CLONE_NEWTIME),
];

const fn domain_is_not(domain: libc::c_int) -> ArgCondition {
    ArgCondition {
        arg: 0,
        test: ArgTest::NotEquals(domain.unsigned_abs()),
    }
}

/// Socket domains other than Unix, IPv4 and IPv6 (netlink, packet, vsock,
/// alg, bluetooth, ...).
const OTHER_SOCKET_DOMAINS: &[ArgCondition] = &[
    domain_is_not(libc::AF_UNIX),
    domain_is_not(libc::AF_INET),
    domain_is_not(libc::AF_INET6),
];

/// ioctl requests that push input into a terminal. The kernel takes the
/// request as `unsigned int` (libc spells it `c_ulong`, hence the cast).
const TERMINAL_INPUT_INJECTION: &[ArgCondition] = &[
    ArgCondition {
        arg: 1,
        test: ArgTest::Equals(libc::TIOCSTI as u32),
    },
    ArgCondition {
        arg: 1,
        test: ArgTest::Equals(libc::TIOCLINUX as u32),
    },
];

/// `PER_LINUX` from `<linux/personality.h>`.
const PER_LINUX: u32 = 0x0000;
/// `PER_LINUX32`: what `setarch i686` / `linux32` set.
const PER_LINUX32: u32 = 0x0008;
/// `UNAME26`: what `setarch --uname-2.6` sets.
const UNAME26: u32 = libc::UNAME26.unsigned_abs();
/// `personality(0xffffffff)` only queries the current persona (glibc's
/// `personality` query idiom).
const PERSONALITY_QUERY: u32 = 0xffff_ffff;

const fn persona_is_not(persona: u32) -> ArgCondition {
    ArgCondition {
        arg: 0,
        test: ArgTest::NotEquals(persona),
    }
}

/// Personas other than the harmless ones glibc and `setarch` use (the same
/// set container runtimes allow). The rest include `ADDR_NO_RANDOMIZE` and
/// `READ_IMPLIES_EXEC`, which switch off exploit mitigations.
const UNUSUAL_PERSONAS: &[ArgCondition] = &[
    persona_is_not(PER_LINUX),
    persona_is_not(PER_LINUX32),
    persona_is_not(UNAME26),
    persona_is_not(UNAME26 | PER_LINUX32),
    persona_is_not(PERSONALITY_QUERY),
];

/// The reviewed table: every syscall the sandbox denies, with a reason each.
pub const DENIED: &[DeniedSyscall] = &[
    // Reaching into other processes.
    denied!(SYS_ptrace => EPERM, DenyWhen::Always,
        "reads and writes other processes' memory and registers: a sandboxed process could \
         take over a sibling or the sandbox init"),
    denied!(SYS_process_vm_readv => EPERM, DenyWhen::Always,
        "reads another process's memory directly, like ptrace"),
    denied!(SYS_process_vm_writev => EPERM, DenyWhen::Always,
        "writes another process's memory directly, like ptrace"),
    denied!(SYS_kcmp => EPERM, DenyWhen::Always,
        "inspects other processes' kernel objects (ptrace-gated introspection)"),
    denied!(SYS_pidfd_getfd => EPERM, DenyWhen::Always,
        "copies a file descriptor out of another process, like ptrace attach"),
    denied!(SYS_process_madvise => EPERM, DenyWhen::Always,
        "changes another process's memory (ptrace-gated)"),
    // The mount table and the root are fixed when the sandbox is built.
    denied!(SYS_mount => EPERM, DenyWhen::Always,
        "changes the mount table, which is fixed when the sandbox is built"),
    denied!(SYS_umount2 => EPERM, DenyWhen::Always,
        "unmounting could uncover what the sandbox's mounts hide"),
    denied!(SYS_mount_setattr => EPERM, DenyWhen::Always,
        "could make read-only binds writable or drop nosuid/nodev"),
    denied!(SYS_move_mount => EPERM, DenyWhen::Always,
        "attaches mounts anywhere in the tree (new mount API)"),
    denied!(SYS_open_tree => EPERM, DenyWhen::Always,
        "clones mount trees for move_mount (new mount API)"),
    denied!(SYS_open_tree_attr => EPERM, DenyWhen::Always,
        "clones mount trees with changed attributes (new mount API)"),
    denied!(SYS_fsopen => EPERM, DenyWhen::Always,
        "starts creating a filesystem instance (new mount API)"),
    denied!(SYS_fsconfig => EPERM, DenyWhen::Always,
        "configures a filesystem instance, exposing filesystem parsers (new mount API)"),
    denied!(SYS_fsmount => EPERM, DenyWhen::Always,
        "turns a filesystem instance into a mount (new mount API)"),
    denied!(SYS_fspick => EPERM, DenyWhen::Always,
        "reconfigures an existing mount's filesystem (new mount API)"),
    denied!(SYS_pivot_root => EPERM, DenyWhen::Always,
        "changes the root the sandbox was pivoted into"),
    denied!(SYS_chroot => EPERM, DenyWhen::Always,
        "changes the root; combined with a directory fd it is a classic escape"),
    // Namespaces: a fresh user namespace hands out every capability inside
    // it, and with them a large kernel attack surface.
    denied!(SYS_unshare => EPERM, DenyWhen::Always,
        "creates namespaces; a new user namespace regains every capability inside it"),
    denied!(SYS_setns => EPERM, DenyWhen::Always,
        "joins other namespaces"),
    denied!(SYS_clone => EPERM, DenyWhen::AnyOf(NAMESPACE_CLONE_FLAGS),
        "clone with a CLONE_NEW* flag creates namespaces, like unshare"),
    denied!(SYS_clone3 => ENOSYS, DenyWhen::Always,
        "its flags are in memory seccomp cannot read, so namespace flags cannot be checked; \
         ENOSYS makes glibc fall back to clone, whose flags are"),
    // The kernel keyring is not namespaced.
    denied!(SYS_keyctl => EPERM, DenyWhen::Always,
        "the kernel keyring is not namespaced: keys could leak between the host and sandboxes"),
    denied!(SYS_add_key => EPERM, DenyWhen::Always,
        "adds keys to the kernel keyring, which is not namespaced"),
    denied!(SYS_request_key => EPERM, DenyWhen::Always,
        "looks up keys in the kernel keyring, which is not namespaced, and can run upcalls"),
    // Large kernel attack surface that tools do not need.
    denied!(SYS_bpf => EPERM, DenyWhen::Always,
        "loads programs into the kernel: a large attack surface"),
    denied!(SYS_perf_event_open => EPERM, DenyWhen::Always,
        "kernel profiling leaks kernel addresses and timing, and has a history of privilege \
         escalations"),
    denied!(SYS_io_uring_setup => EPERM, DenyWhen::Always,
        "io_uring operations do not pass through seccomp and have a history of privilege \
         escalations"),
    denied!(SYS_io_uring_enter => EPERM, DenyWhen::Always,
        "submits io_uring operations, which do not pass through seccomp"),
    denied!(SYS_io_uring_register => EPERM, DenyWhen::Always,
        "registers io_uring resources, which do not pass through seccomp"),
    denied!(SYS_userfaultfd => EPERM, DenyWhen::Always,
        "lets a process stall kernel page-fault handling at will, a standard exploit \
         primitive for kernel races"),
    // Paths are the sandbox's unit of confinement; file handles bypass them.
    denied!(SYS_name_to_handle_at => EPERM, DenyWhen::Always,
        "produces the file handles open_by_handle_at consumes"),
    denied!(SYS_open_by_handle_at => EPERM, DenyWhen::Always,
        "opens any file of a filesystem by handle, bypassing path confinement (the \
         'shocker' container escape)"),
    // The kernel itself.
    denied!(SYS_kexec_load => EPERM, DenyWhen::Always,
        "loads a new kernel"),
    denied!(SYS_kexec_file_load => EPERM, DenyWhen::Always,
        "loads a new kernel"),
    denied!(SYS_init_module => EPERM, DenyWhen::Always,
        "loads a kernel module"),
    denied!(SYS_finit_module => EPERM, DenyWhen::Always,
        "loads a kernel module"),
    denied!(SYS_delete_module => EPERM, DenyWhen::Always,
        "unloads a kernel module"),
    // Host-wide state that no namespace covers.
    denied!(SYS_acct => EPERM, DenyWhen::Always,
        "switches host-wide process accounting"),
    denied!(SYS_swapon => EPERM, DenyWhen::Always,
        "changes the host's swap"),
    denied!(SYS_swapoff => EPERM, DenyWhen::Always,
        "changes the host's swap"),
    denied!(SYS_reboot => EPERM, DenyWhen::Always,
        "reboots the host, or inside a pid namespace kills the sandbox init"),
    denied!(SYS_syslog => EPERM, DenyWhen::Always,
        "reads the kernel log: kernel addresses and other tenants' messages"),
    denied!(SYS_quotactl => EPERM, DenyWhen::Always,
        "administers filesystem quotas"),
    denied!(SYS_quotactl_fd => EPERM, DenyWhen::Always,
        "administers filesystem quotas"),
    denied!(SYS_settimeofday => EPERM, DenyWhen::Always,
        "sets the host's wall clock, which no namespace virtualises"),
    denied!(SYS_clock_settime => EPERM, DenyWhen::Always,
        "sets the host's clocks, which no namespace virtualises"),
    denied!(SYS_clock_adjtime => EPERM, DenyWhen::Always,
        "adjusts the host's clocks; the read-only form cannot be told apart (the mode is in \
         memory)"),
    denied!(SYS_adjtimex => EPERM, DenyWhen::Always,
        "adjusts the host's clock; the read-only form cannot be told apart (the mode is in \
         memory)"),
    #[cfg(target_arch = "x86_64")]
    denied!(SYS_iopl => EPERM, DenyWhen::Always,
        "raw access to hardware I/O ports"),
    #[cfg(target_arch = "x86_64")]
    denied!(SYS_ioperm => EPERM, DenyWhen::Always,
        "raw access to hardware I/O ports"),
    denied!(SYS_vhangup => EPERM, DenyWhen::Always,
        "hangs up the terminal, which may be shared with the caller"),
    denied!(SYS_personality => EPERM, DenyWhen::AllOf(UNUSUAL_PERSONAS),
        "personas other than the standard, 32-bit and uname-2.6 ones switch off exploit \
         mitigations (ASLR, non-executable data)"),
    // Arguments that open kernel surface or reach outside.
    denied!(SYS_socket => EPERM, DenyWhen::AllOf(OTHER_SOCKET_DOMAINS),
        "only Unix, IPv4 and IPv6 sockets: netlink, packet and the rest are kernel attack \
         surface or configure the network"),
    denied!(SYS_socketpair => EPERM, DenyWhen::AllOf(OTHER_SOCKET_DOMAINS),
        "only Unix, IPv4 and IPv6 sockets, as for socket"),
    denied!(SYS_ioctl => EPERM, DenyWhen::AnyOf(TERMINAL_INPUT_INJECTION),
        "TIOCSTI and TIOCLINUX push input into a terminal: a process sharing the caller's \
         terminal could type commands into its shell"),
];

/// Builds the BPF program for this architecture (pure; no syscalls).
pub fn sandbox_filter() -> Result<BpfProgram, SeccompError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|source| {
        SeccompError::UnsupportedArch {
            arch: std::env::consts::ARCH,
            source,
        }
    })?;

    let mut groups: BTreeMap<u32, BTreeMap<i64, Vec<SeccompRule>>> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    for entry in DENIED {
        if !seen.insert(entry.number) {
            return Err(SeccompError::DuplicateSyscall {
                syscall: entry.name,
            });
        }
        groups
            .entry(entry.errno)
            .or_default()
            .insert(entry.number, seccomp_rules(entry)?);
    }

    let mut program = abi_guard();
    let group_count = groups.len();
    for (index, (errno, rules)) in groups.into_iter().enumerate() {
        let compile_error = |source| SeccompError::Compile { errno, source };
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Allow,
            SeccompAction::Errno(errno),
            arch,
        )
        .map_err(compile_error)?;
        let mut part = BpfProgram::try_from(filter).map_err(compile_error)?;
        if index + 1 < group_count {
            continue_instead_of_allowing(&mut part);
        }
        program.extend(part);
    }

    if program.len() > MAX_INSTRUCTIONS {
        return Err(SeccompError::TooLong {
            instructions: program.len(),
        });
    }
    Ok(program)
}

/// One BPF instruction as plain data: `(code, jt, jf, k)`.
pub type Instruction = (u16, u8, u8, u32);

/// The program as plain instructions, for sending to the sandbox init.
pub fn to_instructions(program: &BpfProgram) -> Vec<Instruction> {
    program.iter().map(|i| (i.code, i.jt, i.jf, i.k)).collect()
}

/// The inverse of [`to_instructions`].
pub fn from_instructions(instructions: &[Instruction]) -> BpfProgram {
    instructions
        .iter()
        .map(|&(code, jt, jf, k)| seccompiler::sock_filter { code, jt, jf, k })
        .collect()
}

/// Installs `program` on every thread of the calling process (`TSYNC`; in
/// the single-threaded sandbox init that is the calling thread, and a stray
/// helper thread cannot stay unfiltered). Precondition: no_new_privs is
/// already set (seccompiler sets it again, harmlessly). The filter is
/// inherited by every child and kept across `execve`; it cannot be removed.
pub fn install(program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter_all_threads(program)
        .map_err(|source| SeccompError::Install { source })
}

/// The seccompiler rules for one entry: none means "match on the number
/// alone"; several are alternatives; the conditions of one rule all apply.
fn seccomp_rules(entry: &DeniedSyscall) -> Result<Vec<SeccompRule>, SeccompError> {
    let rule_error = |source| SeccompError::Rule {
        syscall: entry.name,
        source,
    };
    let conditions = match entry.when {
        DenyWhen::Always => return Ok(Vec::new()),
        DenyWhen::AnyOf(conditions) | DenyWhen::AllOf(conditions) => conditions,
    };
    if conditions.is_empty() {
        return Err(SeccompError::NoConditions {
            syscall: entry.name,
        });
    }
    let compiled = conditions
        .iter()
        .map(seccomp_condition)
        .collect::<Result<Vec<_>, _>>()
        .map_err(rule_error)?;
    match entry.when {
        DenyWhen::AllOf(_) => Ok(vec![SeccompRule::new(compiled).map_err(rule_error)?]),
        _ => compiled
            .into_iter()
            .map(|condition| SeccompRule::new(vec![condition]).map_err(rule_error))
            .collect(),
    }
}

fn seccomp_condition(condition: &ArgCondition) -> Result<SeccompCondition, BackendError> {
    let (operator, value) = match condition.test {
        ArgTest::Equals(value) => (SeccompCmpOp::Eq, value),
        ArgTest::NotEquals(value) => (SeccompCmpOp::Ne, value),
        ArgTest::HasAllBits(mask) => (SeccompCmpOp::MaskedEq(u64::from(mask)), mask),
    };
    SeccompCondition::new(
        condition.arg,
        SeccompCmpArgLen::Dword,
        operator,
        u64::from(value),
    )
}

// Classic BPF opcodes (`<linux/bpf_common.h>`), as `sock_filter` spells them.
const LOAD_WORD: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JUMP_IF_EQUAL: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JUMP_IF_AT_LEAST: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const JUMP: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const RETURN: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// Offsets in `struct seccomp_data`.
const SECCOMP_DATA_NR: u32 = 0;
const SECCOMP_DATA_ARCH: u32 = 4;

/// `AUDIT_ARCH_X86_64` (`<linux/audit.h>`): `EM_X86_64 | __AUDIT_ARCH_64BIT
/// | __AUDIT_ARCH_LE`.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;

/// `__X32_SYSCALL_BIT`: x32 calls carry it in the syscall number.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

const fn statement(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn branch(code: u16, k: u32, jump_if_true: u8, jump_if_false: u8) -> sock_filter {
    sock_filter {
        code,
        jt: jump_if_true,
        jf: jump_if_false,
        k,
    }
}

/// The ABI guard that runs before the table (see the module header).
#[cfg(target_arch = "x86_64")]
fn abi_guard() -> BpfProgram {
    vec![
        statement(LOAD_WORD, SECCOMP_DATA_ARCH),
        branch(JUMP_IF_EQUAL, AUDIT_ARCH_X86_64, 1, 0),
        statement(RETURN, libc::SECCOMP_RET_KILL_PROCESS),
        statement(LOAD_WORD, SECCOMP_DATA_NR),
        branch(JUMP_IF_AT_LEAST, X32_SYSCALL_BIT, 0, 1),
        statement(RETURN, libc::SECCOMP_RET_ERRNO | ENOSYS),
    ]
}

/// Elsewhere seccompiler's own architecture check (kill on mismatch) is the
/// whole guard: aarch64 and riscv64 have no second native syscall ABI.
#[cfg(not(target_arch = "x86_64"))]
fn abi_guard() -> BpfProgram {
    Vec::new()
}

/// Rewrites every "allow" in `part` into a jump just past its end, where the
/// next group's program starts. In seccompiler's output "allow" is only ever
/// the no-match action (the match action is an errno and the architecture
/// check kills), so this changes "not refused here" into "ask the next group"
/// and nothing else. Lengths are unchanged, so seccompiler's own jumps stay
/// valid.
fn continue_instead_of_allowing(part: &mut BpfProgram) {
    let end = part.len();
    for (index, instruction) in part.iter_mut().enumerate() {
        if instruction.code == RETURN && instruction.k == libc::SECCOMP_RET_ALLOW {
            let to_end = u32::try_from(end - index - 1).unwrap_or(u32::MAX);
            *instruction = statement(JUMP, to_end);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use nix::errno::Errno;
    use nix::sys::socket::{AddressFamily, SockFlag, SockProtocol, SockType, socket};
    use nix::unistd::Pid;

    use super::*;

    fn entry(name: &str) -> &'static DeniedSyscall {
        DENIED
            .iter()
            .find(|entry| entry.name == name)
            .unwrap_or_else(|| panic!("{name} is not in DENIED"))
    }

    #[test]
    fn every_entry_has_a_reason_and_a_resolved_name() {
        for entry in DENIED {
            assert!(
                !entry.reason.trim().is_empty(),
                "{} has no reason",
                entry.name
            );
            assert!(
                !entry.name.is_empty() && !entry.name.starts_with("SYS_"),
                "malformed name {:?}",
                entry.name
            );
            assert!(
                (0..0x4000_0000).contains(&entry.number),
                "{} has number {} on {}",
                entry.name,
                entry.number,
                std::env::consts::ARCH
            );
            assert!(
                entry.errno == EPERM || entry.errno == ENOSYS,
                "{} fails with unexpected errno {}",
                entry.name,
                entry.errno
            );
        }
    }

    #[test]
    fn no_syscall_is_listed_twice() {
        let names: BTreeSet<_> = DENIED.iter().map(|entry| entry.name).collect();
        let numbers: BTreeSet<_> = DENIED.iter().map(|entry| entry.number).collect();
        assert_eq!(names.len(), DENIED.len());
        assert_eq!(numbers.len(), DENIED.len());
    }

    #[test]
    fn required_families_are_denied() {
        let always = [
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "mount",
            "umount2",
            "mount_setattr",
            "move_mount",
            "open_tree",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "pivot_root",
            "chroot",
            "unshare",
            "setns",
            "keyctl",
            "add_key",
            "request_key",
            "bpf",
            "perf_event_open",
            "kexec_load",
            "kexec_file_load",
            "init_module",
            "finit_module",
            "delete_module",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "userfaultfd",
            "name_to_handle_at",
            "open_by_handle_at",
            "acct",
            "swapon",
            "swapoff",
            "reboot",
            "syslog",
            "quotactl",
            "settimeofday",
            "clock_settime",
            "clock_adjtime",
            "adjtimex",
            "vhangup",
            "clone3",
        ];
        for name in always {
            assert_eq!(entry(name).when, DenyWhen::Always, "{name}");
        }
        #[cfg(target_arch = "x86_64")]
        for name in ["iopl", "ioperm"] {
            assert_eq!(entry(name).when, DenyWhen::Always, "{name}");
        }
        assert_eq!(entry("clone3").errno, ENOSYS);
        assert_eq!(entry("clone").when, DenyWhen::AnyOf(NAMESPACE_CLONE_FLAGS));
        assert_eq!(NAMESPACE_CLONE_FLAGS.len(), 8);
        for name in ["socket", "socketpair"] {
            assert_eq!(entry(name).when, DenyWhen::AllOf(OTHER_SOCKET_DOMAINS));
        }
        assert_eq!(
            entry("ioctl").when,
            DenyWhen::AnyOf(TERMINAL_INPUT_INJECTION)
        );
        assert_eq!(entry("personality").when, DenyWhen::AllOf(UNUSUAL_PERSONAS));
    }

    #[test]
    fn program_builds_within_the_kernel_limit() {
        let program = sandbox_filter().unwrap();
        assert!(!program.is_empty());
        assert!(program.len() <= MAX_INSTRUCTIONS);
        let allows = program
            .iter()
            .filter(|i| i.code == RETURN && i.k == libc::SECCOMP_RET_ALLOW)
            .count();
        assert!(allows > 0, "the last group must still allow");
        // Only the last group's "allow"s remain; the earlier ones were linked.
        let last_group_start = program
            .iter()
            .rposition(|i| i.code == LOAD_WORD && i.k == SECCOMP_DATA_ARCH)
            .unwrap();
        assert!(
            program[..last_group_start]
                .iter()
                .all(|i| !(i.code == RETURN && i.k == libc::SECCOMP_RET_ALLOW))
        );
    }

    // A classic-BPF interpreter for the instructions seccompiler and the
    // guard emit, so the program's decisions can be checked without
    // installing it (the x32 and foreign-architecture paths cannot be
    // exercised live on most kernels).
    const AUDIT_ARCH_I386: u32 = 3 | 0x4000_0000;
    const NATIVE: u32 = 62 | 0x8000_0000 | 0x4000_0000;

    fn run(program: &BpfProgram, arch: u32, number: i64, args: [u64; 6]) -> u32 {
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&i32::try_from(number).unwrap().to_le_bytes());
        data.extend_from_slice(&arch.to_le_bytes());
        data.extend_from_slice(&0_u64.to_le_bytes());
        for arg in args {
            data.extend_from_slice(&arg.to_le_bytes());
        }
        let word = |offset: u32| {
            let at = usize::try_from(offset).unwrap();
            u32::from_le_bytes(data[at..at + 4].try_into().unwrap())
        };
        let mut accumulator = 0_u32;
        let mut pc = 0_usize;
        loop {
            let i = &program[pc];
            let class = u32::from(i.code) & 0x07;
            let op = u32::from(i.code) & 0xf0;
            pc += 1;
            match class {
                c if c == libc::BPF_LD => accumulator = word(i.k),
                c if c == libc::BPF_ALU && op == libc::BPF_AND => accumulator &= i.k,
                c if c == libc::BPF_RET => return i.k,
                c if c == libc::BPF_JMP => {
                    let taken = match op {
                        o if o == libc::BPF_JA => {
                            pc += usize::try_from(i.k).unwrap();
                            continue;
                        }
                        o if o == libc::BPF_JEQ => accumulator == i.k,
                        o if o == libc::BPF_JGT => accumulator > i.k,
                        o if o == libc::BPF_JGE => accumulator >= i.k,
                        o if o == libc::BPF_JSET => accumulator & i.k != 0,
                        _ => panic!("unexpected jump {:#x}", i.code),
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                _ => panic!("unexpected instruction {:#x}", i.code),
            }
        }
    }

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const REFUSE_EPERM: u32 = libc::SECCOMP_RET_ERRNO | EPERM;
    const REFUSE_ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | ENOSYS;

    fn native(program: &BpfProgram, number: i64, args: [u64; 6]) -> u32 {
        run(program, NATIVE, number, args)
    }

    fn first(arg0: u64) -> [u64; 6] {
        [arg0, 0, 0, 0, 0, 0]
    }

    fn domain(family: libc::c_int) -> u64 {
        u64::from(family.unsigned_abs())
    }

    #[test]
    fn program_decides_as_the_table_says() {
        let program = sandbox_filter().unwrap();
        for entry in DENIED.iter().filter(|e| e.when == DenyWhen::Always) {
            assert_eq!(
                native(&program, entry.number, [0; 6]),
                libc::SECCOMP_RET_ERRNO | entry.errno,
                "{}",
                entry.name
            );
        }
        for allowed in [
            libc::SYS_getpid,
            libc::SYS_read,
            libc::SYS_execve,
            libc::SYS_landlock_restrict_self,
        ] {
            assert_eq!(native(&program, allowed, [0; 6]), ALLOW, "{allowed}");
        }

        // clone: namespace bits refused, each alone; fork and thread flags pass.
        for flag in NAMESPACE_CLONE_FLAGS {
            let ArgTest::HasAllBits(bit) = flag.test else {
                panic!("clone conditions are bit tests")
            };
            let flags = u64::from(bit) | u64::from(libc::SIGCHLD.unsigned_abs());
            assert_eq!(
                native(&program, libc::SYS_clone, first(flags)),
                REFUSE_EPERM
            );
        }
        let fork_flags =
            (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID | libc::SIGCHLD).unsigned_abs();
        let thread_flags = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID)
            .unsigned_abs();
        for flags in [fork_flags, thread_flags] {
            assert_eq!(
                native(&program, libc::SYS_clone, first(u64::from(flags))),
                ALLOW
            );
        }

        // socket: only unix, inet, inet6, judged on the low 32 bits the
        // kernel reads.
        for family in [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6] {
            assert_eq!(
                native(&program, libc::SYS_socket, first(domain(family))),
                ALLOW
            );
            assert_eq!(
                native(&program, libc::SYS_socketpair, first(domain(family))),
                ALLOW
            );
        }
        for family in [
            libc::AF_NETLINK,
            libc::AF_PACKET,
            libc::AF_VSOCK,
            libc::AF_ALG,
        ] {
            assert_eq!(
                native(&program, libc::SYS_socket, first(domain(family))),
                REFUSE_EPERM
            );
            assert_eq!(
                native(
                    &program,
                    libc::SYS_socket,
                    first(domain(family) | 0xffff_ffff_0000_0000)
                ),
                REFUSE_EPERM
            );
        }
        assert_eq!(
            native(
                &program,
                libc::SYS_socketpair,
                first(domain(libc::AF_NETLINK))
            ),
            REFUSE_EPERM
        );

        // ioctl: terminal input injection refused, also with high garbage.
        let ioctl = |request: u64| native(&program, libc::SYS_ioctl, [1, request, 0, 0, 0, 0]);
        assert_eq!(ioctl(libc::TIOCSTI), REFUSE_EPERM);
        assert_eq!(ioctl(libc::TIOCSTI | (1 << 32)), REFUSE_EPERM);
        assert_eq!(ioctl(libc::TIOCLINUX), REFUSE_EPERM);
        assert_eq!(ioctl(libc::TCGETS), ALLOW);
        assert_eq!(ioctl(libc::TIOCGWINSZ), ALLOW);

        // personality: the harmless personas pass, mitigation switches do not.
        for persona in [0, 0x0008, 0x0002_0000, 0x0002_0008, 0xffff_ffff] {
            assert_eq!(
                native(&program, libc::SYS_personality, first(persona)),
                ALLOW,
                "{persona:#x}"
            );
        }
        for persona in [libc::ADDR_NO_RANDOMIZE, libc::READ_IMPLIES_EXEC] {
            assert_eq!(
                native(&program, libc::SYS_personality, first(domain(persona))),
                REFUSE_EPERM
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_and_foreign_architectures_cannot_bypass_the_table() {
        let program = sandbox_filter().unwrap();
        // x32 numbers of getpid and ptrace (ptrace is 521 in the x32 table).
        for x32_number in [0x4000_0000 + 39, 0x4000_0000 + 521, 0x4000_0000 + 101] {
            assert_eq!(run(&program, NATIVE, x32_number, [0; 6]), REFUSE_ENOSYS);
        }
        // i386 (int 0x80): its ptrace is 26, which is msync natively.
        assert_eq!(
            run(&program, AUDIT_ARCH_I386, 26, [0; 6]),
            libc::SECCOMP_RET_KILL_PROCESS
        );
        assert_eq!(
            run(&program, AUDIT_ARCH_I386, 20, [0; 6]),
            libc::SECCOMP_RET_KILL_PROCESS
        );
    }

    use crate::sys::in_forked_child;

    fn expect_refused<T: std::fmt::Debug>(
        failures: &mut Vec<String>,
        what: &str,
        result: nix::Result<T>,
        errno: Errno,
    ) {
        match result {
            Err(err) if err == errno => {}
            other => failures.push(format!("{what}: expected {errno}, got {other:?}")),
        }
    }

    fn filtered_child_checks() -> Vec<String> {
        let mut failures = Vec::new();
        if let Err(err) = nix::sys::prctl::set_no_new_privs() {
            return vec![format!("set_no_new_privs: {err}")];
        }
        let program = match sandbox_filter() {
            Ok(program) => program,
            Err(err) => return vec![format!("sandbox_filter: {err}")],
        };
        if let Err(err) = install(&program) {
            return vec![format!("install: {err:?}")];
        }

        expect_refused(
            &mut failures,
            "unshare(CLONE_NEWUTS)",
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUTS),
            Errno::EPERM,
        );
        expect_refused(
            &mut failures,
            "unshare(CLONE_NEWUSER)",
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER),
            Errno::EPERM,
        );
        expect_refused(
            &mut failures,
            "socket(AF_NETLINK)",
            socket(
                AddressFamily::Netlink,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::NetlinkRoute,
            ),
            Errno::EPERM,
        );
        expect_refused(
            &mut failures,
            "socket(AF_PACKET)",
            socket(
                AddressFamily::Packet,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                None,
            ),
            Errno::EPERM,
        );
        // Unfiltered, this fails with ENOENT (the target does not exist), so
        // EPERM can only come from the filter and nothing is ever mounted.
        expect_refused(
            &mut failures,
            "mount",
            nix::mount::mount(
                Some("none"),
                "/nonexistent-harness-seccomp-test",
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            ),
            Errno::EPERM,
        );
        // Unfiltered, reading nothing from ourselves succeeds.
        expect_refused(
            &mut failures,
            "process_vm_readv(self)",
            nix::sys::uio::process_vm_readv(Pid::this(), &mut [], &[]),
            Errno::EPERM,
        );

        // What stays allowed: IP and unix sockets, and spawning a process,
        // which goes through clone3 → ENOSYS → clone in glibc.
        for (family, name) in [
            (AddressFamily::Inet, "AF_INET"),
            (AddressFamily::Inet6, "AF_INET6"),
            (AddressFamily::Unix, "AF_UNIX"),
        ] {
            if let Err(err) = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None) {
                failures.push(format!("socket({name}) was refused: {err}"));
            }
        }
        match std::process::Command::new("/bin/true").status() {
            Ok(status) if status.success() => {}
            other => failures.push(format!("spawning /bin/true under the filter: {other:?}")),
        }
        failures
    }

    #[test]
    fn installed_filter_refuses_in_a_child() {
        assert!(
            crate::sys::seccomp_filter_available(),
            "this kernel has no seccomp filter mode (CONFIG_SECCOMP_FILTER)"
        );
        let failures = in_forked_child(filtered_child_checks);
        assert!(failures.is_empty(), "{}", failures.join("\n"));
    }
}
