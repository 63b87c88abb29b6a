//! `cargo xtask cache keygen | push | status`: a team's binary cache, with Nix's own machinery.
//! `keygen` is `nix-store --generate-binary-cache-key`; `push` realises what boards need (the
//! kernel, its config, the packages, bonsai-init's store path), signs the closure in the local store (`nix store sign`)
//! and copies it (`nix copy`) to a `file://`, `ssh://` or `ssh-ng://` store; `status` asks a
//! cache (any store URL Nix reads, `http(s)://` too) for each of those paths and its closure.
//! Settings for pulling live in `bonsai.toml` ([`crate::settings`]).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use crate::config::{Config, KernelSource};
use crate::nix::{self, PackageSource};
use crate::{project_root, settings, ui};

#[derive(Args, Debug)]
pub struct Cache {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Subcommand, Debug)]
pub enum Action {
    /// Write a signing key pair for a binary cache: <prefix>.sec and <prefix>.pub
    Keygen {
        /// Path prefix of the two files
        #[arg(long)]
        out: PathBuf,
        /// The key's name, which Nix shows in signatures (default: the prefix's file name, with -1)
        #[arg(long)]
        name: Option<String>,
    },
    /// Sign and copy what boards need (kernel, kernel config, packages, bonsai-init, with their closures)
    Push {
        /// Boards to push (default: every board)
        #[arg(long)]
        board: Vec<String>,
        /// The store to copy to: file:///dir, ssh://host, ssh-ng://host
        #[arg(long)]
        to: String,
        /// The secret key file (`cache keygen`)
        #[arg(long)]
        key: PathBuf,
        /// Real Nixpkgs (a path or flake reference) instead of the offline set
        #[arg(long)]
        nixpkgs: Option<String>,
    },
    /// What a cache holds of what boards need, per board and path, the kernel included
    Status {
        /// Boards to ask about (default: every board)
        #[arg(long)]
        board: Vec<String>,
        /// The cache: file:///dir, http(s)://host/path, ssh://host, ssh-ng://host
        #[arg(long)]
        from: String,
        /// Real Nixpkgs (a path or flake reference) instead of the offline set
        #[arg(long)]
        nixpkgs: Option<String>,
    },
}

impl Cache {
    pub fn run(self) -> Result<()> {
        settings::load(&project_root())?;
        match self.action {
            Action::Keygen { out, name } => keygen(&out, name),
            Action::Push {
                board,
                to,
                key,
                nixpkgs,
            } => push(&board, &to, &key, nixpkgs.as_deref()).map(|_| ()),
            Action::Status {
                board,
                from,
                nixpkgs,
            } => status(&board, &from, nixpkgs.as_deref()),
        }
    }
}

fn keygen(prefix: &Path, name: Option<String>) -> Result<()> {
    let file = |ext: &str| PathBuf::from(format!("{}.{ext}", prefix.display()));
    let (sec, public) = (file("sec"), file("pub"));
    for f in [&sec, &public] {
        if f.exists() {
            bail!(
                "{}: exists; cache keygen never overwrites a key",
                f.display()
            );
        }
    }
    let name = name.unwrap_or_else(|| {
        let base = prefix
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "bonsai".into());
        format!("{base}-1")
    });
    if name.is_empty() || name.contains(':') || name.contains(char::is_whitespace) {
        bail!("--name '{name}': a key name has no ':' and no spaces");
    }
    let mut cmd = crate::nixbin::current()?.command("nix-store");
    cmd.arg("--generate-binary-cache-key")
        .arg(&name)
        .arg(&sec)
        .arg(&public);
    let out = cmd.output().context("running nix-store")?;
    if !out.status.success() {
        bail!(
            "nix-store --generate-binary-cache-key: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    std::fs::set_permissions(&sec, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("{}: setting its mode", sec.display()))?;
    let key = std::fs::read_to_string(&public)?.trim().to_string();
    println!(
        "wrote {} (secret: keep it out of the repository) and {}",
        sec.display(),
        public.display()
    );
    println!("for bonsai.toml: trusted-public-keys = [\"{key}\"]");
    Ok(())
}

/// One store path a board needs: what it is, and the path.
struct Need {
    what: String,
    path: String,
}

fn boards(names: &[String]) -> Result<Vec<String>> {
    if names.is_empty() {
        Config::new(&project_root()).board_names()
    } else {
        Ok(names.to_vec())
    }
}

/// bonsai-init's store path for `board` (built with cargo and added to this machine's store),
/// or `None` with a warning when the board has no Rust target for it.
fn bonsai_init(board_name: &str) -> Result<Option<String>> {
    let root = project_root();
    let board = Config::new(&root).load_board(board_name)?;
    if let Some(why) = crate::pid1::unavailable(&board) {
        ui::warn(format!("{board_name}: bonsai-init is left out: {why}"));
        return Ok(None);
    }
    let path = crate::pid1::store_path(&crate::source_root(&root), &board)?;
    Ok(Some(path.display().to_string()))
}

/// The store paths `board` needs: its kernel, the kernel's config and its packages (the
/// outputs bonsai reads), as `eval` reports them (Nix builds nothing), and bonsai-init's store
/// path (cargo builds it, when it is not built yet).
fn needs(board: &str, nixpkgs: Option<&str>) -> Result<Vec<Need>> {
    let report = crate::eval::Eval {
        board: board.to_string(),
        nixpkgs: nixpkgs.map(String::from),
        ..Default::default()
    }
    .report()?;
    let pid1 = bonsai_init(board)?.map(|path| Need {
        what: "bonsai-init".into(),
        path,
    });
    Ok(report
        .items
        .iter()
        .filter_map(|i| {
            let o = i.outputs.iter().find(|o| o.name == i.output)?;
            let what = match i.role {
                "package" => format!("package {}", i.attribute),
                r => r.to_string(),
            };
            Some(Need {
                what,
                path: o.path.clone(),
            })
        })
        .chain(pid1)
        .collect())
}

/// Realises what `board` needs (building what is not in the store or a cache), bonsai-init's
/// store path included, and returns the paths.
fn realise(board_name: &str, nixpkgs: Option<&str>) -> Result<Vec<String>> {
    let root = project_root();
    let cfg = Config::new(&root);
    let board = cfg.load_board(board_name)?;
    let profile = cfg.load_profile(&board.profile)?;
    let backend = rootfs::Backend::parse(&profile.init)
        .with_context(|| format!("unknown init '{}'", profile.init))?;
    let packages = crate::build::packages_for(&profile, backend);
    let source = PackageSource::from_request(nixpkgs)?;
    let eval = nix::Eval::for_profile(&root, &board, &packages, &profile, &source)?;
    let mut attrs: Vec<String> = (0..packages.len())
        .map(|i| format!("packages.p{i}"))
        .collect();
    if matches!(board.kernel.source, KernelSource::Build { .. }) {
        attrs.push("kernelConfig".into());
    }
    attrs.push("kernel".into());
    ui::step(format!("realise {board_name}: {} store paths", attrs.len()));
    let paths = eval.build(&attrs, &format!("realising {board_name}"))?;
    Ok(paths
        .iter()
        .map(|p| p.display().to_string())
        .chain(bonsai_init(board_name)?)
        .collect())
}

/// Pushes what the boards need; returns "<n> store paths (<size>)".
pub fn push(names: &[String], to: &str, key: &Path, nixpkgs: Option<&str>) -> Result<String> {
    settings::check_url(to, "--to", true)?;
    let text = std::fs::read_to_string(key)
        .with_context(|| format!("--key {}: cannot read the secret key", key.display()))?;
    let key_name = text.trim().split_once(':').map(|(n, _)| n.to_string());
    let Some(key_name) = key_name.filter(|_| text.trim().len() > 80) else {
        bail!(
            "--key {}: not a Nix secret key (name:base64, as `cargo xtask cache keygen` writes it)",
            key.display()
        );
    };
    let timer = ui::Timer::start();
    let nixbin = crate::nixbin::current()?;
    ui::step(format!("nix: {} ({})", nixbin.version, nixbin.kind));
    let mut roots = BTreeSet::new();
    for b in boards(names)? {
        roots.extend(realise(&b, nixpkgs)?);
    }
    let roots: Vec<String> = roots.into_iter().collect();
    let closure = nix::closure(&roots.iter().map(PathBuf::from).collect::<Vec<_>>())?;
    let bytes: u64 = closure.values().map(|p| p.nar_size).sum();
    ui::step(format!(
        "sign {} store paths ({}) with {key_name}",
        closure.len(),
        ui::size(bytes)
    ));
    let mut sign = nixbin.command("nix");
    sign.args(["store", "sign", "--recursive", "--key-file"])
        .arg(key)
        .args(&roots);
    run(sign, "nix store sign")?;
    ui::step(format!("copy to {to}"));
    let mut copy = nixbin.command("nix");
    copy.args(["copy", "--to", to]).args(&roots);
    if let Err(e) = run(copy, "nix copy") {
        let text = format!("{e:#}");
        // A store (ssh-ng://, a daemon) checks the signatures against its own keys.
        if text.contains("lacks a valid signature") {
            bail!("{text} ({to} does not trust {key_name}: add the public key that `cache keygen` wrote, <prefix>.pub, to trusted-public-keys in that machine's nix.conf)");
        }
        return Err(e);
    }
    let what = format!("{} store paths ({})", closure.len(), ui::size(bytes));
    println!(
        "pushed {what} for {} to {to}, signed by {key_name}, in {:.1} s",
        boards(names)?.join(", "),
        timer.secs()
    );
    Ok(what)
}

/// Runs a Nix command; its error is one line naming the store path when Nix names one.
fn run(mut cmd: std::process::Command, what: &str) -> Result<String> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        let log: Vec<String> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .map(String::from)
            .collect();
        bail!("{what}: {}", nix::failure_summary(&log));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `store` holds `path` (its narinfo, for a binary cache).
fn holds(store: &str, path: &str) -> Result<bool> {
    let mut cmd = crate::nixbin::current()?.command("nix");
    cmd.args(["path-info", "--store", store, path]);
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .context("running nix path-info")?;
    if out.status.success() {
        return Ok(true);
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("is not valid") || err.contains("does not exist") {
        return Ok(false);
    }
    bail!(
        "--from {store}: {}",
        nix::failure_summary(&err.lines().map(String::from).collect::<Vec<_>>())
    )
}

fn status(names: &[String], from: &str, nixpkgs: Option<&str>) -> Result<()> {
    settings::check_url(from, "--from", false)?;
    let mut all_ok = true;
    for b in boards(names)? {
        let needs = needs(&b, nixpkgs)?;
        let paths: Vec<String> = needs.iter().map(|n| n.path.clone()).collect();
        let local_missing = crate::eval::invalid_paths(&paths)?;
        let mut lines = Vec::new();
        let (mut held, mut kernel) = (0, false);
        for n in &needs {
            let top = holds(from, &n.path)?;
            // The closure, when this machine has the path: a substitution needs all of it.
            let detail = if local_missing.contains(&n.path) {
                " (not in this machine's store: its closure is not checked)".to_string()
            } else {
                let c = nix::closure(&[PathBuf::from(&n.path)])?;
                let mut have = 0;
                for p in c.keys() {
                    if if p == &n.path { top } else { holds(from, p)? } {
                        have += 1;
                    }
                }
                all_ok &= have == c.len();
                format!(" (closure: {have} of {} in the cache)", c.len())
            };
            held += usize::from(top);
            kernel |= top && n.what == "kernel";
            lines.push(format!(
                "  {:<28} {:<44} {}{detail}",
                n.what,
                crate::forbid::name_of(&n.path),
                if top { "cached" } else { "MISSING" }
            ));
        }
        all_ok &= held == needs.len();
        println!(
            "{b}: {held} of {} store paths in {from}; the kernel is {}",
            needs.len(),
            if kernel { "cached" } else { "MISSING" }
        );
        for l in lines {
            println!("{l}");
        }
    }
    if !all_ok {
        ui::warn(format!(
            "{from} lacks store paths the boards need: cargo xtask cache push --to <store> --key <secret key>"
        ));
    }
    Ok(())
}

/// Before Nix fetches `path`: at least one of `substituters` that has it has it signed by a
/// trusted key (`nix store verify --no-contents`), else one line naming the path and why.
/// Paths only other substituters (the user's own nix.conf) offer are left to Nix.
pub fn check_trusted(path: &str, substituters: &[String]) -> Result<()> {
    let mut untrusted = Vec::new();
    for s in substituters {
        if !holds(s, path)? {
            continue;
        }
        let mut cmd = crate::nixbin::current()?.command("nix");
        cmd.args(["store", "verify", "--no-contents", "--store", s, path]);
        let out = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .context("running nix store verify")?;
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() && !err.contains("untrusted") {
            return Ok(());
        }
        untrusted.push(s.clone());
    }
    if untrusted.is_empty() {
        return Ok(());
    }
    bail!(
        "{path}: {} {} it, but signed by no trusted key (its narinfo was changed, or it was signed with a key bonsai.toml's trusted-public-keys does not list)",
        untrusted.join(" and "),
        if untrusted.len() == 1 { "has" } else { "have" }
    )
}
