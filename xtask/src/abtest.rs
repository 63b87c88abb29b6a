//! `cargo xtask ab-test --board <b>`: A/B slots, trial boots and rollback, proven in QEMU
//! through the board's firmware (OVMF or AAVMF, then systemd-boot).
//!
//! It builds the board's profile as a good release and as three bad ones (the test faults
//! `init-exits`, `health-fails` and `hang`: a kernel panic, a failed health check, a hang the
//! watchdog ends), writes slot A, and boots the disk again and again: with `-no-reboot` every
//! reset of the machine ends QEMU, so each boot is one launch on the same disk and variable
//! store. Between scenarios the host writes slot B, as an update would (the slot not running).
//!
//! Every launch is judged on the host from raw data: the slot in the kernel's own command line
//! (`bonsai.slot=`), the guest's `BONSAI-SLOT`, `BONSAI-HEALTH`, `BONSAI-BLESSED`,
//! `BONSAI-HEALTH-REBOOT` and `BONSAI-NO-GOOD-SLOT` lines with this launch's nonce, how the
//! launch ended (checks done, panic, reset), and the entry names on the disk afterwards
//! (systemd-boot's counters, as the boot loader and the running system left them).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::build::{Build, BuildInfo};
use crate::config::{Board, Config, INITS};
use crate::image::{DiskPlace, RunDisk};
use crate::{project_root, ui};

#[derive(Args, Debug, Default)]
pub struct AbTest {
    /// Board to test (one with a [disk] table)
    #[arg(long, default_value = "qemu-x86_64")]
    pub board: String,
    /// Profile instead of the board's default
    #[arg(long)]
    pub profile: Option<String>,
    /// Init backend instead of the profile's choice
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(INITS))]
    pub init: Option<String>,
    /// Print the scenario x result matrix as JSON on stdout (schemas/ab-test.schema.json)
    #[arg(long)]
    pub json: bool,
    /// Only these scenarios (comma-separated names; see the matrix)
    #[arg(long)]
    pub only: Option<String>,
    /// Working folder: releases, disks and each launch's serial log (default: out/ab-test/<board>)
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Show every console line
    #[arg(long)]
    pub verbose: bool,
}

/// The releases the scenarios boot: the profile as built, and the same with a test fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Release {
    Good,
    InitExits,
    HealthFails,
    Hang,
}

impl Release {
    fn name(self) -> &'static str {
        match self {
            Release::Good => "good",
            Release::InitExits => "init-exits",
            Release::HealthFails => "health-fails",
            Release::Hang => "hang",
        }
    }
    /// The test fault it is built with (`rootfs::faults`).
    fn fault(self) -> &'static str {
        match self {
            Release::Good => "",
            other => other.name(),
        }
    }
    /// The release name in a slot's entry: `r1` in slot A, `r2…` for an update.
    fn version(self, update: bool) -> String {
        let base = if update { "r2" } else { "r1" };
        match self {
            Release::Good => base.into(),
            other => format!("{base}-{}", other.name()),
        }
    }
}

/// What one launch must show.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// A trial of `slot` passes its health checks and is blessed; the checks run.
    Blesses(&'static str),
    /// `slot`, already blessed, boots and is healthy; the checks run.
    Stays(&'static str),
    /// The kernel of `slot` panics (its /init exits) before userland.
    Panics(&'static str),
    /// A trial of `slot` fails a health check and reboots at once.
    HealthReboots(&'static str),
    /// A trial of `slot` hangs; the watchdog resets the machine.
    Hangs(&'static str),
    /// `slot` boots after `from` used up its tries, and says so with `from`'s version.
    RolledBack {
        slot: &'static str,
        from: &'static str,
        version: String,
    },
    /// The last try of the last slot fails its health checks: it stays up, unblessed.
    NoGoodSlot(&'static str),
}

impl Expect {
    fn slot(&self) -> &'static str {
        match self {
            Expect::Blesses(s)
            | Expect::Stays(s)
            | Expect::Panics(s)
            | Expect::HealthReboots(s)
            | Expect::Hangs(s)
            | Expect::NoGoodSlot(s) => s,
            Expect::RolledBack { slot, .. } => slot,
        }
    }
    fn describe(&self) -> String {
        match self {
            Expect::Blesses(s) => format!("slot {s} on trial, healthy, blessed"),
            Expect::Stays(s) => format!("slot {s} blessed, boots again"),
            Expect::Panics(s) => format!("slot {s} panics"),
            Expect::HealthReboots(s) => format!("slot {s} fails its health check, reboots"),
            Expect::Hangs(s) => format!("slot {s} hangs, watchdog reset"),
            Expect::RolledBack { slot, from, .. } => {
                format!("slot {slot} again, reports the rollback from {from}")
            }
            Expect::NoGoodSlot(s) => format!("slot {s} last try failed, stays up"),
        }
    }
}

/// How a launch ended, from the console protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Ending {
    /// The checks ran to the done marker (and passed).
    Done,
    /// The done marker came but checks failed.
    ChecksFailed,
    /// The kernel panicked.
    Panic,
    /// QEMU exited (the machine reset) before the done marker.
    Reset,
    /// Nothing ended it within the timeout.
    Timeout,
}

#[derive(Debug, Clone, Serialize)]
struct SlotSeen {
    slot: String,
    /// Its entry file as the running system found it on the ESP.
    entry: String,
    /// `trial`, `blessed`, `bad` (no tries left) or `missing`.
    state: String,
}

#[derive(Debug, Clone, Serialize)]
struct HealthSeen {
    name: String,
    /// `pass` or `fail`.
    verdict: String,
}

/// What the host saw in one launch.
#[derive(Debug, Clone, Serialize)]
struct Launch {
    n: usize,
    expected: String,
    /// `bonsai.slot=` of the kernel's own command line, as it printed it.
    kernel_slot: Option<String>,
    /// `BONSAI-SLOT`: what the running system found.
    slot: Option<SlotSeen>,
    /// `BONSAI-HEALTH`: each check's verdict.
    health: Vec<HealthSeen>,
    blessed: bool,
    health_reboot: bool,
    no_good_slot: bool,
    /// The guest's rollback line, if it printed one.
    rollback: Option<String>,
    /// The petter's line: not healthy at the trial deadline.
    watchdog: bool,
    ending: Ending,
    /// Host seconds from QEMU's start to the ready marker, and to the launch's end.
    ready_s: Option<f64>,
    wall_s: f64,
    /// Bonsai entry files on the disk after the launch.
    entries_after: Vec<String>,
    log: PathBuf,
    problems: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct ScenarioResult {
    pub name: String,
    description: String,
    result: &'static str,
    launches: Vec<Launch>,
    problems: Vec<String>,
    /// From the bad release's first launch to the old slot's ready marker (rollbacks only).
    pub rollback_s: Option<f64>,
}

impl ScenarioResult {
    pub fn passed(&self) -> bool {
        self.result == "pass"
    }
    pub fn launch_count(&self) -> usize {
        self.launches.len()
    }
}

/// Every scenario's result, as printed and as `--json` writes it.
#[derive(Debug, Serialize)]
pub struct Matrix {
    pub board: String,
    pub profile: String,
    pub init: String,
    pub tries: u32,
    pub scenarios: Vec<ScenarioResult>,
}

/// The rollback scenarios (the bench times them).
pub const ROLLBACKS: &[&str] = &[
    "b-init-panics-rolls-back",
    "b-health-fails-rolls-back",
    "b-hangs-rolls-back",
];

/// One scenario: where its disk starts, what the host writes into slot B, and the launches.
struct Scenario {
    name: &'static str,
    description: &'static str,
    /// Slot A's release on a fresh disk, or `None` to start from the first scenario's disk.
    fresh: Option<Release>,
    /// The release the host writes into slot B before the first launch.
    update: Option<Release>,
    launches: Vec<(Expect, Vec<String>)>,
    rollback: bool,
}

/// The entry of a trial of `slot` after `used` boots of its `tries`. Past its tries,
/// systemd-boot still counts the boots done (`+0-3` becomes `+0-4`).
fn entry(slot: &str, tries: u32, used: u32) -> String {
    format!("bonsai-{slot}+{}-{used}.conf", tries.saturating_sub(used))
}

fn blessed(slot: &str) -> String {
    format!("bonsai-{slot}.conf")
}

/// The scenarios, with the entry names expected after each launch, for `t` tries.
fn scenarios(t: u32) -> Vec<Scenario> {
    let a = blessed("a");
    let bad_b = |rel: Release, expect: fn(&'static str) -> Expect| {
        let mut l: Vec<(Expect, Vec<String>)> = (1..=t)
            .map(|k| (expect("b"), vec![a.clone(), entry("b", t, k)]))
            .collect();
        l.push((
            Expect::RolledBack {
                slot: "a",
                from: "b",
                version: rel.version(true),
            },
            vec![a.clone(), entry("b", t, t)],
        ));
        l
    };
    let mut all_bad: Vec<(Expect, Vec<String>)> = (1..t)
        .map(|k| (Expect::HealthReboots("a"), vec![entry("a", t, k)]))
        .collect();
    all_bad.push((Expect::NoGoodSlot("a"), vec![entry("a", t, t)]));
    all_bad.push((Expect::NoGoodSlot("a"), vec![entry("a", t, t + 1)]));
    vec![
        Scenario {
            name: "fresh-a-blessed",
            description: "a fresh image boots slot A as a trial and blesses it; the next boot stays on A",
            fresh: Some(Release::Good),
            update: None,
            launches: vec![
                (Expect::Blesses("a"), vec![a.clone()]),
                (Expect::Stays("a"), vec![a.clone()]),
            ],
            rollback: false,
        },
        Scenario {
            name: "update-b-blessed",
            description: "a new release in slot B boots as a trial, passes and is blessed; the next boot stays on B",
            fresh: None,
            update: Some(Release::Good),
            launches: vec![
                (Expect::Blesses("b"), vec![a.clone(), blessed("b")]),
                (Expect::Stays("b"), vec![a.clone(), blessed("b")]),
            ],
            rollback: false,
        },
        Scenario {
            name: "b-init-panics-rolls-back",
            description: "a release in slot B whose init panics uses up its tries; slot A boots and reports the rollback",
            fresh: None,
            update: Some(Release::InitExits),
            launches: bad_b(Release::InitExits, Expect::Panics),
            rollback: true,
        },
        Scenario {
            name: "b-health-fails-rolls-back",
            description: "a release in slot B whose health check fails reboots at once until its tries are used up; slot A boots and reports the rollback",
            fresh: None,
            update: Some(Release::HealthFails),
            launches: bad_b(Release::HealthFails, Expect::HealthReboots),
            rollback: true,
        },
        Scenario {
            name: "b-hangs-rolls-back",
            description: "a release in slot B that hangs is reset by the watchdog until its tries are used up; slot A boots and reports the rollback",
            fresh: None,
            update: Some(Release::Hang),
            launches: bad_b(Release::Hang, Expect::Hangs),
            rollback: true,
        },
        Scenario {
            name: "all-slots-bad-stays-up",
            description: "the only slot fails its health check on every try: its last try stays up, unblessed, and so does every boot after it (no reboot loop)",
            fresh: Some(Release::HealthFails),
            update: None,
            launches: all_bad,
            rollback: false,
        },
    ]
}

impl AbTest {
    pub fn run(self) -> Result<()> {
        let matrix = self.matrix()?;
        if self.json {
            print!("{}", serde_json::to_string_pretty(&matrix)? + "\n");
        } else {
            print_matrix(&matrix);
        }
        let failed: Vec<&str> = matrix
            .scenarios
            .iter()
            .filter(|s| !s.passed())
            .map(|s| s.name.as_str())
            .collect();
        if !failed.is_empty() {
            bail!(
                "ab-test on {} (init {}): {} of {} scenarios failed: {} (logs under {})",
                matrix.board,
                matrix.init,
                failed.len(),
                matrix.scenarios.len(),
                failed.join(", "),
                self.work().display()
            );
        }
        ui::step(format!(
            "ab-test passed: {} scenarios on {} (init {}); logs under {}",
            matrix.scenarios.len(),
            matrix.board,
            matrix.init,
            self.work().display()
        ));
        Ok(())
    }

    fn work(&self) -> PathBuf {
        self.out
            .clone()
            .unwrap_or_else(|| crate::out_root().join("ab-test").join(&self.board))
    }

    /// Builds the releases, runs the wanted scenarios and writes `ab-test.json`; the matrix,
    /// failed rows included (an error only when something could not run at all).
    pub fn matrix(&self) -> Result<Matrix> {
        let root = project_root();
        let cfg = Config::new(&root);
        let board = cfg.load_board(&self.board)?;
        let disk = crate::image::disk_config(&board)?;
        let work = self.work();
        let all = scenarios(disk.tries);
        let wanted: Vec<&Scenario> = match &self.only {
            None => all.iter().collect(),
            Some(list) => {
                let names: Vec<&str> = list.split(',').map(str::trim).collect();
                for n in &names {
                    if !all.iter().any(|s| s.name == *n) {
                        let known: Vec<&str> = all.iter().map(|s| s.name).collect();
                        bail!(
                            "--only: unknown scenario '{n}' (one of: {})",
                            known.join(", ")
                        );
                    }
                }
                all.iter().filter(|s| names.contains(&s.name)).collect()
            }
        };
        fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
        host_needs(&board)?;

        // The releases the wanted scenarios boot (the good one always: the base disk).
        let mut needed = vec![Release::Good];
        for s in &wanted {
            for r in s.fresh.iter().chain(s.update.iter()) {
                if !needed.contains(r) {
                    needed.push(*r);
                }
            }
        }
        let mut releases: Vec<(Release, PathBuf, BuildInfo)> = Vec::new();
        for r in needed {
            let (out, info) = self.build_release(&work, r)?;
            releases.push((r, out, info));
        }
        let release = |r: Release| {
            releases
                .iter()
                .find(|(x, _, _)| *x == r)
                .map(|(_, o, i)| (o.as_path(), i))
                .expect("every needed release is built")
        };
        let (good_out, good_info) = release(Release::Good);
        let base_spec = crate::boot::qemu_spec(&board, good_out, good_info, None)?;
        let checks = crate::boot::protocol_checks(good_info);
        let timeout = Duration::from_secs(board.qemu.boot_timeout + 120);
        let runner = Runner {
            board: &board,
            spec: &base_spec,
            checks: &checks,
            epoch: good_info.source_date_epoch,
            timeout,
            verbose: self.verbose || ui::level() == ui::Level::Verbose,
        };

        // The first scenario's disk after its launches: where the update scenarios start.
        let mut blessed_a: Option<RunDisk> = None;
        let mut results = Vec::new();
        for s in all.iter() {
            let want = wanted.iter().any(|w| w.name == s.name);
            // The update scenarios need slot A blessed, as the first scenario leaves it.
            let need_base = wanted.iter().any(|w| w.fresh.is_none());
            let base_for_others = s.name == "fresh-a-blessed" && need_base && blessed_a.is_none();
            if !(want || base_for_others) {
                continue;
            }
            let dir = work.join(s.name);
            fs::create_dir_all(&dir)?;
            let dev = match (s.fresh, &blessed_a) {
                (Some(rel), _) => {
                    let (out, info) = release(rel);
                    crate::image::write_disk(
                        &root,
                        &board,
                        &disk,
                        &DiskPlace {
                            build_out: out,
                            dest: &dir,
                        },
                        info,
                        &rel.version(false),
                    )?;
                    RunDisk::fresh(&board, &dir)?
                }
                (None, Some(base)) => base.copy_to(&dir)?,
                (None, None) => bail!("scenario {} needs fresh-a-blessed first", s.name),
            };
            if let Some(rel) = s.update {
                let (out, info) = release(rel);
                write_b(&board, &dev, out, info, &rel.version(true), disk.tries)?;
            }
            ui::step(format!("scenario {}: {}", s.name, s.description));
            let r = runner.scenario(s, &dev, &dir)?;
            if s.name == "fresh-a-blessed" {
                blessed_a = Some(dev);
            }
            if want {
                results.push(r);
            }
        }

        let matrix = Matrix {
            board: board.name.clone(),
            profile: good_info.profile.clone(),
            init: good_info.init.clone(),
            tries: disk.tries,
            scenarios: results,
        };
        let json = serde_json::to_string_pretty(&matrix)? + "\n";
        fs::write(work.join("ab-test.json"), &json)
            .with_context(|| format!("writing {}", work.join("ab-test.json").display()))?;
        Ok(matrix)
    }

    /// Builds the profile as `rel` into `<work>/build/<rel>`.
    fn build_release(&self, work: &Path, rel: Release) -> Result<(PathBuf, BuildInfo)> {
        let out = work.join("build").join(rel.name());
        ui::step(format!(
            "build the {} release{}",
            rel.name(),
            if rel.fault().is_empty() {
                String::new()
            } else {
                format!(" (test fault {})", rel.fault())
            }
        ));
        // The builds read their test faults from the environment (as the judge's negative
        // tests do); set only around this build.
        let before = std::env::var_os(crate::conformance::BROKEN_ENV);
        let outer = before
            .as_ref()
            .map(|v| v.to_string_lossy().into_owned())
            .unwrap_or_default();
        let faults: Vec<&str> = [outer.as_str(), rel.fault()]
            .into_iter()
            .filter(|f| !f.is_empty())
            .collect();
        std::env::set_var(crate::conformance::BROKEN_ENV, faults.join(","));
        let built = Build {
            board: self.board.clone(),
            profile: self.profile.clone(),
            init: self.init.clone(),
            out: Some(out.clone()),
            nested: true,
            ..Build::default()
        }
        .run();
        match before {
            Some(v) => std::env::set_var(crate::conformance::BROKEN_ENV, v),
            None => std::env::remove_var(crate::conformance::BROKEN_ENV),
        }
        Ok((out, built?.info))
    }
}

/// The host programs a firmware boot needs.
pub(crate) fn host_needs(board: &Board) -> Result<()> {
    crate::host::ensure_program(&board.qemu.binary, board.arch.qemu_package())
}

/// Writes the build in `out` into slot B of the disk `dev` boots, as the next generation.
fn write_b(
    board: &Board,
    dev: &RunDisk,
    out: &Path,
    info: &BuildInfo,
    version: &str,
    tries: u32,
) -> Result<()> {
    let files = crate::image::SlotFiles::read(out, info)?;
    let cmdline = crate::image::slot_cmdline(board, "b");
    let slot = disk::efi::Slot {
        name: "b",
        version,
        generation: 2,
        kernel: &files.kernel,
        initrd: &files.initrd,
        dtb: files.dtb.as_deref(),
        cmdline: &cmdline,
        tries: Some(tries),
    };
    let mut f = crate::image::open_rw(&dev.disk)?;
    disk::efi::update_slot(&mut f, &slot, info.source_date_epoch)
        .with_context(|| format!("{}: writing slot b", dev.disk.display()))?;
    f.sync_all()
        .with_context(|| format!("writing {}", dev.disk.display()))
}

pub(crate) fn read_entries(disk: &Path, epoch: u64) -> Result<Vec<String>> {
    let mut f = crate::image::open_rw(disk)?;
    disk::efi::entries(&mut f, epoch)
        .with_context(|| format!("{}: reading the entries", disk.display()))
}

struct Runner<'a> {
    board: &'a Board,
    spec: &'a qemu::QemuSpec,
    checks: &'a [qemu::Check],
    epoch: u64,
    timeout: Duration,
    verbose: bool,
}

impl Runner<'_> {
    fn scenario(&self, s: &Scenario, dev: &RunDisk, dir: &Path) -> Result<ScenarioResult> {
        let mut launches = Vec::new();
        let mut problems = Vec::new();
        for (i, (expect, after)) in s.launches.iter().enumerate() {
            let l = self.launch(i + 1, expect, after, dev, dir)?;
            ui::detail(format!(
                "launch {}: {} - {} ({:.1} s{})",
                l.n,
                expect.describe(),
                if l.problems.is_empty() { "ok" } else { "FAIL" },
                l.wall_s,
                if l.problems.is_empty() {
                    String::new()
                } else {
                    format!(": {}", l.problems.join("; "))
                }
            ));
            problems.extend(l.problems.iter().map(|p| format!("launch {}: {p}", l.n)));
            let stop = !l.problems.is_empty();
            launches.push(l);
            if stop {
                break;
            }
        }
        let rollback_s = (s.rollback && problems.is_empty()).then(|| {
            let (last, tries) = launches.split_last().expect("a scenario has launches");
            tries.iter().map(|l| l.wall_s).sum::<f64>() + last.ready_s.unwrap_or(last.wall_s)
        });
        Ok(ScenarioResult {
            name: s.name.into(),
            description: s.description.into(),
            result: if problems.is_empty() { "pass" } else { "fail" },
            launches,
            problems,
            rollback_s,
        })
    }

    fn launch(
        &self,
        n: usize,
        expect: &Expect,
        after: &[String],
        dev: &RunDisk,
        dir: &Path,
    ) -> Result<Launch> {
        let log = dir.join(format!("launch-{n}.serial.log"));
        let boot = timed_boot(
            self.spec,
            Some(dev),
            self.checks,
            self.epoch,
            &log,
            self.timeout,
            self.verbose,
        )?;
        let (nonce, result, ready_at, wall_s) =
            (boot.nonce, boot.result, boot.ready_s, boot.wall_s);
        let ending = match result {
            Ok(_) => Ending::Done,
            Err(qemu::Failure::ChecksFailed { .. }) => Ending::ChecksFailed,
            Err(qemu::Failure::Panic { .. }) => Ending::Panic,
            Err(qemu::Failure::QemuExited { .. }) => Ending::Reset,
            Err(qemu::Failure::Timeout { .. }) => Ending::Timeout,
            Err(e) => bail!("{}: launch {n}: {e}", self.board.name),
        };
        let text = fs::read_to_string(&log).unwrap_or_default();
        let mut l = observe(&text, &nonce);
        l.n = n;
        l.expected = expect.describe();
        l.ending = ending;
        l.ready_s = ready_at;
        l.wall_s = wall_s;
        l.entries_after = read_entries(&dev.disk, self.epoch)?;
        l.log = log;
        l.problems = judge(expect, after, &l);
        Ok(l)
    }
}

/// One boot, timed from the host: its nonce, the console judge's result, and the host seconds
/// from QEMU's start to the ready marker and to the end.
struct TimedBoot {
    nonce: String,
    result: Result<qemu::Report, qemu::Failure>,
    ready_s: Option<f64>,
    wall_s: f64,
}

/// Boots `spec` (through `disk`'s firmware when given, with a fresh nonce in the disk) and runs
/// the image's checks.
fn timed_boot(
    spec: &qemu::QemuSpec,
    disk: Option<&RunDisk>,
    checks: &[qemu::Check],
    epoch: u64,
    log: &Path,
    timeout: Duration,
    verbose: bool,
) -> Result<TimedBoot> {
    let nonce = qemu::protocol::new_nonce();
    let mut spec = spec.clone();
    if let Some(d) = disk {
        d.apply(&mut spec);
        crate::image::set_boot_options(
            &d.disk,
            &crate::image::firmware_boot_params(&spec, &nonce),
            epoch,
        )?;
    }
    let start = Instant::now();
    let mut ready_s = None;
    let mut progress = |e: qemu::Event| match e {
        qemu::Event::Ready { .. } => ready_s = Some(start.elapsed().as_secs_f64()),
        qemu::Event::Line(l) if verbose => eprintln!("    | {l}"),
        _ => {}
    };
    let result = qemu::boot_check(&spec, &nonce, checks, timeout, log, &mut progress);
    Ok(TimedBoot {
        nonce,
        result,
        ready_s,
        wall_s: start.elapsed().as_secs_f64(),
    })
}

/// Boots `spec` (through `disk`'s firmware when given) and runs the image's checks; the host
/// seconds from QEMU's start to the ready marker. For the bench.
pub fn time_to_ready(
    spec: &qemu::QemuSpec,
    disk: Option<&RunDisk>,
    checks: &[qemu::Check],
    epoch: u64,
    log: &Path,
    timeout: Duration,
) -> Result<f64> {
    let boot = timed_boot(spec, disk, checks, epoch, log, timeout, false)?;
    boot.result
        .map_err(|e| anyhow::anyhow!("{e} (serial log: {})", log.display()))?;
    boot.ready_s
        .with_context(|| format!("no ready marker (serial log: {})", log.display()))
}

/// What the console of one launch shows, for this launch's nonce.
fn observe(text: &str, nonce: &str) -> Launch {
    let mut l = Launch {
        n: 0,
        expected: String::new(),
        kernel_slot: None,
        slot: None,
        health: Vec::new(),
        blessed: false,
        health_reboot: false,
        no_good_slot: false,
        rollback: None,
        watchdog: false,
        ending: Ending::Timeout,
        ready_s: None,
        wall_s: 0.0,
        entries_after: Vec::new(),
        log: PathBuf::new(),
        problems: Vec::new(),
    };
    for raw in text.lines() {
        let line = qemu::protocol::clean_line(raw);
        // The kernel prints its command line ("Command line:" on x86, "Kernel command line:"
        // on arm64): the slot the boot loader booted, for this launch only.
        if line.contains("ommand line:")
            && line
                .split_whitespace()
                .any(|w| w == format!("bonsai.nonce={nonce}"))
        {
            l.kernel_slot = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("bonsai.slot="))
                .map(String::from);
        }
        if let Some(rest) = line.strip_prefix("bonsai: rolled back: ") {
            l.rollback = Some(rest.to_string());
        }
        if line.starts_with("bonsai: not healthy at the trial deadline") {
            l.watchdog = true;
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() < 2 || w[1] != nonce {
            continue;
        }
        match (w[0], &w[2..]) {
            ("BONSAI-SLOT", [slot, own, state]) => {
                l.slot = Some(SlotSeen {
                    slot: slot.to_string(),
                    entry: own.to_string(),
                    state: state.to_string(),
                })
            }
            ("BONSAI-HEALTH", [name, verdict, ..]) => l.health.push(HealthSeen {
                name: name.to_string(),
                verdict: verdict.to_string(),
            }),
            ("BONSAI-BLESSED", [_, _]) => l.blessed = true,
            ("BONSAI-HEALTH-REBOOT", [_]) => l.health_reboot = true,
            ("BONSAI-NO-GOOD-SLOT", [_]) => l.no_good_slot = true,
            _ => {}
        }
    }
    l
}

/// Why launch `l` is not what `expect` says (empty: it is), entries included.
fn judge(expect: &Expect, after: &[String], l: &Launch) -> Vec<String> {
    let mut p = Vec::new();
    let slot = expect.slot();
    if l.kernel_slot.as_deref() != Some(slot) {
        p.push(format!(
            "the kernel booted slot {} instead of {slot}",
            l.kernel_slot
                .as_deref()
                .unwrap_or("(none on its command line)")
        ));
    }
    if l.entries_after != after {
        p.push(format!(
            "entries afterwards are [{}], expected [{}]",
            l.entries_after.join(", "),
            after.join(", ")
        ));
    }
    let state = l.slot.as_ref().map(|s| (s.slot.as_str(), s.state.as_str()));
    let failed_health = l.health.iter().any(|h| h.verdict == "fail");
    let mut want = |ok: bool, what: &str| {
        if !ok {
            p.push(what.to_string());
        }
    };
    match expect {
        Expect::Blesses(s) => {
            want(
                state.is_some_and(|(x, st)| x == *s && st == "trial"),
                "no trial state reported",
            );
            want(!failed_health, "a health check failed");
            want(l.blessed, "not blessed");
            want(
                l.ending == Ending::Done,
                "the checks did not run to the end",
            );
        }
        Expect::Stays(s) => {
            want(
                state.is_some_and(|(x, st)| x == *s && st == "blessed"),
                "not reported as blessed",
            );
            want(!l.blessed && !failed_health, "blessed again or unhealthy");
            want(l.rollback.is_none(), "reported a rollback");
            want(
                l.ending == Ending::Done,
                "the checks did not run to the end",
            );
        }
        Expect::Panics(_) => {
            want(l.ending == Ending::Panic, "no kernel panic");
            want(l.slot.is_none(), "reached userland");
        }
        Expect::HealthReboots(s) => {
            want(
                state.is_some_and(|(x, st)| x == *s && (st == "trial" || st == "bad")),
                "not on trial",
            );
            want(failed_health, "no failed health check reported");
            want(
                l.health_reboot && l.ending == Ending::Reset,
                "did not reboot at once",
            );
            want(!l.blessed, "blessed");
        }
        Expect::Hangs(s) => {
            // The last try shows its entry at +0 already (systemd-boot counts before it boots).
            want(
                state.is_some_and(|(x, st)| x == *s && (st == "trial" || st == "bad")),
                "not on trial",
            );
            want(
                l.health.is_empty() && !l.blessed,
                "the health step finished",
            );
            want(
                l.watchdog,
                "no trial deadline reported by the watchdog petter",
            );
            want(l.ending == Ending::Reset, "not reset (by the watchdog)");
        }
        Expect::RolledBack {
            slot,
            from,
            version,
        } => {
            want(
                state.is_some_and(|(x, st)| x == *slot && st == "blessed"),
                "not back on the blessed slot",
            );
            want(
                l.ending == Ending::Done,
                "the checks did not run to the end",
            );
            let said = l.rollback.as_deref().unwrap_or_default();
            want(
                said.starts_with(&format!(
                    "slot {from} (version {version}) used up its boot tries"
                )),
                &format!(
                    "no rollback report naming slot {from} and version {version} (got '{said}')"
                ),
            );
        }
        Expect::NoGoodSlot(s) => {
            want(
                state.is_some_and(|(x, st)| x == *s && st == "bad"),
                "not on its last try",
            );
            want(
                failed_health && l.no_good_slot,
                "no failed health check with no good slot",
            );
            want(!l.health_reboot && !l.blessed, "rebooted or blessed");
            want(
                l.ending == Ending::Done,
                "did not stay up to run the checks",
            );
        }
    }
    p
}

fn print_matrix(m: &Matrix) {
    println!(
        "ab-test {} (profile {}, init {}, {} tries per trial)",
        m.board, m.profile, m.init, m.tries
    );
    let w = m
        .scenarios
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(8)
        .max(8);
    println!("{:w$}  result  launches  detail", "scenario");
    for s in &m.scenarios {
        let detail = match (&s.rollback_s, s.problems.first()) {
            (_, Some(p)) => p.clone(),
            (Some(t), None) => {
                format!("rolled back in {t:.1} s (first bad try to the old slot's ready marker)")
            }
            (None, None) => String::new(),
        };
        println!(
            "{:w$}  {:6}  {:8}  {detail}",
            s.name,
            s.result,
            s.launches.len()
        );
    }
}

impl RunDisk {
    /// A copy of this disk and its variable store in `dir`: a second device in the same state.
    pub fn copy_to(&self, dir: &Path) -> Result<RunDisk> {
        let copy = |from: &Path, name: &str| -> Result<PathBuf> {
            let to = dir.join(name);
            fs::copy(from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
            Ok(to)
        };
        Ok(RunDisk {
            disk: copy(&self.disk, "disk-run.img")?,
            vars: match &self.vars {
                Some(v) => Some(copy(v, "disk-run-vars.fd")?),
                None => None,
            },
            boot: self.boot.clone(),
            watchdog: self.watchdog.clone(),
            params: self.params.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(text: &str) -> Launch {
        observe(text, "n0nce")
    }

    #[test]
    fn scenarios_expect_counters_that_run_down() {
        let s = scenarios(3);
        let panic = s
            .iter()
            .find(|s| s.name == "b-init-panics-rolls-back")
            .unwrap();
        let after: Vec<&str> = panic.launches.iter().map(|(_, a)| a[1].as_str()).collect();
        assert_eq!(
            after,
            [
                "bonsai-b+2-1.conf",
                "bonsai-b+1-2.conf",
                "bonsai-b+0-3.conf",
                "bonsai-b+0-3.conf"
            ]
        );
        let bad = s
            .iter()
            .find(|s| s.name == "all-slots-bad-stays-up")
            .unwrap();
        assert_eq!(bad.launches.len(), 4);
        assert!(s.len() >= 5);
    }

    #[test]
    fn a_blessing_launch_is_judged_from_its_own_nonce_only() {
        let text = "\
[    0.000000] Command line: console=ttyS0 bonsai.slot=a bonsai.nonce=n0nce bonsai.check=1\r
BONSAI-READY n0nce 3.1\r
BONSAI-SLOT n0nce a bonsai-a+2-1.conf trial\r
BONSAI-BLESSED n0nce bonsai-a+2-1.conf bonsai-a.conf\r
BONSAI-SLOT other b bonsai-b.conf blessed\r
";
        let mut l = launch(text);
        l.ending = Ending::Done;
        l.entries_after = vec!["bonsai-a.conf".into()];
        assert!(judge(&Expect::Blesses("a"), &["bonsai-a.conf".into()], &l).is_empty());
        // The same console with the entry left unblessed on disk, or another slot, fails.
        assert!(!judge(&Expect::Blesses("a"), &["bonsai-a+2-1.conf".into()], &l).is_empty());
        assert!(!judge(&Expect::Blesses("b"), &["bonsai-a.conf".into()], &l).is_empty());
        // A blessing claimed under another nonce does not count.
        let mut other = launch(&text.replace("BONSAI-BLESSED n0nce", "BONSAI-BLESSED n1nce"));
        other.ending = Ending::Done;
        other.entries_after = vec!["bonsai-a.conf".into()];
        assert!(!judge(&Expect::Blesses("a"), &["bonsai-a.conf".into()], &other).is_empty());
    }

    #[test]
    fn a_rollback_needs_the_guests_report_naming_slot_and_version() {
        let text = "\
Command line: bonsai.slot=a bonsai.nonce=n0nce\r
BONSAI-SLOT n0nce a bonsai-a.conf blessed\r
bonsai: rolled back: slot b (version r2-hang) used up its boot tries; running slot a (version r1)\r
";
        let expect = Expect::RolledBack {
            slot: "a",
            from: "b",
            version: "r2-hang".into(),
        };
        let after = vec!["bonsai-a.conf".to_string(), "bonsai-b+0-3.conf".to_string()];
        let mut l = launch(text);
        l.ending = Ending::Done;
        l.entries_after = after.clone();
        assert!(judge(&expect, &after, &l).is_empty());
        let mut silent = launch(&text.replace("rolled back", "booted"));
        silent.ending = Ending::Done;
        silent.entries_after = after.clone();
        assert!(!judge(&expect, &after, &silent).is_empty());
        let wrong = Expect::RolledBack {
            slot: "a",
            from: "b",
            version: "r2-init-exits".into(),
        };
        assert!(!judge(&wrong, &after, &l).is_empty());
    }

    #[test]
    fn a_health_failure_must_reboot_and_a_hang_must_be_reset() {
        let text = "\
Command line: bonsai.slot=b bonsai.nonce=n0nce\r
BONSAI-SLOT n0nce b bonsai-b+2-1.conf trial\r
BONSAI-HEALTH n0nce fault fail 5 1000\r
BONSAI-HEALTH-REBOOT n0nce bonsai-b+2-1.conf\r
";
        let after = vec!["bonsai-a.conf".to_string(), "bonsai-b+2-1.conf".to_string()];
        let mut l = launch(text);
        l.ending = Ending::Reset;
        l.entries_after = after.clone();
        assert!(judge(&Expect::HealthReboots("b"), &after, &l).is_empty());
        // Counted as a hang it fails: the health step finished and no deadline passed.
        assert!(!judge(&Expect::Hangs("b"), &after, &l).is_empty());
        // Staying up after a failed trial is not a reboot.
        l.ending = Ending::Done;
        assert!(!judge(&Expect::HealthReboots("b"), &after, &l).is_empty());
    }
}
