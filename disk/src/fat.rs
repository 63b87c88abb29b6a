//! FAT volumes, written reproducibly: a fixed serial number and label, files created in the
//! order given (so directory entries come out in that order), and every timestamp set to
//! `SOURCE_DATE_EPOCH` through a time provider that never reads the clock.

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::sync::{Mutex, OnceLock};

use crate::{Error, Result};

/// A fixed point in time for every timestamp the FAT writer sets.
#[derive(Debug)]
struct Fixed(fatfs::DateTime);

impl fatfs::TimeProvider for Fixed {
    fn get_current_date(&self) -> fatfs::Date {
        self.0.date
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        self.0
    }
}

/// The DOS date and time of `epoch` (seconds since 1970, UTC), clamped to FAT's 1980–2107.
pub fn dos_time(epoch: u64) -> fatfs::DateTime {
    const MIN: u64 = 315_532_800; // 1980-01-01
    const MAX: u64 = 4_354_819_198; // 2107-12-31 23:59:58
    let t = epoch.clamp(MIN, MAX);
    let (days, secs) = (t / 86_400, t % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u16;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u16;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as u16;
    fatfs::DateTime {
        date: fatfs::Date { year, month, day },
        time: fatfs::Time {
            hour: (secs / 3600) as u16,
            min: (secs / 60 % 60) as u16,
            sec: (secs % 60) as u16,
            millis: 0,
        },
    }
}

/// The time provider for `epoch`: one per distinct epoch, kept for the life of the process
/// (`fatfs` wants a `'static` one).
fn provider(epoch: u64) -> &'static Fixed {
    static PROVIDERS: OnceLock<Mutex<BTreeMap<u64, &'static Fixed>>> = OnceLock::new();
    let mut map = PROVIDERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    map.entry(epoch)
        .or_insert_with(|| Box::leak(Box::new(Fixed(dos_time(epoch)))))
}

fn options(epoch: u64) -> fatfs::FsOptions {
    fatfs::FsOptions::new()
        .update_accessed_date(false)
        .time_provider(provider(epoch))
}

/// An 11-byte volume label: upper case, padded with spaces.
fn label_bytes(label: &str) -> Result<[u8; 11]> {
    if label.len() > 11 || !label.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(Error::Layout(format!(
            "FAT label '{label}' is not up to 11 printable ASCII characters"
        )));
    }
    let mut out = [b' '; 11];
    for (o, b) in out.iter_mut().zip(label.bytes()) {
        *o = b.to_ascii_uppercase();
    }
    Ok(out)
}

/// The FAT variant to format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Whatever suits the size (FAT12 or FAT16 for small volumes).
    Auto,
    /// FAT32, as the UEFI specification asks of an EFI system partition: 512-byte clusters,
    /// so that a volume of 34 MiB or more has the 65525 clusters FAT32 needs.
    Fat32,
}

/// Formats `part` (a whole partition) as FAT with `label` and `serial`.
pub fn format<T: Read + Write + Seek>(part: T, kind: Kind, label: &str, serial: u32) -> Result<()> {
    let mut opts = fatfs::FormatVolumeOptions::new()
        .volume_id(serial)
        .volume_label(label_bytes(label)?);
    if kind == Kind::Fat32 {
        opts = opts.fat_type(fatfs::FatType::Fat32).bytes_per_cluster(512);
    }
    fatfs::format_volume(part, opts).map_err(Error::io(format!("formatting FAT volume {label}")))
}

/// A FAT volume opened for reading and writing, timestamps at `epoch`.
pub struct Volume<T: Read + Write + Seek> {
    fs: fatfs::FileSystem<T>,
    name: String,
}

impl<T: Read + Write + Seek> Volume<T> {
    /// Opens the FAT volume in `part`; `name` says which one in errors.
    pub fn open(part: T, epoch: u64, name: &str) -> Result<Self> {
        let fs = fatfs::FileSystem::new(part, options(epoch))
            .map_err(Error::io(format!("{name}: not a FAT volume")))?;
        Ok(Volume {
            fs,
            name: name.to_string(),
        })
    }

    fn err(&self, what: &str, path: &str) -> impl FnOnce(std::io::Error) -> Error {
        Error::io(format!("{}: {what} {path}", self.name))
    }

    /// Writes `data` to `path` (`/`-separated, relative to the root), creating the folders on
    /// the way and replacing a file that is there.
    pub fn write(&mut self, path: &str, data: &[u8]) -> Result<()> {
        let root = self.fs.root_dir();
        let mut dir = root.clone();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let Some((file, folders)) = parts.split_last() else {
            return Err(Error::Layout(format!("{}: empty file name", self.name)));
        };
        for f in folders {
            dir = match dir.open_dir(f) {
                Ok(d) => d,
                Err(_) => dir.create_dir(f).map_err(self.err("creating folder", f))?,
            };
        }
        let mut out = dir.create_file(file).map_err(self.err("creating", path))?;
        out.truncate().map_err(self.err("truncating", path))?;
        out.write_all(data).map_err(self.err("writing", path))?;
        out.flush().map_err(self.err("writing", path))?;
        Ok(())
    }

    /// The bytes of `path`.
    pub fn read(&self, path: &str) -> Result<Vec<u8>> {
        let mut f = self
            .fs
            .root_dir()
            .open_file(path)
            .map_err(self.err("opening", path))?;
        let mut data = Vec::new();
        f.read_to_end(&mut data)
            .map_err(self.err("reading", path))?;
        Ok(data)
    }

    /// The names of the files (not folders) in `folder`, in directory order.
    pub fn list(&self, folder: &str) -> Result<Vec<String>> {
        let dir = self
            .fs
            .root_dir()
            .open_dir(folder)
            .map_err(self.err("opening folder", folder))?;
        let mut names = Vec::new();
        for e in dir.iter() {
            let e = e.map_err(self.err("listing", folder))?;
            if e.is_file() {
                names.push(e.file_name());
            }
        }
        Ok(names)
    }

    /// Renames `from` to `to` within `folder`: one directory entry rewritten in place, the step
    /// a boot loader's counter and blessing use.
    pub fn rename(&mut self, folder: &str, from: &str, to: &str) -> Result<()> {
        let dir = self
            .fs
            .root_dir()
            .open_dir(folder)
            .map_err(self.err("opening folder", folder))?;
        dir.rename(from, &dir, to)
            .map_err(self.err("renaming", &format!("{folder}/{from} to {to}")))
    }

    /// Removes the file `path`.
    pub fn remove(&mut self, path: &str) -> Result<()> {
        self.fs
            .root_dir()
            .remove(path)
            .map_err(self.err("removing", path))
    }

    /// Writes what is buffered and closes the volume.
    pub fn close(self) -> Result<()> {
        let name = self.name.clone();
        self.fs
            .unmount()
            .map_err(Error::io(format!("{name}: writing the FAT")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn dos_time_of_known_epochs() {
        let t = dos_time(1_700_000_000); // 2023-11-14 22:13:20 UTC
        assert_eq!((t.date.year, t.date.month, t.date.day), (2023, 11, 14));
        assert_eq!((t.time.hour, t.time.min, t.time.sec), (22, 13, 20));
        let t = dos_time(0);
        assert_eq!((t.date.year, t.date.month, t.date.day), (1980, 1, 1));
        let t = dos_time(951_782_400); // 2000-02-29
        assert_eq!((t.date.year, t.date.month, t.date.day), (2000, 2, 29));
    }

    fn volume(epoch: u64) -> Vec<u8> {
        let mut disk = Cursor::new(vec![0u8; 8 << 20]);
        format(&mut disk, Kind::Auto, "BONSAI", 0x1234_5678).unwrap();
        let mut v = Volume::open(&mut disk, epoch, "test").unwrap();
        v.write("EFI/BOOT/BOOTX64.EFI", b"loader").unwrap();
        v.write("loader/entries/bonsai-a+3.conf", b"title a\n")
            .unwrap();
        v.close().unwrap();
        disk.into_inner()
    }

    #[test]
    fn the_same_files_give_the_same_bytes_and_the_epoch_is_the_only_time() {
        let a = volume(1_700_000_000);
        assert_eq!(a, volume(1_700_000_000));
        assert_ne!(a, volume(1_700_000_002));
        let mut disk = Cursor::new(a);
        let mut v = Volume::open(&mut disk, 1_700_000_000, "test").unwrap();
        assert_eq!(v.read("EFI/BOOT/BOOTX64.EFI").unwrap(), b"loader");
        v.rename("loader/entries", "bonsai-a+3.conf", "bonsai-a+2-1.conf")
            .unwrap();
        assert_eq!(v.list("loader/entries").unwrap(), ["bonsai-a+2-1.conf"]);
        assert!(v.read("loader/entries/bonsai-a+3.conf").is_err());
    }

    #[test]
    fn a_label_must_fit() {
        let mut disk = Cursor::new(vec![0u8; 8 << 20]);
        assert!(format(&mut disk, Kind::Auto, "TWELVE-CHARS", 1).is_err());
    }
}
