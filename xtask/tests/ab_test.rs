//! `cargo xtask ab-test` on qemu-x86_64 through OVMF and systemd-boot, with bonsai-init and with
//! busybox init: every scenario (a fresh image blessed, an update blessed, rollbacks from a
//! release that panics, fails its health check or hangs, and no good slot left) must pass, as
//! the host judges it from each launch's console and the disk's entry names afterwards. A guest
//! that only says it blessed its slot, without renaming the entry, fails.
//!
//! Needs Nix, QEMU and OVMF (`cargo xtask test` installs them); fails, never skips, when
//! something is missing.

use std::fs;

mod common;
use common::{assert_matches_schema, command, out_root, require};

const SCENARIOS: &[&str] = &[
    "fresh-a-blessed",
    "update-b-blessed",
    "b-init-panics-rolls-back",
    "b-health-fails-rolls-back",
    "b-hangs-rolls-back",
    "all-slots-bad-stays-up",
];

fn ab_test(init: &str, extra: &[&str], broken: Option<&str>) -> (bool, serde_json::Value, String) {
    require("qemu-system-x86_64", "qemu-system-x86");
    let out = out_root().join(format!("ab-test-{init}"));
    let _ = fs::remove_dir_all(&out);
    let out_s = out.display().to_string();
    let mut args = vec![
        "ab-test",
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
    let json: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("ab-test --json printed no JSON ({e}):\n{stdout}\n{stderr}"));
    assert_matches_schema("ab-test", &stdout);
    // The file beside the logs holds the same matrix.
    let saved: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("ab-test.json")).unwrap()).unwrap();
    assert_eq!(saved, json);
    (o.status.success(), json, stderr)
}

fn every_scenario_passes(init: &str) {
    let (ok, json, stderr) = ab_test(init, &[], None);
    let rows = json["scenarios"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, SCENARIOS);
    for r in rows {
        assert_eq!(r["result"], "pass", "{}: {}", r["name"], r["problems"]);
    }
    assert!(ok, "ab-test failed although every row passed: {stderr}");
    assert_eq!(json["init"], init);
    let t = json["tries"].as_u64().unwrap() as usize;
    // The profile's health check ran on the trial and passed before the blessing.
    assert_eq!(
        rows[0]["launches"][0]["health"],
        serde_json::json!([{"name": "hello", "verdict": "pass"}])
    );
    for r in rows {
        let launches = r["launches"].as_array().unwrap();
        let name = r["name"].as_str().unwrap();
        // A rollback takes every try of B, then A once; its time is measured.
        if name.ends_with("-rolls-back") {
            assert_eq!(launches.len(), t + 1, "{name}");
            assert!(r["rollback_s"].as_f64().unwrap() > 0.0, "{name}");
            let last = launches.last().unwrap();
            assert_eq!(last["kernel_slot"], "a", "{name}");
            assert_eq!(
                last["entries_after"][1],
                format!("bonsai-b+0-{t}.conf"),
                "{name}"
            );
        }
        // Every launch's serial log is kept.
        for l in launches {
            assert!(
                fs::metadata(l["log"].as_str().unwrap()).is_ok(),
                "{name}: no log"
            );
        }
    }
}

#[test]
fn every_scenario_passes_with_busybox_and_a_claimed_blessing_fails() {
    every_scenario_passes("busybox");
    // The guest prints BONSAI-BLESSED but leaves the entry as systemd-boot counted it: the host
    // reads the disk and fails the scenario.
    let (ok, json, _) = ab_test("busybox", &["--only", "fresh-a-blessed"], Some("no-bless"));
    assert!(!ok, "ab-test passed a guest that never renamed its entry");
    let row = &json["scenarios"][0];
    assert_eq!(row["result"], "fail");
    let launch = &row["launches"][0];
    assert_eq!(launch["blessed"], true, "the guest did claim its blessing");
    assert_eq!(launch["entries_after"][0], "bonsai-a+2-1.conf");
    assert!(
        row["problems"][0]
            .as_str()
            .unwrap()
            .contains("entries afterwards are [bonsai-a+2-1.conf]"),
        "{}",
        row["problems"]
    );
}

#[test]
fn every_scenario_passes_with_bonsai_init() {
    every_scenario_passes("bonsai-init");
}
