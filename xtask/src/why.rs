//! `cargo xtask why --board <b> <path>`: the chain of references that kept a file (or a store
//! path) in the image, back to its root.

use anyhow::{bail, Result};
use clap::Args;

use crate::size;

#[derive(Args, Debug)]
pub struct Why {
    #[arg(long, default_value = "qemu-x86_64")]
    pub board: String,
    /// An image path (/nix/store/…/lib/libc.so.6) or a store path
    pub path: String,
}

impl Why {
    pub fn run(self) -> Result<()> {
        let out = crate::out_root().join(&self.board);
        let assembly = size::read_assembly_pub(&out)?;
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
