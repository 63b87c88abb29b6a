//! nix/bonsai.nix against a stub package set that follows Nixpkgs' calling convention
//! (nix/tests/stub-nixpkgs): the same attribute names resolve, cross builds use
//! `{ localSystem; crossSystem; }`, kernels go through linuxManualConfig with the merged config.
//! Needs `nix-instantiate` (installed by `cargo xtask test`); fails, never skips, without it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn nix_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("nix")
}

fn eval(expr: &str) -> Result<serde_json::Value, String> {
    let mut cmd = Command::new("nix-instantiate");
    cmd.args(["--eval", "--strict", "--json", "-E", expr])
        .current_dir(nix_dir());
    for (k, v) in xtask::host::nix_env() {
        cmd.env(k, v);
    }
    let out = cmd.output().expect(
        "nix-instantiate is not installed: run `cargo xtask test` or apt-get install nix-bin",
    );
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn bonsai(system: &str, request: &str) -> String {
    format!(
        r#"import ./bonsai.nix {{ source = "nixpkgs"; nixpkgs = ./tests/stub-nixpkgs; system = "{system}"; hostSystem = "x86_64-linux"; request = ''{request}''; }}"#
    )
}

#[test]
fn native_packages_and_kernel_resolve_by_attribute_name() {
    let b = bonsai(
        "x86_64-linux",
        r#"{"packages":["hello","nested.tool"],"kernel":{"base":"tinyconfig","fragments":["qemu-x86_64.config"]}}"#,
    );
    let v = eval(&format!("let b = {b}; in {{ p = map (x: x.name) (builtins.attrValues b.packages); k = b.kernel.name; c = b.kernelConfig.name; }}")).unwrap();
    assert_eq!(
        v["p"],
        serde_json::json!([
            "stub-hello-for-x86_64-linux-on-x86_64-linux",
            "stub-nested-tool-for-x86_64-linux-on-x86_64-linux"
        ])
    );
    assert_eq!(v["k"], "stub-kernel-6.1.0-for-x86_64-linux-on-x86_64-linux");
    assert_eq!(
        v["c"],
        "stub-linux-config-6.1.0-for-x86_64-linux-on-x86_64-linux"
    );
}

#[test]
fn other_architectures_use_the_cross_package_set() {
    let b = bonsai(
        "aarch64-linux",
        r#"{"packages":["busybox"],"kernel":{"package":"linux"}}"#,
    );
    let v = eval(&format!(
        "let b = {b}; in {{ p = b.packages.p0.name; k = b.kernel.name; }}"
    ))
    .unwrap();
    assert_eq!(v["p"], "stub-busybox-for-aarch64-linux-on-x86_64-linux");
    assert_eq!(v["k"], "stub-linux-for-aarch64-linux-on-x86_64-linux");
}

#[test]
fn a_missing_attribute_is_named() {
    let b = bonsai(
        "x86_64-linux",
        r#"{"packages":["no.such"],"kernel":{"package":"linux"}}"#,
    );
    let err = eval(&format!("({b}).packages.p0.name")).unwrap_err();
    assert!(
        err.contains(
            "bonsai: package attribute 'no.such' does not exist in the nixpkgs package set"
        ),
        "{err}"
    );
}
