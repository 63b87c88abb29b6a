//! `cargo xtask test`: the whole test suite. Installs what the tests need (as root on
//! Debian/Ubuntu), runs clippy, then every crate's tests, including the end-to-end build and
//! QEMU boot of the default board. `--unit` runs every test target that needs neither Nix nor
//! QEMU (all but [`SLOW_TEST_TARGETS`]).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::{host, project_root, ui};

/// The test targets (package, target) that need Nix, QEMU or a host tool the full run installs:
/// `--unit` runs every other one.
pub const SLOW_TEST_TARGETS: &[(&str, &str)] = &[
    ("xtask", "e2e"),
    ("xtask", "aarch64"),
    ("xtask", "errors"),
    ("xtask", "nix_glue"),
    ("xtask", "disk"),
    ("xtask", "ab_test"),
    ("xtask", "update_test"),
    ("xtask", "optional_deps"),
    ("xtask", "team_cache"),
    ("xtask", "devices"),
    // Debian's minisign as the oracle of the bundle's signatures (installed by the full run)
    ("bundle", "minisign"),
];

/// The clippy runs of the test command: every crate, and bonsai-init on its own (its
/// no-panic lints: `unwrap`, `expect`, indexing, `panic!` are denied outside its tests).
const CLIPPY_RUNS: &[&[&str]] = &[
    &[
        "clippy",
        "--release",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ],
    &[
        "clippy",
        "--release",
        "-p",
        "bonsai-init",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ],
];

#[derive(Args, Debug)]
pub struct Test {
    /// Only the tests that need neither Nix nor QEMU: every crate's unit tests and every test
    /// target but the end-to-end ones (clippy runs too)
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
                // xtask/tests/disk.rs: UEFI firmware, and mtools and sfdisk as oracles
                ("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf"),
                ("/usr/share/AAVMF/AAVMF_CODE.fd", "qemu-efi-aarch64"),
                ("/usr/bin/mdir", "mtools"),
                ("/usr/sbin/sfdisk", "fdisk"),
                // bundle/tests/minisign.rs: the oracle of the update bundle's signatures
                ("/usr/bin/minisign", "minisign"),
                // xtask/tests/team_cache.rs: a remote builder and pushes through a real sshd
                ("/usr/sbin/sshd", "openssh-server"),
                ("/usr/bin/ssh", "openssh-client"),
                ("/usr/sbin/ip", "iproute2"),
            ];
            if let Some((cc, libc)) =
                host::cross_tools(crate::config::Arch::Aarch64, crate::host::host_arch()?)
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
        ensure_jsonschema()?;
        for args in CLIPPY_RUNS {
            cargo(&root, args)?;
        }
        let args: Vec<String> = match &self.nixpkgs {
            // The end-to-end build and boot only, every build in them from that Nixpkgs.
            Some(_) => ["test", "--release", "-p", "xtask", "--test", "e2e", "--"]
                .iter()
                .chain(NIXPKGS_E2E)
                .map(|s| s.to_string())
                .collect(),
            None if self.unit => unit_test_args(&test_targets(&root)?),
            // Every target even after a failure, so one CI run reports every failing test.
            None => ["test", "--workspace", "--release", "--no-fail-fast"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        };
        let mut cmd = Command::new(cargo_program());
        cmd.current_dir(&root).args(&args).args(&self.rest);
        if let Some(r) = &self.nixpkgs {
            cmd.env(crate::nix::NIXPKGS_ENV, r);
        }
        ui::step(format!("cargo {}", args.join(" ")));
        let status = cmd.status().context("running cargo test")?;
        if !status.success() {
            bail!("tests failed after {:.0} s", timer.secs());
        }
        if !self.unit && self.nixpkgs.is_none() {
            // The benchmark's short version, so it cannot rot (it never asserts on times).
            cargo_xtask(&root, &["bench", "--quick"])?;
            // The board matrix, printed for the CI log (the e2e test checks its JSON as well).
            cargo_xtask(&root, &["test-boards"])?;
            // Every fuzz target for a fixed number of inputs from the committed seeds, so the
            // verdict replays anywhere (installs cargo-fuzz if missing).
            let runs = std::env::var("BONSAI_FUZZ_RUNS").unwrap_or_else(|_| FUZZ_RUNS.into());
            ui::step(format!("fuzz every target for {runs} inputs"));
            let st = Command::new("bash")
                .arg(root.join("fuzz/run.sh"))
                .arg(&runs)
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

/// Inputs per fuzz target in the test command (fuzz/run.sh's default; not timed on this machine).
const FUZZ_RUNS: &str = "20000";

fn cargo_program() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Runs `cargo <args>` in the repository as a step of the test command.
fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    let shown = format!("cargo {}", args.join(" "));
    ui::step(&shown);
    let st = Command::new(cargo_program())
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("running {shown}"))?;
    if !st.success() {
        bail!("{shown} failed");
    }
    Ok(())
}

/// The schema tests (SBOM, every `--json` output) validate with Python's jsonschema (from
/// PyPI) against schemas/.
fn ensure_jsonschema() -> Result<()> {
    let have = Command::new("python3")
        .args(["-c", "import jsonschema, referencing"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !have {
        ui::step("pip install jsonschema (for the schema tests)");
        let st = Command::new("python3")
            .args(["-m", "pip", "install", "-q", "jsonschema"])
            .status()
            .context("running pip")?;
        if !st.success() {
            bail!("python3 -m pip install jsonschema failed; install it and run again");
        }
    }
    Ok(())
}

/// Every test target of the workspace's crates, as (package, target name), from `cargo metadata`.
fn test_targets(root: &Path) -> Result<Vec<(String, String)>> {
    let out = Command::new(cargo_program())
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(root)
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    let mut targets = Vec::new();
    for p in meta["packages"].as_array().into_iter().flatten() {
        for t in p["targets"].as_array().into_iter().flatten() {
            if t["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
            {
                targets.push((
                    p["name"].as_str().unwrap_or_default().to_string(),
                    t["name"].as_str().unwrap_or_default().to_string(),
                ));
            }
        }
    }
    targets.sort();
    Ok(targets)
}

/// `cargo test` arguments for `--unit`: every crate's unit tests, and every test target that
/// is not in [`SLOW_TEST_TARGETS`].
fn unit_test_args(targets: &[(String, String)]) -> Vec<String> {
    let mut args: Vec<String> = ["test", "--workspace", "--release", "--lib", "--bins"]
        .map(String::from)
        .to_vec();
    for (package, name) in targets {
        if !SLOW_TEST_TARGETS.contains(&(package.as_str(), name.as_str())) {
            args.extend(["--test".to_string(), name.clone()]);
        }
    }
    args
}

/// Runs `cargo xtask <args>` as a step of the test command. Through cargo, not this process's
/// own file: `cargo test --release` has just relinked target/release/xtask (test builds unify
/// dev-dependency features), so the file this process started from may be gone.
fn cargo_xtask(root: &Path, args: &[&str]) -> Result<()> {
    let shown = format!("cargo xtask {}", args.join(" "));
    ui::step(&shown);
    let st = Command::new(cargo_program())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_runs_every_test_target_but_the_slow_ones() {
        let targets = test_targets(&project_root()).unwrap();
        // The slow list names real targets, and target names are unique across crates
        // (`cargo test --test <name>` selects by name in every crate).
        for slow in SLOW_TEST_TARGETS {
            assert!(
                targets
                    .iter()
                    .any(|(p, n)| (p.as_str(), n.as_str()) == *slow),
                "SLOW_TEST_TARGETS names {slow:?}, which is not a test target"
            );
        }
        let mut names: Vec<&str> = targets.iter().map(|(_, n)| n.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), targets.len(), "two test targets share a name");
        let args = unit_test_args(&targets);
        let selected: Vec<&str> = args
            .windows(2)
            .filter(|w| w[0] == "--test")
            .map(|w| w[1].as_str())
            .collect();
        // The fake-QEMU judge tests, the rootfs and pid1 test files are fast: all in.
        for fast in [
            "fake_qemu",
            "gnu_cpio",
            "pack",
            "proptests",
            "select_strip",
            "test_mode",
            "claims",
        ] {
            assert!(
                selected.contains(&fast),
                "--unit leaves out {fast}: {args:?}"
            );
        }
        for (_, slow) in SLOW_TEST_TARGETS {
            assert!(!selected.contains(slow), "--unit runs {slow}: {args:?}");
        }
        assert_eq!(selected.len() + SLOW_TEST_TARGETS.len(), targets.len());
        assert!(args.starts_with(
            &["test", "--workspace", "--release", "--lib", "--bins"].map(String::from)
        ));
    }

    /// Every variable the test command sets on its children is read by some code (the
    /// command once set BONSAI_E2E, which nothing read).
    #[test]
    fn the_test_command_sets_only_variables_that_something_reads() {
        let root = project_root();
        let me = std::fs::read_to_string(root.join("xtask/src/test.rs")).unwrap();
        let mut sources = String::new();
        for dir in [
            "xtask/src",
            "xtask/tests",
            "xtask/tests/common",
            "rootfs/src",
            "rootfs/tests",
            "qemu/src",
            "qemu/tests",
            "pid1/src",
            "pid1/tests",
        ] {
            for e in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "rs") && !p.ends_with("xtask/src/test.rs") {
                    sources.push_str(&std::fs::read_to_string(&p).unwrap());
                }
            }
        }
        let mut set = Vec::new();
        for part in me.split(".env(\"").skip(1) {
            if let Some(name) = part.split('"').next() {
                set.push(name.to_string());
            }
        }
        for name in &set {
            assert!(
                [
                    format!("var(\"{name}\")"),
                    format!("var_os(\"{name}\")"),
                    format!("env!(\"{name}\")")
                ]
                .iter()
                .any(|read| sources.contains(read)),
                "the test command sets {name}, which nothing reads"
            );
        }
    }

    #[test]
    fn the_test_command_runs_clippy_on_bonsai_init_and_every_crate() {
        let denies = |args: &[&str]| {
            args.ends_with(&["--", "-D", "warnings"]) && args.contains(&"--all-targets")
        };
        assert!(CLIPPY_RUNS
            .iter()
            .any(|a| denies(a) && a.windows(2).any(|w| w == ["-p", "bonsai-init"])));
        assert!(CLIPPY_RUNS
            .iter()
            .any(|a| denies(a) && a.contains(&"--workspace")));
    }
}
