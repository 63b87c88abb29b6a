//! The offline package set's inputs: Debian packages pinned in `nix/offline/<arch>.lock.json`,
//! downloaded with apt-get into bonsai's cache (`$BONSAI_CACHE`, else `$XDG_CACHE_HOME/bonsai`,
//! else `~/.cache/bonsai`), verified by SHA-256, and the host's static busybox unpacked as the
//! builders' seed. apt-get runs with its own list folder per architecture, so the host's apt
//! setup is never changed.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::config::Arch;
use crate::host;
use crate::ui;

// The general helpers that lived here, under their old names for callers that use them so.
pub use crate::cache::cache_dir;
pub use crate::digest::{hex, sha256_file};
pub use crate::host::host_arch;

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lock {
    pub arch: String,
    pub suite: String,
    pub packages: BTreeMap<String, LockedDeb>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedDeb {
    /// Debian package name.
    pub package: String,
    pub version: String,
    /// File name in the cache (the epoch dropped: store names cannot hold ':').
    pub file: String,
    pub sha256: String,
}

/// `cargo xtask pin <deb>...`: pins Debian packages for the offline set, at the version the
/// archive offers now, in `nix/offline/<arch>.lock.json` (the .deb goes into the cache).
#[derive(Args, Debug, Clone)]
pub struct Pin {
    /// Debian package names (binary packages of the lock's suite)
    #[arg(required = true)]
    pub packages: Vec<String>,
    /// Debian architectures whose locks get the pin
    #[arg(long, value_delimiter = ',', default_value = "amd64,arm64")]
    pub arch: Vec<String>,
}

impl Pin {
    pub fn run(self) -> Result<()> {
        let root = crate::project_root();
        for arch in &self.arch {
            let file = root.join(format!("nix/offline/{arch}.lock.json"));
            let mut lock = load_lock(&root, arch)?;
            for name in &self.packages {
                let deb = pin(&cache_dir(), arch, name)?;
                ui::detail(format!(
                    "{arch}: {} {} {}",
                    deb.package, deb.version, deb.sha256
                ));
                lock.packages.insert(name.clone(), deb);
            }
            write_lock(&file, &lock)?;
            println!(
                "pinned {} in nix/offline/{arch}.lock.json",
                self.packages.join(", ")
            );
        }
        Ok(())
    }
}

/// Downloads the archive's current `name` for `arch` into the cache and describes it as a pin.
pub fn pin(cache: &Path, arch: &str, name: &str) -> Result<LockedDeb> {
    host::ensure(&[host::APT_GET, host::DPKG_DEB], &[])?;
    let dir = cache.join("debs").join(arch);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let apt = AptDir::new(cache, arch);
    apt.update()?;
    let tmp = tempfile::tempdir_in(&dir).context("creating a download folder")?;
    let out = apt
        .command()
        .arg("download")
        .arg(format!("{name}:{arch}"))
        .current_dir(tmp.path())
        .output()
        .context("running apt-get download")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        bail!("cannot pin Debian package {name} ({arch}): {}", last.trim());
    }
    let got = fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download {name}:{arch} wrote no .deb"))?;
    let field = |f: &str| -> Result<String> {
        let o = Command::new("dpkg-deb")
            .arg("-f")
            .arg(&got)
            .arg(f)
            .output()
            .context("running dpkg-deb")?;
        let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if !o.status.success() || v.is_empty() {
            bail!("{}: no {f} field", got.display());
        }
        Ok(v)
    };
    let (package, version, deb_arch) =
        (field("Package")?, field("Version")?, field("Architecture")?);
    let plain = version.split_once(':').map_or(version.as_str(), |(_, v)| v);
    let file = format!("{package}_{plain}_{deb_arch}.deb");
    let sha256 = sha256_file(&got)?;
    fs::rename(&got, dir.join(&file)).with_context(|| format!("moving {file} into the cache"))?;
    Ok(LockedDeb {
        package,
        version,
        file,
        sha256,
    })
}

/// Writes a lock file atomically, in the layout the shipped ones have (sorted, two-space indent).
pub fn write_lock(file: &Path, lock: &Lock) -> Result<()> {
    let mut text = serde_json::to_string_pretty(lock)?;
    text.push('\n');
    let dir = file.parent().context("a lock file has a folder")?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("writing {}", file.display()))?;
    std::io::Write::write_all(&mut tmp, text.as_bytes())?;
    tmp.persist(file)
        .with_context(|| format!("writing {}", file.display()))?;
    Ok(())
}

/// Where the offline set's inputs are, for `nix-build --arg debs ... --arg bootstrap ...`.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub debs: PathBuf,
    pub bootstrap: PathBuf,
}

pub fn load_lock(root: &Path, debian_arch: &str) -> Result<Lock> {
    let file = root.join(format!("nix/offline/{debian_arch}.lock.json"));
    let text = fs::read_to_string(&file)
        .with_context(|| format!("reading nix/offline/{debian_arch}.lock.json (no offline package set for {debian_arch})"))?;
    serde_json::from_str(&text)
        .with_context(|| format!("parsing nix/offline/{debian_arch}.lock.json"))
}

/// Makes sure every pinned .deb for the target (and the host, for the builders' tools) is in
/// the cache with the right hash, and the busybox seed is unpacked.
pub fn prepare(root: &Path, target: Arch) -> Result<Inputs> {
    let cache = cache_dir();
    let host = host_arch()?;
    let mut arches = vec![host];
    if target != host {
        arches.push(target);
    }
    for arch in &arches {
        let lock = load_lock(root, arch.debian())?;
        fetch_missing(&cache, arch.debian(), &lock)?;
    }
    let host_lock = load_lock(root, host.debian())?;
    let bootstrap = unpack_seed(&cache, host.debian(), &host_lock)?;
    Ok(Inputs {
        debs: cache.join("debs"),
        bootstrap,
    })
}

/// A pinned Debian package of `arch` (see `nix/offline/<arch>.lock.json`) as a verified file in
/// the cache, downloaded first when missing: for what bonsai puts on a disk beside the Nix-built
/// image (systemd-boot's EFI binary).
pub fn pinned_deb(root: &Path, arch: Arch, package: &str) -> Result<PathBuf> {
    let lock = load_lock(root, arch.debian())?;
    let deb = lock.packages.get(package).with_context(|| {
        format!(
            "Debian package {package} is not pinned in nix/offline/{}.lock.json (cargo xtask pin {package})",
            arch.debian()
        )
    })?;
    let cache = cache_dir();
    fetch_missing(&cache, arch.debian(), &lock)?;
    let file = cache.join("debs").join(arch.debian()).join(&deb.file);
    let got = crate::digest::sha256_file(&file)?;
    if got != deb.sha256 {
        bail!(
            "{}: SHA-256 {got}, but nix/offline/{}.lock.json pins {} (delete the file to download it again)",
            file.display(),
            arch.debian(),
            deb.sha256
        );
    }
    Ok(file)
}

fn fetch_missing(cache: &Path, arch: &str, lock: &Lock) -> Result<()> {
    let dir = cache.join("debs").join(arch);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // A file of the right size is taken as verified here: Nix checks its SHA-256 again on import.
    let missing: Vec<&LockedDeb> = lock
        .packages
        .values()
        .filter(|d| !dir.join(&d.file).is_file())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    host::ensure(&[host::APT_GET], &[])?;
    ui::step(format!(
        "downloading {} Debian packages ({arch}) into {}",
        missing.len(),
        dir.display()
    ));
    let apt = AptDir::new(cache, arch);
    apt.update()?;
    for deb in missing {
        ui::detail(format!("{}={}", deb.package, deb.version));
        apt.download(deb, &dir)?;
    }
    Ok(())
}

/// The Debian release of the lock files.
const DEBIAN_SUITE: &str = "bookworm";

/// apt-get with a private state folder for one architecture.
struct AptDir {
    lists: PathBuf,
    cache: PathBuf,
    arch: String,
}

impl AptDir {
    fn new(cache: &Path, arch: &str) -> AptDir {
        let base = cache.join("apt").join(arch);
        AptDir {
            lists: base.join("lists"),
            cache: base.join("cache"),
            arch: arch.to_string(),
        }
    }

    /// The host's `/etc/apt/sources.list` plus Debian's `non-free-firmware` component (the Pi
    /// firmware is there), written beside the private state: the host's other sources
    /// (`sources.list.d`) stay as they are.
    fn source_list(&self) -> PathBuf {
        let file = self.lists.with_file_name("sources.list");
        let mut text = fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!(
            "# added by bonsai (raspi-firmware)\ndeb http://deb.debian.org/debian {DEBIAN_SUITE} non-free-firmware\n"
        ));
        if fs::read_to_string(&file).ok().as_deref() != Some(text.as_str()) {
            let _ = fs::create_dir_all(&self.lists);
            let _ = fs::write(&file, text);
        }
        file
    }

    fn command(&self) -> Command {
        let mut c = Command::new("apt-get");
        c.arg("-q")
            .arg(format!(
                "-oDir::Etc::SourceList={}",
                self.source_list().display()
            ))
            .arg(format!("-oAPT::Architecture={}", self.arch))
            .arg(format!("-oAPT::Architectures={}", self.arch))
            .arg(format!("-oDir::State::Lists={}", self.lists.display()))
            .arg(format!("-oDir::Cache={}", self.cache.display()))
            .arg("-oDebug::NoLocking=1")
            .arg("-oAPT::Sandbox::User=root");
        c
    }

    fn update(&self) -> Result<()> {
        fs::create_dir_all(self.lists.join("partial"))?;
        fs::create_dir_all(self.cache.join("archives/partial"))?;
        let out = self
            .command()
            .arg("update")
            .output()
            .context("running apt-get update")?;
        if !out.status.success() {
            // Third-party sources may fail for a foreign architecture; the download says if
            // Debian's own lists were enough.
            let err = String::from_utf8_lossy(&out.stderr);
            if let Some(l) = err.lines().rev().find(|l| !l.trim().is_empty()) {
                ui::warn(format!("apt-get update ({}): {l}", self.arch));
            }
        }
        Ok(())
    }

    fn download(&self, deb: &LockedDeb, dir: &Path) -> Result<()> {
        let tmp = tempfile::tempdir_in(dir).context("creating a download folder")?;
        let spec = format!("{}:{}={}", deb.package, self.arch_of(deb), deb.version);
        let out = self
            .command()
            .arg("download")
            .arg(&spec)
            .current_dir(tmp.path())
            .output()
            .context("running apt-get download")?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let last = err
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
                .trim();
            bail!(
                "cannot download Debian package {spec} pinned in nix/offline/{}.lock.json: {last} (the archive may have dropped that version; update the pin)",
                self.arch
            );
        }
        let got = fs::read_dir(tmp.path())?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .with_context(|| format!("apt-get download {spec} wrote no .deb"))?;
        let sum = sha256_file(&got)?;
        if sum != deb.sha256 {
            bail!(
                "Debian package {spec}: sha256 {sum} does not match the pin {}",
                deb.sha256
            );
        }
        fs::rename(&got, dir.join(&deb.file))
            .with_context(|| format!("moving {} into the cache", deb.file))?;
        Ok(())
    }

    /// `linux-source` is `all`; everything else is of the lock's architecture.
    fn arch_of(&self, deb: &LockedDeb) -> String {
        if deb.file.ends_with("_all.deb") {
            "all".into()
        } else {
            self.arch.clone()
        }
    }
}

/// Unpacks the host's static busybox into `<cache>/bootstrap/<arch>-<sha>/` with `sh -> busybox`.
fn unpack_seed(cache: &Path, arch: &str, lock: &Lock) -> Result<PathBuf> {
    let deb = lock
        .packages
        .get("busybox-static")
        .with_context(|| format!("nix/offline/{arch}.lock.json pins no busybox-static"))?;
    let dir = cache
        .join("bootstrap")
        .join(format!("{arch}-{}", &deb.sha256[..16]));
    if dir.join("busybox").is_file() && dir.join("sh").exists() {
        return Ok(dir);
    }
    host::ensure(&[host::DPKG_DEB], &[])?;
    let tmp = tempfile::tempdir_in(cache).context("creating a folder in the cache")?;
    let src = cache.join("debs").join(arch).join(&deb.file);
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&src)
        .arg(tmp.path().join("x"))
        .status()
        .context("running dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb could not unpack {}", src.display());
    }
    let stage = tmp.path().join("seed");
    fs::create_dir_all(&stage)?;
    fs::copy(tmp.path().join("x/bin/busybox"), stage.join("busybox"))
        .with_context(|| format!("{} holds no bin/busybox", deb.file))?;
    std::os::unix::fs::symlink("busybox", stage.join("sh"))?;
    fs::create_dir_all(dir.parent().unwrap())?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&stage, &dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
