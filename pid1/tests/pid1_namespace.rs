//! bonsai-init as a real PID 1, in new PID, mount and UTS namespaces (`unshare`): the
//! pid1 path runs unchanged (console, mounts, hostname, kill(-1), reboot(2)). In a PID
//! namespace, reboot(2) ends the namespace's init with SIGINT (poweroff, halt) or SIGHUP
//! (reboot) instead of the machine. Needs root and util-linux `unshare`; otherwise the tests
//! say so and pass, except in CI, where the skip fails (`xtask/src/skip.rs`, the shared rule). (Emergency mode is not booted here: its shell would take the host's
//! /dev/console.)

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Output};

const BIN: &str = env!("CARGO_BIN_EXE_bonsai-init");

#[path = "../../xtask/src/skip.rs"]
#[allow(dead_code)]
mod skip;

/// Says why the test does not run, or fails it when a skip is not allowed (in CI).
fn skipped(why: &str) -> bool {
    match skip::skip(
        "bonsai-init in namespaces (pid1/tests/pid1_namespace.rs)",
        why,
    ) {
        Ok(line) => {
            eprintln!("{line}");
            false
        }
        Err(line) => panic!("{line}"),
    }
}

fn namespaces_available() -> bool {
    if !nix::unistd::geteuid().is_root() {
        return skipped("needs root for namespaces");
    }
    let ok = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount",
            "--uts",
            "--mount-proc",
            "true",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        return skipped("unshare --pid --mount --uts does not work here");
    }
    ok
}

/// Boots bonsai-init as PID 1 of fresh namespaces with this config, under a 60 s timeout.
fn boot(dir: &Path, config: &str) -> (Output, String) {
    let path = dir.join("init.json");
    std::fs::write(&path, config).unwrap();
    let out = Command::new("timeout")
        .args([
            "60",
            "unshare",
            "--pid",
            "--fork",
            "--mount",
            "--uts",
            "--mount-proc",
        ])
        .arg("env")
        .arg(format!("BONSAI_INIT_CONFIG={}", path.display()))
        .arg(BIN)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{log}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    (out, log)
}

/// The signal that ended the namespace's init: unshare and timeout pass it on by dying of it
/// themselves (or, for some versions, by exiting with 128 + signal).
fn ending_signal(status: ExitStatus) -> Option<i32> {
    status.signal().or(status.code().map(|c| c - 128))
}

fn position(log: &str, needle: &str) -> usize {
    log.find(needle)
        .unwrap_or_else(|| panic!("no {needle:?} in:\n{log}"))
}

#[test]
fn boots_supervises_and_powers_off_as_pid1() {
    if !namespaces_available() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    let config = format!(
        r#"{{
      "hostname": "bonsai-test",
      "mounts": [
        {{"source": "tmpfs", "target": "{d}/run", "fstype": "tmpfs", "options": "nosuid,nodev,mode=0700,size=1m", "mode": 1005}}
      ],
      "tmpfiles": [{{"type": "dir", "path": "{d}/run/app", "mode": 488}}],
      "setup": [["/bin/sh", "-c", "echo hostname=$(cat /proc/sys/kernel/hostname)"]],
      "services": [
        {{"name": "svc", "argv": ["/bin/sh", "-c", "echo i am $$ under $PPID; exec sleep 100"]}},
        {{"name": "orphan-maker", "kind": "oneshot", "argv": ["/bin/sh", "-c", "/bin/sleep 100 & echo spawned"]}}
      ],
      "after_start": [["/bin/sh", "-c", "stat -c '%a %n' {d}/run {d}/run/app; {BIN} poweroff"]],
      "shutdown_timeout_ms": 3000
    }}"#
    );
    let (out, log) = boot(tmp.path(), &config);
    // The namespace's init (bonsai-init) was ended by SIGINT: its reboot(2) with RB_POWER_OFF.
    assert_eq!(ending_signal(out.status), Some(2), "{log}");
    position(&log, "bonsai-init: starting (version 0.1.0) at ");
    position(&log, "hostname=bonsai-test");
    position(&log, "[svc] i am ");
    position(&log, " under 1\n");
    position(&log, &format!("1755 {d}/run\n"));
    position(&log, &format!("750 {d}/run/app\n"));
    let stopping = position(&log, "bonsai-init: stopping services");
    assert!(position(&log, "bonsai-init: stopped svc") > stopping);
    assert!(log.ends_with("bonsai-init: poweroff\n"), "{log}");
    // The mount stayed inside the namespace.
    assert!(std::fs::read_dir(tmp.path().join("run"))
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn reboot_and_halt_requests_from_the_client() {
    if !namespaces_available() {
        return;
    }
    for (command, signal, last) in [("reboot", 1, "reboot"), ("halt", 2, "halt")] {
        let tmp = tempfile::tempdir().unwrap();
        let config = format!(
            r#"{{"services": [{{"name": "s", "argv": ["/bin/sleep", "100"]}}],
                "after_start": [["{BIN}", "{command}"]]}}"#
        );
        let (out, log) = boot(tmp.path(), &config);
        assert_eq!(ending_signal(out.status), Some(signal), "{log}");
        assert!(log.ends_with(&format!("bonsai-init: {last}\n")), "{log}");
    }
}
