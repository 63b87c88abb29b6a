//! Which Nix bonsai runs (`BONSAI_NIX`), and the pinned current Nix it can provision itself:
//! Debian 13's `nix-bin`, its packages pinned in `nix/debian13-nix.<arch>.lock.json`, downloaded
//! with apt-get from a private state (a trixie source list derived from the host's own apt
//! sources, an empty dpkg status), verified by SHA-256, unpacked into one folder of bonsai's
//! cache and run through that folder's dynamic loader. Nothing on the host is changed.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

use crate::offline::{Lock, LockedDeb};
use crate::{host, ui};

/// Environment variable: `host`, `debian13`, or a folder holding `nix`, `nix-build`, `nix-store`.
pub const NIX_ENV: &str = "BONSAI_NIX";
/// The Debian release whose `nix-bin` is pinned, and the package that pulls in the rest.
pub const SUITE: &str = "trixie";
const ROOT_PACKAGE: &str = "nix-bin";
/// Nixpkgs' minimum Nix since July 2025 (`lib/minfeatures.nix`).
pub const NIXPKGS_MIN: (u32, u32) = (2, 18);
/// The programs a Nix folder must hold, and the wrappers bonsai writes for the pinned one.
const PROGRAMS: &[&str] = &["nix", "nix-build", "nix-store", "nix-instantiate"];

/// Where the Nix comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The Nix on PATH (Debian's nix-bin installed when there is none).
    Host,
    /// The pinned Debian 13 Nix in bonsai's cache.
    Debian13,
    /// A folder holding nix, nix-build and nix-store.
    Dir(PathBuf),
}

/// Which Nix to run. `setting` is `BONSAI_NIX`; `host` the version of the Nix on PATH, if any.
/// Unset: the host's Nix, except that real Nixpkgs with no host Nix or one older than 2.18
/// (which Nixpkgs refuses) takes the pinned one; the note says so in one line.
pub fn choose(
    setting: Option<&str>,
    host: Option<(u32, u32)>,
    nixpkgs: bool,
) -> Result<(Choice, Option<String>)> {
    match setting.map(str::trim).filter(|s| !s.is_empty()) {
        Some("host") => Ok((Choice::Host, None)),
        Some("debian13") => Ok((Choice::Debian13, None)),
        Some(dir) => {
            let d = Path::new(dir);
            let missing: Vec<&str> = PROGRAMS[..3]
                .iter()
                .copied()
                .filter(|p| !d.join(p).is_file())
                .collect();
            if !d.is_dir() || !missing.is_empty() {
                bail!(
                    "{NIX_ENV}={dir}: expected host, debian13 or a folder holding nix, nix-build and nix-store{}",
                    if d.is_dir() { format!(" (it has no {})", missing.join(", ")) } else { String::new() }
                );
            }
            Ok((Choice::Dir(d.to_path_buf()), None))
        }
        None if nixpkgs && host.is_none_or(|v| v < NIXPKGS_MIN) => {
            let had = match host {
                Some((a, b)) => format!("the host's Nix {a}.{b} is older than"),
                None => "the host has no Nix; Debian 12's is older than".into(),
            };
            Ok((
                Choice::Debian13,
                Some(format!(
                    "{had} {}.{}, which Nixpkgs requires: using the pinned Debian 13 Nix ({NIX_ENV}=debian13)",
                    NIXPKGS_MIN.0, NIXPKGS_MIN.1
                )),
            ))
        }
        None => Ok((Choice::Host, None)),
    }
}

/// `nix (Nix) 2.26.3` → (2, 26).
pub fn parse_version(line: &str) -> Option<(u32, u32)> {
    let v = line.split_whitespace().last()?;
    let mut parts = v.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?;
    let digits = minor
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(minor.len());
    let minor = minor[..digits].parse().ok()?;
    Some((major, minor))
}

/// The Nix that every Nix call of this process goes through.
#[derive(Debug)]
pub struct Nix {
    /// `host`, `debian13` or `dir`.
    pub kind: &'static str,
    /// The folder holding the programs; `None` for the ones on PATH.
    pub bin: Option<PathBuf>,
    /// `nix --version`, e.g. `nix (Nix) 2.26.3`.
    pub version: String,
}

impl Nix {
    /// A command for one of Nix's programs, with bonsai's Nix settings. A folder's programs
    /// come first on PATH too, so anything Nix starts finds the same Nix.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = match &self.bin {
            Some(dir) => {
                let mut c = Command::new(dir.join(program));
                let path = std::env::var_os("PATH").unwrap_or_default();
                let mut dirs = vec![dir.clone()];
                dirs.extend(std::env::split_paths(&path));
                if let Ok(p) = std::env::join_paths(dirs) {
                    c.env("PATH", p);
                }
                c
            }
            None => Command::new(program),
        };
        let mut env = host::nix_env();
        // The pinned Nix's compiled-in build hook (`/usr/bin/nix __build-remote`) is the host's.
        if let (Some(dir), Some((_, conf))) = (&self.bin, env.first_mut()) {
            if self.kind == "debian13" && !conf.contains("build-hook") {
                conf.push_str(&format!(
                    "\nbuild-hook = {} __build-remote",
                    dir.join("nix").display()
                ));
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    /// `2.26.3` from `nix (Nix) 2.26.3`.
    pub fn short_version(&self) -> &str {
        self.version.split_whitespace().last().unwrap_or("")
    }
}

static CHOSEN: OnceLock<Nix> = OnceLock::new();

/// The Nix for this process, chosen (and provisioned) on first use. `nixpkgs`: the build uses
/// real Nixpkgs, which needs Nix >= 2.18.
pub fn select(nixpkgs: bool) -> Result<&'static Nix> {
    if let Some(n) = CHOSEN.get() {
        return Ok(n);
    }
    let setting = std::env::var(NIX_ENV).ok();
    let host_version = host::find_program("nix")
        .and_then(|_| host::version_line("nix").ok())
        .and_then(|l| parse_version(&l));
    let (choice, note) = choose(setting.as_deref(), host_version, nixpkgs)?;
    if let Some(note) = note {
        ui::warn(note);
    }
    let (kind, bin) = match choice {
        Choice::Host => {
            host::ensure(&[host::NIX], &[])?;
            ("host", None)
        }
        Choice::Debian13 => ("debian13", Some(provision(&crate::project_root())?)),
        Choice::Dir(d) => ("dir", Some(d)),
    };
    let program = bin
        .as_ref()
        .map_or_else(|| PathBuf::from("nix"), |d| d.join("nix"));
    let version = host::version_line(&program.display().to_string())
        .with_context(|| format!("running {} --version", program.display()))?;
    if !version.contains("Nix") {
        bail!(
            "{} --version printed '{version}', not a Nix version",
            program.display()
        );
    }
    Ok(CHOSEN.get_or_init(|| Nix { kind, bin, version }))
}

/// The Nix already chosen, or the default for a build from the offline set.
pub fn current() -> Result<&'static Nix> {
    select(false)
}

/// The lock file of the pinned Nix for the host's architecture, relative to the root.
pub fn lock_path(arch: crate::config::Arch) -> String {
    format!("nix/debian13-nix.{}.lock.json", arch.debian())
}

fn load_lock(root: &Path, arch: crate::config::Arch) -> Result<(Lock, String)> {
    let rel = lock_path(arch);
    let text = fs::read_to_string(root.join(&rel)).with_context(|| {
        format!("reading {rel} (no pinned Nix for this host; write it with cargo xtask nix-lock)")
    })?;
    let lock: Lock = serde_json::from_str(&text).with_context(|| format!("parsing {rel}"))?;
    if lock.suite != SUITE || lock.arch != arch.debian() {
        bail!(
            "{rel}: pins {} {}, expected {SUITE} {}",
            lock.suite,
            lock.arch,
            arch.debian()
        );
    }
    Ok((lock, text))
}

/// The dynamic loader and library folders of an unpacked Debian root.
fn loader(root: &Path, arch: crate::config::Arch) -> (PathBuf, String) {
    use crate::config::Arch;
    let (ld, triplet) = match arch {
        Arch::X86_64 => ("usr/lib64/ld-linux-x86-64.so.2", "x86_64-linux-gnu"),
        Arch::Aarch64 => ("usr/lib/ld-linux-aarch64.so.1", "aarch64-linux-gnu"),
    };
    let libs = format!("{0}/usr/lib/{triplet}:{0}/lib/{triplet}", root.display());
    (root.join(ld), libs)
}

/// Makes sure the pinned Nix is unpacked in the cache; returns the folder of its wrappers.
pub fn provision(root: &Path) -> Result<PathBuf> {
    let arch = crate::host::host_arch()?;
    let (lock, text) = load_lock(root, arch)?;
    let cache = crate::cache::cache_dir();
    let key = &crate::digest::hex(&sha2::Digest::finalize(sha2::Digest::chain_update(
        sha2::Sha256::default(),
        text.as_bytes(),
    )))[..16];
    let dir = cache.join("nix").join(format!("debian13-{key}"));
    let bin = dir.join("bin");
    if PROGRAMS.iter().all(|p| bin.join(p).is_file()) {
        return Ok(bin);
    }
    // One provisioning at a time (tests run builds in parallel): the others wait, then find it.
    fs::create_dir_all(cache.join("nix"))?;
    let busy = cache.join("nix").join(format!(".debian13-{key}.lock"));
    let busy_file =
        fs::File::create(&busy).with_context(|| format!("creating {}", busy.display()))?;
    busy_file
        .lock()
        .with_context(|| format!("locking {}", busy.display()))?;
    if PROGRAMS.iter().all(|p| bin.join(p).is_file()) {
        return Ok(bin);
    }
    let debs = cache
        .join("debs")
        .join(format!("{SUITE}-{}", arch.debian()));
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let missing: Vec<&LockedDeb> = lock
        .packages
        .values()
        .filter(|d| !debs.join(&d.file).is_file())
        .collect();
    ui::step(format!(
        "provisioning the pinned Nix ({} Debian {SUITE} packages, {} to download) into {}",
        lock.packages.len(),
        missing.len(),
        dir.display()
    ));
    if !missing.is_empty() {
        let apt = PrivateApt::new(&cache, arch.debian())?;
        apt.update()?;
        apt.download(&missing, &debs)?;
    }
    host::ensure(&[host::DPKG_DEB], &[])?;
    fs::create_dir_all(cache.join("nix"))?;
    let stage =
        tempfile::tempdir_in(cache.join("nix")).context("creating a folder in the cache")?;
    let unpacked = dir.join("root");
    let stage_root = stage.path().join("root");
    fs::create_dir_all(&stage_root)?;
    for (i, d) in lock.packages.values().enumerate() {
        let file = debs.join(&d.file);
        // Checked here too: a cached file may have been damaged since it was downloaded.
        let sum = crate::digest::sha256_file(&file)?;
        if sum != d.sha256 {
            let _ = fs::remove_file(&file);
            bail!(
                "{}: sha256 {sum} does not match the pin {} in {} (removed; run again to download it anew)",
                file.display(),
                d.sha256,
                lock_path(arch)
            );
        }
        if (i + 1) % 25 == 0 || i + 1 == lock.packages.len() {
            ui::detail(format!("unpacked {}/{}", i + 1, lock.packages.len()));
        }
        let status = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&file)
            .arg(&stage_root)
            .status()
            .context("running dpkg-deb")?;
        if !status.success() {
            bail!("dpkg-deb could not unpack {}", file.display());
        }
    }
    let stage_bin = stage.path().join("bin");
    fs::create_dir_all(&stage_bin)?;
    // The wrappers name the final folder: the stage is renamed into it below.
    let (ld, libs) = loader(&unpacked, arch);
    for p in PROGRAMS {
        let script = format!(
            "#!/bin/sh\n# bonsai: the pinned Debian {SUITE} Nix, through its own dynamic loader\nexec '{}' --library-path '{libs}' --argv0 {p} '{}' \"$@\"\n",
            ld.display(),
            unpacked.join("usr/bin/nix").display()
        );
        let w = stage_bin.join(p);
        fs::write(&w, script).with_context(|| format!("writing {}", w.display()))?;
        fs::set_permissions(&w, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let _ = fs::remove_dir_all(&dir);
    let stage = stage.keep();
    fs::rename(&stage, &dir).with_context(|| format!("creating {}", dir.display()))?;
    let nix = bin.join("nix");
    let version = host::version_line(&nix.display().to_string())?;
    if !version.contains("Nix") {
        bail!(
            "the pinned Nix in {} does not run ({} --version printed '{version}')",
            dir.display(),
            nix.display()
        );
    }
    ui::detail(format!("pinned Nix ready: {version}"));
    Ok(bin)
}

/// apt-get for Debian `SUITE` with a private state: its own source list (derived from the
/// host's), lists, cache and an empty dpkg status, so it resolves every dependency and
/// changes nothing on the host.
struct PrivateApt {
    base: PathBuf,
    arch: String,
}

impl PrivateApt {
    fn new(cache: &Path, arch: &str) -> Result<PrivateApt> {
        host::ensure(&[host::APT_GET], &[])?;
        let base = cache.join("apt").join(format!("{SUITE}-{arch}"));
        for d in ["lists/partial", "cache/archives/partial", "sources.list.d"] {
            fs::create_dir_all(base.join(d))
                .with_context(|| format!("creating {}", base.join(d).display()))?;
        }
        let list = suite_sources(&host_sources()?, &host_codename()?)?;
        fs::write(base.join("sources.list.d/bonsai.list"), list)?;
        Ok(PrivateApt {
            base,
            arch: arch.to_string(),
        })
    }

    fn command(&self) -> Command {
        let b = self.base.display();
        let mut c = Command::new("apt-get");
        c.arg("-q")
            .arg(format!("-oAPT::Architecture={}", self.arch))
            .arg(format!("-oAPT::Architectures={}", self.arch))
            .arg("-oDir::Etc::SourceList=/dev/null")
            .arg(format!("-oDir::Etc::SourceParts={b}/sources.list.d"))
            .arg("-oDir::Etc::Preferences=/dev/null")
            .arg(format!("-oDir::Etc::PreferencesParts={b}/sources.list.d"))
            .arg(format!("-oDir::State::Lists={b}/lists"))
            .arg(format!("-oDir::Cache={b}/cache"))
            .arg("-oDir::State::status=/dev/null")
            .arg("-oDebug::NoLocking=1")
            .arg("-oAPT::Sandbox::User=root")
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    }

    fn update(&self) -> Result<()> {
        ui::detail(format!("apt-get update (Debian {SUITE}, private state)"));
        let out = self
            .command()
            .arg("update")
            .output()
            .context("running apt-get update")?;
        if !out.status.success() {
            bail!(
                "apt-get update for Debian {SUITE} failed: {}",
                last_line(&out.stderr)
            );
        }
        Ok(())
    }

    /// Downloads the pinned packages into `dir`, each checked against its SHA-256.
    fn download(&self, debs: &[&LockedDeb], dir: &Path) -> Result<()> {
        ui::detail(format!("downloading {} packages", debs.len()));
        let tmp = tempfile::tempdir_in(dir).context("creating a download folder")?;
        let specs: Vec<String> = debs
            .iter()
            .map(|d| format!("{}={}", d.package, d.version))
            .collect();
        let out = self
            .command()
            .arg("download")
            .args(&specs)
            .current_dir(tmp.path())
            .output()
            .context("running apt-get download")?;
        if !out.status.success() {
            bail!(
                "cannot download the pinned Nix's packages from Debian {SUITE}: {} (the archive may have dropped a pinned version; rewrite the pins with cargo xtask nix-lock)",
                last_line(&out.stderr)
            );
        }
        for d in debs {
            // apt-get names files with the epoch as %3a.
            let got = fs::read_dir(tmp.path())?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|p| {
                    let n = p.file_name().unwrap_or_default().to_string_lossy();
                    n.replace("%3a", ":")
                        .starts_with(&format!("{}_{}_", d.package, d.version))
                })
                .with_context(|| format!("apt-get download wrote no .deb for {}", d.package))?;
            let sum = crate::digest::sha256_file(&got)?;
            if sum != d.sha256 {
                bail!(
                    "Debian package {}={}: sha256 {sum} does not match the pin {}",
                    d.package,
                    d.version,
                    d.sha256
                );
            }
            fs::rename(&got, dir.join(&d.file))
                .with_context(|| format!("moving {} into the cache", d.file))?;
        }
        Ok(())
    }

    /// Resolves `ROOT_PACKAGE` and everything it depends on (no recommends) against an empty
    /// dpkg status, downloads them, and returns the pins.
    fn resolve(&self) -> Result<Vec<(LockedDeb, PathBuf)>> {
        let archives = self.base.join("cache/archives");
        let out = self
            .command()
            .args([
                "install",
                "-y",
                "--download-only",
                "--no-install-recommends",
                ROOT_PACKAGE,
            ])
            .output()
            .context("running apt-get install --download-only")?;
        if !out.status.success() {
            bail!(
                "resolving {ROOT_PACKAGE} in Debian {SUITE} failed: {}",
                last_line(&out.stderr)
            );
        }
        let mut pins = Vec::new();
        for e in fs::read_dir(&archives)? {
            let p = e?.path();
            if p.extension().is_none_or(|x| x != "deb") {
                continue;
            }
            let field = |f: &str| -> Result<String> {
                let o = Command::new("dpkg-deb")
                    .arg("-f")
                    .arg(&p)
                    .arg(f)
                    .output()
                    .context("running dpkg-deb -f")?;
                Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
            };
            let package = field("Package")?;
            let version = field("Version")?;
            let arch = field("Architecture")?;
            // Store names cannot hold ':', so the file name drops the epoch, as the offline pins do.
            let plain = version.split_once(':').map_or(version.as_str(), |(_, v)| v);
            let file = format!("{package}_{plain}_{arch}.deb");
            pins.push((
                LockedDeb {
                    package,
                    version,
                    file,
                    sha256: crate::digest::sha256_file(&p)?,
                },
                p,
            ));
        }
        pins.sort_by(|a, b| a.0.package.cmp(&b.0.package));
        Ok(pins)
    }
}

fn last_line(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// The host's release name (`VERSION_CODENAME` in /etc/os-release).
fn host_codename() -> Result<String> {
    let text = fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .context("/etc/os-release has no VERSION_CODENAME (is this Debian?)")
}

/// The host's apt sources as (URI, suite, components, signed-by) rows, from one-line `.list`
/// files and deb822 `.sources` files.
fn host_sources() -> Result<Vec<Source>> {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut more: Vec<PathBuf> = rd.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        more.sort();
        files.extend(more);
    }
    let mut rows = Vec::new();
    for f in files {
        let Ok(text) = fs::read_to_string(&f) else {
            continue;
        };
        match f.extension().and_then(|e| e.to_str()) {
            Some("sources") => rows.extend(parse_deb822(&text)),
            Some("list") => rows.extend(parse_one_line(&text)),
            _ => {}
        }
    }
    Ok(rows)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Source {
    uri: String,
    suite: String,
    components: String,
    signed_by: Option<String>,
}

fn parse_one_line(text: &str) -> Vec<Source> {
    let mut rows = Vec::new();
    for l in text.lines() {
        let l = l.split('#').next().unwrap_or("").trim();
        let Some(rest) = l.strip_prefix("deb ") else {
            continue;
        };
        let mut rest = rest.trim();
        let mut signed_by = None;
        if let Some(opts) = rest.strip_prefix('[') {
            let Some((opts, after)) = opts.split_once(']') else {
                continue;
            };
            signed_by = opts
                .split_whitespace()
                .find_map(|o| o.strip_prefix("signed-by="))
                .map(String::from);
            rest = after.trim();
        }
        let mut f = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (f.next(), f.next()) else {
            continue;
        };
        rows.push(Source {
            uri: uri.into(),
            suite: suite.into(),
            components: f.collect::<Vec<_>>().join(" "),
            signed_by,
        });
    }
    rows
}

fn parse_deb822(text: &str) -> Vec<Source> {
    let mut rows = Vec::new();
    for stanza in text.split("\n\n") {
        let mut fields = std::collections::BTreeMap::new();
        for l in stanza.lines() {
            if l.trim_start().starts_with('#') {
                continue;
            }
            if let Some((k, v)) = l.split_once(':') {
                if !k.starts_with(' ') {
                    fields.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
        }
        let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
        if !get("types").split_whitespace().any(|t| t == "deb")
            || get("enabled").eq_ignore_ascii_case("no")
        {
            continue;
        }
        for uri in get("uris").split_whitespace() {
            for suite in get("suites").split_whitespace() {
                rows.push(Source {
                    uri: uri.into(),
                    suite: suite.into(),
                    components: get("components"),
                    signed_by: fields.get("signed-by").cloned(),
                });
            }
        }
    }
    rows
}

/// A one-line source list for `SUITE` from the host's Debian rows: every row whose suite is
/// the host's release (or its -updates/-security) is kept with the release name replaced.
fn suite_sources(rows: &[Source], codename: &str) -> Result<String> {
    let mut out = String::new();
    for r in rows {
        let Some(tail) = r.suite.strip_prefix(codename) else {
            continue;
        };
        if !matches!(tail, "" | "-updates" | "-security") {
            continue;
        }
        let opts = r
            .signed_by
            .as_ref()
            .map(|s| format!("[signed-by={s}] "))
            .unwrap_or_default();
        out.push_str(&format!(
            "deb {opts}{} {SUITE}{tail} {}\n",
            r.uri, r.components
        ));
    }
    if out.is_empty() {
        bail!("no Debian '{codename}' source in the host's apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d) to derive a {SUITE} source from");
    }
    Ok(out)
}

/// Resolves the pinned Nix's packages anew and writes the lock file (`cargo xtask nix-lock`).
pub fn write_lock(root: &Path) -> Result<PathBuf> {
    let arch = crate::host::host_arch()?;
    let cache = crate::cache::cache_dir();
    let apt = PrivateApt::new(&cache, arch.debian())?;
    // A fresh archive folder: only what this resolution downloads goes into the pins.
    let archives = apt.base.join("cache/archives");
    let _ = fs::remove_dir_all(&archives);
    fs::create_dir_all(archives.join("partial"))?;
    apt.update()?;
    ui::step(format!(
        "resolving {ROOT_PACKAGE} in Debian {SUITE} with an empty dpkg status"
    ));
    host::ensure(&[host::DPKG_DEB], &[])?;
    let pins = apt.resolve()?;
    let debs = cache
        .join("debs")
        .join(format!("{SUITE}-{}", arch.debian()));
    fs::create_dir_all(&debs)?;
    let mut packages = serde_json::Map::new();
    let mut bytes = 0;
    for (pin, file) in &pins {
        bytes += fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        let _ = fs::copy(file, debs.join(&pin.file));
        packages.insert(
            pin.package.clone(),
            serde_json::json!({
                "package": pin.package,
                "version": pin.version,
                "file": pin.file,
                "sha256": pin.sha256,
            }),
        );
    }
    if !packages.contains_key(ROOT_PACKAGE) {
        bail!("resolving {ROOT_PACKAGE} in Debian {SUITE} downloaded no {ROOT_PACKAGE}");
    }
    let doc = serde_json::json!({ "arch": arch.debian(), "suite": SUITE, "packages": packages });
    let rel = lock_path(arch);
    let dest = root.join(&rel);
    let tmp = dest.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &dest).with_context(|| format!("writing {rel}"))?;
    ui::step(format!(
        "wrote {rel}: {} packages, {}",
        pins.len(),
        ui::size(bytes)
    ));
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_from_nix_version_lines() {
        assert_eq!(parse_version("nix (Nix) 2.8.0"), Some((2, 8)));
        assert_eq!(parse_version("nix (Nix) 2.26.3"), Some((2, 26)));
        assert_eq!(
            parse_version("nix (Nix) 2.31pre20250101_abc"),
            Some((2, 31))
        );
        assert_eq!(parse_version("bash"), None);
    }

    #[test]
    fn the_nix_is_chosen_by_setting_then_by_what_nixpkgs_needs() {
        let old = Some((2, 8));
        let new = Some((2, 26));
        assert_eq!(choose(None, old, false).unwrap(), (Choice::Host, None));
        assert_eq!(choose(None, None, false).unwrap(), (Choice::Host, None));
        assert_eq!(choose(None, new, true).unwrap(), (Choice::Host, None));
        let (c, note) = choose(None, old, true).unwrap();
        assert_eq!(c, Choice::Debian13);
        assert_eq!(
            note.unwrap(),
            "the host's Nix 2.8 is older than 2.18, which Nixpkgs requires: using the pinned Debian 13 Nix (BONSAI_NIX=debian13)"
        );
        assert_eq!(choose(None, None, true).unwrap().0, Choice::Debian13);
        assert_eq!(
            choose(Some("host"), old, true).unwrap(),
            (Choice::Host, None)
        );
        assert_eq!(
            choose(Some("debian13"), new, false).unwrap(),
            (Choice::Debian13, None)
        );
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let err = choose(Some(&d), old, false).unwrap_err().to_string();
        assert_eq!(
            err,
            format!("BONSAI_NIX={d}: expected host, debian13 or a folder holding nix, nix-build and nix-store (it has no nix, nix-build, nix-store)")
        );
        for p in ["nix", "nix-build", "nix-store"] {
            fs::write(dir.path().join(p), "").unwrap();
        }
        assert_eq!(
            choose(Some(&d), old, true).unwrap(),
            (Choice::Dir(dir.path().to_path_buf()), None)
        );
        let err = choose(Some("debian12"), old, false)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "BONSAI_NIX=debian12: expected host, debian13 or a folder holding nix, nix-build and nix-store"
        );
    }

    #[test]
    fn a_trixie_source_list_is_derived_from_the_hosts() {
        let deb822 = "Types: deb\n# a comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main contrib\n\nTypes: deb\nURIs: https://vendor.example/apt\nSuites: nodistro\nComponents: main\n";
        let one = "deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main # x\n# deb http://old bookworm main\ndeb-src http://m.example/debian bookworm main\ndeb http://cloud.example/apt cloud-sdk-bookworm main\n";
        let mut rows = parse_deb822(deb822);
        rows.extend(parse_one_line(one));
        assert_eq!(
            suite_sources(&rows, "bookworm").unwrap(),
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian trixie main\n\
             deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://mirror.example/debian trixie-updates main\n\
             deb http://mirror.example/debian-security trixie-security main contrib\n\
             deb [signed-by=/k.gpg] http://m.example/debian trixie main\n"
        );
        let err = suite_sources(&parse_one_line(one)[1..], "bookworm")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("no Debian 'bookworm' source"), "{err}");
    }
}
