//! Boards and profiles: strict TOML, parsed raw, then validated into the forms the rest uses.
//!
//! Every error names the file, and where TOML can tell, the line and column
//! (`boards/x.toml:3:1: unknown field ...`), on one line.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use rootfs::system::{GroupSpec, HealthSpec, ServiceSpec, SetupSpec, SystemSpec, UserSpec};
use rootfs::Compression;

/// The init backends a profile may pick.
pub const INITS: &[&str] = &["busybox", "runit", "s6", "bonsai-init"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    pub fn parse(s: &str) -> Option<Arch> {
        match s {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
    /// Debian's name for the architecture.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }
    /// ELF e_machine of the architecture.
    pub fn elf_machine(self) -> u16 {
        match self {
            Arch::X86_64 => 62,
            Arch::Aarch64 => 183,
        }
    }
    /// The Debian package that holds `qemu-system-<arch>`.
    pub fn qemu_package(self) -> &'static str {
        match self {
            Arch::X86_64 => "qemu-system-x86",
            Arch::Aarch64 => "qemu-system-arm",
        }
    }
}

// ---------------------------------------------------------------- raw forms (as in the files)

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawBoard {
    description: String,
    arch: String,
    nix_system: String,
    rust_target: String,
    console: String,
    profile: String,
    #[serde(default)]
    compression: Option<String>,
    kernel: RawKernel,
    #[serde(default)]
    budget: RawBudget,
    qemu: RawQemu,
    #[serde(default)]
    disk: Option<RawDisk>,
    #[serde(default)]
    check: Vec<CheckSpec>,
}

/// `[disk]`: how `cargo xtask image` lays out the board's disk and which firmware boots it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawDisk {
    layout: String,
    #[serde(default)]
    esp: Option<String>,
    #[serde(default)]
    data: Option<String>,
    #[serde(default = "default_tries")]
    tries: u32,
    #[serde(default)]
    firmware_code: Option<String>,
    #[serde(default)]
    firmware_vars: Option<String>,
    #[serde(default)]
    firmware_package: Option<String>,
    #[serde(default)]
    u_boot: Option<String>,
    #[serde(default)]
    qemu_cmdline: String,
    #[serde(default)]
    watchdog: Option<String>,
    #[serde(default)]
    cmdline: String,
}

fn default_tries() -> u32 {
    3
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawKernel {
    base: Option<String>,
    #[serde(default)]
    fragments: Vec<String>,
    package: Option<String>,
    #[serde(default)]
    cmdline: String,
    /// Device tree the kernel package installs under `dtbs/`, passed to QEMU with `-dtb`.
    dtb: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawBudget {
    kernel: Option<String>,
    initramfs: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawQemu {
    binary: String,
    machine: String,
    cpu: Option<String>,
    memory: String,
    #[serde(default = "one")]
    smp: u32,
    net_device: Option<String>,
    #[serde(default)]
    extra_args: Vec<String>,
    #[serde(default = "default_timeout")]
    boot_timeout: u64,
    #[serde(default)]
    known_good: Vec<String>,
}

fn one() -> u32 {
    1
}
fn default_timeout() -> u64 {
    60
}

/// One check the guest runs in `boot --check`; its output is judged on the host.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CheckSpec {
    pub name: String,
    /// A shell command (busybox sh) run in the guest.
    pub run: String,
    /// The whole output, trimmed, must equal this.
    pub expect: Option<String>,
    /// The output must contain this.
    pub contains: Option<String>,
    /// The expected exit status (default 0).
    #[serde(default)]
    pub exit: i32,
    /// A host-side judge of the raw output (`xtask::judge`), such as `backoff crasher`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawProfile {
    description: String,
    #[serde(default)]
    inherit: Vec<String>,
    #[serde(default)]
    packages: Vec<String>,
    init: Option<String>,
    #[serde(default)]
    check: Vec<CheckSpec>,
    #[serde(default)]
    services: BTreeMap<String, ServiceSpec>,
    #[serde(default)]
    setup: Option<SetupSpec>,
    #[serde(default)]
    users: BTreeMap<String, UserSpec>,
    #[serde(default)]
    groups: BTreeMap<String, GroupSpec>,
    /// What a trial boot from a disk slot must pass before it is blessed.
    health: Option<HealthSpec>,
    /// Lines the console must show after the checks, in this order, while the system shuts down.
    #[serde(default)]
    shutdown_expect: Vec<String>,
    /// Lines the console must show at some point (for example a service's prefixed output).
    #[serde(default)]
    console_expect: Vec<String>,
    /// Public keys for root's authorized_keys: "auto" (bonsai's cached test key) or a path.
    authorized_keys: Option<String>,
    /// What goes into the image: keep globs, prune classes, drops, strip (rootfs::Policy).
    #[serde(default)]
    image: Option<rootfs::Policy>,
    /// A development image: accounts may have empty passwords (inherited; default false).
    development: Option<bool>,
    /// Files supplied at build time from outside the repository (host keys and the like).
    #[serde(default)]
    secrets: Vec<SecretSpec>,
    /// The team's own packages: name -> a `.nix` file (relative to the repository root) that is
    /// called with `callPackage` from the package set in use.
    #[serde(default)]
    local_packages: BTreeMap<String, String>,
    /// Nixpkgs overlays: `.nix` files (relative to the repository root), each holding
    /// `final: prev: { ... }`, applied to the package set in use, parents' first.
    #[serde(default)]
    overlays: Vec<String>,
    /// Arguments for a package's `.override`: attribute -> argument -> value.
    #[serde(default)]
    overrides: BTreeMap<String, toml::Table>,
    /// What QEMU gives the guest when the profile's checks run (a child's keys win).
    test_machine: Option<TestMachine>,
    /// Loadable modules the image carries (merged along the chain, parents' first).
    kernel: Option<rootfs::system::KernelSpec>,
    /// Firmware files the image carries.
    firmware: Option<FirmwareSpec>,
    /// Device rules (parents' first, then the profile's own, in order).
    #[serde(default)]
    device_rules: Vec<rootfs::devices::DeviceRuleSpec>,
}

/// `[firmware]`: files under `lib/firmware/` of the profile's packages, copied to the image's
/// `/lib/firmware/` (besides those the kept modules ask for, which come when a package has them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FirmwareSpec {
    #[serde(default)]
    pub files: Vec<String>,
}

/// `[test-machine]`: the hardware a profile's checks need under QEMU (`boot --check`,
/// `conformance`): a blank data disk, boots per backend, extra devices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TestMachine {
    /// A blank raw disk (`"32 MiB"`), the first virtio drive (`/dev/vda`): made empty before a
    /// backend's first boot and kept across its boots, so that what one boot writes the next
    /// one reads.
    #[serde(default)]
    pub disk: Option<String>,
    /// Conformance boots per backend, at least (`--repeat` can ask for more).
    #[serde(default)]
    pub boots: Option<u32>,
    /// Extra QEMU arguments (devices), after the board's own.
    #[serde(default)]
    pub qemu_args: Vec<String>,
    /// `false`: QEMU's user network without `restrict=on`, whose DHCP replies then carry a
    /// router and a DNS server (restricted, libslirp leaves both out).
    #[serde(default)]
    pub net_restrict: Option<bool>,
    /// PCIe root ports `hp1`…`hpN` for QMP `device_add`, and a QMP socket through which the
    /// host carries out the checks' requests (`/etc/bonsai/host qmp …`).
    #[serde(default)]
    pub hotplug_slots: Option<u32>,
    /// A blank raw disk (`"16 MiB"`) that QEMU holds unplugged as drive `hpdisk`, for a check
    /// to plug in (`device_add` of a `virtio-blk-pci` with `drive: hpdisk`).
    #[serde(default)]
    pub hotplug_disk: Option<String>,
}

impl TestMachine {
    fn merge(&mut self, child: &TestMachine) {
        if child.hotplug_slots.is_some() {
            self.hotplug_slots = child.hotplug_slots;
        }
        if child.hotplug_disk.is_some() {
            self.hotplug_disk = child.hotplug_disk.clone();
        }
        if child.disk.is_some() {
            self.disk = child.disk.clone();
        }
        if child.boots.is_some() {
            self.boots = child.boots;
        }
        self.qemu_args.extend(child.qemu_args.iter().cloned());
        if child.net_restrict.is_some() {
            self.net_restrict = child.net_restrict;
        }
    }

    /// The disk's size in bytes; errors name the key.
    pub fn disk_bytes(&self, profile: &str) -> Result<Option<u64>> {
        let Some(d) = &self.disk else { return Ok(None) };
        match parse_size(d) {
            Some(n) if n >= 1 << 20 && n % 512 == 0 => Ok(Some(n)),
            _ => bail!("profiles/{profile}.toml: key 'test-machine.disk': '{d}' is not a size of at least 1 MiB (e.g. \"32 MiB\")"),
        }
    }

    /// The hotplug disk's size in bytes; errors name the key.
    pub fn hotplug_disk_bytes(&self, profile: &str) -> Result<Option<u64>> {
        let Some(d) = &self.hotplug_disk else {
            return Ok(None);
        };
        if self.hotplug_slots.unwrap_or(0) == 0 {
            bail!("profiles/{profile}.toml: key 'test-machine.hotplug-disk' needs 'test-machine.hotplug-slots' (a root port to plug it into)");
        }
        match parse_size(d) {
            Some(n) if n >= 1 << 20 && n % 512 == 0 => Ok(Some(n)),
            _ => bail!("profiles/{profile}.toml: key 'test-machine.hotplug-disk': '{d}' is not a size of at least 1 MiB (e.g. \"16 MiB\")"),
        }
    }
}

/// One argument of a package's `.override`, as the profile chain sets it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OverrideArg {
    /// The TOML value as JSON (booleans, strings, numbers, lists and tables), which Nix reads
    /// with `builtins.fromJSON`.
    pub value: serde_json::Value,
    /// The profile that sets it (the child wins).
    pub profile: String,
}

/// A `.nix` file a profile names (a `[local-packages]` entry or an overlay), validated: it
/// exists inside the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProfileNixFile {
    /// The `.nix` file, relative to the repository root (`/`-separated, no `..`).
    pub path: String,
    /// The profile that declares it (the file is `profiles/<origin>.toml`).
    pub origin: String,
}

/// `[[secrets]]`: a file the build copies into the image from outside the repository.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SecretSpec {
    /// Where it goes in the image (absolute).
    pub path: String,
    /// Where it is on the build host: absolute or `~/...`, outside the repository.
    pub source: String,
    /// Octal mode in the image (default 0600).
    #[serde(default = "default_secret_mode")]
    pub mode: String,
}

fn default_secret_mode() -> String {
    "0600".into()
}

/// A secret with the profile that declares it and its index there (`secrets[N]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeclaredSecret {
    pub spec: SecretSpec,
    /// The profile's name (the file is `profiles/<origin>.toml`).
    pub origin: String,
    pub index: usize,
}

// ---------------------------------------------------------------- validated forms

#[derive(Debug, Clone)]
pub struct Board {
    pub name: String,
    pub file: PathBuf,
    pub description: String,
    pub arch: Arch,
    pub nix_system: String,
    pub rust_target: String,
    pub console: String,
    pub profile: String,
    pub compression: Compression,
    pub kernel: KernelSpec,
    pub budget: Budget,
    pub qemu: QemuConfig,
    /// `[disk]`; `None` for a board without a disk image.
    pub disk: Option<DiskConfig>,
    pub checks: Vec<CheckSpec>,
}

/// The disk layouts `cargo xtask image` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskLayout {
    /// GPT: an EFI system partition with systemd-boot, the slots as boot-counted entries,
    /// and a data partition; booted by UEFI firmware.
    Efi,
    /// MBR: a FAT boot partition with the Raspberry Pi firmware, U-Boot and its environment
    /// (the A/B state), a boot script and the slots, and a data partition.
    Rpi,
}

/// What boots a board's disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskFirmware {
    /// UEFI firmware QEMU runs: its code (read-only), its variable store (copied per disk),
    /// and the Debian package that has them.
    Uefi {
        code: PathBuf,
        vars: Option<PathBuf>,
        package: String,
    },
    /// Debian's U-Boot build for the board (`u-boot-rpi`'s `usr/lib/u-boot/<build>/u-boot.bin`),
    /// which QEMU loads with `-kernel` since it cannot run the Pi's own firmware.
    UBoot { build: String },
}

/// A board's `[disk]` table.
#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub layout: DiskLayout,
    /// Sizes of the EFI system partition (both slots live in it) and the data partition.
    pub esp_mib: u64,
    pub data_mib: u64,
    /// Boot tries of a trial slot before the boot loader gives up on it.
    pub tries: u32,
    pub firmware: DiskFirmware,
    /// The QEMU watchdog device a boot from the disk gets (`-device <it>`, reset on expiry);
    /// its Linux driver must be in the kernel.
    pub watchdog: Option<String>,
    /// Kernel parameters the slots' entries add to the board's (e.g. the watchdog's timeout).
    pub cmdline: String,
    /// Kernel parameters a boot of the disk in QEMU adds (what QEMU cannot emulate).
    pub qemu_cmdline: String,
}

#[derive(Debug, Clone)]
pub enum KernelSource {
    /// Built by Nix from `base` plus fragments under kernel-configs/.
    Build {
        base: String,
        fragments: Vec<String>,
    },
    /// A prebuilt kernel package (attribute path).
    Package(String),
}

#[derive(Debug, Clone)]
pub struct KernelSpec {
    pub source: KernelSource,
    pub cmdline: String,
    /// A device tree from the kernel package's `dtbs/` (e.g. `broadcom/bcm2837-rpi-3-b.dtb`).
    pub dtb: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct Budget {
    pub kernel: Option<u64>,
    pub initramfs: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub binary: String,
    pub machine: String,
    pub cpu: Option<String>,
    pub memory: String,
    pub smp: u32,
    pub net_device: Option<String>,
    pub extra_args: Vec<String>,
    pub boot_timeout: u64,
    pub known_good: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    pub file: PathBuf,
    pub description: String,
    /// Own and inherited packages, parents first, without duplicates.
    pub packages: Vec<String>,
    pub init: String,
    pub checks: Vec<CheckSpec>,
    /// Profiles this one inherits, directly or not, parents first.
    pub ancestors: Vec<String>,
    /// Services, setup, users and groups merged from the parents (the child wins by name;
    /// setup lists are appended, the hostname overridden).
    pub system: SystemSpec,
    pub shutdown_expect: Vec<String>,
    pub console_expect: Vec<String>,
    pub test_machine: TestMachine,
    /// `[firmware] files`, merged along the chain.
    pub firmware: Vec<String>,
    pub authorized_keys: Option<String>,
    /// The image policy merged along the inheritance chain (parents first).
    pub policy: rootfs::Policy,
    /// `development = true`: empty passwords are allowed (the child's value wins).
    pub development: bool,
    /// Secrets of the profile and its parents, parents first.
    pub secrets: Vec<DeclaredSecret>,
    /// For each user in `system.users`, the profile that defines it last (whose table is used).
    pub user_origin: BTreeMap<String, String>,
    /// `[local-packages]` of the profile and its parents (the child wins by name).
    pub local_packages: BTreeMap<String, ProfileNixFile>,
    /// `overlays` of the profile and its parents, parents' first, each file once.
    pub overlays: Vec<ProfileNixFile>,
    /// `[overrides.<attribute>]` of the profile and its parents: attribute -> argument ->
    /// value; a child changes an argument its parent set.
    pub overrides: BTreeMap<String, BTreeMap<String, OverrideArg>>,
}

// ---------------------------------------------------------------- loading

/// Reads and parses a TOML file strictly, with one-line errors naming file:line:column.
fn read_toml<T: serde::de::DeserializeOwned>(file: &Path, shown: &str) -> Result<T> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {shown}"))?;
    toml::from_str(&text).map_err(|e| {
        let msg = e.message().trim().replace('\n', " ");
        match e.span() {
            Some(span) => {
                let (line, col) = line_col(&text, span.start);
                anyhow::anyhow!("{shown}:{line}:{col}: {msg}")
            }
            None => anyhow::anyhow!("{shown}: {msg}"),
        }
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, col)
}

/// Lists the names of `*.toml` files in a folder, sorted.
pub fn list_names(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for e in entries {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "toml") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                names.push(stem.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Parses a size such as `2 MiB`, `512KiB`, `16M` or `1048576` into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

pub struct Config {
    pub root: PathBuf,
}

impl Config {
    pub fn new(root: &Path) -> Config {
        Config {
            root: root.to_path_buf(),
        }
    }

    pub fn boards_dir(&self) -> PathBuf {
        self.root.join("boards")
    }
    pub fn profiles_dir(&self) -> PathBuf {
        self.root.join("profiles")
    }

    pub fn board_names(&self) -> Result<Vec<String>> {
        list_names(&self.boards_dir())
    }
    pub fn profile_names(&self) -> Result<Vec<String>> {
        list_names(&self.profiles_dir())
    }

    pub fn load_board(&self, name: &str) -> Result<Board> {
        let file = self.boards_dir().join(format!("{name}.toml"));
        let shown = format!("boards/{name}.toml");
        if !valid_name(name) || !file.is_file() {
            let known = self.board_names().unwrap_or_default().join(", ");
            bail!("unknown board '{name}' (no {shown}); known boards: {known}");
        }
        let raw: RawBoard = read_toml(&file, &shown)?;
        let key_err = |key: &str, msg: String| anyhow::anyhow!("{shown}: key '{key}': {msg}");

        let arch = Arch::parse(&raw.arch).ok_or_else(|| {
            key_err(
                "arch",
                format!(
                    "unknown architecture '{}' (expected x86_64 or aarch64)",
                    raw.arch
                ),
            )
        })?;
        let expected_system = format!("{}-linux", arch.name());
        if raw.nix_system != expected_system {
            return Err(key_err(
                "nix-system",
                format!(
                    "'{}' does not match arch {} (expected {expected_system})",
                    raw.nix_system,
                    arch.name()
                ),
            ));
        }
        let compression = match raw.compression.as_deref() {
            None => Compression::Gzip,
            Some(c) => c
                .parse::<Compression>()
                .map_err(|e| key_err("compression", e.to_string()))?,
        };
        let source = match (raw.kernel.package, raw.kernel.base) {
            (Some(_), Some(_)) => {
                return Err(key_err(
                    "kernel.package",
                    "give either a prebuilt package or base + fragments, not both".into(),
                ))
            }
            (Some(pkg), None) => {
                if !raw.kernel.fragments.is_empty() {
                    return Err(key_err(
                        "kernel.fragments",
                        "fragments need kernel.base, not kernel.package".into(),
                    ));
                }
                KernelSource::Package(pkg)
            }
            (None, base) => {
                let base = base.unwrap_or_else(|| "tinyconfig".into());
                if !["tinyconfig", "defconfig", "allnoconfig"].contains(&base.as_str()) {
                    return Err(key_err(
                        "kernel.base",
                        format!("unknown base config '{base}' (expected tinyconfig, defconfig or allnoconfig)"),
                    ));
                }
                for f in &raw.kernel.fragments {
                    if !valid_file_name(f) || !self.root.join("kernel-configs").join(f).is_file() {
                        return Err(key_err(
                            "kernel.fragments",
                            format!("no fragment kernel-configs/{f}"),
                        ));
                    }
                }
                KernelSource::Build {
                    base,
                    fragments: raw.kernel.fragments,
                }
            }
        };
        if let Some(d) = &raw.kernel.dtb {
            let ok =
                d.ends_with(".dtb") && !d.starts_with('/') && d.split('/').all(valid_file_name);
            if !ok {
                return Err(key_err(
                    "kernel.dtb",
                    format!("'{d}' is not a relative path to a .dtb under the kernel's dtbs/ (like broadcom/bcm2837-rpi-3-b.dtb)"),
                ));
            }
        }
        let budget = Budget {
            kernel: parse_budget(&raw.budget.kernel, "budget.kernel", &shown)?,
            initramfs: parse_budget(&raw.budget.initramfs, "budget.initramfs", &shown)?,
        };
        if raw.qemu.boot_timeout == 0 {
            return Err(key_err(
                "qemu.boot-timeout",
                "must be at least 1 second".into(),
            ));
        }
        validate_checks(&raw.check, &shown)?;
        if !valid_name(&raw.profile)
            || !self
                .profiles_dir()
                .join(format!("{}.toml", raw.profile))
                .is_file()
        {
            let known = self.profile_names().unwrap_or_default().join(", ");
            return Err(key_err(
                "profile",
                format!("unknown profile '{}'; known profiles: {known}", raw.profile),
            ));
        }
        Ok(Board {
            name: name.to_string(),
            file,
            description: raw.description,
            arch,
            nix_system: raw.nix_system,
            rust_target: raw.rust_target,
            console: raw.console,
            profile: raw.profile,
            compression,
            kernel: KernelSpec {
                source,
                cmdline: raw.kernel.cmdline,
                dtb: raw.kernel.dtb,
            },
            budget,
            qemu: QemuConfig {
                binary: raw.qemu.binary,
                machine: raw.qemu.machine,
                cpu: raw.qemu.cpu,
                memory: raw.qemu.memory,
                smp: raw.qemu.smp,
                net_device: raw.qemu.net_device,
                extra_args: raw.qemu.extra_args,
                boot_timeout: raw.qemu.boot_timeout,
                known_good: raw.qemu.known_good,
            },
            disk: raw.disk.map(|d| disk_config(d, &shown)).transpose()?,
            checks: raw.check,
        })
    }

    /// Loads a profile with everything it inherits. Cycles and diamonds are errors.
    pub fn load_profile(&self, name: &str) -> Result<Profile> {
        let mut raws = BTreeMap::new();
        let mut stack = Vec::new();
        self.load_raw_profile(name, &mut stack, &mut raws)?;
        // Diamond check: every ancestor must be reachable along exactly one path.
        let mut seen: BTreeMap<String, String> = BTreeMap::new();
        let mut order = Vec::new();
        self.linearize(name, name, &raws, &mut seen, &mut order)?;

        let own = &raws[name];
        let mut packages: Vec<String> = Vec::new();
        let mut checks = Vec::new();
        let mut init = None;
        let mut system = SystemSpec::default();
        let mut shutdown_expect = Vec::new();
        let mut console_expect = Vec::new();
        let mut test_machine = TestMachine::default();
        let mut firmware: Vec<String> = Vec::new();
        let mut authorized_keys = None;
        let mut policy = rootfs::Policy::default();
        let mut development = false;
        let mut secrets = Vec::new();
        let mut user_origin = BTreeMap::new();
        let mut local_packages = BTreeMap::new();
        let mut overlays: Vec<ProfileNixFile> = Vec::new();
        let mut overrides: BTreeMap<String, BTreeMap<String, OverrideArg>> = BTreeMap::new();
        for p in &order {
            let raw = &raws[p];
            for (attr, args) in &raw.overrides {
                let into = overrides.entry(attr.clone()).or_default();
                for (arg, value) in args {
                    let key = format!("profiles/{p}.toml: key 'overrides.{attr}.{arg}'");
                    into.insert(
                        arg.clone(),
                        OverrideArg {
                            value: override_value(value, &key)?,
                            profile: p.clone(),
                        },
                    );
                }
            }
            for o in &raw.overlays {
                if !overlays.iter().any(|x| &x.path == o) {
                    overlays.push(ProfileNixFile {
                        path: o.clone(),
                        origin: p.clone(),
                    });
                }
            }
            for (k, v) in &raw.local_packages {
                local_packages.insert(
                    k.clone(),
                    ProfileNixFile {
                        path: v.clone(),
                        origin: p.clone(),
                    },
                );
            }
            for (k, v) in &raw.services {
                system.services.insert(k.clone(), v.clone());
            }
            for (k, v) in &raw.users {
                system.users.insert(k.clone(), v.clone());
                user_origin.insert(k.clone(), p.clone());
            }
            if let Some(d) = raw.development {
                development = d;
            }
            for (index, spec) in raw.secrets.iter().enumerate() {
                secrets.push(DeclaredSecret {
                    spec: spec.clone(),
                    origin: p.clone(),
                    index,
                });
            }
            for (k, v) in &raw.groups {
                system.groups.insert(k.clone(), v.clone());
            }
            system.device_rules.extend(raw.device_rules.iter().cloned());
            if let Some(h) = &raw.health {
                if h.trial_deadline_ms.is_some() {
                    system.health.trial_deadline_ms = h.trial_deadline_ms;
                }
                for (k, v) in &h.checks {
                    system.health.checks.insert(k.clone(), v.clone());
                }
            }
            if let Some(setup) = &raw.setup {
                if setup.hostname.is_some() {
                    system.setup.hostname = setup.hostname.clone();
                }
                system.setup.dirs.extend(setup.dirs.iter().cloned());
                system.setup.files.extend(setup.files.iter().cloned());
                system.setup.symlinks.extend(setup.symlinks.iter().cloned());
                system
                    .setup
                    .interfaces
                    .extend(setup.interfaces.iter().cloned());
                system.setup.mounts.extend(setup.mounts.iter().cloned());
            }
            for f in raw.firmware.iter().flat_map(|f| &f.files) {
                if !firmware.contains(f) {
                    firmware.push(f.clone());
                }
            }
            if let Some(k) = &raw.kernel {
                for m in &k.modules {
                    if !system.kernel.modules.contains(m) {
                        system.kernel.modules.push(m.clone());
                    }
                }
                system.kernel.load.extend(k.load.iter().cloned());
            }
            shutdown_expect.extend(raw.shutdown_expect.iter().cloned());
            console_expect.extend(raw.console_expect.iter().cloned());
            if let Some(t) = &raw.test_machine {
                test_machine.merge(t);
                test_machine.disk_bytes(p)?;
            }
            if raw.authorized_keys.is_some() {
                authorized_keys = raw.authorized_keys.clone();
            }
            if let Some(img) = &raw.image {
                img.validate()
                    .map_err(|e| anyhow::anyhow!("profiles/{p}.toml: [image]: {e}"))?;
                policy = rootfs::Policy::merge(&policy, img);
            }
            for pkg in &raw.packages {
                if !packages.contains(pkg) {
                    packages.push(pkg.clone());
                }
            }
            checks.extend(raw.check.iter().cloned());
            if raw.init.is_some() {
                init = raw.init.clone();
            }
        }
        let shown = format!("profiles/{name}.toml");
        let init = init.unwrap_or_else(|| "busybox".into());
        if !INITS.contains(&init.as_str()) {
            bail!(
                "{shown}: key 'init': unknown init '{init}' (expected one of {})",
                INITS.join(", ")
            );
        }
        if packages.is_empty() {
            bail!("{shown}: key 'packages': the profile and its parents name no packages");
        }
        for c in &checks {
            if let Some(j) = &c.judge {
                crate::judge::Judge::parse(j, &system).map_err(|e| {
                    anyhow::anyhow!("{shown}: check '{}': key 'judge': {e}", c.name)
                })?;
            }
        }
        Ok(Profile {
            name: name.to_string(),
            file: self.profiles_dir().join(format!("{name}.toml")),
            description: own.description.clone(),
            packages,
            init,
            checks,
            ancestors: order[..order.len() - 1].to_vec(),
            system,
            shutdown_expect,
            console_expect,
            test_machine,
            firmware,
            authorized_keys,
            policy,
            development,
            secrets,
            user_origin,
            local_packages,
            overlays,
            overrides,
        })
    }

    fn load_raw_profile(
        &self,
        name: &str,
        stack: &mut Vec<String>,
        raws: &mut BTreeMap<String, RawProfile>,
    ) -> Result<()> {
        if let Some(pos) = stack.iter().position(|n| n == name) {
            let mut chain = stack[pos..].join(" -> ");
            let _ = write!(chain, " -> {name}");
            bail!(
                "profiles/{}.toml: key 'inherit': inheritance cycle {chain}",
                stack.last().unwrap()
            );
        }
        if raws.contains_key(name) {
            return Ok(());
        }
        let file = self.profiles_dir().join(format!("{name}.toml"));
        let shown = format!("profiles/{name}.toml");
        if !valid_name(name) || !file.is_file() {
            let known = self.profile_names().unwrap_or_default().join(", ");
            match stack.last() {
                Some(child) => bail!("profiles/{child}.toml: key 'inherit': unknown profile '{name}'; known profiles: {known}"),
                None => bail!("unknown profile '{name}' (no {shown}); known profiles: {known}"),
            }
        }
        let raw: RawProfile = read_toml(&file, &shown)?;
        validate_checks(&raw.check, &shown)?;
        for (name, path) in &raw.local_packages {
            let key = format!("{shown}: key 'local-packages.{name}'");
            if name.contains('.') || !valid_attr_path(name) {
                bail!("{key}: '{name}' is not a plain Nix attribute name");
            }
            self.validate_nix_file(&key, path)?;
        }
        for path in &raw.overlays {
            self.validate_nix_file(&format!("{shown}: key 'overlays'"), path)?;
        }
        for (attr, args) in &raw.overrides {
            let key = format!("{shown}: key 'overrides.{attr}'");
            if attr.contains('.') || !valid_attr_path(attr) {
                bail!("{key}: '{attr}' is not a plain Nix attribute name (overrides apply to top-level attributes of the package set)");
            }
            if args.is_empty() {
                bail!("{key}: the table sets no argument");
            }
            for arg in args.keys() {
                if arg.contains('.') || !valid_attr_path(arg) {
                    bail!("{key}: '{arg}' is not a Nix argument name");
                }
            }
        }
        for p in &raw.packages {
            if !valid_attr_path(p) {
                bail!("{shown}: key 'packages': '{p}' is not a Nix attribute path");
            }
        }
        let parents = raw.inherit.clone();
        raws.insert(name.to_string(), raw);
        stack.push(name.to_string());
        for parent in parents {
            self.load_raw_profile(&parent, stack, raws)?;
        }
        stack.pop();
        Ok(())
    }

    /// A `.nix` file a profile names under `key` (a local package, an overlay): it exists
    /// inside the repository and is given relative to its root.
    fn validate_nix_file(&self, key: &str, path: &str) -> Result<()> {
        let rel = Path::new(path);
        if path.is_empty()
            || rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            bail!("{key}: '{path}' is not a path inside the repository (give it relative to the repository root, without '..')");
        }
        let file = self.root.join(rel);
        if !file.is_file() {
            bail!("{key}: {path} does not exist");
        }
        // A link may still lead out of the repository.
        let inside = match (file.canonicalize(), self.root.canonicalize()) {
            (Ok(f), Ok(r)) => f.starts_with(r),
            _ => false,
        };
        if !inside {
            bail!("{key}: {path} leads outside the repository");
        }
        if rel.extension().is_none_or(|x| x != "nix") {
            bail!("{key}: {path} is not a .nix file");
        }
        Ok(())
    }

    fn linearize(
        &self,
        top: &str,
        name: &str,
        raws: &BTreeMap<String, RawProfile>,
        seen: &mut BTreeMap<String, String>,
        order: &mut Vec<String>,
    ) -> Result<()> {
        for parent in &raws[name].inherit {
            if let Some(first) = seen.get(parent) {
                bail!(
                    "profiles/{top}.toml: key 'inherit': profile '{parent}' is inherited twice (through '{first}' and '{name}'); diamonds are not allowed"
                );
            }
            seen.insert(parent.clone(), name.to_string());
            self.linearize(top, parent, raws, seen, order)?;
        }
        order.push(name.to_string());
        Ok(())
    }
}

fn disk_config(raw: RawDisk, shown: &str) -> Result<DiskConfig> {
    let layout = match raw.layout.as_str() {
        "efi" => DiskLayout::Efi,
        "rpi" => DiskLayout::Rpi,
        other => {
            bail!("{shown}: key 'disk.layout': unknown layout '{other}' (expected efi or rpi)")
        }
    };
    let mib = |v: &Option<String>, key: &str, default: u64, min: u64| -> Result<u64> {
        let bytes = parse_budget(v, key, shown)?.unwrap_or(default << 20);
        if bytes % (1 << 20) != 0 || bytes >> 20 < min {
            bail!("{shown}: key '{key}': must be a whole number of MiB, at least {min} MiB");
        }
        Ok(bytes >> 20)
    };
    if raw.tries == 0 {
        bail!("{shown}: key 'disk.tries': a trial needs at least 1 try");
    }
    for (key, p) in [
        ("disk.firmware-code", raw.firmware_code.as_ref()),
        ("disk.firmware-vars", raw.firmware_vars.as_ref()),
    ] {
        if p.is_some_and(|p| !p.starts_with('/')) {
            bail!("{shown}: key '{key}': give the firmware file's absolute path on the host");
        }
    }
    let firmware = match layout {
        DiskLayout::Efi => {
            let (Some(code), Some(package)) = (raw.firmware_code, raw.firmware_package) else {
                bail!("{shown}: keys 'disk.firmware-code' and 'disk.firmware-package': layout efi needs the UEFI firmware QEMU runs and its Debian package");
            };
            DiskFirmware::Uefi {
                code: PathBuf::from(code),
                vars: raw.firmware_vars.map(PathBuf::from),
                package,
            }
        }
        DiskLayout::Rpi => {
            let Some(build) = raw.u_boot else {
                bail!("{shown}: key 'disk.u-boot': layout rpi needs the U-Boot build of Debian's u-boot-rpi (like rpi_3)");
            };
            if raw.tries > 9 {
                bail!(
                    "{shown}: key 'disk.tries': U-Boot counts tries from 1 to 9, not {}",
                    raw.tries
                );
            }
            DiskFirmware::UBoot { build }
        }
    };
    Ok(DiskConfig {
        layout,
        esp_mib: mib(&raw.esp, "disk.esp", 64, 34)?,
        data_mib: mib(&raw.data, "disk.data", 32, 1)?,
        tries: raw.tries,
        firmware,
        watchdog: raw.watchdog,
        cmdline: raw.cmdline.trim().to_string(),
        qemu_cmdline: raw.qemu_cmdline.trim().to_string(),
    })
}

fn parse_budget(v: &Option<String>, key: &str, shown: &str) -> Result<Option<u64>> {
    match v {
        None => Ok(None),
        Some(s) => parse_size(s).map(Some).ok_or_else(|| {
            anyhow::anyhow!(
                "{shown}: key '{key}': '{s}' is not a size (like 2 MiB, 512 KiB, 1048576)"
            )
        }),
    }
}

fn validate_checks(checks: &[CheckSpec], shown: &str) -> Result<()> {
    for c in checks {
        if c.expect.is_some() && c.contains.is_some() {
            bail!(
                "{shown}: check '{}': give expect or contains, not both",
                c.name
            );
        }
        if c.run.trim().is_empty() {
            bail!("{shown}: check '{}': key 'run' is empty", c.name);
        }
        if c.judge.is_some() && (c.expect.is_some() || c.contains.is_some()) {
            bail!(
                "{shown}: check '{}': give judge or expect/contains, not both",
                c.name
            );
        }
    }
    Ok(())
}

/// A TOML value as the JSON that Nix's `builtins.fromJSON` turns into the same Nix value:
/// booleans, strings, integers, floats, lists and attribute sets. TOML dates have no Nix
/// counterpart and are an error naming `key`.
fn override_value(v: &toml::Value, key: &str) -> Result<serde_json::Value> {
    Ok(match v {
        toml::Value::Boolean(b) => serde_json::Value::Bool(*b),
        toml::Value::String(s) => serde_json::Value::String(s.clone()),
        toml::Value::Integer(i) => serde_json::Value::from(*i),
        toml::Value::Float(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .ok_or_else(|| anyhow::anyhow!("{key}: {f} has no Nix value (give a finite number)"))?,
        toml::Value::Array(a) => serde_json::Value::Array(
            a.iter()
                .enumerate()
                .map(|(i, x)| override_value(x, &format!("{key}[{i}]")))
                .collect::<Result<_>>()?,
        ),
        toml::Value::Table(t) => serde_json::Value::Object(
            t.iter()
                .map(|(k, x)| Ok((k.clone(), override_value(x, &format!("{key}.{k}"))?)))
                .collect::<Result<_>>()?,
        ),
        toml::Value::Datetime(d) => {
            bail!("{key}: the date {d} has no Nix value (give it as a string)")
        }
    })
}

/// Board and profile names: what can be a file name without surprises.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !s.starts_with('-')
}

fn valid_file_name(s: &str) -> bool {
    !s.is_empty() && !s.contains('/') && s != "." && s != ".."
}

fn valid_attr_path(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_'+".contains(c))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, rel: &str, text: &str) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn project() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "kernel-configs/k.config", "CONFIG_X=y\n");
        write(
            d.path(),
            "profiles/base.toml",
            "description = \"b\"\npackages = [\"busybox\"]\n",
        );
        write(
            d.path(),
            "boards/b.toml",
            r#"description = "d"
arch = "x86_64"
nix-system = "x86_64-linux"
rust-target = "x86_64-unknown-linux-musl"
console = "ttyS0"
profile = "base"
[kernel]
fragments = ["k.config"]
[qemu]
binary = "qemu-system-x86_64"
machine = "q35"
memory = "256M"
"#,
        );
        d
    }

    #[test]
    fn every_shipped_board_and_profile_validates() {
        let root = crate::project_root();
        let cfg = Config::new(&root);
        let boards = cfg.board_names().unwrap();
        assert!(boards.contains(&"qemu-x86_64".to_string()));
        for b in boards {
            let board = cfg.load_board(&b).unwrap_or_else(|e| panic!("{e:#}"));
            cfg.load_profile(&board.profile)
                .unwrap_or_else(|e| panic!("{e:#}"));
        }
        for p in cfg.profile_names().unwrap() {
            cfg.load_profile(&p).unwrap_or_else(|e| panic!("{e:#}"));
        }
    }

    #[test]
    fn test_machine_merges_along_the_chain_and_checks_its_disk() {
        let d = project();
        write(
            d.path(),
            "profiles/dev.toml",
            "description = \"d\"\ninherit = [\"base\"]\n[test-machine]\ndisk = \"32 MiB\"\nboots = 2\nqemu-args = [\"-device\", \"x\"]\n",
        );
        write(
            d.path(),
            "profiles/child.toml",
            "description = \"c\"\ninherit = [\"dev\"]\n[test-machine]\nqemu-args = [\"-device\", \"y\"]\nnet-restrict = false\n",
        );
        let t = Config::new(d.path())
            .load_profile("child")
            .unwrap()
            .test_machine;
        assert_eq!(t.disk.as_deref(), Some("32 MiB"));
        assert_eq!(t.disk_bytes("child").unwrap(), Some(32 << 20));
        assert_eq!(t.boots, Some(2));
        assert_eq!(t.qemu_args, ["-device", "x", "-device", "y"]);
        assert_eq!(t.net_restrict, Some(false));
        write(
            d.path(),
            "profiles/bad.toml",
            "description = \"b\"\n[test-machine]\ndisk = \"big\"\n",
        );
        let e = Config::new(d.path()).load_profile("bad").unwrap_err();
        assert_eq!(
            format!("{e:#}"),
            "profiles/bad.toml: key 'test-machine.disk': 'big' is not a size of at least 1 MiB (e.g. \"32 MiB\")"
        );
    }

    #[test]
    fn minimal_board_loads_with_defaults() {
        let d = project();
        let b = Config::new(d.path()).load_board("b").unwrap();
        assert_eq!(b.compression, Compression::Gzip);
        assert_eq!(b.qemu.boot_timeout, 60);
        assert!(
            matches!(b.kernel.source, KernelSource::Build { ref base, .. } if base == "tinyconfig")
        );
    }

    #[test]
    fn unknown_board_lists_known_ones() {
        let d = project();
        let e = Config::new(d.path())
            .load_board("nope")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "unknown board 'nope' (no boards/nope.toml); known boards: b"
        );
    }

    #[test]
    fn malformed_toml_names_file_line_and_column() {
        let d = project();
        write(
            d.path(),
            "boards/bad.toml",
            "arch = \"x86_64\"\nthis is not toml\n",
        );
        let e = Config::new(d.path())
            .load_board("bad")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("boards/bad.toml:2:"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let d = project();
        let text = std::fs::read_to_string(d.path().join("boards/b.toml")).unwrap();
        write(
            d.path(),
            "boards/u.toml",
            &text.replace("console =", "colour = \"red\"\nconsole ="),
        );
        let e = Config::new(d.path())
            .load_board("u")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("boards/u.toml:5:1: unknown field `colour`"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_is_named() {
        let d = project();
        let text = std::fs::read_to_string(d.path().join("boards/b.toml")).unwrap();
        write(
            d.path(),
            "boards/t.toml",
            &text.replace("memory = \"256M\"", "memory = \"256M\"\nsmp = \"two\""),
        );
        let e = Config::new(d.path())
            .load_board("t")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("boards/t.toml:13:7: invalid type: string \"two\", expected u32"),
            "{e}"
        );
    }

    #[test]
    fn dtb_is_a_relative_dtb_path() {
        let d = project();
        let text = std::fs::read_to_string(d.path().join("boards/b.toml")).unwrap();
        let with = |dtb: &str| text.replace("[qemu]", &format!("dtb = \"{dtb}\"\n[qemu]"));
        write(
            d.path(),
            "boards/g.toml",
            &with("broadcom/bcm2837-rpi-3-b.dtb"),
        );
        let b = Config::new(d.path()).load_board("g").unwrap();
        assert_eq!(
            b.kernel.dtb.as_deref(),
            Some("broadcom/bcm2837-rpi-3-b.dtb")
        );
        write(d.path(), "boards/h.toml", &with("../x.dtb"));
        let e = Config::new(d.path())
            .load_board("h")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("boards/h.toml: key 'kernel.dtb': '../x.dtb'"),
            "{e}"
        );
    }

    #[test]
    fn missing_fragment_is_named() {
        let d = project();
        let text = std::fs::read_to_string(d.path().join("boards/b.toml")).unwrap();
        write(
            d.path(),
            "boards/f.toml",
            &text.replace("k.config", "nope.config"),
        );
        let e = Config::new(d.path())
            .load_board("f")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "boards/f.toml: key 'kernel.fragments': no fragment kernel-configs/nope.config"
        );
    }

    #[test]
    fn overrides_merge_per_argument_and_the_child_wins() {
        let d = project();
        write(
            d.path(),
            "profiles/mid.toml",
            "description = \"m\"\ninherit = [\"base\"]\n[overrides.busybox]\nenableStatic = true\nextraConfig = \"CONFIG_VI n\"\n[overrides.dropbear.zlib]\nx = [1, 2.5, \"s\"]\n",
        );
        write(
            d.path(),
            "profiles/top.toml",
            "description = \"t\"\ninherit = [\"mid\"]\n[overrides.busybox]\nenableStatic = false\n",
        );
        let p = Config::new(d.path()).load_profile("top").unwrap();
        let bb = &p.overrides["busybox"];
        assert_eq!(bb["enableStatic"].value, serde_json::json!(false));
        assert_eq!(bb["enableStatic"].profile, "top");
        assert_eq!(bb["extraConfig"].value, serde_json::json!("CONFIG_VI n"));
        assert_eq!(bb["extraConfig"].profile, "mid");
        assert_eq!(
            p.overrides["dropbear"]["zlib"].value,
            serde_json::json!({ "x": [1, 2.5, "s"] })
        );
    }

    #[test]
    fn bad_overrides_name_the_key() {
        let d = project();
        let cases = [
            ("[overrides.\"pkgsStatic.busybox\"]\nenableStatic = true\n", "profiles/o.toml: key 'overrides.pkgsStatic.busybox': 'pkgsStatic.busybox' is not a plain Nix attribute name (overrides apply to top-level attributes of the package set)"),
            ("[overrides.busybox]\n", "profiles/o.toml: key 'overrides.busybox': the table sets no argument"),
            ("[overrides.busybox]\n\"a b\" = 1\n", "profiles/o.toml: key 'overrides.busybox': 'a b' is not a Nix argument name"),
            ("[overrides.busybox]\nwhen = 1979-05-27\n", "profiles/o.toml: key 'overrides.busybox.when': the date 1979-05-27 has no Nix value (give it as a string)"),
        ];
        for (body, want) in cases {
            write(
                d.path(),
                "profiles/o.toml",
                &format!("description = \"o\"\ninherit = [\"base\"]\n{body}"),
            );
            let e = Config::new(d.path())
                .load_profile("o")
                .unwrap_err()
                .to_string();
            assert_eq!(e, want);
        }
    }

    #[test]
    fn inheritance_merges_parents_first() {
        let d = project();
        write(d.path(), "profiles/mid.toml", "description = \"m\"\ninherit = [\"base\"]\npackages = [\"hello\", \"busybox\"]\ninit = \"runit\"\n");
        write(
            d.path(),
            "profiles/top.toml",
            "description = \"t\"\ninherit = [\"mid\"]\npackages = [\"s6\"]\n",
        );
        let p = Config::new(d.path()).load_profile("top").unwrap();
        assert_eq!(p.packages, ["busybox", "hello", "s6"]);
        assert_eq!(p.init, "runit");
        assert_eq!(p.ancestors, ["base", "mid"]);
    }

    #[test]
    fn overlays_come_parents_first_each_once_and_must_be_repository_nix_files() {
        let d = project();
        write(d.path(), "overlays/a.nix", "final: prev: { }\n");
        write(d.path(), "overlays/b.nix", "final: prev: { }\n");
        write(
            d.path(),
            "profiles/mid.toml",
            "description = \"m\"\ninherit = [\"base\"]\noverlays = [\"overlays/b.nix\"]\n",
        );
        write(
            d.path(),
            "profiles/top.toml",
            "description = \"t\"\ninherit = [\"mid\"]\noverlays = [\"overlays/a.nix\", \"overlays/b.nix\"]\n",
        );
        let p = Config::new(d.path()).load_profile("top").unwrap();
        let got: Vec<(&str, &str)> = p
            .overlays
            .iter()
            .map(|o| (o.path.as_str(), o.origin.as_str()))
            .collect();
        assert_eq!(got, [("overlays/b.nix", "mid"), ("overlays/a.nix", "top")]);
        for (entry, want) in [
            ("overlays/none.nix", "overlays/none.nix does not exist"),
            ("../x.nix", "'../x.nix' is not a path inside the repository (give it relative to the repository root, without '..')"),
            ("kernel-configs/k.config", "kernel-configs/k.config is not a .nix file"),
        ] {
            write(
                d.path(),
                "profiles/bad.toml",
                &format!("description = \"b\"\noverlays = [\"{entry}\"]\n"),
            );
            let e = Config::new(d.path()).load_profile("bad").unwrap_err();
            assert_eq!(
                format!("{e:#}"),
                format!("profiles/bad.toml: key 'overlays': {want}")
            );
        }
    }

    #[test]
    fn inheritance_cycle_is_an_error() {
        let d = project();
        write(
            d.path(),
            "profiles/a.toml",
            "description = \"a\"\ninherit = [\"b\"]\npackages = [\"x\"]\n",
        );
        write(
            d.path(),
            "profiles/b.toml",
            "description = \"b\"\ninherit = [\"a\"]\n",
        );
        let e = Config::new(d.path())
            .load_profile("a")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "profiles/b.toml: key 'inherit': inheritance cycle a -> b -> a"
        );
    }

    #[test]
    fn inheritance_diamond_is_an_error() {
        let d = project();
        write(
            d.path(),
            "profiles/l.toml",
            "description = \"l\"\ninherit = [\"base\"]\n",
        );
        write(
            d.path(),
            "profiles/r.toml",
            "description = \"r\"\ninherit = [\"base\"]\n",
        );
        write(
            d.path(),
            "profiles/top.toml",
            "description = \"t\"\ninherit = [\"l\", \"r\"]\n",
        );
        let e = Config::new(d.path())
            .load_profile("top")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "profiles/top.toml: key 'inherit': profile 'base' is inherited twice (through 'l' and 'r'); diamonds are not allowed"
        );
    }

    #[test]
    fn unknown_parent_and_init_are_named() {
        let d = project();
        write(
            d.path(),
            "profiles/o.toml",
            "description = \"o\"\ninherit = [\"ghost\"]\n",
        );
        let e = Config::new(d.path())
            .load_profile("o")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("profiles/o.toml: key 'inherit': unknown profile 'ghost'"),
            "{e}"
        );
        write(
            d.path(),
            "profiles/i.toml",
            "description = \"i\"\npackages = [\"x\"]\ninit = \"systemd\"\n",
        );
        let e = Config::new(d.path())
            .load_profile("i")
            .unwrap_err()
            .to_string();
        assert_eq!(e, "profiles/i.toml: key 'init': unknown init 'systemd' (expected one of busybox, runit, s6, bonsai-init)");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("2 MiB"), Some(2 << 20));
        assert_eq!(parse_size("512KiB"), Some(512 << 10));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("2 parsecs"), None);
    }
}
