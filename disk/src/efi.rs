//! The disk of the EFI boards (qemu-x86_64, qemu-aarch64): GPT with
//! 1. an EFI system partition (FAT) holding systemd-boot at the removable-media path (so empty
//!    firmware variables need no boot entry), `loader/loader.conf`, and each slot as
//!    `bonsai/<slot>/{linux,initrd[,dtb]}` plus a Boot Loader Specification entry
//!    `loader/entries/bonsai-<slot>+<tries>.conf` whose counter systemd-boot runs down by itself;
//! 2. a data partition (FAT) for state that survives updates.
//!
//! Entries carry `sort-key bonsai` and `version <generation>-<release>`: systemd-boot boots the
//! newest write that still has tries left, and sorts used-up entries (`+0-N`) last.

use std::io::{Read, Seek, SeekFrom, Write};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bls::EntryName;
use crate::fat::{self, Volume};
use crate::guid;
use crate::part::Part;
use crate::{Error, Result, MIB, SECTOR};

/// What one slot boots.
#[derive(Debug, Clone)]
pub struct Slot<'a> {
    /// `a` or `b`.
    pub name: &'a str,
    /// The release in it, shown in the entry's title and `version`.
    pub version: &'a str,
    /// Which write of a slot this is (1 for a fresh disk, one more for each update): the
    /// entry's `version` starts with it, so systemd-boot boots the newest write first.
    pub generation: u64,
    pub kernel: &'a [u8],
    pub initrd: &'a [u8],
    pub dtb: Option<&'a [u8]>,
    /// The kernel command line (the entry's `options`).
    pub cmdline: &'a str,
    /// Boot tries before the entry counts as bad; `None` writes a blessed entry (no counter).
    pub tries: Option<u32>,
}

/// The whole disk.
#[derive(Debug, Clone)]
pub struct Spec<'a> {
    /// The boot loader (systemd-boot's EFI binary) and where the firmware looks for it,
    /// e.g. `EFI/BOOT/BOOTX64.EFI`.
    pub loader: &'a [u8],
    pub loader_path: &'a str,
    pub slots: Vec<Slot<'a>>,
    pub esp_mib: u64,
    pub data_mib: u64,
    /// `SOURCE_DATE_EPOCH`: every FAT timestamp.
    pub epoch: u64,
    /// What the GUIDs and FAT serials derive from (a hash of the image's inputs).
    pub seed: &'a [u8],
}

/// A partition as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    pub number: u32,
    pub name: String,
    pub type_guid: String,
    pub guid: String,
    pub first_lba: u64,
    pub last_lba: u64,
    pub offset: u64,
    pub size: u64,
}

/// The layout of a written disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layout {
    pub size: u64,
    pub disk_guid: String,
    pub partitions: Vec<Partition>,
}

impl Layout {
    pub fn partition(&self, name: &str) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.name == name)
    }
}

/// Partition names, as in the GPT and in `disk.json`.
pub const ESP_NAME: &str = "esp";
pub const DATA_NAME: &str = "data";
/// Where the slots' entries live on the ESP.
pub const ENTRIES: &str = "loader/entries";

/// systemd-boot's settings: boot the default entry at once, no editor (the command line of a
/// device is not for whoever holds its keyboard), no entries of its own.
pub const LOADER_CONF: &str =
    "timeout 0\neditor no\nauto-entries no\nauto-firmware no\nconsole-mode keep\n";

/// The entry file's text for `slot`.
pub fn entry_text(slot: &Slot) -> String {
    let dir = format!("/bonsai/{}", slot.name);
    let mut t = format!(
        "title bonsai {} (slot {})\nsort-key bonsai\nversion {}-{}\nlinux {dir}/linux\ninitrd {dir}/initrd\n",
        slot.version, slot.name, slot.generation, slot.version
    );
    if slot.dtb.is_some() {
        t.push_str(&format!("devicetree {dir}/dtb\n"));
    }
    t.push_str(&format!("options {}\n", slot.cmdline));
    t
}

/// The entry file name of `slot` (with its initial counter, if any).
pub fn entry_name(slot: &Slot) -> EntryName {
    EntryName {
        id: format!("bonsai-{}", slot.name),
        counter: slot.tries.map(|t| (t, 0)),
    }
}

/// Writes `slot` into an open ESP: its files, then its entry (the entry last, so that a slot
/// is bootable only once its files are whole). An entry of the slot already there is removed.
pub fn write_slot<T: Read + Write + Seek>(esp: &mut Volume<T>, slot: &Slot) -> Result<()> {
    let dir = format!("bonsai/{}", slot.name);
    esp.write(&format!("{dir}/linux"), slot.kernel)?;
    esp.write(&format!("{dir}/initrd"), slot.initrd)?;
    if let Some(dtb) = slot.dtb {
        esp.write(&format!("{dir}/dtb"), dtb)?;
    }
    let id = format!("bonsai-{}", slot.name);
    for old in esp.list(ENTRIES).unwrap_or_default() {
        if EntryName::parse(&old).is_some_and(|e| e.id == id) {
            esp.remove(&format!("{ENTRIES}/{old}"))?;
        }
    }
    esp.write(
        &format!("{ENTRIES}/{}", entry_name(slot).file()),
        entry_text(slot).as_bytes(),
    )
}

/// Writes the whole disk into `disk` (which must be empty: it is sized here).
pub fn write<T: Read + Write + Seek>(disk: &mut T, spec: &Spec) -> Result<Layout> {
    if spec.esp_mib < 34 {
        // The ESP is FAT32 (as UEFI asks), which needs 65525 clusters of 512 bytes.
        return Err(Error::Layout(format!(
            "the EFI system partition must be at least 34 MiB, not {}",
            spec.esp_mib
        )));
    }
    let size = (1 + spec.esp_mib + spec.data_mib + 1) * MIB;
    disk.seek(SeekFrom::Start(size - 1))
        .and_then(|_| disk.write_all(&[0]))
        .map_err(Error::io("sizing the disk"))?;

    let disk_guid = guid::derive(spec.seed, "disk");
    let mut gpt = gptman::GPT::new_from(disk, SECTOR, disk_guid)
        .map_err(|e| Error::Layout(format!("partition table: {e}")))?;
    gpt.align = MIB / SECTOR;
    let parts = [
        (ESP_NAME, guid::ESP, 1, spec.esp_mib),
        (DATA_NAME, guid::LINUX_DATA, 1 + spec.esp_mib, spec.data_mib),
    ];
    let mut layout = Layout {
        size,
        disk_guid: guid::to_text(&disk_guid),
        partitions: Vec::new(),
    };
    for (i, (name, type_guid, start_mib, mib)) in parts.into_iter().enumerate() {
        let number = i as u32 + 1;
        let first = start_mib * MIB / SECTOR;
        let last = first + mib * MIB / SECTOR - 1;
        let unique = guid::derive(spec.seed, &format!("partition {name}"));
        gpt[number] = gptman::GPTPartitionEntry {
            partition_type_guid: guid::to_bytes(type_guid).expect("a valid type GUID"),
            unique_partition_guid: unique,
            starting_lba: first,
            ending_lba: last,
            attribute_bits: 0,
            partition_name: name.into(),
        };
        layout.partitions.push(Partition {
            number,
            name: name.to_string(),
            type_guid: type_guid.to_string(),
            guid: guid::to_text(&unique),
            first_lba: first,
            last_lba: last,
            offset: first * SECTOR,
            size: mib * MIB,
        });
    }
    gpt.write_into(disk)
        .map_err(|e| Error::Layout(format!("writing the partition table: {e}")))?;
    gptman::GPT::write_protective_mbr_into(disk, SECTOR)
        .map_err(|e| Error::Layout(format!("writing the protective MBR: {e}")))?;

    let esp = layout.partition(ESP_NAME).cloned().expect("the ESP");
    fat::format(
        Part::new(disk, esp.offset, esp.size).map_err(Error::io("the ESP"))?,
        fat::Kind::Fat32,
        "BONSAI-ESP",
        guid::derive_serial(spec.seed, "esp"),
    )?;
    {
        let part = Part::new(disk, esp.offset, esp.size).map_err(Error::io("the ESP"))?;
        let mut v = Volume::open(part, spec.epoch, "the ESP")?;
        v.write(spec.loader_path, spec.loader)?;
        v.write("loader/loader.conf", LOADER_CONF.as_bytes())?;
        for slot in &spec.slots {
            write_slot(&mut v, slot)?;
        }
        v.close()?;
    }
    let data = layout
        .partition(DATA_NAME)
        .cloned()
        .expect("the data partition");
    format_data(disk, &data, spec.seed)?;
    Ok(layout)
}

/// Formats the data partition `data` (FAT, empty) and flushes the disk: the last step of
/// writing any layout.
pub(crate) fn format_data<T: Read + Write + Seek>(
    disk: &mut T,
    data: &Partition,
    seed: &[u8],
) -> Result<()> {
    fat::format(
        Part::new(disk, data.offset, data.size).map_err(Error::io("the data partition"))?,
        fat::Kind::Auto,
        "BONSAI-DATA",
        guid::derive_serial(seed, "data"),
    )?;
    disk.flush().map_err(Error::io("writing the disk"))
}

/// Opens the ESP of a disk written by [`write`] (for the host's checks and for writing a slot).
pub fn open_esp<'a, T: Read + Write + Seek>(
    disk: &'a mut T,
    layout: &Layout,
    epoch: u64,
) -> Result<Volume<Part<'a, T>>> {
    let esp = layout
        .partition(ESP_NAME)
        .ok_or_else(|| Error::Layout("the layout has no EFI system partition".into()))?;
    let part = Part::new(disk, esp.offset, esp.size).map_err(Error::io("the ESP"))?;
    Volume::open(part, epoch, "the ESP")
}

/// Finds the EFI system partition of any GPT disk (by its type), as a [`Partition`].
pub fn find_esp<T: Read + Seek>(disk: &mut T) -> Result<Partition> {
    let gpt = gptman::GPT::read_from(disk, SECTOR)
        .map_err(|e| Error::Layout(format!("no GPT partition table: {e}")))?;
    let esp_type = guid::to_bytes(guid::ESP).expect("a valid type GUID");
    let (number, p) = gpt
        .iter()
        .find(|(_, p)| p.is_used() && p.partition_type_guid == esp_type)
        .ok_or_else(|| Error::Layout("the disk has no EFI system partition".into()))?;
    Ok(Partition {
        number,
        name: p.partition_name.as_str().to_string(),
        type_guid: guid::ESP.into(),
        guid: guid::to_text(&p.unique_partition_guid),
        first_lba: p.starting_lba,
        last_lba: p.ending_lba,
        offset: p.starting_lba * SECTOR,
        size: (p.ending_lba + 1 - p.starting_lba) * SECTOR,
    })
}

/// Finds a partition of any GPT disk by its GPT name (`esp`, `data`).
pub fn find_partition<T: Read + Seek>(disk: &mut T, name: &str) -> Result<Partition> {
    let gpt = gptman::GPT::read_from(disk, SECTOR)
        .map_err(|e| Error::Layout(format!("no GPT partition table: {e}")))?;
    let (number, p) = gpt
        .iter()
        .find(|(_, p)| p.is_used() && p.partition_name.as_str() == name)
        .ok_or_else(|| Error::Layout(format!("the disk has no partition named {name}")))?;
    Ok(Partition {
        number,
        name: name.into(),
        type_guid: guid::to_text(&p.partition_type_guid),
        guid: guid::to_text(&p.unique_partition_guid),
        first_lba: p.starting_lba,
        last_lba: p.ending_lba,
        offset: p.starting_lba * SECTOR,
        size: (p.ending_lba + 1 - p.starting_lba) * SECTOR,
    })
}

/// Writes `data` as the file `path` of the data partition (replacing it): how a host hands a
/// device a file, such as an update bundle, on its own disk.
pub fn write_data_file<T: Read + Write + Seek>(
    disk: &mut T,
    path: &str,
    data: &[u8],
    epoch: u64,
) -> Result<()> {
    let p = find_partition(disk, DATA_NAME)?;
    let part = Part::new(disk, p.offset, p.size).map_err(Error::io("the data partition"))?;
    let mut v = Volume::open(part, epoch, "the data partition")?;
    let _ = v.remove(path);
    v.write(path, data)?;
    v.close()?;
    disk.flush().map_err(Error::io("writing the disk"))
}

/// Sets the words of `extra` (`key=value` or `key`) on the `options` line of every bonsai entry
/// of the ESP in `disk`, replacing the same keys set before: how a host passes per-boot kernel
/// parameters (a check's nonce) to a disk it boots through firmware. Entry names, and with them
/// the boot counters, stay as they are. Returns the entry files it changed.
pub fn set_options<T: Read + Write + Seek>(
    disk: &mut T,
    extra: &str,
    epoch: u64,
) -> Result<Vec<String>> {
    let esp = find_esp(disk)?;
    let part = Part::new(disk, esp.offset, esp.size).map_err(Error::io("the ESP"))?;
    let mut v = Volume::open(part, epoch, "the ESP")?;
    let key = |w: &str| w.split('=').next().unwrap_or(w).to_string();
    let keys: Vec<String> = extra.split_whitespace().map(key).collect();
    let mut changed = Vec::new();
    for file in v.list(ENTRIES)? {
        if !EntryName::parse(&file).is_some_and(|e| e.id.starts_with("bonsai-")) {
            continue;
        }
        let path = format!("{ENTRIES}/{file}");
        let text = String::from_utf8_lossy(&v.read(&path)?).into_owned();
        let mut out = String::new();
        for line in text.lines() {
            match line.strip_prefix("options ") {
                Some(opts) => {
                    let kept: Vec<&str> = opts
                        .split_whitespace()
                        .filter(|w| !keys.contains(&key(w)))
                        .collect();
                    out.push_str(&format!("options {} {extra}\n", kept.join(" ")));
                }
                None => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        v.write(&path, out.as_bytes())?;
        changed.push(file);
    }
    v.close()?;
    Ok(changed)
}

/// Writes `slot` into the ESP of the disk `disk` (any GPT disk with one): its files, then its
/// entry ([`write_slot`]). How a host puts a release into the slot that is not running.
pub fn update_slot<T: Read + Write + Seek>(disk: &mut T, slot: &Slot, epoch: u64) -> Result<()> {
    let esp = find_esp(disk)?;
    let part = Part::new(disk, esp.offset, esp.size).map_err(Error::io("the ESP"))?;
    let mut v = Volume::open(part, epoch, "the ESP")?;
    write_slot(&mut v, slot)?;
    v.close()?;
    disk.flush().map_err(Error::io("writing the disk"))
}

/// The bonsai entry files under `loader/entries/` of the disk `disk`, sorted by name: their
/// names carry the boot counters as the boot loader and the running system left them.
pub fn entries<T: Read + Write + Seek>(disk: &mut T, epoch: u64) -> Result<Vec<String>> {
    let esp = find_esp(disk)?;
    let part = Part::new(disk, esp.offset, esp.size).map_err(Error::io("the ESP"))?;
    let v = Volume::open(part, epoch, "the ESP")?;
    let mut names: Vec<String> = v
        .list(ENTRIES)?
        .into_iter()
        .filter(|f| EntryName::parse(f).is_some_and(|e| e.id.starts_with("bonsai-")))
        .collect();
    names.sort();
    Ok(names)
}

/// The text of the entry file `name` under `loader/entries/` (lossy UTF-8).
pub fn entry_file<T: Read + Write + Seek>(disk: &mut T, epoch: u64, name: &str) -> Result<String> {
    let esp = find_esp(disk)?;
    let part = Part::new(disk, esp.offset, esp.size).map_err(Error::io("the ESP"))?;
    let v = Volume::open(part, epoch, "the ESP")?;
    Ok(String::from_utf8_lossy(&v.read(&format!("{ENTRIES}/{name}"))?).into_owned())
}

/// The SHA-256 (hex) of a partition's bytes.
pub fn partition_sha256<T: Read + Seek>(disk: &mut T, p: &Partition) -> Result<String> {
    disk.seek(SeekFrom::Start(p.offset))
        .map_err(Error::io(format!("partition {}", p.name)))?;
    let mut h = Sha256::new();
    let mut left = p.size;
    let mut buf = vec![0u8; MIB as usize];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        disk.read_exact(&mut buf[..n])
            .map_err(Error::io(format!("reading partition {}", p.name)))?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn spec<'a>(seed: &'a [u8], b_tries: Option<u32>) -> Spec<'a> {
        let mut slots = vec![Slot {
            name: "a",
            version: "1",
            generation: 1,
            kernel: b"kernel-1",
            initrd: b"initrd-1",
            dtb: None,
            cmdline: "console=ttyS0 bonsai.slot=a",
            tries: Some(3),
        }];
        if let Some(t) = b_tries {
            slots.push(Slot {
                name: "b",
                version: "2",
                generation: 2,
                kernel: b"kernel-2",
                initrd: b"initrd-2",
                dtb: Some(b"dtb"),
                cmdline: "console=ttyS0 bonsai.slot=b",
                tries: Some(t),
            });
        }
        Spec {
            loader: b"MZ systemd-boot",
            loader_path: "EFI/BOOT/BOOTX64.EFI",
            slots,
            esp_mib: 40,
            data_mib: 4,
            epoch: 1_700_000_000,
            seed,
        }
    }

    fn image(s: &Spec) -> (Vec<u8>, Layout) {
        let mut c = Cursor::new(Vec::new());
        let l = write(&mut c, s).unwrap();
        (c.into_inner(), l)
    }

    #[test]
    fn the_disk_is_a_function_of_its_inputs() {
        let (a, la) = image(&spec(b"seed", None));
        let (b, lb) = image(&spec(b"seed", None));
        assert_eq!(la, lb);
        assert!(a == b, "two disks from the same inputs differ");
        let (c, lc) = image(&spec(b"other", None));
        assert_ne!(la.disk_guid, lc.disk_guid);
        assert!(a != c);
        assert_eq!(la.size, 46 * MIB);
        assert_eq!(la.partitions[0].offset, MIB);
        assert_eq!(la.partitions[1].offset, 41 * MIB);
    }

    #[test]
    fn gpt_and_esp_read_back() {
        let (bytes, layout) = image(&spec(b"seed", Some(3)));
        let mut c = Cursor::new(bytes);
        let gpt = gptman::GPT::read_from(&mut c, SECTOR).unwrap();
        assert_eq!(
            gpt[1].partition_type_guid,
            guid::to_bytes(guid::ESP).unwrap()
        );
        assert_eq!(gpt[1].starting_lba, 2048);
        assert_eq!(gpt[2].partition_name.as_str(), "data");
        // FAT32 ("FAT32   " in the boot sector's file system type at offset 82).
        let esp0 = layout.partitions[0].offset as usize;
        assert_eq!(&c.get_ref()[esp0 + 82..esp0 + 90], b"FAT32   ");
        let mbr = &c.get_ref()[446..512];
        assert_eq!(mbr[4], 0xee, "protective MBR");
        assert_eq!(&mbr[64..], &[0x55, 0xaa]);
        let v = open_esp(&mut c, &layout, 0).unwrap();
        assert_eq!(v.read("EFI/BOOT/BOOTX64.EFI").unwrap(), b"MZ systemd-boot");
        let mut entries = v.list(ENTRIES).unwrap();
        entries.sort();
        assert_eq!(entries, ["bonsai-a+3.conf", "bonsai-b+3.conf"]);
        let b = String::from_utf8(v.read("loader/entries/bonsai-b+3.conf").unwrap()).unwrap();
        assert_eq!(
            b,
            "title bonsai 2 (slot b)\nsort-key bonsai\nversion 2-2\nlinux /bonsai/b/linux\ninitrd /bonsai/b/initrd\ndevicetree /bonsai/b/dtb\noptions console=ttyS0 bonsai.slot=b\n"
        );
        assert_eq!(v.read("bonsai/b/initrd").unwrap(), b"initrd-2");
    }

    #[test]
    fn writing_a_slot_replaces_its_entry_whatever_its_counter() {
        let (bytes, layout) = image(&spec(b"seed", None));
        let mut c = Cursor::new(bytes);
        let mut v = open_esp(&mut c, &layout, 0).unwrap();
        v.rename(ENTRIES, "bonsai-a+3.conf", "bonsai-a+0-3.conf")
            .unwrap();
        let mut s = spec(b"seed", None).slots.remove(0);
        s.version = "3";
        s.tries = None;
        write_slot(&mut v, &s).unwrap();
        assert_eq!(v.list(ENTRIES).unwrap(), ["bonsai-a.conf"]);
    }

    #[test]
    fn per_boot_options_replace_their_keys_and_keep_the_counters() {
        let (bytes, layout) = image(&spec(b"seed", Some(2)));
        let mut c = Cursor::new(bytes);
        assert_eq!(find_esp(&mut c).unwrap(), layout.partitions[0]);
        set_options(&mut c, "bonsai.nonce=aa bonsai.check=1", 0).unwrap();
        let changed = set_options(&mut c, "bonsai.nonce=bb bonsai.check=1", 0).unwrap();
        assert_eq!(changed.len(), 2);
        let v = open_esp(&mut c, &layout, 0).unwrap();
        let b = String::from_utf8(v.read("loader/entries/bonsai-b+2.conf").unwrap()).unwrap();
        assert!(
            b.ends_with("options console=ttyS0 bonsai.slot=b bonsai.nonce=bb bonsai.check=1\n"),
            "{b}"
        );
    }

    #[test]
    fn a_small_esp_is_refused() {
        let mut s = spec(b"seed", None);
        s.esp_mib = 8;
        let e = write(&mut Cursor::new(Vec::new()), &s).unwrap_err();
        assert!(e.to_string().contains("at least 34 MiB"), "{e}");
    }
}
