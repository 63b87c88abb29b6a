//! `cargo xtask release --board <b>`: out/release/<b>-<version>/ with the kernel, the initramfs,
//! manifest.json, an SBOM (CycloneDX 1.5) and SHA256SUMS, written atomically. Nothing in it
//! depends on the checkout path, the time, the locale or the user: SOURCE_DATE_EPOCH (default:
//! the last commit's time) is the only clock.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::build::Build;
use crate::config::INITS;
use crate::{nix, project_root, sbom, ui};

#[derive(Args, Debug, Clone)]
pub struct Release {
    #[arg(long, default_value = "qemu-x86_64")]
    pub board: String,
    /// Release version (default: `git describe --tags --always`)
    #[arg(long)]
    pub version: Option<String>,
    #[arg(long)]
    pub profile: Option<String>,
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(INITS))]
    pub init: Option<String>,
    /// Folder that receives <board>-<version>/ (default: out/release)
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Also write the signed update bundle (as `cargo xtask bundle`), with this secret key's
    /// public half built into the image
    #[arg(long)]
    pub key: Option<PathBuf>,
}

/// `git describe --tags --always` of the checkout, or `dev` outside git.
pub fn git_version(root: &Path) -> String {
    std::process::Command::new("git")
        .args(["describe", "--tags", "--always"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "dev".into())
}

impl Release {
    pub fn run(self) -> Result<PathBuf> {
        let root = project_root();
        let version = self.version.clone().unwrap_or_else(|| git_version(&root));
        if version.is_empty() || version.contains(['/', ' ']) {
            bail!("release version '{version}' must be a non-empty word without '/' or spaces");
        }
        let key = self
            .key
            .as_deref()
            .map(crate::update::read_secret_key)
            .transpose()?;
        let built = Build {
            board: self.board.clone(),
            profile: self.profile.clone(),
            init: self.init.clone(),
            nested: true,
            update_key: key.as_ref().map(|k| k.public_file()),
            ..Build::default()
        }
        .run()?;
        let info = &built.info;
        if info.ssh_key.is_some() {
            ui::warn(format!(
                "profile {} authorizes bonsai's cached test key; fine for testing, not for shipping",
                info.profile
            ));
        }
        if info.development {
            ui::warn(format!(
                "profile {} is a development image (manifest.json: \"development\": true); not for shipping",
                info.profile
            ));
        }
        if !info.secrets.is_empty() {
            ui::warn(format!(
                "the image holds secrets ({}; manifest.json: \"holds_secrets\": true): its initramfs depends on files outside the repository, so it is reproducible only with the same secret files and must not be published",
                info.secrets.join(", ")
            ));
        }
        let out_dir = self
            .out_dir
            .clone()
            .unwrap_or_else(|| crate::out_root().join("release"));
        fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
        let dest = out_dir.join(format!("{}-{version}", self.board));
        let stage = tempfile::Builder::new()
            .prefix(&format!(".{}-{version}.tmp-", self.board))
            .tempdir_in(&out_dir)
            .with_context(|| format!("cannot write to {}", out_dir.display()))?;

        ui::step(format!("release {} {version}", self.board));
        let mut files: Vec<String> = vec![
            "kernel".into(),
            info.initramfs.clone(),
            "manifest.json".into(),
        ];
        // Boards that boot with a device tree ship it too.
        files.extend(info.dtb.clone());
        for f in &files {
            fs::copy(built.out.join(f), stage.path().join(f))
                .with_context(|| format!("copying {f}"))?;
            // An initramfs holding secrets stays readable by its owner only.
            let secret = *f == info.initramfs && !info.secrets.is_empty();
            set_mode(&stage.path().join(f), if secret { 0o600 } else { 0o644 })?;
        }
        // Boards with a disk layout ship the disk too (and `repro` compares it like the rest).
        let board = crate::config::Config::new(&root).load_board(&self.board)?;
        let mut disk_info = None;
        if let Some(disk) = &board.disk {
            let place = crate::image::DiskPlace {
                build_out: &built.out,
                dest: stage.path(),
            };
            disk_info = Some(crate::image::write_disk(
                &root, &board, disk, &place, info, &version,
            )?);
            let mut disk_files = vec![crate::image::DISK_IMG, crate::image::DISK_JSON];
            // A Pi card's U-Boot is beside it too: what QEMU loads in place of the Pi firmware.
            if disk.layout == crate::config::DiskLayout::Rpi {
                disk_files.push(crate::image::UBOOT_BIN);
            }
            for f in disk_files {
                set_mode(&stage.path().join(f), 0o644)?;
                files.push(f.into());
            }
        }
        if let Some(key) = &key {
            let names = crate::update::write_bundle(
                stage.path(),
                &self.board,
                &version,
                &built.out,
                info,
                key,
            )?;
            for f in names {
                set_mode(&stage.path().join(&f), 0o644)?;
                files.push(f);
            }
        }
        let kernel_sha = crate::digest::sha256_file(&stage.path().join("kernel"))?;
        let initramfs_sha = crate::digest::sha256_file(&stage.path().join(&info.initramfs))?;
        let mut store_paths: Vec<PathBuf> = info.store_paths.iter().map(PathBuf::from).collect();
        store_paths.extend(info.nix.kernel.iter().map(PathBuf::from));
        let infos = if store_paths.is_empty() {
            Default::default()
        } else {
            nix::closure(&store_paths)?
        };
        let kernel_info = info.nix.kernel.as_ref().and_then(|k| infos.get(k).cloned());
        let paths: Vec<nix::PathInfo> = infos
            .into_values()
            .filter(|p| info.store_paths.contains(&p.path))
            .collect();
        let doc = sbom::cyclonedx(&sbom::SbomInput {
            board: &self.board,
            version: &version,
            profile: &info.profile,
            init: &info.init,
            source: &info.source,
            epoch: info.source_date_epoch,
            initramfs_sha256: &initramfs_sha,
            kernel_sha256: &kernel_sha,
            paths: &paths,
            kernel: kernel_info.as_ref().map(|k| sbom::Kernel {
                info: k,
                config_source: &info.nix.kernel_config,
                config_sha256: info.nix.kernel_config_sha256.as_deref(),
            }),
            development: info.development,
            secrets: &info.secrets,
            boot_loader: disk_info.as_ref().map(|d| &d.loader),
            forbid: &info.forbid,
            overrides: &info.overrides,
        });
        fs::write(
            stage.path().join("sbom.cdx.json"),
            serde_json::to_string_pretty(&doc)? + "\n",
        )?;
        set_mode(&stage.path().join("sbom.cdx.json"), 0o644)?;
        files.push("sbom.cdx.json".into());
        files.sort();
        let mut sums = String::new();
        for f in &files {
            sums.push_str(&format!(
                "{}  {f}\n",
                crate::digest::sha256_file(&stage.path().join(f))?
            ));
        }
        fs::write(stage.path().join("SHA256SUMS"), sums)?;
        set_mode(&stage.path().join("SHA256SUMS"), 0o644)?;
        set_mode(stage.path(), 0o755)?;

        let stage = stage.keep();
        let old = out_dir.join(format!(
            ".{}-{version}.old-{}",
            self.board,
            std::process::id()
        ));
        if dest.exists() {
            fs::rename(&dest, &old)
                .with_context(|| format!("moving the previous {} aside", dest.display()))?;
        }
        if let Err(e) = fs::rename(&stage, &dest) {
            let _ = fs::rename(&old, &dest);
            let _ = fs::remove_dir_all(&stage);
            return Err(e).with_context(|| format!("moving the release into {}", dest.display()));
        }
        let _ = fs::remove_dir_all(&old);
        println!(
            "released {} {version}: {} ({} store paths in the SBOM)",
            self.board,
            dest.strip_prefix(&root).unwrap_or(&dest).display(),
            paths.len()
        );
        Ok(dest)
    }
}

/// Fixed modes, whatever the umask.
fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", p.display()))
}
