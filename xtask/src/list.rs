//! `cargo xtask list`: boards and profiles, one line each.

use anyhow::Result;
use clap::Args;

use crate::config::Config;
use crate::project_root;

#[derive(Args, Debug)]
pub struct List {}

impl List {
    pub fn run(self) -> Result<()> {
        let cfg = Config::new(&project_root());
        for name in cfg.board_names()? {
            match cfg.load_board(&name) {
                Ok(b) => println!(
                    "board    {name:<20} {} ({}, profile {})",
                    b.description,
                    b.arch.name(),
                    b.profile
                ),
                Err(e) => println!("board    {name:<20} INVALID: {}", crate::ui::one_line(&e)),
            }
        }
        for name in cfg.profile_names()? {
            match cfg.load_profile(&name) {
                Ok(p) => println!(
                    "profile  {name:<20} {} (init {}, packages {})",
                    p.description,
                    p.init,
                    p.packages.join(" ")
                ),
                Err(e) => println!("profile  {name:<20} INVALID: {}", crate::ui::one_line(&e)),
            }
        }
        Ok(())
    }
}
