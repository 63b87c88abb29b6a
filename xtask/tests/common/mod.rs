//! Helpers shared by the end-to-end test files: the repository root, running the xtask
//! binary (its output echoed for the test log), and host tools that must be there.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs the xtask binary in the repository root.
pub fn xtask(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("running the xtask binary");
    eprintln!(
        "$ xtask {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs the xtask binary, fails the test unless it succeeds, and returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let out = xtask(args);
    assert!(
        out.status.success(),
        "xtask {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails the test, naming the Debian package, when `program` is not on PATH.
pub fn require(program: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .unwrap()
        .status
        .success();
    assert!(found, "{program} is not installed: run `cargo xtask test` (it installs {package}) or apt-get install {package}");
}
