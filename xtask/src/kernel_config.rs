//! `cargo xtask kernel-config --board <b>`: the merged kernel config, and for each option the
//! fragments set: which fragment set it, what it became, and (when Kconfig dropped it) what it
//! depends on. `--diff <board>` compares two boards' merged configs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use crate::config::{Config, KernelSource};
use crate::nix::{self, Eval, PackageSource};
use crate::{project_root, ui};

#[derive(Args, Debug)]
pub struct KernelConfig {
    #[arg(long, default_value = "qemu-x86_64")]
    pub board: String,
    /// Compare with another board's merged config
    #[arg(long)]
    pub diff: Option<String>,
    /// Print the whole merged .config too
    #[arg(long)]
    pub full: bool,
    /// Build nothing on this machine (the caches and remote builders of bonsai.toml)
    #[arg(long)]
    pub no_local_builds: bool,
}

/// Realises a board's merged config; returns the folder (config, report) and the report with
/// fragment names.
fn merged(board_name: &str) -> Result<(PathBuf, Vec<nix::ConfigOption>)> {
    let root = project_root();
    let board = Config::new(&root).load_board(board_name)?;
    let KernelSource::Build { fragments, .. } = &board.kernel.source else {
        bail!(
            "boards/{board_name}.toml uses a prebuilt kernel package; it has no fragments to merge"
        );
    };
    if board.arch != crate::host::host_arch()? {
        if let Some((cc, libc)) = crate::host::cross_tools(board.arch, crate::host::host_arch()?) {
            crate::host::ensure(&[cc], &[libc])?;
        }
    }
    crate::host::ensure(crate::host::KERNEL_TOOLS, &[crate::host::LIBELF_HEADER])?;
    let eval = Eval::new(
        &root,
        &board,
        &["busybox".to_string()],
        &PackageSource::Offline,
    )?;
    ui::step(format!("merge the kernel config of {board_name}"));
    let dir = eval
        .build(&["kernelConfig".into()], "kernel config")?
        .remove(0);
    let report = nix::read_config_report(&dir, fragments)?;
    Ok((dir, report))
}

fn options(text: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for l in text.lines() {
        if let Some((k, v)) = l.split_once('=').filter(|(k, _)| k.starts_with("CONFIG_")) {
            m.insert(k.to_string(), v.to_string());
        } else if let Some(k) = l
            .strip_prefix("# ")
            .and_then(|r| r.strip_suffix(" is not set"))
        {
            m.insert(k.to_string(), "n".into());
        }
    }
    m
}

/// `CONFIG_X=m  (fragment)` for every option of a merged config that is `m`: the fragment that
/// set it, or that Kconfig made it a module.
fn module_lines(merged: &BTreeMap<String, String>, report: &[nix::ConfigOption]) -> Vec<String> {
    merged
        .iter()
        .filter(|(_, v)| v.as_str() == "m")
        .map(|(k, _)| {
            let from = report
                .iter()
                .find(|o| &o.option == k)
                .map(|o| format!("set by {}", o.fragment))
                .unwrap_or_else(|| "Kconfig's choice: no fragment sets it".to_string());
            format!("{k}=m  ({from})")
        })
        .collect()
}

impl KernelConfig {
    pub fn run(self) -> Result<()> {
        crate::settings::load(&project_root())?;
        if self.no_local_builds {
            crate::settings::forbid_local_builds();
        }
        let (dir, report) = merged(&self.board)?;
        if let Some(other) = &self.diff {
            let (odir, _) = merged(other)?;
            let a = options(&std::fs::read_to_string(dir.join("config"))?);
            let b = options(&std::fs::read_to_string(odir.join("config"))?);
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            println!("{:<44} {:>16} {:>16}", "option", self.board, other);
            let mut n = 0;
            for k in keys {
                let (x, y) = (
                    a.get(k).map(String::as_str).unwrap_or("n"),
                    b.get(k).map(String::as_str).unwrap_or("n"),
                );
                if x != y {
                    n += 1;
                    println!("{k:<44} {x:>16} {y:>16}");
                }
            }
            println!("{n} options differ");
            return Ok(());
        }
        if self.full {
            print!("{}", std::fs::read_to_string(dir.join("config"))?);
        }
        println!(
            "{:<36} {:>8} {:>8}  {:<24} status",
            "option (set by a fragment)", "wanted", "got", "fragment"
        );
        for o in &report {
            let status = if o.survived {
                "ok".to_string()
            } else {
                format!(
                    "DROPPED{}",
                    if o.reason.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", o.reason)
                    }
                )
            };
            println!(
                "{:<36} {:>8} {:>8}  {:<24} {status}",
                o.option, o.wanted, o.got, o.fragment
            );
        }
        // Every option the merged config builds as a module, whether a fragment asked for it
        // or Kconfig chose `m` for it because a fragment enabled modules.
        let merged = options(&std::fs::read_to_string(dir.join("config"))?);
        let modules = module_lines(&merged, &report);
        println!("{} option(s) built as modules (=m):", modules.len());
        for l in &modules {
            println!("  {l}");
        }
        let dropped = report.iter().filter(|o| !o.survived).count();
        if dropped > 0 {
            bail!(
                "{dropped} option(s) set by the fragments of {} did not survive olddefconfig",
                self.board
            );
        }
        ui::step(format!(
            "all {} options set by the fragments survived",
            report.len()
        ));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_modules_list_names_who_made_each_one_a_module() {
        let merged = options(
            "CONFIG_MODULES=y\nCONFIG_VIRTIO_BALLOON=m\nCONFIG_EFIVAR_FS=m\n# CONFIG_X is not set\n",
        );
        let report = vec![nix::ConfigOption {
            option: "CONFIG_VIRTIO_BALLOON".into(),
            wanted: "m".into(),
            got: "m".into(),
            fragment: "qemu-x86_64.config".into(),
            survived: true,
            reason: String::new(),
        }];
        assert_eq!(
            module_lines(&merged, &report),
            [
                "CONFIG_EFIVAR_FS=m  (Kconfig's choice: no fragment sets it)",
                "CONFIG_VIRTIO_BALLOON=m  (set by qemu-x86_64.config)",
            ]
        );
    }
}
