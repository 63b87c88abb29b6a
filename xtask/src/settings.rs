//! The project's settings file, `bonsai.toml` at the repository root: the binary caches and
//! remote builders a whole team shares. bonsai passes them to every Nix call (as
//! `extra-substituters`, `extra-trusted-public-keys` and `builders` in `NIX_CONFIG`). The
//! environment overrides the file: `BONSAI_SUBSTITUTERS` and `BONSAI_TRUSTED_PUBLIC_KEYS`
//! (space-separated), `BONSAI_BUILDERS` (Nix's machine lines, separated by `;`), and
//! `BONSAI_SETTINGS` (another file, or empty for none).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{bail, Result};
use serde::Deserialize;

pub const FILE: &str = "bonsai.toml";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    nix: RawNix,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawNix {
    #[serde(default)]
    substituters: Vec<String>,
    #[serde(default)]
    trusted_public_keys: Vec<String>,
    #[serde(default)]
    builders: Vec<RawBuilder>,
}

/// One remote builder, as a line of Nix's `builders` (nix.conf's `machines` format).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawBuilder {
    /// `ssh-ng://user@host` (or `ssh://`); `?remote-store=…` as Nix takes it.
    uri: String,
    /// Nix systems it builds for (default: the host's).
    #[serde(default)]
    systems: Vec<String>,
    /// The SSH key that logs in (default: ssh's own choice).
    ssh_key: Option<String>,
    #[serde(default = "one")]
    max_jobs: u32,
    #[serde(default = "one")]
    speed_factor: u32,
    /// Features it offers; Nixpkgs' kernels need `big-parallel` (the default).
    features: Option<Vec<String>>,
    #[serde(default)]
    mandatory_features: Vec<String>,
    /// The builder's SSH host key, as its `.pub` file has it (`ssh-ed25519 AAAA…`): ssh
    /// checks the builder against it, with no `known_hosts` entry needed.
    public_host_key: Option<String>,
}

fn one() -> u32 {
    1
}

/// What bonsai hands to Nix.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Settings {
    /// Where the settings came from: `bonsai.toml` (or `BONSAI_SETTINGS`' file) and the
    /// variables that override it, `+`-joined, or `no bonsai.toml`.
    pub origin: String,
    pub substituters: Vec<String>,
    pub trusted_public_keys: Vec<String>,
    /// Nix machine lines.
    pub builders: Vec<String>,
}

impl Settings {
    /// The lines for `NIX_CONFIG`.
    pub fn nix_config(&self) -> String {
        let mut c = String::new();
        if !self.substituters.is_empty() {
            c.push_str(&format!(
                "\nextra-substituters = {}",
                self.substituters.join(" ")
            ));
        }
        if !self.trusted_public_keys.is_empty() {
            c.push_str(&format!(
                "\nextra-trusted-public-keys = {}",
                self.trusted_public_keys.join(" ")
            ));
        }
        if !self.builders.is_empty() {
            c.push_str(&format!("\nbuilders = {}", self.builders.join(" ; ")));
            c.push_str("\nbuilders-use-substitutes = true");
        }
        c
    }
}

static LOADED: OnceLock<Settings> = OnceLock::new();
static NO_LOCAL_BUILDS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// From now on, Nix builds nothing on this machine (`max-jobs = 0`): `build --no-local-builds`.
pub fn forbid_local_builds() {
    NO_LOCAL_BUILDS.store(true, std::sync::atomic::Ordering::SeqCst);
}

pub fn no_local_builds() -> bool {
    NO_LOCAL_BUILDS.load(std::sync::atomic::Ordering::SeqCst)
}

/// The settings of this process, read once (a bad file is reported by [`load`] first: every
/// command that runs Nix calls it before).
pub fn current() -> &'static Settings {
    LOADED.get_or_init(|| load(&crate::project_root()).unwrap_or_default())
}

/// Reads the settings (the file, then the environment) and checks them; the errors name the
/// file and key, or the variable.
pub fn load(root: &Path) -> Result<Settings> {
    let file: Option<PathBuf> = match std::env::var_os("BONSAI_SETTINGS") {
        Some(v) if v.is_empty() => None,
        Some(v) => Some(PathBuf::from(v)),
        None => Some(root.join(FILE)).filter(|p| p.is_file()),
    };
    let (raw, shown) = match &file {
        Some(f) => {
            let shown = if f == &root.join(FILE) {
                FILE.to_string()
            } else {
                f.display().to_string()
            };
            let text = std::fs::read_to_string(f)
                .map_err(|e| anyhow::anyhow!("{shown}: {}", rootfs::io_message(&e)))?;
            let raw: Raw = toml::from_str(&text).map_err(|e| {
                anyhow::anyhow!("{shown}: {}", e.message().trim().replace('\n', " "))
            })?;
            (raw, shown)
        }
        None => (Raw::default(), FILE.to_string()),
    };
    let mut from: Vec<String> = file.as_ref().map(|_| shown.clone()).into_iter().collect();
    let host = format!("{}-linux", crate::host::host_arch()?.name());
    let mut s = Settings {
        origin: String::new(),
        substituters: raw.nix.substituters,
        trusted_public_keys: raw.nix.trusted_public_keys,
        builders: raw
            .nix
            .builders
            .iter()
            .enumerate()
            .map(|(i, b)| {
                if let Some(k) = &b.public_host_key {
                    check_host_key(k).map_err(|e| {
                        anyhow::anyhow!("{shown}: key 'nix.builders[{i}].public-host-key': {e}")
                    })?;
                }
                Ok(machine_line(b, &host))
            })
            .collect::<Result<Vec<_>>>()?,
    };
    let list = |v: &str| v.split_whitespace().map(String::from).collect::<Vec<_>>();
    if let Ok(v) = std::env::var("BONSAI_SUBSTITUTERS") {
        s.substituters = list(&v);
        from.push("BONSAI_SUBSTITUTERS".into());
    }
    if let Ok(v) = std::env::var("BONSAI_TRUSTED_PUBLIC_KEYS") {
        s.trusted_public_keys = list(&v);
        from.push("BONSAI_TRUSTED_PUBLIC_KEYS".into());
    }
    if let Ok(v) = std::env::var("BONSAI_BUILDERS") {
        s.builders = v
            .split(';')
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        from.push("BONSAI_BUILDERS".into());
    }
    s.origin = if from.is_empty() {
        format!("no {FILE}")
    } else {
        from.join(" + ")
    };
    for (i, u) in s.substituters.iter().enumerate() {
        check_url(u, &format!("{shown}: key 'nix.substituters[{i}]'"), false)?;
    }
    for (i, k) in s.trusted_public_keys.iter().enumerate() {
        check_key(k)
            .map_err(|e| anyhow::anyhow!("{shown}: key 'nix.trusted-public-keys[{i}]': {e}"))?;
    }
    for (i, b) in s.builders.iter().enumerate() {
        let uri = b.split_whitespace().next().unwrap_or("");
        if !(uri.starts_with("ssh://") || uri.starts_with("ssh-ng://")) {
            bail!("{shown}: key 'nix.builders[{i}]': '{uri}' is not an ssh:// or ssh-ng:// URI (Nix reaches remote builders over SSH)");
        }
    }
    if !s.substituters.is_empty() && s.trusted_public_keys.is_empty() {
        bail!("{shown}: key 'nix.trusted-public-keys': the substituters need the public key their paths are signed with (`cargo xtask cache keygen` prints it)");
    }
    Ok(s)
}

/// A Nix machine line: `uri systems ssh-key max-jobs speed-factor features mandatory
/// host-key`, the host key base64-encoded as Nix reads it.
fn machine_line(b: &RawBuilder, host: &str) -> String {
    let dash = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(",")
        }
    };
    let systems = if b.systems.is_empty() {
        host.to_string()
    } else {
        b.systems.join(",")
    };
    let features = b
        .features
        .clone()
        .unwrap_or_else(|| vec!["big-parallel".into()]);
    let mut line = format!(
        "{} {systems} {} {} {} {} {}",
        b.uri,
        b.ssh_key.as_deref().unwrap_or("-"),
        b.max_jobs,
        b.speed_factor,
        dash(&features),
        dash(&b.mandatory_features)
    );
    if let Some(key) = &b.public_host_key {
        // Nix writes `<host> <decoded>` to a known_hosts file of its own: type and key only.
        let words: Vec<&str> = key.split_whitespace().take(2).collect();
        line.push(' ');
        line.push_str(&base64(words.join(" ").as_bytes()));
    }
    line
}

/// A store URL bonsai can use: `file://`, `http(s)://`, `ssh://`, `ssh-ng://`; `push` also
/// refuses `http(s)://`, which is for reading. S3 is named: Debian's Nix 2.8 is built
/// without it.
pub fn check_url(url: &str, what: &str, push: bool) -> Result<()> {
    let scheme = url.split_once("://").map(|(s, _)| s).unwrap_or("");
    match scheme {
        "file" | "ssh" | "ssh-ng" => Ok(()),
        "http" | "https" if !push => Ok(()),
        "http" | "https" => bail!("{what}: '{url}': an HTTP binary cache is for reading; push to it with file:// on the server, or ssh:// / ssh-ng://"),
        "s3" => bail!("{what}: '{url}': S3 stores need a Nix built with S3 support, and Debian's nix-bin (2.8) has none; push to file:// and sync that folder, or serve it over HTTP(S)"),
        _ => bail!("{what}: '{url}' is not a store URL bonsai takes (file://, http(s)://, ssh://, ssh-ng://)"),
    }
}

/// `name:base64` of a 32-byte Ed25519 public key, as `nix-store --generate-binary-cache-key`
/// writes it.
pub fn check_key(k: &str) -> std::result::Result<(), String> {
    let Some((name, b64)) = k.split_once(':') else {
        return Err(format!("'{k}' is not a Nix public key (name:base64)"));
    };
    if name.is_empty() || b64.len() != 44 || !b64.ends_with('=') {
        return Err(format!(
            "'{k}' is not a Nix public key (name:base64 of 32 bytes)"
        ));
    }
    Ok(())
}

/// An SSH public key line: `<type> <base64> [comment]`, as a `.pub` file holds it.
fn check_host_key(k: &str) -> std::result::Result<(), String> {
    let words: Vec<&str> = k.split_whitespace().collect();
    let ok = words.len() >= 2
        && (words[0].starts_with("ssh-") || words[0].starts_with("ecdsa-"))
        && words[1].len() > 16
        && words[1]
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'='));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{k}' is not an SSH public key (the builder's /etc/ssh/ssh_host_ed25519_key.pub: 'ssh-ed25519 AAAA…')"
        ))
    }
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_become_machine_lines_with_big_parallel() {
        let b = RawBuilder {
            uri: "ssh-ng://ci@builder".into(),
            systems: vec![],
            ssh_key: Some("/root/.ssh/id_ed25519".into()),
            max_jobs: 4,
            speed_factor: 2,
            features: None,
            mandatory_features: vec![],
            public_host_key: None,
        };
        assert_eq!(
            machine_line(&b, "x86_64-linux"),
            "ssh-ng://ci@builder x86_64-linux /root/.ssh/id_ed25519 4 2 big-parallel -"
        );
        // The host key, base64 of its type and key (the comment dropped), as `base64 -w0`
        // of the .pub file without its comment gives.
        let keyed = RawBuilder {
            public_host_key: Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE root@builder".into()),
            ..b.clone()
        };
        assert_eq!(
            machine_line(&keyed, "x86_64-linux"),
            "ssh-ng://ci@builder x86_64-linux /root/.ssh/id_ed25519 4 2 big-parallel - c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUU="
        );
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"abc"), "YWJj");
        assert!(check_host_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE").is_ok());
        let e = check_host_key("AAAAC3NzaC1lZDI1NTE5AAAAIE").unwrap_err();
        assert!(e.contains("is not an SSH public key"), "{e}");
        let s = Settings {
            origin: String::new(),
            substituters: vec!["file:///srv/cache".into()],
            trusted_public_keys: vec!["team-1:AfwPZ8GjVAd/WfHR3qOA+VL4f/Iefw0gLP0/olDSnHw=".into()],
            builders: vec![machine_line(&b, "x86_64-linux")],
        };
        assert_eq!(
            s.nix_config(),
            "\nextra-substituters = file:///srv/cache\nextra-trusted-public-keys = team-1:AfwPZ8GjVAd/WfHR3qOA+VL4f/Iefw0gLP0/olDSnHw=\nbuilders = ssh-ng://ci@builder x86_64-linux /root/.ssh/id_ed25519 4 2 big-parallel -\nbuilders-use-substitutes = true"
        );
    }

    #[test]
    fn urls_and_keys_are_checked() {
        assert!(check_url("file:///x", "k", true).is_ok());
        assert!(check_url("https://c", "k", false).is_ok());
        let e = check_url("https://c", "k", true).unwrap_err().to_string();
        assert!(
            e.starts_with("k: 'https://c': an HTTP binary cache is for reading"),
            "{e}"
        );
        let e = check_url("s3://b", "k", false).unwrap_err().to_string();
        assert!(e.contains("Debian's nix-bin (2.8) has none"), "{e}");
        assert!(check_url("/srv/cache", "k", false).is_err());
        assert!(check_key("team-1:AfwPZ8GjVAd/WfHR3qOA+VL4f/Iefw0gLP0/olDSnHw=").is_ok());
        assert!(check_key("team-1").is_err());
        assert!(check_key("team-1:abc").is_err());
    }
}
