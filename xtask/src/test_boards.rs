//! `cargo xtask test-boards`: every board × every init backend: build, boot with `--check`,
//! and a matrix with the guest uptime at ready and the initramfs size per cell.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use serde::Serialize;

use crate::boot::{check_run, qemu_spec};
use crate::build::Build;
use crate::config::{Config, INITS};
use crate::{host, project_root, ui};

#[derive(Args, Debug)]
pub struct TestBoards {
    /// Only these boards (default: all)
    #[arg(long = "board")]
    pub boards: Vec<String>,
    /// JSON: [{board, init, passed, ready_s, initramfs_bytes, kernel_bytes, error}]; every key is described in schemas/test-boards.schema.json
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub board: String,
    pub init: String,
    pub passed: bool,
    pub ready_s: Option<f64>,
    pub initramfs_bytes: Option<u64>,
    pub kernel_bytes: Option<u64>,
    pub error: Option<String>,
    /// Not run, and the skip rule (`crate::skip`) allowed it: `error` says why.
    #[serde(skip)]
    pub skipped: bool,
}

impl Cell {
    /// The matrix text of a cell. Only a cell the skip rule let through reads "skipped": any
    /// other error, whatever its words, is a failure.
    pub fn text(&self) -> String {
        match (self.passed, self.ready_s, self.initramfs_bytes) {
            (true, Some(r), Some(sz)) => format!("pass {r:.2}s {}", ui::size(sz)),
            _ if self.skipped => "skipped (no target)".into(),
            _ => "FAIL".into(),
        }
    }

    /// Whether the cell fails the matrix.
    pub fn failed(&self) -> bool {
        !self.passed && !self.skipped
    }
}

impl TestBoards {
    pub fn run(self) -> Result<()> {
        let root = project_root();
        let cfg = Config::new(&root);
        let boards = if self.boards.is_empty() {
            cfg.board_names()?
        } else {
            self.boards.clone()
        };
        let mut cells = Vec::new();
        for b in &boards {
            let board = cfg.load_board(b)?;
            host::ensure_program(&board.qemu.binary, board.arch.qemu_package())?;
            for init in INITS {
                let mut cell = Cell {
                    board: b.clone(),
                    init: init.to_string(),
                    passed: false,
                    ready_s: None,
                    initramfs_bytes: None,
                    kernel_bytes: None,
                    error: None,
                    skipped: false,
                };
                // Without a Rust target for the board, bonsai-init cannot be built: a skip,
                // which the shared rule turns into a failure in CI.
                if *init == "bonsai-init" {
                    if let Some(why) = crate::pid1::unavailable(&board) {
                        match crate::skip::skip(&format!("bonsai-init on {b}"), &why) {
                            Ok(line) => {
                                ui::warn(&line);
                                cell.skipped = true;
                            }
                            Err(line) => ui::warn(&line),
                        }
                        cell.error = Some(why);
                        cells.push(cell);
                        continue;
                    }
                }
                let built = Build {
                    board: b.clone(),
                    init: Some(init.to_string()),
                    nested: true,
                    ..Build::default()
                }
                .run();
                match built {
                    Err(e) => cell.error = Some(ui::one_line(&e)),
                    Ok(built) => {
                        cell.initramfs_bytes = Some(built.info.initramfs_bytes);
                        cell.kernel_bytes = Some(built.info.kernel_bytes);
                        let spec = qemu_spec(&board, &built.out, &built.info, None)?;
                        let run = check_run(
                            &board,
                            &built.out,
                            &built.info,
                            &spec,
                            Duration::from_secs(board.qemu.boot_timeout),
                            false,
                        );
                        cell.ready_s = run.report.as_ref().map(|r| r.ready_uptime);
                        cell.passed = run.failure.is_none();
                        cell.error = run.failure;
                    }
                }
                cells.push(cell);
            }
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&cells)?);
        } else {
            print!("{:<16}", "board");
            for i in INITS {
                print!(" | {:>24}", i);
            }
            println!();
            for b in &boards {
                print!("{b:<16}");
                for i in INITS {
                    let c = cells
                        .iter()
                        .find(|c| &c.board == b && c.init == *i)
                        .unwrap();
                    print!(" | {:>24}", c.text());
                }
                println!();
            }
            for c in cells.iter().filter(|c| !c.passed) {
                println!(
                    "{} / {}: {}",
                    c.board,
                    c.init,
                    c.error.clone().unwrap_or_default()
                );
            }
        }
        let failed: Vec<String> = cells
            .iter()
            .filter(|c| c.failed())
            .map(|c| format!("{}/{}", c.board, c.init))
            .collect();
        if !failed.is_empty() {
            bail!(
                "board matrix: {} cell(s) failed: {}",
                failed.len(),
                failed.join(", ")
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(error: &str, skipped: bool) -> Cell {
        Cell {
            board: "b".into(),
            init: "bonsai-init".into(),
            passed: false,
            ready_s: None,
            initramfs_bytes: None,
            kernel_bytes: None,
            error: Some(error.into()),
            skipped,
        }
    }

    /// A build error that mentions a Rust target is a failure unless the skip rule allowed it
    /// (the old matrix turned any such error into "skipped").
    #[test]
    fn only_an_allowed_skip_is_skipped() {
        let broken = cell(
            "linking bonsai-init for the Rust target x failed: ld error",
            false,
        );
        assert!(broken.failed());
        assert_eq!(broken.text(), "FAIL");
        let skipped = cell("no Rust target x", true);
        assert!(!skipped.failed());
        assert_eq!(skipped.text(), "skipped (no target)");
    }
}
