//! The Raspberry Pi's SD card: MBR with
//! 1. a FAT boot partition holding the Pi firmware (`bootcode.bin`, `start.elf`, `fixup.dat`),
//!    `config.txt` (which loads U-Boot as the kernel), U-Boot (`u-boot.bin`), its environment
//!    (`uboot.env`, which holds the A/B state), the boot script (`boot.scr`) and each slot as
//!    `bonsai/<slot>/{Image,initrd,dtb}`;
//! 2. a data partition (FAT) for state that survives updates.
//!
//! The A/B state follows RAUC's convention: `BOOT_ORDER` (`A B`: A first) and
//! `BOOT_<X>_LEFT`, the tries a slot has left. The boot script boots the first slot in the
//! order with tries left, counting one down and saving the environment before the kernel runs;
//! the running system blesses its slot by writing the environment with the slot's tries reset.
//! With no slot left it boots the first in the order anyway, with `bonsai.fallback=1`, and the
//! running system then stays up instead of rebooting.

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};

use crate::efi::{Layout, Partition};
use crate::fat::{self, Volume};
use crate::part::Part;
use crate::{guid, mbr, uboot, Error, Result, MIB, SECTOR};

pub const BOOT_NAME: &str = "boot";
pub const DATA_NAME: &str = "data";
/// U-Boot's environment file on the boot partition.
pub const ENV_FILE: &str = "uboot.env";

/// What one slot boots.
#[derive(Debug, Clone)]
pub struct Slot<'a> {
    /// `a` or `b`.
    pub name: &'a str,
    pub version: &'a str,
    pub kernel: &'a [u8],
    pub initrd: &'a [u8],
    pub dtb: &'a [u8],
}

/// The whole card.
#[derive(Debug, Clone)]
pub struct Spec<'a> {
    /// Files at the root of the boot partition: the Pi firmware.
    pub firmware: Vec<(&'a str, &'a [u8])>,
    pub config_txt: &'a str,
    pub uboot: &'a [u8],
    /// The kernel command line every slot boots with (`bonsai.slot=` is added per slot).
    pub cmdline: &'a str,
    /// Tries of a trial (at most 9: U-Boot's `setexpr` counts in hex).
    pub tries: u32,
    pub slots: Vec<Slot<'a>>,
    pub boot_mib: u64,
    pub data_mib: u64,
    pub epoch: u64,
    pub seed: &'a [u8],
}

/// The boot script: the first slot in `BOOT_ORDER` with tries left, one try counted down and
/// saved before the kernel starts.
pub fn boot_script(cmdline: &str) -> String {
    format!(
        r#"# bonsai A/B boot (U-Boot): the first slot in BOOT_ORDER with tries left, one try counted
test -n "${{BOOT_ORDER}}" || setenv BOOT_ORDER "A B"
test -n "${{BOOT_A_LEFT}}" || setenv BOOT_A_LEFT 0
test -n "${{BOOT_B_LEFT}}" || setenv BOOT_B_LEFT 0
test -n "${{bonsai_args}}" || setenv bonsai_args "{cmdline}"
echo "bonsai: BOOT_ORDER=${{BOOT_ORDER}} BOOT_A_LEFT=${{BOOT_A_LEFT}} BOOT_B_LEFT=${{BOOT_B_LEFT}}"
setenv slot
setenv fallback
for s in ${{BOOT_ORDER}}; do
  if test -z "${{slot}}"; then
    if test "${{s}}" = "A"; then
      if test ${{BOOT_A_LEFT}} -gt 0; then
        setexpr BOOT_A_LEFT ${{BOOT_A_LEFT}} - 1
        setenv slot a
      fi
    elif test "${{s}}" = "B"; then
      if test ${{BOOT_B_LEFT}} -gt 0; then
        setexpr BOOT_B_LEFT ${{BOOT_B_LEFT}} - 1
        setenv slot b
      fi
    fi
  fi
done
if test -z "${{slot}}"; then
  for s in ${{BOOT_ORDER}}; do
    if test -z "${{slot}}"; then
      if test "${{s}}" = "A"; then setenv slot a; elif test "${{s}}" = "B"; then setenv slot b; fi
    fi
  done
  setenv fallback " bonsai.fallback=1"
  echo "bonsai: no slot has tries left: booting slot ${{slot}} anyway"
fi
echo "bonsai: booting slot ${{slot}} (BOOT_A_LEFT=${{BOOT_A_LEFT}} BOOT_B_LEFT=${{BOOT_B_LEFT}})"
saveenv
setenv bootargs "${{bonsai_args}} bonsai.slot=${{slot}}${{fallback}} ${{bonsai_extra}}"
load ${{devtype}} ${{devnum}}:${{distro_bootpart}} ${{kernel_addr_r}} /bonsai/${{slot}}/Image
load ${{devtype}} ${{devnum}}:${{distro_bootpart}} ${{ramdisk_addr_r}} /bonsai/${{slot}}/initrd
setenv bonsai_rdsize ${{filesize}}
load ${{devtype}} ${{devnum}}:${{distro_bootpart}} ${{fdt_addr_r}} /bonsai/${{slot}}/dtb
booti ${{kernel_addr_r}} ${{ramdisk_addr_r}}:${{bonsai_rdsize}} ${{fdt_addr_r}}
echo "bonsai: booting slot ${{slot}} failed"
"#
    )
}

fn key(slot: &str, what: &str) -> String {
    format!("BOOT_{}_{what}", slot.to_ascii_uppercase())
}

/// The environment a fresh card starts with: U-Boot's default, no boot delay and no USB or
/// network probing first, and the A/B state with the slots given (the first one first).
pub fn initial_env(spec: &Spec) -> Result<BTreeMap<String, String>> {
    if !(1..=9).contains(&spec.tries) {
        return Err(Error::Layout(format!(
            "U-Boot counts tries from 1 to 9, not {}",
            spec.tries
        )));
    }
    let mut env = uboot::default_env(spec.uboot)?;
    env.insert("bootdelay".into(), "0".into());
    env.remove("preboot");
    env.insert("boot_targets".into(), "mmc0".into());
    env.insert("bonsai_args".into(), spec.cmdline.into());
    env.insert("bonsai_tries".into(), spec.tries.to_string());
    env.insert("BOOT_ORDER".into(), "A B".into());
    for s in ["a", "b"] {
        env.insert(key(s, "LEFT"), "0".into());
    }
    for slot in &spec.slots {
        env.insert(key(slot.name, "LEFT"), spec.tries.to_string());
        env.insert(format!("bonsai_{}_version", slot.name), slot.version.into());
    }
    Ok(env)
}

/// Writes the whole card into `disk` (which must be empty). Its size is the next power of two
/// (QEMU's SD card needs one; a real card is larger anyway).
pub fn write<T: Read + Write + Seek>(disk: &mut T, spec: &Spec) -> Result<Layout> {
    let used = (1 + spec.boot_mib + spec.data_mib) * MIB;
    let size = used.next_power_of_two();
    disk.seek(std::io::SeekFrom::Start(size - 1))
        .and_then(|_| disk.write_all(&[0]))
        .map_err(Error::io("sizing the card"))?;
    let signature = guid::derive_serial(spec.seed, "mbr");
    let parts = [
        (BOOT_NAME, mbr::FAT32_LBA, true, 1, spec.boot_mib),
        (
            DATA_NAME,
            mbr::LINUX,
            false,
            1 + spec.boot_mib,
            spec.data_mib,
        ),
    ];
    let mut layout = Layout {
        size,
        disk_guid: format!("{signature:08x}"),
        partitions: Vec::new(),
    };
    let mut entries = Vec::new();
    for (i, (name, kind, bootable, start_mib, mib)) in parts.into_iter().enumerate() {
        let first = start_mib * MIB / SECTOR;
        let sectors = mib * MIB / SECTOR;
        entries.push(mbr::Entry {
            kind,
            bootable,
            first_lba: first,
            sectors,
        });
        layout.partitions.push(Partition {
            number: i as u32 + 1,
            name: name.into(),
            type_guid: format!("{kind:02x}"),
            // As Linux names an MBR partition's PARTUUID.
            guid: format!("{signature:08x}-{:02x}", i + 1),
            first_lba: first,
            last_lba: first + sectors - 1,
            offset: first * SECTOR,
            size: mib * MIB,
        });
    }
    mbr::write(disk, signature, &entries)?;
    let boot = layout.partitions[0].clone();
    fat::format(
        Part::new(disk, boot.offset, boot.size).map_err(Error::io("the boot partition"))?,
        fat::Kind::Auto,
        "BONSAI-BOOT",
        guid::derive_serial(spec.seed, "boot"),
    )?;
    {
        let part =
            Part::new(disk, boot.offset, boot.size).map_err(Error::io("the boot partition"))?;
        let mut v = Volume::open(part, spec.epoch, "the boot partition")?;
        for (name, bytes) in &spec.firmware {
            v.write(name, bytes)?;
        }
        v.write("config.txt", spec.config_txt.as_bytes())?;
        v.write("u-boot.bin", spec.uboot)?;
        let script = boot_script(spec.cmdline);
        v.write(
            "boot.scr",
            &uboot::script_image(
                "bonsai A/B",
                &script,
                spec.epoch.min(u32::MAX.into()) as u32,
            ),
        )?;
        for slot in &spec.slots {
            write_slot_files(&mut v, slot)?;
        }
        // The environment last: the slots it names are whole by then.
        v.write(
            ENV_FILE,
            &uboot::env_bytes(&initial_env(spec)?, uboot::ENV_SIZE)?,
        )?;
        v.close()?;
    }
    let data = layout.partitions[1].clone();
    crate::efi::format_data(disk, &data, spec.seed)?;
    Ok(layout)
}

fn write_slot_files<T: Read + Write + Seek>(v: &mut Volume<T>, slot: &Slot) -> Result<()> {
    let dir = format!("bonsai/{}", slot.name);
    v.write(&format!("{dir}/Image"), slot.kernel)?;
    v.write(&format!("{dir}/initrd"), slot.initrd)?;
    v.write(&format!("{dir}/dtb"), slot.dtb)
}

/// Opens the boot partition of a card written by [`write`] (found through the MBR).
fn open_boot<T: Read + Write + Seek>(disk: &mut T, epoch: u64) -> Result<Volume<Part<'_, T>>> {
    let (_, parts) = mbr::read(disk)?;
    let boot = parts
        .iter()
        .find(|p| p.kind == mbr::FAT32_LBA)
        .ok_or_else(|| Error::Layout("the card has no FAT boot partition".into()))?;
    let part = Part::new(disk, boot.first_lba * SECTOR, boot.sectors * SECTOR)
        .map_err(Error::io("the boot partition"))?;
    Volume::open(part, epoch, "the boot partition")
}

/// The U-Boot environment on the card in `disk` (an error when its CRC is bad).
pub fn read_env<T: Read + Write + Seek>(
    disk: &mut T,
    epoch: u64,
) -> Result<BTreeMap<String, String>> {
    let v = open_boot(disk, epoch)?;
    uboot::parse_env(&v.read(ENV_FILE)?)
}

/// Replaces the U-Boot environment on the card in `disk`.
pub fn write_env<T: Read + Write + Seek>(
    disk: &mut T,
    env: &BTreeMap<String, String>,
    epoch: u64,
) -> Result<()> {
    let mut v = open_boot(disk, epoch)?;
    v.write(ENV_FILE, &uboot::env_bytes(env, uboot::ENV_SIZE)?)?;
    v.close()?;
    disk.flush().map_err(Error::io("writing the card"))
}

/// Sets this boot's extra kernel parameters (`bonsai_extra`): how a host passes a check's
/// nonce to a card it boots through U-Boot.
pub fn set_extra<T: Read + Write + Seek>(disk: &mut T, extra: &str, epoch: u64) -> Result<()> {
    let mut env = read_env(disk, epoch)?;
    env.insert("bonsai_extra".into(), extra.into());
    write_env(disk, &env, epoch)
}

/// Writes `slot` into the card in `disk` as a trial: its files, then the environment with it
/// first in `BOOT_ORDER` and `tries` tries left (the one step that switches).
pub fn update_slot<T: Read + Write + Seek>(
    disk: &mut T,
    slot: &Slot,
    tries: u32,
    epoch: u64,
) -> Result<()> {
    let mut env = read_env(disk, epoch)?;
    {
        let mut v = open_boot(disk, epoch)?;
        write_slot_files(&mut v, slot)?;
        v.close()?;
    }
    let other = if slot.name == "a" { "B" } else { "A" };
    env.insert(
        "BOOT_ORDER".into(),
        format!("{} {other}", slot.name.to_ascii_uppercase()),
    );
    env.insert(key(slot.name, "LEFT"), tries.to_string());
    env.insert(format!("bonsai_{}_version", slot.name), slot.version.into());
    write_env(disk, &env, epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uboot_bin() -> Vec<u8> {
        let mut b = b"code".to_vec();
        b.extend_from_slice(b"bootcmd=run distro_bootcmd\0bootdelay=2\0preboot=usb start\0\0");
        b
    }

    #[test]
    fn a_card_holds_the_firmware_u_boot_and_slot_a_first_in_the_order() {
        let bin = uboot_bin();
        let spec = Spec {
            firmware: vec![("bootcode.bin", b"boot")],
            config_txt: "kernel=u-boot.bin\n",
            uboot: &bin,
            cmdline: "console=ttyAMA0",
            tries: 3,
            slots: vec![Slot {
                name: "a",
                version: "r1",
                kernel: b"K",
                initrd: b"I",
                dtb: b"D",
            }],
            boot_mib: 40,
            data_mib: 8,
            epoch: 1_700_000_000,
            seed: b"seed",
        };
        let mut disk = std::io::Cursor::new(Vec::new());
        let layout = write(&mut disk, &spec).unwrap();
        assert_eq!(layout.size, 64 * MIB);
        let env = read_env(&mut disk, spec.epoch).unwrap();
        assert_eq!(env["BOOT_ORDER"], "A B");
        assert_eq!(env["BOOT_A_LEFT"], "3");
        assert_eq!(env["BOOT_B_LEFT"], "0");
        assert_eq!(env["bootdelay"], "0");
        assert!(!env.contains_key("preboot"));
        assert_eq!(env["bootcmd"], "run distro_bootcmd");
        {
            let v = open_boot(&mut disk, spec.epoch).unwrap();
            assert_eq!(v.read("bonsai/a/Image").unwrap(), b"K");
            assert_eq!(v.read("bootcode.bin").unwrap(), b"boot");
            assert_eq!(&v.read("boot.scr").unwrap()[..4], &[0x27, 0x05, 0x19, 0x56]);
        }
        let b = Slot {
            name: "b",
            version: "r2",
            kernel: b"K2",
            initrd: b"I2",
            dtb: b"D2",
        };
        update_slot(&mut disk, &b, 3, spec.epoch).unwrap();
        let env = read_env(&mut disk, spec.epoch).unwrap();
        assert_eq!(
            (env["BOOT_ORDER"].as_str(), env["BOOT_B_LEFT"].as_str()),
            ("B A", "3")
        );
        assert_eq!(env["bonsai_b_version"], "r2");
        let mut again = std::io::Cursor::new(Vec::new());
        write(&mut again, &spec).unwrap();
        let mut first = std::io::Cursor::new(Vec::new());
        write(&mut first, &spec).unwrap();
        assert!(
            again.into_inner() == first.into_inner(),
            "two cards of one spec differ"
        );
        let bad = Spec {
            tries: 10,
            ..spec.clone()
        };
        assert!(write(&mut std::io::Cursor::new(Vec::new()), &bad).is_err());
    }
}
