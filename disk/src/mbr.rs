//! An MBR partition table (what the Raspberry Pi's boot ROM reads): up to four primary
//! partitions addressed by LBA only (the CHS fields hold the "beyond CHS" marker).

use std::io::{Read, Seek, SeekFrom, Write};

use crate::{Error, Result, SECTOR};

/// FAT32 with LBA addressing.
pub const FAT32_LBA: u8 = 0x0c;
/// Linux data.
pub const LINUX: u8 = 0x83;

/// One primary partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub kind: u8,
    pub bootable: bool,
    pub first_lba: u64,
    pub sectors: u64,
}

/// Writes the partition table into sector 0 of `disk` (the rest of the sector is zero: no boot
/// code, which the Pi does not run).
pub fn write<T: Write + Seek>(disk: &mut T, signature: u32, parts: &[Entry]) -> Result<()> {
    if parts.len() > 4 {
        return Err(Error::Layout(
            "an MBR holds at most four primary partitions".into(),
        ));
    }
    let mut mbr = [0u8; SECTOR as usize];
    mbr[440..444].copy_from_slice(&signature.to_le_bytes());
    for (i, p) in parts.iter().enumerate() {
        let (first, sectors) = (u32::try_from(p.first_lba), u32::try_from(p.sectors));
        let (Ok(first), Ok(sectors)) = (first, sectors) else {
            return Err(Error::Layout(
                "a partition beyond 2 TiB does not fit an MBR".into(),
            ));
        };
        let e = &mut mbr[446 + 16 * i..446 + 16 * (i + 1)];
        e[0] = if p.bootable { 0x80 } else { 0 };
        e[1..4].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[4] = p.kind;
        e[5..8].copy_from_slice(&[0xfe, 0xff, 0xff]);
        e[8..12].copy_from_slice(&first.to_le_bytes());
        e[12..16].copy_from_slice(&sectors.to_le_bytes());
    }
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    disk.seek(SeekFrom::Start(0))
        .and_then(|_| disk.write_all(&mbr))
        .map_err(Error::io("writing the MBR"))
}

/// The used entries of the MBR in `disk`, in slot order, and the disk signature.
pub fn read<T: Read + Seek>(disk: &mut T) -> Result<(u32, Vec<Entry>)> {
    let mut mbr = [0u8; SECTOR as usize];
    disk.seek(SeekFrom::Start(0))
        .and_then(|_| disk.read_exact(&mut mbr))
        .map_err(Error::io("reading the MBR"))?;
    if mbr[510..512] != [0x55, 0xaa] {
        return Err(Error::Layout(
            "no MBR partition table (no 55 aa signature)".into(),
        ));
    }
    let u32_at = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let parts = (0..4)
        .map(|i| &mbr[446 + 16 * i..446 + 16 * (i + 1)])
        .filter(|e| e[4] != 0)
        .map(|e| Entry {
            kind: e[4],
            bootable: e[0] == 0x80,
            first_lba: u64::from(u32_at(&e[8..12])),
            sectors: u64::from(u32_at(&e[12..16])),
        })
        .collect();
    Ok((u32_at(&mbr[440..444]), parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip() {
        let parts = [
            Entry {
                kind: FAT32_LBA,
                bootable: true,
                first_lba: 2048,
                sectors: 4096,
            },
            Entry {
                kind: LINUX,
                bootable: false,
                first_lba: 6144,
                sectors: 2048,
            },
        ];
        let mut disk = std::io::Cursor::new(vec![0u8; 1 << 20]);
        write(&mut disk, 0x1234_5678, &parts).unwrap();
        assert_eq!(read(&mut disk).unwrap(), (0x1234_5678, parts.to_vec()));
        assert!(read(&mut std::io::Cursor::new(vec![0u8; 512])).is_err());
    }
}
