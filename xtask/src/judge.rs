//! Host-side judges for checks whose guest part only prints raw data (start times from
//! `/proc/uptime`, pids and process states, environments, mount tables). A check names its
//! judge with `judge = "<kind> [service]"`; the thresholds come from the profile's service
//! description and are applied here, in Rust, never in the guest's shell.
//!
//! Raw lines the guest prints (other lines, such as kernel messages, are ignored):
//! - `start <uptime> [<exit code>]`, `exit <uptime>`: one per start or end of a service's command.
//! - `<label> <pid> <state>`: a process and its `/proc/<pid>/stat` state (`gone` when absent).
//! - `proc <pid> <state> <ppid>`, after a `before` or `after` line: a process table.
//! - `killed <pid> <uptime>`, `new <pid> <uptime> <state>`, `now <uptime>`.
//! - At shutdown, on the console: `<service> got <SIGNAL> at <uptime>` from a service's trap and
//!   `stop-data <uptime> <service>=<state>` from a later service's stop command.

use std::collections::BTreeMap;

use rootfs::system::{Restart, ServiceSpec, SystemSpec};

/// What a gap may exceed the policy's delay by, beyond the common start-up cost, in ms.
pub const SLACK_MS: f64 = 1500.0;
/// What it may fall short of it by (the 10 ms resolution of `/proc/uptime`), in ms.
pub const EARLY_MS: f64 = 30.0;
/// The window of the crash-loop count, seconds.
pub const CRASH_WINDOW_S: f64 = 3.0;

/// One judge, parsed from a check's `judge` key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Judge {
    /// `up N`: N `<label> <pid> <state>` lines, every process alive.
    Up(usize),
    /// `comes-back <svc>`: a killed longrun is back, as a new process, within its delay.
    ComesBack(String),
    /// `crash-count <svc>`: starts in the first [`CRASH_WINDOW_S`] within what the policy allows.
    CrashCount(String),
    /// `backoff <svc>`: each delay doubles from `restart-delay-ms` and stops at the cap.
    Backoff(String),
    /// `reset <svc>`: after a run of at least 10 s the delay is `restart-delay-ms` again.
    Reset(String),
    /// `rate <svc>`: once at the cap, no more than one start per `restart-max-delay-ms`.
    Rate(String),
    /// `on-failure <svc>`: restarted after a non-zero exit, left down after exit code 0.
    OnFailure(String),
    /// `no-zombies MIN [MAX]`: at least MIN orphans of PID 1 before, no zombie of PID 1's in
    /// both the `after` and the `later` table a second apart (and at most MAX processes).
    NoZombies { orphans: usize, max: Option<usize> },
    /// `env-clear <svc>`: the service's environment is PATH=/bin, its own variables and what
    /// the shell adds, nothing inherited.
    EnvClear(String),
    /// `mounts`: `/proc/mounts` holds the documented mount list.
    Mounts,
    /// `kill-after-timeout <svc>`: it got its stop signal, ignored it, and was gone by KILL
    /// no sooner than its stop timeout.
    KillAfterTimeout(String),
    /// `stop-signal <svc>`: at shutdown it got its configured signal, not TERM.
    StopSignal(String),
    /// `pid1`: every `exe` line (the guest's `readlink /proc/1/exe`) is the program the build's
    /// backend runs as PID 1 (see [`Subject::pid1_programs`]).
    Pid1,
    /// `same-pid1`: as `pid1`, and the `before`/`after` PID 1 facts agree, every
    /// `<label> <pid> <state>` process alive.
    SamePid1,
    /// `oom`: the kernel's OOM killer named a process, and a `<label> <pid> <state>` line is alive.
    Oom,
    /// `data-mount <where>`: the `/proc/mounts` line of a `[[setup.mounts]]` target shows its
    /// device and type, and the `prev <token>` / `now <token>` lines are there (what the boots
    /// of one disk wrote and read is compared across boots by the conformance run).
    DataMount(String),
    /// `hotplug-add <ms>`: a device plugged in through QMP (`t request`) had its link by
    /// `t appeared` within `<ms>`, and its `node <mode> <owner> <group>` and
    /// `link <path> <target>` are what the `[[device-rules]]` rule with that link says.
    HotplugAdd(u64),
    /// `hotplug-remove <ms>`: after `device_del` (`t remove`) the node and link were gone by
    /// `t gone` within `<ms>` (`after <path> absent` lines), and the rule's commands ran once
    /// each: exactly one `log add <kernel>` and one `log remove <kernel>` line.
    HotplugRemove(u64),
}

/// What was booted, as the host recorded it when it built the image (`build.json`): the init
/// backend asked for and the store paths in the image. Judges read the guest's facts against
/// it, never against a file the image carries.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    pub backend: &'a str,
    pub store_paths: &'a [String],
}

/// For each backend, the package whose program is PID 1 and that program, from the init
/// systems' own documentation (busybox's `init` applet; runit's stage runner `runit`, which
/// `runit-init` becomes; `s6-svscan`), not from bonsai's renderer.
const PID1_PROGRAMS: &[(&str, &str, &str)] = &[
    ("busybox", "busybox", "bin/busybox"),
    ("runit", "runit", "bin/runit"),
    ("s6", "s6", "bin/s6-svscan"),
];

impl Subject<'_> {
    /// The paths `/proc/1/exe` may name: the backend's program in each store path of its
    /// package in the image (`<hash>-<package>-<version>`, also `-static-<version>`), or
    /// bonsai-init's `/bin/bonsai-init` (it is copied into the image, not a store path).
    pub fn pid1_programs(&self) -> Result<Vec<String>, String> {
        if self.backend == "bonsai-init" {
            return Ok(vec!["/bin/bonsai-init".into()]);
        }
        let (_, package, program) = PID1_PROGRAMS
            .iter()
            .find(|(b, _, _)| *b == self.backend)
            .ok_or_else(|| format!("no PID 1 program is known for backend '{}'", self.backend))?;
        let is_package = |name: &str| {
            let rest = name.strip_prefix(package).and_then(|r| r.strip_prefix('-'));
            let rest = rest.map(|r| r.strip_prefix("static-").unwrap_or(r));
            rest.is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        };
        let found: Vec<String> = self
            .store_paths
            .iter()
            .filter(|p| {
                let base = p.rsplit('/').next().unwrap_or("");
                base.split_once('-')
                    .is_some_and(|(_, name)| is_package(name))
            })
            .map(|p| format!("{p}/{program}"))
            .collect();
        if found.is_empty() {
            return Err(format!(
                "the image holds no {package} store path (backend {})",
                self.backend
            ));
        }
        Ok(found)
    }
}

fn service<'a>(spec: &'a SystemSpec, name: &str) -> Result<&'a ServiceSpec, String> {
    spec.services
        .get(name)
        .ok_or_else(|| format!("names service '{name}', which the profile does not define"))
}

impl Judge {
    /// Parses `judge = "..."`, checking the named service against the profile.
    pub fn parse(text: &str, spec: &SystemSpec) -> Result<Judge, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let svc = |i: usize| -> Result<String, String> {
            let name = words
                .get(i)
                .ok_or_else(|| format!("'{text}' needs a service name"))?;
            service(spec, name)?;
            Ok(name.to_string())
        };
        let num = |i: usize| -> Result<Option<usize>, String> {
            words
                .get(i)
                .map(|w| w.parse().map_err(|_| format!("'{w}' is not a count")))
                .transpose()
        };
        let judge = match words.first().copied() {
            Some("up") => Judge::Up(num(1)?.ok_or("'up' needs a count")?),
            Some("comes-back") => Judge::ComesBack(svc(1)?),
            Some("crash-count") => Judge::CrashCount(svc(1)?),
            Some("backoff") => Judge::Backoff(svc(1)?),
            Some("reset") => Judge::Reset(svc(1)?),
            Some("rate") => Judge::Rate(svc(1)?),
            Some("on-failure") => {
                let name = svc(1)?;
                if service(spec, &name)?.restart != Restart::OnFailure {
                    return Err(format!(
                        "service '{name}' does not have restart = \"on-failure\""
                    ));
                }
                Judge::OnFailure(name)
            }
            Some("no-zombies") => Judge::NoZombies {
                orphans: num(1)?.ok_or("'no-zombies' needs a count of orphans")?,
                max: num(2)?,
            },
            Some("env-clear") => Judge::EnvClear(svc(1)?),
            Some("mounts") => Judge::Mounts,
            Some("kill-after-timeout") => Judge::KillAfterTimeout(svc(1)?),
            Some("stop-signal") => Judge::StopSignal(svc(1)?),
            Some("pid1") => Judge::Pid1,
            Some("same-pid1") => Judge::SamePid1,
            Some("oom") => Judge::Oom,
            Some("data-mount") => {
                let t = words.get(1).ok_or("'data-mount' needs a mount point")?;
                if !spec.setup.mounts.iter().any(|m| m.target == *t) {
                    return Err(format!("no [[setup.mounts]] is mounted on '{t}'"));
                }
                Judge::DataMount(t.to_string())
            }
            Some(k @ ("hotplug-add" | "hotplug-remove")) => {
                let ms = num(1)?.ok_or_else(|| format!("'{k}' needs a deadline in ms"))? as u64;
                if k == "hotplug-add" {
                    Judge::HotplugAdd(ms)
                } else {
                    Judge::HotplugRemove(ms)
                }
            }
            _ => {
                return Err(format!(
                    "'{text}' is not a judge (one of: {})",
                    KINDS.join(", ")
                ))
            }
        };
        Ok(judge)
    }

    /// Judges a check's output (and the console after `BONSAI-DONE`, for shutdown judges).
    /// `Err` says, from the raw data, what is wrong.
    pub fn judge(
        &self,
        spec: &SystemSpec,
        subject: &Subject,
        output: &str,
        shutdown: &str,
    ) -> Result<(), String> {
        let get = |n: &str| service(spec, n);
        match self {
            Judge::Up(n) => up(output, *n),
            Judge::ComesBack(s) => comes_back(output, get(s)?),
            Judge::CrashCount(s) => crash_count(output, get(s)?),
            Judge::Backoff(s) => backoff(output, get(s)?),
            Judge::Reset(s) => reset(output, get(s)?),
            Judge::Rate(s) => rate(output, get(s)?),
            Judge::OnFailure(s) => on_failure(output, get(s)?),
            Judge::NoZombies { orphans, max } => no_zombies(output, *orphans, *max),
            Judge::EnvClear(s) => env_clear(output, get(s)?),
            Judge::Mounts => mounts(output),
            Judge::KillAfterTimeout(s) => kill_after_timeout(shutdown, s, get(s)?),
            Judge::StopSignal(s) => stop_signal(shutdown, s, get(s)?),
            Judge::Pid1 => pid1(output, subject),
            Judge::SamePid1 => same_pid1(output, subject),
            Judge::Oom => oom(output),
            Judge::DataMount(t) => data_mount(output, spec, t),
            Judge::HotplugAdd(ms) => hotplug_add(output, spec, *ms),
            Judge::HotplugRemove(ms) => hotplug_remove(output, *ms),
        }
    }
}

/// The judge kinds, for the error on an unknown one.
pub const KINDS: &[&str] = &[
    "up",
    "comes-back",
    "crash-count",
    "backoff",
    "reset",
    "rate",
    "on-failure",
    "no-zombies",
    "env-clear",
    "mounts",
    "kill-after-timeout",
    "stop-signal",
    "pid1",
    "same-pid1",
    "oom",
    "data-mount",
    "hotplug-add",
    "hotplug-remove",
];

/// Judges every check of `checks` that names a judge, in `report` (same order): a check that
/// ran and exited as expected passes only if its judge agrees. `log` is the serial log, whose
/// part after `BONSAI-DONE <nonce>` is the shutdown. `Err` when the profile cannot be read.
pub fn apply(
    info: &crate::build::BuildInfo,
    report: &mut qemu::Report,
    log: &str,
    nonce: &str,
) -> Result<(), String> {
    if info.checks.iter().all(|c| c.judge.is_none()) {
        return Ok(());
    }
    let spec = crate::config::Config::new(&crate::project_root())
        .load_profile(&info.profile)
        .map_err(|e| format!("judging the checks: {e:#}"))?
        .system;
    let shutdown = shutdown_part(log, nonce);
    let subject = Subject {
        backend: &info.init,
        store_paths: &info.store_paths,
    };
    judge_results(&spec, &subject, &info.checks, &mut report.checks, shutdown);
    Ok(())
}

/// The console after `BONSAI-DONE <nonce>` (empty when the guest never got there).
pub fn shutdown_part<'a>(log: &'a str, nonce: &str) -> &'a str {
    log.split(&format!("{} {nonce}", qemu::protocol::DONE))
        .nth(1)
        .unwrap_or("")
}

/// Applies the judges to results that passed on their exit code.
pub fn judge_results(
    spec: &SystemSpec,
    subject: &Subject,
    checks: &[crate::config::CheckSpec],
    results: &mut [qemu::CheckResult],
    shutdown: &str,
) {
    for (c, r) in checks.iter().zip(results.iter_mut()) {
        let Some(text) = &c.judge else { continue };
        if !r.passed {
            continue;
        }
        let verdict =
            Judge::parse(text, spec).and_then(|j| j.judge(spec, subject, &r.output, shutdown));
        if let Err(why) = verdict {
            r.passed = false;
            r.reason = Some(format!("judge {text}: {why}"));
        }
    }
}

// ------------------------------------------------------------------ raw data

fn lines(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(|l| l.trim_start_matches('\r').split_whitespace().collect())
}

/// `start <uptime> [code]` lines: (seconds, exit code if given).
fn starts(output: &str) -> Vec<(f64, Option<i32>)> {
    lines(output)
        .filter(|w| w.first() == Some(&"start"))
        .filter_map(|w| {
            Some((
                w.get(1)?.parse().ok()?,
                w.get(2).and_then(|c| c.parse().ok()),
            ))
        })
        .collect()
}

fn uptime_of(output: &str, key: &str) -> Option<f64> {
    lines(output)
        .find(|w| w.first() == Some(&key))
        .and_then(|w| w.get(1)?.parse().ok())
}

fn alive(state: &str) -> bool {
    matches!(state, "R" | "S" | "D")
}

/// A `<label> <pid> <state>` line: a pid, then a process state letter or `gone`.
fn is_proc_line(w: &[&str]) -> bool {
    w.len() == 3
        && w[1].parse::<u32>().is_ok()
        && (w[2] == "gone" || (w[2].len() == 1 && w[2].chars().all(|c| c.is_ascii_uppercase())))
}

fn ms(seconds: f64) -> f64 {
    (seconds * 1000.0).round()
}

/// The delay before restart `i` (0 = after the first run): doubling from the initial delay,
/// capped; the same rule as `pid1::service::next_backoff` and the shell finish script.
pub fn expected_delay(svc: &ServiceSpec, i: usize) -> f64 {
    let max = svc.restart_max_delay_ms as f64;
    let mut d = (svc.restart_delay_ms as f64).min(max);
    for _ in 0..i {
        d = (d * 2.0).min(max);
    }
    d
}

// ------------------------------------------------------------------ judges

fn up(output: &str, n: usize) -> Result<(), String> {
    let procs: Vec<Vec<&str>> = lines(output).filter(|w| is_proc_line(w)).collect();
    if procs.len() != n {
        return Err(format!("{} processes listed, {n} expected", procs.len()));
    }
    for p in &procs {
        if !alive(p[2]) {
            return Err(format!("{} (pid {}) is {}", p[0], p[1], p[2]));
        }
    }
    Ok(())
}

fn comes_back(output: &str, svc: &ServiceSpec) -> Result<(), String> {
    let killed = lines(output)
        .find(|w| w.first() == Some(&"killed") && w.len() >= 3)
        .ok_or("no 'killed <pid> <uptime>' line")?;
    let new = lines(output)
        .find(|w| w.first() == Some(&"new") && w.len() >= 4)
        .ok_or("no 'new <pid> <uptime> <state>' line: it never came back")?;
    let (old_pid, new_pid) = (killed[1], new[1]);
    if old_pid == new_pid {
        return Err(format!("the pid is still {old_pid}"));
    }
    if !alive(new[3]) {
        return Err(format!("the new process {new_pid} is {}", new[3]));
    }
    let t0: f64 = killed[2].parse().map_err(|_| "bad uptime")?;
    let t1: f64 = new[2].parse().map_err(|_| "bad uptime")?;
    let took = ms(t1 - t0);
    let allowed = svc.restart_delay_ms as f64 + 4.0 * SLACK_MS;
    if took > allowed {
        return Err(format!("back after {took} ms, more than {allowed} ms"));
    }
    Ok(())
}

fn crash_count(output: &str, svc: &ServiceSpec) -> Result<(), String> {
    let s = starts(output);
    let first = s.first().ok_or("no start recorded")?.0;
    let last = s.last().map(|l| l.0).unwrap_or(first);
    let now = uptime_of(output, "now").unwrap_or(last);
    if now - first < CRASH_WINDOW_S {
        return Err(format!(
            "only {:.2} s of data, {CRASH_WINDOW_S} s needed",
            now - first
        ));
    }
    let n = s
        .iter()
        .filter(|(t, _)| t - first <= CRASH_WINDOW_S)
        .count();
    // At most: starts with no time between them beyond the policy's delays.
    let window = CRASH_WINDOW_S * 1000.0;
    let (mut most, mut at) = (1, 0.0);
    while at + expected_delay(svc, most - 1) - EARLY_MS <= window {
        at += expected_delay(svc, most - 1);
        most += 1;
    }
    if !(2..=most).contains(&n) {
        return Err(format!(
            "{n} starts in {CRASH_WINDOW_S} s; the policy ({} ms doubling to {} ms) allows 2 to {most}",
            svc.restart_delay_ms, svc.restart_max_delay_ms
        ));
    }
    Ok(())
}

/// The start-up cost common to every restart (process creation under TCG, on a loaded
/// host): the least of the gaps' excess over the policy's delays, never below zero.
fn overhead(starts: &[f64], svc: &ServiceSpec, from: usize) -> f64 {
    starts
        .windows(2)
        .enumerate()
        .map(|(i, w)| ms(w[1] - w[0]) - expected_delay(svc, from + i))
        .fold(f64::INFINITY, f64::min)
        .max(0.0)
}

/// Checks each gap between starts against the policy from restart `from` on: never shorter
/// than the delay, and no longer than the delay plus the restarts' common overhead plus
/// [`SLACK_MS`]. Judging the excess over the common overhead keeps a loaded host from failing
/// the check while a delay that does not double, or does not stop at the cap, still fails.
fn gaps(starts: &[f64], svc: &ServiceSpec, from: usize) -> Result<(), String> {
    let o = overhead(starts, svc, from);
    for (i, w) in starts.windows(2).enumerate() {
        let gap = ms(w[1] - w[0]);
        let want = expected_delay(svc, from + i);
        if gap < want - EARLY_MS || gap > want + o + SLACK_MS {
            return Err(format!(
                "restart {} came {gap} ms after the start before it; the policy asks {want} ms (+ {o} ms start-up, + up to {SLACK_MS} ms)",
                from + i + 1
            ));
        }
    }
    Ok(())
}

/// How many restarts until the delay is at the cap.
fn restarts_to_cap(svc: &ServiceSpec) -> usize {
    let max = svc.restart_max_delay_ms as f64;
    (0..64)
        .find(|&i| expected_delay(svc, i) >= max)
        .unwrap_or(64)
}

fn backoff(output: &str, svc: &ServiceSpec) -> Result<(), String> {
    let s: Vec<f64> = starts(output).iter().map(|s| s.0).collect();
    // Two restarts at the cap show that it holds.
    let need = restarts_to_cap(svc) + 3;
    if s.len() < need {
        return Err(format!(
            "{} starts recorded; {need} are needed to see the delay double and stop at {} ms",
            s.len(),
            svc.restart_max_delay_ms
        ));
    }
    gaps(&s, svc, 0)
}

fn reset(output: &str, svc: &ServiceSpec) -> Result<(), String> {
    let mut runs: Vec<(f64, Option<f64>)> = Vec::new();
    for w in lines(output) {
        match (
            w.first().copied(),
            w.get(1).and_then(|t| t.parse::<f64>().ok()),
        ) {
            (Some("start"), Some(t)) => runs.push((t, None)),
            (Some("exit"), Some(t)) => {
                if let Some(last) = runs.last_mut() {
                    last.1 = Some(t);
                }
            }
            _ => {}
        }
    }
    let long = runs
        .iter()
        .position(|(s, e)| e.is_some_and(|e| e - s >= 10.0))
        .ok_or("no run of 10 s or more recorded")?;
    if long < 2 {
        return Err(format!(
            "the long run is start {}; two quick runs before it are needed to raise the delay",
            long + 1
        ));
    }
    let quick: Vec<f64> = runs[..=long].iter().map(|r| r.0).collect();
    gaps(&quick, svc, 0)?;
    // The quick runs' start-up cost applies to the restart after the long run too.
    let o = overhead(&quick, svc, 0);
    let end = runs[long].1.unwrap_or_default();
    let next = runs.get(long + 1).ok_or("no start after the long run")?.0;
    let gap = ms(next - end);
    let want = svc.restart_delay_ms as f64;
    let unreset = expected_delay(svc, long);
    if gap < want - EARLY_MS || gap > want + o + SLACK_MS || gap - o >= unreset {
        return Err(format!(
            "restarted {gap} ms after a run of {:.1} s; after 10 s up the delay is {want} ms again (without the reset: {unreset} ms)",
            end - runs[long].0
        ));
    }
    Ok(())
}

fn rate(output: &str, svc: &ServiceSpec) -> Result<(), String> {
    let s: Vec<f64> = starts(output).iter().map(|s| s.0).collect();
    let cap = restarts_to_cap(svc);
    if s.len() < cap + 3 {
        return Err(format!(
            "{} starts recorded; {} are needed to measure the rate at the cap",
            s.len(),
            cap + 3
        ));
    }
    let at_cap = &s[cap..];
    let span = at_cap[at_cap.len() - 1] - at_cap[0];
    let per_minute = (at_cap.len() - 1) as f64 * 60.0 / span;
    let most = 60_000.0 / (svc.restart_max_delay_ms as f64 - EARLY_MS);
    if per_minute > most {
        return Err(format!(
            "{per_minute:.0} restarts a minute at the cap; {} ms between restarts allows {most:.0}",
            svc.restart_max_delay_ms
        ));
    }
    gaps(at_cap, svc, cap)
}

fn on_failure(output: &str, svc: &ServiceSpec) -> Result<(), String> {
    let s = starts(output);
    let codes: Vec<i32> = s.iter().map(|(_, c)| c.unwrap_or(-1)).collect();
    let Some(zero) = codes.iter().position(|&c| c == 0) else {
        return Err(format!("no run exited 0 (exit codes {codes:?})"));
    };
    if zero == 0 {
        return Err("the first run exited 0: nothing shows a restart after a failure".into());
    }
    if zero + 1 != codes.len() {
        return Err(format!(
            "started again after exit code 0 (exit codes in order {codes:?})"
        ));
    }
    let now = uptime_of(output, "now").ok_or("no 'now <uptime>' line")?;
    let waited = ms(now - s[zero].0);
    let enough = expected_delay(svc, zero) + SLACK_MS;
    if waited < enough {
        return Err(format!(
            "only {waited} ms watched after the clean exit, {enough} ms needed"
        ));
    }
    Ok(())
}

fn no_zombies(output: &str, orphans: usize, max: Option<usize>) -> Result<(), String> {
    let mut section = "";
    // section -> (pid, state, ppid)
    let mut table: BTreeMap<&str, Vec<(&str, &str, &str)>> = BTreeMap::new();
    for w in lines(output) {
        match w.as_slice() {
            ["before"] | ["after"] | ["later"] => section = w[0],
            ["proc", pid, state, ppid] if !section.is_empty() => {
                table.entry(section).or_default().push((pid, state, ppid))
            }
            _ => {}
        }
    }
    let before = table.get("before").ok_or("no 'before' process table")?;
    let after = table.get("after").ok_or("no 'after' process table")?;
    let later = table.get("later").ok_or("no 'later' process table")?;
    let reparented = before.iter().filter(|(_, _, pp)| *pp == "1").count();
    if reparented < orphans {
        return Err(format!(
            "only {reparented} children of PID 1 before: the orphans were not there to reap ({orphans} needed)"
        ));
    }
    // A process that has just ended is a zombie until PID 1 gets to it: a zombie of PID 1's
    // in both tables, taken a second apart, was never reaped.
    let zombies = |t: &[(&str, &str, &str)]| -> Vec<String> {
        t.iter()
            .filter(|(_, s, pp)| *s == "Z" && *pp == "1")
            .map(|(pid, _, _)| pid.to_string())
            .collect()
    };
    let (first, second) = (zombies(after), zombies(later));
    let kept: Vec<&String> = first.iter().filter(|p| second.contains(p)).collect();
    if !kept.is_empty() {
        return Err(format!(
            "{} zombies of PID 1 still there a second later (pids {})",
            kept.len(),
            kept.iter()
                .map(|p| p.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    if let Some(max) = max {
        if later.len() > max {
            return Err(format!("{} processes after, at most {max}", later.len()));
        }
    }
    Ok(())
}

/// What busybox sh adds to any environment it starts with.
const SHELL_VARS: &[&str] = &["PWD", "SHLVL", "_", "OLDPWD"];

fn env_clear(output: &str, svc: &ServiceSpec) -> Result<(), String> {
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    for l in output.lines() {
        if let Some((k, v)) = l.trim_start_matches('\r').split_once('=') {
            seen.insert(k, v.trim_end());
        }
    }
    if seen.get("PATH") != Some(&"/bin") {
        return Err(format!("PATH is {:?}, not /bin", seen.get("PATH")));
    }
    for (k, v) in &svc.environment {
        if seen.get(k.as_str()) != Some(&v.as_str()) {
            return Err(format!("{k} is {:?}, not {v:?}", seen.get(k.as_str())));
        }
    }
    let extra: Vec<&str> = seen
        .keys()
        .copied()
        .filter(|k| *k != "PATH" && !svc.environment.contains_key(*k) && !SHELL_VARS.contains(k))
        .collect();
    if !extra.is_empty() {
        return Err(format!("inherited variables: {}", extra.join(", ")));
    }
    Ok(())
}

/// The mounts every backend makes (README, "At boot every backend mounts ..."): target,
/// type, and options that must be among the mount's.
pub const MOUNT_LIST: &[(&str, &str, &[&str])] = &[
    ("/proc", "proc", &["nosuid", "nodev", "noexec"]),
    ("/sys", "sysfs", &["nosuid", "nodev", "noexec"]),
    ("/dev", "devtmpfs", &["nosuid"]),
    (
        "/dev/pts",
        "devpts",
        &["nosuid", "noexec", "gid=5", "mode=620"],
    ),
    ("/dev/shm", "tmpfs", &["nosuid", "nodev"]),
    ("/run", "tmpfs", &["nosuid", "nodev", "mode=755"]),
    ("/tmp", "tmpfs", &["nosuid", "nodev"]),
];

fn mounts(output: &str) -> Result<(), String> {
    let table: Vec<Vec<&str>> = lines(output).filter(|w| w.len() >= 4).collect();
    for (target, fstype, opts) in MOUNT_LIST {
        let Some(m) = table.iter().find(|w| w[1] == *target) else {
            return Err(format!("{target} is not mounted"));
        };
        if m[2] != *fstype {
            return Err(format!("{target} is {}, not {fstype}", m[2]));
        }
        let have: Vec<&str> = m[3].split(',').collect();
        if let Some(o) = opts.iter().find(|o| !have.contains(o)) {
            return Err(format!("{target} lacks option {o} ({})", m[3]));
        }
    }
    Ok(())
}

/// The `prev <token>` and `now <token>` lines of a `data-mount` check: what the last boot left
/// on the disk (`none` on a new filesystem) and what this boot wrote.
pub fn data_tokens(output: &str) -> Option<(String, String)> {
    let get = |key: &str| {
        lines(output).find_map(|w| (w.len() == 2 && w[0] == key).then(|| w[1].to_string()))
    };
    Some((get("prev")?, get("now")?))
}

fn data_mount(output: &str, spec: &SystemSpec, target: &str) -> Result<(), String> {
    let m = spec
        .setup
        .mounts
        .iter()
        .find(|m| m.target == target)
        .ok_or_else(|| format!("no [[setup.mounts]] on {target}"))?;
    let line = lines(output)
        .find(|w| w.len() >= 4 && w[1] == target)
        .ok_or_else(|| format!("{target} is not mounted"))?;
    if line[2] != m.fstype {
        return Err(format!("{target} is {}, not {}", line[2], m.fstype));
    }
    if line[0] != m.device {
        return Err(format!(
            "{target} is mounted from {}, not {}",
            line[0], m.device
        ));
    }
    let opts: Vec<&str> = line[3].split(',').collect();
    if m.options.split(',').any(|o| o == "rw") && !opts.contains(&"rw") {
        return Err(format!("{target} is not read-write ({})", line[3]));
    }
    let (_, now) = data_tokens(output).ok_or("no 'prev <token>' and 'now <token>' lines")?;
    if now.len() != 36 {
        return Err(format!("'{now}' is not a boot id"));
    }
    Ok(())
}

/// The `t <label> <uptime>` lines' span from `from` to `to`, in ms, against `deadline`.
fn span_within(output: &str, from: &str, to: &str, deadline: u64) -> Result<f64, String> {
    let at = |label: &str| -> Result<f64, String> {
        lines(output)
            .find(|w| w.len() == 3 && w[0] == "t" && w[1] == label)
            .and_then(|w| w[2].parse::<f64>().ok())
            .ok_or_else(|| format!("no 't {label} <uptime>' line"))
    };
    let ms = (at(to)? - at(from)?) * 1000.0;
    if ms > deadline as f64 {
        return Err(format!(
            "{to} {ms:.0} ms after {from}, over the deadline of {deadline} ms"
        ));
    }
    Ok(ms)
}

fn hotplug_add(output: &str, spec: &SystemSpec, deadline: u64) -> Result<(), String> {
    span_within(output, "request", "appeared", deadline)?;
    let link = lines(output)
        .find(|w| w.first() == Some(&"link"))
        .ok_or("no 'link <path> <target>' line")?;
    let (path, target) = match link.as_slice() {
        [_, p, t] => (*p, *t),
        _ => return Err(format!("the link is not there: {}", link.join(" "))),
    };
    let kernel = target.rsplit('/').next().unwrap_or_default();
    let rel = path
        .strip_prefix("/dev/")
        .ok_or("the link is not under /dev")?;
    let rule = spec
        .device_rules
        .iter()
        .find(|r| {
            r.symlinks
                .iter()
                .any(|l| l.replace("{kernel}", kernel) == rel)
        })
        .ok_or_else(|| format!("no [[device-rules]] rule makes {path}"))?;
    let want_target = format!("{}{kernel}", "../".repeat(rel.matches('/').count()));
    if target != want_target {
        return Err(format!("{path} points at {target}, not {want_target}"));
    }
    let node = lines(output)
        .find(|w| w.first() == Some(&"node"))
        .ok_or("no 'node <mode> <owner> <group>' line")?;
    let [_, mode, owner, group] = node.as_slice() else {
        return Err(format!("the node is not there: {}", node.join(" ")));
    };
    let want_mode = rule
        .mode
        .as_deref()
        .unwrap_or("600")
        .trim_start_matches('0');
    let want_owner = rule.owner.as_deref().unwrap_or("root");
    let want_group = rule.group.as_deref().unwrap_or(want_owner);
    if mode.trim_start_matches('0') != want_mode || *owner != want_owner || *group != want_group {
        return Err(format!(
            "/dev/{kernel} is {mode} {owner}:{group}, the rule says {want_mode} {want_owner}:{want_group}"
        ));
    }
    Ok(())
}

fn hotplug_remove(output: &str, deadline: u64) -> Result<(), String> {
    span_within(output, "remove", "gone", deadline)?;
    let after: Vec<Vec<&str>> = lines(output)
        .filter(|w| w.first() == Some(&"after"))
        .collect();
    if after.is_empty() {
        return Err("no 'after <path> absent|present' lines".into());
    }
    if let Some(w) = after.iter().find(|w| w.get(2) != Some(&"absent")) {
        return Err(format!(
            "{} is still there after device_del",
            w.get(1).unwrap_or(&"?")
        ));
    }
    let logged: Vec<String> = lines(output)
        .filter(|w| w.first() == Some(&"log"))
        .map(|w| w[1..].join(" "))
        .collect();
    let adds = logged.iter().filter(|l| l.starts_with("add ")).count();
    let removes = logged.iter().filter(|l| l.starts_with("remove ")).count();
    if adds != 1 || removes != 1 {
        return Err(format!(
            "the rule's commands ran {adds} time(s) on add and {removes} on remove, not once each (log: {logged:?})"
        ));
    }
    Ok(())
}

/// Whether the FAT filesystem at the start of `disk` was unmounted cleanly: Linux sets the
/// dirty bit of the boot sector's state byte (FAT32: offset 0x41, FAT12/16: 0x25) when it
/// mounts the volume read-write and clears it when it unmounts it (fs/fat/inode.c).
pub fn fat_clean(disk: &[u8]) -> Result<(), String> {
    if disk.len() < 512 || disk[510..512] != [0x55, 0xAA] {
        return Err("the disk holds no FAT boot sector (the filesystem was never made)".into());
    }
    let fat32 = u16::from_le_bytes([disk[22], disk[23]]) == 0;
    let (off, kind) = if fat32 {
        (0x41, "FAT32")
    } else {
        (0x25, "FAT12/16")
    };
    if disk[off] & 1 != 0 {
        return Err(format!(
            "the {kind} volume's dirty bit is set (state 0x{:02x}): it was not unmounted",
            disk[off]
        ));
    }
    Ok(())
}

/// The volume label in a FAT boot sector (FAT32: offset 0x47, FAT12/16: 0x2b), without its
/// padding; `None` when `disk` starts with no FAT boot sector.
pub fn fat_label(disk: &[u8]) -> Option<String> {
    if disk.len() < 512 || disk[510..512] != [0x55, 0xAA] {
        return None;
    }
    let fat32 = u16::from_le_bytes([disk[22], disk[23]]) == 0;
    let off = if fat32 { 0x47 } else { 0x2b };
    let raw = &disk[off..off + 11];
    Some(
        String::from_utf8_lossy(raw)
            .trim_end_matches([' ', '\0'])
            .to_string(),
    )
}

/// `<svc> got <SIG> at <uptime>` lines: (signal, uptime).
fn got_signals(shutdown: &str, name: &str) -> Vec<(String, f64)> {
    lines(shutdown)
        .filter_map(|w| {
            let i = w.iter().position(|x| *x == "got")?;
            (i >= 1 && w[i - 1] == name && w.get(i + 2) == Some(&"at"))
                .then(|| Some((w.get(i + 1)?.to_string(), w.get(i + 3)?.parse().ok()?)))?
        })
        .collect()
}

fn stop_signal_name(svc: &ServiceSpec) -> String {
    svc.stop_signal.clone().unwrap_or_else(|| "TERM".into())
}

fn kill_after_timeout(shutdown: &str, name: &str, svc: &ServiceSpec) -> Result<(), String> {
    let sig = stop_signal_name(svc);
    let got = got_signals(shutdown, name);
    let Some((_, t1)) = got.iter().find(|(s, _)| *s == sig) else {
        return Err(format!("{name} never got {sig} at shutdown"));
    };
    let key = format!("{name}=");
    let data = lines(shutdown)
        .filter(|w| w.first() == Some(&"stop-data") && w.len() >= 3)
        .find_map(|w| {
            let t: f64 = w[1].parse().ok()?;
            let state = w[2..].iter().find_map(|x| x.strip_prefix(key.as_str()))?;
            Some((t, state.to_string()))
        })
        .ok_or(format!(
            "no 'stop-data <uptime> {name}=<state>' line after it"
        ))?;
    let (t2, state) = data;
    if state != "gone" && state != "Z" {
        return Err(format!("{name} was still {state} after it was stopped"));
    }
    let waited = ms(t2 - t1);
    let timeout = svc.stop_timeout_ms as f64;
    // The trap runs between two 0.2 s sleeps of the service: it may be late by that much.
    if waited < timeout - 250.0 {
        return Err(format!(
            "killed {waited} ms after {sig}, before its stop timeout of {timeout} ms"
        ));
    }
    if waited > timeout + 4.0 * SLACK_MS {
        return Err(format!(
            "killed {waited} ms after {sig}, long after its stop timeout of {timeout} ms"
        ));
    }
    Ok(())
}

fn stop_signal(shutdown: &str, name: &str, svc: &ServiceSpec) -> Result<(), String> {
    let sig = stop_signal_name(svc);
    let got = got_signals(shutdown, name);
    match got.first() {
        Some((s, _)) if *s != sig => {
            return Err(format!("{name} got {s} first, not its stop signal {sig}"))
        }
        None => return Err(format!("{name} got no signal at shutdown ({sig} expected)")),
        Some(_) => {}
    }
    // Its stop signal alone: a TERM sent along with it (before or after) is a TERM too.
    match got.iter().find(|(s, _)| *s != sig) {
        Some((s, _)) => Err(format!("{name} got {s} as well as its stop signal {sig}")),
        None => Ok(()),
    }
}

fn pid1(output: &str, subject: &Subject) -> Result<(), String> {
    let exe: Vec<&str> = lines(output)
        .filter(|w| w.first() == Some(&"exe"))
        .map(|w| w.get(1).copied().unwrap_or(""))
        .collect();
    if exe.is_empty() {
        return Err("no `exe <path>` line".into());
    }
    let programs = subject.pid1_programs()?;
    for e in exe {
        if !programs.iter().any(|p| p == e) {
            return Err(format!(
                "PID 1 is {e}, not {} (the {} backend's)",
                programs.join(" or "),
                subject.backend
            ));
        }
    }
    Ok(())
}

fn same_pid1(output: &str, subject: &Subject) -> Result<(), String> {
    pid1(output, subject)?;
    let pick = |key: &str| -> Vec<String> {
        lines(output)
            .filter(|w| w.first() == Some(&key))
            .map(|w| w[1..].join(" "))
            .collect()
    };
    let (before, after) = (pick("before"), pick("after"));
    if before != after {
        return Err(format!("PID 1 changed: {before:?} then {after:?}"));
    }
    up_lines(output)
}

/// Every `<label> <pid> <state>` line names a live process.
fn up_lines(output: &str) -> Result<(), String> {
    for p in lines(output).filter(|w| is_proc_line(w)) {
        if !alive(p[2]) {
            return Err(format!("{} (pid {}) is {}", p[0], p[1], p[2]));
        }
    }
    Ok(())
}

fn oom(output: &str) -> Result<(), String> {
    let killed = output
        .lines()
        .filter(|l| l.contains("Killed process"))
        .count();
    if killed == 0 {
        return Err("the kernel log names no killed process".into());
    }
    let live = lines(output).filter(|w| is_proc_line(w)).count();
    if live == 0 {
        return Err("no healthy process listed".into());
    }
    up_lines(output)
}

/// The checks' outputs in a recorded serial log: index (from 1) -> (exit code, output lines).
pub fn outputs_from_log(log: &str) -> (String, BTreeMap<usize, (i32, String)>) {
    let clean: Vec<&str> = log.lines().map(qemu::protocol::clean_line).collect();
    let nonce = clean
        .iter()
        .find_map(|l| l.strip_prefix("BONSAI-READY "))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("")
        .to_string();
    let mut out = BTreeMap::new();
    let mut current: Option<(usize, String)> = None;
    for l in clean {
        let w: Vec<&str> = l.split_whitespace().collect();
        match w.as_slice() {
            ["BONSAI-CHECK-BEGIN", n, i] if *n == nonce => {
                current = i.parse().ok().map(|i| (i, String::new()));
            }
            ["BONSAI-CHECK-END", n, _, rc] if *n == nonce => {
                if let Some((i, text)) = current.take() {
                    out.insert(i, (rc.parse().unwrap_or(-1), text));
                }
            }
            _ => {
                if let Some((_, text)) = current.as_mut() {
                    text.push_str(l);
                    text.push('\n');
                }
            }
        }
    }
    (nonce, out)
}

/// Judges a recorded serial log of `profile` on `board`: every judged check, by name, with
/// its verdict (`Err` why it failed).
pub fn judge_log(
    board: &str,
    profile: &str,
    subject: &Subject,
    log: &str,
) -> anyhow::Result<Vec<(String, Result<(), String>)>> {
    let cfg = crate::config::Config::new(&crate::project_root());
    let b = cfg.load_board(board)?;
    let p = cfg.load_profile(profile)?;
    let checks = crate::build::all_checks(&b, &p);
    let (nonce, outputs) = outputs_from_log(log);
    let shutdown = shutdown_part(log, &nonce);
    let mut verdicts = Vec::new();
    for (i, c) in checks.iter().enumerate() {
        let Some(text) = &c.judge else { continue };
        let verdict = match outputs.get(&(i + 1)) {
            None => Err("the check never ran".to_string()),
            Some((rc, _)) if *rc != c.exit => Err(format!("exit code {rc}")),
            Some((_, output)) => Judge::parse(text, &p.system)
                .and_then(|j| j.judge(&p.system, subject, output, shutdown)),
        };
        verdicts.push((c.name.clone(), verdict));
    }
    Ok(verdicts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SystemSpec {
        let mut s = SystemSpec::default();
        let svc = |t: &str| -> ServiceSpec { toml::from_str(t).unwrap() };
        s.services.insert(
            "crasher".into(),
            svc("command = [\"x\"]\nrestart-delay-ms = 500\nrestart-max-delay-ms = 2000"),
        );
        s.services.insert(
            "resetter".into(),
            svc("command = [\"x\"]\nrestart-delay-ms = 1000\nrestart-max-delay-ms = 4000"),
        );
        s.services.insert(
            "flapper".into(),
            svc("command = [\"x\"]\nrestart-delay-ms = 100\nrestart-max-delay-ms = 2000"),
        );
        s.services.insert(
            "onfail".into(),
            svc("command = [\"x\"]\nrestart = \"on-failure\"\nrestart-delay-ms = 200"),
        );
        s.services.insert(
            "stubborn".into(),
            svc("command = [\"x\"]\nstop-timeout-ms = 1500"),
        );
        s.services.insert(
            "hupper".into(),
            svc("command = [\"x\"]\nstop-signal = \"HUP\""),
        );
        s.services.insert(
            "envdump".into(),
            svc("command = [\"x\"]\nkind = \"oneshot\"\nenvironment = { ONLY = \"this\" }"),
        );
        s.services.insert("ticker".into(), svc("command = [\"x\"]"));
        s
    }

    /// A FAT boot sector as mkdosfs writes it: FAT16 (sectors per FAT at 22 set) or FAT32
    /// (that field 0), with the given label and state byte.
    fn boot_sector(fat32: bool, label: &str, state: u8) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        b[510] = 0x55;
        b[511] = 0xAA;
        let (fats, st, lab) = if fat32 {
            (0u16, 0x41, 0x47)
        } else {
            (32u16, 0x25, 0x2b)
        };
        b[22..24].copy_from_slice(&fats.to_le_bytes());
        b[st] = state;
        let mut l = label.as_bytes().to_vec();
        l.resize(11, b' ');
        b[lab..lab + 11].copy_from_slice(&l);
        b
    }

    #[test]
    fn fat_state_and_label_come_from_the_boot_sector() {
        for fat32 in [false, true] {
            assert_eq!(fat_clean(&boot_sector(fat32, "bonsaidata", 0)), Ok(()));
            let dirty = fat_clean(&boot_sector(fat32, "bonsaidata", 1)).unwrap_err();
            assert!(dirty.contains("dirty bit"), "{dirty}");
            assert_eq!(
                fat_label(&boot_sector(fat32, "bonsaidata", 0)).as_deref(),
                Some("bonsaidata")
            );
        }
        // A FAT32 volume's state byte is not where FAT16 keeps it: reading the wrong offset
        // would call a dirty FAT32 volume clean.
        let mut b = boot_sector(true, "x", 1);
        b[0x25] = 0;
        assert!(fat_clean(&b).is_err());
        assert!(fat_clean(&vec![0u8; 4096])
            .unwrap_err()
            .contains("never made"));
        assert_eq!(fat_label(&vec![0u8; 4096]), None);
    }

    #[test]
    fn hotplug_judges_read_times_modes_links_and_counts() {
        let mut s = spec();
        s.device_rules.push(
            toml::from_str(
                "subsystem = \"block\"\nattrs = { size = \"32768\" }\ngroup = \"disk\"\nmode = \"0640\"\nsymlinks = [\"disk/hot-{kernel}\"]",
            )
            .unwrap(),
        );
        let subject = Subject {
            backend: "busybox",
            store_paths: &[],
        };
        let add = Judge::parse("hotplug-add 10000", &s).unwrap();
        let good = "t request 27.07\nt appeared 27.52\nnode 640 root disk\nlink /dev/disk/hot-vdb ../vdb\n";
        assert_eq!(add.judge(&s, &subject, good, ""), Ok(()));
        let late = good.replace("t appeared 27.52", "t appeared 40.00");
        assert!(add
            .judge(&s, &subject, &late, "")
            .unwrap_err()
            .contains("over the deadline of 10000 ms"));
        let mode = good.replace("node 640", "node 600");
        assert_eq!(
            add.judge(&s, &subject, &mode, "").unwrap_err(),
            "/dev/vdb is 600 root:disk, the rule says 640 root:disk"
        );
        let nolink = good.replace(" ../vdb", "");
        assert!(add
            .judge(&s, &subject, &nolink, "")
            .unwrap_err()
            .starts_with("the link is not there"));
        let target = good.replace(" ../vdb", " vdb");
        assert_eq!(
            add.judge(&s, &subject, &target, "").unwrap_err(),
            "/dev/disk/hot-vdb points at vdb, not ../vdb"
        );
        let remove = Judge::parse("hotplug-remove 15000", &s).unwrap();
        let good = "t remove 28.40\nt gone 33.88\nafter /dev/vdb absent\nafter /dev/disk/hot-vdb absent\nlog add vdb\nlog remove vdb\n";
        assert_eq!(remove.judge(&s, &subject, good, ""), Ok(()));
        let twice = format!("{good}log add vdb\n");
        assert!(remove
            .judge(&s, &subject, &twice, "")
            .unwrap_err()
            .contains("ran 2 time(s) on add and 1 on remove"));
        let stays = good.replace("after /dev/vdb absent", "after /dev/vdb present");
        assert_eq!(
            remove.judge(&s, &subject, &stays, "").unwrap_err(),
            "/dev/vdb is still there after device_del"
        );
        assert!(Judge::parse("hotplug-add", &s)
            .unwrap_err()
            .contains("needs a deadline"));
    }

    #[test]
    fn data_mount_judges_the_mounts_line_and_the_tokens() {
        let mut s = spec();
        s.setup.mounts.push(
            toml::from_str(
                "device = \"/dev/vda\"\nwhere = \"/data\"\ntype = \"vfat\"\nmake-fs = true",
            )
            .unwrap(),
        );
        let subject = Subject {
            backend: "busybox",
            store_paths: &[],
        };
        let judge = |out: &str| {
            Judge::parse("data-mount /data", &s)
                .unwrap()
                .judge(&s, &subject, out, "")
        };
        let id = "0b3f1c52-5c2e-4a57-9a43-9f1ee1d7c0aa";
        let line = "/dev/vda /data vfat rw,relatime,fmask=0022 0 0";
        assert_eq!(judge(&format!("prev none\nnow {id}\n{line}\n")), Ok(()));
        assert_eq!(
            data_tokens(&format!("prev {id}\nnow x\n")),
            Some((id.to_string(), "x".to_string()))
        );
        for (out, why) in [
            (format!("prev none\nnow {id}\n"), "not mounted"),
            (
                format!("prev none\nnow {id}\n/dev/vda /data vfat ro,relatime 0 0"),
                "not read-write",
            ),
            (
                format!("prev none\nnow {id}\n/dev/vdb /data vfat rw 0 0"),
                "mounted from /dev/vdb",
            ),
            (
                format!("prev none\nnow {id}\n/dev/vda /data ext2 rw 0 0"),
                "is ext2",
            ),
            (format!("{line}\n"), "no 'prev"),
            (format!("prev none\nnow nothing\n{line}\n"), "not a boot id"),
        ] {
            let err = judge(&out).unwrap_err();
            assert!(err.contains(why), "{out}: {err}");
        }
        assert!(Judge::parse("data-mount /elsewhere", &s)
            .unwrap_err()
            .contains("/elsewhere"));
    }

    fn run(judge: &str, output: &str) -> Result<(), String> {
        run_at(judge, output, "")
    }

    fn run_at(judge: &str, output: &str, shutdown: &str) -> Result<(), String> {
        let s = spec();
        let subject = Subject {
            backend: "bonsai-init",
            store_paths: &[],
        };
        Judge::parse(judge, &s)
            .unwrap()
            .judge(&s, &subject, output, shutdown)
    }

    /// A recorded boot's verdicts, judged against the build.json recorded with it.
    fn judge_recorded(log: &str, build: &str) -> Vec<(String, Result<(), String>)> {
        let info: crate::build::BuildInfo = serde_json::from_str(build).unwrap();
        let subject = Subject {
            backend: &info.init,
            store_paths: &info.store_paths,
        };
        judge_log(&info.board, &info.profile, &subject, log).unwrap()
    }

    /// Start lines at these times (seconds) and a `now` line.
    fn starts_at(times: &[f64], now: f64) -> String {
        let mut s: String = times.iter().map(|t| format!("start {t:.2}\n")).collect();
        s.push_str(&format!("now {now:.2}\n"));
        s
    }

    /// Starts of a restarter that waits `delay(i)` ms (plus `overhead`) before restart i.
    fn restarter(n: usize, overhead: f64, delay: impl Fn(usize) -> f64) -> Vec<f64> {
        let mut t = 5.0;
        let mut v = vec![t];
        for i in 0..n - 1 {
            t += (delay(i) + overhead) / 1000.0;
            v.push(t);
        }
        v
    }

    #[test]
    fn parse_names_unknown_judges_and_services() {
        let s = spec();
        assert!(Judge::parse("backoff nope", &s)
            .unwrap_err()
            .contains("service 'nope'"));
        assert!(Judge::parse("sideways", &s)
            .unwrap_err()
            .contains("not a judge"));
        assert!(Judge::parse("on-failure crasher", &s)
            .unwrap_err()
            .contains("on-failure"));
        assert_eq!(
            Judge::parse("no-zombies 50 200", &s).unwrap(),
            Judge::NoZombies {
                orphans: 50,
                max: Some(200)
            }
        );
    }

    #[test]
    fn backoff_passes_doubling_and_fails_a_fixed_delay_or_no_cap() {
        let svc = &spec().services["crasher"];
        let good = restarter(8, 120.0, |i| expected_delay(svc, i));
        assert_eq!(run("backoff crasher", &starts_at(&good, 30.0)), Ok(()));
        // s6-supervise waits at least 1 s between starts: within the slack for 500 ms.
        let s6 = restarter(8, 0.0, |i| expected_delay(svc, i).max(1000.0));
        assert_eq!(run("backoff crasher", &starts_at(&s6, 30.0)), Ok(()));
        let fixed = restarter(12, 120.0, |_| 500.0);
        let e = run("backoff crasher", &starts_at(&fixed, 30.0)).unwrap_err();
        assert!(e.contains("restart 2 came 620 ms"), "{e}");
        let uncapped = restarter(8, 120.0, |i| 500.0 * 2f64.powi(i as i32));
        let e = run("backoff crasher", &starts_at(&uncapped, 60.0)).unwrap_err();
        assert!(e.contains("restart 4"), "{e}");
        // Recorded under busybox init on a loaded 2-core host (about 0.5 to 1 s per restart).
        let loaded = [2.95, 4.35, 6.02, 8.99, 11.52];
        assert_eq!(run("backoff crasher", &starts_at(&loaded, 12.0)), Ok(()));
        let slow_fixed = restarter(8, 900.0, |_| 500.0);
        assert!(run("backoff crasher", &starts_at(&slow_fixed, 30.0)).is_err());
        let e = run("backoff crasher", &starts_at(&good[..4], 30.0)).unwrap_err();
        assert!(e.contains("4 starts recorded"), "{e}");
        // Faster than the policy is as wrong as slower.
        let hasty = restarter(8, 0.0, |i| expected_delay(svc, i) / 2.0);
        assert!(run("backoff crasher", &starts_at(&hasty, 30.0)).is_err());
    }

    #[test]
    fn crash_count_is_tight_enough_to_fail_a_fixed_delay() {
        let svc = &spec().services["crasher"];
        let good = restarter(8, 100.0, |i| expected_delay(svc, i));
        assert_eq!(run("crash-count crasher", &starts_at(&good, 30.0)), Ok(()));
        // A restarter with a fixed 500 ms delay starts 6 times in 3 s; the policy allows 3.
        let fixed = restarter(12, 50.0, |_| 500.0);
        let e = run("crash-count crasher", &starts_at(&fixed, 30.0)).unwrap_err();
        assert!(e.contains("allows 2 to 3"), "{e}");
        // One start only: nothing restarted.
        assert!(run("crash-count crasher", &starts_at(&[5.0], 30.0)).is_err());
        // Not enough watching.
        assert!(run("crash-count crasher", &starts_at(&[5.0, 5.6], 6.0)).is_err());
    }

    #[test]
    fn reset_after_ten_seconds_up() {
        let good = "start 5.00\nexit 5.05\nstart 6.10\nexit 6.15\nstart 8.20\nexit 18.80\nstart 19.90\nnow 20.0\n";
        assert_eq!(run("reset resetter", good), Ok(()));
        // Without the reset the delay after the third run is 4000 ms.
        let unreset = good.replace("start 19.90", "start 22.90");
        let e = run("reset resetter", &unreset).unwrap_err();
        assert!(e.contains("without the reset: 4000 ms"), "{e}");
        let short = good.replace("exit 18.80", "exit 14.00");
        assert!(run("reset resetter", &short).is_err());
        let fixed = good.replace("start 8.20", "start 7.20");
        assert!(run("reset resetter", &fixed).is_err());
    }

    #[test]
    fn rate_at_the_cap() {
        let svc = &spec().services["flapper"];
        let good = restarter(9, 100.0, |i| expected_delay(svc, i));
        assert_eq!(run("rate flapper", &starts_at(&good, 30.0)), Ok(()));
        // A fixed 500 ms restarter: 120 a minute passed the old bound; the cap allows 30.
        let fixed = restarter(30, 0.0, |_| 500.0);
        let e = run("rate flapper", &starts_at(&fixed, 30.0)).unwrap_err();
        assert!(e.contains("120 restarts a minute"), "{e}");
    }

    #[test]
    fn on_failure_restarts_until_a_clean_exit() {
        let good = "start 5.0 4\nstart 5.3 4\nstart 5.8 0\nnow 8.5\n";
        assert_eq!(run("on-failure onfail", good), Ok(()));
        let again = "start 5.0 4\nstart 5.3 4\nstart 5.8 0\nstart 6.0 0\nnow 8.5\n";
        assert!(run("on-failure onfail", again)
            .unwrap_err()
            .contains("started again after exit code 0"));
        let never = "start 5.0 4\nnow 8.5\n";
        assert!(run("on-failure onfail", never).is_err());
        assert!(run(
            "on-failure onfail",
            "start 5.0 4\nstart 5.3 4\nstart 5.8 0\nnow 6.0\n"
        )
        .unwrap_err()
        .contains("watched"));
    }

    #[test]
    fn up_and_comes_back() {
        assert_eq!(run("up 2", "/run/a 12 S\n/run/b 13 R\n"), Ok(()));
        assert!(run("up 2", "/run/a 12 S\n/run/b 13 Z\n").is_err());
        assert!(run("up 2", "/run/a 12 S\n").is_err());
        let back = "killed 40 10.00\nnew 77 10.31 S\n";
        assert_eq!(run("comes-back ticker", back), Ok(()));
        assert!(run("comes-back ticker", "killed 40 10.00\nnew 40 10.31 S\n").is_err());
        assert!(run("comes-back ticker", "killed 40 10.00\n").is_err());
        assert!(run("comes-back ticker", "killed 40 10.00\nnew 77 19.0 S\n").is_err());
    }

    #[test]
    fn zombies_and_orphans() {
        let mut t = String::from("before\n");
        for i in 0..60 {
            t.push_str(&format!("proc {} S 1\n", 100 + i));
        }
        let tables = |after: &str, later: &str| {
            format!("{t}after\nproc 1 S 0\n{after}later\nproc 1 S 0\n{later}")
        };
        let good = tables("proc 50 S 1\n", "proc 50 S 1\n");
        assert_eq!(run("no-zombies 50 200", &good), Ok(()));
        // reaped within the second: passes; still there: fails, naming it
        let reaped = tables("proc 51 Z 1\n", "");
        assert_eq!(run("no-zombies 50", &reaped), Ok(()));
        let kept = tables("proc 51 Z 1\nproc 52 Z 1\n", "proc 51 Z 1\n");
        assert_eq!(
            run("no-zombies 50", &kept).unwrap_err(),
            "1 zombies of PID 1 still there a second later (pids 51)"
        );
        // a zombie of another parent is that parent's to reap
        assert_eq!(
            run("no-zombies 50", &tables("proc 53 Z 9\n", "proc 53 Z 9\n")),
            Ok(())
        );
        assert!(run("no-zombies 50", &format!("{t}after\n")).is_err());
        assert!(run("no-zombies 70", &good).unwrap_err().contains("only 60"));
        assert!(run("no-zombies 50 1", &good).is_err());
    }

    #[test]
    fn environment_is_cleared() {
        let good = "ONLY=this\nPATH=/bin\nPWD=/\nSHLVL=1\n";
        assert_eq!(run("env-clear envdump", good), Ok(()));
        let leaked = format!("{good}TERM=linux\nHOME=/\n");
        assert_eq!(
            run("env-clear envdump", &leaked),
            Err("inherited variables: HOME, TERM".into())
        );
        assert!(run("env-clear envdump", "PATH=/bin\n").is_err());
        assert!(run("env-clear envdump", "ONLY=this\nPATH=/usr/bin:/bin\n").is_err());
    }

    const MOUNTS: &str = "rootfs / rootfs rw 0 0
proc /proc proc rw,nosuid,nodev,noexec,relatime 0 0
sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
devtmpfs /dev devtmpfs rw,nosuid,size=1k,nr_inodes=1,mode=755 0 0
devpts /dev/pts devpts rw,nosuid,noexec,relatime,gid=5,mode=620,ptmxmode=000 0 0
tmpfs /dev/shm tmpfs rw,nosuid,nodev 0 0
tmpfs /run tmpfs rw,nosuid,nodev,mode=755 0 0
tmpfs /tmp tmpfs rw,nosuid,nodev 0 0
";

    #[test]
    fn mount_list() {
        assert_eq!(run("mounts", MOUNTS), Ok(()));
        let no_tmp: String = MOUNTS
            .lines()
            .filter(|l| !l.contains("/tmp"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(run("mounts", &no_tmp), Err("/tmp is not mounted".into()));
        let exec_proc = MOUNTS.replace(
            "nodev,noexec,relatime 0 0\nsysfs",
            "nodev,relatime 0 0\nsysfs",
        );
        assert!(run("mounts", &exec_proc).unwrap_err().contains("noexec"));
    }

    #[test]
    fn kill_after_the_stop_timeout_and_the_stop_signal() {
        let good = "[stubborn] x\nstubborn got TERM at 20.10\nbonsai: stopped stubborn\nstop-data 21.80 stubborn=gone\nstop-hook ticker\n";
        assert_eq!(run_at("kill-after-timeout stubborn", "", good), Ok(()));
        let early = good.replace("21.80", "20.40");
        assert!(run_at("kill-after-timeout stubborn", "", &early)
            .unwrap_err()
            .contains("before its stop timeout"));
        let alive = good.replace("stubborn=gone", "stubborn=S");
        assert!(run_at("kill-after-timeout stubborn", "", &alive).is_err());
        assert!(run_at(
            "kill-after-timeout stubborn",
            "",
            "stop-data 21.80 stubborn=gone\n"
        )
        .is_err());

        let hup = "hupper got HUP at 20.0\n";
        assert_eq!(run_at("stop-signal hupper", "", hup), Ok(()));
        assert!(
            run_at("stop-signal hupper", "", "hupper got TERM at 20.0\n")
                .unwrap_err()
                .contains("not its stop signal HUP")
        );
        assert!(run_at("stop-signal hupper", "", "").is_err());
        // runit's control/d runs after runsv's TERM: the service gets both.
        assert_eq!(
            run_at(
                "stop-signal hupper",
                "",
                "hupper got HUP at 20.0\nhupper got TERM at 20.0\n"
            ),
            Err("hupper got TERM as well as its stop signal HUP".into())
        );
    }

    #[test]
    fn pid1_and_oom() {
        let same = "exe /bin/bonsai-init\nbefore 1 0.3\nafter 1 0.3\nticker 40 S\n";
        assert_eq!(run("same-pid1", same), Ok(()));
        assert!(run(
            "same-pid1",
            &same.replace(
                "exe /bin/bonsai-init",
                "exe /nix/store/a-busybox-1.0/bin/busybox"
            )
        )
        .is_err());
        assert!(run("same-pid1", "before 1 0.3\nafter 1 0.3\n").is_err());
        assert!(run("same-pid1", &same.replace("ticker 40 S", "ticker 40 gone")).is_err());
        assert!(run("same-pid1", &same.replace("after 1 0.3", "after 1 9.9")).is_err());
        let oom = "[ 9.1] Out of memory: Killed process 77 (sh)\nticker 40 S\n";
        assert_eq!(run("oom", oom), Ok(()));
        assert!(run("oom", "ticker 40 S\n").is_err());
        assert!(run("oom", "Killed process 77 (sh)\nticker 40 gone\n").is_err());
    }

    /// PID 1 is judged against the backend the host built, and the store paths in the image:
    /// the program of that backend's package, nothing the image says of itself.
    #[test]
    fn pid1_is_the_backends_program_from_its_package_in_the_image() {
        let paths: Vec<String> = [
            "/nix/store/aaaa-busybox-1.36.1",
            "/nix/store/bbbb-busybox-static-1.35.0-4+deb12u1+b1",
            "/nix/store/cccc-runit-2.1.2",
            "/nix/store/dddd-s6-rc-0.5.4.1",
            "/nix/store/eeee-s6-2.12.0.3",
            "/nix/store/ffff-glibc-2.40",
        ]
        .map(String::from)
        .to_vec();
        let judge = |backend: &str, exe: &str| {
            let subject = Subject {
                backend,
                store_paths: &paths,
            };
            pid1(&format!("exe {exe}\n"), &subject)
        };
        let ok = [
            ("busybox", "/nix/store/aaaa-busybox-1.36.1/bin/busybox"),
            (
                "busybox",
                "/nix/store/bbbb-busybox-static-1.35.0-4+deb12u1+b1/bin/busybox",
            ),
            ("runit", "/nix/store/cccc-runit-2.1.2/bin/runit"),
            ("s6", "/nix/store/eeee-s6-2.12.0.3/bin/s6-svscan"),
            ("bonsai-init", "/bin/bonsai-init"),
        ];
        for (backend, exe) in ok {
            assert_eq!(judge(backend, exe), Ok(()), "{backend} {exe}");
        }
        let wrong = [
            // another backend's init, a shell that never exec'd, a program of another package
            ("runit", "/nix/store/aaaa-busybox-1.36.1/bin/busybox"),
            ("s6", "/nix/store/aaaa-busybox-1.36.1/bin/busybox"),
            ("runit", "/nix/store/cccc-runit-2.1.2/bin/runit-init"),
            ("s6", "/nix/store/dddd-s6-rc-0.5.4.1/bin/s6-svscan"),
            ("busybox", "/nix/store/ffff-glibc-2.40/bin/busybox"),
            ("bonsai-init", "/nix/store/aaaa-busybox-1.36.1/bin/busybox"),
            ("busybox", "/bin/bonsai-init"),
        ];
        for (backend, exe) in wrong {
            assert!(judge(backend, exe).is_err(), "{backend} {exe} passed");
        }
        let none = Subject {
            backend: "runit",
            store_paths: &paths[..2],
        };
        let e = pid1("exe /nix/store/cccc-runit-2.1.2/bin/runit\n", &none).unwrap_err();
        assert_eq!(e, "the image holds no runit store path (backend runit)");
    }

    /// A real boot of the conformance suite under busybox init, recorded with its build.json
    /// (see testdata/README): every judged row passes on it.
    #[test]
    fn a_recorded_good_boot_passes() {
        let verdicts = judge_recorded(
            include_str!("../testdata/conformance-busybox.serial.log"),
            include_str!("../testdata/conformance-busybox.build.json"),
        );
        assert!(verdicts.len() >= 11, "{verdicts:?}");
        for (name, v) in verdicts {
            assert_eq!(v, Ok(()), "{name}");
        }
    }

    /// Recorded boots of deliberately broken busybox backends (testdata/README.md): each
    /// row that a fault breaks fails on the host, text-compared rows included.
    #[test]
    fn recorded_broken_boots_fail_the_rows_they_break() {
        let broken = include_str!("../testdata/conformance-busybox-broken.serial.log");
        let cases: [(&str, &str, &[&str]); 3] = [
            (
                broken,
                include_str!("../testdata/conformance-busybox-broken.build.json"),
                &[
                    "the restart delay doubles up to its cap",
                    "restart = on-failure stops after a clean exit",
                    "the mount list",
                    "a service's environment is cleared",
                    "the stop signal is the configured one (HUP)",
                    "a TERM-ignoring service is KILLed after its stop timeout",
                ],
            ),
            (
                include_str!("../testdata/conformance-busybox-no-reset.serial.log"),
                include_str!("../testdata/conformance-busybox-no-reset.build.json"),
                &["a crashed service's delay resets after 10 s up"],
            ),
            (
                include_str!("../testdata/conformance-s6-no-exec-init.serial.log"),
                include_str!("../testdata/conformance-s6-no-exec-init.build.json"),
                &["PID 1 is the backend's init"],
            ),
        ];
        for (log, build, failing) in cases {
            let verdicts = judge_recorded(log, build);
            for name in failing {
                let v = verdicts.iter().find(|(n, _)| n == name).map(|(_, v)| v);
                assert!(matches!(v, Some(Err(_))), "{name} did not fail: {v:?}");
            }
        }
        // `restart = never` ignored: the text-compared count is not 1.
        let cfg = crate::config::Config::new(&crate::project_root());
        let checks = crate::build::all_checks(
            &cfg.load_board("qemu-x86_64").unwrap(),
            &cfg.load_profile("conformance").unwrap(),
        );
        let i = checks
            .iter()
            .position(|c| c.name == "restart = never runs once")
            .unwrap();
        let (_, outputs) = outputs_from_log(broken);
        assert_ne!(outputs[&(i + 1)].1.trim(), "1");
    }
}
