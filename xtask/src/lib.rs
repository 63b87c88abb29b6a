//! `cargo xtask`: bonsai's command line. Each command lives in its own module as a struct with
//! `run`; `main` only parses and dispatches. Paths are anchored at [`project_root`].

pub mod boot;
pub mod build;
pub mod config;
pub mod conformance;
pub mod host;
pub mod list;
pub mod nix;
pub mod offline;
pub mod pid1;
pub mod size;
pub mod sizemap;
pub mod ssh;
pub mod test;
pub mod ui;
pub mod why;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// bonsai: tiny, reproducible embedded Linux images from Nixpkgs store paths, proven in QEMU.
#[derive(Parser, Debug)]
#[command(name = "cargo xtask", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Realise a board's packages and kernel with Nix and write out/<board>/
    Build(build::Build),
    /// Boot a built board in QEMU (interactive, or headless with --check)
    Boot(boot::Boot),
    /// List boards and profiles, one line each
    List(list::List),
    /// Where the bytes are: closure, kept, stripped and compressed size per store path or file
    Size(size::Size),
    /// Why is a file or store path in the image: the chain of references back to a root
    Why(why::Why),
    /// Boot one profile with every init backend and print the check x backend matrix
    Conformance(conformance::Conformance),
    /// Install what the tests need and run the whole test suite
    Test(test::Test),
}

/// The repository root (the parent of this crate's folder), whatever the caller's cwd.
/// `BONSAI_ROOT` overrides it (tests point it at a scratch copy of the data folders).
pub fn project_root() -> PathBuf {
    if let Some(r) = std::env::var_os("BONSAI_ROOT") {
        return PathBuf::from(r);
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent().map(PathBuf::from).unwrap_or(dir)
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build(c) => c.run().map(|_| ()),
        Command::Boot(c) => c.run(),
        Command::List(c) => c.run(),
        Command::Conformance(c) => c.run(),
        Command::Size(c) => c.run(),
        Command::Why(c) => c.run(),
        Command::Test(c) => c.run(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", ui::one_line(&e));
            ExitCode::FAILURE
        }
    }
}
