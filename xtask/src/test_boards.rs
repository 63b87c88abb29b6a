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
                };
                let built = Build {
                    board: b.clone(),
                    init: Some(init.to_string()),
                    nested: true,
                    ..Build::default()
                }
                .run();
                match built {
                    Err(e) => {
                        let msg = ui::one_line(&e);
                        // A backend that cannot be built for this board (no Rust target) is reported, not fatal.
                        cell.error = Some(msg);
                    }
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
                    let text = match (c.passed, c.ready_s, c.initramfs_bytes) {
                        (true, Some(r), Some(sz)) => format!("pass {r:.2}s {}", ui::size(sz)),
                        _ if c
                            .error
                            .as_deref()
                            .is_some_and(|e| e.contains("Rust target")) =>
                        {
                            "skipped (no target)".into()
                        }
                        _ => "FAIL".into(),
                    };
                    print!(" | {text:>24}");
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
            .filter(|c| {
                !c.passed
                    && !c
                        .error
                        .as_deref()
                        .is_some_and(|e| e.contains("Rust target"))
            })
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
