//! Builds the standard tools and the test tools for `wasm32-wasip2` from source and copies
//! the components to `$OUT_DIR/tools/` and `$OUT_DIR/test-tools/`, so tests and the demo
//! never depend on committed binaries.
//!
//! The tools are members of this workspace, so this runs a nested `cargo build` on the same
//! manifest. It uses its own target directory (`target/wasm-tools`): the outer cargo holds the
//! lock on its own target directory while build scripts run, and one shared wasm build serves
//! every outer profile and clippy run.

// Build scripts talk to cargo through stdout (`cargo:` lines) and report to humans on stderr.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const WASM_TARGET: &str = "wasm32-wasip2";
/// Crate names of the standard tools; each produces `<name>.wasm`.
const TOOLS: &[&str] = &[
    "edit_file",
    "glob",
    "grep",
    "http_fetch",
    "list_dir",
    "read_file",
    "write_file",
];
/// Crate names of the tools only sandboxd's tests use; kept out of the standard tools
/// directory so no deployment picks them up.
const TEST_TOOLS: &[&str] = &["misbehave", "tally"];
/// `\0asm` followed by the component-model layer/version (core modules have `01 00 00 00`).
const COMPONENT_HEADER: [u8; 8] = [0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];

/// Variables the outer build sets for this script or its own compilation; any of them
/// would change what the nested build does (clippy's wrapper, the host's flags and target,
/// the outer jobserver) or where it puts things.
const POISONED_VARS: &[&str] = &[
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTC_WRAPPER",
    "RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
    "OUT_DIR",
    "TARGET",
    "HOST",
    "RUSTC",
    "RUSTDOC",
    "RUSTC_LINKER",
    "DEBUG",
    "OPT_LEVEL",
    "PROFILE",
    "NUM_JOBS",
];
const POISONED_PREFIXES: &[&str] = &[
    "CARGO_ENCODED_",
    "CARGO_PROFILE_",
    "CARGO_CFG_",
    "CARGO_FEATURE_",
    "CARGO_PKG_",
    "CARGO_MANIFEST_",
];

fn main() {
    if let Err(message) = run() {
        eprintln!("error: building the wasm tools failed: {message}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let manifest_dir = PathBuf::from(env_var("CARGO_MANIFEST_DIR")?);
    let workspace = manifest_dir
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("{} has no workspace root", manifest_dir.display()))?
        .to_path_buf();
    let out_dir = PathBuf::from(env_var("OUT_DIR")?);
    let cargo = env_var("CARGO")?;

    for watched in [
        "tools-wasm/wit",
        "tools-wasm/sdk",
        "tools-wasm/tools",
        "tools-wasm/test-tools",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }
    // The lock file pins the tools' dependencies and the manifest holds the profiles.
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.lock").display()
    );
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.toml").display()
    );

    let wasm_target_dir = workspace.join("target").join("wasm-tools");
    if check_wasm_target(&cargo).is_err() {
        install_wasm_target(&workspace)?;
    }
    check_wasm_target(&cargo)?;
    build_tools(&cargo, &workspace, &wasm_target_dir)?;

    let built = wasm_target_dir.join(WASM_TARGET).join("release");
    install(&built, TOOLS, &out_dir.join("tools"))?;
    install(&built, TEST_TOOLS, &out_dir.join("test-tools"))?;
    Ok(())
}

/// Copies `<tool>.wasm` for each of `tools` from `built` into `dir`, after checking it is a
/// component, and removes any other file there (a tool dropped from the list must not linger
/// in a directory that tests treat as exactly the listed tools).
fn install(built: &Path, tools: &[&str], dir: &Path) -> Result<(), String> {
    fs::create_dir_all(dir).map_err(|err| format!("creating {}: {err}", dir.display()))?;
    let wanted: Vec<String> = tools.iter().map(|tool| format!("{tool}.wasm")).collect();
    let existing = fs::read_dir(dir).map_err(|err| format!("listing {}: {err}", dir.display()))?;
    for entry in existing {
        let entry = entry.map_err(|err| format!("listing {}: {err}", dir.display()))?;
        if !wanted.iter().any(|name| entry.file_name() == name.as_str()) {
            let stale = entry.path();
            fs::remove_file(&stale)
                .map_err(|err| format!("removing {}: {err}", stale.display()))?;
        }
    }
    for name in &wanted {
        let from = built.join(name);
        let to = dir.join(name);
        check_component(&from)?;
        fs::copy(&from, &to)
            .map_err(|err| format!("copying {} to {}: {err}", from.display(), to.display()))?;
    }
    Ok(())
}

fn env_var(name: &str) -> Result<OsString, String> {
    env::var_os(name).ok_or_else(|| format!("cargo did not set {name}"))
}

/// Fails early with the fix when the target's standard library is not installed; otherwise
/// the nested build dies with a "can't find crate for `core`" that hides the cause.
fn check_wasm_target(cargo: &OsString) -> Result<(), String> {
    // The sysroot of the toolchain the nested cargo will use, i.e. the `rustc` next to it
    // (`RUSTC` is the outer one's, which may be a different toolchain under a wrapper).
    let rustc = Path::new(cargo).with_file_name(format!("rustc{}", env::consts::EXE_SUFFIX));
    let rustc = if rustc.is_file() {
        rustc.into_os_string()
    } else {
        OsString::from("rustc")
    };
    let mut command = Command::new(&rustc);
    scrub_env(&mut command);
    let output = command
        .args(["--print", "sysroot"])
        .output()
        .map_err(|err| format!("running `{} --print sysroot`: {err}", rustc.display()))?;
    if !output.status.success() {
        return Err(format!(
            "`{} --print sysroot` failed: {}",
            rustc.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let target_lib = sysroot.join("lib/rustlib").join(WASM_TARGET).join("lib");
    if !target_lib.is_dir() {
        return Err(format!(
            "the {WASM_TARGET} target is not installed for the toolchain at {} \
             (no {}); run `rustup target add {WASM_TARGET}`",
            sysroot.display(),
            target_lib.display()
        ));
    }
    Ok(())
}

/// A fresh machine has rustup and cargo but not the wasm target: install it
/// (for the toolchain `rust-toolchain.toml` pins) so the README's two commands
/// work as they are. Without rustup the check that follows names the fix.
fn install_wasm_target(workspace: &Path) -> Result<(), String> {
    println!(
        "cargo:warning=installing the {WASM_TARGET} target with `rustup target add {WASM_TARGET}`"
    );
    let status = Command::new("rustup")
        .args(["target", "add", WASM_TARGET])
        .current_dir(workspace)
        .stdout(std::process::Stdio::null())
        .status();
    match status {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!(
            "`rustup target add {WASM_TARGET}` failed ({status}); run it by hand"
        )),
        Err(err) => Err(format!(
            "cannot run rustup ({err}); install the {WASM_TARGET} target for your toolchain"
        )),
    }
}

fn build_tools(cargo: &OsString, workspace: &Path, target_dir: &Path) -> Result<(), String> {
    let mut command = Command::new(cargo);
    scrub_env(&mut command);
    command
        .arg("build")
        .arg("--release")
        .args(["--target", WASM_TARGET])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        // Small components compile faster in wasmtime and load faster; debug info is of no
        // use to a model reading a tool error.
        .args(["--config", "profile.release.debug=false"])
        .args(["--config", "profile.release.strip=true"])
        .args(["--config", "profile.release.opt-level=\"s\""]);
    // One invocation for all of them: the tools share the SDK and most dependencies.
    for tool in TOOLS.iter().chain(TEST_TOOLS) {
        command.args(["-p", tool]);
    }
    // Cargo parses this script's stdout for directives, so the nested build's output all
    // goes to stderr, which cargo shows when the build fails.
    command.stdout(Stdio::from(std::io::stderr()));
    let status = command
        .status()
        .map_err(|err| format!("running `{}`: {err}", Path::new(cargo).display()))?;
    if !status.success() {
        return Err(format!(
            "`cargo build --release --target {WASM_TARGET} -p {} -p {}` failed ({status}); \
             its output is above",
            TOOLS.join(" -p "),
            TEST_TOOLS.join(" -p ")
        ));
    }
    Ok(())
}

fn scrub_env(command: &mut Command) {
    for (name, _) in env::vars_os() {
        let Some(name) = name.to_str() else { continue };
        if POISONED_VARS.contains(&name)
            || POISONED_PREFIXES
                .iter()
                .any(|prefix| name.starts_with(prefix))
        {
            command.env_remove(name);
        }
    }
}

/// Rust only emits a component for `wasm32-wasip2` when linking goes through
/// `wasm-component-ld`; a core module here means the toolchain is misconfigured and sandboxd
/// would refuse the file.
fn check_component(path: &Path) -> Result<(), String> {
    let bytes = fs::read(path).map_err(|err| format!("reading {}: {err}", path.display()))?;
    if bytes.get(..COMPONENT_HEADER.len()) != Some(&COMPONENT_HEADER[..]) {
        return Err(format!(
            "{} is not a WebAssembly component (header {:02x?})",
            path.display(),
            bytes.get(..8).unwrap_or(&bytes)
        ));
    }
    Ok(())
}
