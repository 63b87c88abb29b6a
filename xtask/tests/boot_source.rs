//! `boot` builds only from the package source it was asked for, else from the one the existing
//! output was built from: never silently from another. Offline, against the stub Nixpkgs in
//! nix/tests (which evaluates but builds no bootable kernel, so every build from it fails at the
//! kernel: that failure is how the tests see that the stub, and not the offline set, was used).
//! Needs Nix (`cargo xtask test` installs it); fails, never skips, without it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

const BOARD: &str = "qemu-x86_64";

/// A scratch copy of the data folders, built once from the offline set.
fn scratch_with_offline_build() -> tempfile::TempDir {
    let scratch = common::scratch_repo();
    let out = run(scratch.path(), &["build", "--board", BOARD], None);
    assert!(out.status.success(), "the offline build failed");
    scratch
}

fn run(scratch: &Path, args: &[&str], nixpkgs_env: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.args(args)
        .env("BONSAI_ROOT", scratch)
        .env_remove("BONSAI_NIXPKGS");
    if let Some(n) = nixpkgs_env {
        cmd.env("BONSAI_NIXPKGS", n);
    }
    common::echo(args, cmd.output().expect("running the xtask binary"))
}

/// The Nixpkgs fixture: it builds a real (unbootable, fake-kernel) image offline.
fn fixture(scratch: &Path) -> PathBuf {
    scratch
        .join("nix/tests/nixpkgs-fixture")
        .canonicalize()
        .unwrap()
}

fn out_dir(scratch: &Path) -> PathBuf {
    scratch.join("out").join(BOARD)
}

fn snapshot(scratch: &Path) -> (String, Vec<u8>) {
    let out = out_dir(scratch);
    (
        std::fs::read_to_string(out.join("build.json")).unwrap(),
        std::fs::read(out.join("initramfs.cpio.gz")).unwrap(),
    )
}

fn recorded_source(scratch: &Path) -> String {
    let info: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir(scratch).join("build.json")).unwrap(),
    )
    .unwrap();
    info["source"].as_str().unwrap_or_default().to_string()
}

/// `boot` built from the fixture first, said so in one line, and the output records it.
fn built_from_the_fixture(scratch: &Path, out: &Output, fixture: &Path, why: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "boot --print failed:\n{err}");
    let want = format!(
        "building {BOARD} first from nixpkgs {} ({why}",
        fixture.display()
    );
    assert!(
        err.lines()
            .any(|l| l.trim_start_matches("==> ").starts_with(&want)),
        "no line '{want}' in:\n{err}"
    );
    assert_eq!(
        recorded_source(scratch),
        format!("nixpkgs {}", fixture.display())
    );
}

#[test]
fn boot_builds_from_the_nixpkgs_it_is_asked_for_and_says_so() {
    let why = "out/qemu-x86_64 was built from offline; asked for nixpkgs";
    // With --nixpkgs: the offline output is not booted; boot builds from the fixture first.
    let scratch = scratch_with_offline_build();
    let s = scratch.path();
    let fx = fixture(s);
    let flag = run(
        s,
        &[
            "boot",
            "--board",
            BOARD,
            "--print",
            "--nixpkgs",
            fx.to_str().unwrap(),
        ],
        None,
    );
    built_from_the_fixture(s, &flag, &fx, why);
    // With BONSAI_NIXPKGS, the same.
    let scratch = scratch_with_offline_build();
    let s = scratch.path();
    let fx = fixture(s);
    let env = run(s, &["boot", "--board", BOARD, "--print"], Some(&fx));
    built_from_the_fixture(s, &env, &fx, why);
}

#[test]
fn boot_never_replaces_a_nixpkgs_build_with_an_offline_one() {
    let scratch = scratch_with_offline_build();
    let s = scratch.path();
    let fx = fixture(s);
    let built = run(
        s,
        &["build", "--board", BOARD, "--nixpkgs", fx.to_str().unwrap()],
        None,
    );
    assert!(built.status.success(), "the build from the fixture failed");
    let before = snapshot(s);
    // Nothing asked: boot keeps the source the output was built from.
    let out = run(s, &["boot", "--board", BOARD, "--print"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "boot --print failed:\n{err}");
    assert!(
        !err.contains("first from offline"),
        "boot rebuilt from the offline set:\n{err}"
    );
    assert_eq!(recorded_source(s), format!("nixpkgs {}", fx.display()));
    assert!(
        snapshot(s) == before,
        "boot replaced the Nixpkgs output with another"
    );
}
