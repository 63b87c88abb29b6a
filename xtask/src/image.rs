//! `cargo xtask image --board <b>`: the board's disk image, `out/<b>/disk.img`, and what is in
//! it, `out/<b>/disk.json`. It builds the board first (as `build` does), then lays the build out
//! as the board's `[disk]` table says: for `layout = "efi"`, GPT with an EFI system partition
//! holding systemd-boot and the build as slot A (a boot-counted trial entry), and an empty data
//! partition. Pure writing, through the `disk` crate: no root, no loop device, no mount.
//!
//! The image is a function of its inputs: GUIDs and FAT serial numbers derive from the hash of
//! the loader, the slot's files and its command line; FAT timestamps are the build's
//! `SOURCE_DATE_EPOCH`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::build::{Build, BuildInfo};
use crate::config::{Arch, Board, Config, DiskConfig, DiskLayout};
use crate::digest::sha256_bytes;
use crate::{project_root, ui};

#[derive(Args, Debug, Default)]
pub struct Image {
    /// What to build, as for `cargo xtask build` (disk.img and disk.json go beside the build)
    #[command(flatten)]
    pub build: Build,
    /// The release in slot A, the entry's `version` (default: `git describe --tags --always`)
    #[arg(long)]
    pub version: Option<String>,
}

/// The file names in the output folder.
pub const DISK_IMG: &str = "disk.img";
pub const DISK_JSON: &str = "disk.json";

/// `disk.json`: the partition table, each partition's place and SHA-256, the boot loader, and
/// which release is in which slot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskInfo {
    pub board: String,
    pub layout: String,
    pub file: String,
    pub size: u64,
    pub sha256: String,
    pub disk_guid: String,
    pub source_date_epoch: u64,
    pub loader: LoaderInfo,
    pub partitions: Vec<PartitionInfo>,
    pub slots: Vec<SlotInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoaderInfo {
    /// The Debian package and version it comes from (pinned in nix/offline/<arch>.lock.json).
    pub package: String,
    pub version: String,
    /// Where it is on the ESP.
    pub path: String,
    pub sha256: String,
}

/// A partition as written, and the SHA-256 of its bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionInfo {
    #[serde(flatten)]
    pub partition: disk::efi::Partition,
    pub sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SlotInfo {
    pub slot: String,
    pub version: String,
    /// The entry file under `loader/entries/` as written (its counter: the tries left).
    pub entry: String,
    pub profile: String,
    pub init: String,
    pub cmdline: String,
    pub kernel_sha256: String,
    pub initrd_sha256: String,
    pub dtb_sha256: Option<String>,
}

/// systemd-boot's EFI binary for `arch`: in the pinned `systemd-boot-efi` package, and where
/// UEFI firmware looks on removable media.
fn loader_names(arch: Arch) -> (&'static str, &'static str) {
    match arch {
        Arch::X86_64 => (
            "usr/lib/systemd/boot/efi/systemd-bootx64.efi",
            "EFI/BOOT/BOOTX64.EFI",
        ),
        Arch::Aarch64 => (
            "usr/lib/systemd/boot/efi/systemd-bootaa64.efi",
            "EFI/BOOT/BOOTAA64.EFI",
        ),
    }
}

/// The pinned systemd-boot for `arch`, and where it goes on the ESP.
pub fn efi_loader(root: &Path, arch: Arch) -> Result<(Vec<u8>, LoaderInfo)> {
    const PACKAGE: &str = "systemd-boot-efi";
    let lock = crate::offline::load_lock(root, arch.debian())?;
    let version = lock.packages[PACKAGE].version.clone();
    let (inside, esp_path) = loader_names(arch);
    let bytes = extract_pinned(root, arch, PACKAGE, &[inside])?.remove(0);
    let sha256 = sha256_bytes(&bytes);
    Ok((
        bytes,
        LoaderInfo {
            package: PACKAGE.into(),
            version,
            path: esp_path.into(),
            sha256,
        },
    ))
}

/// The kernel command line every slot of a disk boots with: the board's
/// ([`crate::boot::board_cmdline`]) and the `[disk]` table's own parameters.
pub fn disk_cmdline(board: &Board) -> String {
    let mut c = crate::boot::board_cmdline(board);
    if let Some(d) = board.disk.as_ref().filter(|d| !d.cmdline.is_empty()) {
        c.push(' ');
        c.push_str(&d.cmdline);
    }
    c
}

/// The kernel command line of a slot on a disk: [`disk_cmdline`] and the slot's name
/// (`bonsai.slot=`), which the running system shows in `/run/bonsai/slot`.
pub fn slot_cmdline(board: &Board, slot: &str) -> String {
    format!("{} bonsai.slot={slot}", disk_cmdline(board))
}

/// The files of one build, as a slot boots them.
pub struct SlotFiles {
    pub kernel: Vec<u8>,
    pub initrd: Vec<u8>,
    pub dtb: Option<Vec<u8>>,
}

impl SlotFiles {
    pub fn read(out: &Path, info: &BuildInfo) -> Result<SlotFiles> {
        let read = |f: &str| {
            let p = out.join(f);
            fs::read(&p).with_context(|| format!("reading {}", p.display()))
        };
        Ok(SlotFiles {
            kernel: read(&info.kernel)?,
            initrd: read(&info.initramfs)?,
            dtb: info.dtb.as_deref().map(read).transpose()?,
        })
    }
}

impl Image {
    pub fn run(self) -> Result<()> {
        let root = project_root();
        let board = Config::new(&root).load_board(&self.build.board)?;
        let disk = disk_config(&board)?;
        let built = self.build.run()?;
        let version = self
            .version
            .clone()
            .unwrap_or_else(|| crate::release::git_version(&root));
        if version.is_empty() || version.contains(|c: char| c.is_whitespace() || c == '/') {
            bail!("--version '{version}': must be a non-empty word without '/' or spaces");
        }
        let timer = ui::Timer::start();
        ui::step(format!(
            "write the disk image of {} ({} layout)",
            board.name,
            layout_name(disk.layout)
        ));
        let place = DiskPlace {
            build_out: &built.out,
            dest: &built.out,
        };
        let info = write_disk(&root, &board, &disk, &place, &built.info, &version)?;
        let (first, second) = (&info.partitions[0].partition, &info.partitions[1].partition);
        let (table, loader) = match disk.layout {
            DiskLayout::Efi => ("GPT", "systemd-boot"),
            DiskLayout::Rpi => ("MBR", "U-Boot"),
        };
        println!(
            "wrote {}: {} MiB, {table}: {} {} MiB ({loader} {}, slot a: {} as {}), {} {} MiB in {:.1} s",
            built.out.join(DISK_IMG).display(),
            info.size >> 20,
            first.name,
            first.size >> 20,
            info.loader.version,
            version,
            info.slots[0].entry,
            second.name,
            second.size >> 20,
            timer.secs()
        );
        Ok(())
    }
}

pub fn layout_name(l: DiskLayout) -> &'static str {
    match l {
        DiskLayout::Efi => "efi",
        DiskLayout::Rpi => "rpi",
    }
}

/// What the GUIDs and serials of a disk derive from: the hash of everything on it.
fn disk_seed(loader: &[u8], files: &SlotFiles, cmdline: &str, version: &str) -> Vec<u8> {
    let mut seed = Sha256::new();
    for part in [
        loader,
        &files.kernel,
        &files.initrd,
        files.dtb.as_deref().unwrap_or_default(),
        cmdline.as_bytes(),
        version.as_bytes(),
    ] {
        seed.update(Sha256::digest(part));
    }
    seed.finalize().to_vec()
}

/// U-Boot, beside the card in the output folder: what QEMU loads with `-kernel`.
pub const UBOOT_BIN: &str = "u-boot.bin";

/// The Pi firmware's settings: 64-bit, U-Boot as the kernel, the serial console on.
pub const RPI_CONFIG_TXT: &str = "# bonsai: the Pi firmware starts U-Boot, which runs boot.scr (A/B slots)\narm_64bit=1\nkernel=u-boot.bin\nenable_uart=1\n";

/// The Pi firmware files a Raspberry Pi 3 reads from the boot partition.
const RPI_FIRMWARE: &[&str] = &["bootcode.bin", "start.elf", "fixup.dat"];

struct RpiBoot {
    uboot: Vec<u8>,
    firmware: Vec<(String, Vec<u8>)>,
    info: LoaderInfo,
}

/// U-Boot for the board and the Pi firmware, from the pinned `u-boot-rpi` and `raspi-firmware`.
fn rpi_boot_files(root: &Path, board: &Board, disk: &DiskConfig) -> Result<RpiBoot> {
    let crate::config::DiskFirmware::UBoot { build } = &disk.firmware else {
        bail!("boards/{}.toml: layout rpi needs disk.u-boot", board.name);
    };
    let uboot_path = format!("usr/lib/u-boot/{build}/u-boot.bin");
    let mut got = extract_pinned(root, board.arch, "u-boot-rpi", &[uboot_path.as_str()])?;
    let uboot = got.remove(0);
    let names: Vec<String> = RPI_FIRMWARE
        .iter()
        .map(|f| format!("usr/lib/raspi-firmware/{f}"))
        .collect();
    let firmware = extract_pinned(
        root,
        board.arch,
        "raspi-firmware",
        &names.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    let lock = crate::offline::load_lock(root, board.arch.debian())?;
    Ok(RpiBoot {
        info: LoaderInfo {
            package: "u-boot-rpi".into(),
            version: lock.packages["u-boot-rpi"].version.clone(),
            path: UBOOT_BIN.into(),
            sha256: sha256_bytes(&uboot),
        },
        uboot,
        firmware: RPI_FIRMWARE
            .iter()
            .map(|f| f.to_string())
            .zip(firmware)
            .collect(),
    })
}

/// Files of a pinned Debian package, in the order asked.
fn extract_pinned(root: &Path, arch: Arch, package: &str, inside: &[&str]) -> Result<Vec<Vec<u8>>> {
    let deb = crate::offline::pinned_deb(root, arch, package)?;
    let tmp = tempfile::tempdir().context("making a temporary folder")?;
    let st = std::process::Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(tmp.path())
        .status()
        .context("running dpkg-deb (apt-get install dpkg)")?;
    if !st.success() {
        bail!("dpkg-deb -x {} failed", deb.display());
    }
    inside
        .iter()
        .map(|f| {
            fs::read(tmp.path().join(f)).with_context(|| format!("{}: no {f} in it", deb.display()))
        })
        .collect()
}

/// The board's `[disk]` table, or the one-line error for a board without one.
pub fn disk_config(board: &Board) -> Result<DiskConfig> {
    board.disk.clone().with_context(|| {
        format!(
            "boards/{}.toml has no [disk] table: this board has no disk image yet (boards with one: see cargo xtask list)",
            board.name
        )
    })
}

/// Where a disk is written from and to: the build's output folder, and the folder that gets
/// `disk.img` and `disk.json` (the same folder, or a release's).
pub struct DiskPlace<'a> {
    pub build_out: &'a Path,
    pub dest: &'a Path,
}

/// Writes `disk.img` and `disk.json` for the build in `place.build_out` into `place.dest`:
/// into temporary files first, renamed into place once whole (the image, then its
/// description).
pub fn write_disk(
    root: &Path,
    board: &Board,
    disk: &DiskConfig,
    place: &DiskPlace,
    build: &BuildInfo,
    version: &str,
) -> Result<DiskInfo> {
    let out = place.dest;
    let files = SlotFiles::read(place.build_out, build)?;
    let cmdline = slot_cmdline(board, "a");
    let mut tmp = tempfile::Builder::new()
        .prefix(".disk.img.tmp-")
        .tempfile_in(out)
        .with_context(|| format!("creating a temporary file in {}", out.display()))?;
    let (layout, loader_info, entry) = match disk.layout {
        DiskLayout::Efi => {
            let (loader, loader_info) = efi_loader(root, board.arch)?;
            let seed = disk_seed(&loader, &files, &cmdline, version);
            let slot = disk::efi::Slot {
                name: "a",
                version,
                generation: 1,
                kernel: &files.kernel,
                initrd: &files.initrd,
                dtb: files.dtb.as_deref(),
                cmdline: &cmdline,
                tries: Some(disk.tries),
            };
            let spec = disk::efi::Spec {
                loader: &loader,
                loader_path: &loader_info.path,
                slots: vec![slot.clone()],
                esp_mib: disk.esp_mib,
                data_mib: disk.data_mib,
                epoch: build.source_date_epoch,
                seed: &seed,
            };
            let layout = disk::efi::write(tmp.as_file_mut(), &spec)
                .with_context(|| format!("writing the disk image of {}", board.name))?;
            (layout, loader_info, disk::efi::entry_name(&slot).file())
        }
        DiskLayout::Rpi => {
            let boot = rpi_boot_files(root, board, disk)?;
            fs::write(out.join(UBOOT_BIN), &boot.uboot)
                .with_context(|| format!("writing {}", out.join(UBOOT_BIN).display()))?;
            let dtb = files.dtb.as_deref().with_context(|| {
                format!("boards/{}.toml: a Raspberry Pi card needs the kernel's device tree ([kernel] dtb)", board.name)
            })?;
            // U-Boot's script adds bonsai.slot= itself.
            let args = disk_cmdline(board);
            let seed = disk_seed(&boot.uboot, &files, &args, version);
            let spec = disk::rpi::Spec {
                firmware: boot
                    .firmware
                    .iter()
                    .map(|(n, b)| (n.as_str(), b.as_slice()))
                    .collect(),
                config_txt: RPI_CONFIG_TXT,
                uboot: &boot.uboot,
                cmdline: &args,
                tries: disk.tries,
                slots: vec![disk::rpi::Slot {
                    name: "a",
                    version,
                    kernel: &files.kernel,
                    initrd: &files.initrd,
                    dtb,
                }],
                boot_mib: disk.esp_mib,
                data_mib: disk.data_mib,
                epoch: build.source_date_epoch,
                seed: &seed,
            };
            let layout = disk::rpi::write(tmp.as_file_mut(), &spec)
                .with_context(|| format!("writing the SD card image of {}", board.name))?;
            (
                layout,
                boot.info,
                format!("{}: BOOT_A_LEFT={}", disk::rpi::ENV_FILE, disk.tries),
            )
        }
    };
    let f = tmp.as_file_mut();
    let mut partitions = Vec::new();
    for p in &layout.partitions {
        partitions.push(PartitionInfo {
            partition: p.clone(),
            sha256: disk::efi::partition_sha256(f, p)?,
        });
    }
    f.flush()?;
    f.sync_all().context("writing the disk image")?;
    let image_sha256 = crate::digest::sha256_file(tmp.path())?;
    let info = DiskInfo {
        board: board.name.clone(),
        layout: layout_name(disk.layout).into(),
        file: DISK_IMG.into(),
        size: layout.size,
        sha256: image_sha256,
        disk_guid: layout.disk_guid.clone(),
        source_date_epoch: build.source_date_epoch,
        loader: loader_info,
        partitions,
        slots: vec![SlotInfo {
            slot: "a".into(),
            version: version.into(),
            entry,
            profile: build.profile.clone(),
            init: build.init.clone(),
            cmdline: cmdline.clone(),
            kernel_sha256: sha256_bytes(&files.kernel),
            initrd_sha256: sha256_bytes(&files.initrd),
            dtb_sha256: files.dtb.as_deref().map(sha256_bytes),
        }],
    };
    let mut json = serde_json::to_string_pretty(&info)?;
    json.push('\n');
    tmp.persist(out.join(DISK_IMG))
        .with_context(|| format!("writing {}", out.join(DISK_IMG).display()))?;
    let mut tmp_json = tempfile::Builder::new()
        .prefix(".disk.json.tmp-")
        .tempfile_in(out)
        .with_context(|| format!("creating a temporary file in {}", out.display()))?;
    tmp_json.write_all(json.as_bytes())?;
    tmp_json
        .persist(out.join(DISK_JSON))
        .with_context(|| format!("writing {}", out.join(DISK_JSON).display()))?;
    Ok(info)
}

/// Reads `disk.json` of the output folder `out`.
pub fn read_info(out: &Path) -> Result<DiskInfo> {
    let p = out.join(DISK_JSON);
    let text = fs::read_to_string(&p)
        .with_context(|| format!("{} is missing; run cargo xtask image first", p.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a disk description", p.display()))
}

/// `disk.json` of `out` if it describes the build there (slot A holds its kernel and
/// initramfs), else the disk written anew for it.
pub fn ensure_disk(root: &Path, board: &Board, out: &Path, build: &BuildInfo) -> Result<DiskInfo> {
    let disk = disk_config(board)?;
    let files = SlotFiles::read(out, build)?;
    let current = read_info(out).ok().filter(|d| {
        out.join(DISK_IMG).is_file()
            && d.slots.first().is_some_and(|s| {
                s.kernel_sha256 == sha256_bytes(&files.kernel)
                    && s.initrd_sha256 == sha256_bytes(&files.initrd)
            })
    });
    if let Some(d) = current {
        return Ok(d);
    }
    ui::step(format!(
        "write the disk image of {} first ({} does not hold this build)",
        board.name,
        out.join(DISK_IMG).display()
    ));
    let place = DiskPlace {
        build_out: out,
        dest: out,
    };
    let version = crate::release::git_version(root);
    write_disk(root, board, &disk, &place, build, &version)
}

/// The disk a boot runs on: a copy of `disk.img` and of the firmware's variable store, both
/// kept in the output folder (`disk-run.img`, `disk-run-vars.fd`) for a look afterwards; the
/// firmware and boot loader write to them, never to `disk.img`.
pub struct RunDisk {
    pub disk: PathBuf,
    /// UEFI's variable store for this disk (none under U-Boot, whose state is on the card).
    pub vars: Option<PathBuf>,
    pub boot: RunFirmware,
    /// The board's watchdog device, if it has one.
    pub watchdog: Option<String>,
    /// Kernel parameters every boot of this disk in QEMU adds (`[disk] qemu-cmdline`).
    pub params: String,
}

/// The kernel parameters a firmware boot of `spec` passes through its disk: the disk's own
/// for QEMU (in `append`, which a firmware boot does not hand to QEMU) and the protocol's.
pub fn firmware_boot_params(spec: &qemu::QemuSpec, nonce: &str) -> String {
    format!("{} {}", spec.append, qemu::protocol::kernel_params(nonce))
        .trim()
        .to_string()
}

/// The firmware a run disk boots through.
#[derive(Debug, Clone)]
pub enum RunFirmware {
    Uefi { code: PathBuf },
    UBoot { binary: PathBuf },
}

impl RunDisk {
    /// Fresh copies of the image and the variable store, as a new device would have them.
    pub fn fresh(board: &Board, out: &Path) -> Result<RunDisk> {
        let cfg = disk_config(board)?;
        let disk = out.join("disk-run.img");
        let run = match &cfg.firmware {
            crate::config::DiskFirmware::Uefi {
                code,
                vars,
                package,
            } => {
                let code_s = code.display().to_string();
                let mut extra: Vec<(&str, &str)> = vec![(&code_s, package)];
                let vars_src = vars.as_ref().map(|v| v.display().to_string());
                if let Some(v) = &vars_src {
                    extra.push((v, package));
                }
                crate::host::ensure(&[], &extra)?;
                let run_vars = out.join("disk-run-vars.fd");
                match vars {
                    Some(v) => copy(v, &run_vars)?,
                    None => fs::write(&run_vars, vec![0u8; 64 << 20])
                        .with_context(|| format!("writing {}", run_vars.display()))?,
                }
                RunDisk {
                    disk,
                    vars: Some(run_vars),
                    boot: RunFirmware::Uefi { code: code.clone() },
                    watchdog: cfg.watchdog.clone(),
                    params: cfg.qemu_cmdline.clone(),
                }
            }
            crate::config::DiskFirmware::UBoot { .. } => {
                let binary = out.join(UBOOT_BIN);
                if !binary.is_file() {
                    bail!(
                        "{} is missing; run cargo xtask image --board {}",
                        binary.display(),
                        board.name
                    );
                }
                RunDisk {
                    disk,
                    vars: None,
                    boot: RunFirmware::UBoot { binary },
                    watchdog: cfg.watchdog.clone(),
                    params: cfg.qemu_cmdline.clone(),
                }
            }
        };
        copy(&out.join(DISK_IMG), &run.disk)?;
        Ok(run)
    }

    /// Boot `spec` from this disk through the firmware.
    pub fn apply(&self, spec: &mut qemu::QemuSpec) {
        // The disk's entries hold the command line; `append` keeps only what this boot adds.
        spec.append = self.params.clone();
        match &self.boot {
            RunFirmware::Uefi { code } => {
                spec.firmware = Some(qemu::Firmware::Uefi {
                    code: code.clone(),
                    vars: self.vars.clone().unwrap_or_default(),
                });
                spec.drives.insert(0, self.disk.clone());
            }
            RunFirmware::UBoot { binary } => {
                spec.firmware = Some(qemu::Firmware::UBoot {
                    binary: binary.clone(),
                    card: self.disk.clone(),
                });
            }
        }
        if let Some(w) = &self.watchdog {
            // On expiry the machine resets; under -no-reboot QEMU then exits, and the next
            // boot is the next launch.
            spec.extra_args.extend([
                "-device".into(),
                w.clone(),
                "-action".into(),
                "watchdog=reset".into(),
            ]);
        }
    }
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    fs::copy(from, to)
        .map(|_| ())
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
}

/// Opens a disk image to read and write it in place.
pub fn open_rw(path: &Path) -> Result<fs::File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// Sets this boot's kernel parameters in every bonsai entry of the disk at `path`.
pub fn set_boot_options(path: &Path, params: &str, epoch: u64) -> Result<()> {
    let mut f = open_rw(path)?;
    // A GPT disk has its command lines in its entries; a Pi card has them in U-Boot's
    // environment.
    let set = match disk::efi::find_esp(&mut f) {
        Ok(_) => disk::efi::set_options(&mut f, params, epoch).map(|_| ()),
        Err(_) => disk::rpi::set_extra(&mut f, params, epoch),
    };
    set.with_context(|| format!("{}: setting the boot's kernel parameters", path.display()))?;
    f.sync_all()
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod uboot_tests {
    /// The running system rewrites U-Boot's environment at the size U-Boot reads.
    #[test]
    fn the_guest_writes_the_environment_size_u_boot_reads() {
        assert_eq!(rootfs::backends::UBOOT_ENV_SIZE, disk::uboot::ENV_SIZE);
    }
}
