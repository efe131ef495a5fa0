//! `sandbox-init`: pid 1 of a sandboxd process sandbox. Started only by
//! sandboxd, with its control socket as descriptor 3; see
//! `harness_sandbox_init::init` for what it does.

// A binary: the one thing it says is to a person who started it by hand.
#![allow(clippy::print_stderr)]

fn main() {
    if !harness_sandbox_init::init::started_by_sandboxd() {
        eprintln!(
            "sandbox-init: descriptor {} (the control socket) is not open; this program is \
             started only by sandboxd, as the first process of a process sandbox",
            harness_sandbox_init::sys::INIT_CONTROL_FD
        );
        std::process::exit(2);
    }
    std::process::exit(harness_sandbox_init::init::main());
}
