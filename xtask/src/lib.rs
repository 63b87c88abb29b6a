//! `cargo xtask`: bonsai's command line. Each command lives in its own module as a struct with
//! `run`; `main` only parses and dispatches. Paths are anchored at [`project_root`].

pub mod abtest;
pub mod bench;
pub mod benchteam;
pub mod benchupdate;
pub mod boot;
pub mod build;
pub mod cache;
pub mod chart;
pub mod config;
pub mod conformance;
pub mod diff;
pub mod digest;
pub mod eval;
pub mod forbid;
pub mod host;
pub mod hygiene;
pub mod image;
pub mod judge;
pub mod kernel_config;
pub mod kmod;
pub mod list;
pub mod new_board;
pub mod nix;
pub mod nix_lock;
pub mod nixbin;
pub mod offline;
pub mod outdir;
pub mod pid1;
pub mod release;
pub mod repro;
pub mod sbom;
pub mod serve;
pub mod settings;
pub mod size;
pub mod sizemap;
pub mod skip;
pub mod ssh;
pub mod teamcache;
pub mod test;
pub mod test_boards;
pub mod ui;
pub mod update;
pub mod updatetest;
pub mod why;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// bonsai: tiny, reproducible embedded Linux images from Nixpkgs store paths, proven in QEMU.
#[derive(Parser, Debug)]
#[command(name = "cargo xtask", version, about, long_about = None)]
pub struct Cli {
    /// Less output: only results and errors
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// More output (every Nix build line, every console line)
    #[arg(short, long, global = true)]
    pub verbose: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Realise a board's packages and kernel with Nix and write out/<board>/
    Build(build::Build),
    /// What a build would realise (derivations, outputs, valid or not), evaluated without
    /// import from derivation and without building anything
    Eval(eval::Eval),
    /// Boot a built board in QEMU (interactive, or headless with --check)
    Boot(boot::Boot),
    /// Write out/<board>/disk.img (and disk.json): the build on a disk the board's firmware boots
    Image(image::Image),
    /// A/B slots in QEMU through the firmware: trial boots, blessing, and rollback from a
    /// release that panics, fails its health check or hangs; prints a scenario x result matrix
    AbTest(abtest::AbTest),
    /// List boards and profiles, one line each
    List(list::List),
    /// Where the bytes are: closure, kept, stripped and compressed size per store path or file
    Size(size::Size),
    /// Create a board (file, kernel fragment, README) from an existing one
    NewBoard(new_board::NewBoard),
    /// Write out/release/<board>-<version>/: kernel, initramfs, manifest, SBOM, SHA256SUMS
    Release(release::Release),
    /// Field updates in QEMU through the firmware: install, refusals, rollback and power cuts
    /// during an install; prints a scenario x result matrix
    UpdateTest(updatetest::UpdateTest),
    /// Serve release folders over HTTP with range requests (to devices; --stdio for QEMU's guestfwd)
    Serve(serve::Serve),
    /// Write a minisign key pair for signing update bundles: <prefix>.pub and <prefix>.key
    Keygen(update::Keygen),
    /// A team's binary cache: keygen, push (sign and copy what boards need), status
    Cache(teamcache::Cache),
    /// A release with its signed update bundle: out/release/<board>-<version>/<board>-<version>.bundle
    Bundle(update::Bundle),
    /// What a device on one release must fetch to get another (from their bundles)
    Delta(update::Delta),
    /// Build a release twice in two fresh checkouts with a changed environment and compare
    Repro(repro::Repro),
    /// What changed between two releases: files, sizes, store paths and versions
    Diff(diff::Diff),
    /// The merged kernel config: which fragment set each option and whether it survived
    KernelConfig(kernel_config::KernelConfig),
    /// Every board with every init backend: build, check, and a matrix of boot times and sizes
    TestBoards(test_boards::TestBoards),
    /// Why is a file or store path in the image: the chain of references back to a root
    Why(why::Why),
    /// Boot one profile with every init backend and print the check x backend matrix
    Conformance(conformance::Conformance),
    /// Pin Debian packages for the offline package set (nix/offline/<arch>.lock.json)
    Pin(offline::Pin),
    /// Install what the tests need and run the whole test suite
    Test(test::Test),
    /// Pin Debian 13's Nix anew: rewrite nix/debian13-nix.<arch>.lock.json (BONSAI_NIX=debian13)
    NixLock(nix_lock::NixLock),
    /// Measure packing, rebuilds and boots against the targets; write BENCHMARKS.md
    Bench(bench::Bench),
    /// Print shell completions (bash, zsh, fish, elvish, powershell)
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff), generated from the same definitions as --help
    Man,
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

/// Where bonsai-init's sources are: the project root when it holds them, else (a `BONSAI_ROOT`
/// with the data folders only) the checkout this binary was built from.
pub fn source_root(root: &Path) -> PathBuf {
    if root.join("pid1/Cargo.toml").is_file() {
        return root.to_path_buf();
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent().map(PathBuf::from).unwrap_or(dir)
}

/// Where output folders go by default: `out/` in the repository (`out/<board>/`,
/// `out/release/`). `BONSAI_OUT` moves it (the tests point it at their own folder, so that they
/// never overwrite what a user built).
pub fn out_root() -> PathBuf {
    match std::env::var_os("BONSAI_OUT") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => project_root().join("out"),
    }
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Usage errors on one line, like every other error; help and version as clap prints them.
        Err(e)
            if e.use_stderr()
                && e.kind() != clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand =>
        {
            eprintln!("error: {}", ui::usage_error(&e));
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    ui::set_level(if cli.quiet {
        ui::Level::Quiet
    } else if cli.verbose {
        ui::Level::Verbose
    } else {
        ui::Level::Normal
    });
    let result = match cli.command {
        Command::Build(c) => c.run().map(|_| ()),
        Command::Boot(c) => c.run(),
        Command::Image(c) => c.run(),
        Command::AbTest(c) => c.run(),
        Command::Eval(c) => c.run(),
        Command::List(c) => c.run(),
        Command::Conformance(c) => c.run(),
        Command::Size(c) => c.run(),
        Command::Why(c) => c.run(),
        Command::KernelConfig(c) => c.run(),
        Command::TestBoards(c) => c.run(),
        Command::Release(c) => c.run().map(|_| ()),
        Command::Keygen(c) => c.run(),
        Command::Cache(c) => c.run(),
        Command::Serve(c) => c.run(),
        Command::UpdateTest(c) => c.run(),
        Command::Bundle(c) => c.run(),
        Command::Delta(c) => c.run(),
        Command::Repro(c) => c.run(),
        Command::Diff(c) => c.run(),
        Command::NewBoard(c) => c.run(),
        Command::Test(c) => c.run(),
        Command::NixLock(c) => c.run(),
        Command::Pin(c) => c.run(),
        Command::Bench(c) => c.run(),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "cargo-xtask", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd)
                .render(&mut std::io::stdout())
                .map_err(Into::into)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", ui::error_report(&e));
            ExitCode::FAILURE
        }
    }
}
