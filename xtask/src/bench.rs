//! `cargo xtask bench`: packing, rebuild and boot figures measured side by side in one run
//! (medians of `--runs`), written to BENCHMARKS.md with the machine and the command that
//! produced them, and judged against the performance targets. It reports times; it never
//! fails because of them (only because something it measures failed or gave wrong bytes).
//!
//! Packing compares bonsai's packer, run as a child process of this binary
//! (`bench --pack-dir DIR OUT`, hidden) that reports its own CPU time and peak memory, with
//! the shell pipeline `find | sort | cpio | gzip` timed by bash, on the same root tree.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::build::Build;
use crate::conformance::{median, Conformance};
use crate::{host, project_root, ui};

/// The shell pipeline bonsai's packer is measured against (`{level}` is 9 or 6).
const PIPELINE: &str = "find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --reproducible -R +0:+0 | gzip -{level}n";

#[derive(Args, Debug)]
pub struct Bench {
    /// Runs of each measurement; the report gives medians
    #[arg(long, default_value_t = 5)]
    pub runs: u32,
    /// For CI: one run, a 20 MB synthetic tree, no boots; writes out/bench/BENCHMARKS.md
    #[arg(long)]
    pub quick: bool,
    /// Board whose image, rebuilds and boots are measured
    #[arg(long, default_value = "qemu-x86_64")]
    pub board: String,
    /// Where to write the report (default: BENCHMARKS.md, or out/bench/BENCHMARKS.md with --quick)
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Run the bench and all it starts (packers, builds, QEMU) at this niceness; a negative
    /// one (root only) keeps other work on a shared machine from skewing the times
    #[arg(long, allow_hyphen_values = true)]
    pub nice: Option<i32>,
    /// Measure only the team-cache section (a cold build on a fresh store, with the team's
    /// cache and without: the latter builds a kernel) and replace that section in the report
    #[arg(long, conflicts_with = "quick")]
    pub team_cache: bool,
    /// Internal: pack DIR into OUT as bonsai does and print the cost as JSON
    #[arg(long, hide = true, num_args = 2, value_names = ["DIR", "OUT"])]
    pub pack_dir: Vec<PathBuf>,
}

/// What the `--pack-dir` child reports on stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PackCost {
    /// Seconds from the start of the tree walk to the packed, synced file.
    wall: f64,
    /// User + system CPU seconds of the whole process (all threads).
    cpu: f64,
    /// Peak resident memory (VmHWM), bytes.
    peak_rss: u64,
    compressed_bytes: u64,
    archive_bytes: u64,
    entries: u64,
}

/// One measured run of a packer.
#[derive(Debug, Clone, Copy)]
struct Sample {
    wall: f64,
    cpu: f64,
    bytes: u64,
    peak_rss: Option<u64>,
}

/// Every run of one packer on one tree.
struct Packer {
    name: String,
    samples: Vec<Sample>,
}

impl Packer {
    fn wall(&self) -> f64 {
        med(self.samples.iter().map(|s| s.wall))
    }
    fn cpu(&self) -> f64 {
        med(self.samples.iter().map(|s| s.cpu))
    }
    fn bytes(&self) -> u64 {
        self.samples.last().map_or(0, |s| s.bytes)
    }
    fn peak_rss(&self) -> Option<u64> {
        self.samples.iter().filter_map(|s| s.peak_rss).max()
    }
}

/// The packing figures of one tree.
struct PackResult {
    tree: String,
    files: u64,
    dirs: u64,
    symlinks: u64,
    content_bytes: u64,
    entries: u64,
    archive_bytes: u64,
    packers: Vec<Packer>,
    /// bonsai's own cpio stream recompressed by `gzip -9n`: the compressor alone compared.
    same_stream_gzip9: u64,
    /// bonsai's output was the same with 1 thread and with all of them.
    identical_across_threads: bool,
}

/// A build timed from the outside, with the time of each `==>` step.
struct TimedBuild {
    wall: f64,
    /// (step, seconds from its line to the next step line or the end).
    phases: Vec<(String, f64)>,
    stdout: String,
}

struct RebuildResult {
    no_change: Vec<f64>,
    /// Runs of the no-change build that did not say "up to date" (an input changed meanwhile).
    no_change_rebuilt: usize,
    changed: Vec<TimedBuild>,
    hello_rebuilt: bool,
    /// Fresh output folders with an empty pack cache each: the cold pack.
    fresh: Vec<TimedBuild>,
    /// Fresh output folders with a warm pack cache.
    fresh_warm: Vec<TimedBuild>,
}

struct BootRow {
    init: String,
    ready: Option<f64>,
    init_to_up: Option<f64>,
    boots: usize,
    failure: Option<String>,
}

/// Boots through the firmware against `-kernel`, and the rollbacks (`ab-test`).
struct MediaResult {
    profile: String,
    init: String,
    /// Host seconds from QEMU's start to the ready marker, per boot.
    kernel_ready: Vec<f64>,
    firmware_ready: Vec<f64>,
    tries: u32,
    /// Rollback scenario, its launches, and seconds from the bad release's first launch to the
    /// old slot's ready marker (`None`: the scenario failed).
    rollbacks: Vec<(String, usize, Option<f64>)>,
}

fn bench_media(root: &Path, board: &str, runs: usize, scratch: &Path) -> Result<MediaResult> {
    let cfg = crate::config::Config::new(root);
    let b = cfg.load_board(board)?;
    let built = Build {
        board: board.to_string(),
        nested: true,
        ..Build::default()
    }
    .run()?;
    let (out, info) = (&built.out, &built.info);
    crate::image::ensure_disk(root, &b, out, info)?;
    let spec = crate::boot::qemu_spec(&b, out, info, None)?;
    let checks = crate::boot::protocol_checks(info);
    let timeout = std::time::Duration::from_secs(b.qemu.boot_timeout);
    let log = scratch.join("media.serial.log");
    let (mut kernel_ready, mut firmware_ready) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        kernel_ready.push(crate::abtest::time_to_ready(
            &spec,
            None,
            &checks,
            info.source_date_epoch,
            &log,
            timeout,
        )?);
        // Each firmware boot is a new device's first: a fresh copy of the disk and variables.
        let dev = crate::image::RunDisk::fresh(&b, out)?;
        firmware_ready.push(crate::abtest::time_to_ready(
            &spec,
            Some(&dev),
            &checks,
            info.source_date_epoch,
            &log,
            timeout,
        )?);
    }
    let matrix = crate::abtest::AbTest {
        board: board.to_string(),
        only: Some(crate::abtest::ROLLBACKS.join(",")),
        out: Some(scratch.join("ab-test")),
        ..Default::default()
    }
    .matrix()?;
    let rollbacks = matrix
        .scenarios
        .iter()
        .filter(|s| crate::abtest::ROLLBACKS.contains(&s.name.as_str()))
        .map(|s| {
            (
                s.name.clone(),
                s.launch_count(),
                s.rollback_s.filter(|_| s.passed()),
            )
        })
        .collect();
    Ok(MediaResult {
        profile: info.profile.clone(),
        init: info.init.clone(),
        kernel_ready,
        firmware_ready,
        tries: matrix.tries,
        rollbacks,
    })
}

impl Bench {
    pub fn run(self) -> Result<()> {
        if let [dir, out] = self.pack_dir.as_slice() {
            return pack_child(dir, out);
        }
        if !self.pack_dir.is_empty() {
            bail!("--pack-dir takes a directory and an output file");
        }
        let root = project_root();
        let runs = if self.quick { 1 } else { self.runs.max(1) } as usize;
        let output = self.output.clone().unwrap_or_else(|| {
            if self.quick {
                root.join("out/bench/BENCHMARKS.md")
            } else {
                root.join("BENCHMARKS.md")
            }
        });
        if let Some(n) = self.nice {
            // Children inherit the niceness of this process.
            let status = Command::new("renice")
                .args(["-n", &n.to_string(), "-p", &std::process::id().to_string()])
                .stdout(Stdio::null())
                .status()
                .context("running renice")?;
            if !status.success() {
                bail!("renice -n {n} failed (a negative niceness needs root)");
            }
        }
        host::ensure(&[host::CPIO], &[])?;
        for p in ["gzip", "bash", "find", "sort"] {
            if host::find_program(p).is_none() {
                bail!("{p} is missing; install it with: apt-get install -y gzip bash findutils coreutils");
            }
        }
        let command = std::iter::once("cargo xtask".to_string())
            .chain(std::env::args().skip(1))
            .collect::<Vec<_>>()
            .join(" ");
        let scratch = tempfile::Builder::new().prefix("bonsai-bench-").tempdir()?;
        let load_at_start = load_average();
        let cores_at_start = effective_cores();

        // The board's default image: built if missing or stale, then unpacked with GNU cpio.
        ui::step(format!("bench: build {} (if needed)", self.board));
        let built = Build {
            board: self.board.clone(),
            nested: true,
            ..Build::default()
        }
        .run()?;
        if self.team_cache {
            let team =
                crate::benchteam::bench_team_cache(&self.board, &built.out, scratch.path(), false)?;
            let mut section = String::new();
            crate::benchteam::render(Some(&team), &self.board, &mut |l: String| {
                section.push_str(&l);
                section.push('\n');
            });
            let old = fs::read_to_string(&output)
                .with_context(|| format!("reading {}", output.display()))?;
            fs::write(&output, splice_section(&old, "## Team cache", &section))?;
            print!("{section}");
            println!("wrote the team-cache section of {}", output.display());
            return Ok(());
        }
        let image_dir = scratch.path().join("image");
        unpack_image(&built.out.join(&built.info.initramfs), &image_dir)?;

        let synthetic_dir = scratch.path().join("synthetic");
        let synthetic_mb = if self.quick { 20 } else { 200 };
        ui::step(format!("bench: write a {synthetic_mb} MB synthetic tree"));
        write_synthetic_tree(&synthetic_dir, synthetic_mb << 20)?;

        let mut packing = Vec::new();
        for (name, dir) in [
            (
                format!(
                    "{} image ({}, init {})",
                    self.board, built.info.profile, built.info.init
                ),
                &image_dir,
            ),
            (
                format!("synthetic tree ({synthetic_mb} MB of small files)"),
                &synthetic_dir,
            ),
        ] {
            ui::step(format!("bench: pack the {name}, {runs} run(s) per packer"));
            packing.push(bench_packing(&name, dir, scratch.path(), runs)?);
        }
        fs::remove_dir_all(&synthetic_dir).ok();

        ui::step(format!(
            "bench: rebuilds of {}, {runs} run(s) each",
            self.board
        ));
        let rebuild = bench_rebuild(&root, &self.board, scratch.path(), runs)?;

        let boots = if self.quick {
            None
        } else {
            ui::step(format!(
                "bench: boot {} with every init backend, {runs} boot(s) each",
                self.board
            ));
            // The conformance profile (services with dependencies, restarts, users, a
            // network), then the board's own default profile.
            let default_profile = crate::config::Config::new(&root)
                .load_board(&self.board)?
                .profile;
            let rows = ["conformance".to_string(), default_profile]
                .into_iter()
                .map(|p| Ok((p.clone(), bench_boots(&self.board, &p, runs as u32)?)))
                .collect::<Result<Vec<_>>>();
            // The boots left another profile in out/<board>; put the default back.
            Build {
                board: self.board.clone(),
                nested: true,
                ..Build::default()
            }
            .run()?;
            Some(rows?)
        };
        let media = if self.quick {
            None
        } else {
            ui::step(format!(
                "bench: boot {} through its firmware and from -kernel, {runs} boot(s) each; time the rollbacks",
                self.board
            ));
            Some(bench_media(&root, &self.board, runs, scratch.path())?)
        };
        ui::step(format!(
            "bench: update {} from 1.0.0 to 1.1.0 (one package changed): the device's install{}, and the delta by every tool",
            self.board,
            if self.quick { "" } else { ", every update-test scenario and 20 power cuts" }
        ));
        let updates = crate::benchupdate::bench_updates(&self.board, scratch.path(), self.quick)?;
        ui::step(format!(
            "bench: a cold build of {} on a fresh Nix store, from the team's cache{}",
            self.board,
            if self.quick { "" } else { " and without one" }
        ));
        let team = crate::benchteam::bench_team_cache(
            &self.board,
            &built.out,
            scratch.path(),
            self.quick,
        )?;

        let report = render(&Report {
            command,
            runs,
            quick: self.quick,
            board: &self.board,
            nice: self.nice,
            machine: machine(load_at_start, cores_at_start)?,
            packing: &packing,
            rebuild: &rebuild,
            boots: boots.as_deref(),
            media: media.as_ref(),
            updates: Some(&updates),
            team: Some(&team),
        });
        if let Some(parent) = output.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&output, &report).with_context(|| format!("writing {}", output.display()))?;
        println!(
            "{}",
            report
                .split("\n## Targets")
                .nth(1)
                .map(|t| format!("## Targets{t}"))
                .unwrap_or_default()
        );
        println!(
            "wrote {}",
            output.strip_prefix(&root).unwrap_or(&output).display()
        );
        Ok(())
    }
}

/// `report` with the section that starts at the line `heading` replaced by `section` (up to
/// the next `## ` heading), or `section` put before `## Targets` when it has none.
fn splice_section(report: &str, heading: &str, section: &str) -> String {
    let start = report.find(&format!("\n{heading}\n")).map(|i| i + 1);
    match start {
        Some(a) => {
            let end = report[a + heading.len()..]
                .find("\n## ")
                .map(|i| a + heading.len() + i + 1)
                .unwrap_or(report.len());
            format!("{}{section}{}", &report[..a], &report[end..])
        }
        None => match report.find("\n## Targets") {
            Some(i) => format!("{}\n{section}{}", &report[..i], &report[i + 1..]),
            None => format!("{report}\n{section}"),
        },
    }
}

fn med(values: impl Iterator<Item = f64>) -> f64 {
    median(&values.collect::<Vec<_>>()).unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------------------------------
// The --pack-dir child

fn pack_child(dir: &Path, out: &Path) -> Result<()> {
    let start = Instant::now();
    let mut tree = rootfs::Tree::new();
    let mut names = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<Vec<_>>>()?;
    names.sort();
    for name in names {
        let image = name
            .to_str()
            .with_context(|| format!("{}: a name that is not UTF-8", dir.display()))?;
        tree.add_host_tree(image, &dir.join(&name), None)?;
    }
    let report = rootfs::pack(
        &tree,
        &rootfs::PackOptions {
            compression: rootfs::Compression::Gzip,
            level: None,
            mtime: 0,
        },
        out,
    )?;
    let wall = start.elapsed().as_secs_f64();
    let cost = PackCost {
        wall,
        cpu: self_cpu_seconds()?,
        peak_rss: status_kib("VmHWM")? * 1024,
        compressed_bytes: report.compressed_bytes,
        archive_bytes: report.cpio.archive_bytes,
        entries: report.cpio.entries,
    };
    println!("{}", serde_json::to_string(&cost)?);
    Ok(())
}

/// utime + stime of this process, all threads, from /proc/self/stat.
fn self_cpu_seconds() -> Result<f64> {
    let stat = fs::read_to_string("/proc/self/stat")?;
    // Fields after the command name (which may hold spaces) start at field 3, the state.
    let rest = stat
        .rsplit_once(')')
        .context("unexpected /proc/self/stat")?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11)
        .zip(fields.get(12))
        .and_then(|(u, s)| Some(u.parse::<f64>().ok()? + s.parse::<f64>().ok()?))
        .context("unexpected /proc/self/stat")?;
    Ok(ticks / clock_ticks())
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// A `kB` line of /proc/self/status (VmHWM, VmRSS).
fn status_kib(key: &str) -> Result<u64> {
    let status = fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {key} in /proc/self/status"))
}

// ---------------------------------------------------------------------------------------
// Packing

/// Unpacks an initramfs with GNU cpio into `dir`, then removes device nodes and other
/// special files (bonsai's host-tree walk takes files, directories and symlinks only), so
/// both packers get the same tree.
fn unpack_image(image: &Path, dir: &Path) -> Result<()> {
    let packed = fs::read(image).with_context(|| format!("reading {}", image.display()))?;
    let mut archive = Vec::new();
    match image.extension().and_then(|e| e.to_str()) {
        Some("gz") => {
            flate2::read::MultiGzDecoder::new(&packed[..]).read_to_end(&mut archive)?;
        }
        Some("zst") => archive = zstd::decode_all(&packed[..])?,
        Some("xz") => {
            liblzma::read::XzDecoder::new(&packed[..]).read_to_end(&mut archive)?;
        }
        _ => archive = packed,
    }
    fs::create_dir_all(dir)?;
    let mut child = Command::new("cpio")
        .args(["-idm", "--quiet", "--no-absolute-filenames"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running cpio")?;
    let mut stdin = child.stdin.take().context("cpio's stdin")?;
    let feeder = std::thread::spawn(move || stdin.write_all(&archive));
    let out = child.wait_with_output()?;
    feeder
        .join()
        .map_err(|_| anyhow::anyhow!("feeding cpio"))??;
    if !out.status.success() {
        bail!(
            "cpio -i of {} failed: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    remove_special_files(dir)
}

fn remove_special_files(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            remove_special_files(&entry.path())?;
        } else if !kind.is_file() && !kind.is_symlink() {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// A deterministic tree of small files: 1–10 KB each in nested directories, about `total`
/// bytes, mildly compressible (words from a fixed vocabulary mixed with noise, about 2.5:1
/// under gzip -9, like a store path of binaries and text).
fn write_synthetic_tree(dir: &Path, total: u64) -> Result<()> {
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let vocabulary: Vec<Vec<u8>> = (0..512)
        .map(|_| {
            let len = 3 + rng.below(10) as usize;
            (0..len).map(|_| b'a' + rng.below(26) as u8).collect()
        })
        .collect();
    let mut written = 0u64;
    let mut data = Vec::with_capacity(10 * 1024);
    for i in 0u64.. {
        if written >= total {
            break;
        }
        let sub = dir.join(format!(
            "nix/store/{:02}-pkg/share/d{:02}",
            i % 40,
            (i / 40) % 25
        ));
        if i < 1000 {
            fs::create_dir_all(&sub)?;
        }
        let len = 1024 + rng.below(9 * 1024) as usize;
        data.clear();
        while data.len() < len {
            let r = rng.next();
            if r % 8 < 5 {
                data.extend_from_slice(&vocabulary[(r >> 8) as usize % vocabulary.len()]);
                data.push(if r & 0x10000 == 0 { b' ' } else { b'\n' });
            } else {
                for k in 0..(1 + (r >> 20) % 6) {
                    data.push((r >> (24 + 4 * k)) as u8);
                }
            }
        }
        data.truncate(len);
        fs::write(sub.join(format!("f{i:06}")), &data)?;
        written += len as u64;
    }
    Ok(())
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn bench_packing(name: &str, dir: &Path, scratch: &Path, runs: usize) -> Result<PackResult> {
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let exe = std::env::current_exe().context("finding the xtask binary")?;
    let out_all = scratch.join("bonsai-all.cpio.gz");
    let out_one = scratch.join("bonsai-one.cpio.gz");
    let out_shell = scratch.join("shell.cpio.gz");
    let mut packers: Vec<Packer> = [
        format!("bonsai, {nproc} threads"),
        "bonsai, 1 thread".to_string(),
        "shell pipeline, gzip -9n".to_string(),
        "shell pipeline, gzip -6n".to_string(),
    ]
    .into_iter()
    .map(|name| Packer {
        name,
        samples: Vec::new(),
    })
    .collect();
    let mut last_cost = None;
    // Round-robin, so a slow moment of the machine hits every packer alike.
    for _ in 0..runs {
        for (i, threads) in [(0, nproc), (1, 1)] {
            let out = if i == 0 { &out_all } else { &out_one };
            let (wall, cost) = run_pack_child(&exe, dir, out, threads)?;
            packers[i].samples.push(Sample {
                wall,
                cpu: cost.cpu,
                bytes: cost.compressed_bytes,
                peak_rss: Some(cost.peak_rss),
            });
            last_cost = Some(cost);
        }
        for (i, level) in [(2, 9), (3, 6)] {
            packers[i]
                .samples
                .push(run_pipeline(dir, &out_shell, level)?);
        }
    }
    let cost = last_cost.context("no pack ran")?;
    let identical_across_threads = fs::read(&out_all)? == fs::read(&out_one)?;
    if !identical_across_threads {
        bail!("bonsai's gzip output differs between 1 and {nproc} threads on the {name}");
    }
    // gzip -dc checks the stream; recompressing its output compares the compressors alone.
    let script = format!(
        "gzip -dc '{}' | gzip -9n | wc -c",
        out_all.display().to_string().replace('\'', "'\\''")
    );
    let out = Command::new("bash")
        .args(["-o", "pipefail", "-c", &script])
        .output()?;
    if !out.status.success() {
        bail!(
            "gzip -dc of bonsai's output failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let same_stream_gzip9 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    let (files, dirs, symlinks, content_bytes) = count_tree(dir)?;
    Ok(PackResult {
        entries: cost.entries,
        tree: name.to_string(),
        files,
        dirs,
        symlinks,
        content_bytes,
        archive_bytes: cost.archive_bytes,
        packers,
        same_stream_gzip9,
        identical_across_threads,
    })
}

fn count_tree(dir: &Path) -> Result<(u64, u64, u64, u64)> {
    let mut counts = (0, 0, 0, 0);
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            let sub = count_tree(&entry.path())?;
            counts.0 += sub.0;
            counts.1 += sub.1 + 1;
            counts.2 += sub.2;
            counts.3 += sub.3;
        } else if kind.is_symlink() {
            counts.2 += 1;
        } else {
            counts.0 += 1;
            counts.3 += entry.metadata()?.len();
        }
    }
    Ok(counts)
}

/// Runs `xtask bench --pack-dir` with `threads` compression threads; (wall seen from
/// outside, what the child reported).
fn run_pack_child(exe: &Path, dir: &Path, out: &Path, threads: usize) -> Result<(f64, PackCost)> {
    let start = Instant::now();
    let output = Command::new(exe)
        .args(["bench", "--pack-dir"])
        .arg(dir)
        .arg(out)
        .env("BONSAI_THREADS", threads.to_string())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {} bench --pack-dir", exe.display()))?;
    let wall = start.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!("bonsai's packer failed on {}", dir.display());
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let cost: PackCost = serde_json::from_str(text.trim())
        .with_context(|| format!("reading the packer's report {text:?}"))?;
    Ok((wall, cost))
}

/// The shell pipeline under bash's `time`: wall, user + sys of every process in it.
fn run_pipeline(dir: &Path, out: &Path, level: u32) -> Result<Sample> {
    let pipeline = PIPELINE.replace("{level}", &level.to_string());
    let script = format!(
        "TIMEFORMAT='BONSAI-BENCH-TIME %R %U %S'; time ( cd \"$1\" && {pipeline} > \"$2\" )"
    );
    let output = Command::new("bash")
        .args(["-o", "pipefail", "-c", &script, "bench"])
        .arg(dir)
        .arg(out)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("the shell pipeline failed: {}", stderr.trim());
    }
    let times: Vec<f64> = stderr
        .lines()
        .find_map(|l| l.strip_prefix("BONSAI-BENCH-TIME "))
        .context("bash printed no time")?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    let [wall, user, sys] = times[..] else {
        bail!("unexpected time line in {stderr:?}");
    };
    Ok(Sample {
        wall,
        cpu: user + sys,
        bytes: fs::metadata(out)?.len(),
        peak_rss: None,
    })
}

// ---------------------------------------------------------------------------------------
// Rebuilds

fn bench_rebuild(root: &Path, board: &str, scratch: &Path, runs: usize) -> Result<RebuildResult> {
    let exe = std::env::current_exe()?;
    let epoch = crate::build::source_date_epoch(root)?.to_string();
    let build_args = ["build", "--board", board];

    // No change: one untimed build first, in case an input changed since the image was made.
    timed_build(&exe, &build_args, &[])?;
    let mut no_change = Vec::new();
    let mut no_change_rebuilt = 0;
    for _ in 0..runs {
        let b = timed_build(&exe, &build_args, &[])?;
        if !b.stdout.contains("is up to date") {
            no_change_rebuilt += 1;
        }
        no_change.push(b.wall);
    }

    // A fresh output folder: everything but Nix from scratch (Nix's cache is warm), with an
    // empty pack cache each time; then with a warm one.
    let fresh_build = |name: String, cache: &Path| -> Result<TimedBuild> {
        let out = scratch.join(name);
        let mut args: Vec<String> = build_args.iter().map(|s| s.to_string()).collect();
        args.push("--out".into());
        args.push(out.display().to_string());
        let env = [("BONSAI_PACK_CACHE", cache.display().to_string())];
        let b = timed_build(&exe, &args, &env)?;
        fs::remove_dir_all(&out).ok();
        Ok(b)
    };
    let mut fresh = Vec::new();
    for i in 0..runs {
        let cache = scratch.join(format!("pack-cache-cold-{i}"));
        fresh.push(fresh_build(format!("fresh-{i}"), &cache)?);
        fs::remove_dir_all(&cache).ok();
    }
    let warm_cache = scratch.join("pack-cache-warm");
    fresh_build("fresh-warm-up".into(), &warm_cache)?;
    let mut fresh_warm = Vec::new();
    for i in 0..runs {
        fresh_warm.push(fresh_build(format!("fresh-warm-{i}"), &warm_cache)?);
    }

    // One package changed: a scratch copy of the data folders, hello.c edited before each run.
    let copy = scratch.join("root");
    for d in crate::update::DATA_FOLDERS {
        copy_dir(&root.join(d), &copy.join(d))?;
    }
    // The first build warms this pack cache; each changed build reuses what did not change.
    let env = [
        ("BONSAI_ROOT", copy.display().to_string()),
        ("SOURCE_DATE_EPOCH", epoch),
        (
            "BONSAI_PACK_CACHE",
            scratch.join("pack-cache-changed").display().to_string(),
        ),
    ];
    timed_build(&exe, &build_args, &env)?;
    let hello = copy.join("examples/hello/src/hello.c");
    let info_path = copy.join("out").join(board).join("build.json");
    let hello_path = |p: &Path| -> Result<Option<String>> {
        let info: crate::build::BuildInfo = serde_json::from_str(&fs::read_to_string(p)?)?;
        Ok(info.store_paths.into_iter().find(|s| s.contains("-hello-")))
    };
    let mut before = hello_path(&info_path)?;
    let mut hello_rebuilt = before.is_some();
    let unique = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let mut changed = Vec::new();
    for i in 0..runs {
        let mut f = fs::OpenOptions::new().append(true).open(&hello)?;
        writeln!(f, "/* cargo xtask bench: change {unique}-{i} */")?;
        drop(f);
        changed.push(timed_build(&exe, &build_args, &env)?);
        let after = hello_path(&info_path)?;
        hello_rebuilt &= after.is_some() && after != before;
        before = after;
    }
    Ok(RebuildResult {
        no_change,
        no_change_rebuilt,
        changed,
        hello_rebuilt,
        fresh,
        fresh_warm,
    })
}

pub(crate) fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(entry.path())?, &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// Runs `xtask <args>` and times it, and each `==> step` line it prints on stderr.
fn timed_build<S: AsRef<std::ffi::OsStr>>(
    exe: &Path,
    args: &[S],
    env: &[(&str, String)],
) -> Result<TimedBuild> {
    let start = Instant::now();
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1")
        // The scratch copies' builds write under their own out/, where the bench reads them.
        .env_remove("BONSAI_OUT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn()?;
    let mut stdout = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let mut steps: Vec<(String, f64)> = Vec::new();
    let mut tail = Vec::new();
    for line in BufReader::new(child.stderr.take().context("stderr")?).lines() {
        let line = line?;
        if let Some(step) = line.strip_prefix("==> ") {
            steps.push((step_name(step), start.elapsed().as_secs_f64()));
        }
        tail.push(line);
        if tail.len() > 20 {
            tail.remove(0);
        }
    }
    let status = child.wait()?;
    let wall = start.elapsed().as_secs_f64();
    let stdout = reader.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "{} {} failed: {}",
            exe.display(),
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" "),
            tail.join(" | ")
        );
    }
    let mut phases = Vec::new();
    for (i, (name, at)) in steps.iter().enumerate() {
        let end = steps.get(i + 1).map_or(wall, |s| s.1);
        phases.push((name.clone(), end - at));
    }
    Ok(TimedBuild {
        wall,
        phases,
        stdout,
    })
}

/// `realise 3 packages and the kernel` -> `realise packages and the kernel`: a step's name
/// without its counts, so runs line up.
fn step_name(step: &str) -> String {
    let words: Vec<&str> = step
        .split(" (")
        .next()
        .unwrap_or(step)
        .split_whitespace()
        .filter(|w| !w.chars().all(|c| c.is_ascii_digit()))
        .collect();
    words.join(" ")
}

// ---------------------------------------------------------------------------------------
// Boots

fn bench_boots(board: &str, profile: &str, runs: u32) -> Result<Vec<BootRow>> {
    let conformance = Conformance {
        board: board.to_string(),
        profile: profile.to_string(),
        inits: Vec::new(),
        repeat: runs,
        timeout: None,
        broken: None,
    };
    let (columns, skipped) = conformance.columns()?;
    let mut rows: Vec<BootRow> = columns
        .into_iter()
        .map(|c| BootRow {
            ready: median(&c.ready),
            init_to_up: median(&c.init_to_up),
            boots: c.ready.len(),
            init: c.init,
            failure: c.failure,
        })
        .collect();
    for init in skipped {
        rows.push(BootRow {
            init,
            ready: None,
            init_to_up: None,
            boots: 0,
            failure: Some("skipped: no Rust target for this board".into()),
        });
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------
// The machine

struct Machine {
    cpu: String,
    nproc: usize,
    memory: String,
    kernel: String,
    qemu: String,
    accel: String,
    tools: String,
    date: String,
    /// 1-minute load average when the bench started and when it ended.
    load: (String, String),
    /// How many cores' worth of work the machine did, at the start and at the end: nproc
    /// copies of one compression job run at once, against one alone.
    effective_cores: (f64, f64),
}

/// The 1-minute load average.
fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// Compresses the same 8 MB with gzip -9 once alone, then once on each core at the same
/// time; the cores' worth of throughput the machine gave (nproc on an idle machine).
fn effective_cores() -> f64 {
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut rng = XorShift(7);
    let data: std::sync::Arc<Vec<u8>> = std::sync::Arc::new(
        (0..8 << 20)
            .map(|i| {
                if i % 16 < 9 {
                    b'a' + (i % 7) as u8
                } else {
                    rng.next() as u8
                }
            })
            .collect(),
    );
    let job = |data: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(std::io::sink(), flate2::Compression::best());
        let _ = e.write_all(data);
        let _ = e.finish();
    };
    let start = Instant::now();
    job(&data);
    let one = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let handles: Vec<_> = (0..nproc)
        .map(|_| {
            let data = std::sync::Arc::clone(&data);
            std::thread::spawn(move || job(&data))
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    let all = start.elapsed().as_secs_f64();
    nproc as f64 * one / all
}

fn machine(load_at_start: String, cores_at_start: f64) -> Result<Machine> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|x| x.1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let first_line = |program: &str, args: &[&str]| -> String {
        Command::new(program)
            .args(args)
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("{program}: not found"))
    };
    let kernel = format!(
        "{} {}",
        fs::read_to_string("/proc/sys/kernel/ostype")
            .unwrap_or_default()
            .trim(),
        fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    let os = fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|s| s.trim_matches('"').to_string())
        .unwrap_or_default();
    Ok(Machine {
        cpu,
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory: format!("{:.1} GiB", mem_kib as f64 / (1024.0 * 1024.0)),
        kernel: format!("{kernel} ({os})"),
        qemu: first_line("qemu-system-x86_64", &["--version"]),
        accel: qemu::Accel::detect().as_str().to_uppercase(),
        tools: [
            first_line("gzip", &["--version"]),
            first_line("cpio", &["--version"]),
            first_line("rustc", &["--version"]),
        ]
        .join(", "),
        date: first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        load: (load_at_start, load_average()),
        effective_cores: (cores_at_start, effective_cores()),
    })
}

// ---------------------------------------------------------------------------------------
// The report

struct Report<'a> {
    command: String,
    runs: usize,
    quick: bool,
    board: &'a str,
    nice: Option<i32>,
    machine: Machine,
    packing: &'a [PackResult],
    rebuild: &'a RebuildResult,
    /// Per profile: its boot rows.
    boots: Option<&'a [(String, Vec<BootRow>)]>,
    media: Option<&'a MediaResult>,
    updates: Option<&'a crate::benchupdate::UpdateResult>,
    team: Option<&'a crate::benchteam::TeamResult>,
}

fn mb(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

fn pct(a: f64, b: f64) -> String {
    format!("{:+.2} %", (a / b - 1.0) * 100.0)
}

pub(crate) fn yes(met: bool) -> &'static str {
    if met {
        "**met**"
    } else {
        "not met"
    }
}

/// BENCHMARKS.md: the machine, then one section per measurement, then the targets.
fn render(r: &Report) -> String {
    let mut s = String::new();
    let mut line = |text: String| {
        s.push_str(&text);
        s.push('\n');
    };
    let figures = RebuildFigures::of(r.rebuild);
    render_machine(r, &mut line);
    render_packing(r, &mut line);
    render_rebuild(r, &figures, &mut line);
    render_boot(r, &mut line);
    render_media(r, &mut line);
    crate::benchupdate::render(r.updates, r.board, &mut line);
    crate::benchteam::render(r.team, r.board, &mut line);
    render_targets(r, &figures, &mut line);
    s
}

/// The medians of the rebuild runs that the rebuild section and the targets both show.
#[derive(Clone, Copy)]
struct RebuildFigures {
    no_change: f64,
    changed: f64,
    fresh: f64,
    cold_pack: f64,
    fresh_warm: f64,
    warm_pack: f64,
    changed_pack: f64,
}

impl RebuildFigures {
    fn of(rb: &RebuildResult) -> RebuildFigures {
        let pack_phase = |b: &TimedBuild| {
            b.phases
                .iter()
                .filter(|(n, _)| n.starts_with("pack initramfs"))
                .map(|p| p.1)
                .sum::<f64>()
        };
        RebuildFigures {
            no_change: med(rb.no_change.iter().copied()),
            changed: med(rb.changed.iter().map(|b| b.wall)),
            fresh: med(rb.fresh.iter().map(|b| b.wall)),
            cold_pack: med(rb.fresh.iter().map(pack_phase)),
            fresh_warm: med(rb.fresh_warm.iter().map(|b| b.wall)),
            warm_pack: med(rb.fresh_warm.iter().map(pack_phase)),
            changed_pack: med(rb.changed.iter().map(pack_phase)),
        }
    }
}

/// The title, how the figures were taken, and the machine.
fn render_machine(r: &Report, line: &mut impl FnMut(String)) {
    let m = &r.machine;
    line("# Benchmarks".into());
    line(String::new());
    line(format!(
        "Written by `{}` on {}{}. Every figure is the median of {} run(s) unless it says otherwise; \
         times are wall-clock seconds on a warm page cache and a warm Nix store. The command \
         reports and never fails on a time, so CI runs `cargo xtask bench --quick` only to \
         keep it working.",
        r.command,
        m.date,
        if r.quick { " (quick mode: one run, a 20 MB synthetic tree, no boots)" } else { "" },
        r.runs
    ));
    line(String::new());
    line("| machine | |".into());
    line("| --- | --- |".into());
    line(format!("| CPU | {} |", m.cpu));
    line(format!("| cores (`nproc`) | {} |", m.nproc));
    line(format!("| memory | {} |", m.memory));
    line(format!("| kernel | {} |", m.kernel));
    line(format!("| QEMU | {} ({}) |", m.qemu, m.accel));
    line(format!("| tools | {} |", m.tools));
    line(format!(
        "| load average (1 min) | {} at the start, {} at the end |",
        m.load.0, m.load.1
    ));
    line(format!(
        "| cores' worth of throughput | {:.2} at the start, {:.2} at the end ({} copies of a gzip -9 job at once against one alone; {} on an idle machine) |",
        m.effective_cores.0, m.effective_cores.1, m.nproc, m.nproc
    ));
    line(String::new());
    if m.load.0.parse::<f64>().is_ok_and(|l| l > 0.5) {
        line(format!(
            "Other work was running on the machine (load average {} before the bench started \
             anything), so times, and most of all the gain from more threads, are noisier and \
             slower than on an idle machine of {} cores; CPU seconds are less affected than \
             wall times.{}",
            m.load.0,
            m.nproc,
            match r.nice {
                Some(n) => format!(
                    " The bench ran at niceness {n} (`--nice`), it and everything it started, \
                     to keep that work from skewing the comparison."
                ),
                None => String::new(),
            }
        ));
        line(String::new());
    }
}

/// bonsai's packer against the gzip pipelines, per tree.
fn render_packing(r: &Report, line: &mut impl FnMut(String)) {
    let m = &r.machine;
    line("## Packing".into());
    line(String::new());
    line(format!(
        "bonsai's packer (`rootfs::Tree::add_host_tree` on the unpacked tree, then `rootfs::pack` \
         with gzip level 9: cpio writer, parallel gzip, fsync and rename), run as a child process \
         that reports its own CPU time (utime + stime of all threads) and peak memory (VmHWM), \
         against `{}` (and `-6n`) under bash's `time` (wall, user + sys of the whole pipeline), \
         on the same root tree. Ratios are against the gzip -9n pipeline.",
        PIPELINE.replace("{level}", "9")
    ));
    for p in r.packing {
        line(String::new());
        line(format!(
            "### {}: {} files, {} directories, {} symlinks ({} cpio entries), {} of file data, cpio stream {}",
            p.tree,
            p.files,
            p.dirs,
            p.symlinks,
            p.entries,
            mb(p.content_bytes),
            mb(p.archive_bytes)
        ));
        line(String::new());
        line("| packer | wall (s) | CPU (s) | output | size vs gzip -9n | speed vs gzip -9n | peak memory |".into());
        line("| --- | ---: | ---: | ---: | ---: | ---: | ---: |".into());
        let base = &p.packers[2];
        for k in &p.packers {
            line(format!(
                "| {} | {:.3} | {:.3} | {} ({} B) | {} | {:.2}× | {} |",
                k.name,
                k.wall(),
                k.cpu(),
                mb(k.bytes()),
                k.bytes(),
                pct(k.bytes() as f64, base.bytes() as f64),
                base.wall() / k.wall(),
                k.peak_rss()
                    .map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0))
            ));
        }
        line(String::new());
        line(format!(
            "Same cpio stream, compressor alone: bonsai's archive recompressed with `gzip -9n` is \
             {} B; bonsai's gzip is {} B ({}). Output identical with 1 and {} threads: {}.",
            p.same_stream_gzip9,
            p.packers[0].bytes(),
            pct(p.packers[0].bytes() as f64, p.same_stream_gzip9 as f64),
            m.nproc,
            if p.identical_across_threads {
                "yes"
            } else {
                "NO"
            }
        ));
    }
    line(String::new());
}

/// Rebuild times, and where the time of each build goes.
fn render_rebuild(r: &Report, f: &RebuildFigures, line: &mut impl FnMut(String)) {
    let rb = r.rebuild;
    let RebuildFigures {
        no_change,
        changed,
        fresh,
        cold_pack,
        fresh_warm,
        warm_pack,
        changed_pack,
    } = *f;
    line("## Rebuild".into());
    line(String::new());
    line(format!(
        "The xtask binary running the bench (`std::env::current_exe()`), not `cargo run`, \
         building `--board {}` with its default profile. \"One package changed\" runs on a scratch copy of `boards/ profiles/ \
         kernel-configs/ nix/` (`BONSAI_ROOT`), appending a comment line to \
         `examples/hello/src/hello.c` before each run, so Nix rebuilds `hello` and bonsai \
         re-assembles and repacks{}, with a pack cache that the first (untimed) build filled. \
         \"Fresh output folder\" builds into a new `--out` folder: Nix's cache answers, everything \
         else is done from scratch, with an empty pack cache (`BONSAI_PACK_CACHE` pointing at a new \
         folder each run) or with a warm one. A pack step runs from the `==> pack initramfs` line \
         to the end of the process (pack, manifest, output hashes, the swap of the folder); the \
         \"cold pack\" is that step with an empty cache.",
        r.board,
        if rb.hello_rebuilt {
            " (a new hello store path every run: checked)"
        } else {
            " (WARNING: hello's store path did not change every run)"
        }
    ));
    line(String::new());
    line("| case | wall (s) | runs |".into());
    line("| --- | ---: | ---: |".into());
    line(format!(
        "| no change{} | {:.3} | {} |",
        if rb.no_change_rebuilt == 0 {
            String::new()
        } else {
            format!(
                " (WARNING: {} run(s) rebuilt: an input changed meanwhile)",
                rb.no_change_rebuilt
            )
        },
        no_change,
        rb.no_change.len()
    ));
    line(format!(
        "| one package changed (hello.c) | {:.3} | {} |",
        changed,
        rb.changed.len()
    ));
    line(format!(
        "| pack step after one package changed (warm pack cache) | {:.3} | {} |",
        changed_pack,
        rb.changed.len()
    ));
    line(format!(
        "| fresh output folder, empty pack cache | {:.3} | {} |",
        fresh,
        rb.fresh.len()
    ));
    line(format!(
        "| cold pack (pack step of that build) | {:.3} | {} |",
        cold_pack,
        rb.fresh.len()
    ));
    line(format!(
        "| fresh output folder, warm pack cache | {:.3} | {} |",
        fresh_warm,
        rb.fresh_warm.len()
    ));
    line(format!(
        "| warm pack (pack step of that build) | {:.3} | {} |",
        warm_pack,
        rb.fresh_warm.len()
    ));
    line(String::new());
    line("Where the time goes (median seconds per step, as the build prints them):".into());
    line(String::new());
    let mut names: Vec<String> = Vec::new();
    for b in rb.changed.iter().chain(&rb.fresh).chain(&rb.fresh_warm) {
        for (n, _) in &b.phases {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    let phase = |builds: &[TimedBuild], name: &str| -> String {
        let v: Vec<f64> = builds
            .iter()
            .map(|b| {
                b.phases
                    .iter()
                    .filter(|(n, _)| n == name)
                    .map(|p| p.1)
                    .sum()
            })
            .collect();
        median(&v).map_or("-".into(), |x| format!("{x:.3}"))
    };
    line("| step | one package changed | fresh output folder, empty pack cache | fresh output folder, warm pack cache |".into());
    line("| --- | ---: | ---: | ---: |".into());
    let groups = [&rb.changed, &rb.fresh, &rb.fresh_warm];
    let before_steps: Vec<String> = groups
        .iter()
        .map(|builds| {
            let v: Vec<f64> = builds
                .iter()
                .map(|b| b.wall - b.phases.iter().map(|p| p.1).sum::<f64>())
                .collect();
            median(&v).map_or("-".into(), |x| format!("{x:.3}"))
        })
        .collect();
    line(format!(
        "| start: load config, fingerprint | {} |",
        before_steps.join(" | ")
    ));
    for n in &names {
        let cells: Vec<String> = groups.iter().map(|b| phase(b, n)).collect();
        line(format!("| {n} | {} |", cells.join(" | ")));
    }
    line(String::new());
}

/// Boot times per profile and init backend.
fn render_boot(r: &Report, line: &mut impl FnMut(String)) {
    let m = &r.machine;
    line("## Boot".into());
    line(String::new());
    match r.boots {
        None => line("Not measured (`--quick`).".into()),
        Some(profiles) => {
            line(format!(
                "`cargo xtask conformance --board {b} --profile <p> --repeat {n}`'s figures, for the \
                 `conformance` profile (six services with dependencies, restarts, a user, static \
                 addresses and routes; its oneshots run busybox `sh` one after another) and for \
                 the board's default profile, booted under {accel} with each init backend: guest \
                 uptime when the ready marker is printed, and from the kernel's `Run /init` line \
                 to services up, medians of the boots. Both ends of the latter are kernel log \
                 timestamps (one clock, to the microsecond; `/proc/uptime` runs several \
                 milliseconds apart from it under QEMU): services up is the record bonsai-init \
                 writes to `/dev/kmsg` the moment every service has started, and for the other \
                 backends the one the readiness harness writes when it starts, after every \
                 service. The bench measures only that whole span; a breakdown of bonsai-init's \
                 part of it, taken once by hand, is a dated note outside this generated file \
                 (`docs/notes/2026-11-28-bonsai-init-under-tcg.md`).",
                b = r.board,
                n = r.runs,
                accel = m.accel
            ));
            line(String::new());
            line("| board | profile | init | ready at (s, guest uptime) | /init to services up (ms) | boots | result |".into());
            line("| --- | --- | --- | ---: | ---: | ---: | --- |".into());
            for (profile, rows) in profiles {
                for b in rows {
                    line(format!(
                        "| {} | {} | {} | {} | {} | {} | {} |",
                        r.board,
                        profile,
                        b.init,
                        b.ready.map_or("-".into(), |v| format!("{v:.3}")),
                        b.init_to_up
                            .map_or("-".into(), |v| format!("{:.0}", v * 1000.0)),
                        b.boots,
                        b.failure.as_deref().unwrap_or("all checks pass")
                    ));
                }
            }
        }
    }
    line(String::new());
}

fn render_media(r: &Report, line: &mut impl FnMut(String)) {
    line("## Boot media and rollback".into());
    line(String::new());
    let Some(m) = r.media else {
        line("Not measured (`--quick`).".into());
        line(String::new());
        return;
    };
    let kernel = median(&m.kernel_ready).unwrap_or(f64::NAN);
    let firmware = median(&m.firmware_ready).unwrap_or(f64::NAN);
    line(format!(
        "{b}'s default image ({p}, init {i}) booted {n} time(s) each way, alternately, under \
         {accel}: host seconds from QEMU's start to the ready marker (medians). The baseline is \
         QEMU's `-kernel`; the firmware boot is a fresh copy of `disk.img` through UEFI and \
         systemd-boot (`boot --disk`), a new device's first boot (its trial's health step and \
         blessing come after the ready marker).",
        b = r.board,
        p = m.profile,
        i = m.init,
        n = m.kernel_ready.len(),
        accel = r.machine.accel
    ));
    line(String::new());
    line("| boot | to the ready marker (s) | vs `-kernel` |".into());
    line("| --- | ---: | ---: |".into());
    line(format!("| `-kernel` | {kernel:.2} | 1.00× |"));
    line(format!(
        "| UEFI firmware, systemd-boot, disk | {firmware:.2} | {:.2}× |",
        firmware / kernel
    ));
    line(String::new());
    line(format!(
        "Rollback, from `cargo xtask ab-test --board {b}` in the same run: host seconds from \
         the first launch of the bad release in slot B to slot A's ready marker, after B used \
         up its {t} tries, and the same in firmware boots (the median above).",
        b = r.board,
        t = m.tries
    ));
    line(String::new());
    line(
        "| scenario | launches | first bad try to A's ready marker (s) | in firmware boots |"
            .into(),
    );
    line("| --- | ---: | ---: | ---: |".into());
    for (name, launches, secs) in &m.rollbacks {
        match secs {
            Some(t) => line(format!(
                "| `{name}` | {launches} | {t:.1} | {:.1}× |",
                t / firmware
            )),
            None => line(format!("| `{name}` | {launches} | failed | - |")),
        }
    }
    line(String::new());
}

/// Each target, what was measured against it, and whether it is met.
fn render_targets(r: &Report, f: &RebuildFigures, line: &mut impl FnMut(String)) {
    let RebuildFigures {
        no_change,
        changed,
        fresh,
        cold_pack,
        changed_pack,
        ..
    } = *f;
    line("## Targets".into());
    line(String::new());
    line("| target | measured | |".into());
    line("| --- | --- | --- |".into());
    for p in r.packing {
        let (b, g) = (&p.packers[0], &p.packers[2]);
        let speed = g.wall() / b.wall();
        line(format!(
            "| packing the {}: ≥ 2× faster (wall) than the gzip -9n pipeline, output no larger | {:.2}× ({:.3} s vs {:.3} s; CPU {:.2} s vs {:.2} s), {} vs {} B ({}) | {} |",
            p.tree,
            speed,
            b.wall(),
            g.wall(),
            b.cpu(),
            g.cpu(),
            b.bytes(),
            g.bytes(),
            pct(b.bytes() as f64, g.bytes() as f64),
            yes(speed >= 2.0 && b.bytes() <= g.bytes())
        ));
    }
    line(format!(
        "| no-change rebuild < 0.3 s | {no_change:.3} s | {} |",
        yes(no_change < 0.3)
    ));
    line(format!(
        "| one changed package < 25 % of a cold pack | bonsai's repack: {changed_pack:.3} s = {:.0} % of the cold pack ({cold_pack:.3} s) | {} |",
        changed_pack / cold_pack * 100.0,
        yes(changed_pack < 0.25 * cold_pack)
    ));
    line(format!(
        "| (the same, whole build) | {changed:.3} s with Nix recompiling hello = {:.0} % of the cold pack, {:.0} % of a fresh-folder build ({fresh:.3} s) | {} |",
        changed / cold_pack * 100.0,
        changed / fresh * 100.0,
        yes(changed < 0.25 * cold_pack)
    ));
    if let Some(big) = r.packing.get(1) {
        let peak = big.packers[0].peak_rss().unwrap_or(0);
        line(format!(
            "| peak memory < 64 MB packing the {} | {:.1} MB (VmHWM, whole process) | {} |",
            big.tree,
            peak as f64 / 1e6,
            yes(peak < 64_000_000)
        ));
    }
    let bonsai_init: Vec<(&str, &BootRow)> = r
        .boots
        .unwrap_or_default()
        .iter()
        .filter_map(|(p, rows)| Some((p.as_str(), rows.iter().find(|b| b.init == "bonsai-init")?)))
        .collect();
    if bonsai_init.is_empty() {
        line(format!(
            "| {} with bonsai-init ready within 1.0 s, /init to services up < 50 ms | not measured{} | - |",
            r.board,
            if r.quick { " (`--quick`)" } else { "" }
        ));
    }
    for (profile, b) in bonsai_init {
        line(format!(
            "| {} ({profile}) with bonsai-init ready within 1.0 s of guest uptime | {} | {} |",
            r.board,
            b.ready
                .map_or("not measured".into(), |v| format!("{v:.3} s")),
            yes(b.ready.is_some_and(|v| v <= 1.0))
        ));
        line(format!(
            "| {} ({profile}) with bonsai-init: /init to services up < 50 ms | {} | {} |",
            r.board,
            b.init_to_up
                .map_or("not measured".into(), |v| format!("{:.0} ms", v * 1000.0)),
            yes(b.init_to_up.is_some_and(|v| v < 0.05))
        ));
    }
    crate::benchupdate::render_targets(r.updates, line);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_is_replaced_in_place_or_put_before_the_targets() {
        let report = "# B\n\n## Updates\n\nu\n\n## Team cache\n\nold\n\n## Targets\n\nt\n";
        let new = "## Team cache\n\nnew\n\n";
        assert_eq!(
            splice_section(report, "## Team cache", new),
            "# B\n\n## Updates\n\nu\n\n## Team cache\n\nnew\n\n## Targets\n\nt\n"
        );
        let without = "# B\n\n## Updates\n\nu\n\n## Targets\n\nt\n";
        assert_eq!(
            splice_section(without, "## Team cache", new),
            "# B\n\n## Updates\n\nu\n\n## Team cache\n\nnew\n\n## Targets\n\nt\n"
        );
    }

    #[test]
    fn the_team_cache_section_states_the_ratio_and_the_goal() {
        let run = |wall_s, built, fetched| crate::benchteam::Run {
            wall_s,
            built,
            fetched,
        };
        let r = crate::benchteam::TeamResult {
            push_s: 5.0,
            pushed: "6 store paths (16.11 MiB)".into(),
            with_cache: run(12.0, 0, 6),
            without_cache: Some(run(600.0, 14, 0)),
        };
        let mut text = String::new();
        crate::benchteam::render(Some(&r), "qemu-x86_64", &mut |l: String| {
            text.push_str(&l);
            text.push('\n');
        });
        assert!(text.starts_with("## Team cache\n"), "{text}");
        assert!(
            text.contains("| with the team's cache | 12.0 s | 0 derivations | 6 store paths |"),
            "{text}"
        );
        assert!(
            text.contains("| without a cache | 600.0 s | 14 derivations | 0 store paths |"),
            "{text}"
        );
        assert!(text.contains("takes 2.0 % of the time without it (12.0 s against 600.0 s); the goal is 60 s or less with the cache: met."), "{text}");
    }

    fn timed(wall: f64, phases: &[(&str, f64)]) -> TimedBuild {
        TimedBuild {
            wall,
            phases: phases.iter().map(|(n, t)| (n.to_string(), *t)).collect(),
            stdout: String::new(),
        }
    }

    fn packer(name: &str, wall: f64, bytes: u64) -> Packer {
        Packer {
            name: name.into(),
            samples: vec![Sample {
                wall,
                cpu: wall * 1.5,
                bytes,
                peak_rss: Some(20 << 20),
            }],
        }
    }

    /// A report with every section filled, from made-up figures.
    fn sample_report<'a>(
        packing: &'a [PackResult],
        rebuild: &'a RebuildResult,
        boots: Option<&'a [(String, Vec<BootRow>)]>,
        load: &str,
    ) -> Report<'a> {
        Report {
            command: "cargo xtask bench".into(),
            runs: 3,
            quick: boots.is_none(),
            board: "qemu-x86_64",
            nice: Some(10),
            machine: Machine {
                cpu: "a CPU".into(),
                nproc: 2,
                memory: "24 GiB".into(),
                kernel: "6.1".into(),
                qemu: "QEMU 7.2".into(),
                accel: "TCG".into(),
                tools: "gzip 1.12".into(),
                date: "2026-12-01 12:00 UTC".into(),
                load: (load.into(), "0.40".into()),
                effective_cores: (1.9, 1.8),
            },
            packing,
            rebuild,
            boots,
            media: None,
            updates: None,
            team: None,
        }
    }

    /// Boot rows per profile, as the report takes them.
    type Boots = Vec<(String, Vec<BootRow>)>;

    fn sample_parts() -> (Vec<PackResult>, RebuildResult, Boots) {
        let tree = |name: &str, scale: u64| PackResult {
            tree: name.into(),
            files: 10 * scale,
            dirs: 3 * scale,
            symlinks: scale,
            content_bytes: 1_000_000 * scale,
            entries: 14 * scale,
            archive_bytes: 1_100_000 * scale,
            packers: vec![
                packer("bonsai", 0.5, 400_000 * scale),
                packer("bonsai (1 thread)", 0.9, 400_000 * scale),
                packer("gzip -9n", 1.5, 410_000 * scale),
                packer("gzip -6n", 0.8, 420_000 * scale),
            ],
            same_stream_gzip9: 405_000 * scale,
            identical_across_threads: true,
        };
        let rebuild = RebuildResult {
            no_change: vec![0.1, 0.12, 0.11],
            no_change_rebuilt: 1,
            changed: vec![timed(
                2.0,
                &[
                    ("realise packages and the kernel", 1.5),
                    ("pack initramfs", 0.2),
                ],
            )],
            hello_rebuilt: true,
            fresh: vec![timed(
                3.0,
                &[
                    ("select files from store paths", 0.5),
                    ("pack initramfs", 1.8),
                ],
            )],
            fresh_warm: vec![timed(1.5, &[("pack initramfs", 0.3)])],
        };
        let row = |init: &str, ready: Option<f64>| BootRow {
            init: init.into(),
            ready,
            init_to_up: ready.map(|r| r / 20.0),
            boots: 3,
            failure: ready.is_none().then(|| "no ready marker".to_string()),
        };
        let boots = vec![
            (
                "conformance".to_string(),
                vec![row("busybox", Some(1.2)), row("bonsai-init", Some(0.8))],
            ),
            ("minimal".to_string(), vec![row("bonsai-init", None)]),
        ];
        (
            vec![tree("image tree", 1), tree("synthetic tree", 20)],
            rebuild,
            boots,
        )
    }

    #[test]
    fn the_report_has_every_section_in_order_with_its_figures() {
        let (packing, rebuild, boots) = sample_parts();
        let full = render(&sample_report(&packing, &rebuild, Some(&boots), "1.50"));
        let at = |text: &str| {
            full.find(text)
                .unwrap_or_else(|| panic!("no {text:?} in:\n{full}"))
        };
        let order = [
            "# Benchmarks",
            "| machine |",
            "## Packing",
            "## Rebuild",
            "## Boot",
            "## Targets",
        ];
        let places: Vec<usize> = order.iter().map(|t| at(t)).collect();
        assert!(places.windows(2).all(|w| w[0] < w[1]), "{places:?}");
        // Figures from the report reach their sections.
        at("| no change (WARNING: 1 run(s) rebuilt: an input changed meanwhile) | 0.110 | 3 |");
        at("| cold pack (pack step of that build) | 1.800 | 1 |");
        at("| qemu-x86_64 | conformance | bonsai-init | 0.800 | 40 | 3 | all checks pass |");
        at("| qemu-x86_64 | minimal | bonsai-init | - | - | 3 | no ready marker |");
        at("| no-change rebuild < 0.3 s | 0.110 s | **met** |");
        at("Other work was running on the machine (load average 1.50");
        let quick = render(&sample_report(&packing, &rebuild, None, "0.10"));
        assert!(
            quick.contains("## Boot\n\nNot measured (`--quick`)."),
            "{quick}"
        );
        assert!(!quick.contains("Other work was running"), "{quick}");
    }

    /// The report states only what this run measured: no figure in the prose of the boot
    /// section (it once carried a fixed breakdown of bonsai-init's time, printed on every
    /// machine).
    #[test]
    fn the_boot_section_prose_holds_no_figure_of_its_own() {
        let (packing, rebuild, boots) = sample_parts();
        let full = render(&sample_report(&packing, &rebuild, Some(&boots), "0.10"));
        let boot = &full[full.find("## Boot").unwrap()..full.find("## Targets").unwrap()];
        for prose in boot.lines().filter(|l| !l.starts_with('|')) {
            let words: Vec<&str> = prose.split_whitespace().collect();
            for w in words.windows(2) {
                let number = w[0].trim_start_matches(['(', '~']).parse::<f64>().is_ok();
                assert!(
                    !(number && ["ms", "s", "KB", "MB", "ms,", "ms)"].contains(&w[1])),
                    "a fixed figure in the boot section: {} {} in {prose}",
                    w[0],
                    w[1]
                );
            }
        }
        assert!(boot.contains("docs/notes/2026-11-28-bonsai-init-under-tcg.md"));
    }

    #[test]
    fn the_media_section_gives_ratios_against_the_kernel_boot_of_the_same_run() {
        let (packing, rebuild, boots) = sample_parts();
        let media = MediaResult {
            profile: "minimal".into(),
            init: "busybox".into(),
            kernel_ready: vec![4.0, 5.0, 6.0],
            firmware_ready: vec![10.0, 11.0, 12.0],
            tries: 3,
            rollbacks: vec![
                ("b-hangs-rolls-back".into(), 4, Some(132.0)),
                ("b-init-panics-rolls-back".into(), 2, None),
            ],
        };
        let mut r = sample_report(&packing, &rebuild, Some(&boots), "0.10");
        r.media = Some(&media);
        let text = render(&r);
        assert!(text.contains("| `-kernel` | 5.00 | 1.00× |"), "{text}");
        assert!(
            text.contains("| UEFI firmware, systemd-boot, disk | 11.00 | 2.20× |"),
            "{text}"
        );
        assert!(
            text.contains("| `b-hangs-rolls-back` | 4 | 132.0 | 12.0× |"),
            "{text}"
        );
        assert!(
            text.contains("| `b-init-panics-rolls-back` | 2 | failed | - |"),
            "{text}"
        );
        let boot = text.find("## Boot\n").unwrap();
        let media_at = text.find("## Boot media and rollback").unwrap();
        assert!(boot < media_at && media_at < text.find("## Targets").unwrap());
    }

    #[test]
    fn step_names_drop_counts_and_details() {
        assert_eq!(
            step_name("realise 3 packages and the kernel"),
            "realise packages and the kernel"
        );
        assert_eq!(
            step_name("pack initramfs (gzip, 588 entries)"),
            "pack initramfs"
        );
        assert_eq!(
            step_name("select files from 4 store paths"),
            "select files from store paths"
        );
    }

    #[test]
    fn the_synthetic_tree_is_the_same_every_time() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        write_synthetic_tree(a.path(), 200_000).unwrap();
        write_synthetic_tree(b.path(), 200_000).unwrap();
        let (files, dirs, symlinks, bytes) = count_tree(a.path()).unwrap();
        assert_eq!(
            count_tree(b.path()).unwrap(),
            (files, dirs, symlinks, bytes)
        );
        assert!(
            files > 15 && bytes >= 200_000,
            "{files} files, {bytes} bytes"
        );
        let first = a.path().join("nix/store/00-pkg/share/d00/f000000");
        let again = b.path().join("nix/store/00-pkg/share/d00/f000000");
        assert_eq!(fs::read(first).unwrap(), fs::read(again).unwrap());
    }

    #[test]
    fn process_figures_are_readable() {
        assert!(self_cpu_seconds().unwrap() >= 0.0);
        assert!(status_kib("VmHWM").unwrap() > 0);
        assert!(load_average().parse::<f64>().is_ok());
    }
}
