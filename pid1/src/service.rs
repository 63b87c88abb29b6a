//! Service state, the dependency scheduler, restart policy and backoff: all pure, so they are
//! tested without processes. Times are durations since boot.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::config::{self, Kind, Restart};

/// A longrun that stayed up this long restarts with the initial delay again.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not started yet: dependencies pending.
    Waiting,
    Running {
        pid: Pid,
        since: Duration,
    },
    /// A longrun waiting to be restarted.
    Backoff {
        until: Duration,
    },
    /// A oneshot that succeeded, a longrun that will not be restarted, or a stopped service.
    Done,
    /// A oneshot that failed (or could not be spawned), or a service that can never start.
    Failed,
}

/// How a child ended, as far as restart policy is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// exec failed (missing or non-executable program): treated like a crash.
    SpawnFailed,
}

impl Exit {
    pub fn from_wait(status: WaitStatus) -> Option<Exit> {
        match status {
            WaitStatus::Exited(_, code) => Some(Exit::Code(code)),
            WaitStatus::Signaled(_, sig, _) => Some(Exit::Signal(sig as i32)),
            _ => None,
        }
    }

    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
            Exit::SpawnFailed => f.write_str("spawn failed"),
        }
    }
}

pub fn should_restart(policy: Restart, exit: Exit) -> bool {
    match policy {
        Restart::Always => true,
        Restart::OnFailure => !exit.success(),
        Restart::Never => false,
    }
}

/// The cap is never below this, so a misconfigured service cannot make PID 1 fork in a
/// tight loop.
pub const MIN_BACKOFF_CAP_MS: u64 = 10;

/// The delay before the next restart: the initial delay after the first crash or after a run
/// of at least [`BACKOFF_RESET_AFTER`], else double the previous one, capped at `max`.
pub fn next_backoff(previous: Option<u64>, ran_for: Duration, initial: u64, max: u64) -> u64 {
    let max = max.max(MIN_BACKOFF_CAP_MS);
    let initial = initial.min(max);
    match previous {
        Some(prev) if ran_for < BACKOFF_RESET_AFTER => prev.max(1).saturating_mul(2).min(max),
        _ => initial,
    }
}

#[derive(Debug, Clone)]
pub struct Service {
    pub spec: config::Service,
    pub state: State,
    /// A start was attempted at least once (a longrun dependency is then satisfied).
    pub started_once: bool,
    /// The last restart delay, for doubling.
    pub backoff_ms: Option<u64>,
    /// Order of the first start, for stopping in reverse.
    pub start_seq: u64,
}

impl Service {
    pub fn new(spec: config::Service) -> Service {
        Service {
            spec,
            state: State::Waiting,
            started_once: false,
            backoff_ms: None,
            start_seq: 0,
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn pid(&self) -> Option<Pid> {
        match self.state {
            State::Running { pid, .. } => Some(pid),
            _ => None,
        }
    }

    /// Finished as far as dependents and `after_start` are concerned.
    fn settled(&self) -> bool {
        match self.spec.kind {
            Kind::Oneshot => matches!(self.state, State::Done | State::Failed),
            Kind::Longrun => self.started_once || self.state == State::Failed,
        }
    }
}

/// Whether a waiting service may start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    Wait,
    /// It never will: the named dependency failed.
    Blocked(String),
}

pub fn readiness(services: &[Service], index: usize) -> Readiness {
    let Some(svc) = services.get(index) else {
        return Readiness::Wait;
    };
    let mut ready = true;
    for dep_name in &svc.spec.after {
        let Some(dep) = services.iter().find(|s| s.name() == dep_name) else {
            return Readiness::Blocked(dep_name.clone());
        };
        match dep.spec.kind {
            Kind::Oneshot => match dep.state {
                State::Done => {}
                State::Failed => return Readiness::Blocked(dep_name.clone()),
                _ => ready = false,
            },
            Kind::Longrun => {
                if dep.state == State::Failed && !dep.started_once {
                    return Readiness::Blocked(dep_name.clone());
                }
                if !dep.started_once {
                    ready = false;
                }
            }
        }
    }
    if ready {
        Readiness::Ready
    } else {
        Readiness::Wait
    }
}

/// Services that can never start whatever happens at run time: an unknown dependency, or a
/// dependency cycle (directly or through a dependency). The reason is for the log.
pub fn unstartable(services: &[Service]) -> Vec<(usize, String)> {
    let index: HashMap<&str, usize> = services
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name(), i))
        .collect();
    let mut out = Vec::new();
    let mut resolved = vec![false; services.len()];
    // Kahn's algorithm: whatever never resolves is on a cycle or behind one (or unknown).
    loop {
        let mut progress = false;
        for (i, svc) in services.iter().enumerate() {
            if resolved.get(i).copied().unwrap_or(true) {
                continue;
            }
            let deps_resolved = svc.spec.after.iter().all(|d| {
                index
                    .get(d.as_str())
                    .and_then(|&j| resolved.get(j).copied())
                    .unwrap_or(false)
            });
            let known = svc
                .spec
                .after
                .iter()
                .all(|d| index.contains_key(d.as_str()));
            if deps_resolved || !known {
                if let Some(r) = resolved.get_mut(i) {
                    *r = true;
                }
                progress = true;
                if let Some(d) = svc
                    .spec
                    .after
                    .iter()
                    .find(|d| !index.contains_key(d.as_str()))
                {
                    out.push((i, format!("unknown dependency {d}")));
                }
            }
        }
        if !progress {
            break;
        }
    }
    for (i, r) in resolved.iter().enumerate() {
        if !r {
            out.push((i, "dependency cycle".to_string()));
        }
    }
    out.sort();
    out
}

/// Every service has been started or settled, and no oneshot is still running: time for
/// `after_start`.
pub fn all_started(services: &[Service]) -> bool {
    services.iter().all(Service::settled)
}

/// The earliest pending restart.
pub fn next_restart(services: &[Service]) -> Option<Duration> {
    services
        .iter()
        .filter_map(|s| match s.state {
            State::Backoff { until } => Some(until),
            _ => None,
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, kind: Kind, after: &[&str]) -> Service {
        Service::new(config::Service {
            name: name.into(),
            argv: vec![format!("/bin/{name}")],
            kind,
            after: after.iter().map(|s| s.to_string()).collect(),
            restart: Restart::Always,
            backoff_initial_ms: 100,
            backoff_max_ms: 5000,
            uid: None,
            gid: None,
            env: vec![],
            cwd: "/".into(),
            output: None,
            stop_signal: 15,
            stop_command: None,
            stop_timeout_ms: 5000,
            ready_file: None,
        })
    }

    fn ready(services: &[Service]) -> Vec<&str> {
        (0..services.len())
            .filter(|&i| services[i].state == State::Waiting)
            .filter(|&i| readiness(services, i) == Readiness::Ready)
            .map(|i| services[i].name())
            .collect()
    }

    fn running() -> State {
        State::Running {
            pid: Pid::from_raw(42),
            since: Duration::ZERO,
        }
    }

    #[test]
    fn independent_oneshots_start_in_parallel() {
        let s = vec![
            svc("a", Kind::Oneshot, &[]),
            svc("b", Kind::Oneshot, &[]),
            svc("c", Kind::Longrun, &["a", "b"]),
        ];
        assert_eq!(ready(&s), ["a", "b"]);
    }

    #[test]
    fn oneshot_dependency_must_finish_successfully() {
        let mut s = vec![
            svc("prep", Kind::Oneshot, &[]),
            svc("app", Kind::Longrun, &["prep"]),
        ];
        s[0].state = running();
        s[0].started_once = true;
        assert_eq!(readiness(&s, 1), Readiness::Wait);
        s[0].state = State::Done;
        assert_eq!(readiness(&s, 1), Readiness::Ready);
    }

    #[test]
    fn longrun_dependency_only_needs_to_be_spawned() {
        let mut s = vec![
            svc("db", Kind::Longrun, &[]),
            svc("web", Kind::Longrun, &["db"]),
        ];
        assert_eq!(ready(&s), ["db"]);
        s[0].state = running();
        s[0].started_once = true;
        assert_eq!(ready(&s), ["web"]);
        // Crashing and waiting for a restart keeps it satisfied.
        s[0].state = State::Backoff {
            until: Duration::from_secs(1),
        };
        assert_eq!(ready(&s), ["web"]);
    }

    #[test]
    fn failed_oneshot_blocks_dependents() {
        let mut s = vec![
            svc("prep", Kind::Oneshot, &[]),
            svc("app", Kind::Longrun, &["prep"]),
            svc("other", Kind::Oneshot, &[]),
        ];
        s[0].state = State::Failed;
        s[0].started_once = true;
        assert_eq!(readiness(&s, 1), Readiness::Blocked("prep".into()));
        assert_eq!(readiness(&s, 2), Readiness::Ready);
        // A blocked service is marked Failed by the supervisor, which blocks its own dependents.
        s.push(svc("late", Kind::Oneshot, &["app"]));
        s[1].state = State::Failed;
        assert_eq!(readiness(&s, 3), Readiness::Blocked("app".into()));
    }

    #[test]
    fn cycles_and_unknown_dependencies_never_deadlock_the_others() {
        let s = vec![
            svc("a", Kind::Oneshot, &["b"]),
            svc("b", Kind::Oneshot, &["a"]),
            svc("c", Kind::Longrun, &["a"]),
            svc("d", Kind::Longrun, &[]),
            svc("e", Kind::Oneshot, &["ghost"]),
            svc("f", Kind::Oneshot, &["f"]),
            svc("g", Kind::Oneshot, &["d"]),
        ];
        assert_eq!(
            unstartable(&s),
            vec![
                (0, "dependency cycle".to_string()),
                (1, "dependency cycle".to_string()),
                (2, "dependency cycle".to_string()),
                (4, "unknown dependency ghost".to_string()),
                (5, "dependency cycle".to_string()),
            ]
        );
        assert_eq!(ready(&s), ["d"]);
    }

    #[test]
    fn acyclic_graphs_are_all_startable() {
        let s = vec![
            svc("c", Kind::Longrun, &["a", "b"]),
            svc("b", Kind::Oneshot, &["a"]),
            svc("a", Kind::Oneshot, &[]),
        ];
        assert!(unstartable(&s).is_empty());
    }

    #[test]
    fn after_start_waits_for_oneshots_and_first_spawns() {
        let mut s = vec![svc("o", Kind::Oneshot, &[]), svc("l", Kind::Longrun, &[])];
        assert!(!all_started(&s));
        s[0].state = running();
        s[0].started_once = true;
        s[1].state = running();
        s[1].started_once = true;
        assert!(!all_started(&s));
        s[0].state = State::Failed;
        assert!(all_started(&s));
        s[1].state = State::Backoff {
            until: Duration::from_secs(3),
        };
        assert!(all_started(&s));
        assert!(all_started(&[]));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let short = Duration::from_secs(1);
        let mut delays = vec![];
        let mut prev = None;
        for _ in 0..8 {
            let d = next_backoff(prev, short, 100, 1000);
            delays.push(d);
            prev = Some(d);
        }
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000, 1000, 1000]);
    }

    #[test]
    fn backoff_resets_after_ten_seconds_up() {
        assert_eq!(
            next_backoff(Some(3200), Duration::from_secs(10), 100, 5000),
            100
        );
        assert_eq!(
            next_backoff(Some(3200), Duration::from_millis(9999), 100, 5000),
            5000
        );
        assert_eq!(next_backoff(None, Duration::ZERO, 100, 5000), 100);
    }

    #[test]
    fn backoff_edge_values() {
        // An initial delay above the cap is capped; zero does not stay zero.
        assert_eq!(next_backoff(None, Duration::ZERO, 9000, 5000), 5000);
        assert_eq!(next_backoff(Some(0), Duration::ZERO, 0, 5000), 2);
        // A zero cap still backs off a little.
        assert_eq!(next_backoff(None, Duration::ZERO, 0, 0), 0);
        assert_eq!(
            next_backoff(Some(8), Duration::ZERO, 0, 0),
            MIN_BACKOFF_CAP_MS
        );
        assert_eq!(
            next_backoff(Some(u64::MAX), Duration::ZERO, 1, u64::MAX),
            u64::MAX
        );
    }

    #[test]
    fn restart_policy() {
        use Exit::*;
        for exit in [Code(0), Code(1), Signal(9), SpawnFailed] {
            assert!(should_restart(Restart::Always, exit));
            assert!(!should_restart(Restart::Never, exit));
        }
        assert!(!should_restart(Restart::OnFailure, Code(0)));
        assert!(should_restart(Restart::OnFailure, Code(3)));
        assert!(should_restart(Restart::OnFailure, Signal(15)));
        assert!(should_restart(Restart::OnFailure, SpawnFailed));
    }

    #[test]
    fn exit_display() {
        assert_eq!(Exit::Code(3).to_string(), "exit 3");
        assert_eq!(Exit::Signal(9).to_string(), "signal 9");
        let pid = Pid::from_raw(7);
        assert_eq!(
            Exit::from_wait(WaitStatus::Exited(pid, 0)),
            Some(Exit::Code(0))
        );
        assert_eq!(
            Exit::from_wait(WaitStatus::Signaled(
                pid,
                nix::sys::signal::Signal::SIGKILL,
                false
            )),
            Some(Exit::Signal(9))
        );
        assert_eq!(Exit::from_wait(WaitStatus::StillAlive), None);
    }

    #[test]
    fn next_restart_is_the_earliest() {
        let mut s = vec![svc("a", Kind::Longrun, &[]), svc("b", Kind::Longrun, &[])];
        assert_eq!(next_restart(&s), None);
        s[0].state = State::Backoff {
            until: Duration::from_secs(5),
        };
        s[1].state = State::Backoff {
            until: Duration::from_secs(2),
        };
        assert_eq!(next_restart(&s), Some(Duration::from_secs(2)));
    }
}
