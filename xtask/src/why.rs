//! `cargo xtask why --board <b> <path>`: the chain of references that kept a file (or a store
//! path) in the image, back to its root. `why --board <b> <name-glob>` prints every chain into
//! each store path whose name matches (as `[image] forbid` does), for the image and its closure.

use anyhow::{bail, Result};
use clap::Args;

use crate::size;

#[derive(Args, Debug)]
pub struct Why {
    #[arg(long, default_value = "qemu-x86_64")]
    pub board: String,
    /// An image path (/nix/store/…/lib/libc.so.6), a store path, or a glob on store path
    /// names (`glibc*`, `systemd`): every chain into each store path that matches
    pub path: String,
}

impl Why {
    pub fn run(self) -> Result<()> {
        let out = crate::out_root().join(&self.board);
        let assembly = size::read_assembly_pub(&out)?;
        if !self.path.starts_with('/') {
            return self.by_name(&assembly);
        }
        let target = self.path.trim_end_matches('/').to_string();
        let is_dir_only = assembly
            .reasons
            .get(&target)
            .is_some_and(|(_, how)| how == "parent directory");
        let start = if assembly.reasons.contains_key(&target) && !is_dir_only {
            target.clone()
        } else {
            // A store path: explain the first file kept from it.
            let under = |p: &&String| p.starts_with(&format!("{target}/"));
            let explained = |p: &&String| {
                assembly
                    .reasons
                    .get(*p)
                    .is_some_and(|(_, how)| how != "parent directory")
            };
            match assembly.reasons.keys().filter(under).find(explained) {
                Some(p) => {
                    println!(
                        "{target} is in the image for {p} (and {} more of its files)",
                        assembly
                            .reasons
                            .keys()
                            .filter(under)
                            .filter(explained)
                            .count()
                            - 1
                    );
                    p.clone()
                }
                None => {
                    if assembly.vanished.contains(&target) {
                        bail!("{target} is not in the image: nothing kept refers to it");
                    }
                    bail!("{target} is not in the image of {}", self.board);
                }
            }
        };
        let mut cur = start;
        let mut seen = std::collections::BTreeSet::new();
        while let Some((from, how)) = assembly.reasons.get(&cur) {
            println!("{cur}: {how}");
            if !seen.insert(cur.clone()) {
                break;
            }
            match from {
                Some(f) => cur = f.clone(),
                None => break,
            }
        }
        Ok(())
    }
}

impl Why {
    /// Every chain into each store path whose name matches the glob `self.path`.
    fn by_name(&self, assembly: &crate::build::Assembly) -> Result<()> {
        let globs = crate::forbid::parse(std::slice::from_ref(&self.path))
            .map_err(|e| anyhow::anyhow!("{}", e.trim_start_matches("forbid[0]: ")))?;
        if assembly.packages.is_empty() {
            bail!(
                "out/{}/selection.json was written by an older bonsai and has no closure graph: run `cargo xtask build --board {}` again",
                self.board,
                self.board
            );
        }
        let found = crate::forbid::findings(&globs, assembly);
        if found.is_empty() {
            bail!(
                "no store path of {}'s image or its closure matches {:?}",
                self.board,
                self.path
            );
        }
        for f in found {
            let name = crate::forbid::name_of(&f.store_path);
            if f.in_image {
                println!(
                    "{} (in the image, {} entries), {} chains:",
                    f.store_path,
                    f.kept_files,
                    f.chains.len()
                );
            } else {
                println!(
                    "{} (only in the closure: nothing of it is kept):",
                    f.store_path
                );
            }
            for c in &f.chains {
                println!("  {c}");
            }
            if f.chains.is_empty() {
                println!("  ({name}: no chain from a package or root)");
            }
        }
        Ok(())
    }
}
