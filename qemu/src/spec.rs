//! The one QEMU command per board.
//!
//! A [`QemuSpec`] is built once from the board file and the image paths; `cargo xtask boot`,
//! the check runs and the docs all render their command line from it, so there is a single
//! source of truth for how a board is emulated.

use std::path::PathBuf;

/// Everything needed to start QEMU for one board and one image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuSpec {
    /// The QEMU program, e.g. `qemu-system-x86_64` (looked up in `PATH`) or a path.
    pub binary: String,
    /// How to install `binary` when it is missing, e.g. `apt-get install qemu-system-x86`.
    pub install_hint: Option<String>,
    /// `-machine`, e.g. `q35`, `virt`, `raspi3b`.
    pub machine: String,
    /// `-cpu`, e.g. `max`, `cortex-a53`; QEMU's default for the machine when absent.
    pub cpu: Option<String>,
    /// `-m`, e.g. `256M`.
    pub memory: String,
    /// `-smp`.
    pub smp: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub dtb: Option<PathBuf>,
    /// The full kernel command line (console, quiet, …). `boot_check` appends the
    /// protocol's `bonsai.*` parameters itself.
    pub append: String,
    pub accel: Accel,
    /// User-mode networking; absent means the guest has no network device at all.
    pub network: Option<UserNet>,
    /// Raw disk images attached as virtio block devices, in order (`vda`, `vdb`, …).
    pub drives: Vec<PathBuf>,
    /// Boot through firmware from the first drive instead of QEMU's `-kernel`: then `kernel`,
    /// `initrd`, `dtb` and `append` are not passed (the disk's boot loader has its own).
    pub firmware: Option<Firmware>,
    /// Extra arguments from the board file, appended verbatim after everything else.
    pub extra_args: Vec<String>,
    /// A QMP server on this Unix socket (headless only): a check run carries out the guest's
    /// `BONSAI-HOST … qmp` requests through it (hotplug).
    pub qmp: Option<PathBuf>,
}

/// The firmware that boots a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Firmware {
    /// UEFI (OVMF, AAVMF): the code as read-only flash, and a writable copy of the variable
    /// store that belongs to the disk being booted (it persists across the disk's boots).
    Uefi { code: PathBuf, vars: PathBuf },
    /// U-Boot loaded as the kernel (QEMU cannot run the Raspberry Pi's own firmware, which
    /// loads it on the real board), with the disk as the SD card. U-Boot's console is the
    /// second serial port, Linux's the first: headless, both go to the console log.
    UBoot { binary: PathBuf, card: PathBuf },
}

impl QemuSpec {
    /// The disk a firmware boot boots: the SD card, or else the first drive.
    pub fn boot_disk(&self) -> Option<&PathBuf> {
        match &self.firmware {
            Some(Firmware::UBoot { card, .. }) => Some(card),
            _ => self.drives.first(),
        }
    }
}

/// How the console is wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// For a person at a terminal: serial console and QEMU monitor multiplexed on stdio
    /// (Ctrl-A X quits, Ctrl-A C switches to the monitor).
    Interactive,
    /// For checks: no display, no monitor, the serial console alone on QEMU's stdout.
    Headless,
}

/// The accelerator QEMU runs the guest with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// Software emulation; works everywhere, for every architecture.
    Tcg,
    /// Hardware virtualisation; host architecture only.
    Kvm,
}

impl Accel {
    /// The environment variable that opts into KVM.
    pub const ENV: &'static str = "BONSAI_ACCEL";

    /// TCG unless `BONSAI_ACCEL=kvm` is set.
    ///
    /// KVM is never picked just because `/dev/kvm` exists: on our development and CI machines it
    /// exists but guests hang under it (nested virtualisation), and a hang costs a whole timeout,
    /// so KVM is used only where someone has seen it work and asked for it.
    pub fn detect() -> Accel {
        match std::env::var(Self::ENV) {
            Ok(value) if value.trim().eq_ignore_ascii_case("kvm") => Accel::Kvm,
            _ => Accel::Tcg,
        }
    }

    /// The value of `-accel`.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

/// QEMU user-mode networking. It is `restrict=on` unless `unrestricted` is set: the guest
/// reaches nothing outside, and only the listed ports on the host's loopback reach the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserNet {
    /// The NIC model for the machine, e.g. `virtio-net-pci` on x86 q35 and arm virt.
    pub device: String,
    /// `(host port, guest port)` TCP forwards; the host side binds 127.0.0.1 only.
    pub host_forwards: Vec<(u16, u16)>,
    /// `(guest address:port, command)`: a guest connection to that address runs the command,
    /// one process per connection, speaking over its stdin and stdout (QEMU's `guestfwd` with
    /// `cmd:`). The only way out of `restrict=on`.
    pub guest_forwards: Vec<(String, String)>,
    /// `restrict=off`: restricted, QEMU's DHCP server sends no router and no DNS server
    /// (libslirp's bootp.c), which a DHCP test needs. The guest can then reach what the host
    /// reaches.
    pub unrestricted: bool,
}

impl UserNet {
    /// The `-netdev` value.
    pub fn netdev_arg(&self) -> String {
        let mut arg = String::from(if self.unrestricted {
            "user,id=net0,restrict=off"
        } else {
            "user,id=net0,restrict=on"
        });
        for (host, guest) in &self.host_forwards {
            arg.push_str(&format!(",hostfwd=tcp:127.0.0.1:{host}-:{guest}"));
        }
        for (addr, cmd) in &self.guest_forwards {
            // QEMU's option syntax escapes a comma by doubling it.
            arg.push_str(&format!(
                ",guestfwd=tcp:{addr}-cmd:{}",
                cmd.replace(',', ",,")
            ));
        }
        arg
    }
}

impl QemuSpec {
    /// The arguments after the binary name.
    pub fn args(&self, mode: Mode) -> Vec<String> {
        let mut args: Vec<String> = ["-nodefaults", "-no-user-config", "-no-reboot"]
            .map(String::from)
            .to_vec();
        push_pair(&mut args, "-machine", &self.machine);
        if let Some(cpu) = &self.cpu {
            push_pair(&mut args, "-cpu", cpu);
        }
        push_pair(&mut args, "-m", &self.memory);
        push_pair(&mut args, "-smp", &self.smp.to_string());
        push_pair(&mut args, "-accel", self.accel.as_str());
        match &self.firmware {
            None => {
                push_pair(&mut args, "-kernel", &self.kernel.display().to_string());
                push_pair(&mut args, "-initrd", &self.initrd.display().to_string());
                if let Some(dtb) = &self.dtb {
                    push_pair(&mut args, "-dtb", &dtb.display().to_string());
                }
                push_pair(&mut args, "-append", &self.append);
            }
            Some(Firmware::Uefi { code, vars }) => {
                let flash = |p: &PathBuf| p.display().to_string().replace(',', ",,");
                push_pair(
                    &mut args,
                    "-drive",
                    &format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={}",
                        flash(code)
                    ),
                );
                push_pair(
                    &mut args,
                    "-drive",
                    &format!("if=pflash,format=raw,unit=1,file={}", flash(vars)),
                );
            }
            Some(Firmware::UBoot { binary, card }) => {
                push_pair(&mut args, "-kernel", &binary.display().to_string());
                let file = card.display().to_string().replace(',', ",,");
                push_pair(
                    &mut args,
                    "-drive",
                    &format!("if=sd,format=raw,file={file}"),
                );
            }
        }
        let uboot = matches!(self.firmware, Some(Firmware::UBoot { .. }));
        match mode {
            Mode::Interactive if uboot => {
                args.push("-nographic".to_string());
                push_pair(&mut args, "-chardev", "stdio,id=con,mux=on,signal=off");
                push_pair(&mut args, "-mon", "chardev=con");
                push_pair(&mut args, "-serial", "chardev:con");
                push_pair(&mut args, "-serial", "chardev:con");
            }
            Mode::Interactive => {
                args.push("-nographic".to_string());
                push_pair(&mut args, "-serial", "mon:stdio");
            }
            Mode::Headless => {
                push_pair(&mut args, "-display", "none");
                push_pair(&mut args, "-monitor", "none");
                if uboot {
                    push_pair(&mut args, "-chardev", "stdio,id=con,mux=on,signal=off");
                    push_pair(&mut args, "-serial", "chardev:con");
                    push_pair(&mut args, "-serial", "chardev:con");
                } else {
                    push_pair(&mut args, "-serial", "stdio");
                }
            }
        }
        if let Some(net) = &self.network {
            push_pair(&mut args, "-netdev", &net.netdev_arg());
            push_pair(&mut args, "-device", &format!("{},netdev=net0", net.device));
        }
        for drive in &self.drives {
            // QEMU option values escape a literal comma by doubling it.
            let file = drive.display().to_string().replace(',', ",,");
            push_pair(
                &mut args,
                "-drive",
                &format!("file={file},if=virtio,format=raw"),
            );
        }
        args.extend(self.extra_args.iter().cloned());
        if let (Mode::Headless, Some(path)) = (mode, &self.qmp) {
            args.extend(crate::qmp::qmp_args(path));
        }
        args
    }

    /// The whole command, shell-quoted, for docs and `--print`.
    pub fn command_line(&self, mode: Mode) -> String {
        std::iter::once(self.binary.clone())
            .chain(self.args(mode))
            .map(|arg| shell_quote(&arg))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn push_pair(args: &mut Vec<String>, flag: &str, value: &str) {
    args.push(flag.to_string());
    args.push(value.to_string());
}

/// Quotes `arg` for a POSIX shell; words made only of safe characters stay bare.
pub fn shell_quote(arg: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-+=:,./@%".contains(c);
    if !arg.is_empty() && arg.chars().all(safe) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    pub use super::tests::q35;
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn q35() -> QemuSpec {
        QemuSpec {
            binary: "qemu-system-x86_64".into(),
            install_hint: Some("apt-get install qemu-system-x86".into()),
            machine: "q35".into(),
            cpu: Some("max".into()),
            memory: "256M".into(),
            smp: 2,
            kernel: "/out/pc/bzImage".into(),
            initrd: "/out/pc/initramfs.cpio.gz".into(),
            dtb: None,
            append: "console=ttyS0 quiet".into(),
            accel: Accel::Tcg,
            network: Some(UserNet {
                device: "virtio-net-pci".into(),
                host_forwards: vec![(2222, 22), (8080, 80)],
                guest_forwards: vec![],
                unrestricted: false,
            }),
            drives: vec!["/tmp/data.img".into()],
            firmware: None,
            extra_args: vec!["-rtc".into(), "base=utc".into()],
            qmp: None,
        }
    }

    fn virt() -> QemuSpec {
        QemuSpec {
            binary: "qemu-system-aarch64".into(),
            install_hint: None,
            machine: "virt".into(),
            cpu: Some("cortex-a53".into()),
            memory: "512M".into(),
            smp: 1,
            kernel: "/out/virt/Image".into(),
            initrd: "/out/virt/initramfs.cpio.zst".into(),
            dtb: Some("/out/virt/virt.dtb".into()),
            append: "console=ttyAMA0".into(),
            accel: Accel::Kvm,
            network: None,
            drives: vec![],
            firmware: None,
            extra_args: vec![],
            qmp: None,
        }
    }

    fn strs(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn q35_headless_args() {
        assert_eq!(
            q35().args(Mode::Headless),
            strs(&[
                "-nodefaults",
                "-no-user-config",
                "-no-reboot",
                "-machine",
                "q35",
                "-cpu",
                "max",
                "-m",
                "256M",
                "-smp",
                "2",
                "-accel",
                "tcg",
                "-kernel",
                "/out/pc/bzImage",
                "-initrd",
                "/out/pc/initramfs.cpio.gz",
                "-append",
                "console=ttyS0 quiet",
                "-display",
                "none",
                "-monitor",
                "none",
                "-serial",
                "stdio",
                "-netdev",
                "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:127.0.0.1:8080-:80",
                "-device",
                "virtio-net-pci,netdev=net0",
                "-drive",
                "file=/tmp/data.img,if=virtio,format=raw",
                "-rtc",
                "base=utc",
            ])
        );
    }

    #[test]
    fn virt_interactive_args() {
        assert_eq!(
            virt().args(Mode::Interactive),
            strs(&[
                "-nodefaults",
                "-no-user-config",
                "-no-reboot",
                "-machine",
                "virt",
                "-cpu",
                "cortex-a53",
                "-m",
                "512M",
                "-smp",
                "1",
                "-accel",
                "kvm",
                "-kernel",
                "/out/virt/Image",
                "-initrd",
                "/out/virt/initramfs.cpio.zst",
                "-dtb",
                "/out/virt/virt.dtb",
                "-append",
                "console=ttyAMA0",
                "-nographic",
                "-serial",
                "mon:stdio",
            ])
        );
    }

    /// Through UEFI: code read-only, the disk's own variable store writable, the disk the first
    /// virtio drive, and no `-kernel` (the disk's boot loader starts the kernel).
    #[test]
    fn a_firmware_boot_passes_no_kernel() {
        let spec = QemuSpec {
            firmware: Some(Firmware::Uefi {
                code: "/usr/share/OVMF/OVMF_CODE_4M.fd".into(),
                vars: "/out/q35/disk,vars.fd".into(),
            }),
            drives: vec!["/out/q35/disk.img".into()],
            ..q35()
        };
        let args = spec.args(Mode::Headless);
        for absent in ["-kernel", "-initrd", "-append", "-dtb"] {
            assert!(!args.contains(&absent.to_string()), "{absent} in {args:?}");
        }
        let line = spec.command_line(Mode::Headless);
        assert!(line.contains(
            "-drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd -drive if=pflash,format=raw,unit=1,file=/out/q35/disk,,vars.fd"
        ), "{line}");
        assert!(
            line.contains("-drive file=/out/q35/disk.img,if=virtio,format=raw"),
            "{line}"
        );
    }

    #[test]
    fn u_boot_boots_the_card_with_both_serial_ports_on_the_console() {
        let spec = QemuSpec {
            firmware: Some(Firmware::UBoot {
                binary: "/out/pi/u-boot.bin".into(),
                card: "/out/pi/disk-run.img".into(),
            }),
            ..virt()
        };
        let line = spec.command_line(Mode::Headless);
        assert!(
            line.contains(
                "-kernel /out/pi/u-boot.bin -drive if=sd,format=raw,file=/out/pi/disk-run.img"
            ),
            "{line}"
        );
        assert!(
            line.contains(
                "-chardev stdio,id=con,mux=on,signal=off -serial chardev:con -serial chardev:con"
            ),
            "{line}"
        );
        for absent in ["-initrd", "-append", "-dtb"] {
            assert!(
                !spec.args(Mode::Headless).contains(&absent.to_string()),
                "{absent}"
            );
        }
        assert_eq!(
            spec.boot_disk().unwrap().to_str(),
            Some("/out/pi/disk-run.img")
        );
    }

    #[test]
    fn cpu_is_optional() {
        let spec = QemuSpec {
            cpu: None,
            ..virt()
        };
        assert!(!spec.args(Mode::Headless).contains(&"-cpu".to_string()));
    }

    #[test]
    fn user_net_is_always_restricted() {
        let net = UserNet {
            device: "virtio-net-pci".into(),
            host_forwards: vec![],
            guest_forwards: vec![],
            unrestricted: false,
        };
        assert_eq!(net.netdev_arg(), "user,id=net0,restrict=on");
        let fwd = UserNet {
            guest_forwards: vec![("10.0.2.100:80".into(), "serve --stdio a,b".into())],
            ..net.clone()
        };
        assert_eq!(
            fwd.netdev_arg(),
            "user,id=net0,restrict=on,guestfwd=tcp:10.0.2.100:80-cmd:serve --stdio a,,b"
        );
        let net = UserNet {
            host_forwards: vec![(10022, 22)],
            guest_forwards: vec![],
            ..net
        };
        assert_eq!(
            net.netdev_arg(),
            "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:10022-:22"
        );
        let args = q35().args(Mode::Interactive);
        let netdev = args.iter().position(|a| a == "-netdev").unwrap();
        assert!(args[netdev + 1].contains(",restrict=on"));
    }

    #[test]
    fn drive_commas_are_escaped() {
        let spec = QemuSpec {
            drives: vec!["/tmp/a,b.img".into()],
            firmware: None,
            ..virt()
        };
        let args = spec.args(Mode::Headless);
        assert!(args.contains(&"file=/tmp/a,,b.img,if=virtio,format=raw".to_string()));
    }

    #[test]
    fn command_line_is_shell_quoted() {
        assert_eq!(
            virt().command_line(Mode::Headless),
            "qemu-system-aarch64 -nodefaults -no-user-config -no-reboot -machine virt \
             -cpu cortex-a53 -m 512M -smp 1 -accel kvm -kernel /out/virt/Image \
             -initrd /out/virt/initramfs.cpio.zst -dtb /out/virt/virt.dtb \
             -append console=ttyAMA0 -display none -monitor none -serial stdio"
        );
        assert_eq!(shell_quote("console=ttyS0 quiet"), "'console=ttyS0 quiet'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
