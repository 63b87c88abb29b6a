//! A byte range of a disk (a partition) as a stream of its own, so that a file system writer
//! sees offset 0 at the partition's first byte and cannot write past its end.

use std::io::{self, Read, Seek, SeekFrom, Write};

/// `len` bytes of `inner` from `start`.
pub struct Part<'a, T> {
    inner: &'a mut T,
    start: u64,
    len: u64,
    pos: u64,
}

impl<'a, T: Seek> Part<'a, T> {
    pub fn new(inner: &'a mut T, start: u64, len: u64) -> io::Result<Self> {
        inner.seek(SeekFrom::Start(start))?;
        Ok(Part {
            inner,
            start,
            len,
            pos: 0,
        })
    }

    fn room(&self, want: usize) -> usize {
        want.min(self.len.saturating_sub(self.pos) as usize)
    }
}

impl<T: Read + Seek> Read for Part<'_, T> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.room(buf.len());
        if n == 0 {
            return Ok(0);
        }
        self.inner.seek(SeekFrom::Start(self.start + self.pos))?;
        let got = self.inner.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl<T: Write + Seek> Write for Part<'_, T> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.room(buf.len());
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "write past the end of the partition",
            ));
        }
        self.inner.seek(SeekFrom::Start(self.start + self.pos))?;
        let put = self.inner.write(&buf[..n])?;
        self.pos += put as u64;
        Ok(put)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<T: Seek> Seek for Part<'_, T> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match target {
            Some(p) if p <= self.len => {
                self.pos = p;
                Ok(p)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek outside the partition",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn reads_and_writes_stay_inside_the_range() {
        let mut disk = Cursor::new(vec![0u8; 64]);
        {
            let mut p = Part::new(&mut disk, 16, 8).unwrap();
            p.write_all(b"abcdefgh").unwrap();
            assert!(p.write_all(b"i").is_err());
            assert_eq!(p.seek(SeekFrom::End(-2)).unwrap(), 6);
            let mut two = [0; 4];
            assert_eq!(p.read(&mut two).unwrap(), 2);
            assert_eq!(&two[..2], b"gh");
            assert!(p.seek(SeekFrom::Start(9)).is_err());
        }
        let bytes = disk.into_inner();
        assert_eq!(&bytes[16..24], b"abcdefgh");
        assert!(bytes[..16].iter().chain(&bytes[24..]).all(|b| *b == 0));
    }
}
