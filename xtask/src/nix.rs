//! Nix glue: realise a board's packages and kernel through `nix/bonsai.nix`, and read the
//! closure graph (paths, references, NAR sizes and hashes) with `nix path-info`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::config::{Arch, Board, KernelSource, OverrideArg, Profile, ProfileNixFile};
use crate::host;
use crate::offline;
use crate::ui;

/// Environment variable: the Nixpkgs to build from when `--nixpkgs` is not given.
pub const NIXPKGS_ENV: &str = "BONSAI_NIXPKGS";

/// Where packages come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackageSource {
    /// nix/offline, built from pinned Debian packages.
    Offline,
    /// A Nixpkgs checkout (path) or flake reference.
    Nixpkgs(String),
}

impl PackageSource {
    /// `--nixpkgs`, else `BONSAI_NIXPKGS`, else the offline set. A checkout is named by its
    /// absolute path, so a later `boot` from another folder finds the same one.
    pub fn from_request(nixpkgs: Option<&str>) -> Result<PackageSource> {
        let r = match nixpkgs
            .map(String::from)
            .or_else(|| std::env::var(NIXPKGS_ENV).ok())
        {
            Some(r) if !r.trim().is_empty() => r,
            _ => return Ok(PackageSource::Offline),
        };
        let as_path = Path::new(&r);
        if as_path.exists() {
            let abs = as_path
                .canonicalize()
                .with_context(|| format!("resolving --nixpkgs {r}"))?;
            return Ok(PackageSource::Nixpkgs(abs.display().to_string()));
        }
        Ok(PackageSource::Nixpkgs(r))
    }

    /// The Nixpkgs reference, `None` for the offline set.
    pub fn nixpkgs_ref(&self) -> Option<String> {
        match self {
            PackageSource::Offline => None,
            PackageSource::Nixpkgs(r) => Some(r.clone()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            PackageSource::Offline => "offline".into(),
            PackageSource::Nixpkgs(r) => format!("nixpkgs {r}"),
        }
    }
}

/// The arguments for one evaluation of nix/bonsai.nix.
pub struct Eval {
    pub args: Vec<String>,
    /// Real Nixpkgs, which needs Nix >= 2.18 (see [`crate::nixbin::select`]).
    pub nixpkgs: bool,
    /// `attribute.argument` -> the profile file that sets it, to name the key when a
    /// package refuses an override (`bonsai: dropbear.override: zlib = false: ...`).
    pub override_origins: BTreeMap<String, String>,
}

impl Eval {
    pub fn new(
        root: &Path,
        board: &Board,
        packages: &[String],
        source: &PackageSource,
    ) -> Result<Eval> {
        Eval::with_nix_files(
            root,
            board,
            packages,
            &BTreeMap::new(),
            &[],
            &BTreeMap::new(),
            source,
        )
    }

    /// Like [`Eval::new`], with the profile's `overlays` applied to the package set and its
    /// `[local-packages]` added to it.
    pub fn for_profile(
        root: &Path,
        board: &Board,
        packages: &[String],
        profile: &Profile,
        source: &PackageSource,
    ) -> Result<Eval> {
        let (local, overlays) = (&profile.local_packages, &profile.overlays);
        let overrides = &profile.overrides;
        Eval::with_nix_files(root, board, packages, local, overlays, overrides, source)
    }

    fn with_nix_files(
        root: &Path,
        board: &Board,
        packages: &[String],
        local: &BTreeMap<String, ProfileNixFile>,
        overlays: &[ProfileNixFile],
        overrides: &BTreeMap<String, BTreeMap<String, OverrideArg>>,
        source: &PackageSource,
    ) -> Result<Eval> {
        let kernel = match &board.kernel.source {
            KernelSource::Build { base, fragments } => {
                // Whether the kernel is modular is known here, from the fragments' text: Nix
                // gets it as linuxManualConfig's `config` (no import from derivation), so the
                // kernel has its `modules` output exactly when a fragment sets CONFIG_MODULES.
                let modular = modular(&root.join("kernel-configs"), fragments);
                serde_json::json!({ "base": base, "fragments": fragments, "modular": modular })
            }
            KernelSource::Package(p) => serde_json::json!({ "package": p }),
        };
        let local: BTreeMap<&String, serde_json::Value> = local
            .iter()
            .map(|(name, l)| {
                let profile = format!("profiles/{}.toml", l.origin);
                (
                    name,
                    serde_json::json!({ "path": l.path, "profile": profile }),
                )
            })
            .collect();
        let overlays: Vec<serde_json::Value> = overlays
            .iter()
            .map(|o| {
                let profile = format!("profiles/{}.toml", o.origin);
                serde_json::json!({ "path": o.path, "profile": profile })
            })
            .collect();
        let override_origins = overrides
            .iter()
            .flat_map(|(attr, args)| {
                args.iter().map(move |(arg, a)| {
                    (
                        format!("{attr}.{arg}"),
                        format!("profiles/{}.toml", a.profile),
                    )
                })
            })
            .collect();
        // attribute -> { args: the `.override` argument set, from: argument -> profile file }
        let overrides: BTreeMap<&String, serde_json::Value> = overrides
            .iter()
            .map(|(attr, args)| {
                let values: serde_json::Map<String, serde_json::Value> = args
                    .iter()
                    .map(|(k, a)| (k.clone(), a.value.clone()))
                    .collect();
                let from: serde_json::Map<String, serde_json::Value> = args
                    .iter()
                    .map(|(k, a)| (k.clone(), format!("profiles/{}.toml", a.profile).into()))
                    .collect();
                (attr, serde_json::json!({ "args": values, "from": from }))
            })
            .collect();
        let request = serde_json::json!({
            "packages": packages,
            "localPackages": local,
            "overlays": overlays,
            "overrides": overrides,
            "kernel": kernel,
        })
        .to_string();
        let mut args = vec![
            root.join("nix/bonsai.nix").display().to_string(),
            "--argstr".into(),
            "system".into(),
            board.nix_system.clone(),
            "--argstr".into(),
            "request".into(),
            request,
        ];
        match source {
            PackageSource::Offline => {
                let inputs = offline::prepare(root, board.arch)?;
                let host_arch = crate::host::host_arch()?;
                let cc = if board.arch == host_arch {
                    "gcc".to_string()
                } else {
                    format!("{}-linux-gnu-gcc", board.arch.name())
                };
                let toolchain = if host::find_program(&cc).is_some() {
                    host::version_line(&cc)?
                } else {
                    "none".into()
                };
                args.extend([
                    "--argstr".into(),
                    "hostSystem".into(),
                    format!("{}-linux", host_arch.name()),
                    "--arg".into(),
                    "debs".into(),
                    inputs.debs.display().to_string(),
                    "--arg".into(),
                    "bootstrap".into(),
                    inputs.bootstrap.display().to_string(),
                    "--argstr".into(),
                    "toolchainId".into(),
                    toolchain,
                ]);
            }
            PackageSource::Nixpkgs(r) => {
                args.extend(["--argstr".into(), "source".into(), "nixpkgs".into()]);
                let as_path = Path::new(r);
                if as_path.exists() {
                    let abs = as_path
                        .canonicalize()
                        .with_context(|| format!("resolving --nixpkgs {r}"))?;
                    args.extend(["--arg".into(), "nixpkgs".into(), abs.display().to_string()]);
                } else {
                    args.extend(["--argstr".into(), "nixpkgsFlake".into(), r.clone()]);
                }
            }
        }
        Ok(Eval {
            args,
            nixpkgs: matches!(source, PackageSource::Nixpkgs(_)),
            override_origins,
        })
    }

    /// Builds the given attributes of nix/bonsai.nix and returns their output paths in order.
    pub fn build(&self, attrs: &[String], what: &str) -> Result<Vec<PathBuf>> {
        let mut cmd = crate::nixbin::select(self.nixpkgs)?.command("nix-build");
        cmd.args(&self.args).arg("--no-out-link");
        // On the command line, not in NIX_CONFIG: a builder reached through Nix's localhost
        // shortcut runs with this process's environment and must still build.
        if crate::settings::no_local_builds() {
            cmd.args(["--max-jobs", "0"]);
        }
        for a in attrs {
            cmd.arg("-A").arg(a);
        }
        let out = run_nix(cmd, what).map_err(|e| self.locate(e))?;
        let paths: Vec<PathBuf> = out
            .lines()
            .filter(|l| l.starts_with('/'))
            .map(PathBuf::from)
            .collect();
        if paths.len() != attrs.len() {
            bail!(
                "nix-build returned {} paths for {} attributes ({what})",
                paths.len(),
                attrs.len()
            );
        }
        Ok(paths)
    }
}

impl Eval {
    /// Instantiates the given attributes with `allow-import-from-derivation = false`, building
    /// nothing: each one's .drv path and the output it names when that is not the first one
    /// (nix-instantiate prints `<drv>!<output>`).
    pub fn instantiate_without_ifd(
        &self,
        attrs: &[String],
        what: &str,
    ) -> Result<Vec<(String, Option<String>)>> {
        let mut cmd = crate::nixbin::select(self.nixpkgs)?.command("nix-instantiate");
        cmd.args(&self.args)
            .args(["--option", "allow-import-from-derivation", "false"]);
        for a in attrs {
            cmd.arg("-A").arg(a);
        }
        let out = run_nix(cmd, what).map_err(|e| self.locate(e))?;
        let drvs: Vec<(String, Option<String>)> = out
            .lines()
            .filter(|l| l.starts_with('/'))
            .map(|l| match l.split_once('!') {
                Some((d, o)) => (d.to_string(), Some(o.to_string())),
                None => (l.to_string(), None),
            })
            .collect();
        if drvs.len() != attrs.len() {
            bail!(
                "nix-instantiate returned {} derivations for {} attributes ({what})",
                drvs.len(),
                attrs.len()
            );
        }
        Ok(drvs)
    }
}

/// Runs a Nix command, streaming what it builds as progress, and returns its stdout. On
/// failure, the error is bonsai's own message from the evaluation if there is one, else the
/// last lines of Nix's log.
impl Eval {
    /// A package's refusal of an override (`<what>: <attribute>.override: <argument> = ...`)
    /// with the profile file and key that set the argument.
    fn locate(&self, e: anyhow::Error) -> anyhow::Error {
        let msg = e.to_string();
        for (key, file) in &self.override_origins {
            let (attr, arg) = key.split_once('.').unwrap_or((key, ""));
            let needle = format!(": {attr}.override: {arg} = ");
            if let Some(at) = msg.find(&needle) {
                let (what, rest) = (&msg[..at], &msg[at + needle.len() - arg.len() - 3..]);
                return anyhow::anyhow!("{what}: {file}: key 'overrides.{key}': {rest}");
            }
        }
        e
    }
}

fn run_nix(mut cmd: Command, what: &str) -> Result<String> {
    let program = cmd.get_program().to_string_lossy().to_string();
    let program = program.rsplit('/').next().unwrap_or("nix").to_string();
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running {program}"))?;
    let stdout = child.stdout.take().unwrap();
    let out_thread = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stdout), &mut s);
        s
    });
    let mut log: Vec<String> = Vec::new();
    // Derivations a remote builder took: its own `building '…'` line comes back too.
    let mut remote = std::collections::BTreeSet::new();
    let stderr = child.stderr.take().unwrap();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap_or_default();
        if let Some((name, machine)) = building(&line) {
            if machine.is_some() {
                remote.insert(name.clone());
            } else if remote.contains(&name) {
                log.push(line);
                continue;
            }
            let hint = if name.starts_with("linux-")
                && !name.contains("config")
                && !name.ends_with(".tar.xz")
            {
                " (a kernel: several minutes when cold; Nix caches it)"
            } else {
                ""
            };
            let on = machine.unwrap_or_else(|| "this machine".into());
            ui::detail(format!("nix: building {name} on {on}{hint}"));
        } else if let Some(rest) = line.strip_prefix("copying path '") {
            // A substitution, or a remote build's output: `copying path '<path>' from '<store>'...`
            let mut parts = rest.split('\'');
            if let (Some(path), Some(_), Some(from)) = (parts.next(), parts.next(), parts.next()) {
                ui::detail(format!(
                    "nix: copying {} from {from}",
                    crate::forbid::name_of(path)
                ));
            }
        }
        log.push(line);
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for {program}"))?;
    let stdout = out_thread.join().unwrap_or_default();
    if !status.success() {
        if let Some(msg) = log.iter().find_map(|l| {
            l.split("error: bonsai: ")
                .nth(1)
                .or_else(|| l.split("bonsai: ").nth(1).filter(|_| l.contains("error")))
        }) {
            bail!("{what}: {}", msg.trim());
        }
        bail!("{what}: {}", failure_summary(&log));
    }
    Ok(stdout)
}

/// A `building '<drv>'...` line of Nix's log: the derivation's name and, for a remote build
/// (`... on '<builder>'`), the builder.
pub fn building(line: &str) -> Option<(String, Option<String>)> {
    let rest = line.strip_prefix("building '")?;
    let drv = rest.split('\'').next().unwrap_or(rest);
    let name = drv.rsplit('/').next().unwrap_or(drv);
    let name = name.get(33..).unwrap_or(name).trim_end_matches(".drv");
    let machine = rest
        .split_once("' on '")
        .and_then(|(_, m)| m.split('\'').next())
        .map(String::from);
    Some((name.to_string(), machine))
}

/// Longest piece of a log line quoted in an error.
const QUOTE_MAX: usize = 200;

/// One line saying why a Nix command failed, from its log (never the whole log): the
/// builder that failed, the lines of its output that mention an error (else its last
/// lines), at most three, and how to read the full log; or the evaluation error and where
/// it is.
pub fn failure_summary(log: &[String]) -> String {
    let cut = |l: &str| -> String {
        let l = l.trim();
        match l.char_indices().nth(QUOTE_MAX) {
            Some((i, _)) => format!("{}...", &l[..i]),
            None => l.to_string(),
        }
    };
    // A substituter's NAR that does not hash to its (signed) narinfo.
    if let Some(l) = log
        .iter()
        .find(|l| l.contains("hash mismatch importing path '"))
    {
        let path = l.split('\'').nth(1).unwrap_or("?");
        return format!("{path}: the NAR a substituter sent does not match the hash in its signed narinfo (hash mismatch importing path): that cache's copy is damaged or was tampered with; push the path to it again");
    }
    if log.iter().any(|l| l.contains("unable to start any build")) {
        return "a derivation would be built on this machine, and local builds are off (max-jobs = 0, --no-local-builds) with no remote builder that takes it".into();
    }
    let builder = log
        .iter()
        .position(|l| l.starts_with("error: builder for '"));
    if let Some(i) = builder {
        let rest = &log[i]["error: builder for '".len()..];
        let drv = rest.split('\'').next().unwrap_or(rest);
        let name = drv.rsplit('/').next().unwrap_or(drv);
        let name = name.get(33..).unwrap_or(name).trim_end_matches(".drv");
        let status = rest
            .split_once("' ")
            .map_or("failed", |(_, s)| s)
            .trim_end_matches([';', '.'])
            .trim();
        // Newer Nix quotes the last lines after the error (`> line`); nix-build 2.8 prints the
        // builder's output before it.
        let quoted: Vec<&str> = log[i + 1..]
            .iter()
            .filter_map(|l| l.trim_start().strip_prefix('>'))
            .collect();
        let output: Vec<&str> = if quoted.is_empty() {
            // From where this builder started (other builders may have printed before).
            let start = log[..i]
                .iter()
                .rposition(|l| l.starts_with(&format!("building '{drv}'")))
                .map_or(0, |b| b + 1);
            log[start..i]
                .iter()
                .map(String::as_str)
                .filter(|l| !is_nix_chatter(l))
                .collect()
        } else {
            quoted
        };
        let output: Vec<&str> = output
            .into_iter()
            .filter(|l| !l.trim().is_empty())
            .collect();
        let errors: Vec<&str> = output
            .iter()
            .copied()
            .filter(|l| l.to_ascii_lowercase().contains("error"))
            .collect();
        let picked = if errors.is_empty() { &output } else { &errors };
        let picked: Vec<String> = picked[picked.len().saturating_sub(3)..]
            .iter()
            .map(|l| cut(l))
            .collect();
        let lines = if picked.is_empty() {
            String::new()
        } else {
            format!(": {}", picked.join(" | "))
        };
        return format!("builder for {name} {status}{lines} (full log: nix-store -l {drv})");
    }
    // An evaluation error: `error: <message>`, then `at <file>:<line>:<column>:` and the
    // source. Newer Nix puts a trace first and the innermost `error: ...` last.
    let Some(first) = log.iter().position(|l| l.starts_with("error:")) else {
        let tail: Vec<String> = log
            .iter()
            .filter(|l| !l.trim().is_empty())
            .map(|l| cut(l))
            .collect();
        let tail = &tail[tail.len().saturating_sub(3)..];
        return format!("Nix failed; last lines of its log: {}", tail.join(" | "));
    };
    let mut message = log[first]["error:".len()..].trim().to_string();
    let mut message_at = first;
    if message.is_empty() {
        if let Some(j) = log[first + 1..]
            .iter()
            .rposition(|l| l.trim_start().starts_with("error: "))
        {
            message_at = first + 1 + j;
            message = log[message_at].trim()["error:".len()..].trim().to_string();
        }
    }
    let at = log[message_at + 1..]
        .iter()
        .chain(log[first..message_at].iter().rev())
        .map(|l| l.trim())
        .find(|l| l.starts_with("at /") || l.starts_with("at «"))
        .map(|l| l.trim_end_matches(':').to_string());
    match at {
        Some(at) => format!("Nix evaluation failed: {} {at}", cut(&message)),
        None => format!("Nix evaluation failed: {}", cut(&message)),
    }
}

/// Nix's own progress lines, which are not a builder's output.
fn is_nix_chatter(l: &str) -> bool {
    l.starts_with("building '")
        || l.starts_with("these ")
        || l.starts_with("this ")
        || l.starts_with("  /nix/store/")
        || l.starts_with("copying path")
        || l.starts_with("warning:")
        || l.starts_with("error:")
}

/// One store path of a closure.
#[derive(Debug, Clone)]
pub struct PathInfo {
    pub path: String,
    /// As Nix printed it (`sha256-<base64>`, `sha256:<nix32>` or `sha256:<base16>`).
    pub nar_hash: String,
    /// The same hash as raw bytes.
    pub nar_sha256: [u8; 32],
    pub nar_size: u64,
    pub references: Vec<String>,
}

/// One entry of `nix path-info --json`: Nix 2.19 dropped `path` (the key says it), and from
/// 2.23 absent fields are `null`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPathInfo {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    nar_hash: Option<String>,
    #[serde(default)]
    nar_size: Option<u64>,
    #[serde(default)]
    references: Option<Vec<String>>,
}

/// Parses `nix path-info --json` of any Nix: a list of objects (up to 2.18) or an object keyed
/// by store path (2.19 on; an invalid path maps to `null`).
pub fn parse_path_info(json: &str) -> Result<Vec<PathInfo>> {
    let v: serde_json::Value =
        serde_json::from_str(json).context("parsing nix path-info --json: not JSON")?;
    let entries: Vec<(Option<String>, serde_json::Value)> = match v {
        serde_json::Value::Array(a) => a.into_iter().map(|e| (None, e)).collect(),
        serde_json::Value::Object(o) => o.into_iter().map(|(k, e)| (Some(k), e)).collect(),
        _ => bail!("parsing nix path-info --json: neither a list nor an object"),
    };
    entries
        .into_iter()
        .map(|(key, e)| {
            let named = key.clone().unwrap_or_else(|| {
                e.get("path")
                    .and_then(|p| p.as_str())
                    .unwrap_or("an entry")
                    .to_string()
            });
            if e.is_null() {
                bail!("nix path-info --json: {named} is not a valid store path");
            }
            let raw: RawPathInfo = serde_json::from_value(e)
                .with_context(|| format!("parsing nix path-info --json: {named}"))?;
            let path = raw
                .path
                .or(key)
                .context("parsing nix path-info --json: an entry has no path")?;
            let nar_hash = raw
                .nar_hash
                .with_context(|| format!("nix path-info --json: {path} has no narHash"))?;
            let nar_sha256 = sha256_of(&nar_hash).with_context(|| {
                format!("nix path-info --json: {path}: narHash '{nar_hash}' is not a SHA-256 hash")
            })?;
            Ok(PathInfo {
                nar_size: raw
                    .nar_size
                    .with_context(|| format!("nix path-info --json: {path} has no narSize"))?,
                references: raw.references.unwrap_or_default(),
                path,
                nar_hash,
                nar_sha256,
            })
        })
        .collect()
}

/// The raw SHA-256 of a hash in any form Nix prints: SRI `sha256-<base64>`, or
/// `sha256:` followed by base-16, Nix base-32 or base-64.
pub fn sha256_of(hash: &str) -> Option<[u8; 32]> {
    let bytes = if let Some(b64) = hash.strip_prefix("sha256-") {
        base64_decode(b64)?
    } else {
        let h = hash.strip_prefix("sha256:")?;
        match h.len() {
            64 => (0..32)
                .map(|i| u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok())
                .collect::<Option<Vec<u8>>>()?,
            52 => nix32_decode(h)?,
            44 => base64_decode(h)?,
            _ => return None,
        }
    };
    bytes.try_into().ok()
}

/// Nix's base-32 (`0123456789abcdfghijklmnpqrsvwxyz`, least significant digit last).
pub fn nix32_decode(s: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let len = s.len() * 5 / 8;
    let mut out = vec![0u8; len];
    for (n, c) in s.bytes().rev().enumerate() {
        let digit = ALPHABET.iter().position(|&a| a == c)? as u16;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        if i < len {
            out[i] |= (digit << j) as u8;
        }
        let carry = digit >> (8 - j);
        if i + 1 < len {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return None;
        }
    }
    Some(out)
}

/// Standard base-64 with padding, as in SRI hashes.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    if !s.len().is_multiple_of(4) {
        return None;
    }
    let body = s.trim_end_matches('=');
    if s.len() - body.len() > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in body.bytes() {
        acc = (acc << 6) | ALPHABET.iter().position(|&a| a == c)? as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // Leftover bits must be zero in a canonical encoding.
    (acc == 0).then_some(out)
}

/// The closure of `roots`: every store path they reference, directly or not.
pub fn closure(roots: &[PathBuf]) -> Result<BTreeMap<String, PathInfo>> {
    let mut cmd = crate::nixbin::current()?.command("nix");
    cmd.args(["path-info", "--json", "--recursive"]).args(roots);
    let out = run_nix(cmd, "reading the closure")?;
    let infos = parse_path_info(&out)?;
    Ok(infos.into_iter().map(|i| (i.path.clone(), i)).collect())
}

/// Whether a fragment (the last one that says) sets `CONFIG_MODULES=y`.
pub fn modular(dir: &Path, fragments: &[String]) -> bool {
    let mut on = false;
    for f in fragments {
        let text = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        for line in text.lines().map(str::trim) {
            if line == "CONFIG_MODULES=y" {
                on = true;
            } else if line == "# CONFIG_MODULES is not set" || line == "CONFIG_MODULES=n" {
                on = false;
            }
        }
    }
    on
}

/// The kernel image file inside a kernel package's output.
pub fn kernel_image(kernel: &Path, arch: Arch) -> Result<PathBuf> {
    let names: &[&str] = match arch {
        Arch::X86_64 => &["bzImage", "vmlinuz"],
        Arch::Aarch64 => &["Image", "vmlinuz"],
    };
    names
        .iter()
        .map(|n| kernel.join(n))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "kernel package {} holds no {}",
                kernel.display(),
                names.join(" or ")
            )
        })
}

/// A device tree inside a kernel package's output (`dtbs/<vendor>/<board>.dtb`, as Nixpkgs'
/// kernels and the offline set install them).
pub fn kernel_dtb(kernel: &Path, dtb: &str) -> Result<PathBuf> {
    let p = kernel.join("dtbs").join(dtb);
    if !p.is_file() {
        bail!(
            "the kernel package {} holds no dtbs/{dtb} (does the kernel config enable that platform and CONFIG_OF?)",
            kernel.display()
        );
    }
    Ok(p)
}

/// One line of the kernel-config report: an option a fragment set, and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigOption {
    pub option: String,
    pub wanted: String,
    pub got: String,
    pub fragment: String,
    pub survived: bool,
    /// For a dropped option: what Kconfig says it depends on.
    pub reason: String,
}

/// The kernel-config report in `dir` (kernel-config.sh's `report`), each option's fragment
/// named from `fragments` (the report numbers them from 1).
pub fn read_config_report(dir: &Path, fragments: &[String]) -> Result<Vec<ConfigOption>> {
    let text = std::fs::read_to_string(dir.join("report"))
        .with_context(|| format!("reading {}/report", dir.display()))?;
    let mut report: Vec<ConfigOption> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f.len() >= 5).then(|| ConfigOption {
                option: f[0].into(),
                wanted: f[1].into(),
                got: f[2].into(),
                fragment: f[3].into(),
                survived: f[4] == "ok",
                reason: f.get(5).map(|r| r.to_string()).unwrap_or_default(),
            })
        })
        .collect();
    for o in &mut report {
        if let Some(name) = o
            .fragment
            .parse::<usize>()
            .ok()
            .and_then(|i| fragments.get(i.wrapping_sub(1)))
        {
            o.fragment = name.clone();
        }
    }
    Ok(report)
}

#[cfg(test)]
mod path_info_tests {
    use super::{parse_path_info, sha256_of};

    // One narHash in every form, converted by hand once with Nix 2.26.3
    // (`nix hash convert --to base16|nix32|base64 sha256-xZyA...`) and checked against Nix 2.8's
    // `nix hash to-base16` / `to-base32`; it is the NAR hash of the offline set's hello.c.
    const SRI: &str = "sha256-xZyAlaEjpAKshEr9G+IANAoizB1UbIqPrFxiacLj1HA=";
    const BASE16: &str = "c59c8095a123a402ac844afd1be200340a22cc1d546c8a8fac5c6269c2e3d470";
    const NIX32: &str = "0w6lwg16jqjwmj7qlv2l3p6242il03i1pzaahjn05913l6aq1765";
    const BASE64: &str = "xZyAlaEjpAKshEr9G+IANAoizB1UbIqPrFxiacLj1HA=";

    fn hex(b: [u8; 32]) -> String {
        crate::digest::hex(&b)
    }

    #[test]
    fn every_hash_form_gives_the_same_bytes() {
        for form in [
            SRI.to_string(),
            format!("sha256:{BASE16}"),
            format!("sha256:{}", BASE16.to_uppercase()),
            format!("sha256:{NIX32}"),
            format!("sha256:{BASE64}"),
        ] {
            assert_eq!(sha256_of(&form).map(hex).as_deref(), Some(BASE16), "{form}");
        }
        // sha256 of the empty string, as in the Nix manual.
        assert_eq!(
            sha256_of("sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73").map(hex),
            Some("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".into())
        );
        for bad in [
            "",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            "sha512-xZyA",
            "sha256-xZyAlaEjpAKshEr9G+IANAoizB1UbIqPrFxiacLj1H=",
            "sha256-xZyAlaEjpAKshEr9G+IANAoizB1UbIqPrFxiacLj1H!=",
            "sha256:0w6lwg16jqjwmj7qlv2l3p6242il03i1pzaahjn05913l6aq176e",
            "sha256:zz9c8095a123a402ac844afd1be200340a22cc1d546c8a8fac5c6269c2e3d470",
            "sha256:c59c",
        ] {
            assert_eq!(sha256_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn path_info_parses_in_the_shape_of_every_nix() {
        let p = "/nix/store/lhmd9di6lc9jwpffr06qjshvqhj1czms-hello.c";
        let r = "/nix/store/kpj6hslx23ajwvspqkdkbrrclzqx8c67-glibc-2.36";
        // Nix 2.8 (a list), 2.19 (an object keyed by path), 2.26 (absent fields null): each
        // printed by that Nix for these paths, trimmed to the fields that matter.
        let v28 = format!(
            r#"[{{"path":"{p}","narHash":"{SRI}","narSize":520,"references":["{r}"],"registrationTime":1}}]"#
        );
        let v219 = format!(
            r#"{{"{p}":{{"narHash":"sha256:{NIX32}","narSize":520,"references":["{r}"],"ca":null}}}}"#
        );
        let v226 = format!(
            r#"{{"{p}":{{"ca":null,"deriver":null,"narHash":"{SRI}","narSize":520,"references":["{r}"],"signatures":[],"ultimate":false}}}}"#
        );
        for json in [v28, v219, v226] {
            let infos = parse_path_info(&json).unwrap();
            assert_eq!(infos.len(), 1, "{json}");
            let i = &infos[0];
            assert_eq!(i.path, p);
            assert_eq!(hex(i.nar_sha256), BASE16);
            assert_eq!(i.nar_size, 520);
            assert_eq!(i.references, vec![r.to_string()]);
        }
        let nulls = format!(r#"{{"{p}":{{"narHash":"{SRI}","narSize":520,"references":null}}}}"#);
        assert!(parse_path_info(&nulls).unwrap()[0].references.is_empty());
        let err = |json: &str| parse_path_info(json).unwrap_err().to_string();
        assert_eq!(
            err(&format!(r#"{{"{p}":null}}"#)),
            format!("nix path-info --json: {p} is not a valid store path")
        );
        assert_eq!(
            err(&format!(r#"{{"{p}":{{"narHash":null,"narSize":1}}}}"#)),
            format!("nix path-info --json: {p} has no narHash")
        );
        assert_eq!(
            err(&format!(
                r#"[{{"path":"{p}","narHash":"md5:00","narSize":1}}]"#
            )),
            format!("nix path-info --json: {p}: narHash 'md5:00' is not a SHA-256 hash")
        );
        assert_eq!(
            err("3"),
            "parsing nix path-info --json: neither a list nor an object"
        );
    }
}

#[cfg(test)]
mod failure_tests {
    use super::{building, failure_summary};

    #[test]
    fn building_lines_name_the_derivation_and_the_builder() {
        let drv = "/nix/store/q02bs05rl4hblqhnxw470bjcb0gdpk2p-hello-1.0.drv";
        assert_eq!(
            building(&format!("building '{drv}'...")),
            Some(("hello-1.0".into(), None))
        );
        // Nix 2.8 prints the builder as given, 2.26 with its parameters sorted and encoded.
        for uri in [
            "ssh-ng://localhost?remote-store=local?root=/tmp/b&remote-program=/tmp/d",
            "ssh-ng://localhost?remote-program=/tmp/d&remote-store=local?root%3D/tmp/b",
        ] {
            assert_eq!(
                building(&format!("building '{drv}' on '{uri}'...")),
                Some(("hello-1.0".into(), Some(uri.to_string())))
            );
        }
        assert_eq!(
            building("copying path '/nix/store/x' from 'file:///c'..."),
            None
        );
    }

    #[test]
    fn a_tampered_nar_names_its_store_path() {
        let log = lines("copying path '/nix/store/9ha4nfchvb68ck6jx86khla8n7b4bfsc-linux-config-6.1.192' from 'file:///c'...\nerror: hash mismatch importing path '/nix/store/9ha4nfchvb68ck6jx86khla8n7b4bfsc-linux-config-6.1.192';\n  specified: sha256:0a\n  got:       sha256:0b");
        assert!(failure_summary(&log).starts_with("/nix/store/9ha4nfchvb68ck6jx86khla8n7b4bfsc-linux-config-6.1.192: the NAR a substituter sent does not match"));
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(String::from).collect()
    }

    #[test]
    fn a_failed_builder_is_named_with_its_error_lines() {
        // nix-build 2.8: the builder's output comes before the error.
        let log = lines(
            "these 2 derivations will be built:
  /nix/store/q02bs05rl4hblqhnxw470bjcb0gdpk2p-hello-1.0.drv
building '/nix/store/q02bs05rl4hblqhnxw470bjcb0gdpk2p-hello-1.0.drv'...
/nix/store/smm-hello.c:18:5: error: conflicting types for 'main'
   18 | int main(void) { return x; }
      |     ^~~~
/nix/store/smm-hello.c:18:25: note: each undeclared identifier is reported only once
error: builder for '/nix/store/q02bs05rl4hblqhnxw470bjcb0gdpk2p-hello-1.0.drv' failed with exit code 1
error: 1 dependencies of derivation '/nix/store/abc-bonsai.drv' failed to build",
        );
        assert_eq!(
            failure_summary(&log),
            "builder for hello-1.0 failed with exit code 1: /nix/store/smm-hello.c:18:5: error: \
             conflicting types for 'main' (full log: nix-store -l \
             /nix/store/q02bs05rl4hblqhnxw470bjcb0gdpk2p-hello-1.0.drv)"
        );
        // Newer Nix: the last lines quoted after the error; no error line, so the last three.
        let log = lines(
            "error: builder for '/nix/store/q02bs05rl4hblqhnxw470bjcb0gdpk2p-x-1.0.drv' failed with exit code 2;
       last 10 log lines:
       > one
       > two
       > three
       > four
       For full logs, run 'nix log /nix/store/q02bs05rl4hblqhnxw470bjcb0gdpk2p-x-1.0.drv'.",
        );
        assert_eq!(
            failure_summary(&log),
            "builder for x-1.0 failed with exit code 2: two | three | four (full log: \
             nix-store -l /nix/store/q02bs05rl4hblqhnxw470bjcb0gdpk2p-x-1.0.drv)"
        );
    }

    #[test]
    fn an_evaluation_error_is_its_message_and_position() {
        let log = lines(
            "error: syntax error, unexpected ';'

       at /tmp/scr3/nix/bonsai.nix:20:35:

           19| let
           20|   req = builtins.fromJSON request;;
             |                                   ^
           21|",
        );
        assert_eq!(
            failure_summary(&log),
            "Nix evaluation failed: syntax error, unexpected ';' at /tmp/scr3/nix/bonsai.nix:20:35"
        );
        let log = lines(
            "error:
       … while evaluating the attribute 'packages'

         at /x/bonsai.nix:3:1:

       error: undefined variable 'nope'

       at /x/offline/default.nix:7:9:",
        );
        assert_eq!(
            failure_summary(&log),
            "Nix evaluation failed: undefined variable 'nope' at /x/offline/default.nix:7:9"
        );
        assert_eq!(
            failure_summary(&lines("a\n\nb\nc\nd")),
            "Nix failed; last lines of its log: b | c | d"
        );
    }
}

#[cfg(test)]
mod modular_tests {
    use super::modular;

    #[test]
    fn the_last_fragment_that_says_decides_whether_the_kernel_is_modular() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a.config"), "CONFIG_X=y\nCONFIG_MODULES=y\n").unwrap();
        std::fs::write(d.path().join("off.config"), "# CONFIG_MODULES is not set\n").unwrap();
        std::fs::write(
            d.path().join("none.config"),
            "CONFIG_MODULES_TREE_LOOKUP=y\n",
        )
        .unwrap();
        let f = |names: &[&str]| {
            modular(
                d.path(),
                &names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        assert!(f(&["a.config"]));
        assert!(f(&["a.config", "none.config"]));
        assert!(!f(&["a.config", "off.config"]));
        assert!(!f(&["none.config"]));
        // The shipped boards that build drivers as modules.
        let root = crate::project_root().join("kernel-configs");
        for board in ["qemu-x86_64.config", "qemu-aarch64.config"] {
            assert!(modular(&root, &[board.to_string()]), "{board}");
        }
    }
}
