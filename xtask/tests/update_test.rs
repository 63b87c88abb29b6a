//! Field updates end to end. `cargo xtask keygen` and `bundle` write a release whose manifest
//! Debian's minisign verifies and which holds no secret; `delta` reads two of them. Then
//! `cargo xtask update-test` on qemu-x86_64 through OVMF and systemd-boot, with busybox init
//! (twenty power cuts) and bonsai-init (one cut per phase), and runit and s6 (install, a
//! refusal, rollback), in parallel: every scenario must
//! pass as the host judges it from the consoles, the entry names and the boot partition's
//! bytes. A guest that never blesses its trial fails the install scenario.
//!
//! Needs Nix, QEMU, OVMF and minisign (`cargo xtask test` installs them); fails, never skips,
//! when something is missing.

use std::fs;
use std::process::Command;

mod common;
use common::{assert_matches_schema, command, ok, out_root, require};

const SCENARIOS: &[&str] = &[
    "install",
    "refuse-wrong-signature",
    "refuse-other-board",
    "refuse-older-version",
    "refuse-corrupt-chunk",
    "refuse-truncated-bundle",
    "resume-over-http",
    "rollback",
];

fn update_test(
    init: &str,
    extra: &[&str],
    broken: Option<&str>,
) -> (bool, serde_json::Value, String) {
    require("qemu-system-x86_64", "qemu-system-x86");
    let out = out_root().join(format!("update-test-{init}"));
    let out_s = out.display().to_string();
    let mut args = vec![
        "update-test",
        "--board",
        "qemu-x86_64",
        "--init",
        init,
        "--json",
        "--out",
        &out_s,
    ];
    args.extend_from_slice(extra);
    let mut cmd = command(&args);
    if let Some(b) = broken {
        cmd.env("BONSAI_TEST_BROKEN", b);
    }
    let o = cmd.output().expect("running the xtask binary");
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    eprintln!("$ xtask {}\n{stderr}", args.join(" "));
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    let json: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("update-test --json printed no JSON ({e}):\n{stdout}\n{stderr}")
    });
    (o.status.success(), json, stderr)
}

fn every_scenario_passes(init: &str, cuts: usize) {
    let cuts_s = cuts.to_string();
    let (ok, json, stderr) = update_test(init, &["--cuts", &cuts_s], None);
    let rows = json["scenarios"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    let mut want: Vec<String> = SCENARIOS.iter().map(|s| s.to_string()).collect();
    want.extend((1..=cuts).map(|i| format!("power-cut-{i:02}")));
    assert_eq!(names, want);
    for r in rows {
        assert_eq!(r["result"], "pass", "{}: {}", r["name"], r["detail"]);
    }
    assert!(ok, "update-test failed although every row passed: {stderr}");
    assert_eq!(json["init"], init);
    // Every launch the host cut survived; a point may come after the install has finished
    // (host timing), but nearly all of them fall inside it.
    let missed = json["power_cuts_missed"].as_u64().unwrap() as usize;
    assert!(
        missed * 10 <= cuts,
        "{missed} of {cuts} cut points missed the install"
    );
    let really = cuts - missed;
    assert_eq!(json["power_cuts_survived"], format!("{really} of {really}"));
    // A small change fetches a small part of the bundle: the rest comes from slot A.
    let install = &rows[0];
    let fetched = install["fetched_bytes"].as_u64().unwrap();
    let whole = json["bundle_bytes"].as_u64().unwrap();
    assert!(
        fetched > 0 && fetched * 10 < whole,
        "fetched {fetched} of {whole}"
    );
    for r in &rows[1..6] {
        let l = &r["launches"][0];
        assert_eq!(l["esp_changed"], false, "{}", r["name"]);
        assert_eq!(l["refused"].as_array().unwrap().len(), 1, "{}", r["name"]);
    }
    // Over HTTP, the cut response was resumed: the server sent what the plan needed plus the
    // cut part, no verified chunk twice (the row checks the exact count).
    let resume = rows
        .iter()
        .find(|r| r["name"] == "resume-over-http")
        .unwrap();
    assert!(resume["launches"][0]["update"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l.as_str().unwrap().starts_with("BONSAI-UPDATE-RESUME")));
    // The cuts landed in every phase of the install.
    let phases: std::collections::BTreeSet<String> = rows[SCENARIOS.len()..]
        .iter()
        .filter_map(|r| r["launches"][0]["cut_after"].as_str())
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .collect();
    assert!(phases.len() >= cuts.min(4), "cuts after {phases:?}");
}

#[test]
fn every_scenario_passes_with_busybox_and_twenty_power_cuts() {
    every_scenario_passes("busybox", 20);
    // A guest whose health step says it blessed but leaves the entry as systemd-boot counted
    // it: the host reads the disk after the first boot and stops there.
    let out = out_root().join("update-test-no-bless");
    let o = command(&[
        "update-test",
        "--init",
        "busybox",
        "--only",
        "install",
        "--out",
        out.to_str().unwrap(),
    ])
    .env("BONSAI_TEST_BROKEN", "no-bless")
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "update-test passed a guest that never blessed"
    );
    assert!(
        stderr.contains("did not bless slot a: the guest said blessed: true, the entries afterwards are [\"bonsai-a+2-1.conf\"]"),
        "{stderr}"
    );
}

#[test]
fn every_scenario_passes_with_bonsai_init() {
    every_scenario_passes("bonsai-init", 5);
}

/// runit and s6 run the same harness as busybox: the install (one package changed), a
/// refused bundle and the rollback, each judged as for the other two.
#[test]
fn runit_and_s6_install_refuse_and_roll_back() {
    for init in ["runit", "s6"] {
        let (ok, json, stderr) = update_test(
            init,
            &["--only", "install,refuse-corrupt-chunk,rollback"],
            None,
        );
        let rows = json["scenarios"].as_array().unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            ["install", "refuse-corrupt-chunk", "rollback"],
            "{init}"
        );
        for r in rows {
            assert_eq!(r["result"], "pass", "{init} {}: {}", r["name"], r["detail"]);
        }
        assert!(ok, "{init}: {stderr}");
        assert_eq!(json["init"], init);
        assert_eq!(rows[1]["launches"][0]["esp_changed"], false, "{init}");
    }
}

#[test]
fn a_bundle_verifies_with_minisign_and_delta_reads_two_releases() {
    require("minisign", "minisign");
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("key");
    ok(&["keygen", "--out", prefix.to_str().unwrap()]);
    let (public, secret) = (dir.path().join("key.pub"), dir.path().join("key.key"));
    // A second keygen does not overwrite the key.
    let again = common::xtask(&["keygen", "--out", prefix.to_str().unwrap()]);
    assert!(!again.status.success());
    let releases = out_root().join("bundle-releases");
    let _ = fs::remove_dir_all(&releases);
    for v in ["1.0.0", "1.0.1"] {
        ok(&[
            "bundle",
            "--board",
            "qemu-x86_64",
            "--version",
            v,
            "--key",
            secret.to_str().unwrap(),
            "--out-dir",
            releases.to_str().unwrap(),
        ]);
    }
    let d = releases.join("qemu-x86_64-1.0.0");
    let manifest = d.join("qemu-x86_64-1.0.0.manifest");
    let o = Command::new("minisign")
        .arg("-Vm")
        .arg(&manifest)
        .arg("-p")
        .arg(&public)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The manifest in the bundle is the plain file's bytes.
    let bundle = fs::read(d.join("qemu-x86_64-1.0.0.bundle")).unwrap();
    let m = fs::read(&manifest).unwrap();
    assert_eq!(&bundle[32..32 + m.len()], &m[..]);
    // No line of the secret key is anywhere in the release folder.
    let secret_line = fs::read_to_string(&secret)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    for e in fs::read_dir(&d).unwrap() {
        let bytes = fs::read(e.unwrap().path()).unwrap();
        assert!(!String::from_utf8_lossy(&bytes).contains(&secret_line));
    }
    // The same image in both releases: nothing to fetch but the head.
    let text = ok(&[
        "delta",
        d.to_str().unwrap(),
        releases.join("qemu-x86_64-1.0.1").to_str().unwrap(),
        "--json",
    ]);
    assert_matches_schema("delta", &text);
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["payload_fetched"], 0);
    assert_eq!(json["chunks_fetched"], 0);
    assert!(json["index_percent"].as_f64().unwrap() < 1.0);
    // A folder without a bundle is one line naming it.
    let bad = common::xtask(&["delta", dir.path().to_str().unwrap(), d.to_str().unwrap()]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no .bundle in this release folder"));
}
