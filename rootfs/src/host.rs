//! Reading host files for [`Source::Host`](crate::Source::Host): open, take the size once,
//! stream exactly that many bytes, and notice if the file changed size meanwhile.

use std::fs::{self, File};
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Read buffer size for streaming host files.
pub(crate) const BUF_SIZE: usize = 64 * 1024;

/// An opened regular host file and the size it had when opened.
pub(crate) struct HostFile {
    file: File,
    path: PathBuf,
    size: u64,
}

impl HostFile {
    /// Opens `path` (following symlinks), which must be a regular file.
    pub(crate) fn open(path: &Path) -> Result<HostFile> {
        // Checked before opening: opening a FIFO would block.
        let meta = fs::metadata(path).map_err(|e| Error::io("reading", path, e))?;
        if !meta.is_file() {
            return Err(not_a_file(path, &meta));
        }
        let file = File::open(path).map_err(|e| Error::io("reading", path, e))?;
        let meta = file.metadata().map_err(|e| Error::io("reading", path, e))?;
        if !meta.is_file() {
            return Err(not_a_file(path, &meta));
        }
        Ok(HostFile {
            file,
            path: path.to_owned(),
            size: meta.len(),
        })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Feeds exactly `size()` bytes to `sink`, in chunks of at most `buf.len()`.
    ///
    /// A file that ends early or has bytes left after `size()` is [`Error::SizeChanged`].
    pub(crate) fn stream(
        mut self,
        buf: &mut [u8],
        mut sink: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0u64;
        while done < self.size {
            let want = buf
                .len()
                .min(usize::try_from(self.size - done).unwrap_or(usize::MAX));
            let n = self.read(&mut buf[..want])?;
            if n == 0 {
                return Err(self.changed(done));
            }
            sink(&buf[..n])?;
            done += n as u64;
        }
        let mut extra = 0u64;
        loop {
            let n = self.read(buf)?;
            if n == 0 {
                break;
            }
            extra += n as u64;
        }
        if extra != 0 {
            return Err(self.changed(self.size + extra));
        }
        Ok(())
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize> {
        loop {
            match self.file.read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("reading", &self.path, e)),
            }
        }
    }

    fn changed(&self, found: u64) -> Error {
        Error::SizeChanged {
            path: self.path.clone(),
            expected: self.size,
            found,
        }
    }
}

fn not_a_file(path: &Path, meta: &fs::Metadata) -> Error {
    let kind = if meta.is_dir() {
        "directory"
    } else {
        "special file"
    };
    Error::NotAFile {
        path: path.to_owned(),
        kind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(path: &Path) -> Result<Vec<u8>> {
        let file = HostFile::open(path)?;
        let mut out = Vec::new();
        let mut buf = [0u8; 3];
        file.stream(&mut buf, |chunk| {
            out.extend_from_slice(chunk);
            Ok(())
        })?;
        Ok(out)
    }

    #[test]
    fn streams_whole_file_in_small_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"hello, world").unwrap();
        assert_eq!(collect(&path).unwrap(), b"hello, world");
    }

    #[test]
    fn growth_and_shrinkage_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"0123456789").unwrap();

        let file = HostFile::open(&path).unwrap();
        fs::write(&path, b"0123").unwrap();
        let err = file.stream(&mut [0u8; 4], |_| Ok(())).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: size changed while packing (10 bytes when opened, 4 when read)",
                path.display()
            )
        );

        let file = HostFile::open(&path).unwrap();
        fs::write(&path, b"0123456789abcdef").unwrap();
        let err = file.stream(&mut [0u8; 4], |_| Ok(())).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}: size changed while packing (4 bytes when opened, 16 when read)",
                path.display()
            )
        );
    }

    #[test]
    fn directories_and_missing_files_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = HostFile::open(dir.path()).err().unwrap().to_string();
        assert_eq!(
            err,
            format!(
                "{}: is a directory, expected a regular file",
                dir.path().display()
            )
        );
        let missing = dir.path().join("gone");
        let err = HostFile::open(&missing).err().unwrap().to_string();
        assert_eq!(
            err,
            format!("reading {}: No such file or directory", missing.display())
        );
    }
}
