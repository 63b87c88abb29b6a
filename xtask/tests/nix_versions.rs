//! The default board under both Nix versions bonsai supports: Debian 12's Nix 2.8 (the host's)
//! and the pinned Debian 13 Nix 2.26 (`BONSAI_NIX=debian13`, provisioned by bonsai). Both build
//! into their own temporary output folders; the images must be byte-identical (the same
//! derivations give the same store paths), and under 2.26 the image boots, releases with a
//! valid SBOM and rebuilds bit for bit (`repro`). Needs Nix, QEMU and GNU cpio (`cargo xtask
//! test` installs them) and, the first time, the Debian archive to provision 2.26; fails, never
//! skips, without them.

use std::path::Path;
use std::process::{Command, Output};

mod common;
use common::{require, root};

const BOARD: &str = "qemu-x86_64";

/// Runs xtask with `BONSAI_NIX` set, echoing its output for the test log.
fn xtask(nix: &str, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env("BONSAI_NIX", nix)
        .current_dir(root())
        .output()
        .expect("running the xtask binary");
    eprintln!(
        "$ BONSAI_NIX={nix} xtask {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "BONSAI_NIX={nix} xtask {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn build_json(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("build.json")).unwrap()).unwrap()
}

fn nix_version(out: &Output) -> String {
    // `build` prints the Nix it used on one line: `nix: nix (Nix) 2.26.3 (debian13)`.
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim_start_matches("==> ").strip_prefix("nix: "))
        .unwrap_or_else(|| panic!("build printed no 'nix: ' line:\n{text}"))
        .to_string()
}

#[test]
fn both_nix_versions_build_the_same_image_and_the_current_one_boots_releases_and_repros() {
    require("qemu-system-x86_64", "qemu-system-x86");
    require("cpio", "cpio");
    let tmp = tempfile::tempdir().unwrap();
    let o28 = tmp.path().join("o28");
    let o26 = tmp.path().join("o26");

    let b28 = xtask(
        "host",
        &["build", "--board", BOARD, "--out", o28.to_str().unwrap()],
    );
    let b26 = xtask(
        "debian13",
        &["build", "--board", BOARD, "--out", o26.to_str().unwrap()],
    );
    let (v28, v26) = (nix_version(&b28), nix_version(&b26));
    // For the CI log: both versions, as each Nix prints itself.
    println!("Nix under test (host):     {v28}");
    println!("Nix under test (debian13): {v26}");
    eprintln!("Nix under test (host):     {v28}\nNix under test (debian13): {v26}");
    assert!(v28.starts_with("nix (Nix) 2.8."), "host Nix: {v28}");
    assert!(
        v26.starts_with("nix (Nix) 2.26.3") && v26.ends_with("(debian13)"),
        "pinned Nix: {v26}"
    );
    let (i28, i26) = (build_json(&o28), build_json(&o26));
    assert_eq!(i28["nix"]["kind"], "host");
    assert_eq!(i26["nix"]["kind"], "debian13");
    assert!(i26["nix"]["version"].as_str().unwrap().contains("2.26.3"));
    assert!(i28["nix"]["version"].as_str().unwrap().contains("2.8."));
    // Same derivations, same store paths, same bytes.
    assert_eq!(i28["store_paths"], i26["store_paths"]);
    assert_eq!(i28["nix"]["kernel"], i26["nix"]["kernel"]);
    for f in ["initramfs.cpio.gz", "kernel", "manifest.json"] {
        let (a, b) = (
            std::fs::read(o28.join(f)).unwrap(),
            std::fs::read(o26.join(f)).unwrap(),
        );
        assert!(a == b, "{f} differs between Nix {v28} and {v26}");
    }

    xtask(
        "debian13",
        &[
            "boot",
            "--board",
            BOARD,
            "--out",
            o26.to_str().unwrap(),
            "--check",
        ],
    );

    let rel = tmp.path().join("rel");
    xtask(
        "debian13",
        &[
            "release",
            "--board",
            BOARD,
            "--version",
            "nix26",
            "--out-dir",
            rel.to_str().unwrap(),
        ],
    );
    let sbom = rel.join(format!("{BOARD}-nix26/sbom.cdx.json"));
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&sbom).unwrap()).unwrap();
    let components = doc["components"].as_array().unwrap();
    assert!(!components.is_empty());
    for c in components {
        let sha = c["hashes"]
            .as_array()
            .and_then(|h| h.iter().find(|h| h["alg"] == "SHA-256"))
            .and_then(|h| h["content"].as_str())
            .unwrap_or_else(|| panic!("component without a SHA-256: {c}"));
        assert_eq!(sha.len(), 64, "{c}");
    }
    let kernel = components
        .iter()
        .find(|c| c["name"] == "linux")
        .expect("no kernel component in the SBOM");
    let kernel_path = i26["nix"]["kernel"].as_str().unwrap();
    assert_eq!(kernel["bom-ref"], kernel_path);
    assert!(
        kernel["version"].as_str().unwrap().starts_with("6."),
        "{kernel}"
    );
    // The merged config's SHA-256 is the one of the file bonsai configured the kernel with.
    let config = Path::new(i26["nix"]["kernel_config_path"].as_str().unwrap()).join("config");
    let sum = Command::new("sha256sum").arg(&config).output().unwrap();
    let want = String::from_utf8_lossy(&sum.stdout);
    let want = want
        .split_whitespace()
        .next()
        .expect("sha256sum of the merged config");
    assert!(
        kernel["properties"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({"name": "bonsai:kernel-config-sha256", "value": want})),
        "{kernel}"
    );
    let v = Command::new("python3")
        .arg(root().join("schemas/validate.py"))
        .arg(&sbom)
        .output()
        .expect("python3");
    assert!(
        v.status.success(),
        "SBOM invalid: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );

    xtask("debian13", &["repro", "--board", BOARD]);
}
