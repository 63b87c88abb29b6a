//! `boot_check` against fake QEMU binaries: shell scripts that play a scripted console.
//!
//! Each script takes the nonce from its `-append` argument the way a real guest takes it from
//! `/proc/cmdline`, so these tests also cover how the host passes it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qemu::{boot_check, Accel, Check, Event, Expect, Failure, QemuSpec, Report};

/// Finds the nonce and check flag the way the guest does, then plays `body`.
const PREAMBLE: &str = r#"#!/bin/sh
cmdline=
while [ $# -gt 0 ]; do
    if [ "$1" = -append ]; then cmdline=$2; fi
    shift
done
nonce=$(printf '%s\n' "$cmdline" | sed -n 's/.*bonsai\.nonce=\([0-9a-f]*\).*/\1/p')
case "$cmdline" in *bonsai.check=1*) ;; *) echo "no bonsai.check=1 in: $cmdline"; exit 3 ;; esac
"#;

struct Fake {
    dir: tempfile::TempDir,
    spec: QemuSpec,
}

impl Fake {
    fn new(body: &str) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("qemu-system-fake");
        std::fs::write(&script, format!("{PREAMBLE}{body}")).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let spec = spec(script.display().to_string());
        Fake { dir, spec }
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("out/console.log")
    }

    fn boot(&self, checks: &[Check], timeout: Duration) -> (Result<Report, Failure>, Vec<Event>) {
        let mut events = Vec::new();
        let result = boot_check(
            &self.spec,
            &qemu::protocol::new_nonce(),
            checks,
            timeout,
            &self.log(),
            &mut |event| events.push(event),
        );
        (result, events)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap()
    }
}

fn spec(binary: String) -> QemuSpec {
    QemuSpec {
        binary,
        install_hint: Some("apt-get install qemu-system-x86".into()),
        machine: "q35".into(),
        cpu: None,
        memory: "256M".into(),
        smp: 1,
        kernel: "/nonexistent/bzImage".into(),
        initrd: "/nonexistent/initramfs.cpio.gz".into(),
        dtb: None,
        append: "console=ttyS0".into(),
        accel: Accel::Tcg,
        network: None,
        drives: vec![],
        firmware: None,
        extra_args: vec![],
        qmp: None,
    }
}

fn checks() -> Vec<Check> {
    vec![
        Check {
            name: "kernel-version".into(),
            run: "uname -r".into(),
            expect: Some(Expect::Equals("6.6.0-bonsai".into())),
            exit: 0,
        },
        Check {
            name: "services".into(),
            run: "sv status /etc/service/*".into(),
            expect: Some(Expect::Lines(vec![
                "run: sshd".into(),
                "run: syslogd".into(),
            ])),
            exit: 0,
        },
        Check {
            name: "no-such-file".into(),
            run: "cat /nonexistent".into(),
            expect: Some(Expect::Contains("No such file".into())),
            exit: 1,
        },
    ]
}

/// A well-behaved guest whose first check prints `version`.
fn good_console(version: &str) -> String {
    format!(
        r#"
echo "SeaBIOS (version 1.16)" >&2
printf '[    0.000000] Command line: %s\r\n' "$cmdline"
printf '\r\rBONSAI-READY %s 1.75\r\n' "$nonce"
printf 'BONSAI-TIME %s mounts 0.80\n' "$nonce"
printf 'BONSAI-READY ffffffffffffffff 0.10\n'
printf 'BONSAI-SERVICES-UP %s 2.50\n' "$nonce"
printf 'BONSAI-CHECK-BEGIN %s 1\n{version}\r\nBONSAI-CHECK-END %s 1 0\n' "$nonce" "$nonce"
printf 'BONSAI-CHECK-BEGIN %s 2\n' "$nonce"
printf 'run: syslogd\n[    3.000000] random: crng init done\nrun: sshd   \n'
printf 'BONSAI-CHECK-END %s 2 0\n' "$nonce"
printf 'BONSAI-CHECK-BEGIN %s 3\ncat: /nonexistent: No such file or directory\n' "$nonce"
printf 'BONSAI-CHECK-END %s 3 1\n' "$nonce"
printf 'BONSAI-TIME %s checks-done 3.25\n' "$nonce"
printf 'BONSAI-DONE %s\n' "$nonce"
printf '[    3.500000] reboot: Restarting system\n'
exit 0
"#
    )
}

#[test]
fn good_run_is_ok() {
    let fake = Fake::new(&good_console("6.6.0-bonsai"));
    let (result, events) = fake.boot(&checks(), Duration::from_secs(30));
    let report = result.unwrap();
    assert_eq!(report.ready_uptime, 1.75);
    assert_eq!(report.services_up, Some(2.5));
    assert_eq!(
        report.times,
        [
            ("mounts".to_string(), 0.8),
            ("checks-done".to_string(), 3.25)
        ]
    );
    assert_eq!(report.qemu_exit, Some(0));
    assert!(!report.killed_after_done);
    let outputs: Vec<(&str, bool, Option<i32>, &str)> = report
        .checks
        .iter()
        .map(|c| (c.name.as_str(), c.passed, c.exit, c.output.as_str()))
        .collect();
    assert_eq!(
        outputs,
        [
            ("kernel-version", true, Some(0), "6.6.0-bonsai"),
            (
                "services",
                true,
                Some(0),
                "run: syslogd\n[    3.000000] random: crng init done\nrun: sshd"
            ),
            (
                "no-such-file",
                true,
                Some(1),
                "cat: /nonexistent: No such file or directory"
            ),
        ]
    );

    let Event::Started { command } = &events[0] else {
        panic!("first event is {:?}", events[0]);
    };
    assert!(command.contains("-display none -monitor none -serial stdio"));
    assert!(command.contains("'console=ttyS0 bonsai.nonce="));
    let milestones: Vec<&Event> = events
        .iter()
        .filter(|e| matches!(e, Event::Ready { .. } | Event::CheckDone { .. }))
        .collect();
    assert_eq!(milestones.len(), 4);
    assert_eq!(milestones[0], &Event::Ready { uptime: 1.75 });
    assert!(events.contains(&Event::Line("SeaBIOS (version 1.16)".into())));

    let log = fake.log_text();
    assert!(log.contains("SeaBIOS (version 1.16)\n"), "stderr is merged");
    assert!(log.contains("\r\rBONSAI-READY "), "log keeps raw bytes");
    assert!(log.ends_with("reboot: Restarting system\n"));
}

#[test]
fn wrong_output_fails_the_check_by_name() {
    let fake = Fake::new(&good_console("5.10.0-other"));
    let (result, _) = fake.boot(&checks(), Duration::from_secs(30));
    let Err(Failure::ChecksFailed { failed, report }) = result else {
        panic!("expected ChecksFailed, got {result:?}");
    };
    assert_eq!(failed, ["kernel-version"]);
    assert_eq!(report.checks[0].output, "5.10.0-other");
    assert_eq!(
        report.checks[0].reason.as_deref(),
        Some("output is not \"6.6.0-bonsai\"")
    );
    let message = Failure::ChecksFailed { failed, report }.to_string();
    assert_eq!(
        message,
        "checks failed: kernel-version (output is not \"6.6.0-bonsai\")"
    );
    assert!(fake.log_text().contains("5.10.0-other"));
}

#[test]
fn wrong_exit_code_fails_the_check() {
    let body = r#"
printf 'BONSAI-READY %s 1.0\nBONSAI-CHECK-BEGIN %s 1\n6.6.0-bonsai\n' "$nonce" "$nonce"
printf 'BONSAI-CHECK-END %s 1 2\nBONSAI-DONE %s\n' "$nonce" "$nonce"
"#;
    let fake = Fake::new(body);
    let (result, _) = fake.boot(&checks()[..1], Duration::from_secs(30));
    let Err(Failure::ChecksFailed { failed, report }) = result else {
        panic!("expected ChecksFailed, got {result:?}");
    };
    assert_eq!(failed, ["kernel-version"]);
    assert_eq!(
        report.checks[0].reason.as_deref(),
        Some("exit code 2, expected 0")
    );
}

/// Whether process `pid` is gone (reaped) or a zombie.
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(") ")
            .next()
            .is_some_and(|rest| rest.starts_with('Z')),
    }
}

fn pid_from(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn silent_guest_times_out_and_is_killed() {
    let fake = Fake::new(
        r#"
echo $$ > "$(dirname "$0")/pid"
printf 'SeaBIOS (version 1.16)\r\nBooting from ROM..'
exec sleep 60
"#,
    );
    let start = Instant::now();
    let (result, _) = fake.boot(&checks(), Duration::from_secs(2));
    let elapsed = start.elapsed();
    let Err(failure @ Failure::Timeout { .. }) = result else {
        panic!("expected Timeout, got {result:?}");
    };
    assert_eq!(
        failure.to_string(),
        "no ready marker within 2 s; last console line: Booting from ROM.."
    );
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert!(is_dead(pid_from(&fake.dir.path().join("pid"))));
    assert_eq!(
        fake.log_text(),
        "SeaBIOS (version 1.16)\r\nBooting from ROM.."
    );
}

#[test]
fn timeout_during_a_check_names_it() {
    let fake = Fake::new(
        r#"
printf 'BONSAI-READY %s 1.0\nBONSAI-CHECK-BEGIN %s 1\nworking\n' "$nonce" "$nonce"
exec sleep 60
"#,
    );
    let (result, _) = fake.boot(&checks(), Duration::from_secs(3));
    let failure = result.unwrap_err();
    assert_eq!(
        failure.to_string(),
        "no end marker of check 1 (kernel-version) within 3 s; last console line: working"
    );
}

#[test]
fn kernel_panic_fails_the_run() {
    let fake = Fake::new(
        r#"
printf '[    1.100000] Run /init as init process\n'
printf '[    1.200000] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n'
printf '[    1.300000] CPU: 0 PID: 1 Comm: init Not tainted 6.6.0\n'
printf '[    1.400000] ---[ end Kernel panic - not syncing: Attempted to kill init! ]---\n'
exec sleep 60
"#,
    );
    let start = Instant::now();
    let (result, _) = fake.boot(&checks(), Duration::from_secs(30));
    assert!(start.elapsed() < Duration::from_secs(10));
    let Err(Failure::Panic { line }) = result else {
        panic!("expected Panic, got {result:?}");
    };
    assert_eq!(
        line,
        "[    1.200000] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100"
    );
    assert!(
        fake.log_text().contains("---[ end Kernel panic"),
        "trace is logged"
    );
}

#[test]
fn panic_after_ready_fails_even_with_markers() {
    let fake = Fake::new(
        r#"
printf 'BONSAI-READY %s 1.0\n' "$nonce"
printf '[    2.000000] ---[ end trace 0000000000000000 ]---\n'
printf 'BONSAI-DONE %s\n' "$nonce"
"#,
    );
    let (result, _) = fake.boot(&[], Duration::from_secs(30));
    assert!(matches!(result, Err(Failure::Panic { .. })), "{result:?}");
}

#[test]
fn exit_without_markers_is_a_failure() {
    let fake = Fake::new(
        r#"
printf '[    0.000000] Command line: %s\n' "$cmdline"
printf 'BONSAI-READY 0000000000000000 1.0\nBONSAI-DONE 0000000000000000\n'
exit 0
"#,
    );
    let (result, _) = fake.boot(&[], Duration::from_secs(30));
    let Err(failure @ Failure::QemuExited { .. }) = result else {
        panic!("expected QemuExited, got {result:?}");
    };
    assert_eq!(
        failure.to_string(),
        "qemu exited with code 0 before the ready marker; \
         last console line: BONSAI-DONE 0000000000000000"
    );
    assert!(fake
        .log_text()
        .contains("Command line: console=ttyS0 bonsai.nonce="));
}

#[test]
fn exit_after_ready_without_done_is_a_failure() {
    let fake = Fake::new(
        r#"
printf 'BONSAI-READY %s 1.0\n' "$nonce"
echo 'qemu-system-fake: terminating on signal 15' >&2
exit 1
"#,
    );
    let (result, _) = fake.boot(&[], Duration::from_secs(30));
    let failure = result.unwrap_err();
    assert_eq!(
        failure.to_string(),
        "qemu exited with code 1 before the done marker; \
         last console line: qemu-system-fake: terminating on signal 15"
    );
}

#[test]
fn qemu_that_lingers_after_done_is_killed() {
    let fake = Fake::new(
        r#"
echo $$ > "$(dirname "$0")/pid"
printf 'BONSAI-READY %s 1.0\nBONSAI-DONE %s\n' "$nonce" "$nonce"
exec sleep 60
"#,
    );
    let start = Instant::now();
    let (result, _) = fake.boot(&[], Duration::from_secs(3));
    assert!(start.elapsed() < Duration::from_secs(10));
    let report = result.unwrap();
    assert!(report.killed_after_done);
    assert_eq!(report.qemu_exit, None);
    assert!(is_dead(pid_from(&fake.dir.path().join("pid"))));
}

#[test]
fn missing_binary_names_the_install_hint() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec("qemu-system-bonsai-does-not-exist".into());
    let result = boot_check(
        &spec,
        "0123456789abcdef",
        &[],
        Duration::from_secs(5),
        &dir.path().join("console.log"),
        &mut |_| {},
    );
    let Err(failure @ Failure::Spawn { .. }) = result else {
        panic!("expected Spawn, got {result:?}");
    };
    assert_eq!(
        failure.to_string(),
        "qemu binary qemu-system-bonsai-does-not-exist not found; \
         install it with: apt-get install qemu-system-x86"
    );
    let interactive = qemu::boot_interactive(&spec).unwrap_err();
    assert_eq!(interactive.to_string(), failure.to_string());
}

#[test]
fn unwritable_log_is_reported() {
    let fake = Fake::new("exit 0\n");
    let blocker = fake.dir.path().join("file");
    std::fs::write(&blocker, "").unwrap();
    let result = boot_check(
        &fake.spec,
        "0123456789abcdef",
        &[],
        Duration::from_secs(5),
        &blocker.join("console.log"),
        &mut |_| {},
    );
    let Err(failure @ Failure::Log { .. }) = result else {
        panic!("expected Log, got {result:?}");
    };
    assert!(failure
        .to_string()
        .starts_with(&format!("cannot write console log {}", blocker.display())));
}
