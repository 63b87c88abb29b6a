//! `cargo xtask list`: boards and profiles, one line each.

use anyhow::Result;
use clap::Args;

use crate::config::Config;
use crate::project_root;

#[derive(Args, Debug)]
pub struct List {
    /// JSON: {"boards": [{name, description, arch, profile, valid, error}], "profiles": [{name, description, init, packages, inherit, valid, error}]}; every key is described in schemas/list.schema.json
    #[arg(long)]
    pub json: bool,
}

impl List {
    pub fn run(self) -> Result<()> {
        let cfg = Config::new(&project_root());
        if self.json {
            let mut boards = Vec::new();
            for name in cfg.board_names()? {
                boards.push(match cfg.load_board(&name) {
                    Ok(b) => serde_json::json!({"name": name, "description": b.description, "arch": b.arch.name(), "profile": b.profile, "disk": b.disk.as_ref().map(|d| crate::image::layout_name(d.layout)), "valid": true, "error": null}),
                    Err(e) => serde_json::json!({"name": name, "description": null, "arch": null, "profile": null, "disk": null, "valid": false, "error": crate::ui::one_line(&e)}),
                });
            }
            let mut profiles = Vec::new();
            for name in cfg.profile_names()? {
                profiles.push(match cfg.load_profile(&name) {
                    Ok(p) => serde_json::json!({"name": name, "description": p.description, "init": p.init, "packages": p.packages, "inherit": p.ancestors, "valid": true, "error": null}),
                    Err(e) => serde_json::json!({"name": name, "description": null, "init": null, "packages": [], "inherit": [], "valid": false, "error": crate::ui::one_line(&e)}),
                });
            }
            println!(
                "{}",
                serde_json::to_string_pretty(
                    &serde_json::json!({"boards": boards, "profiles": profiles})
                )?
            );
            return Ok(());
        }
        for name in cfg.board_names()? {
            match cfg.load_board(&name) {
                Ok(b) => println!(
                    "board    {name:<20} {} ({}, profile {}{})",
                    b.description,
                    b.arch.name(),
                    b.profile,
                    b.disk
                        .as_ref()
                        .map(|d| format!(", disk {}", crate::image::layout_name(d.layout)))
                        .unwrap_or_default()
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
