//! bonsai's update bundle: one file holding a signed manifest and the chunks of a slot.
//!
//! ```text
//! offset 0   "BONSAI-BUNDLE-1\n"          16 bytes
//!        16  manifest length, u64 LE       8 bytes
//!        24  signature length, u64 LE      8 bytes
//!        32  the manifest (JSON)
//!            its signature (minisign's text format, Ed25519 over BLAKE2b-512)
//!            the payload: every distinct chunk once, in the order the manifest lists them
//! ```
//!
//! The manifest names the board, the version and the slot's files (size, SHA-256, the chunks
//! they are made of), and the chunk index (each chunk's SHA-256, size and offset in the
//! payload). Chunks are cut by content (FastCDC 2020) from the slot's files as they boot: the
//! initramfs is already compressed one gzip member per store path, so an unchanged store path
//! gives the same bytes and the same chunks, and the device writes exactly what the release
//! holds without recompressing anything.
//!
//! Verification never trusts the payload: the signature covers the manifest, the manifest pins
//! every chunk's hash, and a file is whole only when its own hash matches.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

mod sig;
#[cfg(feature = "sign")]
mod sign;
mod version;

pub use sig::{PublicKey, SIG_ALG_PREHASHED};
#[cfg(feature = "sign")]
pub use sign::{SecretKey, SECRET_KEY_COMMENT};
pub use version::compare as compare_versions;

/// The first bytes of every bundle.
pub const MAGIC: &[u8; 16] = b"BONSAI-BUNDLE-1\n";
/// The fixed header: magic and the two lengths.
pub const HEADER_LEN: u64 = 32;
/// The manifest's `format`.
pub const FORMAT: &str = "bonsai-bundle-1";
/// Largest manifest or signature a reader accepts (a manifest of a 1 GiB slot at 16 KiB
/// chunks is about 7 MiB).
pub const MAX_MANIFEST: u64 = 32 << 20;
pub const MAX_SIGNATURE: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

fn err<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error(msg.into()))
}

/// How chunks are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunking {
    pub algorithm: Algorithm,
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

/// The only chunking algorithm (a unit type that serialises as its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algorithm {
    #[serde(rename = "fastcdc-2020")]
    FastCdc2020,
}

impl Default for Chunking {
    /// 4/16/64 KiB: a one-package change touches a few chunks, and the index stays under 1 %
    /// of the payload (measured by `cargo xtask bench`).
    fn default() -> Self {
        Chunking {
            algorithm: Algorithm::FastCdc2020,
            min: 4 << 10,
            avg: 16 << 10,
            max: 64 << 10,
        }
    }
}

impl Chunking {
    /// The chunks of `data`, as `(offset, length)`.
    pub fn cut(&self, data: &[u8]) -> Vec<(usize, usize)> {
        if data.is_empty() {
            return Vec::new();
        }
        fastcdc::v2020::FastCDC::new(data, self.min, self.avg, self.max)
            .map(|c| (c.offset, c.length))
            .collect()
    }

    fn check(&self) -> Result<()> {
        let ok = fastcdc::v2020::MINIMUM_MIN <= self.min
            && self.min <= self.avg
            && self.avg <= self.max
            && self.max <= fastcdc::v2020::MAXIMUM_MAX;
        if ok {
            Ok(())
        } else {
            err(format!(
                "manifest: chunking {}/{}/{} is out of range",
                self.min, self.avg, self.max
            ))
        }
    }
}

/// A file of the slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// `linux`, `initrd` or `dtb`.
    pub name: String,
    pub size: u64,
    pub sha256: String,
    /// Indices into [`Manifest::chunks`], in order.
    pub chunks: Vec<u32>,
}

/// A distinct chunk in the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkEntry {
    pub sha256: String,
    pub size: u32,
    /// From the start of the payload.
    pub offset: u64,
}

/// What the signature covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub board: String,
    pub version: String,
    pub chunking: Chunking,
    pub files: Vec<FileEntry>,
    pub chunks: Vec<ChunkEntry>,
}

/// The slot's files allowed in a bundle, in the order they are written.
pub const FILE_NAMES: &[&str] = &["linux", "initrd", "dtb"];

pub fn sha256_hex(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let mut s = String::with_capacity(64);
    for b in d.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl Manifest {
    /// Cuts `files` (name, bytes) into chunks and returns the manifest and the payload.
    pub fn build(
        board: &str,
        version: &str,
        chunking: Chunking,
        files: &[(&str, &[u8])],
    ) -> Result<(Manifest, Vec<u8>)> {
        chunking.check()?;
        let mut chunks: Vec<ChunkEntry> = Vec::new();
        let mut index: HashMap<String, u32> = HashMap::new();
        let mut payload = Vec::new();
        let mut entries = Vec::new();
        for (name, data) in files {
            if !FILE_NAMES.contains(name) {
                return err(format!("bundle: unknown slot file {name:?}"));
            }
            let mut ids = Vec::new();
            for (off, len) in chunking.cut(data) {
                let bytes = &data[off..off + len];
                let sha = sha256_hex(bytes);
                let id = match index.get(&sha) {
                    Some(id) => *id,
                    None => {
                        let id = chunks.len() as u32;
                        chunks.push(ChunkEntry {
                            sha256: sha.clone(),
                            size: len as u32,
                            offset: payload.len() as u64,
                        });
                        payload.extend_from_slice(bytes);
                        index.insert(sha, id);
                        id
                    }
                };
                ids.push(id);
            }
            entries.push(FileEntry {
                name: name.to_string(),
                size: data.len() as u64,
                sha256: sha256_hex(data),
                chunks: ids,
            });
        }
        let m = Manifest {
            format: FORMAT.into(),
            board: board.into(),
            version: version.into(),
            chunking,
            files: entries,
            chunks,
        };
        m.check()?;
        Ok((m, payload))
    }

    /// The manifest's bytes: what is signed and what the bundle holds.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("a manifest serialises");
        v.push(b'\n');
        v
    }

    /// Parses and checks the manifest's own consistency (not its signature).
    pub fn parse(bytes: &[u8]) -> Result<Manifest> {
        let m: Manifest = serde_json::from_slice(bytes)
            .map_err(|e| Error(format!("manifest: not a bonsai bundle manifest: {e}")))?;
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<()> {
        if self.format != FORMAT {
            return err(format!(
                "manifest: format {:?}, this bonsai-update reads {FORMAT:?}",
                self.format
            ));
        }
        self.chunking.check()?;
        let mut expect = 0u64;
        for (i, c) in self.chunks.iter().enumerate() {
            if c.offset != expect || c.size == 0 || c.size > self.chunking.max {
                return err(format!("manifest: chunk {i} has a bad offset or size"));
            }
            if !is_hex64(&c.sha256) {
                return err(format!("manifest: chunk {i} has a bad sha256"));
            }
            expect += u64::from(c.size);
        }
        let mut seen = Vec::new();
        for f in &self.files {
            if !FILE_NAMES.contains(&f.name.as_str()) || seen.contains(&f.name) {
                return err(format!(
                    "manifest: file {:?} is unknown or repeated",
                    f.name
                ));
            }
            seen.push(f.name.clone());
            if !is_hex64(&f.sha256) {
                return err(format!("manifest: file {} has a bad sha256", f.name));
            }
            let mut size = 0u64;
            for id in &f.chunks {
                let Some(c) = self.chunks.get(*id as usize) else {
                    return err(format!(
                        "manifest: file {} names chunk {id}, which is not in the index",
                        f.name
                    ));
                };
                size += u64::from(c.size);
            }
            if size != f.size {
                return err(format!(
                    "manifest: file {}'s chunks add up to {size} bytes, not {}",
                    f.name, f.size
                ));
            }
        }
        if !seen.iter().any(|n| n == "linux") || !seen.iter().any(|n| n == "initrd") {
            return err("manifest: a slot needs linux and initrd");
        }
        Ok(())
    }

    pub fn payload_len(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.size)).sum()
    }

    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The header of a bundle: where its parts are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub manifest_len: u64,
    pub signature_len: u64,
}

impl Header {
    pub fn parse(bytes: &[u8]) -> Result<Header> {
        if bytes.len() < HEADER_LEN as usize || &bytes[..16] != MAGIC {
            return err("not a bonsai bundle (no BONSAI-BUNDLE-1 header)");
        }
        let n = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        let h = Header {
            manifest_len: n(16),
            signature_len: n(24),
        };
        if h.manifest_len == 0 || h.manifest_len > MAX_MANIFEST {
            return err(format!(
                "bundle header: manifest length {} is out of range",
                h.manifest_len
            ));
        }
        if h.signature_len == 0 || h.signature_len > MAX_SIGNATURE {
            return err(format!(
                "bundle header: signature length {} is out of range",
                h.signature_len
            ));
        }
        Ok(h)
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&self.manifest_len.to_le_bytes());
        v.extend_from_slice(&self.signature_len.to_le_bytes());
        v
    }

    /// Where the payload starts in the bundle.
    pub fn payload_offset(&self) -> u64 {
        HEADER_LEN + self.manifest_len + self.signature_len
    }
}

/// A bundle's whole bytes: header, manifest, signature, payload.
pub fn assemble(manifest: &[u8], signature: &[u8], payload: &[u8]) -> Vec<u8> {
    let h = Header {
        manifest_len: manifest.len() as u64,
        signature_len: signature.len() as u64,
    };
    let mut v = h.bytes();
    v.extend_from_slice(manifest);
    v.extend_from_slice(signature);
    v.extend_from_slice(payload);
    v
}

/// A manifest whose signature checked out against a key.
#[derive(Debug, Clone)]
pub struct Verified {
    pub manifest: Manifest,
    pub header: Header,
}

/// Checks the bundle's head (header, manifest and signature; `head` holds at least
/// [`Header::payload_offset`] bytes) against `key`.
pub fn verify_head(head: &[u8], key: &PublicKey) -> Result<Verified> {
    let header = Header::parse(head)?;
    let end = header.payload_offset() as usize;
    if head.len() < end {
        return err(format!(
            "bundle is truncated: {} bytes, its manifest and signature end at {end}",
            head.len()
        ));
    }
    let m_end = (HEADER_LEN + header.manifest_len) as usize;
    let manifest = &head[HEADER_LEN as usize..m_end];
    let signature = std::str::from_utf8(&head[m_end..end])
        .map_err(|_| Error("bundle: the signature is not text".into()))?;
    key.verify(manifest, signature)?;
    let manifest = Manifest::parse(manifest)?;
    Ok(Verified { manifest, header })
}

/// Chunks already on the device, by SHA-256: where each can be copied from.
#[derive(Debug, Default)]
pub struct Local {
    /// (source name, offset, length) by hash.
    pub by_hash: HashMap<String, (usize, usize, usize)>,
    sources: Vec<(String, Vec<u8>)>,
}

impl Local {
    /// Cuts `data` (a file of a slot on the device) with `chunking` and indexes its chunks.
    pub fn add(&mut self, name: &str, data: Vec<u8>, chunking: &Chunking) {
        let src = self.sources.len();
        for (off, len) in chunking.cut(&data) {
            let sha = sha256_hex(&data[off..off + len]);
            self.by_hash.entry(sha).or_insert((src, off, len));
        }
        self.sources.push((name.to_string(), data));
    }

    pub fn get(&self, sha: &str) -> Option<&[u8]> {
        self.by_hash
            .get(sha)
            .map(|&(s, off, len)| &self.sources[s].1[off..off + len])
    }
}

/// What an install must fetch: the chunks the device lacks, as byte ranges of the payload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Indices of the chunks to fetch.
    pub fetch: Vec<u32>,
    /// Indices of the chunks found on the device.
    pub reuse: Vec<u32>,
    pub fetch_bytes: u64,
    pub reuse_bytes: u64,
}

impl Plan {
    pub fn new(m: &Manifest, have: impl Fn(&str) -> bool) -> Plan {
        let mut p = Plan {
            fetch: Vec::new(),
            reuse: Vec::new(),
            fetch_bytes: 0,
            reuse_bytes: 0,
        };
        for (i, c) in m.chunks.iter().enumerate() {
            if have(&c.sha256) {
                p.reuse.push(i as u32);
                p.reuse_bytes += u64::from(c.size);
            } else {
                p.fetch.push(i as u32);
                p.fetch_bytes += u64::from(c.size);
            }
        }
        p
    }

    /// The chunks to fetch merged into contiguous payload ranges `(offset, length)`.
    pub fn ranges(&self, m: &Manifest) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &i in &self.fetch {
            let c = &m.chunks[i as usize];
            match out.last_mut() {
                Some((off, len)) if *off + *len == c.offset => *len += u64::from(c.size),
                _ => out.push((c.offset, u64::from(c.size))),
            }
        }
        out
    }
}

/// Verified chunks by index, filled from the device and from fetched bytes.
#[derive(Debug, Default)]
pub struct Store {
    chunks: BTreeMap<u32, Vec<u8>>,
}

impl Store {
    /// Keeps chunk `i` if its bytes hash to what the manifest says; an error names the chunk.
    pub fn put(&mut self, m: &Manifest, i: u32, bytes: &[u8]) -> Result<()> {
        let c = m
            .chunks
            .get(i as usize)
            .ok_or_else(|| Error(format!("chunk {i} is not in the manifest")))?;
        if bytes.len() != c.size as usize || sha256_hex(bytes) != c.sha256 {
            return err(format!(
                "chunk {i} (payload offset {}, {} bytes) does not match its sha256 {}",
                c.offset, c.size, c.sha256
            ));
        }
        self.chunks.insert(i, bytes.to_vec());
        Ok(())
    }

    pub fn has(&self, i: u32) -> bool {
        self.chunks.contains_key(&i)
    }

    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Splits fetched payload bytes starting at `offset` into the manifest's chunks and keeps
    /// each whole, verified one; returns how many it kept. A chunk that fails its hash is an
    /// error.
    pub fn put_range(&mut self, m: &Manifest, offset: u64, bytes: &[u8]) -> Result<usize> {
        let mut kept = 0;
        let first = m
            .chunks
            .partition_point(|c| c.offset + u64::from(c.size) <= offset);
        for (i, c) in m.chunks.iter().enumerate().skip(first) {
            if c.offset < offset {
                continue;
            }
            let start = (c.offset - offset) as usize;
            let end = start + c.size as usize;
            if end > bytes.len() {
                break;
            }
            if !self.has(i as u32) {
                self.put(m, i as u32, &bytes[start..end])?;
                kept += 1;
            }
        }
        Ok(kept)
    }

    /// The file `name` assembled from its chunks and checked against its own hash.
    pub fn file(&self, m: &Manifest, name: &str) -> Result<Vec<u8>> {
        let f = m
            .file(name)
            .ok_or_else(|| Error(format!("manifest has no file {name}")))?;
        let mut v = Vec::with_capacity(f.size as usize);
        for id in &f.chunks {
            let c = self
                .chunks
                .get(id)
                .ok_or_else(|| Error(format!("chunk {id} of {name} is missing")))?;
            v.extend_from_slice(c);
        }
        if sha256_hex(&v) != f.sha256 {
            return err(format!("{name} does not match its sha256 {}", f.sha256));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests;
