//! `cargo xtask repro --board <b>`: two fresh checkouts (git clones of the committed state) in
//! directories of different depth, each released by this same bonsai with a different
//! environment: time zone, locale, umask, thread count, CARGO_TARGET_DIR, host name (in a UTS
//! namespace, as root) and the wall clock (faketime, a year ahead). Every output file is
//! compared; the first difference is shown with diffoscope.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::{host, project_root, ui};

#[derive(Args, Debug)]
pub struct Repro {
    #[arg(long, default_value = "qemu-x86_64")]
    pub board: String,
    #[arg(long)]
    pub profile: Option<String>,
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(crate::config::INITS))]
    pub init: Option<String>,
    /// Keep the two scratch folders for inspection
    #[arg(long)]
    pub keep: bool,
}

struct Variant {
    dir: &'static str,
    tz: &'static str,
    lang: &'static str,
    umask: &'static str,
    threads: &'static str,
    hostname: &'static str,
    clock: Option<&'static str>,
}

const VARIANTS: [Variant; 2] = [
    Variant {
        dir: "a",
        tz: "UTC",
        lang: "C",
        umask: "022",
        threads: "1",
        hostname: "bonsai-repro-a",
        clock: None,
    },
    Variant {
        dir: "b/a/much/deeper/checkout",
        tz: "Pacific/Kiritimati",
        lang: "C.UTF-8",
        umask: "077",
        threads: "2",
        hostname: "another-builder",
        clock: Some("+400d"),
    },
];

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

impl Repro {
    pub fn run(self) -> Result<()> {
        let root = project_root();
        let dirty = Command::new("git")
            .args(["status", "--porcelain", "--untracked-files=no"])
            .current_dir(&root)
            .output();
        if dirty.map(|o| !o.stdout.is_empty()).unwrap_or(false) {
            ui::warn("repro builds the committed state; uncommitted changes are not in it");
        }
        let faketime = host::find_program("faketime").is_some()
            || host::ensure(
                &[host::Tool {
                    program: "faketime",
                    package: "faketime",
                }],
                &[],
            )
            .is_ok();
        let unshare = is_root() && host::find_program("unshare").is_some();
        // A variation that cannot be made is a skip: said plainly, and a failure in CI.
        for (what, missing) in [
            (
                "repro's host-name variation",
                (!unshare).then_some("needs root and unshare"),
            ),
            (
                "repro's clock variation",
                (!faketime).then_some("faketime is not available"),
            ),
        ] {
            if let Some(why) = missing {
                let line = crate::skip::skip(what, why).map_err(|e| anyhow::anyhow!(e))?;
                ui::warn(line);
            }
        }
        let scratch = tempfile::Builder::new()
            .prefix("bonsai-repro-")
            .tempdir()
            .context("creating a scratch folder")?;
        let exe = std::env::current_exe().context("finding the bonsai binary")?;
        let mut outs = Vec::new();
        for (i, v) in VARIANTS.iter().enumerate() {
            let checkout = scratch.path().join(v.dir);
            std::fs::create_dir_all(checkout.parent().unwrap())?;
            let status = Command::new("git")
                .args(["clone", "--quiet", "--local", "--no-hardlinks"])
                .arg(&root)
                .arg(&checkout)
                .status()
                .context("running git clone")?;
            if !status.success() {
                bail!("git clone of {} failed", root.display());
            }
            let out = scratch.path().join(format!("release-{i}"));
            // A shell sets the umask and host name, then runs bonsai (under faketime for the second).
            let mut script = format!("umask {}; ", v.umask);
            if unshare {
                script.push_str(&format!("hostname {}; ", v.hostname));
            }
            let mut cmd_words: Vec<String> = Vec::new();
            if let (Some(clock), true) = (v.clock, faketime) {
                cmd_words.extend(["faketime".into(), "-f".into(), clock.into()]);
            }
            cmd_words.push(exe.display().to_string());
            cmd_words.extend([
                "-q".into(),
                "release".into(),
                "--board".into(),
                self.board.clone(),
                "--version".into(),
                "repro".into(),
            ]);
            if let Some(p) = &self.profile {
                cmd_words.extend(["--profile".into(), p.clone()]);
            }
            if let Some(i) = &self.init {
                cmd_words.extend(["--init".into(), i.clone()]);
            }
            cmd_words.extend(["--out-dir".into(), out.display().to_string()]);
            script.push_str("exec ");
            script.push_str(
                &cmd_words
                    .iter()
                    .map(|w| rootfs::backends::sh_quote(w))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
            let mut cmd = if unshare {
                let mut c = Command::new("unshare");
                c.args(["--uts", "sh", "-c", &script]);
                c
            } else {
                let mut c = Command::new("sh");
                c.args(["-c", &script]);
                c
            };
            cmd.env("BONSAI_ROOT", &checkout)
                .env("TZ", v.tz)
                .env("LANG", v.lang)
                .env("LC_ALL", v.lang)
                .env("BONSAI_THREADS", v.threads)
                .env(
                    "CARGO_TARGET_DIR",
                    scratch.path().join(format!("target-{i}")),
                )
                .env_remove("SOURCE_DATE_EPOCH")
                // Each checkout builds into its own out/, never into a shared BONSAI_OUT.
                .env_remove("BONSAI_OUT");
            ui::step(format!(
                "build {} in {} (TZ={}, LANG={}, umask {}, {} threads{}{})",
                i + 1,
                v.dir,
                v.tz,
                v.lang,
                v.umask,
                v.threads,
                if unshare {
                    format!(", host {}", v.hostname)
                } else {
                    String::new()
                },
                match (v.clock, faketime) {
                    (Some(c), true) => format!(", clock {c}"),
                    _ => String::new(),
                }
            ));
            let status = cmd.status().context("running bonsai release")?;
            if !status.success() {
                bail!("release build {} failed", i + 1);
            }
            outs.push(out.join(format!("{}-repro", self.board)));
        }
        if !unshare {
            ui::warn("skipped: both builds ran with the same host name");
        }
        if !faketime {
            ui::warn("skipped: both builds ran at the real time");
        }
        let result = compare(&outs[0], &outs[1]);
        if self.keep {
            let kept = scratch.keep();
            ui::step(format!("scratch kept in {}", kept.display()));
        }
        result
    }
}

fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            out.extend(
                files_under(&p)?
                    .into_iter()
                    .map(|f| p.file_name().map(PathBuf::from).unwrap_or_default().join(f)),
            );
        } else {
            out.push(PathBuf::from(p.file_name().unwrap()));
        }
    }
    out.sort();
    Ok(out)
}

/// Compares two release folders file by file; prints `same=N different=M`.
pub fn compare(a: &Path, b: &Path) -> Result<()> {
    let fa = files_under(a)?;
    let fb = files_under(b)?;
    let mut names: Vec<&PathBuf> = fa.iter().chain(&fb).collect();
    names.sort();
    names.dedup();
    let mut same = 0;
    let mut different = Vec::new();
    for n in names {
        let (x, y) = (std::fs::read(a.join(n)).ok(), std::fs::read(b.join(n)).ok());
        if x.is_some() && x == y {
            same += 1;
        } else {
            different.push(n.clone());
        }
    }
    println!("same={same} different={}", different.len());
    if let Some(first) = different.first() {
        for d in &different {
            println!("differs: {}", d.display());
        }
        host::ensure(
            &[host::Tool {
                program: "diffoscope",
                package: "diffoscope",
            }],
            &[],
        )?;
        let out = Command::new("diffoscope")
            .arg(a.join(first))
            .arg(b.join(first))
            .output()
            .context("running diffoscope")?;
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines().take(60) {
            println!("{line}");
        }
        bail!(
            "the two builds differ in {} file(s), first {}",
            different.len(),
            first.display()
        );
    }
    Ok(())
}
