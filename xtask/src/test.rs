//! `cargo xtask test`: the whole test suite. Installs what the tests need (as root on
//! Debian/Ubuntu), then runs every crate's tests, including the end-to-end build and QEMU
//! boot of the default board.

use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::{host, project_root, ui};

#[derive(Args, Debug)]
pub struct Test {
    /// Only the fast unit tests (no Nix, no QEMU)
    #[arg(long)]
    pub unit: bool,
    /// Run the end-to-end build and boot of the default board against a real Nixpkgs (a path
    /// or a flake reference such as github:NixOS/nixpkgs/nixos-25.05); needs the network
    #[arg(long, conflicts_with = "unit")]
    pub nixpkgs: Option<String>,
    /// Extra arguments for `cargo test` (after --)
    #[arg(last = true)]
    pub rest: Vec<String>,
}

impl Test {
    pub fn run(self) -> Result<()> {
        let root = project_root();
        let timer = ui::Timer::start();
        if let Some(r) = &self.nixpkgs {
            // Before installing anything: without the network this is the one line to see.
            check_nixpkgs_reachable(r)?;
        }
        if !self.unit {
            ui::step("check host prerequisites for the end-to-end tests");
            let mut tools = vec![host::NIX, host::CPIO, host::DPKG_DEB];
            tools.extend_from_slice(host::KERNEL_TOOLS);
            let mut extra = vec![
                host::LIBELF_HEADER,
                ("/usr/bin/qemu-system-x86_64", "qemu-system-x86"),
                // xtask/tests/aarch64.rs: the qemu-aarch64 board, cross-built on this host
                ("/usr/bin/qemu-system-aarch64", "qemu-system-arm"),
            ];
            if let Some((cc, libc)) =
                host::cross_tools(crate::config::Arch::Aarch64, crate::offline::host_arch()?)
            {
                tools.push(cc);
                extra.push(libc);
            }
            host::ensure(&tools, &extra)?;
        }
        if !self.unit {
            // The tests read real store paths: build the default board first (installs what is
            // missing, downloads the offline set, builds the kernel once; Nix caches it).
            host::ensure(
                &[
                    host::Tool {
                        program: "chromium",
                        package: "chromium",
                    },
                    host::Tool {
                        program: "ssh",
                        package: "openssh-client",
                    },
                    host::Tool {
                        program: "readelf",
                        package: "binutils",
                    },
                ],
                &[],
            )?;
            // The SBOM test validates with Python's jsonschema (from PyPI) against schemas/.
            let have = Command::new("python3")
                .args(["-c", "import jsonschema, referencing"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false);
            if !have {
                ui::step("pip install jsonschema (for the SBOM schema test)");
                let st = Command::new("python3")
                    .args(["-m", "pip", "install", "-q", "jsonschema"])
                    .status()
                    .context("running pip")?;
                if !st.success() {
                    bail!("python3 -m pip install jsonschema failed; install it and run again");
                }
            }
            // xtask/tests/nix_versions.rs runs the e2e flow under both: the log names them.
            let pinned = crate::nixbin::provision(&root)?.join("nix");
            ui::step(format!(
                "Nix versions under test: host {}; BONSAI_NIX=debian13 {}",
                host::version_line("nix")?,
                host::version_line(&pinned.display().to_string())?
            ));
            crate::build::Build {
                board: "qemu-x86_64".into(),
                nixpkgs: self.nixpkgs.clone(),
                ..Default::default()
            }
            .run()?;
        }
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(&root);
        if let Some(r) = &self.nixpkgs {
            // The end-to-end build and boot only, every build in them from that Nixpkgs.
            cmd.args(["test", "--release", "-p", "xtask", "--test", "e2e", "--"])
                .args(NIXPKGS_E2E)
                .args(&self.rest)
                .env("BONSAI_NIXPKGS", r);
        } else {
            cmd.args(["test", "--workspace", "--release"]);
            if self.unit {
                cmd.args(["--lib", "--bins"]);
            }
            cmd.args(&self.rest);
        }
        if !self.unit {
            // The end-to-end tests boot QEMU; one at a time keeps them inside their timeouts on small machines.
            cmd.env("BONSAI_E2E", "1");
        }
        ui::step(match &self.nixpkgs {
            Some(r) => format!("cargo test -p xtask --test e2e (packages from Nixpkgs {r})"),
            None if self.unit => "cargo test --workspace (unit only)".into(),
            None => "cargo test --workspace".into(),
        });
        let status = cmd.status().context("running cargo test")?;
        if !status.success() {
            bail!("tests failed after {:.0} s", timer.secs());
        }
        if !self.unit && self.nixpkgs.is_none() {
            // The benchmark's short version, so it cannot rot (it never asserts on times).
            cargo_xtask(&root, &["bench", "--quick"])?;
            // The board matrix, printed for the CI log (the e2e test checks its JSON as well).
            cargo_xtask(&root, &["test-boards"])?;
            // Every fuzz target for a bounded time (installs cargo-fuzz if missing).
            let secs = std::env::var("BONSAI_FUZZ_SECONDS").unwrap_or_else(|_| "20".into());
            ui::step(format!("fuzz every target for {secs} s"));
            let st = Command::new("bash")
                .arg(root.join("fuzz/run.sh"))
                .arg(&secs)
                .status()
                .context("running fuzz/run.sh")?;
            if !st.success() {
                bail!("fuzzing found a crash (see fuzz/artifacts/)");
            }
        }
        ui::step(format!("all tests passed in {:.0} s", timer.secs()));
        Ok(())
    }
}

/// The end-to-end tests `test --nixpkgs` runs: the default board's build and its boot.
const NIXPKGS_E2E: &[&str] = &["build_is_sane_and_reproducible", "boot_check_passes"];

/// A Nixpkgs given as a path must exist; a flake reference must resolve (`nix flake metadata`
/// fetches it). Fails in one line saying what to do, as it will without the network.
fn check_nixpkgs_reachable(r: &str) -> Result<()> {
    if std::path::Path::new(r).exists() {
        return Ok(());
    }
    let mut cmd = crate::nixbin::select(true)?.command("nix");
    cmd.args(["flake", "metadata", "--json", r]);
    let out = cmd.output().context("running nix flake metadata")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let why = err
            .lines()
            .filter_map(|l| l.trim().strip_prefix("error:"))
            .map(str::trim)
            .rfind(|l| !l.is_empty())
            .unwrap_or("nix flake metadata failed");
        bail!("--nixpkgs {r}: cannot fetch it ({why}); testing against a real Nixpkgs needs the network, or a local checkout (--nixpkgs ~/src/nixpkgs)");
    }
    Ok(())
}

/// Runs `cargo xtask <args>` as a step of the test command. Through cargo, not this process's
/// own file: `cargo test --release` has just relinked target/release/xtask (test builds unify
/// dev-dependency features), so the file this process started from may be gone.
fn cargo_xtask(root: &std::path::Path, args: &[&str]) -> Result<()> {
    let shown = format!("cargo xtask {}", args.join(" "));
    ui::step(&shown);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["run", "--quiet", "--release", "-p", "xtask", "--"])
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("running {shown}"))?;
    if !st.success() {
        bail!("{shown} failed");
    }
    Ok(())
}
