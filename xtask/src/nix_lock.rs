//! `cargo xtask nix-lock`: resolve Debian 13's `nix-bin` and its dependencies anew (a private
//! apt state with an empty dpkg status) and rewrite `nix/debian13-nix.<arch>.lock.json`, the
//! pins of the Nix that `BONSAI_NIX=debian13` runs.

use anyhow::Result;
use clap::Args;

use crate::project_root;

#[derive(Args, Debug)]
pub struct NixLock {}

impl NixLock {
    pub fn run(self) -> Result<()> {
        let root = project_root();
        let dest = crate::nixbin::write_lock(&root)?;
        println!("{}", dest.strip_prefix(&root).unwrap_or(&dest).display());
        Ok(())
    }
}
