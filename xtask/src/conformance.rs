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
    /// Boots per backend; times are the median
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
}

/// One backend's column.
pub struct Column {
    pub init: String,
    pub rows: Vec<(String, bool)>,
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
            // still run and the skip is said plainly.
            if init == "bonsai-init" {
                if let Some(why) = crate::pid1::unavailable(&board) {
                    ui::warn(format!(
                        "skipping the bonsai-init backend on {}: {why}",
                        board.name
                    ));
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
            let spec = qemu_spec(&board, &built.out, &built.info, None)?;
            let timeout = Duration::from_secs(board.qemu.boot_timeout);
            let mut col = Column {
                init: init.clone(),
                rows: Vec::new(),
                failure: None,
                ready: Vec::new(),
                init_to_up: Vec::new(),
            };
            for i in 0..self.repeat.max(1) {
                let run = check_run(&board, &built.out, &built.info, &spec, timeout, false);
                if let Some(r) = &run.report {
                    col.ready.push(r.ready_uptime);
                    if let (Some(up), Some(start)) = (r.services_up, run.init_started) {
                        col.init_to_up.push((up - start).max(0.0));
                    }
                }
                if i == 0 {
                    col.rows = run
                        .results
                        .iter()
                        .chain(run.console.iter())
                        .cloned()
                        .collect();
                }
                if run.failure.is_some() && col.failure.is_none() {
                    col.failure = run.failure.clone();
                    if col.rows.is_empty() {
                        col.rows = run
                            .results
                            .iter()
                            .chain(run.console.iter())
                            .cloned()
                            .collect();
                    }
                }
            }
            columns.push(col);
        }
        Ok((columns, skipped))
    }
}

fn print_matrix(columns: &[Column]) {
    let mut names: Vec<String> = Vec::new();
    for c in columns {
        for (n, _) in &c.rows {
            if !names.contains(n) {
                names.push(n.clone());
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
            let cell = match c.rows.iter().find(|(m, _)| m == n) {
                Some((_, true)) => "pass",
                Some((_, false)) => "FAIL",
                None => "-",
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
