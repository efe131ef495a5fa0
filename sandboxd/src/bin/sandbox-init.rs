//! `sandbox-init`: pid 1 of a sandboxd process sandbox. Started only by
//! sandboxd; see `harness_sandboxd::process::init` for what it does.

fn main() {
    std::process::exit(harness_sandboxd::process::init::main());
}
