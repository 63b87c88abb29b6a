//! Packing a tree into a compressed initramfs file, atomically: the archive is written to a
//! temporary file next to the destination, synced, then renamed over it. On error the
//! temporary file is removed and the destination is left as it was.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::compress::{default_threads, Compression, Encoder};
use crate::cpio::{write_newc_segmented, Counter, CpioOptions, CpioStats};
use crate::error::{Error, Result};
use crate::host::BUF_SIZE;
use crate::piececache::PieceCache;
use crate::tree::Tree;

/// Settings for [`pack`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackOptions {
    pub compression: Compression,
    /// `None` uses the compression's default level.
    pub level: Option<u32>,
    /// The mtime of every entry, normally `SOURCE_DATE_EPOCH`.
    pub mtime: u32,
}

/// What [`pack`] produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PackReport {
    pub compression: Compression,
    /// Entry counts and the uncompressed archive size (`cpio.archive_bytes`).
    pub cpio: CpioStats,
    /// Size of the file written to the output path.
    pub compressed_bytes: u64,
}

/// Writes `tree` as a compressed newc archive to `out_path`, atomically.
pub fn pack(tree: &Tree, opts: &PackOptions, out_path: &Path) -> Result<PackReport> {
    pack_cached(tree, opts, out_path, None)
}

/// Like [`pack`], with gzip taking compressed blocks from `cache` and storing new ones there
/// (see [`crate::compress::pargz`]). The output's bytes are the same with any cache, empty,
/// warm or damaged, as without one; read the cache's counts with [`PieceCache::stats`].
pub fn pack_cached(
    tree: &Tree,
    opts: &PackOptions,
    out_path: &Path,
    cache: Option<Arc<PieceCache>>,
) -> Result<PackReport> {
    // Fail on a bad level before touching the file system.
    opts.compression.resolve_level(opts.level)?;
    let (cpio, compressed_bytes) = write_atomic(out_path, |file| {
        let mut encoder =
            Encoder::with_cache(opts.compression, opts.level, default_threads(), cache, file)?;
        let stats = write_newc_segmented(tree, &CpioOptions { mtime: opts.mtime }, &mut encoder)?;
        encoder
            .finish()
            .map_err(|e| Error::io("compressing into", out_path, e))?;
        Ok(stats)
    })?;
    Ok(PackReport {
        compression: opts.compression,
        cpio,
        compressed_bytes,
    })
}

/// Creates or replaces `out_path` with what `write` produces, atomically.
///
/// `write` gets a buffered writer onto a temporary file in the same directory. If it
/// succeeds the file is synced and renamed to `out_path`, and the number of bytes written is
/// returned along with `write`'s value. If anything fails, the temporary file is removed and
/// `out_path` is untouched. When a write to the temporary file itself fails, the error names
/// `out_path` rather than whatever `write` was doing at the time.
pub fn write_atomic<T>(
    out_path: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<T>,
) -> Result<(T, u64)> {
    let name = out_path.file_name().ok_or_else(|| Error::InvalidOutput {
        path: out_path.to_owned(),
    })?;
    let dir = match out_path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };

    let (file, tmp) = create_temp(dir, &name.to_string_lossy(), out_path)?;
    let guard = RemoveOnDrop(Some(tmp.clone()));

    let mut sink = FileSink {
        out: Counter::new(BufWriter::with_capacity(BUF_SIZE, file)),
        failure: None,
    };
    let result = write(&mut sink);
    let written = sink.out.count;
    let flushed = sink.out.inner.into_inner().map_err(|e| e.into_error());
    if let Some(error) = sink.failure {
        return Err(Error::io("writing", out_path, error));
    }
    let value = result?;
    let file = flushed.map_err(|e| Error::io("writing", out_path, e))?;
    file.sync_all().map_err(|e| Error::io("syncing", &tmp, e))?;
    drop(file);

    fs::rename(&tmp, out_path).map_err(|error| Error::Rename {
        from: tmp.clone(),
        to: out_path.to_owned(),
        error,
    })?;
    guard.disarm();
    // Makes the rename itself durable. Best effort: the new file is already in place, and
    // reporting an error now would claim nothing was written.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok((value, written))
}

/// Creates `.<name>.tmp-<pid>-<n>` in `dir` with a name no one else holds.
fn create_temp(dir: &Path, name: &str, out_path: &Path) -> Result<(File, PathBuf)> {
    let pid = std::process::id();
    for n in 0u32.. {
        let tmp = dir.join(format!(".{name}.tmp-{pid}-{n}"));
        match OpenOptions::new().write(true).create_new(true).open(&tmp) {
            Ok(file) => return Ok((file, tmp)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists && n < 1000 => continue,
            Err(e) => return Err(Error::io("creating a temporary file for", out_path, e)),
        }
    }
    unreachable!("the loop returns by n = 1000")
}

struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// The temporary file's writer; remembers the first error the file itself gave.
struct FileSink {
    out: Counter<BufWriter<File>>,
    failure: Option<io::Error>,
}

impl FileSink {
    fn note(&mut self, error: io::Error) -> io::Error {
        let copy = io::Error::new(error.kind(), error.to_string());
        self.failure.get_or_insert(error);
        copy
    }
}

impl Write for FileSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write(buf).map_err(|e| self.note(e))
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush().map_err(|e| self.note(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn write_atomic_replaces_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("manifest.json");
        fs::write(&out, b"old").unwrap();
        let ((), n) = write_atomic(&out, |w| {
            w.write_all(b"new contents")
                .map_err(|e| Error::io("writing", "x", e))
        })
        .unwrap();
        assert_eq!(n, 12);
        assert_eq!(fs::read(&out).unwrap(), b"new contents");
        assert_eq!(names_in(dir.path()), ["manifest.json"]);
    }

    #[test]
    fn write_atomic_failure_leaves_old_file_and_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("initramfs.cpio.gz");
        fs::write(&out, b"previous").unwrap();
        let err = write_atomic(&out, |w| -> Result<()> {
            w.write_all(&[0; 200_000]).unwrap();
            Err(Error::InvalidOutput {
                path: "boom".into(),
            })
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "boom: output path has no file name");
        assert_eq!(fs::read(&out).unwrap(), b"previous");
        assert_eq!(names_in(dir.path()), ["initramfs.cpio.gz"]);
    }

    #[test]
    fn write_atomic_rejects_paths_without_a_file_name() {
        let err = write_atomic(Path::new("/"), |_| Ok(())).unwrap_err();
        assert_eq!(err.to_string(), "/: output path has no file name");
    }

    #[test]
    fn bad_level_fails_before_creating_anything() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("initramfs.cpio.gz");
        let opts = PackOptions {
            compression: Compression::Gzip,
            level: Some(10),
            mtime: 0,
        };
        let err = pack(&Tree::new(), &opts, &out).unwrap_err().to_string();
        assert_eq!(err, "gzip compression level 10 is out of range 0..=9");
        assert!(names_in(dir.path()).is_empty());
    }
}
