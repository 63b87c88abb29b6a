//! The newc (SVR4 "new ASCII") cpio writer, on top of the `cpio` crate's header builder.
//!
//! Every field that could carry host state is fixed: mtime is the caller's
//! `SOURCE_DATE_EPOCH`, uid/gid are 0, nlink is 1, the device is 0:0, and the inode number
//! is a hash of the entry's name (not a counter, so that an entry's bytes do not depend on
//! the entries before it; with nlink 1 the kernel and GNU cpio never compare inode numbers).
//! Entries come in [`Tree`] order, so each directory precedes its contents, and each store
//! path's entries are contiguous: [`write_newc_segmented`] tells its output where one store
//! path ends and the next begins (the gzip compressor starts a fresh, cacheable segment there). The `cpio` crate's writer silently skips padding when an entry gets fewer bytes
//! than its header announced; here that is an error.

use std::io::{self, BufWriter, Write};

use cpio::newc::Builder;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::host::{HostFile, BUF_SIZE};
use crate::tree::{ImagePath, Node, NodeKind, Source, Tree};

const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const S_IFBLK: u32 = 0o060000;

/// The mtime of every entry under `nix/store/`: the store's own (Nix canonicalises every
/// store file's mtime to 1), which `SOURCE_DATE_EPOCH` clamps to itself. bonsai's own binary
/// ([`BUILT_BINARIES`]) gets it too. So what did not change gives the same bytes in two
/// releases of different dates, and an update fetches only what changed.
pub const STORE_MTIME: u32 = 1;

/// Files outside the store that come from a build rather than from the release's profile:
/// bonsai-init (the init, and bonsai-update in every image that takes updates).
pub const BUILT_BINARIES: &[&str] = &["bin/bonsai-init", "bin/bonsai-update"];

/// An entry's mtime: [`STORE_MTIME`] for the store's entries and [`BUILT_BINARIES`], the
/// caller's (`SOURCE_DATE_EPOCH`) for the rest.
pub fn mtime_of(path: &str, epoch: u32) -> u32 {
    if path.starts_with("nix/store/") || BUILT_BINARIES.contains(&path) {
        STORE_MTIME
    } else {
        epoch
    }
}

/// Settings for [`write_newc`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpioOptions {
    /// The mtime of the entries bonsai composes for the release, normally `SOURCE_DATE_EPOCH`
    /// (newc's field is 32 bits); see [`mtime_of`].
    pub mtime: u32,
}

/// What [`write_newc`] wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CpioStats {
    /// Entries written, not counting the trailer.
    pub entries: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub devices: u64,
    /// Size of the uncompressed archive, trailer and padding included.
    pub archive_bytes: u64,
    /// Sum of regular file sizes.
    pub file_bytes: u64,
}

/// An output that can be told where a segment of the archive ends (see
/// [`write_newc_segmented`]).
pub trait Segmented: Write {
    /// The bytes written so far end a segment.
    fn cut(&mut self) -> io::Result<()>;
}

impl<S: Segmented + ?Sized> Segmented for &mut S {
    fn cut(&mut self) -> io::Result<()> {
        (**self).cut()
    }
}

/// Any writer, ignoring segment ends.
struct Unsegmented<W>(W);

impl<W: Write> Write for Unsegmented<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<W: Write> Segmented for Unsegmented<W> {
    fn cut(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes `tree` as a newc archive to `out`, ending with the `TRAILER!!!` entry.
///
/// Names carry no leading `/` (`init`, `nix/store/…`). Host files are streamed through a
/// fixed buffer; one that changes size while being read is an error naming it. `out` is
/// buffered internally and flushed before returning.
pub fn write_newc<W: Write>(tree: &Tree, opts: &CpioOptions, out: W) -> Result<CpioStats> {
    write_newc_segmented(tree, opts, Unsegmented(out))
}

/// The segment an entry belongs to: its store path (`nix/store/<hash>-<name>`), one of its
/// own for each of [`BUILT_BINARIES`], or `None` for everything else outside the store paths.
/// (A built binary in the middle of `bin/` would otherwise be compressed after entries whose
/// mtime is the release's date, and so differ in every release.)
fn segment_of(path: &str) -> Option<&str> {
    if BUILT_BINARIES.contains(&path) {
        return Some(path);
    }
    let rest = path.strip_prefix("nix/store/")?;
    let end = rest
        .find('/')
        .map_or(path.len(), |i| "nix/store/".len() + i);
    Some(&path[..end])
}

/// The inode number of an entry: FNV-1a of its name, never 0.
fn inode_of(path: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in path.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

/// Like [`write_newc`], and calls `out.cut()` wherever the archive passes from one store
/// path to the next (or to or from the entries outside the store), so that each store
/// path's entries form a segment of their own; the trailer follows a cut.
pub fn write_newc_segmented<W: Segmented>(
    tree: &Tree,
    opts: &CpioOptions,
    out: W,
) -> Result<CpioStats> {
    let mut out = Counter::new(BufWriter::with_capacity(BUF_SIZE, out));
    let mut buf = vec![0u8; BUF_SIZE];
    let mut stats = CpioStats::default();
    let cut = |out: &mut Counter<BufWriter<W>>| {
        out.inner
            .flush()
            .and_then(|()| out.inner.get_mut().cut())
            .map_err(|error| Error::WriteArchive {
                what: "segment",
                error,
            })
    };

    let mut segment: Option<Option<&str>> = None;
    for (path, node) in tree.iter() {
        let this = segment_of(path.as_str());
        if segment.is_some_and(|s| s != this) {
            cut(&mut out)?;
        }
        segment = Some(this);
        let header = Builder::new(path.as_str())
            .ino(inode_of(path.as_str()))
            .uid(0)
            .gid(0)
            .nlink(1)
            .mtime(mtime_of(path.as_str(), opts.mtime))
            .dev_major(0)
            .dev_minor(0);
        write_entry(&mut out, path, node, header, &mut buf, &mut stats)?;
        stats.entries += 1;
    }

    cut(&mut out)?;
    cpio::newc::trailer(&mut out).map_err(|error| Error::WriteArchive {
        what: "trailer",
        error,
    })?;
    stats.archive_bytes = out.count;
    out.inner
        .into_inner()
        .map_err(|e| e.into_error())
        .and_then(|mut w| w.flush())
        .map_err(|error| Error::WriteArchive { what: "end", error })?;
    Ok(stats)
}

fn write_entry<W: Write>(
    out: &mut W,
    path: &ImagePath,
    node: &Node,
    header: Builder,
    buf: &mut [u8],
    stats: &mut CpioStats,
) -> Result<()> {
    let header = |type_bits: u32| header.mode(type_bits | node.mode);
    match &node.kind {
        NodeKind::File { source } => {
            stats.files += 1;
            match source {
                Source::Bytes(data) => {
                    stats.file_bytes += data.len() as u64;
                    put(out, path, header(S_IFREG), data.len() as u64, |entry| {
                        entry.write(data)
                    })
                }
                Source::Host(host) => {
                    let file = HostFile::open(host)?;
                    let size = file.size();
                    if u32::try_from(size).is_err() {
                        return Err(Error::TooLarge {
                            path: file.path().to_owned(),
                            size,
                        });
                    }
                    stats.file_bytes += size;
                    put(out, path, header(S_IFREG), size, |entry| {
                        file.stream(buf, |chunk| entry.write(chunk))
                    })
                }
            }
        }
        NodeKind::Dir => {
            stats.dirs += 1;
            put(out, path, header(S_IFDIR), 0, |_| Ok(()))
        }
        NodeKind::Symlink { target } => {
            stats.symlinks += 1;
            let target = target.as_bytes();
            put(out, path, header(S_IFLNK), target.len() as u64, |entry| {
                entry.write(target)
            })
        }
        NodeKind::CharDev { major, minor } => {
            stats.devices += 1;
            let h = header(S_IFCHR).rdev_major(*major).rdev_minor(*minor);
            put(out, path, h, 0, |_| Ok(()))
        }
        NodeKind::BlockDev { major, minor } => {
            stats.devices += 1;
            let h = header(S_IFBLK).rdev_major(*major).rdev_minor(*minor);
            put(out, path, h, 0, |_| Ok(()))
        }
    }
}

/// The data part of one entry: counts what goes in so a short entry is caught.
struct EntryData<'p, W: Write> {
    writer: cpio::newc::Writer<W>,
    path: &'p ImagePath,
    written: u64,
}

impl<W: Write> EntryData<'_, W> {
    fn write(&mut self, data: &[u8]) -> Result<()> {
        self.writer
            .write_all(data)
            .map_err(|error| Error::WriteEntry {
                path: self.path.clone(),
                error,
            })?;
        self.written += data.len() as u64;
        Ok(())
    }
}

/// Writes one entry of `size` data bytes, produced by `fill`.
fn put<W: Write>(
    out: &mut W,
    path: &ImagePath,
    header: Builder,
    size: u64,
    fill: impl FnOnce(&mut EntryData<'_, &mut W>) -> Result<()>,
) -> Result<()> {
    // Callers have checked sizes against the 32-bit field (tree validation, TooLarge).
    let declared = u32::try_from(size).map_err(|_| Error::InvalidNode {
        path: path.clone(),
        reason: format!("{size} bytes is over the newc limit of {} bytes", u32::MAX),
    })?;
    let mut entry = EntryData {
        writer: header.write(out, declared),
        path,
        written: 0,
    };
    fill(&mut entry)?;
    if entry.written != size {
        return Err(Error::ShortWrite {
            path: path.clone(),
            written: entry.written,
            expected: size,
        });
    }
    entry.writer.finish().map_err(|error| Error::WriteEntry {
        path: path.clone(),
        error,
    })?;
    Ok(())
}

/// Counts bytes that reach the output.
pub(crate) struct Counter<W> {
    pub(crate) inner: W,
    pub(crate) count: u64,
}

impl<W> Counter<W> {
    pub(crate) fn new(inner: W) -> Self {
        Counter { inner, count: 0 }
    }
}

impl<W: Write> Write for Counter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cpio::NewcReader;
    use std::io::Read;

    struct Read1 {
        name: String,
        ino: u32,
        mode: u32,
        uid: u32,
        gid: u32,
        nlink: u32,
        mtime: u32,
        dev: (u32, u32),
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    fn read_all(archive: &[u8]) -> Vec<Read1> {
        let mut entries = Vec::new();
        let mut rest = archive;
        loop {
            let mut reader = NewcReader::new(rest).unwrap();
            let e = reader.entry().clone();
            if e.is_trailer() {
                let tail = reader.finish().unwrap();
                assert!(tail.is_empty(), "bytes after the trailer");
                break;
            }
            let mut data = Vec::new();
            reader.read_to_end(&mut data).unwrap();
            assert_eq!(data.len() as u32, e.file_size());
            entries.push(Read1 {
                name: e.name().to_owned(),
                ino: e.ino(),
                mode: e.mode(),
                uid: e.uid(),
                gid: e.gid(),
                nlink: e.nlink(),
                mtime: e.mtime(),
                dev: (e.dev_major(), e.dev_minor()),
                rdev: (e.rdev_major(), e.rdev_minor()),
                data,
            });
            rest = reader.finish().unwrap();
        }
        entries
    }

    fn pack(tree: &Tree) -> (Vec<u8>, CpioStats) {
        let mut out = Vec::new();
        let stats = write_newc(
            tree,
            &CpioOptions {
                mtime: 1_700_000_000,
            },
            &mut out,
        )
        .unwrap();
        (out, stats)
    }

    #[test]
    fn store_entries_and_bonsais_binary_keep_mtime_1_the_rest_take_the_epoch() {
        for (path, want) in [
            ("nix/store/abc-glibc", 1),
            ("nix/store/abc-glibc/lib/libc.so.6", 1),
            ("bin/bonsai-init", 1),
            ("bin/bonsai-update", 1),
            ("nix", 7),
            ("nix/store", 7),
            ("bin/sh", 7),
            ("etc/bonsai/update.pub", 7),
            ("init", 7),
            ("bin/bonsai-initx", 7),
        ] {
            assert_eq!(mtime_of(path, 7), want, "{path}");
        }
    }

    #[test]
    fn round_trip_through_the_cpio_crate_reader() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("libc.so.6");
        let host_data: Vec<u8> = (0..200_003u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&host, &host_data).unwrap();

        let mut tree = Tree::new();
        tree.insert("init", Node::symlink("/nix/store/abc-sh/bin/sh"))
            .unwrap();
        tree.insert(
            "nix/store/abc-glibc/lib/libc.so.6",
            Node::file(Source::Host(host), 0o555),
        )
        .unwrap();
        tree.insert(
            "etc/passwd",
            Node::file(Source::Bytes(b"root:x:0:0::/:/bin/sh\n".to_vec()), 0o644),
        )
        .unwrap();
        tree.insert("dev/console", Node::char_dev(5, 1, 0o600))
            .unwrap();
        tree.insert("dev/sda", Node::block_dev(8, 0, 0o660))
            .unwrap();
        tree.insert("tmp", Node::dir(0o1777)).unwrap();
        tree.insert("empty", Node::file(Source::Bytes(Vec::new()), 0o4755))
            .unwrap();

        let (archive, stats) = pack(&tree);
        let entries = read_all(&archive);

        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "dev",
                "dev/console",
                "dev/sda",
                "empty",
                "etc",
                "etc/passwd",
                "init",
                "nix",
                "nix/store",
                "nix/store/abc-glibc",
                "nix/store/abc-glibc/lib",
                "nix/store/abc-glibc/lib/libc.so.6",
                "tmp",
            ]
        );
        let mut inodes = std::collections::BTreeSet::new();
        for e in &entries {
            assert_eq!(e.ino, inode_of(&e.name), "{}", e.name);
            assert!(
                e.ino != 0 && inodes.insert(e.ino),
                "{}: inode {}",
                e.name,
                e.ino
            );
            assert_eq!((e.uid, e.gid, e.nlink), (0, 0, 1), "{}", e.name);
            // The store's entries keep the store's mtime; the rest get the caller's.
            let want = if e.name.starts_with("nix/store/") {
                STORE_MTIME
            } else {
                1_700_000_000
            };
            assert_eq!(mtime_of(&e.name, 1_700_000_000), want, "{}", e.name);
            assert_eq!(e.mtime, want, "{}", e.name);
            assert_eq!(e.dev, (0, 0), "{}", e.name);
        }
        let by_name = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        assert_eq!(by_name("dev").mode, 0o040755);
        assert_eq!(by_name("tmp").mode, 0o041777);
        assert_eq!(by_name("dev/console").mode, 0o020600);
        assert_eq!(by_name("dev/console").rdev, (5, 1));
        assert!(by_name("dev/console").data.is_empty());
        assert_eq!(by_name("dev/sda").mode, 0o060660);
        assert_eq!(by_name("dev/sda").rdev, (8, 0));
        assert_eq!(by_name("empty").mode, 0o104755);
        assert!(by_name("empty").data.is_empty());
        assert_eq!(by_name("etc/passwd").data, b"root:x:0:0::/:/bin/sh\n");
        assert_eq!(by_name("init").mode, 0o120777);
        assert_eq!(by_name("init").data, b"/nix/store/abc-sh/bin/sh");
        let libc = by_name("nix/store/abc-glibc/lib/libc.so.6");
        assert_eq!(libc.mode, 0o100555);
        assert_eq!(libc.data, host_data);
        assert_eq!(libc.rdev, (0, 0));

        assert_eq!(
            stats,
            CpioStats {
                entries: 13,
                files: 3,
                dirs: 7,
                symlinks: 1,
                devices: 2,
                archive_bytes: archive.len() as u64,
                file_bytes: host_data.len() as u64 + 22,
            }
        );
        assert_eq!(archive.len() % 4, 0);
    }

    #[test]
    fn empty_tree_is_just_the_trailer() {
        let (archive, stats) = pack(&Tree::new());
        assert!(read_all(&archive).is_empty());
        assert_eq!(stats.entries, 0);
        assert_eq!(stats.archive_bytes, archive.len() as u64);
    }

    #[test]
    fn vanished_host_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("bin-sh");
        let mut tree = Tree::new();
        tree.insert("bin/sh", Node::file(Source::Host(gone.clone()), 0o755))
            .unwrap();
        let err = write_newc(&tree, &CpioOptions { mtime: 0 }, io::sink())
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            format!("reading {}: No such file or directory", gone.display())
        );
    }

    /// Accepts `limit` bytes, then reports that it can take no more.
    struct Full {
        limit: usize,
    }
    impl Write for Full {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.limit);
            self.limit -= n;
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_that_stops_accepting_bytes_is_an_error() {
        let mut tree = Tree::new();
        tree.insert("big", Node::file(Source::Bytes(vec![7; 300_000]), 0o644))
            .unwrap();
        let err = write_newc(&tree, &CpioOptions { mtime: 0 }, Full { limit: 1000 })
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "writing archive entry /big: failed to write whole buffer"
        );
    }
}
