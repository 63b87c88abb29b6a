//! Running QEMU: interactively for a person, or headless to judge a check run.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use duct::ReaderHandle;

use crate::protocol::{self, Marker};
use crate::spec::{Mode, QemuSpec};

/// How long QEMU may take to exit after `BONSAI-DONE` (or the whole timeout, if shorter)
/// before it is killed.
pub const EXIT_GRACE: Duration = Duration::from_secs(10);

/// How long the console is still read after a panic line, so the log holds the trace.
pub const PANIC_GRACE: Duration = Duration::from_secs(2);

/// How long to wait for the console to close and QEMU to be reaped after killing it.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// One check the guest runs, and what the host expects of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: String,
    /// The shell command the guest runs, for reporting.
    pub run: String,
    pub expect: Option<Expect>,
    /// The expected exit code.
    pub exit: i32,
}

/// What a check's output must look like. The output is compared with carriage returns
/// removed, trailing whitespace trimmed from every line and trailing empty lines dropped;
/// expected text is normalised the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The output contains this text (which may span lines).
    Contains(String),
    /// The output is exactly this text.
    Equals(String),
    /// Every listed line appears as a whole line of the output, in any order.
    Lines(Vec<String>),
}

impl Expect {
    /// Why `output` does not satisfy the expectation, or `None` when it does.
    pub fn mismatch(&self, output: &str) -> Option<String> {
        let output = normalize_output(output);
        match self {
            Expect::Contains(text) => {
                let text = normalize_output(text);
                (!output.contains(&text))
                    .then(|| format!("output does not contain {}", short_quote(&text)))
            }
            Expect::Equals(text) => {
                let text = normalize_output(text);
                (output != text).then(|| format!("output is not {}", short_quote(&text)))
            }
            Expect::Lines(lines) => {
                let missing: Vec<String> = lines
                    .iter()
                    .map(|line| normalize_output(line))
                    .filter(|line| !output.lines().any(|l| l == line))
                    .map(|line| short_quote(&line))
                    .collect();
                (!missing.is_empty())
                    .then(|| format!("output lacks the line {}", missing.join(", ")))
            }
        }
    }
}

/// Output as checks are judged on it: no `\r`, no trailing whitespace on any line, no
/// trailing empty lines.
pub fn normalize_output(text: &str) -> String {
    let lines: Vec<String> = text
        .lines()
        .map(|line| line.replace('\r', "").trim_end().to_string())
        .collect();
    let keep = lines
        .iter()
        .rposition(|line| !line.is_empty())
        .map_or(0, |i| i + 1);
    lines[..keep].join("\n")
}

fn short_quote(text: &str) -> String {
    const MAX: usize = 60;
    if text.chars().count() > MAX {
        let head: String = text.chars().take(MAX).collect();
        format!("{head:?}…")
    } else {
        format!("{text:?}")
    }
}

/// How one check went.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    /// The exit code from the END marker; `None` when the check never finished.
    pub exit: Option<i32>,
    /// The lines between its BEGIN and END markers (kernel messages included, if any came).
    pub output: String,
    /// Why it failed; `None` when it passed.
    pub reason: Option<String>,
}

/// A successful (or, inside [`Failure::ChecksFailed`], completed) check run.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Guest uptime at `BONSAI-READY`, seconds.
    pub ready_uptime: f64,
    /// Guest uptime at `BONSAI-SERVICES-UP`, if the guest sent it.
    pub services_up: Option<f64>,
    /// One result per check, in the order of the check list.
    pub checks: Vec<CheckResult>,
    /// `BONSAI-TIME` events in console order: label and guest uptime.
    pub times: Vec<(String, f64)>,
    /// Host time from spawning QEMU to its end.
    pub wall: Duration,
    /// QEMU's exit code; `None` when it was killed or died by a signal.
    pub qemu_exit: Option<i32>,
    /// QEMU had not exited [`EXIT_GRACE`] after `BONSAI-DONE` and was killed.
    pub killed_after_done: bool,
}

/// Progress while a check run goes on.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// QEMU was spawned with this (shell-quoted) command line.
    Started { command: String },
    /// The guest sent its ready marker at this uptime.
    Ready { uptime: f64 },
    /// A check's END marker arrived.
    CheckDone { name: String, passed: bool },
    /// A console line (leading `\r` and trailing whitespace removed). Sent for every line;
    /// callers show them only when asked to be verbose.
    Line(String),
}

/// Why a boot did not prove the image good.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(
        "no {waiting_for} within {} s; last console line: {}",
        seconds(*after),
        or_none(last_line)
    )]
    Timeout {
        after: Duration,
        /// e.g. `ready marker`, `end marker of check 2 (ping)`, `done marker`.
        waiting_for: String,
        last_line: String,
    },
    #[error("guest kernel failed: {line}")]
    Panic { line: String },
    #[error(
        "qemu {} before {before}; last console line: {}",
        exit_words(*code),
        or_none(last_line)
    )]
    QemuExited {
        code: Option<i32>,
        /// e.g. `the ready marker`, `the done marker`.
        before: String,
        last_line: String,
    },
    #[error("checks failed: {}", failed_reasons(report))]
    ChecksFailed {
        /// Names of the failed checks, in check-list order.
        failed: Vec<String>,
        report: Box<Report>,
    },
    #[error("{}", spawn_words(binary, error, install_hint.as_deref()))]
    Spawn {
        binary: String,
        error: io::Error,
        install_hint: Option<String>,
    },
    #[error("cannot write console log {}: {error}", path.display())]
    Log { path: PathBuf, error: io::Error },
}

fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s:.1}")
    }
}

fn or_none(line: &str) -> &str {
    if line.is_empty() {
        "(none)"
    } else {
        line
    }
}

fn exit_words(code: Option<i32>) -> String {
    match code {
        Some(code) => format!("exited with code {code}"),
        None => "was killed by a signal".to_string(),
    }
}

fn failed_reasons(report: &Report) -> String {
    report
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| format!("{} ({})", c.name, c.reason.as_deref().unwrap_or("failed")))
        .collect::<Vec<_>>()
        .join("; ")
}

fn spawn_words(binary: &str, error: &io::Error, hint: Option<&str>) -> String {
    match (error.kind(), hint) {
        (io::ErrorKind::NotFound, Some(hint)) => {
            format!("qemu binary {binary} not found; install it with: {hint}")
        }
        (io::ErrorKind::NotFound, None) => format!("qemu binary {binary} not found"),
        _ => format!("cannot start qemu binary {binary}: {error}"),
    }
}

/// Boots `spec` for a person: the serial console and the monitor on this terminal.
pub fn boot_interactive(spec: &QemuSpec) -> Result<ExitStatus, Failure> {
    let output = duct::cmd(&spec.binary, spec.args(Mode::Interactive))
        .unchecked()
        .run()
        .map_err(|error| spawn_failure(spec, error))?;
    Ok(output.status)
}

/// Boots `spec` headless with the protocol's parameters for `nonce` appended to its kernel
/// command line, reads the console until the guest is done (or `timeout` passes, or the
/// kernel panics), and judges the run against `checks` (index 1 is `checks[0]`).
///
/// Every console byte goes to `log_path` as it arrives, so the log survives a timeout. The
/// result never rests on QEMU's exit status: without the ready and done markers the run
/// fails, however QEMU exited.
///
/// # Panics
///
/// If `nonce` is not made of ASCII letters and digits ([`protocol::is_valid_nonce`]).
pub fn boot_check(
    spec: &QemuSpec,
    nonce: &str,
    checks: &[Check],
    timeout: Duration,
    log_path: &Path,
    progress: &mut dyn FnMut(Event),
) -> Result<Report, Failure> {
    assert!(
        protocol::is_valid_nonce(nonce),
        "nonce {nonce:?} is not alphanumeric"
    );
    let mut spec = spec.clone();
    // Through firmware the disk's boot loader has the command line: the caller writes the
    // protocol's parameters into the disk it boots.
    if spec.firmware.is_none() {
        spec.append = format!("{} {}", spec.append, protocol::kernel_params(nonce))
            .trim_start()
            .to_string();
    }

    let log_failure = |error| Failure::Log {
        path: log_path.to_path_buf(),
        error,
    };
    if let Some(parent) = log_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(log_failure)?;
    }
    let mut log = File::create(log_path).map_err(log_failure)?;

    let start = Instant::now();
    let qemu = Arc::new(spawn_headless(&spec)?);
    progress(Event::Started {
        command: spec.command_line(Mode::Headless),
    });
    let console = read_in_background(Arc::clone(&qemu));
    let mut judge = Judge::new(nonce, checks);
    let mut lines = LineSplitter::default();
    let mut host = HostActions::default();

    // A timeout too large to add is as good as none.
    let deadline = start
        .checked_add(timeout)
        .unwrap_or(start + Duration::from_secs(u32::MAX.into()));
    let mut phase = Phase::Running;
    let exited = loop {
        let until = match phase {
            Phase::Running => deadline,
            Phase::Panicked(until) | Phase::Done(until) => until,
        };
        let wait = until.saturating_duration_since(Instant::now());
        match console.recv_timeout(wait) {
            Ok(bytes) => {
                if let Err(error) = log.write_all(&bytes) {
                    stop(&qemu, &console, &mut log, &mut lines, &mut judge, progress);
                    return Err(log_failure(error));
                }
                for line in lines.push(&bytes) {
                    judge.feed(&line, progress);
                }
                for (command, arguments) in std::mem::take(&mut judge.requests) {
                    let outcome = host.run(&spec, &command, &arguments);
                    // In the console log, marked as the host's, for whoever reads it after.
                    let shown = match &outcome {
                        Ok(answer) => format!("[host] QMP {command} {arguments}: {answer}\n"),
                        Err(e) => format!("[host] QMP {command} {arguments}: {e}\n"),
                    };
                    let _ = log.write_all(shown.as_bytes());
                    if let Err(e) = outcome {
                        judge.pending_errors.push(e);
                    }
                }
                if judge.panic.is_some() && !matches!(phase, Phase::Panicked(_)) {
                    phase = Phase::Panicked(Instant::now() + PANIC_GRACE);
                } else if judge.done && matches!(phase, Phase::Running) {
                    phase = Phase::Done(Instant::now() + EXIT_GRACE.min(timeout));
                }
            }
            Err(RecvTimeoutError::Disconnected) => break true,
            Err(RecvTimeoutError::Timeout) => break false,
        }
    };
    // After end of file duct has already reaped QEMU and the kill is a no-op; it matters only
    // on a timeout, a panic, a hang after DONE, or a read error.
    let qemu_exit = stop(&qemu, &console, &mut log, &mut lines, &mut judge, progress);
    let wall = start.elapsed();

    if let Some(line) = judge.panic.take() {
        return Err(Failure::Panic { line });
    }
    let timed_out = !exited && matches!(phase, Phase::Running);
    let Some(ready_uptime) = judge.ready else {
        return Err(if timed_out {
            judge.timeout(timeout)
        } else {
            Failure::QemuExited {
                code: qemu_exit,
                before: "the ready marker".to_string(),
                last_line: judge.last_line.clone(),
            }
        });
    };
    if !judge.done {
        return Err(if timed_out {
            judge.timeout(timeout)
        } else {
            Failure::QemuExited {
                code: qemu_exit,
                before: "the done marker".to_string(),
                last_line: judge.last_line.clone(),
            }
        });
    }
    let report = Report {
        ready_uptime,
        services_up: judge.services_up,
        times: std::mem::take(&mut judge.times),
        checks: judge.results(),
        wall,
        qemu_exit,
        killed_after_done: !exited,
    };
    let failed: Vec<String> = report
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| c.name.clone())
        .collect();
    if failed.is_empty() {
        Ok(report)
    } else {
        Err(Failure::ChecksFailed {
            failed,
            report: Box::new(report),
        })
    }
}

/// What the host does for the guest's `BONSAI-HOST` requests: QMP commands, on a connection
/// made at the first request.
#[derive(Default)]
struct HostActions {
    qmp: Option<crate::qmp::Qmp>,
}

/// How long QEMU may take to open its QMP socket after it has started.
const QMP_CONNECT: Duration = Duration::from_secs(10);

impl HostActions {
    /// Runs one request; the answer as JSON text, or why it failed (one line).
    fn run(&mut self, spec: &QemuSpec, command: &str, arguments: &str) -> Result<String, String> {
        let what = format!("the guest's request QMP {command}");
        let Some(path) = &spec.qmp else {
            return Err(format!(
                "{what}: this machine has no QMP socket (give the profile's [test-machine] hotplug)"
            ));
        };
        let args: serde_json::Value = serde_json::from_str(arguments)
            .map_err(|e| format!("{what}: its arguments {arguments} are not JSON: {e}"))?;
        if !args.is_object() {
            return Err(format!(
                "{what}: its arguments {arguments} are not a JSON object"
            ));
        }
        if self.qmp.is_none() {
            self.qmp = Some(
                crate::qmp::Qmp::connect(path, QMP_CONNECT).map_err(|e| format!("{what}: {e}"))?,
            );
        }
        let qmp = self.qmp.as_mut().ok_or_else(|| what.clone())?;
        qmp.execute(command, args)
            .map(|answer| answer.to_string())
            .map_err(|e| format!("{what}: {e}"))
    }
}

#[derive(Clone, Copy)]
enum Phase {
    /// Waiting for markers until the overall deadline.
    Running,
    /// A panic line came; reading the trace until this instant.
    Panicked(Instant),
    /// `BONSAI-DONE` came; waiting for QEMU to exit until this instant.
    Done(Instant),
}

fn spawn_headless(spec: &QemuSpec) -> Result<ReaderHandle, Failure> {
    // ETXTBSY: a binary written just now (tests' fake QEMU) may still be open for writing in a
    // child forked concurrently by another thread; it clears within milliseconds.
    const ETXTBSY: i32 = 26;
    let expression = duct::cmd(&spec.binary, spec.args(Mode::Headless))
        .stdin_null()
        .stderr_to_stdout()
        .unchecked();
    let mut tries = 0;
    loop {
        match expression.reader() {
            Ok(handle) => return Ok(handle),
            Err(error) if error.raw_os_error() == Some(ETXTBSY) && tries < 20 => {
                tries += 1;
                thread::sleep(Duration::from_millis(25));
            }
            Err(error) => return Err(spawn_failure(spec, error)),
        }
    }
}

fn spawn_failure(spec: &QemuSpec, error: io::Error) -> Failure {
    Failure::Spawn {
        binary: spec.binary.clone(),
        error,
        install_hint: spec.install_hint.clone(),
    }
}

/// Reads QEMU's stdout on a thread and sends what arrives; the channel closes at end of file
/// (after duct has waited on QEMU) or on a read error. A silent guest blocks only this thread.
fn read_in_background(qemu: Arc<ReaderHandle>) -> Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = vec![0u8; 8192];
        loop {
            match (&*qemu).read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    });
    rx
}

/// Kills QEMU, keeps logging what was already on its way, and reaps it.
fn stop(
    qemu: &ReaderHandle,
    console: &Receiver<Vec<u8>>,
    log: &mut File,
    lines: &mut LineSplitter,
    judge: &mut Judge,
    progress: &mut dyn FnMut(Event),
) -> Option<i32> {
    let _ = qemu.kill();
    let until = Instant::now() + KILL_GRACE;
    while let Ok(bytes) = console.recv_timeout(until.saturating_duration_since(Instant::now())) {
        // Best effort: the run has already failed or finished.
        let _ = log.write_all(&bytes);
        for line in lines.push(&bytes) {
            judge.feed(&line, progress);
        }
    }
    if let Some(line) = lines.finish() {
        judge.feed(&line, progress);
    }
    reap(qemu)
}

/// QEMU's exit code once it has exited; `None` for a signal or if it cannot be reaped.
fn reap(qemu: &ReaderHandle) -> Option<i32> {
    let until = Instant::now() + KILL_GRACE;
    loop {
        match qemu.try_wait() {
            Ok(Some(output)) => return output.status.code(),
            Ok(None) if Instant::now() < until => thread::sleep(Duration::from_millis(10)),
            _ => return None,
        }
    }
}

/// Splits the console byte stream into lines; bytes that are not UTF-8 become U+FFFD.
#[derive(Default)]
struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        let mut lines = Vec::new();
        for &byte in bytes {
            if byte == b'\n' {
                lines.push(String::from_utf8_lossy(&self.partial).into_owned());
                self.partial.clear();
            } else {
                self.partial.push(byte);
            }
        }
        lines
    }

    /// The unterminated last line, if any.
    fn finish(&mut self) -> Option<String> {
        if self.partial.is_empty() {
            return None;
        }
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        Some(line)
    }
}

/// The state of the protocol, fed one console line at a time.
struct Judge<'a> {
    nonce: &'a str,
    checks: &'a [Check],
    ready: Option<f64>,
    services_up: Option<f64>,
    times: Vec<(String, f64)>,
    /// 0-based index of the check whose BEGIN came and whose END has not.
    open: Option<usize>,
    /// Output lines of each check, `None` until its BEGIN.
    outputs: Vec<Option<Vec<String>>>,
    results: Vec<Option<CheckResult>>,
    done: bool,
    panic: Option<String>,
    last_line: String,
    /// `BONSAI-HOST` requests not yet carried out: QMP command and arguments.
    requests: Vec<(String, String)>,
    /// Requests that failed since the last check began: they belong to the next one (a check
    /// prints its markers only when it ends, after its requests).
    pending_errors: Vec<String>,
    /// Per check, the first of its requests that failed.
    host_errors: Vec<Option<String>>,
}

impl<'a> Judge<'a> {
    fn new(nonce: &'a str, checks: &'a [Check]) -> Self {
        Judge {
            nonce,
            checks,
            ready: None,
            services_up: None,
            times: Vec::new(),
            open: None,
            outputs: vec![None; checks.len()],
            results: vec![None; checks.len()],
            done: false,
            panic: None,
            last_line: String::new(),
            requests: Vec::new(),
            pending_errors: Vec::new(),
            host_errors: vec![None; checks.len()],
        }
    }

    fn feed(&mut self, raw: &str, progress: &mut dyn FnMut(Event)) {
        let line = protocol::clean_line(raw);
        if !line.is_empty() {
            self.last_line = line.to_string();
        }
        progress(Event::Line(line.to_string()));
        if self.panic.is_none() && protocol::panic_pattern(line).is_some() {
            self.panic = Some(line.to_string());
        }
        let Some(marker) = protocol::parse_marker(line, self.nonce) else {
            if let Some(lines) = self.open.and_then(|i| self.outputs[i].as_mut()) {
                lines.push(line.replace('\r', ""));
            }
            return;
        };
        match marker {
            Marker::Ready { uptime } => {
                if self.ready.is_none() {
                    self.ready = Some(uptime);
                    progress(Event::Ready { uptime });
                }
            }
            Marker::ServicesUp { uptime } => self.services_up = Some(uptime),
            Marker::Time { label, uptime } => self.times.push((label, uptime)),
            Marker::CheckBegin { index } => {
                if let Some(i) = self.slot(index) {
                    self.open = Some(i);
                    self.outputs[i] = Some(Vec::new());
                    if let Some(e) = self.pending_errors.drain(..).next() {
                        self.host_errors[i] = Some(e);
                    }
                }
            }
            Marker::CheckEnd { index, exit } => {
                if let Some(i) = self.slot(index) {
                    self.open = None;
                    let result = self.result(i, Some(exit));
                    progress(Event::CheckDone {
                        name: result.name.clone(),
                        passed: result.passed,
                    });
                    self.results[i] = Some(result);
                }
            }
            Marker::Done => self.done = true,
            Marker::Host { command, arguments } => self.requests.push((command, arguments)),
        }
    }

    /// The 0-based slot of a 1-based protocol index, if it names a check.
    fn slot(&self, index: usize) -> Option<usize> {
        (1..=self.checks.len()).contains(&index).then(|| index - 1)
    }

    fn result(&self, i: usize, exit: Option<i32>) -> CheckResult {
        let check = &self.checks[i];
        let output = self.outputs[i]
            .as_ref()
            .map(|lines| normalize_output(&lines.join("\n")))
            .unwrap_or_default();
        let reason = match (self.outputs[i].is_some(), exit) {
            (true, Some(_)) if self.host_errors[i].is_some() => self.host_errors[i].clone(),
            (false, None) => Some("never started".to_string()),
            (true, None) => Some("no end marker".to_string()),
            (false, Some(_)) => Some("end marker without begin marker".to_string()),
            (true, Some(code)) if code != check.exit => {
                Some(format!("exit code {code}, expected {}", check.exit))
            }
            // A kernel message between the markers is kept in the output (judges read the
            // OOM killer's), but is not what the check printed.
            (true, Some(_)) => check.expect.as_ref().and_then(|e| {
                let printed: Vec<&str> = output
                    .lines()
                    .filter(|l| !protocol::is_kernel_message(l))
                    .collect();
                e.mismatch(&normalize_output(&printed.join("\n")))
            }),
        };
        CheckResult {
            name: check.name.clone(),
            passed: reason.is_none(),
            exit,
            output,
            reason,
        }
    }

    /// Every check's result; those without an END marker fail.
    fn results(&self) -> Vec<CheckResult> {
        (0..self.checks.len())
            .map(|i| {
                self.results[i]
                    .clone()
                    .unwrap_or_else(|| self.result(i, None))
            })
            .collect()
    }

    fn timeout(&self, after: Duration) -> Failure {
        let waiting_for = match (self.ready, self.open) {
            (None, _) => "ready marker".to_string(),
            (Some(_), Some(i)) => {
                format!("end marker of check {} ({})", i + 1, self.checks[i].name)
            }
            (Some(_), None) => "done marker".to_string(),
        };
        Failure::Timeout {
            after,
            waiting_for,
            last_line: self.last_line.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: &str = "00000000000000aa";

    fn check(name: &str, expect: Option<Expect>, exit: i32) -> Check {
        Check {
            name: name.into(),
            run: format!("run-{name}"),
            expect,
            exit,
        }
    }

    fn feed_all(judge: &mut Judge, console: &str) -> Vec<Event> {
        let mut events = Vec::new();
        for line in console.split('\n') {
            judge.feed(line, &mut |e| events.push(e));
        }
        events
    }

    #[test]
    fn expectations() {
        let out = "Linux 6.6\r\nhello world   \n\n";
        assert_eq!(Expect::Contains("hello".into()).mismatch(out), None);
        assert_eq!(
            Expect::Contains("6.6\nhello world".into()).mismatch(out),
            None
        );
        assert_eq!(
            Expect::Equals("Linux 6.6\nhello world\n".into()).mismatch(out),
            None
        );
        assert_eq!(
            Expect::Equals("Linux 6.6".into()).mismatch(out),
            Some("output is not \"Linux 6.6\"".into())
        );
        assert_eq!(
            Expect::Lines(vec!["hello world".into(), "Linux 6.6".into()]).mismatch(out),
            None
        );
        assert_eq!(
            Expect::Lines(vec!["hello".into()]).mismatch(out),
            Some("output lacks the line \"hello\"".into())
        );
        assert_eq!(
            Expect::Contains("absent".into()).mismatch(out),
            Some("output does not contain \"absent\"".into())
        );
    }

    #[test]
    fn judge_collects_checks_times_and_events() {
        let checks = [
            check("kernel", Some(Expect::Contains("6.6".into())), 0),
            check("false", None, 1),
            check("missing", None, 0),
        ];
        let mut judge = Judge::new(N, &checks);
        let console = "\
[    0.000000] Command line: console=ttyS0 bonsai.nonce=00000000000000aa bonsai.check=1
BONSAI-CHECK-END 00000000000000aa 1 0 (not a marker: extra field)
\rBONSAI-READY 00000000000000aa 1.50\r
BONSAI-READY 00000000000000aa 9.00
BONSAI-TIME 00000000000000aa init 0.90
BONSAI-SERVICES-UP 00000000000000ff 2.00
BONSAI-SERVICES-UP 00000000000000aa 2.25
BONSAI-CHECK-BEGIN 00000000000000aa 1
6.6.0-bonsai\r
BONSAI-CHECK-END 00000000000000aa 1 0
BONSAI-CHECK-BEGIN 00000000000000aa 2
BONSAI-CHECK-END 00000000000000aa 2 1
BONSAI-CHECK-BEGIN 00000000000000aa 7
BONSAI-DONE 00000000000000aa";
        let events = feed_all(&mut judge, console);
        let summary: Vec<&Event> = events
            .iter()
            .filter(|e| !matches!(e, Event::Line(_)))
            .collect();
        assert_eq!(
            summary,
            [
                &Event::Ready { uptime: 1.5 },
                &Event::CheckDone {
                    name: "kernel".into(),
                    passed: true
                },
                &Event::CheckDone {
                    name: "false".into(),
                    passed: true
                },
            ]
        );
        assert_eq!(judge.ready, Some(1.5));
        assert_eq!(judge.services_up, Some(2.25));
        assert_eq!(judge.times, [("init".to_string(), 0.9)]);
        assert!(judge.done);
        assert!(judge.panic.is_none());
        let results = judge.results();
        assert_eq!(results[0].output, "6.6.0-bonsai");
        assert_eq!(results[1].exit, Some(1));
        assert!(!results[2].passed);
        assert_eq!(results[2].reason.as_deref(), Some("never started"));
    }

    /// A kernel warning printed while a check runs stays in its output (judges read the OOM
    /// killer's lines) but is not compared with what the check expects; a line that only
    /// looks like one is.
    #[test]
    fn a_kernel_message_between_the_markers_is_not_the_checks_output() {
        let checks = [
            check("console", Some(Expect::Equals("ttyS0".into())), 0),
            check("bracket", Some(Expect::Equals("ttyS0".into())), 0),
        ];
        let mut judge = Judge::new(N, &checks);
        let console = "\
BONSAI-CHECK-BEGIN 00000000000000aa 1
[    7.123456] clocksource: timekeeping watchdog on CPU0: Marking clocksource 'tsc' as unstable\r
ttyS0\r
BONSAI-CHECK-END 00000000000000aa 1 0
BONSAI-CHECK-BEGIN 00000000000000aa 2
[greet] ttyS0
ttyS0
BONSAI-CHECK-END 00000000000000aa 2 0";
        feed_all(&mut judge, console);
        let results = judge.results();
        assert!(results[0].passed, "{:?}", results[0]);
        assert!(results[0].output.contains("Marking clocksource"));
        assert!(!results[1].passed, "{:?}", results[1]);
        for (line, kernel) in [
            ("[    0.000000] Linux version 6.1", true),
            ("\r[12345.678901] x", true),
            ("[greet] hello", false),
            ("[ 1.5] short", false),
            ("[    a.123456] x", false),
            ("no bracket", false),
        ] {
            assert_eq!(protocol::is_kernel_message(line), kernel, "{line:?}");
        }
    }

    #[test]
    fn host_requests_are_collected_and_a_failed_one_fails_the_next_check() {
        let checks = [check("plug", None, 0), check("after", None, 0)];
        let mut judge = Judge::new(N, &checks);
        feed_all(
            &mut judge,
            &format!(
                "BONSAI-READY {N} 1.0\nBONSAI-HOST {N} qmp device_add {{\"id\":\"d\"}}\nBONSAI-HOST ffffffffffffffff qmp device_del\n"
            ),
        );
        assert_eq!(
            std::mem::take(&mut judge.requests),
            vec![("device_add".to_string(), "{\"id\":\"d\"}".to_string())]
        );
        judge
            .pending_errors
            .push("QMP device_add failed: GenericError: no bus".into());
        feed_all(
            &mut judge,
            &format!(
                "BONSAI-CHECK-BEGIN {N} 1\nok\nBONSAI-CHECK-END {N} 1 0\nBONSAI-CHECK-BEGIN {N} 2\nBONSAI-CHECK-END {N} 2 0\n"
            ),
        );
        let results = judge.results();
        assert!(!results[0].passed);
        assert_eq!(
            results[0].reason.as_deref(),
            Some("QMP device_add failed: GenericError: no bus")
        );
        assert!(results[1].passed, "{:?}", results[1]);
    }

    #[test]
    fn a_request_without_a_qmp_socket_or_with_bad_arguments_is_refused() {
        let mut host = HostActions::default();
        let mut spec = crate::spec::tests_support::q35();
        let e = host.run(&spec, "device_add", "{}").unwrap_err();
        assert!(e.contains("no QMP socket"), "{e}");
        spec.qmp = Some("/nonexistent/qmp.sock".into());
        let e = host.run(&spec, "device_add", "[1]").unwrap_err();
        assert!(e.contains("not a JSON object"), "{e}");
        let e = host.run(&spec, "device_add", "{oops").unwrap_err();
        assert!(e.contains("are not JSON"), "{e}");
    }

    #[test]
    fn judge_reports_what_it_waits_for() {
        let checks = [check("ping", None, 0)];
        let mut judge = Judge::new(N, &checks);
        let timeout = |judge: &Judge| judge.timeout(Duration::from_secs(60)).to_string();
        assert_eq!(
            timeout(&judge),
            "no ready marker within 60 s; last console line: (none)"
        );
        feed_all(&mut judge, "BONSAI-READY 00000000000000aa 1.0\nBONSAI-CHECK-BEGIN 00000000000000aa 1\nPING 10.0.2.2\n");
        assert_eq!(
            timeout(&judge),
            "no end marker of check 1 (ping) within 60 s; last console line: PING 10.0.2.2"
        );
        assert_eq!(judge.results()[0].reason.as_deref(), Some("no end marker"));
    }

    #[test]
    fn judge_catches_panics() {
        let mut judge = Judge::new(N, &[]);
        feed_all(
            &mut judge,
            "[    1.0] Kernel panic - not syncing: No working init found.\n[    1.1] ---[ end Kernel panic",
        );
        assert_eq!(
            judge.panic.as_deref(),
            Some("[    1.0] Kernel panic - not syncing: No working init found.")
        );
    }

    #[test]
    fn lines_are_split_across_chunks() {
        let mut lines = LineSplitter::default();
        assert_eq!(lines.push(b"BONSAI-"), Vec::<String>::new());
        assert_eq!(
            lines.push(b"READY x\r\nnext\nbad\xff"),
            ["BONSAI-READY x\r", "next"]
        );
        assert_eq!(lines.finish().as_deref(), Some("bad\u{fffd}"));
        assert_eq!(lines.finish(), None);
    }

    #[test]
    fn failure_messages() {
        let spawn = Failure::Spawn {
            binary: "qemu-system-x86_64".into(),
            error: io::Error::from(io::ErrorKind::NotFound),
            install_hint: Some("apt-get install qemu-system-x86".into()),
        };
        assert_eq!(
            spawn.to_string(),
            "qemu binary qemu-system-x86_64 not found; install it with: apt-get install qemu-system-x86"
        );
        let exited = Failure::QemuExited {
            code: Some(0),
            before: "the ready marker".into(),
            last_line: "qemu: linux kernel too old to load a ram disk".into(),
        };
        assert_eq!(
            exited.to_string(),
            "qemu exited with code 0 before the ready marker; \
             last console line: qemu: linux kernel too old to load a ram disk"
        );
        let timeout = Failure::Timeout {
            after: Duration::from_millis(1500),
            waiting_for: "done marker".into(),
            last_line: "~ #".into(),
        };
        assert_eq!(
            timeout.to_string(),
            "no done marker within 1.5 s; last console line: ~ #"
        );
    }
}
