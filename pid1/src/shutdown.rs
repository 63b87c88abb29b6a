//! Orderly shutdown: stop longruns in reverse start order, kill what is left, sync, reboot(2).

use std::time::Duration;

use nix::sys::reboot::RebootMode;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

use crate::console::{log, uptime};
use crate::service::State;
use crate::spawn::{self, Spec};
use crate::supervisor::{Mode, Shutdown, Supervisor};

/// How long everything else gets between kill(-1, SIGTERM) and kill(-1, SIGKILL).
const TERM_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for SIGKILLed processes to be reaped.
const KILL_GRACE: Duration = Duration::from_secs(1);

/// Stops everything and ends the machine; in test mode, returns instead of rebooting.
pub fn shutdown(sup: &mut Supervisor, halt: Shutdown) {
    stop_services(sup);
    kill_everything_else(sup);
    if sup.mode == Mode::Pid1 {
        unmount_all(&sup.unmount);
    }
    nix::unistd::sync();
    log!("{}", halt.name());
    if sup.mode == Mode::Test {
        return;
    }
    let how = match halt {
        Shutdown::Poweroff => RebootMode::RB_POWER_OFF,
        Shutdown::Reboot => RebootMode::RB_AUTOBOOT,
        Shutdown::Halt => RebootMode::RB_HALT_SYSTEM,
    };
    match nix::sys::reboot::reboot(how) {
        Ok(never) => match never {},
        Err(e) => log!("reboot(2) failed: {e}"),
    }
    // PID 1 must never exit: keep reaping whatever is left.
    loop {
        sup.wait_events(None);
    }
}

/// Unmounts `[[setup.mounts]]` (given newest first) once nothing runs any more; a busy one is
/// remounted read-only, so its filesystem is clean either way.
pub fn unmount_all(targets: &[String]) {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    for t in targets {
        match umount2(t.as_str(), MntFlags::empty()) {
            Ok(()) => log!("unmounted {t}"),
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => {
                let ro = MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY;
                match mount(None::<&str>, t.as_str(), None::<&str>, ro, None::<&str>) {
                    Ok(()) => log!("{t} busy ({e}), remounted read-only"),
                    Err(e2) => log!("unmounting {t} failed: {e}; read-only: {e2}"),
                }
            }
        }
    }
}

/// Stops services one by one, newest first, within the overall shutdown timeout.
pub fn stop_services(sup: &mut Supervisor) {
    sup.stopping = true;
    log!("stopping services");
    let deadline = uptime().saturating_add(sup.shutdown_timeout);
    // Nothing else starts: pending starts and restarts are dropped.
    for svc in &mut sup.services {
        if matches!(svc.state, State::Waiting | State::Backoff { .. }) {
            svc.state = State::Done;
        }
    }
    let mut order: Vec<(u64, usize)> = sup
        .services
        .iter()
        .enumerate()
        .filter(|(_, s)| s.pid().is_some())
        .map(|(i, s)| (s.start_seq, i))
        .collect();
    order.sort_unstable_by(|a, b| b.cmp(a));
    for (_, i) in order {
        if uptime() >= deadline {
            break;
        }
        stop_one(sup, i, deadline);
    }
    // Past the overall deadline: whatever still runs is killed.
    let left: Vec<(String, Pid)> = sup
        .services
        .iter()
        .filter_map(|s| s.pid().map(|p| (s.name().to_string(), p)))
        .collect();
    for (name, pid) in &left {
        log!("{name} did not stop in time, killing it");
        signal_group(*pid, Signal::SIGKILL);
    }
    if !left.is_empty() {
        sup.pump_until(uptime().saturating_add(KILL_GRACE), |s| {
            s.services.iter().all(|svc| svc.pid().is_none())
        });
    }
}

fn stop_one(sup: &mut Supervisor, i: usize, deadline: Duration) {
    let Some(svc) = sup.services.get(i) else {
        return;
    };
    let Some(pid) = svc.pid() else {
        return;
    };
    let name = svc.name().to_string();
    let signal = svc.spec.signal();
    let stop_command = svc.spec.stop_command.clone();
    let timeout = Duration::from_millis(svc.spec.stop_timeout_ms);
    let started = uptime();
    let own_deadline = started.saturating_add(timeout).min(deadline);
    let running = move |s: &Supervisor| s.services.get(i).and_then(|svc| svc.pid()) == Some(pid);

    if let Some(argv) = stop_command {
        match spawn::spawn(&Spec::plain(&argv)) {
            Ok(child) => {
                sup.no_children = false;
                sup.helpers.push(child.pid);
                sup.pump_until(own_deadline, |s| !s.helpers.contains(&child.pid));
            }
            Err(e) => log!("stop command for {name} failed: {e}"),
        }
    }
    if running(sup) {
        signal_group(pid, signal);
        if sup.pump_until(own_deadline, |s| !running(s)) {
            return;
        }
        let waited = own_deadline.saturating_sub(started).as_millis();
        log!("{name} did not stop in {waited} ms, killing it");
        signal_group(pid, Signal::SIGKILL);
        sup.pump_until(uptime().saturating_add(KILL_GRACE), |s| !running(s));
    }
}

/// A service leads its own session, so its process group has its pid; the process itself
/// is signalled too in case it moved to another group.
fn signal_group(pid: Pid, sig: Signal) {
    let _ = killpg(pid, sig);
    let _ = kill(pid, sig);
}

/// Every process but PID 1 gets SIGTERM, then SIGKILL. In test mode only our own children
/// are signalled, never the rest of the machine.
fn kill_everything_else(sup: &mut Supervisor) {
    sup.reap();
    for sig in [Signal::SIGTERM, Signal::SIGKILL] {
        if sup.no_children {
            break;
        }
        match sup.mode {
            Mode::Pid1 => {
                let _ = kill(Pid::from_raw(-1), sig);
            }
            Mode::Test => {
                for pid in own_children() {
                    let _ = kill(pid, sig);
                }
            }
        }
        let grace = if sig == Signal::SIGTERM {
            TERM_GRACE
        } else {
            KILL_GRACE
        };
        sup.pump_until(uptime().saturating_add(grace), |s| s.no_children);
    }
    // Let the last output reach the console.
    sup.pump_until(uptime().saturating_add(Duration::from_millis(200)), |s| {
        !s.has_open_pipes()
    });
}

/// Children of this process, from /proc (test mode only).
fn own_children() -> Vec<Pid> {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| parent_of(&stat))
                .is_some_and(|ppid| ppid == me)
        })
        .map(Pid::from_raw)
        .collect()
}

/// The ppid field of /proc/<pid>/stat; the command name may contain spaces and parentheses.
fn parent_of(stat: &str) -> Option<String> {
    let after = stat.get(stat.rfind(')')? + 1..)?;
    after.split_whitespace().nth(1).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_parent_from_proc_stat() {
        let stat = "1234 (my (odd) prog) S 77 1234 1234 0 -1 4194560";
        assert_eq!(parent_of(stat).as_deref(), Some("77"));
        assert_eq!(parent_of("garbage"), None);
    }

    #[test]
    fn finds_its_own_children() {
        let mut child = std::process::Command::new("/bin/sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(child.id() as i32);
        assert!(own_children().contains(&pid));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
