//! Disk images a device boots: a partition table, FAT file systems, and the A/B slot layout the
//! boot loader reads. Pure, like `rootfs`: it takes bytes and a plan and writes an image into
//! any `Read + Write + Seek` (a file, or memory in tests); it never runs a program and needs no
//! root, loop device or mount.
//!
//! Output is a function of the inputs: GUIDs and FAT serial numbers are derived from a seed the
//! caller computes from the image's contents, and every FAT timestamp is `SOURCE_DATE_EPOCH`.
//!
//! - [`guid`]: GUIDs in text and in GPT's on-disk byte order, derived GUIDs.
//! - [`part`]: a byte range of a disk as a stream of its own.
//! - [`fat`]: formatting a FAT volume and writing files into it, reproducibly.
//! - [`efi`]: the EFI boards' disk (GPT: an EFI system partition with systemd-boot and the
//!   slots as Boot Loader Specification entries with boot counting, and a data partition).
//! - [`rpi`]: the Raspberry Pi's SD card (MBR: a FAT boot partition with the Pi firmware,
//!   U-Boot, its environment holding the A/B state, a boot script, the slots; a data partition).
//! - [`uboot`]: U-Boot's environment file and legacy script images.
//! - [`mbr`]: an MBR partition table.
//! - [`bls`]: Boot Loader Specification entry names with boot counters (`name+LEFT-DONE.conf`).

pub mod bls;
pub mod efi;
pub mod fat;
pub mod guid;
pub mod mbr;
pub mod part;
pub mod rpi;
pub mod uboot;

/// Errors of the disk writer, each naming what it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Layout(String),
}

impl Error {
    /// An I/O error while doing `what`.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Bytes in a MiB: partitions start and end on MiB boundaries.
pub const MIB: u64 = 1 << 20;
/// The sector size of every image bonsai writes.
pub const SECTOR: u64 = 512;
