//! Image hygiene in the build: secrets supplied at build time (`[[secrets]]`), the
//! development-image warning, and the checks on the final tree (no empty password unless
//! `development = true`, no private key that is not a declared secret). The scans themselves
//! are `rootfs::hygiene`; this module reads the host files and names the profile keys.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use rootfs::system::{Step, System};
use rootfs::{NodeKind, Tree};

use crate::config::Profile;
use crate::ui;

/// A secret read from the build host, ready to go into the image.
#[derive(Debug, Clone)]
pub struct Secret {
    /// Absolute image path.
    pub path: String,
    pub mode: u32,
    pub data: Vec<u8>,
}

/// `~/x` with $HOME.
fn expand_home(s: &str) -> Option<PathBuf> {
    match s.strip_prefix("~/") {
        Some(rest) => std::env::var_os("HOME").map(|h| Path::new(&h).join(rest)),
        None if s == "~" => std::env::var_os("HOME").map(PathBuf::from),
        None => Some(PathBuf::from(s)),
    }
}

/// Reads every `[[secrets]]` of `profile`. Errors name `profiles/<p>.toml: secrets[N].<key>`:
/// an image path that is not absolute, a bad mode, a source that is not absolute, cannot be
/// read, or lies inside the repository (`root`).
pub fn load_secrets(root: &Path, profile: &Profile) -> Result<Vec<Secret>> {
    let mut out = Vec::new();
    for s in &profile.secrets {
        let key = format!("profiles/{}.toml: secrets[{}]", s.origin, s.index);
        let path = &s.spec.path;
        let clean = path.starts_with('/')
            && path[1..]
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..");
        if !clean {
            bail!("{key}.path: '{path}' is not an absolute path in the image (like /etc/dropbear/dropbear_ed25519_host_key)");
        }
        let mode = u32::from_str_radix(&s.spec.mode, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| anyhow::anyhow!("{key}.mode: '{}' is not an octal mode", s.spec.mode))?;
        let source = &s.spec.source;
        let host = expand_home(source)
            .filter(|p| p.is_absolute())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{key}.source: '{source}' is not an absolute path (or ~/...) outside the repository"
                )
            })?;
        let real = fs::canonicalize(&host).map_err(|e| {
            anyhow::anyhow!(
                "{key}.source: cannot read {}: {}",
                host.display(),
                rootfs::io_message(&e)
            )
        })?;
        let repo = fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
        if real.starts_with(&repo) {
            bail!(
                "{key}.source: {} is inside the repository; keep secrets outside it so they are never committed",
                host.display()
            );
        }
        let data = fs::read(&real).map_err(|e| {
            anyhow::anyhow!(
                "{key}.source: cannot read {}: {}",
                host.display(),
                rootfs::io_message(&e)
            )
        })?;
        out.push(Secret {
            path: path.clone(),
            mode,
            data,
        });
    }
    Ok(out)
}

/// The image paths of the secrets, in declaration order, without duplicates.
pub fn secret_paths(secrets: &[Secret]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    secrets
        .iter()
        .filter(|s| seen.insert(s.path.clone()))
        .map(|s| s.path.clone())
        .collect()
}

/// The warnings every build of `profile` prints (also when it is up to date).
pub fn warn(profile: &Profile, secrets: &[Secret]) {
    if profile.development {
        ui::warn(format!(
            "profile {} is a development image (development = true): accounts may log in without a password; do not ship it",
            profile.name
        ));
    }
    if !secrets.is_empty() {
        ui::warn(format!(
            "the image holds secrets: {} (supplied at build time; no reproducibility claim covers them)",
            secret_paths(secrets).join(", ")
        ));
    }
}

/// `[[setup.files]]` as they are stored in the image: (image path of the stored copy, index
/// in `setup.files`, the path it is copied to at boot, its content).
fn setup_files(system: &System) -> Vec<(String, usize, &str, &str)> {
    let mut out = Vec::new();
    let mut j = 0;
    for (i, step) in system.steps.iter().enumerate() {
        if let Step::File { path, content, .. } = step {
            out.push((
                format!("/etc/bonsai/setup-files/{i}"),
                j,
                path.as_str(),
                content.as_str(),
            ));
            j += 1;
        }
    }
    out
}

/// The hygiene checks on the final tree (see the module docs).
pub fn check(tree: &Tree, profile: &Profile, system: &System, secrets: &[Secret]) -> Result<()> {
    let top = format!("profiles/{}.toml", profile.name);
    let files = setup_files(system);
    let needs = "needs 'development = true' (this is not a development image)";

    // Empty passwords, in the /etc/shadow the booted system sees: the last setup file that
    // writes it, else the image's own.
    if !profile.development {
        if let Some((_, j, _, content)) = files.iter().rev().find(|f| f.2 == "/etc/shadow") {
            if let Some(u) = rootfs::hygiene::empty_passwords(content.as_bytes()).first() {
                bail!("{top}: setup.files[{j}]: /etc/shadow gives '{u}' an empty password, which {needs}");
            }
        } else if let Some(node) = tree.get("etc/shadow") {
            let data = match &node.kind {
                NodeKind::File { source } => source.read()?.into_owned(),
                _ => Vec::new(),
            };
            if let Some(u) = rootfs::hygiene::empty_passwords(&data).first() {
                match &node.owner {
                    Some(sp) => {
                        bail!("/etc/shadow (from {sp}): '{u}' has an empty password, which {needs}")
                    }
                    None => {
                        let origin = profile.user_origin.get(u).unwrap_or(&profile.name);
                        bail!(
                            "profiles/{origin}.toml: users.{u}.password: an empty password {needs}"
                        );
                    }
                }
            }
        }
    }

    // Private keys: only declared secrets and `allow-private-keys` may hold one.
    let declared: BTreeSet<&str> = secrets.iter().map(|s| s.path.as_str()).collect();
    let allow: Vec<rootfs::Glob> = profile
        .policy
        .allow_private_keys
        .iter()
        .filter_map(|g| rootfs::Glob::new(g).ok())
        .collect();
    let boot_path =
        |p: &str| -> Option<&(String, usize, &str, &str)> { files.iter().find(|f| f.0 == p) };
    let skip = |p: &str| {
        let at_boot = boot_path(p).map_or(p, |f| f.2);
        declared.contains(at_boot) || allow.iter().any(|g| g.matches(p) || g.matches(at_boot))
    };
    let found = rootfs::hygiene::private_keys(tree, &skip)?;
    if let Some(first) = found.first() {
        let (shown, origin) = match boot_path(first) {
            Some((_, j, to, _)) => (to.to_string(), format!("setup.files[{j}] of {top}")),
            None => {
                let owner = tree
                    .get(first.trim_start_matches('/'))
                    .and_then(|n| n.owner.clone());
                (
                    first.clone(),
                    owner.unwrap_or_else(|| "bonsai's own files".into()),
                )
            }
        };
        let more = match found.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        bail!("the image holds a private key at {shown} (from {origin}){more}: generate keys at first boot or supply them with [[secrets]]");
    }
    Ok(())
}
