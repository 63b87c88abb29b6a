//! The event loop: starts services as their dependencies allow, reaps every child, restarts
//! longruns with backoff, copies service output to the console, and waits for a shutdown
//! request. It blocks in poll(2) on a signalfd and the output pipes, with a timeout equal to
//! the next due restart.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::config::{Config, Kind, Output, Restart};
use crate::console::{self, format_uptime, log, uptime, LineBuffer};
use crate::service::{self, Exit, Readiness, Service, State};
use crate::spawn::{self, Out, Spec};

/// Where PID 1 notes the uptime at which every service was started (read by the harness).
pub const SERVICES_UP_FILE: &str = "/run/bonsai/services-up";

/// The kernel log record that marks the services-up moment (the harness looks for it).
pub const SERVICES_UP_RECORD: &str = "bonsai: services up";

/// Notes the services-up moment for the readiness harness, in two forms: a record in the
/// kernel log, stamped by the kernel with the clock of its own lines (so the time from the
/// kernel's `Run /init` line is measured on one clock: the kernel log's clock and
/// `CLOCK_BOOTTIME` differ by several milliseconds under QEMU), at debug level so the console
/// does not show it; and `SERVICES_UP_FILE`, with `now` to the millisecond, for kernels
/// without a log.
fn note_services_up(now: Duration) {
    let record = format!("<7>{SERVICES_UP_RECORD}\n");
    if let Err(e) = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .and_then(|mut f| std::io::Write::write_all(&mut f, record.as_bytes()))
    {
        log!("cannot write to /dev/kmsg: {e}");
    }
    let stamp = format!("{}.{:03}\n", now.as_secs(), now.subsec_millis());
    if let Err(e) = std::fs::write(SERVICES_UP_FILE, stamp) {
        log!("cannot write {SERVICES_UP_FILE}: {e}");
    }
}

/// Real PID 1, or a plain process running the same logic for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Pid1,
    /// No mounts, no reboot, no kill(-1); ends (with a poweroff) once `after_start` is done.
    Test,
}

/// What the machine does once services are stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    Poweroff,
    Reboot,
    Halt,
}

impl Shutdown {
    /// busybox init's convention: USR2 poweroff, TERM (and INT, ctrl-alt-del) reboot, USR1 halt.
    pub fn from_signal(sig: Signal) -> Option<Shutdown> {
        match sig {
            Signal::SIGUSR2 => Some(Shutdown::Poweroff),
            Signal::SIGTERM | Signal::SIGINT => Some(Shutdown::Reboot),
            Signal::SIGUSR1 => Some(Shutdown::Halt),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Shutdown::Poweroff => "poweroff",
            Shutdown::Reboot => "reboot",
            Shutdown::Halt => "halt",
        }
    }
}

/// The signals handled in the loop; blocked so they arrive only through the signalfd.
pub fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        set.add(sig);
    }
    set
}

/// Blocks the handled signals, ignores the ones that would stop or kill us, and returns a
/// signalfd. `None` (logged) leaves the loop polling for children every half second.
pub fn setup_signals() -> Option<SignalFd> {
    for sig in spawn::IGNORED_SIGNALS {
        // SAFETY: SIG_IGN installs no handler code.
        let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) };
    }
    let set = handled_signals();
    if let Err(e) = set.thread_block() {
        log!("cannot block signals: {e}");
    }
    match SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC) {
        Ok(fd) => Some(fd),
        Err(e) => {
            log!("signalfd failed: {e}; polling for children instead");
            None
        }
    }
}

/// Without a signalfd, how often to look for exited children.
const FALLBACK_POLL: Duration = Duration::from_millis(500);

struct Pipe {
    fd: OwnedFd,
    lines: LineBuffer,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum AfterStart {
    Pending,
    Running(Vec<Pid>),
    Done,
}

pub struct Supervisor {
    pub(crate) mode: Mode,
    pub(crate) services: Vec<Service>,
    /// Services whose stdin/stdout/stderr are the console itself (the emergency shell).
    tty: Option<String>,
    after_start: Vec<Vec<String>>,
    after_start_state: AfterStart,
    pub(crate) shutdown_timeout: Duration,
    /// Mount points to unmount at shutdown, in order.
    pub(crate) unmount: Vec<String>,
    pipes: Vec<Pipe>,
    signals: Option<SignalFd>,
    seq: u64,
    /// A shutdown was asked for (by signal, or by the end of a test run).
    pub(crate) request: Option<Shutdown>,
    /// Services are being stopped: exits are not restarts.
    pub(crate) stopping: bool,
    /// Helper processes (stop commands) not yet reaped.
    pub(crate) helpers: Vec<Pid>,
    /// The last reap found no child at all.
    pub(crate) no_children: bool,
}

impl Supervisor {
    pub fn new(mode: Mode, config: &Config, signals: Option<SignalFd>) -> Supervisor {
        let mut sup = Supervisor {
            mode,
            services: config.services.iter().cloned().map(Service::new).collect(),
            tty: None,
            after_start: config.after_start.clone(),
            after_start_state: AfterStart::Pending,
            shutdown_timeout: Duration::from_millis(config.shutdown_timeout_ms),
            unmount: config.unmount.clone(),
            pipes: Vec::new(),
            signals,
            seq: 0,
            request: None,
            stopping: false,
            helpers: Vec::new(),
            no_children: false,
        };
        for (i, reason) in service::unstartable(&sup.services) {
            if let Some(svc) = sup.services.get_mut(i) {
                svc.state = State::Failed;
                log!("{} can never start: {reason}", svc.name());
            }
        }
        sup
    }

    /// A supervisor for a broken config: a shell on the console, restarted when it exits.
    pub fn emergency(console: &str, signals: Option<SignalFd>) -> Supervisor {
        let shell = "/bin/sh";
        let mut config = Config {
            hostname: None,
            console: console.to_string(),
            mounts: vec![],
            tmpfiles: vec![],
            early: vec![],
            setup: vec![],
            services: vec![],
            unmount: vec![],
            after_start: vec![],
            shutdown_timeout_ms: 5000,
        };
        if std::path::Path::new(shell).exists() {
            config.services.push(crate::config::Service {
                name: "emergency-shell".into(),
                argv: vec![shell.into()],
                kind: Kind::Longrun,
                after: vec![],
                restart: Restart::Always,
                backoff_initial_ms: 1000,
                backoff_max_ms: 1000,
                uid: None,
                gid: None,
                env: vec![],
                cwd: "/".into(),
                output: None,
                stop_signal: Signal::SIGHUP as i32,
                stop_command: None,
                stop_timeout_ms: 1000,
                ready_file: None,
            });
        } else {
            log!("no {shell} for an emergency shell; waiting for a shutdown signal");
        }
        let mut sup = Supervisor::new(Mode::Pid1, &config, signals);
        sup.tty = Some(console.to_string());
        sup
    }

    /// Runs services until a shutdown is requested, and returns which one.
    pub fn run(&mut self) -> Shutdown {
        loop {
            if let Some(halt) = self.request {
                return halt;
            }
            let now = uptime();
            self.start_due(now);
            self.check_after_start();
            if let Some(halt) = self.request {
                return halt;
            }
            let timeout =
                service::next_restart(&self.services).map(|due| due.saturating_sub(uptime()));
            self.wait_events(timeout);
        }
    }

    /// Starts every waiting service whose dependencies allow it and every restart that is due,
    /// until nothing changes (a spawn failure can unblock or block others).
    fn start_due(&mut self, now: Duration) {
        let mut changed = true;
        while changed {
            changed = false;
            for i in 0..self.services.len() {
                let Some(state) = self.services.get(i).map(|s| s.state) else {
                    continue;
                };
                match state {
                    State::Waiting => match service::readiness(&self.services, i) {
                        Readiness::Ready => {
                            self.start(i, now);
                            changed = true;
                        }
                        Readiness::Blocked(dep) => {
                            if let Some(svc) = self.services.get_mut(i) {
                                svc.state = State::Failed;
                                log!("{} not started: dependency {dep} failed", svc.name());
                            }
                            changed = true;
                        }
                        Readiness::Wait => {}
                    },
                    State::Backoff { until } if until <= now => {
                        self.start(i, now);
                        changed = true;
                    }
                    _ => {}
                }
            }
        }
    }

    fn start(&mut self, i: usize, now: Duration) {
        let tty = self.tty.clone();
        let Some(svc) = self.services.get_mut(i) else {
            return;
        };
        let output = svc.spec.output();
        let out = match (&tty, &output) {
            (Some(console), _) => Out::Tty(console),
            (None, Output::Console(_)) => Out::Pipe,
            (None, Output::File(path)) => Out::File(path),
        };
        let spec = Spec {
            argv: &svc.spec.argv,
            env: &svc.spec.env,
            cwd: &svc.spec.cwd,
            uid: svc.spec.uid,
            gid: svc.spec.gid,
            out,
        };
        // Stop order follows first starts, i.e. dependency order, whatever restarted since.
        if !svc.started_once {
            self.seq += 1;
            svc.start_seq = self.seq;
        }
        svc.started_once = true;
        match spawn::spawn(&spec) {
            Ok(child) => {
                svc.state = State::Running {
                    pid: child.pid,
                    since: now,
                };
                self.no_children = false;
                log!(
                    "started {} (pid {}) at {}",
                    svc.name(),
                    child.pid,
                    format_uptime(now)
                );
                if svc.spec.kind == Kind::Longrun {
                    touch_ready(svc);
                }
                if let (Some(fd), Output::Console(prefix)) = (child.pipe, output) {
                    self.pipes.push(Pipe {
                        fd,
                        lines: LineBuffer::new(&prefix),
                    });
                }
            }
            Err(e) => {
                log!("cannot start {}: {e}", svc.name());
                self.on_exit(i, Exit::SpawnFailed, now);
            }
        }
    }

    /// A service's process ended (or never started): decide what happens next.
    fn on_exit(&mut self, i: usize, exit: Exit, now: Duration) {
        let stopping = self.stopping;
        let Some(svc) = self.services.get_mut(i) else {
            return;
        };
        let since = match svc.state {
            State::Running { since, .. } => since,
            _ => now,
        };
        remove_ready(svc);
        let name = svc.spec.name.clone();
        if stopping {
            svc.state = State::Done;
            log!("stopped {name}");
            return;
        }
        match svc.spec.kind {
            Kind::Oneshot if exit.success() => {
                svc.state = State::Done;
                touch_ready(svc);
                log!("{name} exited ({exit})");
            }
            Kind::Oneshot => {
                svc.state = State::Failed;
                log!("oneshot {name} failed ({exit})");
            }
            Kind::Longrun if service::should_restart(svc.spec.restart, exit) => {
                let delay = service::next_backoff(
                    svc.backoff_ms,
                    now.saturating_sub(since),
                    svc.spec.backoff_initial_ms,
                    svc.spec.backoff_max_ms,
                );
                svc.backoff_ms = Some(delay);
                svc.state = State::Backoff {
                    until: now.saturating_add(Duration::from_millis(delay)),
                };
                log!("{name} exited ({exit}) ; restart in {delay} ms");
            }
            Kind::Longrun => {
                svc.state = State::Done;
                log!("{name} exited ({exit}) ; not restarted");
            }
        }
    }

    /// Once every service is started and every oneshot finished, runs `after_start`.
    fn check_after_start(&mut self) {
        if self.after_start_state != AfterStart::Pending || !service::all_started(&self.services) {
            return;
        }
        let now = uptime();
        log!("all services started at {}", format_uptime(now));
        if self.mode == Mode::Pid1 {
            note_services_up(now);
        }
        let mut pids = Vec::new();
        for argv in &self.after_start {
            match spawn::spawn(&Spec::plain(argv)) {
                Ok(child) => {
                    self.no_children = false;
                    pids.push(child.pid);
                }
                Err(e) => log!("after_start {} failed: {e}", argv.join(" ")),
            }
        }
        self.after_start_state = AfterStart::Running(pids);
        self.after_start_progress();
    }

    fn after_start_progress(&mut self) {
        if let AfterStart::Running(pids) = &self.after_start_state {
            if pids.is_empty() {
                self.after_start_state = AfterStart::Done;
                if self.mode == Mode::Test && self.request.is_none() {
                    self.request = Some(Shutdown::Poweroff);
                }
            }
        }
    }

    /// Waits for a signal, service output, or the timeout, and handles what arrived.
    pub(crate) fn wait_events(&mut self, timeout: Option<Duration>) {
        let timeout = match (&self.signals, timeout) {
            (None, t) => Some(t.map_or(FALLBACK_POLL, |t| t.min(FALLBACK_POLL))),
            (Some(_), t) => t,
        };
        let poll_timeout = match timeout {
            None => PollTimeout::NONE,
            // Round up so a restart is never woken for a millisecond early, then spun on.
            Some(t) => {
                let ms = t.as_micros().div_ceil(1000);
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(self.pipes.len() + 1);
        for p in &self.pipes {
            fds.push(PollFd::new(p.fd.as_fd(), PollFlags::POLLIN));
        }
        if let Some(sfd) = &self.signals {
            fds.push(PollFd::new(sfd.as_fd(), PollFlags::POLLIN));
        }
        match nix::poll::poll(&mut fds, poll_timeout) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => {
                log!("poll failed: {e}");
                // Never spin: wait the timeout out (or a little) before trying again.
                std::thread::sleep(timeout.unwrap_or(FALLBACK_POLL).min(FALLBACK_POLL));
            }
        }
        let ready: Vec<bool> = fds
            .iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect();
        drop(fds);
        let (pipe_ready, signal_ready) = ready.split_at(self.pipes.len().min(ready.len()));
        let signal_ready = signal_ready.first().copied().unwrap_or(false);
        let pipe_ready = pipe_ready.to_vec();
        // Output first, so a service's last words come before the line about its exit.
        // Back to front so removing a closed pipe keeps the other indexes valid.
        for (i, ready) in pipe_ready.iter().enumerate().rev() {
            if *ready {
                self.read_pipe(i);
            }
        }
        if signal_ready {
            self.read_signals();
        }
        if self.signals.is_none() {
            self.reap();
        }
    }

    fn read_signals(&mut self) {
        let mut child = false;
        loop {
            let info = match self.signals.as_ref().map(SignalFd::read_signal) {
                Some(Ok(Some(info))) => info,
                Some(Err(Errno::EINTR)) => continue,
                _ => break,
            };
            let Ok(sig) = i32::try_from(info.ssi_signo).map(Signal::try_from) else {
                continue;
            };
            match sig {
                Ok(Signal::SIGCHLD) => child = true,
                Ok(sig) => match Shutdown::from_signal(sig) {
                    Some(halt) if self.request.is_none() && !self.stopping => {
                        self.request = Some(halt)
                    }
                    Some(halt) => log!("already stopping; ignoring {}", halt.name()),
                    None => {}
                },
                Err(_) => {}
            }
        }
        if child {
            self.reap();
        }
    }

    /// Reaps every exited child, services or not (orphans are reparented to PID 1).
    pub(crate) fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => return,
                Ok(status) => {
                    if let (Some(pid), Some(exit)) = (status.pid(), Exit::from_wait(status)) {
                        self.on_reaped(pid, exit);
                    }
                }
                Err(Errno::EINTR) => {}
                Err(Errno::ECHILD) => {
                    self.no_children = true;
                    return;
                }
                Err(e) => {
                    log!("waitpid failed: {e}");
                    return;
                }
            }
        }
    }

    fn on_reaped(&mut self, pid: Pid, exit: Exit) {
        if let Some(i) = self.services.iter().position(|s| s.pid() == Some(pid)) {
            self.on_exit(i, exit, uptime());
            return;
        }
        self.helpers.retain(|p| *p != pid);
        if let AfterStart::Running(pids) = &mut self.after_start_state {
            if pids.contains(&pid) {
                pids.retain(|p| *p != pid);
                log!("after_start (pid {pid}) exited ({exit})");
                self.after_start_progress();
            }
        }
    }

    fn read_pipe(&mut self, i: usize) {
        let mut buf = [0u8; 4096];
        let Some(pipe) = self.pipes.get_mut(i) else {
            return;
        };
        let mut out = Vec::new();
        let closed = match nix::unistd::read(&pipe.fd, &mut buf) {
            Ok(0) => true,
            Ok(n) => {
                pipe.lines.feed(buf.get(..n).unwrap_or_default(), &mut out);
                false
            }
            Err(Errno::EINTR | Errno::EAGAIN) => false,
            Err(_) => true,
        };
        if closed {
            pipe.lines.finish(&mut out);
        }
        console::write_console(&out);
        if closed {
            self.pipes.remove(i);
        }
    }

    /// Handles events until `done` holds or `deadline` (uptime) passes; true if `done` held.
    pub(crate) fn pump_until(
        &mut self,
        deadline: Duration,
        done: impl Fn(&Supervisor) -> bool,
    ) -> bool {
        loop {
            if done(self) {
                return true;
            }
            let now = uptime();
            if now >= deadline {
                return false;
            }
            self.wait_events(Some(deadline.saturating_sub(now)));
        }
    }

    pub(crate) fn has_open_pipes(&self) -> bool {
        !self.pipes.is_empty()
    }
}

fn touch_ready(svc: &Service) {
    let Some(path) = &svc.spec.ready_file else {
        return;
    };
    let path = std::path::Path::new(path);
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(path, b"") {
        log!("{}: cannot create {}: {e}", svc.name(), path.display());
    }
}

fn remove_ready(svc: &Service) {
    if let Some(path) = &svc.spec.ready_file {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // SERVICES_UP_RECORD is checked against the harness that reads it by rootfs's
    // `harness_reads_services_up_from_the_kernel_log`, which takes it from this file.

    #[test]
    fn signals_map_to_busybox_actions() {
        assert_eq!(
            Shutdown::from_signal(Signal::SIGUSR2),
            Some(Shutdown::Poweroff)
        );
        assert_eq!(
            Shutdown::from_signal(Signal::SIGTERM),
            Some(Shutdown::Reboot)
        );
        assert_eq!(
            Shutdown::from_signal(Signal::SIGINT),
            Some(Shutdown::Reboot)
        );
        assert_eq!(Shutdown::from_signal(Signal::SIGUSR1), Some(Shutdown::Halt));
        assert_eq!(Shutdown::from_signal(Signal::SIGHUP), None);
        assert!(handled_signals().contains(Signal::SIGCHLD));
    }

    #[test]
    fn emergency_mode_is_a_console_shell_restarted_forever() {
        let sup = Supervisor::emergency("/dev/console", None);
        assert_eq!(sup.tty.as_deref(), Some("/dev/console"));
        assert_eq!(sup.mode, Mode::Pid1);
        if std::path::Path::new("/bin/sh").exists() {
            let shell = &sup.services[0].spec;
            assert_eq!(shell.argv, ["/bin/sh"]);
            assert_eq!(
                (shell.kind, shell.restart),
                (Kind::Longrun, Restart::Always)
            );
        }
    }
}
