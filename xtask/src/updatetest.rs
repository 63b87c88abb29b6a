//! `cargo xtask update-test --board <b>`: field updates on the device, proven in QEMU through
//! the board's firmware. bonsai-update runs in the guest (the same binary under every init);
//! the host hands it a bundle on the disk's data partition and names it with `bonsai.update=`
//! on the kernel command line, which the shared harness reads once the boot is healthy.
//!
//! It builds three releases with a fresh signing key: 1.0.0 (the profile), 1.1.0 (one line of
//! one script changed: a small real change in the image) and 1.2.0 (its health check fails).
//! Slot A gets 1.0.0 and is blessed on its first boot; every scenario starts from a copy of
//! that disk. Every launch is judged on the host from raw data: the kernel's command line,
//! the guest's `BONSAI-SLOT`/`BONSAI-BLESSED` and `BONSAI-UPDATE-*` lines, the one
//! `bonsai-update: refused:` line, how QEMU ended, the entry names on the disk, and the
//! SHA-256 of the whole boot partition before and after a launch.
//!
//! Power cuts: QEMU is killed (SIGKILL, an honest disk: what it handed the host stays) a fixed
//! delay after one of the install's progress lines, at `--cuts` points spread over its phases.
//! After each cut the device must boot a good slot and a new install must complete.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::build::{Build, BuildInfo};
use crate::config::{Board, Config, INITS};
use crate::image::{DiskPlace, RunDisk, SlotFiles};
use crate::{project_root, ui};

#[derive(Args, Debug)]
pub struct UpdateTest {
    /// Board to test (one with an EFI [disk] table)
    #[arg(long, default_value = "qemu-x86_64")]
    pub board: String,
    #[arg(long)]
    pub profile: Option<String>,
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(INITS))]
    pub init: Option<String>,
    /// Print the scenario x result matrix as JSON on stdout (schemas/update-test.schema.json)
    #[arg(long)]
    pub json: bool,
    /// Power cuts during an install (spread over its phases)
    #[arg(long, default_value_t = 20)]
    pub cuts: usize,
    /// Only these scenarios (comma-separated names, or prefixes such as power-cut)
    #[arg(long)]
    pub only: Option<String>,
    /// Working folder (default: out/update-test/<board>)
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Show every console line
    #[arg(long)]
    pub verbose: bool,
}

/// The scenarios before the power cuts, in the matrix's order.
const SCENARIOS: &[&str] = &[
    "install",
    "refuse-wrong-signature",
    "refuse-other-board",
    "refuse-older-version",
    "refuse-corrupt-chunk",
    "refuse-truncated-bundle",
    "resume-over-http",
    "rollback",
];

/// The progress lines that start the install's phases, in the order it prints them; the last
/// phase ends with `BONSAI-UPDATE-ARMED`.
const CUT_MARKERS: &[&str] = &[
    "BONSAI-UPDATE-VERIFIED",
    "BONSAI-UPDATE-PLAN",
    "BONSAI-UPDATE-FETCHED",
    "BONSAI-UPDATE-PHASE write",
    "BONSAI-UPDATE-PHASE arm",
];
/// Where in a phase a cut falls, as a fraction of the phase's length.
const CUT_FRACTIONS: &[f64] = &[0.0, 0.25, 0.5, 0.75, 0.9];

/// The cut points: a phase's marker and a fraction of the phase, every phase first.
pub fn cut_points(n: usize) -> Vec<(&'static str, f64)> {
    let mut v = Vec::new();
    for f in CUT_FRACTIONS {
        for m in CUT_MARKERS {
            v.push((*m, *f));
        }
    }
    v.truncate(n);
    v
}

/// The host time of the first install line that starts with `prefix`.
pub fn line_time(times: &[(String, f64)], prefix: &str) -> Result<f64> {
    times
        .iter()
        .find(|(l, _)| l.starts_with(prefix))
        .map(|(_, t)| *t)
        .with_context(|| format!("the install printed no {prefix} line"))
}

/// Each phase's length in milliseconds, from the host times of the install's lines (at
/// least 1 ms): the marker's line to the next phase's line (`BONSAI-UPDATE-ARMED` after the
/// last).
fn phase_ms(times: &[(String, f64)]) -> Result<Vec<(&'static str, u64)>> {
    let at = |prefix: &str| line_time(times, prefix);
    let mut out = Vec::new();
    for (i, m) in CUT_MARKERS.iter().enumerate() {
        let next = CUT_MARKERS
            .get(i + 1)
            .copied()
            .unwrap_or("BONSAI-UPDATE-ARMED");
        let ms = ((at(next)? - at(m)?) * 1000.0).round().max(1.0) as u64;
        out.push((*m, ms));
    }
    Ok(out)
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub name: String,
    pub description: String,
    pub result: &'static str,
    pub detail: String,
    /// Bytes the install read from the bundle (head and fetched chunks), when it got that far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fetched_bytes: Option<u64>,
    pub launches: Vec<Seen>,
}

#[derive(Debug, Serialize)]
pub struct Matrix {
    pub board: String,
    pub profile: String,
    pub init: String,
    pub bundle_bytes: u64,
    /// "N of M": of the M launches the host cut during an install, N after which the device
    /// booted a good slot and a new install completed (or the armed slot's trial passed).
    pub power_cuts_survived: String,
    /// Cut points the install had already finished by (it rebooted before the cut).
    pub power_cuts_missed: usize,
    pub scenarios: Vec<Row>,
}

/// What the host saw in one launch.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Seen {
    pub log: PathBuf,
    /// `bonsai.slot=` of the kernel's own command line.
    pub kernel_slot: Option<String>,
    /// The BONSAI-SLOT state (`trial`, `blessed`, ...).
    pub slot_state: Option<String>,
    pub blessed: bool,
    pub health_reboot: bool,
    pub rolled_back: Option<String>,
    /// `BONSAI-UPDATE-*` lines, in order.
    pub update: Vec<String>,
    /// The same lines with the host's seconds since QEMU started, as they arrived.
    pub update_times: Vec<(String, f64)>,
    /// `bonsai-update: refused: ...` lines.
    pub refused: Vec<String>,
    /// done, checks-failed, panic, reset, timeout, or cut (killed by the host).
    pub ending: String,
    /// The last install line before the host cut the power.
    pub cut_after: Option<String>,
    pub entries_after: Vec<String>,
    pub esp_changed: bool,
    pub wall_s: f64,
}

impl Seen {
    fn has(&self, prefix: &str) -> bool {
        self.update.iter().any(|l| l.starts_with(prefix))
    }
    fn fetched(&self) -> Option<u64> {
        self.update.iter().find_map(|l| {
            l.strip_prefix("BONSAI-UPDATE-FETCHED ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse().ok())
        })
    }
}

struct Rel {
    version: &'static str,
    out: PathBuf,
    info: BuildInfo,
}

struct Ctx<'a> {
    board: &'a Board,
    spec: qemu::QemuSpec,
    checks: Vec<qemu::Check>,
    epoch: u64,
    timeout: Duration,
    verbose: bool,
}

impl UpdateTest {
    pub fn run(self) -> Result<()> {
        let json = self.json;
        let m = self.matrix()?;
        if json {
            println!("{}", serde_json::to_string_pretty(&m)?);
        } else {
            print_matrix(&m);
        }
        let failed: Vec<&str> = m
            .scenarios
            .iter()
            .filter(|r| r.result != "pass")
            .map(|r| r.name.as_str())
            .collect();
        if !failed.is_empty() {
            bail!("update-test {}: failed: {}", m.board, failed.join(", "));
        }
        Ok(())
    }

    /// Every scenario name, in the matrix's order.
    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = SCENARIOS.iter().map(|s| s.to_string()).collect();
        v.extend((1..=cut_points(self.cuts).len()).map(|i| format!("power-cut-{i:02}")));
        v
    }

    fn matrix(&self) -> Result<Matrix> {
        if let Some(list) = &self.only {
            let names = self.names();
            for w in list.split(',').map(str::trim) {
                if !names.iter().any(|n| n.starts_with(w)) || w.is_empty() {
                    bail!(
                        "--only: unknown scenario '{w}' (one of: {}, or a prefix such as power-cut or refuse)",
                        SCENARIOS.join(", ")
                    );
                }
            }
        }
        let root = project_root();
        let board = Config::new(&root).load_board(&self.board)?;
        let disk = crate::image::disk_config(&board)?;
        if disk.layout != crate::config::DiskLayout::Efi {
            bail!(
                "update-test --board {}: bonsai-update writes EFI boards' slots (systemd-boot entries); this board's disk layout is not efi",
                board.name
            );
        }
        crate::abtest::host_needs(&board)?;
        let work = self
            .out
            .clone()
            .unwrap_or_else(|| crate::out_root().join("update-test").join(&board.name));
        fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

        // The run's signing key, kept in the working folder (never in an image) so that a
        // second run finds its releases up to date.
        let key_file = work.join("update-test.key");
        let key = match fs::read_to_string(&key_file) {
            Ok(text) => bundle::SecretKey::parse(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", key_file.display()))?,
            Err(_) => {
                let key = bundle::SecretKey::from_random(&crate::update::random40()?);
                fs::write(&key_file, key.to_file())
                    .with_context(|| format!("writing {}", key_file.display()))?;
                key
            }
        };
        let public = key.public_file();

        // 1.1.0 is 1.0.0 with one package changed (hello 1.0 -> 1.1), built from a copy of
        // the data folders; 1.2.0 fails its health check.
        let next_root = work.join("next-root");
        crate::update::one_package_changed(&root, &next_root)?;
        // A later release is also of a later date: 1.1.0's SOURCE_DATE_EPOCH is a day after
        // 1.0.0's, as a release from the next commit would be.
        let base = self.build(&work, "1.0.0", "", None, &public)?;
        let later = Some((Path::new(&next_root), base.info.source_date_epoch + 86_400));
        let next = self.build(&work, "1.1.0", "", later, &public)?;
        let bad = self.build(&work, "1.2.0", "health-fails", None, &public)?;
        let files = |r: &Rel| SlotFiles::read(&r.out, &r.info);
        let (base_files, next_files) = (files(&base)?, files(&next)?);
        let b_next = crate::update::make_bundle(&board.name, next.version, &next_files, &key)?;
        let b_bad = crate::update::make_bundle(&board.name, bad.version, &files(&bad)?, &key)?;

        let spec = crate::boot::qemu_spec(&board, &base.out, &base.info, None)?;
        let ctx = Ctx {
            board: &board,
            spec,
            checks: crate::boot::protocol_checks(&base.info),
            epoch: base.info.source_date_epoch,
            timeout: Duration::from_secs(board.qemu.boot_timeout + 120),
            verbose: self.verbose || ui::level() == ui::Level::Verbose,
        };

        // The base disk: slot A with 1.0.0, blessed on its first boot.
        let base_dir = work.join("base");
        fs::create_dir_all(&base_dir)?;
        crate::image::write_disk(
            &root,
            &board,
            &disk,
            &DiskPlace {
                build_out: &base.out,
                dest: &base_dir,
            },
            &base.info,
            base.version,
        )?;
        let base_dev = RunDisk::fresh(&board, &base_dir)?;
        ui::step("first boot of slot A (1.0.0): blessed");
        let first = ctx.launch(&base_dev, &base_dir.join("launch-1.serial.log"), None, None)?;
        if !(first.blessed
            && first.kernel_slot.as_deref() == Some("a")
            && first.entries_after == ["bonsai-a.conf"])
        {
            bail!(
                "the base disk's first boot did not bless slot a: the guest said blessed: {}, the entries afterwards are {:?} (serial log: {})",
                first.blessed,
                first.entries_after,
                first.log.display()
            );
        }

        let want = |name: &str| match &self.only {
            None => true,
            Some(list) => list.split(',').any(|w| name.starts_with(w.trim())),
        };
        let mut rows = Vec::new();
        let scenario_dir = |name: &str| -> Result<(PathBuf, RunDisk)> {
            let dir = work.join(name);
            fs::create_dir_all(&dir)?;
            Ok((dir.clone(), base_dev.copy_to(&dir)?))
        };

        let points = cut_points(self.cuts);
        let cuts_wanted = (1..=points.len()).any(|i| want(&format!("power-cut-{i:02}")));
        // The install also times its phases: the power cuts fall at fractions of them.
        let mut phases = Vec::new();
        if want("install") || cuts_wanted {
            let (dir, dev) = scenario_dir("install")?;
            ui::step("scenario install: 1.0.0 to 1.1.0 (one package changed), trial boot, blessed");
            let r = ctx.install(&dir, &dev, &b_next.bytes, next.version)?;
            if cuts_wanted {
                phases = phase_ms(&r.launches[0].update_times)
                    .context("the install scenario, which times the phases the cuts fall in")?;
                ui::detail(format!(
                    "install phases (ms, host time between its lines): {}",
                    phases
                        .iter()
                        .map(|(m, ms)| format!("{} {ms}", m.trim_start_matches("BONSAI-UPDATE-")))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if want("install") {
                rows.push(r);
            }
        }
        // Bad bundles: each refused with one line naming why, the boot partition unchanged.
        let other_key = bundle::SecretKey::from_random(&crate::update::random40()?);
        let mut corrupt = b_next.bytes.clone();
        let mut local = bundle::Local::default();
        local.add(
            "linux",
            base_files.kernel.clone(),
            &b_next.manifest.chunking,
        );
        local.add(
            "initrd",
            base_files.initrd.clone(),
            &b_next.manifest.chunking,
        );
        let head = bundle::Header::parse(&b_next.bytes)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .payload_offset();
        let fresh = b_next
            .manifest
            .chunks
            .iter()
            .find(|c| local.get(&c.sha256).is_none())
            .context("release 1.1.0 has no chunk that 1.0.0 lacks: nothing to corrupt")?;
        corrupt[(head + fresh.offset) as usize + fresh.size as usize / 2] ^= 0x01;
        let truncated = b_next.bytes[..b_next.bytes.len() - 4096].to_vec();
        let refusals: Vec<(&str, &str, Vec<u8>, &str)> = vec![
            (
                "refuse-wrong-signature",
                "a bundle signed by another key",
                crate::update::make_bundle(&board.name, next.version, &next_files, &other_key)?
                    .bytes,
                "signature",
            ),
            (
                "refuse-other-board",
                "a bundle for another board",
                crate::update::make_bundle("another-board", next.version, &next_files, &key)?.bytes,
                "for board another-board",
            ),
            (
                "refuse-older-version",
                "an older version (0.9.0) than the running 1.0.0",
                crate::update::make_bundle(&board.name, "0.9.0", &next_files, &key)?.bytes,
                "not newer",
            ),
            (
                "refuse-corrupt-chunk",
                "one byte of a chunk the device must fetch flipped",
                corrupt,
                "does not match its sha256",
            ),
            (
                "refuse-truncated-bundle",
                "the bundle's last 4 KiB missing",
                truncated,
                "truncated",
            ),
        ];
        for (name, description, bytes, needle) in refusals {
            if !want(name) {
                continue;
            }
            let (dir, dev) = scenario_dir(name)?;
            ui::step(format!("scenario {name}: {description}"));
            rows.push(ctx.refuse(name, description, &dir, &dev, &bytes, needle)?);
        }
        if want("resume-over-http") {
            let (dir, dev) = scenario_dir("resume-over-http")?;
            ui::step("scenario resume-over-http: the transfer is cut half-way and resumes");
            let plan = bundle::Plan::new(&b_next.manifest, |h| local.get(h).is_some());
            rows.push(ctx.resume(&dir, &dev, &b_next, &plan, head)?);
        }
        if want("rollback") {
            let (dir, dev) = scenario_dir("rollback")?;
            ui::step("scenario rollback: 1.2.0 fails its health check, the device goes back");
            rows.push(ctx.rollback(&dir, &dev, &b_bad.bytes, disk.tries)?);
        }
        let mut survived = 0;
        let mut cuts = 0;
        let mut missed = 0;
        for (i, (marker, fraction)) in points.iter().enumerate() {
            let name = format!("power-cut-{:02}", i + 1);
            if !want(&name) {
                continue;
            }
            let phase = phases
                .iter()
                .find(|(m, _)| m == marker)
                .map(|(_, ms)| *ms)
                .unwrap_or(1);
            let delay = (phase as f64 * fraction).round() as u64;
            let (dir, dev) = scenario_dir(&name)?;
            ui::step(format!(
                "scenario {name}: power cut {delay} ms ({:.0} % of {phase} ms) after {marker}",
                fraction * 100.0
            ));
            let row = ctx.power_cut(&name, &dir, &dev, &b_next.bytes, marker, delay)?;
            if row.launches[0].ending == "cut" {
                cuts += 1;
                if row.result == "pass" {
                    survived += 1;
                }
            } else {
                missed += 1;
            }
            rows.push(row);
        }
        let m = Matrix {
            board: board.name.clone(),
            profile: base.info.profile.clone(),
            init: base.info.init.clone(),
            bundle_bytes: b_next.bytes.len() as u64,
            power_cuts_survived: format!("{survived} of {cuts}"),
            power_cuts_missed: missed,
            scenarios: rows,
        };
        fs::write(
            work.join("update-test.json"),
            serde_json::to_string_pretty(&m)? + "\n",
        )?;
        Ok(m)
    }

    /// Builds the profile as release `version` (with a test fault, if given) into
    /// `<work>/build/<version>`, with the update key built in.
    fn build(
        &self,
        work: &Path,
        version: &'static str,
        fault: &str,
        data: Option<(&Path, u64)>,
        public: &str,
    ) -> Result<Rel> {
        let out = work.join("build").join(version);
        let (pkg, _, new) = crate::update::CHANGED_PACKAGE;
        ui::step(format!(
            "build release {version}{}",
            match (fault.is_empty(), data.is_some()) {
                (false, _) => format!(" ({fault})"),
                (true, true) => format!(" ({pkg} {new})"),
                (true, false) => String::new(),
            }
        ));
        // The release's fault goes with any the caller set (the tests' deliberately broken
        // guests), only around this build.
        let before = std::env::var_os(crate::conformance::BROKEN_ENV);
        let outer = before
            .as_ref()
            .map(|v| v.to_string_lossy().into_owned())
            .unwrap_or_default();
        let faults: Vec<&str> = [outer.as_str(), fault]
            .into_iter()
            .filter(|f| !f.is_empty())
            .collect();
        std::env::set_var(crate::conformance::BROKEN_ENV, faults.join(","));
        let root_before = std::env::var_os("BONSAI_ROOT");
        let epoch_before = std::env::var_os("SOURCE_DATE_EPOCH");
        if let Some((d, epoch)) = data {
            std::env::set_var("BONSAI_ROOT", d);
            std::env::set_var("SOURCE_DATE_EPOCH", epoch.to_string());
        }
        let built = Build {
            board: self.board.clone(),
            profile: self.profile.clone(),
            init: self.init.clone(),
            out: Some(out.clone()),
            nested: true,
            update_key: Some(public.to_string()),
            ..Build::default()
        }
        .run();
        for (var, was) in [
            (crate::conformance::BROKEN_ENV, before),
            ("BONSAI_ROOT", root_before),
            ("SOURCE_DATE_EPOCH", epoch_before),
        ] {
            match was {
                Some(v) => std::env::set_var(var, v),
                None => std::env::remove_var(var),
            }
        }
        Ok(Rel {
            version,
            out,
            info: built?.info,
        })
    }
}

/// The data partition's file the bundle goes into.
const BUNDLE_FILE: &str = "update.bundle";

impl Ctx<'_> {
    fn put_bundle(&self, dev: &RunDisk, bytes: &[u8]) -> Result<()> {
        let mut f = crate::image::open_rw(&dev.disk)?;
        disk::efi::write_data_file(&mut f, BUNDLE_FILE, bytes, self.epoch)
            .with_context(|| format!("{}: writing the bundle", dev.disk.display()))?;
        f.sync_all()?;
        Ok(())
    }

    fn esp_sha(&self, dev: &RunDisk) -> Result<String> {
        let mut f = crate::image::open_rw(&dev.disk)?;
        let p = disk::efi::find_esp(&mut f)?;
        Ok(disk::efi::partition_sha256(&mut f, &p)?)
    }

    /// One boot of `dev`; with `update`, the harness installs the data partition's bundle; with
    /// `cut`, the host kills QEMU that many milliseconds after the guest prints that line.
    fn launch(
        &self,
        dev: &RunDisk,
        log: &Path,
        update: Option<&str>,
        cut: Option<(&str, u64)>,
    ) -> Result<Seen> {
        self.launch_with(&self.spec, dev, log, update, cut)
    }

    fn launch_with(
        &self,
        base: &qemu::QemuSpec,
        dev: &RunDisk,
        log: &Path,
        update: Option<&str>,
        cut: Option<(&str, u64)>,
    ) -> Result<Seen> {
        let nonce = qemu::protocol::new_nonce();
        let mut spec = base.clone();
        dev.apply(&mut spec);
        spec.append = format!("{} bonsai.update={}", spec.append, update.unwrap_or("none"))
            .trim()
            .to_string();
        let pidfile = log.with_extension("pid");
        let _ = fs::remove_file(&pidfile);
        spec.extra_args
            .extend(["-pidfile".into(), pidfile.display().to_string()]);
        crate::image::set_boot_options(
            &dev.disk,
            &crate::image::firmware_boot_params(&spec, &nonce),
            self.epoch,
        )?;
        let before = self.esp_sha(dev)?;
        let last_update: Arc<Mutex<Option<String>>> = Arc::default();
        let cut_after: Arc<Mutex<Option<String>>> = Arc::default();
        let mut fired = false;
        let mut times = Vec::new();
        let start = Instant::now();
        let verbose = self.verbose;
        let mut progress = |e: qemu::Event| {
            if let qemu::Event::Line(l) = e {
                if verbose {
                    eprintln!("    | {l}");
                }
                if l.starts_with("BONSAI-UPDATE-") {
                    *last_update.lock().unwrap_or_else(|e| e.into_inner()) = Some(l.clone());
                    times.push((l.clone(), start.elapsed().as_secs_f64()));
                }
                if let Some((marker, delay)) = cut {
                    if !fired && l.starts_with(marker) {
                        fired = true;
                        let (pidfile, last, after) =
                            (pidfile.clone(), last_update.clone(), cut_after.clone());
                        std::thread::spawn(move || {
                            std::thread::sleep(Duration::from_millis(delay));
                            *after.lock().unwrap_or_else(|e| e.into_inner()) =
                                last.lock().unwrap_or_else(|e| e.into_inner()).clone();
                            if let Some(pid) = fs::read_to_string(&pidfile)
                                .ok()
                                .and_then(|p| p.trim().parse::<i32>().ok())
                            {
                                // SAFETY: kill(2) on QEMU's pid, which this run started.
                                unsafe { libc::kill(pid, libc::SIGKILL) };
                            }
                        });
                    }
                }
            }
        };
        let result = qemu::boot_check(
            &spec,
            &nonce,
            &self.checks,
            self.timeout,
            log,
            &mut progress,
        );
        let cut_line = cut_after.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let ending = match (&result, &cut_line) {
            (_, Some(_)) => "cut",
            (Ok(_), None) => "done",
            (Err(qemu::Failure::ChecksFailed { .. }), None) => "checks-failed",
            (Err(qemu::Failure::Panic { .. }), None) => "panic",
            (Err(qemu::Failure::QemuExited { .. }), None) => "reset",
            (Err(qemu::Failure::Timeout { .. }), None) => "timeout",
            (Err(e), None) => bail!("{}: {e}", self.board.name),
        };
        let text = fs::read_to_string(log).unwrap_or_default();
        let mut s = observe(&text, &nonce);
        s.log = log.to_path_buf();
        s.ending = ending.into();
        s.cut_after = cut_line;
        s.update_times = times;
        s.wall_s = start.elapsed().as_secs_f64();
        s.entries_after = crate::abtest::read_entries(&dev.disk, self.epoch)?;
        s.esp_changed = self.esp_sha(dev)? != before;
        ui::detail(format!(
            "{}: slot {} {}, {}{}{} ({:.1} s)",
            log.file_name().unwrap_or_default().to_string_lossy(),
            s.kernel_slot.as_deref().unwrap_or("?"),
            s.slot_state.as_deref().unwrap_or("?"),
            s.ending,
            s.update
                .last()
                .map(|l| format!(", last: {l}"))
                .unwrap_or_default(),
            s.refused
                .first()
                .map(|l| format!(", {l}"))
                .unwrap_or_default(),
            s.wall_s
        ));
        Ok(s)
    }

    fn install(&self, dir: &Path, dev: &RunDisk, bundle: &[u8], version: &str) -> Result<Row> {
        self.put_bundle(dev, bundle)?;
        let l1 = self.launch(
            dev,
            &dir.join("launch-1.serial.log"),
            Some(BUNDLE_FILE),
            None,
        )?;
        let mut p = Vec::new();
        if !l1.has("BONSAI-UPDATE-ARMED slot b") {
            p.push(format!(
                "launch 1: no BONSAI-UPDATE-ARMED slot b: {:?}",
                l1.refused
            ));
        }
        if l1.ending != "reset" {
            p.push(format!(
                "launch 1 ended {}, not with the install's reboot",
                l1.ending
            ));
        }
        let armed = vec!["bonsai-a.conf".to_string(), "bonsai-b+3.conf".to_string()];
        if p.is_empty() && l1.entries_after != armed {
            p.push(format!(
                "after the install the entries are {:?}, not {armed:?}",
                l1.entries_after
            ));
        }
        let mut launches = vec![l1];
        if p.is_empty() {
            let l2 = self.launch(dev, &dir.join("launch-2.serial.log"), None, None)?;
            if l2.kernel_slot.as_deref() != Some("b") || l2.slot_state.as_deref() != Some("trial") {
                p.push(format!(
                    "launch 2 booted slot {:?} ({:?}), not slot b on trial",
                    l2.kernel_slot, l2.slot_state
                ));
            }
            if !l2.blessed || l2.ending != "done" {
                p.push(format!(
                    "launch 2: blessed {} ending {}",
                    l2.blessed, l2.ending
                ));
            }
            let want = vec!["bonsai-a.conf".to_string(), "bonsai-b.conf".to_string()];
            if l2.entries_after != want {
                p.push(format!(
                    "after the trial the entries are {:?}",
                    l2.entries_after
                ));
            }
            launches.push(l2);
        }
        let fetched = launches[0].fetched();
        Ok(row(
            "install",
            &format!(
                "1.0.0 to {version} ({} {} -> {}): installs into slot b, the trial boot passes, blessed",
                crate::update::CHANGED_PACKAGE.0,
                crate::update::CHANGED_PACKAGE.1,
                crate::update::CHANGED_PACKAGE.2
            ),
            p,
            fetched.map(|f| {
                format!(
                    "fetched {} of the {} bundle ({:.1} %)",
                    ui::size(f),
                    ui::size(bundle.len() as u64),
                    100.0 * f as f64 / bundle.len() as f64
                )
            }),
            fetched,
            launches,
        ))
    }

    fn refuse(
        &self,
        name: &str,
        description: &str,
        dir: &Path,
        dev: &RunDisk,
        bundle: &[u8],
        needle: &str,
    ) -> Result<Row> {
        self.put_bundle(dev, bundle)?;
        let l = self.launch(
            dev,
            &dir.join("launch-1.serial.log"),
            Some(BUNDLE_FILE),
            None,
        )?;
        let mut p = Vec::new();
        match l.refused.as_slice() {
            [one] if one.contains(needle) => {}
            other => p.push(format!(
                "wanted one refusal naming {needle:?}, got {other:?}"
            )),
        }
        if l.has("BONSAI-UPDATE-PHASE") || l.has("BONSAI-UPDATE-ARMED") {
            p.push("it started writing".into());
        }
        if l.esp_changed {
            p.push("the boot partition's bytes changed".into());
        }
        if l.ending != "done" || l.kernel_slot.as_deref() != Some("a") {
            p.push(format!(
                "slot {:?} ended {}, not slot a done",
                l.kernel_slot, l.ending
            ));
        }
        let detail = l.refused.first().cloned();
        Ok(row(name, description, p, detail, None, vec![l]))
    }

    /// The bundle over HTTP (QEMU's guestfwd to `cargo xtask serve --stdio`), the first
    /// payload response cut part-way: the install must resume and fetch exactly what it lacks.
    fn resume(
        &self,
        dir: &Path,
        dev: &RunDisk,
        b: &crate::update::Signed,
        plan: &bundle::Plan,
        head: u64,
    ) -> Result<Row> {
        let m = &b.manifest;
        let ranges = plan.ranges(m);
        // The last run of chunks to fetch is cut after its first chunk and half of the next
        // (half-way, when it is one chunk). The runs before it were fetched whole and verified:
        // after the cut the device must ask for what it still lacks and nothing else.
        let Some(&(off, len)) = ranges.last() else {
            bail!("release 1.1.0 needs no chunk from the bundle: nothing to resume");
        };
        let mut sizes = Vec::new();
        for c in &m.chunks {
            if c.offset >= off && c.offset < off + len {
                sizes.push(u64::from(c.size));
            }
        }
        let cut_after = match sizes.as_slice() {
            [first, second, ..] => first + second / 2,
            _ => len / 2,
        };
        let verified_in_cut: u64 = {
            let mut sum = 0;
            for s in &sizes {
                if sum + s > cut_after {
                    break;
                }
                sum += s;
            }
            sum
        };
        let verified_before = plan.fetch_bytes - len + verified_in_cut;
        let serve_dir = dir.join("serve").join("u");
        fs::create_dir_all(&serve_dir)?;
        fs::write(serve_dir.join(BUNDLE_FILE), &b.bytes)?;
        let log = dir.join("serve.log");
        let _ = fs::remove_file(&log);
        let exe = std::env::current_exe().context("the xtask binary's path")?;
        let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', "'\\''"));
        let cmd = format!(
            "{} serve --stdio {} --log {} --cut-first 1 --cut-after {cut_after} --cut-from {}",
            quote(&exe),
            quote(&serve_dir),
            quote(&log),
            head + off
        );
        let mut spec = self.spec.clone();
        let Some(net) = spec.network.as_mut() else {
            bail!(
                "{}: no [qemu] net-device: the guest cannot reach an HTTP server",
                self.board.name
            );
        };
        net.guest_forwards = vec![("10.0.2.100:80".into(), cmd)];
        let url = format!("http://10.0.2.100/u/{BUNDLE_FILE}");
        let l = self.launch_with(
            &spec,
            dev,
            &dir.join("launch-1.serial.log"),
            Some(&url),
            None,
        )?;
        let served = crate::serve::read_log(&log);
        let payload: u64 = served
            .iter()
            .filter(|(o, _, _)| *o >= head)
            .map(|(_, n, _)| n)
            .sum();
        let cuts = served.iter().filter(|(_, _, c)| *c).count();
        let want = plan.fetch_bytes + cut_after - verified_in_cut;
        let mut p = Vec::new();
        if !l.has("BONSAI-UPDATE-ARMED slot b") || l.ending != "reset" {
            p.push(format!(
                "the install did not complete: {:?} {:?}",
                l.update.last(),
                l.refused
            ));
        }
        if !l.has("BONSAI-UPDATE-RESUME") {
            p.push("no BONSAI-UPDATE-RESUME line".into());
        }
        if cuts != 1 {
            p.push(format!("the server cut {cuts} responses, not 1"));
        }
        if payload != want {
            p.push(format!(
                "the server sent {payload} payload bytes; with {verified_before} verified before the cut at {cut_after}, it should be exactly {want} (fetch {})",
                plan.fetch_bytes
            ));
        }
        Ok(row(
            "resume-over-http",
            "the bundle over HTTP ranges, the last payload response cut part-way: resumes, verified chunks not fetched again",
            p,
            Some(format!(
                "cut at {cut_after} of the last {len}-byte run, {verified_before} bytes of chunks verified before the cut; the server sent {payload} payload bytes in {} responses, the plan needed {}",
                served.iter().filter(|(o, _, _)| *o >= head).count(),
                plan.fetch_bytes
            )),
            None,
            vec![l],
        ))
    }

    fn rollback(&self, dir: &Path, dev: &RunDisk, bundle: &[u8], tries: u32) -> Result<Row> {
        self.put_bundle(dev, bundle)?;
        let mut launches = Vec::new();
        let mut p = Vec::new();
        let l1 = self.launch(
            dev,
            &dir.join("launch-1.serial.log"),
            Some(BUNDLE_FILE),
            None,
        )?;
        if !l1.has("BONSAI-UPDATE-ARMED slot b") {
            p.push(format!("the install did not arm slot b: {:?}", l1.refused));
        }
        launches.push(l1);
        let mut back = false;
        for n in 2..=(tries as usize + 2) {
            if !p.is_empty() {
                break;
            }
            let l = self.launch(dev, &dir.join(format!("launch-{n}.serial.log")), None, None)?;
            match l.kernel_slot.as_deref() {
                Some("b") if l.health_reboot && l.ending == "reset" => {}
                Some("b") => p.push(format!(
                    "launch {n}: slot b ended {} without a health reboot",
                    l.ending
                )),
                Some("a") => {
                    match &l.rolled_back {
                        Some(r) if r.contains("slot b (version 1.2.0)") => back = true,
                        other => p.push(format!(
                            "launch {n}: slot a without the rollback report: {other:?}"
                        )),
                    }
                    if l.ending != "done" {
                        p.push(format!("launch {n}: slot a ended {}", l.ending));
                    }
                }
                other => p.push(format!("launch {n}: booted {other:?}")),
            }
            launches.push(l);
            if back {
                break;
            }
        }
        if !back && p.is_empty() {
            p.push(format!(
                "slot a did not come back within {} launches",
                tries + 1
            ));
        }
        let detail = launches.last().and_then(|l| l.rolled_back.clone());
        Ok(row(
            "rollback",
            "1.2.0 fails its health check on every try: back on slot a, which reports it",
            p,
            detail,
            None,
            launches,
        ))
    }

    fn power_cut(
        &self,
        name: &str,
        dir: &Path,
        dev: &RunDisk,
        bundle: &[u8],
        marker: &str,
        delay: u64,
    ) -> Result<Row> {
        self.put_bundle(dev, bundle)?;
        let mut p = Vec::new();
        let l1 = self.launch(
            dev,
            &dir.join("launch-1.serial.log"),
            Some(BUNDLE_FILE),
            Some((marker, delay)),
        )?;
        // The install may have finished and rebooted before the cut came. Slot b is armed
        // when its counted entry is on the disk and whole (a cut inside the arm step can leave
        // the name without its text, which the boot loader skips: then slot a must boot).
        let renamed = l1
            .entries_after
            .iter()
            .find(|e| e.starts_with("bonsai-b+"))
            .cloned();
        let whole = match &renamed {
            Some(name) => {
                let mut f = crate::image::open_rw(&dev.disk)?;
                let text = disk::efi::entry_file(&mut f, self.epoch, name)?;
                text.lines().any(|l| l.starts_with("linux "))
                    && text.lines().any(|l| l.starts_with("initrd "))
            }
            None => false,
        };
        let armed = renamed.is_some() && whole;
        if l1.ending != "cut" && !(l1.ending == "reset" && l1.has("BONSAI-UPDATE-ARMED")) {
            p.push(format!("launch 1 ended {}, not cut", l1.ending));
        }
        let mut launches = vec![l1];
        if p.is_empty() {
            let l2 = self.launch(
                dev,
                &dir.join("launch-2.serial.log"),
                Some(BUNDLE_FILE),
                None,
            )?;
            match (armed, l2.kernel_slot.as_deref()) {
                // Cut before the new entry was in place: the old slot boots, and the install,
                // started again, completes.
                (false, Some("a")) => {
                    if l2.slot_state.as_deref() != Some("blessed") {
                        p.push(format!("slot a is {:?}, not blessed", l2.slot_state));
                    }
                    if !l2.has("BONSAI-UPDATE-ARMED slot b") || l2.ending != "reset" {
                        p.push(format!(
                            "the new install did not complete: {:?} {:?}",
                            l2.update.last(),
                            l2.refused
                        ));
                    }
                }
                // Cut after arming: the new slot's trial boots, whole, and is blessed.
                (true, Some("b")) => {
                    if !l2.blessed {
                        p.push("slot b's trial was not blessed".into());
                    }
                }
                (a, s) => p.push(format!(
                    "after the cut (armed: {a}) the device booted slot {s:?}"
                )),
            }
            launches.push(l2);
        }
        let detail = format!(
            "{} {delay} ms after {marker} (last line: {}); {}",
            if launches[0].ending == "cut" {
                "cut"
            } else {
                "missed: the install had rebooted before the cut"
            },
            launches[0].cut_after.as_deref().unwrap_or("none"),
            if armed {
                "slot b was armed: its trial passed"
            } else if renamed.is_some() {
                "slot b's entry was renamed but its text had not reached the disk: slot a booted, the install completed again"
            } else {
                "slot a booted, the install completed again"
            }
        );
        Ok(row(
            name,
            &format!("power cut {delay} ms after {marker}"),
            p,
            Some(detail),
            None,
            launches,
        ))
    }
}

fn row(
    name: &str,
    description: &str,
    problems: Vec<String>,
    detail: Option<String>,
    fetched: Option<u64>,
    launches: Vec<Seen>,
) -> Row {
    let pass = problems.is_empty();
    Row {
        name: name.into(),
        description: description.into(),
        result: if pass { "pass" } else { "fail" },
        detail: if pass {
            detail.unwrap_or_default()
        } else {
            problems.join("; ")
        },
        fetched_bytes: fetched,
        launches,
    }
}

/// What the console of one launch shows, for this launch's nonce.
fn observe(text: &str, nonce: &str) -> Seen {
    let mut s = Seen::default();
    for raw in text.lines() {
        let line = qemu::protocol::clean_line(raw);
        if line.contains("ommand line:")
            && line
                .split_whitespace()
                .any(|w| w == format!("bonsai.nonce={nonce}"))
        {
            s.kernel_slot = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("bonsai.slot="))
                .map(String::from);
        }
        if let Some(rest) = line.strip_prefix("bonsai: rolled back: ") {
            s.rolled_back = Some(rest.to_string());
        }
        if line.starts_with("BONSAI-UPDATE-") {
            s.update.push(line.to_string());
        }
        if let Some(r) = line.strip_prefix("bonsai-update: refused: ") {
            s.refused.push(r.to_string());
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() < 2 || w[1] != nonce {
            continue;
        }
        match (w[0], &w[2..]) {
            ("BONSAI-SLOT", [_, _, state]) => s.slot_state = Some(state.to_string()),
            ("BONSAI-BLESSED", [_, _]) => s.blessed = true,
            ("BONSAI-HEALTH-REBOOT", [_]) => s.health_reboot = true,
            _ => {}
        }
    }
    s
}

fn print_matrix(m: &Matrix) {
    println!(
        "update-test {} (profile {}, init {}): bundle {}, power cuts survived {}{}",
        m.board,
        m.profile,
        m.init,
        ui::size(m.bundle_bytes),
        m.power_cuts_survived,
        if m.power_cuts_missed > 0 {
            format!(
                " ({} cut points came after the install had finished)",
                m.power_cuts_missed
            )
        } else {
            String::new()
        }
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
        println!(
            "{:w$}  {:6}  {:8}  {}",
            s.name,
            s.result,
            s.launches.len(),
            s.detail
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twenty_cuts_cover_every_phase_at_four_places() {
        let p = cut_points(20);
        assert_eq!(p.len(), 20);
        for m in CUT_MARKERS {
            assert_eq!(p.iter().filter(|(x, _)| x == m).count(), 4, "{m}");
        }
        assert_eq!(cut_points(20), p, "the points are the same every run");
        let lines = [
            ("BONSAI-UPDATE-VERIFIED x", 1.0),
            ("BONSAI-UPDATE-PLAN x", 1.5),
            ("BONSAI-UPDATE-FETCHED x", 1.6),
            ("BONSAI-UPDATE-PHASE write slot b", 1.6),
            ("BONSAI-UPDATE-PHASE arm slot b", 2.4),
            ("BONSAI-UPDATE-ARMED slot b", 2.45),
        ];
        let times: Vec<(String, f64)> = lines.iter().map(|(l, t)| (l.to_string(), *t)).collect();
        let ms: Vec<u64> = phase_ms(&times)
            .unwrap()
            .iter()
            .map(|(_, ms)| *ms)
            .collect();
        assert_eq!(ms, [500, 100, 1, 800, 50]);
        assert!(
            phase_ms(&times[..5]).is_err(),
            "no ARMED line: no phase lengths"
        );
    }

    #[test]
    fn a_refusal_and_the_install_lines_are_read_from_the_console() {
        let text = "\
Command line: bonsai.slot=a bonsai.nonce=n0nce\r
BONSAI-SLOT n0nce a bonsai-a.conf blessed\r
BONSAI-UPDATE-VERIFIED board b version 1.1.0 into slot b (running a 1.0.0)\r
BONSAI-UPDATE-FETCHED 5000 payload 4000 head 1000\r
bonsai-update: refused: signature: made with another key\r
BONSAI-SLOT other b bonsai-b.conf blessed\r
";
        let s = observe(text, "n0nce");
        assert_eq!(s.kernel_slot.as_deref(), Some("a"));
        assert_eq!(s.slot_state.as_deref(), Some("blessed"));
        assert_eq!(s.fetched(), Some(5000));
        assert_eq!(s.refused, vec!["signature: made with another key"]);
        assert!(s.has("BONSAI-UPDATE-VERIFIED"));
        assert!(observe(text, "other0").kernel_slot.is_none());
    }
}
