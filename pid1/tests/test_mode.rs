//! Runs the real binary in its hidden `--test-mode`: the same supervisor as PID 1, minus
//! mounts, kill(-1) and reboot(2), as an ordinary process (a child subreaper). Each test
//! writes a config into a temp dir and checks the console log.

use std::io::{BufRead, BufReader};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_bonsai-init");
/// Generous: CI has two cores and runs other tests alongside.
const WATCHDOG: Duration = Duration::from_secs(60);

struct Run {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Run {
    fn start(dir: &Path, config: &str) -> Run {
        let path = dir.join("init.json");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(BIN)
            .arg("--test-mode")
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                println!("{line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Run {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Returns once a line containing `needle` has been seen (earlier or now).
    fn wait_for(&mut self, needle: &str) {
        if self.seen.iter().any(|l| l.contains(needle)) {
            return;
        }
        let deadline = Instant::now() + WATCHDOG;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let found = line.contains(needle);
                    self.seen.push(line);
                    if found {
                        return;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!("no line with {needle:?}; got:\n{}", self.seen.join("\n"));
                }
            }
        }
    }

    /// Reads everything until bonsai-init exits.
    fn finish(mut self) -> (ExitStatus, Vec<String>) {
        let deadline = Instant::now() + WATCHDOG;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("bonsai-init did not finish; got:\n{}", self.seen.join("\n"));
                }
            }
        }
        let status = self.child.wait().unwrap();
        (status, self.seen)
    }

    fn signal(&self, sig: Signal) {
        let pid = Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        nix::sys::signal::kill(pid, sig).unwrap();
    }
}

fn run(dir: &Path, config: &str) -> (ExitStatus, Vec<String>) {
    Run::start(dir, config).finish()
}

/// Index of the first line containing `needle` at or after `from`; panics with the log.
fn find_from(lines: &[String], from: usize, needle: &str) -> usize {
    lines
        .iter()
        .skip(from)
        .position(|l| l.contains(needle))
        .map(|i| i + from)
        .unwrap_or_else(|| panic!("no {needle:?} after line {from} in:\n{}", lines.join("\n")))
}

fn find(lines: &[String], needle: &str) -> usize {
    find_from(lines, 0, needle)
}

/// Asserts the needles appear in this order (each found after the previous one).
fn assert_order(lines: &[String], needles: &[&str]) {
    let mut at = 0;
    for needle in needles {
        at = find_from(lines, at, needle) + 1;
    }
}

fn count(lines: &[String], needle: &str) -> usize {
    lines.iter().filter(|l| l.contains(needle)).count()
}

#[test]
fn boots_services_in_dependency_order_with_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    let config = format!(
        r#"{{
      "tmpfiles": [
        {{"type": "dir", "path": "{d}/state", "mode": 448}},
        {{"type": "file", "path": "{d}/etc/motd", "content": "hi\n", "mode": 420}},
        {{"type": "symlink", "path": "{d}/run/current", "target": "{d}/state"}}
      ],
      "setup": [["/bin/sh", "-c", "echo setup one > {d}/setup.log"], ["/bin/sh", "-c", "exit 4"],
                ["/bin/sh", "-c", "echo setup three >> {d}/setup.log"]],
      "services": [
        {{"name": "prepare", "kind": "oneshot", "argv": ["/bin/sh", "-c", "echo preparing; sleep 0.2"]}},
        {{"name": "second", "kind": "oneshot", "after": ["prepare"], "ready_file": "{d}/up/second",
          "env": [["KEY", "value"]], "cwd": "{d}/state",
          "argv": ["/bin/sh", "-c", "printf '%s %s %s' \"$KEY\" \"$PATH\" \"$(pwd)\""]}},
        {{"name": "flaky", "after": ["second"], "restart": "on-failure",
          "backoff_initial_ms": 50, "backoff_max_ms": 1000,
          "env": [["PATH", "/usr/bin:/bin"]], "ready_file": "{d}/up/flaky",
          "argv": ["/bin/sh", "-c", "n=$(cat {d}/state/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > {d}/state/count; if [ $n -le 2 ]; then echo crash $n; exit 1; fi; echo up; exec sleep 100"]}},
        {{"name": "logger", "after": ["prepare"], "output": {{"file": "{d}/log/logger/current"}},
          "argv": ["/bin/sh", "-c", "echo to the file; echo err >&2; exec sleep 100"]}},
        {{"name": "broken", "kind": "oneshot", "argv": ["/bin/sh", "-c", "exit 3"]}},
        {{"name": "dependent", "after": ["broken"], "argv": ["/bin/true"]}},
        {{"name": "transitive", "kind": "oneshot", "after": ["dependent"], "argv": ["/bin/true"]}},
        {{"name": "cyc-a", "after": ["cyc-b"], "argv": ["/bin/true"]}},
        {{"name": "cyc-b", "after": ["cyc-a"], "argv": ["/bin/true"]}},
        {{"name": "orphaned", "after": ["unknown"], "argv": ["/bin/true"]}},
        {{"name": "ghost", "restart": "never", "argv": ["{d}/no-such-program"]}}
      ],
      "after_start": [["/bin/sh", "-c", "for i in $(seq 200); do [ -f {d}/up/flaky ] && [ \"$(cat {d}/state/count)\" = 3 ] && break; sleep 0.05; done; echo harness done"]],
      "shutdown_timeout_ms": 5000
    }}"#
    );
    let (status, lines) = run(tmp.path(), &config);
    assert!(status.success(), "{status}");

    // Setup runs before any service, in order, and a failure does not stop it.
    assert_order(
        &lines,
        &["setup /bin/sh -c exit 4 failed (exit 4)", "started "],
    );
    let setup_log = std::fs::read_to_string(tmp.path().join("setup.log")).unwrap();
    assert_eq!(setup_log, "setup one\nsetup three\n");
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("etc/motd")).unwrap(),
        "hi\n"
    );
    assert_eq!(
        std::fs::read_link(tmp.path().join("run/current")).unwrap(),
        tmp.path().join("state")
    );

    // Services that can never start are named, and do not hold the others up.
    find(&lines, "cyc-a can never start: dependency cycle");
    find(&lines, "cyc-b can never start: dependency cycle");
    find(
        &lines,
        "orphaned can never start: unknown dependency unknown",
    );

    // A oneshot chain: each link starts after the previous one exited successfully.
    assert_order(
        &lines,
        &[
            "started prepare (pid ",
            "prepare exited (exit 0)",
            "started second (pid ",
            "second exited (exit 0)",
            "started flaky (pid ",
        ],
    );
    assert!(find(&lines, "started logger") > find(&lines, "prepare exited (exit 0)"));
    find(&lines, "[prepare] preparing");
    // A partial last line is flushed when the pipe closes; env and cwd are the configured ones.
    find(&lines, &format!("[second] value /bin {d}/state"));
    assert!(tmp.path().join("up/second").exists());

    // A failed oneshot blocks its dependents, transitively.
    assert_order(
        &lines,
        &[
            "oneshot broken failed (exit 3)",
            "dependent not started: dependency broken failed",
        ],
    );
    find(
        &lines,
        "transitive not started: dependency dependent failed",
    );
    assert_eq!(count(&lines, "started dependent"), 0);

    // A missing program is a spawn failure, handled like a crash (here: restart=never).
    find(&lines, "cannot start ghost: No such file or directory");
    find(&lines, "ghost exited (spawn failed) ; not restarted");

    // Crashes twice, with a doubling backoff, then stays up.
    assert_order(
        &lines,
        &[
            "started flaky",
            "flaky exited (exit 1) ; restart in 50 ms",
            "started flaky",
            "flaky exited (exit 1) ; restart in 100 ms",
            "started flaky",
            "[flaky] up",
        ],
    );
    assert_eq!(count(&lines, "started flaky"), 3);
    find(&lines, "[flaky] crash 1");
    find(&lines, "[flaky] crash 2");

    // after_start runs once everything started, then shutdown stops longruns newest first.
    assert_order(
        &lines,
        &[
            "all services started at ",
            "harness done",
            "after_start (pid ",
            "stopping services",
            "stopped flaky",
            "stopped logger",
            "bonsai-init: poweroff",
        ],
    );
    assert_eq!(
        lines.last().map(String::as_str),
        Some("bonsai-init: poweroff")
    );
    assert!(
        !tmp.path().join("up/flaky").exists(),
        "ready file is removed"
    );
    let log = std::fs::read_to_string(tmp.path().join("log/logger/current")).unwrap();
    assert_eq!(log, "to the file\nerr\n");
    // Everything but after_start's own output (straight to the console) is prefixed.
    for line in lines.iter().filter(|l| *l != "harness done") {
        assert!(
            line.starts_with("bonsai-init: ") || line.starts_with('['),
            "unprefixed line {line:?}"
        );
    }
}

#[test]
fn sigterm_stops_services_in_reverse_order_and_kills_the_stubborn() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    let config = format!(
        r#"{{
      "services": [
        {{"name": "first", "argv": ["/bin/sh", "-c", "echo ready; exec sleep 100"],
          "stop_command": ["/bin/sh", "-c", "echo stop-command ran > {d}/stopped"]}},
        {{"name": "stubborn", "after": ["first"], "stop_timeout_ms": 300,
          "argv": ["/bin/sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.1; done"]}},
        {{"name": "hup", "after": ["stubborn"], "stop_signal": 1,
          "argv": ["/bin/sh", "-c", "trap 'echo got hup; exit 0' HUP; echo ready; while :; do sleep 0.1; done"]}}
      ],
      "after_start": [["/bin/sleep", "100"]],
      "shutdown_timeout_ms": 10000
    }}"#
    );
    let mut run = Run::start(tmp.path(), &config);
    run.wait_for("all services started");
    // Each service says "ready" once its traps are set: signalling before that would race them.
    for name in ["first", "stubborn", "hup"] {
        run.wait_for(&format!("[{name}] ready"));
    }
    let t = Instant::now();
    run.signal(Signal::SIGTERM);
    let (status, lines) = run.finish();
    assert!(status.success());
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t.elapsed()
    );
    assert_order(
        &lines,
        &[
            "stopping services",
            "[hup] got hup",
            "stopped hup",
            "stubborn did not stop in 300 ms, killing it",
            "stopped stubborn",
            "stopped first",
            "bonsai-init: reboot",
        ],
    );
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("stopped")).unwrap(),
        "stop-command ran\n"
    );
}

#[test]
fn orphans_are_reaped_and_their_output_still_reaches_the_console() {
    let tmp = tempfile::tempdir().unwrap();
    let config = r#"{
      "services": [
        {"name": "parent", "kind": "oneshot",
         "argv": ["/bin/sh", "-c", "(sleep 0.3; printf 'orphan done') & exit 0"]}
      ],
      "after_start": [["/bin/sh", "-c", "sleep 1; for s in /proc/[0-9]*/stat; do set -- $(cat $s 2>/dev/null); [ \"$4\" = \"$PPID\" ] && [ \"$3\" = Z ] && echo ZOMBIE $1 $2; done; echo checked"]]
    }"#;
    let (status, lines) = run(tmp.path(), config);
    assert!(status.success());
    assert_order(
        &lines,
        &["parent exited (exit 0)", "[parent] orphan done", "checked"],
    );
    assert_eq!(count(&lines, "ZOMBIE"), 0, "{lines:#?}");
}

#[test]
fn always_restarts_even_a_clean_exit_and_never_restarts_never() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_str().unwrap();
    let config = format!(
        r#"{{
      "services": [
        {{"name": "again", "restart": "always", "backoff_initial_ms": 10, "backoff_max_ms": 20,
          "argv": ["/bin/sh", "-c", "echo x >> {d}/runs; exit 0"]}},
        {{"name": "once", "restart": "never", "argv": ["/bin/sh", "-c", "exit 7"]}},
        {{"name": "clean", "restart": "on-failure", "argv": ["/bin/sh", "-c", "exit 0"]}}
      ],
      "after_start": [["/bin/sh", "-c", "while [ $(wc -l < {d}/runs) -lt 4 ]; do sleep 0.02; done"]]
    }}"#
    );
    let (status, lines) = run(tmp.path(), &config);
    assert!(status.success());
    assert_order(
        &lines,
        &[
            "again exited (exit 0) ; restart in 10 ms",
            "again exited (exit 0) ; restart in 20 ms",
            "again exited (exit 0) ; restart in 20 ms",
        ],
    );
    find(&lines, "once exited (exit 7) ; not restarted");
    find(&lines, "clean exited (exit 0) ; not restarted");
    assert_eq!(count(&lines, "started once"), 1);
}

#[test]
fn a_broken_config_is_reported_with_its_path() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("init.json");
    std::fs::write(
        &path,
        r#"{"services": [{"name": "a", "argv": ["/a"], "bogus": 1}]}"#,
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--test-mode")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.starts_with(&format!(
            "bonsai-init: {}: unknown field `bogus`",
            path.display()
        )),
        "{stdout}"
    );

    let out = Command::new(BIN)
        .arg("--check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `bogus`"));
}

#[test]
fn client_usage_and_version() {
    let out = Command::new(BIN).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("usage: bonsai-init poweroff|reboot|halt")
    );
    let out = Command::new(BIN).arg("shutdown").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("bonsai-init {}\n", env!("CARGO_PKG_VERSION"))
    );
}
