//! The bench's update section: what a device on release N fetches to get N+1 (one package
//! changed), by bonsai's delta against the full bundle and against casync, zsync, xdelta3 and
//! `zstd --patch-from` on the same pair, in one run; and the install as the device did it
//! (`cargo xtask update-test`, run by the bench): bytes fetched, install time, power cuts.
//!
//! Every other method's output is decoded again and compared with the new slot's bytes, so a
//! figure never comes from a transfer that would not have worked.

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::bench::yes;
use crate::build::BuildInfo;
use crate::update::DeltaReport;
use crate::{host, ui};

/// One way to bring a device from the old release to the new one.
pub struct Method {
    pub name: String,
    /// Bytes the device fetches (patch, index and chunks, or the whole bundle).
    pub bytes: u64,
    /// The server needs a file made for this exact pair of releases (a patch), rather than
    /// one index and store that serve every older release.
    pub per_pair: bool,
    pub how: String,
}

pub struct UpdateResult {
    pub old: String,
    pub new: String,
    /// The package the new release changes, and its versions.
    pub change: String,
    /// The new slot's files (kernel, initramfs), bytes.
    pub slot_bytes: u64,
    pub delta: DeltaReport,
    pub methods: Vec<Method>,
    /// What the device reported fetching in update-test's install scenario.
    pub device_fetched: u64,
    /// Host seconds from the install's first line (verified) to armed.
    pub install_s: f64,
    /// Host seconds from QEMU's start to armed (the boot of the old release, then the install).
    pub launch_to_armed_s: f64,
    /// Each install phase, host seconds.
    pub phases: Vec<(String, f64)>,
    /// "N of N" from the same run's power cuts (not in `--quick`).
    pub power_cuts: Option<(String, usize)>,
    pub scenarios: Vec<(String, String)>,
}

/// The tools, as Debian packages.
const TOOLS: &[host::Tool] = &[
    host::Tool {
        program: "casync",
        package: "casync",
    },
    host::Tool {
        program: "zsync",
        package: "zsync",
    },
    host::Tool {
        program: "zsyncmake",
        package: "zsync",
    },
    host::Tool {
        program: "xdelta3",
        package: "xdelta3",
    },
    host::Tool {
        program: "zstd",
        package: "zstd",
    },
];

pub fn bench_updates(board: &str, scratch: &Path, quick: bool) -> Result<UpdateResult> {
    host::ensure(TOOLS, &[])?;
    let exe = std::env::current_exe()?;
    let work = scratch.join("update-test");
    // The device's view: update-test installs 1.1.0 over 1.0.0 under the firmware (and, in
    // a full run, every other scenario with 20 power cuts).
    let mut args = vec!["update-test", "--board", board, "--json", "--out"];
    let work_s = work.display().to_string();
    args.push(&work_s);
    if quick {
        args.extend(["--only", "install"]);
    }
    ui::detail(format!("cargo xtask {}", args.join(" ")));
    let out = Command::new(&exe)
        .args(&args)
        .stderr(Stdio::inherit())
        .output()
        .context("running xtask update-test")?;
    if !out.status.success() {
        bail!("cargo xtask {} failed", args.join(" "));
    }
    let m: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("reading update-test --json")?;
    let rows = m["scenarios"]
        .as_array()
        .context("update-test: no scenarios")?;
    let scenarios: Vec<(String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap_or("?").to_string(),
                r["result"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    if let Some((n, r)) = scenarios.iter().find(|(_, r)| r != "pass") {
        bail!("update-test scenario {n}: {r}");
    }
    let install = rows
        .iter()
        .find(|r| r["name"] == "install")
        .context("update-test ran no install scenario")?;
    let device_fetched = install["fetched_bytes"]
        .as_u64()
        .context("the install reported no bytes fetched")?;
    let times: Vec<(String, f64)> = install["launches"][0]["update_times"]
        .as_array()
        .context("the install's first launch has no update lines")?
        .iter()
        .filter_map(|p| Some((p[0].as_str()?.to_string(), p[1].as_f64()?)))
        .collect();
    let at = |prefix: &str| crate::updatetest::line_time(&times, prefix);
    let (first, armed) = (
        times.first().map_or(f64::NAN, |t| t.1),
        at("BONSAI-UPDATE-ARMED")?,
    );
    let mut phases = Vec::new();
    for (name, from, to) in [
        ("verify", None, "BONSAI-UPDATE-VERIFIED"),
        ("plan", Some("BONSAI-UPDATE-VERIFIED"), "BONSAI-UPDATE-PLAN"),
        ("fetch", Some("BONSAI-UPDATE-PLAN"), "BONSAI-UPDATE-FETCHED"),
        (
            "write and fsync",
            Some("BONSAI-UPDATE-PHASE write"),
            "BONSAI-UPDATE-PHASE arm",
        ),
        (
            "arm",
            Some("BONSAI-UPDATE-PHASE arm"),
            "BONSAI-UPDATE-ARMED",
        ),
    ] {
        if let Some(from) = from {
            phases.push((name.to_string(), at(to)? - at(from)?));
        }
    }
    let power_cuts = m["power_cuts_survived"]
        .as_str()
        .filter(|_| !quick)
        .map(|s| {
            (
                s.to_string(),
                m["power_cuts_missed"].as_u64().unwrap_or(0) as usize,
            )
        });

    // The host's view of the same pair: the releases update-test built, bundled with its key.
    let key_file = work.join("update-test.key");
    let key = bundle::SecretKey::parse(&fs::read_to_string(&key_file)?)
        .map_err(|e| anyhow::anyhow!("{}: {e}", key_file.display()))?;
    let rel = |v: &str| -> Result<(PathBuf, crate::image::SlotFiles)> {
        let out = work.join("build").join(v);
        let info: BuildInfo = serde_json::from_str(&fs::read_to_string(out.join("build.json"))?)?;
        let dir = scratch.join("releases").join(format!("{board}-{v}"));
        fs::create_dir_all(&dir)?;
        crate::update::write_bundle(&dir, board, v, &out, &info, &key)?;
        // As in a release folder: `delta` reads the initramfs for its cpio comparison.
        fs::copy(out.join(&info.initramfs), dir.join(&info.initramfs))?;
        Ok((dir, crate::image::SlotFiles::read(&out, &info)?))
    };
    let (old_v, new_v) = ("1.0.0", "1.1.0");
    let (old_dir, old_files) = rel(old_v)?;
    let (new_dir, new_files) = rel(new_v)?;
    let delta = crate::update::delta(&old_dir, &new_dir)?;
    if delta.fetched_bytes != device_fetched {
        bail!(
            "the device fetched {device_fetched} bytes installing {new_v} over {old_v}; cargo xtask delta says {}",
            delta.fetched_bytes
        );
    }

    // The other tools work on the slot as one file: its files one after another.
    let slot = |f: &crate::image::SlotFiles| {
        let mut v = f.kernel.clone();
        v.extend_from_slice(&f.initrd);
        if let Some(d) = &f.dtb {
            v.extend_from_slice(d);
        }
        v
    };
    let t = scratch.join("delta-tools");
    fs::create_dir_all(t.join("srv"))?;
    let (old_img, new_img) = (t.join("old.img"), t.join("srv/new.img"));
    fs::write(&old_img, slot(&old_files))?;
    let new_bytes = slot(&new_files);
    fs::write(&new_img, &new_bytes)?;

    let full = fs::metadata(new_dir.join(format!("{board}-{new_v}.bundle")))?.len();
    let mut methods = vec![
        Method {
            name: "full bundle".into(),
            bytes: full,
            per_pair: false,
            how: "the whole signed bundle".into(),
        },
        Method {
            name: "bonsai delta".into(),
            bytes: delta.fetched_bytes,
            per_pair: false,
            how: format!(
                "head (manifest and signature) {} B + {} of {} chunks, {} B",
                delta.head_bytes, delta.chunks_fetched, delta.chunks, delta.payload_fetched
            ),
        },
    ];
    for (label, size) in [
        ("default 16:64:256 KiB", None),
        ("--chunk-size=16K", Some("16K")),
    ] {
        methods.push(casync(&t, &old_img, &new_img, &new_bytes, label, size)?);
    }
    methods.push(zsync(&exe, &t, &old_img, &new_img, &new_bytes)?);
    methods.push(patch(
        &t,
        "xdelta3 -9",
        &new_bytes,
        &[
            "xdelta3",
            "-e",
            "-9",
            "-f",
            "-s",
            "old.img",
            "srv/new.img",
            "patch.vcdiff",
        ],
        "patch.vcdiff",
        &[
            "xdelta3",
            "-d",
            "-f",
            "-s",
            "old.img",
            "patch.vcdiff",
            "out.img",
        ],
    )?);
    methods.push(patch(
        &t,
        "zstd -19 --patch-from",
        &new_bytes,
        &[
            "zstd",
            "-q",
            "-19",
            "-f",
            "--patch-from=old.img",
            "srv/new.img",
            "-o",
            "patch.zst",
        ],
        "patch.zst",
        &[
            "zstd",
            "-q",
            "-d",
            "-f",
            "--patch-from=old.img",
            "patch.zst",
            "-o",
            "out.img",
        ],
    )?);
    let (pkg, a, b) = crate::update::CHANGED_PACKAGE;
    Ok(UpdateResult {
        old: old_v.into(),
        new: new_v.into(),
        change: format!("{pkg} {a} -> {b}"),
        slot_bytes: new_bytes.len() as u64,
        delta,
        methods,
        device_fetched,
        install_s: armed - first,
        launch_to_armed_s: armed,
        phases,
        power_cuts,
        scenarios,
    })
}

fn run_in(dir: &Path, argv: &[&str]) -> Result<()> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", argv[0]))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn same_as_new(path: &Path, new: &[u8], what: &str) -> Result<()> {
    let got = fs::read(path).with_context(|| format!("{what}: reading {}", path.display()))?;
    if got != new {
        bail!("{what} rebuilt a slot that differs from the new release's");
    }
    Ok(())
}

/// casync: the old slot's chunks are on the device (its store), the new index and the chunks
/// the device lacks are fetched (chunks are stored compressed, as served).
fn casync(
    t: &Path,
    old: &Path,
    new: &Path,
    new_bytes: &[u8],
    label: &str,
    size: Option<&str>,
) -> Result<Method> {
    let tag = size.unwrap_or("default");
    let (s_old, s_new) = (format!("store-old-{tag}"), format!("store-new-{tag}"));
    for d in [&s_old, &s_new] {
        fs::remove_dir_all(t.join(d)).ok();
    }
    let chunk = size.map(|s| format!("--chunk-size={s}"));
    let make = |store: &str, index: &str, file: &Path| {
        let mut argv = vec!["casync".to_string(), "make".into()];
        argv.extend(chunk.clone());
        argv.push(format!("--store={store}"));
        argv.push(index.into());
        argv.push(file.display().to_string());
        run_in(t, &argv.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let (i_old, i_new) = (format!("old-{tag}.caibx"), format!("new-{tag}.caibx"));
    make(&s_old, &i_old, old)?;
    make(&s_new, &i_new, new)?;
    let have: std::collections::HashSet<PathBuf> = chunk_files(&t.join(&s_old))?
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    let (mut n, mut bytes) = (0, 0);
    for (p, len) in chunk_files(&t.join(&s_new))? {
        if !have.contains(&p) {
            n += 1;
            bytes += len;
        }
    }
    let index = fs::metadata(t.join(&i_new))?.len();
    let out = format!("out-{tag}.img");
    run_in(
        t,
        &[
            "casync",
            "extract",
            &format!("--store={s_new}"),
            &format!("--seed={}", old.display()),
            &i_new,
            &out,
        ],
    )?;
    same_as_new(&t.join(&out), new_bytes, "casync extract")?;
    Ok(Method {
        name: format!("casync ({label})"),
        bytes: index + bytes,
        per_pair: false,
        how: format!("index {index} B + {n} chunks, {bytes} B (compressed)"),
    })
}

/// A store's chunk files: path inside the store, size.
fn chunk_files(store: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let mut out = Vec::new();
    for d in fs::read_dir(store).with_context(|| format!("reading {}", store.display()))? {
        let d = d?.path();
        if !d.is_dir() {
            continue;
        }
        for f in fs::read_dir(&d)? {
            let f = f?.path();
            if f.extension().is_some_and(|e| e == "cacnk") {
                out.push((
                    f.strip_prefix(store)?.to_path_buf(),
                    fs::metadata(&f)?.len(),
                ));
            }
        }
    }
    Ok(out)
}

/// zsync: the client reads the .zsync file, then fetches the blocks the old slot lacks from
/// `cargo xtask serve` over HTTP ranges; the server's log counts the bytes.
fn zsync(exe: &Path, t: &Path, old: &Path, new: &Path, new_bytes: &[u8]) -> Result<Method> {
    let log = t.join("serve.log");
    fs::remove_file(&log).ok();
    let mut server = Command::new(exe)
        .args(["serve", "--port", "0"])
        .arg(t.join("srv"))
        .arg("--log")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting xtask serve")?;
    let result = (|| -> Result<Method> {
        // serve prints its URL (with the port the kernel chose) on stderr.
        let mut first = String::new();
        BufReader::new(server.stderr.take().context("serve's stderr")?).read_line(&mut first)?;
        let url = first
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .with_context(|| format!("xtask serve printed no URL: {first}"))?
            .trim_end_matches('/')
            .to_string();
        run_in(
            t,
            &[
                "zsyncmake",
                "-u",
                &format!("{url}/srv/new.img"),
                "-o",
                "new.zsync",
                &new.display().to_string(),
            ],
        )?;
        let control = fs::metadata(t.join("new.zsync"))?.len();
        fs::remove_file(t.join("out.img")).ok();
        run_in(
            t,
            &[
                "zsync",
                "-q",
                "-i",
                &old.display().to_string(),
                "-o",
                "out.img",
                "new.zsync",
            ],
        )?;
        same_as_new(&t.join("out.img"), new_bytes, "zsync")?;
        let sent: u64 = crate::serve::read_log(&log).iter().map(|(_, s, _)| s).sum();
        Ok(Method {
            name: "zsync".into(),
            bytes: control + sent,
            per_pair: false,
            how: format!("control file {control} B + {sent} B of ranges"),
        })
    })();
    server.kill().ok();
    server.wait().ok();
    result
}

/// A binary patch made for this pair: its size is what the device fetches.
fn patch(
    t: &Path,
    name: &str,
    new_bytes: &[u8],
    encode: &[&str],
    file: &str,
    decode: &[&str],
) -> Result<Method> {
    run_in(t, encode)?;
    let bytes = fs::metadata(t.join(file))?.len();
    fs::remove_file(t.join("out.img")).ok();
    run_in(t, decode)?;
    same_as_new(&t.join("out.img"), new_bytes, name)?;
    Ok(Method {
        name: name.into(),
        bytes,
        per_pair: true,
        how: "one patch from the old slot to the new".into(),
    })
}

pub fn render(u: Option<&UpdateResult>, board: &str, line: &mut impl FnMut(String)) {
    line("## Updates".into());
    line(String::new());
    let Some(u) = u else {
        line("Not measured.".into());
        line(String::new());
        return;
    };
    let d = &u.delta;
    line(format!(
        "From {board} {old} to {new}: {change}, nothing else (`cargo xtask update-test` builds \
         both from the same checkout, 1.1.0 from a copy with that package's version bumped and a SOURCE_DATE_EPOCH a day later). \
         The device side is update-test's install scenario under the firmware; the host side \
         bundles the same two builds with the same key and runs each tool on the same pair. \
         The other tools see the slot as one file ({slot} B: kernel, then initramfs); every \
         one's output was decoded again and compared with the new slot. Ratios are against \
         the full bundle.",
        old = u.old,
        new = u.new,
        change = u.change,
        slot = u.slot_bytes
    ));
    line(String::new());
    line("| method | fetched | vs full bundle | server file per pair of releases | what is fetched |".into());
    line("| --- | ---: | ---: | --- | --- |".into());
    let full = u.methods[0].bytes as f64;
    for m in &u.methods {
        line(format!(
            "| {} | {} | {:.1} % | {} | {} |",
            m.name,
            ui::size(m.bytes),
            100.0 * m.bytes as f64 / full,
            if m.per_pair { "yes" } else { "no" },
            m.how
        ));
    }
    line(String::new());
    line(format!(
        "bonsai's delta per file: {}. The chunk index (the manifest) is {:.2} % of the payload. \
         The device reported fetching {} B, the same as `cargo xtask delta` on the host.",
        d.files
            .iter()
            .map(|f| format!(
                "{} {} fetched of {} ({})",
                f.name,
                ui::size(f.fetched),
                ui::size(f.size),
                if f.changed { "changed" } else { "unchanged" }
            ))
            .collect::<Vec<_>>()
            .join(", "),
        d.index_percent,
        u.device_fetched
    ));
    if let Some(c) = &d.cpio_alternative {
        line(String::new());
        line(format!(
            "The other choice of what to chunk, on the same pair: the initramfs uncompressed \
             (the {} cpio, same chunking) needs {} new chunks of {}, {} raw and {} with each \
             compressed by zstd -19, against {} of new chunks for the compressed initramfs.",
            ui::size(c.cpio_bytes),
            c.chunks_fetched,
            c.chunks,
            ui::size(c.fetched_raw),
            ui::size(c.fetched_compressed),
            ui::size(c.initramfs_fetched)
        ));
    }
    line(String::new());
    line(format!(
        "Install on the device (host seconds, one install): {:.2} s from the first install line \
         to armed ({}), {:.1} s from QEMU's start (the old release's boot, then the install).",
        u.install_s,
        u.phases
            .iter()
            .map(|(n, s)| format!("{n} {s:.3} s"))
            .collect::<Vec<_>>()
            .join(", "),
        u.launch_to_armed_s
    ));
    line(String::new());
    match &u.power_cuts {
        Some((n, missed)) => line(format!(
            "Power cuts (`update-test`, same run): {n} survived: after each, the device booted a \
             good slot and a new install completed; {missed} cut points came after the install \
             had finished. Scenarios: {}.",
            u.scenarios
                .iter()
                .map(|(n, r)| format!("{n} {r}"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        None => line("Power cuts: not measured (`--quick` runs the install scenario only).".into()),
    }
    line(String::new());
}

/// The update targets' rows of the Targets table.
pub fn render_targets(u: Option<&UpdateResult>, line: &mut impl FnMut(String)) {
    let Some(u) = u else {
        return;
    };
    let d = &u.delta;
    let kernel = d
        .files
        .iter()
        .find(|f| f.name == "linux")
        .map_or(0, |f| f.fetched);
    line(format!(
        "| one-package update fetches ≤ 10 % of the full bundle | {} of {} ({:.1} %) | {} |",
        ui::size(d.fetched_bytes),
        ui::size(d.bundle_bytes),
        d.fetched_percent,
        yes(d.fetched_percent <= 10.0)
    ));
    line(format!(
        "| no kernel bytes when the kernel did not change | {kernel} B | {} |",
        yes(kernel == 0)
    ));
    line(format!(
        "| chunk index ≤ 1 % of the payload | {:.2} % | {} |",
        d.index_percent,
        yes(d.index_percent <= 1.0)
    ));
    if let Some((n, _)) = &u.power_cuts {
        let all = n
            .split_once(" of ")
            .is_some_and(|(a, b)| a == b && a != "0");
        line(format!(
            "| power cuts survived: N of N | {n} | {} |",
            yes(all)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::FileDelta;

    fn sample(kernel_fetched: u64, power_cuts: Option<(&str, usize)>) -> UpdateResult {
        let file = |name: &str, size, fetched, changed| FileDelta {
            name: name.into(),
            size,
            fetched,
            changed,
        };
        let fetched = 31_000 + 76_000 + kernel_fetched;
        UpdateResult {
            old: "1.0.0".into(),
            new: "1.1.0".into(),
            change: "hello 1.0 -> 1.1".into(),
            slot_bytes: 3_700_000,
            delta: DeltaReport {
                old: "qemu-x86_64 1.0.0".into(),
                new: "qemu-x86_64 1.1.0".into(),
                bundle_bytes: 3_790_000,
                head_bytes: 31_000,
                chunks: 195,
                chunks_fetched: 4,
                payload_fetched: 76_000 + kernel_fetched,
                fetched_bytes: fetched,
                fetched_percent: 100.0 * fetched as f64 / 3_790_000.0,
                index_percent: 0.84,
                files: vec![
                    file("linux", 1_900_000, kernel_fetched, kernel_fetched > 0),
                    file("initrd", 1_800_000, 76_000, true),
                ],
                cpio_alternative: None,
            },
            methods: vec![
                Method {
                    name: "full bundle".into(),
                    bytes: 3_790_000,
                    per_pair: false,
                    how: "the whole signed bundle".into(),
                },
                Method {
                    name: "xdelta3 -9".into(),
                    bytes: 40_000,
                    per_pair: true,
                    how: "one patch".into(),
                },
            ],
            device_fetched: fetched,
            install_s: 0.48,
            launch_to_armed_s: 7.4,
            phases: vec![("fetch".into(), 0.08)],
            power_cuts: power_cuts.map(|(s, m)| (s.to_string(), m)),
            scenarios: vec![("install".into(), "pass".into())],
        }
    }

    fn text(u: &UpdateResult) -> String {
        let mut s = String::new();
        render(Some(u), "qemu-x86_64", &mut |l| {
            s.push_str(&l);
            s.push('\n')
        });
        render_targets(Some(u), &mut |l| {
            s.push_str(&l);
            s.push('\n')
        });
        s
    }

    #[test]
    fn the_update_section_gives_each_method_against_the_full_bundle_and_judges_the_targets() {
        let t = text(&sample(0, Some(("20 of 20", 0))));
        assert!(t.starts_with("## Updates\n"), "{t}");
        assert!(
            t.contains("| full bundle | 3.61 MiB | 100.0 % | no |"),
            "{t}"
        );
        assert!(t.contains("| xdelta3 -9 | 39.1 KiB | 1.1 % | yes |"), "{t}");
        assert!(t.contains("| one-package update fetches ≤ 10 % of the full bundle | 104.5 KiB of 3.61 MiB (2.8 %) | **met** |"), "{t}");
        assert!(
            t.contains("| no kernel bytes when the kernel did not change | 0 B | **met** |"),
            "{t}"
        );
        assert!(
            t.contains("| chunk index ≤ 1 % of the payload | 0.84 % | **met** |"),
            "{t}"
        );
        assert!(
            t.contains("| power cuts survived: N of N | 20 of 20 | **met** |"),
            "{t}"
        );
        assert!(
            t.contains("linux 0 B fetched of 1.81 MiB (unchanged)"),
            "{t}"
        );
        // Broken variants: kernel bytes fetched, a cut not survived, no cuts measured.
        let t = text(&sample(600_000, Some(("19 of 20", 1))));
        assert!(
            t.contains("| no kernel bytes when the kernel did not change | 600000 B | not met |"),
            "{t}"
        );
        assert!(t.contains("| one-package update fetches ≤ 10 % of the full bundle | 690.4 KiB of 3.61 MiB (18.7 %) | not met |"), "{t}");
        assert!(t.contains("| 19 of 20 | not met |"), "{t}");
        let t = text(&sample(0, None));
        assert!(!t.contains("power cuts survived"), "{t}");
        assert!(t.contains("Power cuts: not measured"), "{t}");
    }
}
