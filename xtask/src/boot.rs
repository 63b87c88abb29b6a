//! `cargo xtask boot --board <b> [--check]`: boot the built image in QEMU. Interactive by
//! default (serial console on the terminal, Ctrl-A X quits); `--check` boots headless, runs
//! the checks baked into the image and judges the console. The QEMU command comes from the
//! board file alone, through the `qemu` crate, for every caller.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;

use qemu::{Accel, Check, Event, Expect, QemuSpec, UserNet};

use crate::build::{read_info, Build, BuildInfo};
use crate::config::{Board, Config, INITS};
use crate::nix::{PackageSource, NIXPKGS_ENV};
use crate::{host, project_root, ui};

#[derive(Args, Debug)]
pub struct Boot {
    /// Board to boot
    #[arg(long, default_value = "qemu-x86_64")]
    pub board: String,
    /// Profile (rebuilds when out/<board> holds another)
    #[arg(long)]
    pub profile: Option<String>,
    /// Init backend (rebuilds when out/<board> holds another)
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(INITS))]
    pub init: Option<String>,
    /// Boot headless, run the checks, exit 0 only if every one passed
    #[arg(long)]
    pub check: bool,
    /// Seconds to wait for the guest (default: the board's qemu.boot-timeout)
    #[arg(long)]
    pub timeout: Option<u64>,
    /// With --check: write out/<board>/boot.svg and boot.json (a boot timeline)
    #[arg(long, requires = "check")]
    pub chart: bool,
    /// Print the QEMU command line and exit
    #[arg(long)]
    pub print: bool,
    /// Show every console line while checking (also with the global -v)
    #[arg(long)]
    pub verbose: bool,
    /// Boot headless with the SSH port forwarded to 127.0.0.1 and log in (profiles with authorized-keys)
    #[arg(long)]
    pub ssh: bool,
    /// With --ssh: run this command instead of an interactive session, print its output
    #[arg(long, requires = "ssh")]
    pub ssh_command: Option<String>,
    /// Boot out/<board>/disk.img through the board's firmware (UEFI and systemd-boot) instead
    /// of QEMU's -kernel; the disk is written first when missing or older than the build
    #[arg(long, conflicts_with = "ssh")]
    pub disk: bool,
    /// Boot the image in this folder instead of out/<board> (never rebuilt)
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Build from this Nixpkgs (a path or a flake reference) when a build is needed; also
    /// settable with BONSAI_NIXPKGS. Without it, the package source of the existing build
    #[arg(long, conflicts_with = "out")]
    pub nixpkgs: Option<String>,
}

/// The outcome of a check boot.
pub struct CheckOutcome {
    pub report: qemu::Report,
    pub log: PathBuf,
}

impl Boot {
    pub fn run(self) -> Result<()> {
        let root = project_root();
        let cfg = Config::new(&root);
        let board = cfg.load_board(&self.board)?;
        let (out, info) = match &self.out {
            Some(dir) => {
                let info = read_info(dir).with_context(|| {
                    format!(
                        "{} holds no build.json; is it a bonsai output folder?",
                        dir.display()
                    )
                })?;
                (dir.clone(), info)
            }
            None => {
                let out = crate::out_root().join(&board.name);
                let info = self.ensure_built(&root, &board, &out)?;
                (out, info)
            }
        };
        let mut spec = qemu_spec(&board, &out, &info, None)?;
        if self.disk {
            crate::image::ensure_disk(&root, &board, &out, &info)?;
            let run = crate::image::RunDisk::fresh(&board, &out)?;
            run.apply(&mut spec);
        }
        if self.print {
            println!("{}", spec.command_line(qemu::Mode::Interactive));
            return Ok(());
        }
        host::ensure_program(&board.qemu.binary, board.arch.qemu_package())?;
        if self.ssh {
            let key = info.ssh_key.clone().with_context(|| {
                format!("profile {} has no authorized-keys = \"auto\"; --ssh needs bonsai's key (try --profile ssh)", info.profile)
            })?;
            let out_text =
                crate::ssh::session(&board, &out, &info, &key, self.ssh_command.as_deref())?;
            print!("{out_text}");
            return Ok(());
        }
        if !self.check {
            ui::step(format!("boot {} (Ctrl-A X quits QEMU)", board.name));
            qemu::boot_interactive(&spec).map_err(|e| anyhow::anyhow!("{e}"))?;
            return Ok(());
        }
        if !self.disk {
            apply_test_machine(&mut spec, &out, &info, true)?;
        }
        let timeout = Duration::from_secs(self.timeout.unwrap_or(board.qemu.boot_timeout));
        let verbose = self.verbose || ui::level() == ui::Level::Verbose;
        let outcome = check(&board, &out, &info, &spec, timeout, verbose)?;
        let r = &outcome.report;
        if self.chart {
            let log = std::fs::read_to_string(&outcome.log).unwrap_or_default();
            let c = crate::chart::from_log(
                &log,
                &board.name,
                &info.profile,
                &info.init,
                r.ready_uptime,
                r.services_up,
            );
            crate::chart::write(&out, &c)?;
            ui::step(format!(
                "boot chart: {}",
                out.join("boot.svg")
                    .strip_prefix(&root)
                    .unwrap_or(&out)
                    .display()
            ));
        }
        println!(
            "check passed: {} ({}, init {}): ready at {:.2} s guest uptime, {}/{} checks, {:.1} s wall, log {}",
            board.name,
            info.profile,
            info.init,
            r.ready_uptime,
            r.checks.len(),
            r.checks.len(),
            r.wall.as_secs_f64(),
            outcome.log.strip_prefix(&root).unwrap_or(&outcome.log).display()
        );
        Ok(())
    }

    /// Builds first when nothing is built or the inputs changed (board, profile, init, ...).
    /// The output's bytes are not re-verified here: a damaged image is the check's to catch.
    fn ensure_built(&self, root: &Path, board: &Board, out: &Path) -> Result<BuildInfo> {
        let cfg = Config::new(root);
        let info = read_info(out);
        // Without --profile/--init, boot what was built last (if its inputs are unchanged).
        let profile_name = self
            .profile
            .clone()
            .or_else(|| info.as_ref().map(|i| i.profile.clone()))
            .unwrap_or_else(|| board.profile.clone());
        let profile = cfg.load_profile(&profile_name)?;
        let init = match (&self.init, &info) {
            (Some(i), _) => i.clone(),
            (None, Some(i))
                if self.profile.is_none()
                    || self.profile.as_deref() == Some(i.profile.as_str()) =>
            {
                i.init.clone()
            }
            _ => profile.init.clone(),
        };
        // The package source asked for, else the one the existing output was built from: an
        // output built from Nixpkgs is never replaced by a build from the offline set unasked.
        let asked = match (&self.nixpkgs, std::env::var(NIXPKGS_ENV)) {
            (None, Err(_)) => None,
            (r, _) => Some(PackageSource::from_request(r.as_deref())?),
        };
        let built_from = info.as_ref().map(recorded_source);
        let source = asked
            .clone()
            .or_else(|| built_from.clone())
            .unwrap_or(PackageSource::Offline);
        let epoch = crate::build::source_date_epoch(root)?;
        let secrets = crate::hygiene::load_secrets(root, &profile)?;
        // An image built with an update key (cargo xtask bundle) is booted as it is.
        let update_key = info.as_ref().and_then(|i| i.update_key.clone());
        let fp = crate::build::fingerprint(
            root,
            board,
            &profile,
            &init,
            &source,
            epoch,
            &secrets,
            update_key.as_deref(),
        )?;
        let why = match &info {
            None => Some("nothing is built yet".to_string()),
            Some(_) if built_from.as_ref() != Some(&source) => Some(format!(
                "{} was built from {}; asked for {}",
                out.strip_prefix(root).unwrap_or(out).display(),
                built_from
                    .as_ref()
                    .map_or("?".into(), PackageSource::describe),
                source.describe()
            )),
            Some(i) if fp.as_deref() != Some(i.fingerprint.as_str()) => Some(format!(
                "its inputs changed (built: profile {}, init {}; wanted: profile {}, init {init})",
                i.profile, i.init, profile.name
            )),
            Some(_) => None,
        };
        match why {
            None => Ok(info.unwrap()),
            Some(why) => {
                ui::step(format!(
                    "building {} first from {} ({why})",
                    self.board,
                    source.describe()
                ));
                let built = Build {
                    board: self.board.clone(),
                    profile: Some(profile.name.clone()),
                    init: Some(init),
                    nixpkgs: source.nixpkgs_ref(),
                    nested: true,
                    update_key,
                    ..Build::default()
                }
                .run()?;
                Ok(built.info)
            }
        }
    }
}

/// The package source an output was built from, by its build.json.
pub fn recorded_source(info: &BuildInfo) -> PackageSource {
    match (&info.nix.nixpkgs, info.source.strip_prefix("nixpkgs ")) {
        (Some(r), _) => PackageSource::Nixpkgs(r.clone()),
        (None, Some(r)) => PackageSource::Nixpkgs(r.to_string()),
        (None, None) => PackageSource::Offline,
    }
}

/// The board's kernel command line: its console and `[kernel] cmdline`.
pub fn board_cmdline(board: &Board) -> String {
    let mut c = format!("console={}", board.console);
    if !board.kernel.cmdline.trim().is_empty() {
        c.push(' ');
        c.push_str(board.kernel.cmdline.trim());
    }
    c
}

/// The QEMU invocation for a board's built image: the single source of truth.
pub fn qemu_spec(
    board: &Board,
    out: &Path,
    info: &BuildInfo,
    host_forward: Option<(u16, u16)>,
) -> Result<QemuSpec> {
    let kernel = out.join(&info.kernel);
    let initrd = out.join(&info.initramfs);
    let dtb = info.dtb.as_ref().map(|d| out.join(d));
    for f in [&kernel, &initrd].into_iter().chain(dtb.as_ref()) {
        if !f.is_file() {
            bail!(
                "{} is missing; run cargo xtask build --board {}",
                f.display(),
                board.name
            );
        }
    }
    let append = board_cmdline(board);
    Ok(QemuSpec {
        binary: board.qemu.binary.clone(),
        install_hint: Some(format!("apt-get install {}", board.arch.qemu_package())),
        machine: board.qemu.machine.clone(),
        cpu: board.qemu.cpu.clone(),
        memory: board.qemu.memory.clone(),
        smp: board.qemu.smp,
        kernel,
        initrd,
        dtb,
        append,
        accel: Accel::detect(),
        network: board.qemu.net_device.as_ref().map(|d| UserNet {
            device: d.clone(),
            host_forwards: host_forward.into_iter().collect(),
            guest_forwards: Vec::new(),
            unrestricted: false,
        }),
        drives: Vec::new(),
        firmware: None,
        extra_args: board.qemu.extra_args.clone(),
        qmp: None,
    })
}

/// The test disk of a check boot: `<out>/test-disk.img`.
pub fn test_disk_path(out: &Path) -> PathBuf {
    out.join("test-disk.img")
}

/// Adds the profile's `[test-machine]` to a check boot's QEMU: the extra devices, and the test
/// disk as the first virtio drive. `fresh` makes the disk empty (all zero, sparse) first; a
/// later boot of the same series keeps what the earlier ones wrote.
pub fn apply_test_machine(
    spec: &mut QemuSpec,
    out: &Path,
    info: &BuildInfo,
    fresh: bool,
) -> Result<()> {
    let tm = &info.test_machine;
    if let Some(bytes) = tm.disk_bytes(&info.profile)? {
        let path = test_disk_path(out);
        if fresh || !path.is_file() {
            let _ = std::fs::remove_file(&path);
            let f = std::fs::File::create(&path)
                .with_context(|| format!("creating the test disk {}", path.display()))?;
            f.set_len(bytes)
                .with_context(|| format!("sizing the test disk {}", path.display()))?;
        }
        spec.drives.insert(0, path);
    }
    spec.extra_args.extend(tm.qemu_args.iter().cloned());
    let slots = tm.hotplug_slots.unwrap_or(0);
    let hotplug_disk = tm.hotplug_disk_bytes(&info.profile)?;
    if slots > 0 {
        for i in 1..=slots {
            spec.extra_args.extend([
                "-device".to_string(),
                format!("pcie-root-port,id=hp{i},chassis={i},slot={i}"),
            ]);
        }
        // q35 hands its root ports' hotplug to ACPI by default (_OSC then denies the kernel
        // native PCIe hotplug, and the kernel has no ACPI hotplug driver): native, as on virt.
        if spec.machine == "q35" {
            spec.extra_args.extend([
                "-global".to_string(),
                "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off".to_string(),
            ]);
        }
        let sock = out.join("qmp.sock");
        let _ = std::fs::remove_file(&sock);
        spec.qmp = Some(sock);
    }
    if let Some(bytes) = hotplug_disk {
        let path = out.join("hotplug-disk.img");
        if fresh || !path.is_file() {
            let _ = std::fs::remove_file(&path);
            let f = std::fs::File::create(&path)
                .with_context(|| format!("creating the hotplug disk {}", path.display()))?;
            f.set_len(bytes)
                .with_context(|| format!("sizing the hotplug disk {}", path.display()))?;
        }
        spec.extra_args.extend([
            "-drive".to_string(),
            format!(
                "if=none,id=hpdisk,format=raw,file={}",
                path.display().to_string().replace(',', ",,")
            ),
        ]);
    }
    if tm.net_restrict == Some(false) {
        if let Some(n) = spec.network.as_mut() {
            n.unrestricted = true;
        }
    }
    Ok(())
}

/// Boots headless, runs the image's checks and judges the console; an error if anything failed.
pub fn check(
    board: &Board,
    out: &Path,
    info: &BuildInfo,
    spec: &QemuSpec,
    timeout: Duration,
    verbose: bool,
) -> Result<CheckOutcome> {
    let run = check_run(board, out, info, spec, timeout, verbose);
    match (run.report, run.failure) {
        (Some(report), None) => Ok(CheckOutcome {
            report,
            log: run.log,
        }),
        (_, failure) => Err(anyhow::anyhow!(
            "boot check of {} failed: {} (serial log: {})",
            board.name,
            failure.unwrap_or_default(),
            run.log.display()
        )),
    }
}

/// What one check boot found, failed or not.
pub struct CheckRun {
    /// The guest's report, when it got far enough to send one.
    pub report: Option<qemu::Report>,
    /// Why the run failed, on one line; `None` when it passed.
    pub failure: Option<String>,
    /// Per check: name and whether it passed (empty when the guest never ran them).
    pub results: Vec<(String, bool)>,
    /// Host-side judgements on the console: (what, passed).
    pub console: Vec<(String, bool)>,
    pub log: PathBuf,
    /// Guest uptime when the kernel started /init, from its console timestamps.
    pub init_started: Option<f64>,
}

/// The image's checks as the console protocol runs them.
pub fn protocol_checks(info: &BuildInfo) -> Vec<Check> {
    info.checks
        .iter()
        .map(|c| Check {
            name: c.name.clone(),
            run: c.run.clone(),
            expect: match (&c.expect, &c.contains) {
                (Some(e), _) => Some(Expect::Equals(e.clone())),
                (None, Some(c)) => Some(Expect::Contains(c.clone())),
                (None, None) => None,
            },
            exit: c.exit,
        })
        .collect()
}

/// Boots headless, runs the image's checks and judges the console; never fails itself.
pub fn check_run(
    board: &Board,
    out: &Path,
    info: &BuildInfo,
    spec: &QemuSpec,
    timeout: Duration,
    verbose: bool,
) -> CheckRun {
    let checks = protocol_checks(info);
    let nonce = qemu::protocol::new_nonce();
    let log = out.join("serial.log");
    // Through firmware, the disk's entries carry the command line: this boot's parameters go
    // into the disk it boots (a copy of the image, never disk.img itself).
    if spec.firmware.is_some() {
        let params = crate::image::firmware_boot_params(spec, &nonce);
        if let Err(e) = spec
            .boot_disk()
            .context("a firmware boot has no disk")
            .and_then(|d| crate::image::set_boot_options(d, &params, info.source_date_epoch))
        {
            return CheckRun {
                report: None,
                failure: Some(format!("{e:#}")),
                results: Vec::new(),
                console: Vec::new(),
                log,
                init_started: None,
            };
        }
    }
    ui::step(format!(
        "boot {} ({}, init {}) headless under {} and run {} checks (timeout {} s)",
        board.name,
        info.profile,
        info.init,
        spec.accel.as_str().to_uppercase(),
        checks.len(),
        timeout.as_secs()
    ));
    let mut progress = |e: Event| match e {
        Event::Started { command } => {
            if verbose {
                ui::detail(command)
            }
        }
        Event::Ready { uptime } => ui::detail(format!("ready at {uptime:.2} s guest uptime")),
        Event::CheckDone { name, passed } => {
            ui::detail(format!("{} {name}", if passed { "ok  " } else { "FAIL" }))
        }
        Event::Line(l) => {
            if verbose {
                eprintln!("    | {l}")
            }
        }
    };
    let result = qemu::boot_check(spec, &nonce, &checks, timeout, &log, &mut progress);
    let (report, mut failure) = match result {
        Ok(r) => (Some(r), None),
        Err(qemu::Failure::ChecksFailed { report, .. }) => {
            let failed: Vec<String> = report
                .checks
                .iter()
                .filter(|c| !c.passed)
                .map(|c| format!("{} ({})", c.name, c.reason.clone().unwrap_or_default()))
                .collect();
            (
                Some(*report),
                Some(format!("checks failed: {}", failed.join("; "))),
            )
        }
        Err(e) => (None, Some(e.to_string())),
    };
    // Checks with a host-side judge: their guest part printed raw data, judged here.
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let mut report = report;
    if let Some(r) = report.as_mut() {
        // A report comes with no failure, or with ChecksFailed: the verdict is the checks'.
        failure = None;
        let passed_in_guest: Vec<bool> = r.checks.iter().map(|c| c.passed).collect();
        if let Err(e) = crate::judge::apply(info, r, &text, &nonce) {
            failure = Some(e);
        }
        // A check the guest ran fine that the host's judge failed: said with its reason, per
        // boot (a conformance run of several boots reports only the first failure).
        for (c, was) in r.checks.iter().zip(passed_in_guest) {
            if was && !c.passed {
                ui::detail(format!(
                    "FAIL {} (judged on the host): {}",
                    c.name,
                    c.reason.clone().unwrap_or_default()
                ));
            }
        }
        if failure.is_none() {
            let failed: Vec<String> = r
                .checks
                .iter()
                .filter(|c| !c.passed)
                .map(|c| format!("{} ({})", c.name, c.reason.clone().unwrap_or_default()))
                .collect();
            if !failed.is_empty() {
                failure = Some(format!("checks failed: {}", failed.join("; ")));
            }
        }
    }
    let results = report
        .as_ref()
        .map(|r| {
            r.checks
                .iter()
                .map(|c| (c.name.clone(), c.passed))
                .collect()
        })
        .unwrap_or_default();

    // What the console shows besides the markers: service output, and the stop hooks that
    // run after DONE while the guest shuts down, in order.
    let mut console = Vec::new();
    for want in &info.console_expect {
        let ok = text.lines().any(|l| l.trim_end().ends_with(want.as_str()));
        console.push((format!("console shows '{want}'"), ok));
    }
    if !info.shutdown_expect.is_empty() {
        let after_done = text
            .split(&format!("BONSAI-DONE {nonce}"))
            .nth(1)
            .unwrap_or("");
        console.push(judge_shutdown(after_done, &info.shutdown_expect));
    }
    if let Some(r) = &report {
        if report.is_some() && failure.is_none() {
            console.push((
                "the guest powers off by itself".into(),
                !r.killed_after_done,
            ));
        }
    }
    if failure.is_none() {
        if let Some((what, _)) = console.iter().find(|(_, ok)| !ok) {
            failure = Some(format!("not seen: {what}"));
        }
    }
    let init_started = text
        .lines()
        .find(|l| l.contains("Run /init as init process"))
        .and_then(|l| {
            let inner = l.split('[').nth(1)?.split(']').next()?;
            inner.trim().parse::<f64>().ok()
        });
    CheckRun {
        report,
        failure,
        results,
        console,
        log,
        init_started,
    }
}

/// The stop hooks' lines after the checks are done: every line that ends with one of
/// `expected`, or that shows any `stop-hook <name>`, in console order. They pass only when
/// they are exactly `expected`: each once, in that order, nothing else.
pub fn judge_shutdown(after_done: &str, expected: &[String]) -> (String, bool) {
    let seen: Vec<String> = after_done
        .lines()
        .map(str::trim_end)
        .filter_map(|l| {
            if let Some(want) = expected.iter().find(|w| l.ends_with(w.as_str())) {
                return Some(want.clone());
            }
            let at = l.rfind("stop-hook ")?;
            Some(l[at..].to_string())
        })
        .collect();
    let ok = seen == expected;
    let what = if ok {
        format!(
            "shutdown runs each stop hook once, in order ({})",
            expected.join(", ")
        )
    } else {
        format!(
            "shutdown runs each stop hook once, in order ({}); the console showed ({})",
            expected.join(", "),
            seen.join(", ")
        )
    };
    (what, ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judge(log: &str) -> bool {
        let expected = [
            "stop-hook worker".to_string(),
            "stop-hook ticker".to_string(),
        ];
        judge_shutdown(&log.replace('\n', "\r\n"), &expected).1
    }

    #[test]
    fn stop_hooks_pass_once_each_in_order() {
        assert!(judge(
            "bonsai-init: stopping services\nstop-hook worker\n[ticker] tick\nstop-hook ticker\nreboot: Power down\n"
        ));
        // A kernel message may share the line; the hook's text ends it.
        assert!(judge(
            "[    9.1] random: x stop-hook worker\nstop-hook ticker\n"
        ));
    }

    #[test]
    fn a_stop_hook_that_runs_twice_fails() {
        assert!(!judge(
            "stop-hook worker\nstop-hook ticker\nstop-hook worker\nstop-hook ticker\n"
        ));
        assert!(!judge(
            "stop-hook worker\nstop-hook worker\nstop-hook ticker\n"
        ));
    }

    #[test]
    fn a_missing_stop_hook_fails() {
        assert!(!judge("stop-hook worker\n"));
        assert!(!judge(""));
    }

    #[test]
    fn stop_hooks_in_the_wrong_order_fail() {
        assert!(!judge("stop-hook ticker\nstop-hook worker\n"));
    }

    #[test]
    fn an_unexpected_stop_hook_fails() {
        let (what, ok) = judge_shutdown(
            "stop-hook worker\nstop-hook other\nstop-hook ticker\n",
            &[
                "stop-hook worker".to_string(),
                "stop-hook ticker".to_string(),
            ],
        );
        assert!(!ok);
        assert!(
            what.ends_with("(stop-hook worker, stop-hook other, stop-hook ticker)"),
            "{what}"
        );
    }
}
