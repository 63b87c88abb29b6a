//! Builds bonsai-init (the `pid1/` crate) for a board: static, for the board's Rust target
//! (musl, installed with rustup when missing), else the matching gnu target with crt-static.
//! [`store_path`] adds the binary to the Nix store (`nix-store --add`), so that an image takes
//! it from a store path like every other program, and a team's cache can hold it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::config::Board;
use crate::ui;

/// The cargo profile for bonsai-init (panic=abort, size-optimised, stripped); its folder
/// name contains "release" so that release tooling finds it.
pub const PROFILE: &str = "release-pid1";

/// `repro` fakes the wall clock with libfaketime, under which rustc hangs: the Rust toolchain
/// runs at the real time (its output does not depend on the clock).
fn real_clock(cmd: &mut Command) -> &mut Command {
    cmd.env_remove("LD_PRELOAD")
        .env_remove("FAKETIME")
        .env_remove("FAKETIME_NO_CACHE")
}

/// `rustc -V` (empty when rustc cannot run): a new compiler builds another bonsai-init.
pub fn rustc_version() -> String {
    real_clock(&mut Command::new("rustc"))
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn target_installed(triple: &str) -> bool {
    real_clock(&mut Command::new("rustc"))
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|o| {
            let sysroot = String::from_utf8_lossy(&o.stdout).trim().to_string();
            Path::new(&sysroot)
                .join("lib/rustlib")
                .join(triple)
                .join("lib")
                .is_dir()
        })
        .unwrap_or(false)
}

/// Tries `rustup target add`; returns whether the target is there afterwards.
fn add_target(triple: &str) -> bool {
    if target_installed(triple) {
        return true;
    }
    ui::detail(format!("rustup target add {triple}"));
    let ok = real_clock(&mut Command::new("rustup"))
        .args(["target", "add", triple])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    ok && target_installed(triple)
}

fn missing_targets(wanted: &str) -> String {
    let gnu = wanted.replace("-musl", "-gnu");
    format!("neither Rust target {wanted} nor {gnu} is installed, and rustup could not add them (try: rustup target add {wanted})")
}

/// Why bonsai-init cannot be built for this board (no usable Rust target), or `None` if it can.
/// Tries `rustup target add` first, like [`build`].
pub fn unavailable(board: &Board) -> Option<String> {
    let wanted = &board.rust_target;
    if add_target(wanted) || add_target(&wanted.replace("-musl", "-gnu")) {
        None
    } else {
        Some(missing_targets(wanted))
    }
}

/// Linker flags for a target of another architecture than the host's: Debian's cross gcc
/// (`<arch>-linux-gnu-gcc`) when it is there, else the toolchain's rust-lld, which is enough
/// for a static musl binary (rustc brings musl's start files itself).
fn cross_linker(triple: &str) -> Option<String> {
    let arch = triple.split('-').next()?;
    if arch == std::env::consts::ARCH {
        return None;
    }
    let gcc = format!("{arch}-linux-gnu-gcc");
    if crate::host::find_program(&gcc).is_none() && triple.ends_with("-musl") {
        return Some("-C linker=rust-lld -C linker-flavor=ld.lld".into());
    }
    Some(format!("-C linker={gcc}"))
}

/// Returns the path of the built binary.
pub fn build(root: &Path, board: &Board) -> Result<PathBuf> {
    let wanted = board.rust_target.clone();
    let (triple, flags) = if add_target(&wanted) {
        (wanted.clone(), String::new())
    } else {
        let gnu = wanted.replace("-musl", "-gnu");
        if !add_target(&gnu) {
            bail!(
                "cannot build bonsai-init for {}: {}",
                board.name,
                missing_targets(&wanted)
            );
        }
        ui::warn(format!(
            "Rust target {wanted} is not installed and rustup could not add it; building bonsai-init for {gnu} with -C target-feature=+crt-static instead"
        ));
        (gnu, "-C target-feature=+crt-static".to_string())
    };
    ui::step(format!("build bonsai-init for {triple}"));
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).args([
        "build",
        "--quiet",
        "--profile",
        PROFILE,
        "-p",
        "bonsai-init",
        "--target",
        &triple,
    ]);
    // Only this build gets the flags; reproducible paths in panic locations.
    // No host paths in the binary: the checkout, the target folder and cargo's registry.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        });
    let mut rustflags = format!(
        "--remap-path-prefix={}=/target --remap-path-prefix={}=/build --remap-path-prefix={}=/cargo",
        target_dir.display(),
        root.display(),
        cargo_home.display()
    );
    if !flags.is_empty() {
        rustflags.push(' ');
        rustflags.push_str(&flags);
    }
    if let Some(linker) = cross_linker(&triple) {
        rustflags.push(' ');
        rustflags.push_str(&linker);
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", rustflags.replace(' ', "\x1f"));
    // `repro` fakes the wall clock with libfaketime, under which rustc hangs; the compiler
    // runs at the real time (its output does not depend on the clock).
    real_clock(&mut cmd);
    let status = cmd
        .status()
        .context("running cargo build for bonsai-init")?;
    if !status.success() {
        bail!("cargo build of bonsai-init for {triple} failed");
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target_dir.join(&triple).join(PROFILE).join("bonsai-init");
    if !bin.is_file() {
        bail!("cargo built bonsai-init but {} is missing", bin.display());
    }
    Ok(bin)
}

/// The crate's version, from `pid1/Cargo.toml`.
fn version(root: &Path) -> Result<String> {
    let path = root.join("pid1/Cargo.toml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read it", path.display()))?;
    let doc: toml::Table =
        toml::from_str(&text).with_context(|| format!("{}: not TOML", path.display()))?;
    doc.get("package")
        .and_then(|p| p.get("version"))
        .and_then(|v| v.as_str())
        .map(String::from)
        .with_context(|| format!("{}: key 'package.version' is missing", path.display()))
}

/// Builds bonsai-init for `board` and adds it to the Nix store as
/// `/nix/store/<hash>-bonsai-init-<version>-<target>/bin/bonsai-init`. The store path is the
/// hash of the binary's bytes (`nix-store --add`), and the binary is reproducible (no host
/// paths in it), so every machine with the same sources and compiler gets the same path, and a
/// cache that holds it serves it. Returns the store path.
pub fn store_path(root: &Path, board: &Board) -> Result<PathBuf> {
    let bin = build(root, board)?;
    let triple = bin
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .map(|t| t.to_string_lossy().into_owned())
        .unwrap_or_else(|| board.rust_target.clone());
    let name = format!("bonsai-init-{}-{triple}", version(root)?);
    let stage = tempfile::tempdir().context("creating a folder to stage bonsai-init")?;
    let dir = stage.path().join(&name);
    std::fs::create_dir_all(dir.join("bin"))?;
    let staged = dir.join("bin/bonsai-init");
    std::fs::copy(&bin, &staged)
        .with_context(|| format!("copying {} to {}", bin.display(), staged.display()))?;
    std::fs::set_permissions(&staged, std::os::unix::fs::PermissionsExt::from_mode(0o555))?;
    let mut cmd = crate::nixbin::current()?.command("nix-store");
    real_clock(&mut cmd).arg("--add").arg(&dir);
    let out = cmd.output().context("running nix-store --add")?;
    if !out.status.success() {
        bail!(
            "nix-store --add {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !path.ends_with(&format!("-{name}")) {
        bail!("nix-store --add {name} printed '{path}', not a store path");
    }
    Ok(PathBuf::from(path))
}
