//! `boot` builds only from the package source it was asked for, else from the one the existing
//! output was built from: never silently from another. Offline, against the stub Nixpkgs in
//! nix/tests (which evaluates but builds no bootable kernel, so every build from it fails at the
//! kernel: that failure is how the tests see that the stub, and not the offline set, was used).
//! Needs Nix (`cargo xtask test` installs it); fails, never skips, without it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::root;

const BOARD: &str = "qemu-x86_64";

/// A scratch copy of the data folders, built once from the offline set.
fn scratch_with_offline_build() -> tempfile::TempDir {
    let scratch = tempfile::tempdir().unwrap();
    for d in ["boards", "profiles", "kernel-configs", "nix", "examples"] {
        let status = Command::new("cp")
            .arg("-r")
            .arg(root().join(d))
            .arg(scratch.path())
            .status()
            .unwrap();
        assert!(status.success());
    }
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
    let out = cmd.output().expect("running the xtask binary");
    eprintln!(
        "$ xtask {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stub(scratch: &Path) -> PathBuf {
    scratch
        .join("nix/tests/stub-nixpkgs")
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

/// The build from the stub was attempted, announced in one line, and failed at its kernel.
fn tried_the_stub(out: &Output, stub: &Path, why: &str) {
    assert!(
        !out.status.success(),
        "a build from the stub cannot succeed"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    let want = format!(
        "building {BOARD} first from nixpkgs {} ({why}",
        stub.display()
    );
    assert!(
        err.lines()
            .any(|l| l.trim_start_matches("==> ").starts_with(&want)),
        "no line '{want}' in:\n{err}"
    );
    assert!(
        err.lines().last().unwrap().contains("-stub-"),
        "the build did not fail at the stub's kernel:\n{err}"
    );
}

#[test]
fn boot_builds_from_the_nixpkgs_it_is_asked_for_and_says_so() {
    let scratch = scratch_with_offline_build();
    let s = scratch.path();
    let stub = stub(s);
    let before = snapshot(s);
    let why = "out/qemu-x86_64 was built from offline; asked for nixpkgs";
    // With --nixpkgs and with BONSAI_NIXPKGS: the offline output is not booted, and the failed
    // build from the stub leaves it as it was.
    let flag = run(
        s,
        &[
            "boot",
            "--board",
            BOARD,
            "--print",
            "--nixpkgs",
            stub.to_str().unwrap(),
        ],
        None,
    );
    tried_the_stub(&flag, &stub, why);
    let env = run(s, &["boot", "--board", BOARD, "--print"], Some(&stub));
    tried_the_stub(&env, &stub, why);
    assert!(snapshot(s) == before, "the offline output changed");
}

#[test]
fn boot_never_replaces_a_nixpkgs_build_with_an_offline_one() {
    let scratch = scratch_with_offline_build();
    let s = scratch.path();
    let stub = stub(s);
    // The stub cannot build a bootable image, so the output is marked as built from it: what
    // `build --nixpkgs <stub>` would record, with a fingerprint of other inputs.
    let file = out_dir(s).join("build.json");
    let mut info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    info["source"] = format!("nixpkgs {}", stub.display()).into();
    info["nix"]["nixpkgs"] = stub.display().to_string().into();
    std::fs::write(&file, serde_json::to_string_pretty(&info).unwrap()).unwrap();
    let before = snapshot(s);
    // Nothing asked: the rebuild (its recorded fingerprint is not the stub's) is from the stub.
    let out = run(s, &["boot", "--board", BOARD, "--print"], None);
    tried_the_stub(&out, &stub, "its inputs changed");
    assert!(
        snapshot(s) == before,
        "boot replaced the Nixpkgs output with another"
    );
}
