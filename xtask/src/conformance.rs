//! `cargo xtask conformance`: the same profile booted with every init backend, the same checks
//! judged for each, printed as a check × backend matrix with boot times.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use crate::boot::{check_run, qemu_spec};
use crate::build::Build;
use crate::config::{Config, INITS};
use crate::{host, project_root, ui};

#[derive(Args, Debug)]
pub struct Conformance {
    /// Board to boot
    #[arg(long, default_value = "qemu-x86_64")]
    pub board: String,
    /// Profile whose services and checks are the suite
    #[arg(long, default_value = "conformance")]
    pub profile: String,
    /// Backends to run (default: all four)
    #[arg(long = "init", value_parser = clap::builder::PossibleValuesParser::new(INITS))]
    pub inits: Vec<String>,
    /// Boots per backend; times are the median, each cell the worst of the boots
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// Seconds to wait for each boot (default: the board's qemu.boot-timeout, at least 300:
    /// the suite watches crash loops and a 10 s run, and TCG on a loaded host is slow)
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Test only: render deliberately broken backends (comma-separated faults, or `all`),
    /// so that the suite can be seen to fail them. Same as BONSAI_TEST_BROKEN.
    #[arg(long, hide = true)]
    pub broken: Option<String>,
}

/// The least default time a conformance boot gets, in seconds.
pub const MIN_TIMEOUT_S: u64 = 300;

/// The environment variable that asks a build for deliberately broken backends.
pub const BROKEN_ENV: &str = "BONSAI_TEST_BROKEN";

/// The faults `BONSAI_TEST_BROKEN` asks for (none when unset): for the judge's negative tests.
pub fn test_faults() -> Result<Vec<rootfs::faults::Fault>> {
    let list = std::env::var(BROKEN_ENV).unwrap_or_default();
    rootfs::faults::parse(&list).map_err(|e| anyhow::anyhow!("{BROKEN_ENV}: {e}"))
}

/// One row of a column over every boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    pub name: String,
    /// Boots in which the check passed, and boots in which it was judged.
    pub passed: u32,
    pub runs: u32,
}

impl Cell {
    /// The worst of the boots: `pass` only when every boot passed.
    pub fn text(&self) -> String {
        match (self.passed, self.runs) {
            (p, r) if p == r => "pass".into(),
            (_, 1) => "FAIL".into(),
            (p, r) => format!("FAIL {}/{r}", r - p),
        }
    }
}

/// Adds one boot's results to the cells (a row first seen in a later boot failed before it).
pub fn merge(cells: &mut Vec<Cell>, boot: &[(String, bool)], boots_before: u32) {
    for (name, ok) in boot {
        match cells.iter_mut().find(|c| &c.name == name) {
            Some(c) => {
                c.runs += 1;
                c.passed += u32::from(*ok);
            }
            None => cells.push(Cell {
                name: name.clone(),
                passed: u32::from(*ok),
                runs: boots_before + 1,
            }),
        }
    }
    // A row missing from this boot (it never ran) failed in it.
    for c in cells.iter_mut() {
        if !boot.iter().any(|(n, _)| *n == c.name) {
            c.runs += 1;
        }
    }
}

/// One backend's column.
pub struct Column {
    pub init: String,
    pub rows: Vec<Cell>,
    pub failure: Option<String>,
    /// Guest uptime at the ready marker, one per boot (seconds).
    pub ready: Vec<f64>,
    /// From the kernel's `Run /init` to services up, one per boot (seconds, guest clock).
    pub init_to_up: Vec<f64>,
}

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    Some(s[s.len() / 2])
}

impl Conformance {
    pub fn run(self) -> Result<()> {
        if let Some(list) = &self.broken {
            rootfs::faults::parse(list).map_err(|e| anyhow::anyhow!("--broken: {e}"))?;
            // Read by every build below (and part of its fingerprint); set before any thread.
            std::env::set_var(BROKEN_ENV, list);
        }
        let (columns, skipped) = self.columns()?;
        print_matrix(&columns);
        let failed: Vec<String> = columns
            .iter()
            .filter_map(|c| c.failure.as_ref().map(|f| format!("{}: {f}", c.init)))
            .collect();
        if !failed.is_empty() {
            bail!("conformance failed for {}", failed.join(" | "));
        }
        ui::step(format!("all {} backends pass all checks", columns.len()));
        if !skipped.is_empty() {
            ui::warn(format!(
                "skipped (not run): {} (see the warning above)",
                skipped.join(", ")
            ));
        }
        Ok(())
    }

    /// Builds and boots every backend `repeat` times; the columns and the backends skipped.
    /// Prints progress only: a failed check is in its column, not an error.
    pub fn columns(&self) -> Result<(Vec<Column>, Vec<String>)> {
        let root = project_root();
        let board = Config::new(&root).load_board(&self.board)?;
        host::ensure_program(&board.qemu.binary, board.arch.qemu_package())?;
        let inits: Vec<String> = if self.inits.is_empty() {
            INITS.iter().map(|s| s.to_string()).collect()
        } else {
            self.inits.clone()
        };
        let mut columns = Vec::new();
        let mut skipped = Vec::new();
        for init in &inits {
            // bonsai-init needs a Rust target for the board; without one, the other backends
            // still run and the skip is said plainly (and fails in CI: crate::skip).
            if init == "bonsai-init" {
                if let Some(why) = crate::pid1::unavailable(&board) {
                    let what = format!("the bonsai-init backend on {}", board.name);
                    let line = crate::skip::skip(&what, &why).map_err(|e| anyhow::anyhow!(e))?;
                    ui::warn(line);
                    skipped.push(init.clone());
                    continue;
                }
            }
            let built = Build {
                board: self.board.clone(),
                profile: Some(self.profile.clone()),
                init: Some(init.clone()),
                nested: true,
                ..Build::default()
            }
            .run()?;
            let mut spec = qemu_spec(&board, &built.out, &built.info, None)?;
            // The test disk starts empty for each backend, and its boots share it.
            crate::boot::apply_test_machine(&mut spec, &built.out, &built.info, true)?;
            let boots = self
                .repeat
                .max(built.info.test_machine.boots.unwrap_or(1))
                .max(1);
            let mut last_token: Option<String> = None;
            let timeout = Duration::from_secs(
                self.timeout
                    .unwrap_or(board.qemu.boot_timeout.max(MIN_TIMEOUT_S)),
            );
            let mut col = Column {
                init: init.clone(),
                rows: Vec::new(),
                failure: None,
                ready: Vec::new(),
                init_to_up: Vec::new(),
            };
            for i in 0..boots {
                let run = check_run(&board, &built.out, &built.info, &spec, timeout, false);
                let disk_rows = disk_rows(&built.out, &built.info, &run, &mut last_token);
                for (what, why) in &disk_rows {
                    if let Err(why) = why {
                        ui::detail(format!("FAIL {what} (judged on the host): {why}"));
                    }
                }
                if let Some(r) = &run.report {
                    col.ready.push(r.ready_uptime);
                    if let (Some(up), Some(start)) = (r.services_up, run.init_started) {
                        col.init_to_up.push((up - start).max(0.0));
                    }
                }
                let boot: Vec<(String, bool)> = run
                    .results
                    .iter()
                    .chain(run.console.iter())
                    .cloned()
                    .chain(disk_rows.iter().map(|(w, r)| (w.clone(), r.is_ok())))
                    .collect();
                merge(&mut col.rows, &boot, i);
                if run.failure.is_some() && col.failure.is_none() {
                    col.failure = run.failure.clone();
                }
                if col.failure.is_none() {
                    if let Some((what, Err(why))) = disk_rows.iter().find(|(_, r)| r.is_err()) {
                        col.failure = Some(format!("boot {}: {what}: {why}", i + 1));
                    }
                }
            }
            columns.push(col);
        }
        Ok((columns, skipped))
    }
}

/// The rows judged across the boots of one test disk, from raw data: the `data-mount` check's
/// tokens (the first boot finds a new filesystem, each later one what the boot before wrote)
/// and the disk's own bytes after the guest powered off (the filesystem is clean).
fn disk_rows(
    out: &std::path::Path,
    info: &crate::build::BuildInfo,
    run: &crate::boot::CheckRun,
    last: &mut Option<String>,
) -> Vec<(String, Result<(), String>)> {
    let mut rows = Vec::new();
    let Some(i) = info.checks.iter().position(|c| {
        c.judge
            .as_deref()
            .is_some_and(|j| j.starts_with("data-mount"))
    }) else {
        return rows;
    };
    let output = run
        .report
        .as_ref()
        .and_then(|r| r.checks.get(i))
        .map(|c| c.output.clone())
        .unwrap_or_default();
    let want = last.clone().unwrap_or_else(|| "none".into());
    let persist = match crate::judge::data_tokens(&output) {
        None => Err("the check printed no prev/now tokens".to_string()),
        Some((prev, now)) => {
            *last = Some(now);
            if prev == want {
                Ok(())
            } else {
                Err(format!("read '{prev}', the boot before wrote '{want}'"))
            }
        }
    };
    rows.push((
        "mount: this boot reads what the last one wrote".to_string(),
        persist,
    ));
    let path = crate::boot::test_disk_path(out);
    let mut head = vec![0u8; 4096];
    let disk = std::fs::File::open(&path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .map(|()| head)
        .map_err(|e| format!("reading {}: {e}", path.display()));
    let clean = disk.clone().and_then(|d| crate::judge::fat_clean(&d));
    rows.push((
        "mount: the filesystem is clean after poweroff".to_string(),
        clean,
    ));
    // The label make-fs gave the test disk's filesystem, as its boot sector holds it.
    let want = crate::config::Config::new(&crate::project_root())
        .load_profile(&info.profile)
        .ok()
        .and_then(|p| {
            p.system
                .setup
                .mounts
                .iter()
                .find(|m| m.device == "/dev/vda" && m.make_fs)
                .map(|m| m.label.clone().unwrap_or_default())
        });
    if let Some(want) = want {
        let label = disk.and_then(|d| {
            crate::judge::fat_label(&d).ok_or_else(|| "no FAT boot sector".to_string())
        });
        let row = match label {
            Ok(l) if l == want => Ok(()),
            Ok(l) => Err(format!("the label is '{l}', not '{want}'")),
            Err(e) => Err(e),
        };
        rows.push((
            "mount: make-fs gave the filesystem its label".to_string(),
            row,
        ));
    }
    rows
}

fn print_matrix(columns: &[Column]) {
    let mut names: Vec<String> = Vec::new();
    for c in columns {
        for cell in &c.rows {
            if !names.contains(&cell.name) {
                names.push(cell.name.clone());
            }
        }
    }
    let width = names
        .iter()
        .map(|n| n.len())
        .max()
        .unwrap_or(10)
        .clamp(24, 60);
    let mut header = format!("{:<width$}", "check");
    for c in columns {
        header.push_str(&format!(" | {:>11}", c.init));
    }
    println!("{header}");
    println!("{}", "-".repeat(header.len()));
    for n in &names {
        let mut line = format!("{:<width$}", truncate(n, width));
        for c in columns {
            let cell = match c.rows.iter().find(|cell| &cell.name == n) {
                Some(cell) => cell.text(),
                None => "-".into(),
            };
            line.push_str(&format!(" | {cell:>11}"));
        }
        println!("{line}");
    }
    let mut line = format!("{:<width$}", "ready at (s, guest uptime, median)");
    for c in columns {
        line.push_str(&format!(
            " | {:>11}",
            median(&c.ready)
                .map(|v| format!("{v:.2}"))
                .unwrap_or("-".into())
        ));
    }
    println!("{line}");
    let mut line = format!("{:<width$}", "/init to services up (ms, median)");
    for c in columns {
        line.push_str(&format!(
            " | {:>11}",
            median(&c.init_to_up)
                .map(|v| format!("{:.0}", v * 1000.0))
                .unwrap_or("-".into())
        ));
    }
    println!("{line}");
}

fn truncate(s: &str, n: usize) -> String {
    if s.len() <= n {
        s.to_string()
    } else {
        format!("{}…", &s[..n - 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot(rows: &[(&str, bool)]) -> Vec<(String, bool)> {
        rows.iter().map(|(n, ok)| (n.to_string(), *ok)).collect()
    }

    /// With --repeat, a row that fails in a later boot shows FAIL (the old matrix showed only
    /// the first boot's cells).
    #[test]
    fn repeat_shows_the_worst_boot() {
        let mut cells = Vec::new();
        merge(&mut cells, &boot(&[("a", true), ("b", true)]), 0);
        merge(&mut cells, &boot(&[("a", false), ("b", true)]), 1);
        merge(&mut cells, &boot(&[("a", true)]), 2);
        merge(
            &mut cells,
            &boot(&[("a", true), ("b", true), ("c", true)]),
            3,
        );
        let text: Vec<(String, String)> =
            cells.iter().map(|c| (c.name.clone(), c.text())).collect();
        assert_eq!(
            text,
            [
                ("a".to_string(), "FAIL 1/4".to_string()),
                ("b".to_string(), "FAIL 1/4".to_string()),
                ("c".to_string(), "FAIL 3/4".to_string()),
            ]
        );
        let mut one = Vec::new();
        merge(&mut one, &boot(&[("a", false), ("b", true)]), 0);
        assert_eq!(one[0].text(), "FAIL");
        assert_eq!(one[1].text(), "pass");
    }
}
