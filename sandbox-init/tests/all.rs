//! The `sandbox-init` binary on its own. Everything it does inside a sandbox
//! is tested through sandboxd (`sandboxd/tests/process.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[test]
fn started_by_hand_it_refuses_and_says_who_starts_it() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_sandbox-init"))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "sandbox-init: descriptor 3 (the control socket) is not open; this program is started \
         only by sandboxd, as the first process of a process sandbox\n"
    );
}
