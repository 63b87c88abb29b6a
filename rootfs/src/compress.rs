//! Initramfs compression: gzip, zstd or xz, configured so the output depends only on the
//! input bytes and the level (never on the number of threads), and so the Linux kernel can
//! unpack it.
//!
//! gzip is compressed on every core by [`pargz`] (one gzip member cut into 1 MiB blocks per
//! segment, each store path a segment, with blocks reusable from a [`PieceCache`]); zstd and
//! xz stay single-threaded (see [`compress_writer`]).

use std::fmt;
use std::io::{self, Write};
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::sync::Arc;

use liblzma::stream::{Check, Filters, LzmaOptions, Stream};
use liblzma::write::XzEncoder;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::piececache::PieceCache;

#[path = "pargz.rs"]
pub mod pargz;
use pargz::ParGzEncoder;

/// Environment variable that sets the number of compression threads (default: the number of
/// cores). It changes the speed only, never the output.
pub const THREADS_ENV: &str = "BONSAI_THREADS";

/// Compression threads: `BONSAI_THREADS` if set to a positive number, else the number of
/// cores the process may use.
pub fn default_threads() -> usize {
    std::env::var(THREADS_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Largest xz dictionary we use. The kernel allocates the whole dictionary named in the
/// stream header when it unpacks an initramfs, so preset 9's 64 MiB would be 64 MiB of boot
/// memory; the kernel's own initramfs rule (`xzmisc` in scripts/Makefile.lib) uses 1 MiB.
pub const XZ_MAX_DICT_SIZE: u32 = 1 << 20;

/// How the cpio archive is compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// A plain `initramfs.cpio`.
    None,
    /// gzip via flate2 (level 0–9, default 9); every kernel can unpack it.
    #[default]
    Gzip,
    /// zstd (level 1–22, default 19), with a content checksum.
    Zstd,
    /// xz (preset 0–9, default 9) with a CRC32 check, the only check the kernel accepts
    /// besides none.
    Xz,
}

impl Compression {
    /// Every choice, in the order error messages list them.
    pub const ALL: [Compression; 4] = [
        Compression::None,
        Compression::Gzip,
        Compression::Zstd,
        Compression::Xz,
    ];

    /// The name used in config files and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
            Compression::Xz => "xz",
        }
    }

    /// The file extension without the dot; empty for `None`.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Gzip => "gz",
            Compression::Zstd => "zst",
            Compression::Xz => "xz",
        }
    }

    /// `initramfs.cpio.gz`, `initramfs.cpio.zst`, `initramfs.cpio.xz` or `initramfs.cpio`.
    pub fn file_name(self) -> &'static str {
        match self {
            Compression::None => "initramfs.cpio",
            Compression::Gzip => "initramfs.cpio.gz",
            Compression::Zstd => "initramfs.cpio.zst",
            Compression::Xz => "initramfs.cpio.xz",
        }
    }

    /// The level used when none is given; `None` for no compression.
    pub fn default_level(self) -> Option<u32> {
        match self {
            Compression::None => None,
            Compression::Gzip | Compression::Xz => Some(9),
            Compression::Zstd => Some(19),
        }
    }

    /// The levels this compressor accepts; `None` for no compression.
    pub fn levels(self) -> Option<RangeInclusive<u32>> {
        match self {
            Compression::None => None,
            Compression::Gzip | Compression::Xz => Some(0..=9),
            Compression::Zstd => Some(1..=22),
        }
    }

    /// The level to use: `level` if given and in range, else the default.
    pub fn resolve_level(self, level: Option<u32>) -> Result<Option<u32>> {
        match (self.levels(), level) {
            (None, Some(level)) => Err(Error::LevelWithoutCompression { level }),
            (Some(range), Some(level)) if !range.contains(&level) => Err(Error::InvalidLevel {
                compression: self,
                level,
                min: *range.start(),
                max: *range.end(),
            }),
            (_, Some(level)) => Ok(Some(level)),
            (_, None) => Ok(self.default_level()),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Compression {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Compression::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| Error::UnknownCompression { name: s.to_owned() })
    }
}

/// A compressing writer; call [`Encoder::finish`] to end the stream and get `W` back.
pub enum Encoder<W: Write> {
    None(W),
    Gzip(ParGzEncoder<W>),
    Zstd(zstd::Encoder<'static, W>),
    Xz(XzEncoder<W>),
}

impl<W: Write> Encoder<W> {
    /// Like [`compress_writer`], with `threads` compression threads instead of
    /// [`default_threads`]. The output is the same for any `threads`.
    pub fn with_threads(
        compression: Compression,
        level: Option<u32>,
        threads: usize,
        out: W,
    ) -> Result<Encoder<W>> {
        let level = compression.resolve_level(level)?;
        let setup = |error| Error::CompressorSetup { compression, error };
        Ok(match (compression, level) {
            (Compression::None, _) | (_, None) => Encoder::None(out),
            (Compression::Gzip, Some(level)) => {
                Encoder::Gzip(ParGzEncoder::new(out, level, threads).map_err(setup)?)
            }
            (Compression::Zstd, Some(level)) => {
                // Level is at most 22 (checked above).
                let mut enc = zstd::Encoder::new(out, level as i32).map_err(setup)?;
                enc.include_checksum(true).map_err(setup)?;
                Encoder::Zstd(enc)
            }
            (Compression::Xz, Some(level)) => {
                let stream = xz_stream(level).map_err(|e| setup(io::Error::other(e)))?;
                Encoder::Xz(XzEncoder::new_stream(out, stream))
            }
        })
    }

    /// Like [`Encoder::with_threads`]; gzip takes compressed blocks from `cache` and stores
    /// new ones there (other compressions ignore it). The output is the same either way.
    pub fn with_cache(
        compression: Compression,
        level: Option<u32>,
        threads: usize,
        cache: Option<Arc<PieceCache>>,
        out: W,
    ) -> Result<Encoder<W>> {
        match (compression, compression.resolve_level(level)?, cache) {
            (Compression::Gzip, Some(level), Some(cache)) => {
                ParGzEncoder::with_cache(out, level, threads, Some(cache))
                    .map(Encoder::Gzip)
                    .map_err(|error| Error::CompressorSetup { compression, error })
            }
            _ => Encoder::with_threads(compression, level, threads, out),
        }
    }

    /// Writes the end of the compressed stream and returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Encoder::None(w) => Ok(w),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zstd(e) => e.finish(),
            Encoder::Xz(e) => e.finish(),
        }
    }
}

/// gzip starts a new segment (see [`pargz`]); the other compressors ignore segments.
impl<W: Write> crate::cpio::Segmented for Encoder<W> {
    fn cut(&mut self) -> io::Result<()> {
        match self {
            Encoder::Gzip(e) => e.cut(),
            _ => Ok(()),
        }
    }
}

impl<W: Write> Write for Encoder<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Encoder::None(w) => w.write(buf),
            Encoder::Gzip(e) => e.write(buf),
            Encoder::Zstd(e) => e.write(buf),
            Encoder::Xz(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Encoder::None(w) => w.flush(),
            Encoder::Gzip(e) => e.flush(),
            Encoder::Zstd(e) => e.flush(),
            Encoder::Xz(e) => e.flush(),
        }
    }
}

/// Wraps `out` in a compressor. `level` defaults per [`Compression::default_level`] and is
/// checked against [`Compression::levels`]. gzip uses [`default_threads`] threads.
///
/// Deterministic by construction: gzip has no file name and mtime 0 in its header and cuts its
/// input at fixed offsets whatever the thread count ([`pargz`]); zstd runs single-threaded;
/// xz uses a fixed preset and dictionary. Identical input gives identical output for a given
/// library version.
///
/// Why zstd stays single-threaded: its multithreaded mode does give the same bytes for any
/// number of workers from 1 up (checked with 1–4 workers), but other bytes than with none,
/// and it is no faster on an initramfs: at level 19 a job is 32 MiB, so an image is one job,
/// and with 4 MiB jobs every job reloads the 8 MiB window before it, which made a 12 MB
/// input slower on two cores (20 s with one worker, 25 s with two, 14.5 s without).
pub fn compress_writer<W: Write>(
    compression: Compression,
    level: Option<u32>,
    out: W,
) -> Result<Encoder<W>> {
    Encoder::with_threads(compression, level, default_threads(), out)
}

fn xz_stream(level: u32) -> std::result::Result<Stream, liblzma::stream::Error> {
    let mut options = LzmaOptions::new_preset(level)?;
    let dict_size = options_dict_size(level).min(XZ_MAX_DICT_SIZE);
    options.dict_size(dict_size);
    let mut filters = Filters::new();
    filters.lzma2(&options);
    Stream::new_stream_encoder(&filters, Check::Crc32)
}

/// Dictionary size of an xz preset (xz(1)'s preset table; liblzma's options hide the field).
fn options_dict_size(level: u32) -> u32 {
    const MIB: u32 = 1 << 20;
    match level {
        0 => 256 << 10,
        1 => MIB,
        2 => 2 * MIB,
        3 | 4 => 4 * MIB,
        5 | 6 => 8 * MIB,
        7 => 16 * MIB,
        8 => 32 * MIB,
        _ => 64 * MIB,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn compress(c: Compression, level: Option<u32>, data: &[u8]) -> Vec<u8> {
        let mut enc = compress_writer(c, level, Vec::new()).unwrap();
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn sample() -> Vec<u8> {
        (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn names_parse_and_list_choices_on_error() {
        for c in Compression::ALL {
            assert_eq!(c.name().parse::<Compression>().unwrap(), c);
        }
        let err = "lz4".parse::<Compression>().unwrap_err().to_string();
        assert_eq!(
            err,
            "unknown compression \"lz4\", expected one of: none, gzip, zstd, xz"
        );
        #[derive(Deserialize)]
        struct Board {
            compression: Compression,
        }
        let b: Board = serde_json::from_str(r#"{"compression":"zstd"}"#).unwrap();
        assert_eq!(b.compression, Compression::Zstd);
        assert!(serde_json::from_str::<Board>(r#"{"compression":"Zstd"}"#).is_err());
    }

    #[test]
    fn file_names_and_extensions() {
        assert_eq!(Compression::default(), Compression::Gzip);
        for c in Compression::ALL {
            let expected = match c.extension() {
                "" => "initramfs.cpio".to_owned(),
                ext => format!("initramfs.cpio.{ext}"),
            };
            assert_eq!(c.file_name(), expected);
        }
    }

    #[test]
    fn levels_are_checked() {
        let err = compress_writer(Compression::Zstd, Some(23), Vec::new())
            .err()
            .unwrap()
            .to_string();
        assert_eq!(err, "zstd compression level 23 is out of range 1..=22");
        let err = compress_writer(Compression::None, Some(1), Vec::new())
            .err()
            .unwrap()
            .to_string();
        assert_eq!(err, "compression level 1 given, but compression is none");
        assert_eq!(Compression::Xz.resolve_level(None).unwrap(), Some(9));
    }

    #[test]
    fn gzip_round_trips_with_a_fixed_header() {
        let data = sample();
        let gz = compress(Compression::Gzip, None, &data);
        // No FNAME flag, mtime 0, XFL 2 (best), OS 255 (unknown).
        assert_eq!(&gz[..10], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 2, 255]);
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn zstd_round_trips() {
        let data = sample();
        let zst = compress(Compression::Zstd, None, &data);
        assert_eq!(zstd::decode_all(&zst[..]).unwrap(), data);
    }

    #[test]
    fn xz_round_trips_with_crc32_check() {
        let data = sample();
        let xz = compress(Compression::Xz, None, &data);
        // Stream flags: second byte is the check type, 0x01 = CRC32.
        assert_eq!(&xz[..8], b"\xfd7zXZ\0\0\x01");
        // First block header: one filter, LZMA2 (0x21), 1 property byte, dictionary 1 MiB.
        assert_eq!(&xz[13..17], &[0x00, 0x21, 0x01, 0x10]);
        let mut back = Vec::new();
        liblzma::read::XzDecoder::new(&xz[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn gzip_is_the_same_for_1_2_and_4_threads_and_unpacks_with_gnu_gzip() {
        // Over three pargz blocks, so the threads have something to share.
        let data: Vec<u8> = sample().into_iter().cycle().take(3_500_000).collect();
        let with = |threads| {
            let mut enc =
                Encoder::with_threads(Compression::Gzip, None, threads, Vec::new()).unwrap();
            enc.write_all(&data).unwrap();
            enc.finish().unwrap()
        };
        let one = with(1);
        assert!(with(2) == one, "2 threads gave other bytes");
        assert!(with(4) == one, "4 threads gave other bytes");
        assert!(compress(Compression::Gzip, None, &data) == one);
        let mut back = Vec::new();
        flate2::read::MultiGzDecoder::new(&one[..])
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == data);
        let mut gzip = std::process::Command::new("gzip")
            .arg("-dc")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("GNU gzip is installed (apt-get install gzip)");
        let mut stdin = gzip.stdin.take().unwrap();
        let feeder = std::thread::spawn(move || stdin.write_all(&one));
        let out = gzip.wait_with_output().unwrap();
        feeder.join().unwrap().unwrap();
        assert!(out.status.success());
        assert!(out.stdout == data, "gzip -dc gave other bytes");
    }

    #[test]
    fn output_is_deterministic() {
        let data = sample();
        for c in Compression::ALL {
            assert_eq!(compress(c, None, &data), compress(c, None, &data), "{c}");
        }
        assert_eq!(compress(Compression::None, None, &data), data);
    }
}
