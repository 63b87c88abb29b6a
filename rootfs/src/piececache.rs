//! A cache of compressed gzip blocks, keyed by content (see [`crate::compress::pargz`]).
//!
//! A block's compressed bytes are a function of the compression level, the block's
//! dictionary and its data, and of the compressor's code. The key is the SHA-256 of all of
//! them, the code standing in as a *salt* the caller gives (bonsai uses the hash of its own
//! executable, so a new build of bonsai never reads blocks an older one compressed). An entry
//! is therefore never stale: the same key can only ever hold the same bytes.
//!
//! Each entry is checked before it is used: a fixed header (magic, the key again, the data
//! length, the payload length, the payload's SHA-256) and the sync-flush marker every block
//! ends with. An entry that fails any check (truncated, flipped bits, written by something
//! else) is counted, reported, deleted and compressed again; it is never used.
//!
//! Entries are written to a temporary file and renamed into place, so two builds sharing the
//! cache never see half an entry. A failure to write (a full or read-only disk) costs the
//! speed-up only: it is counted and the build carries on. [`PieceCache::prune`] keeps the
//! folder under a size, least recently used first.

use std::fs::{self, File};
use std::io::{self, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

const MAGIC: &[u8; 16] = b"bonsai-gzpiece1\n";
/// Part of every key: changing the block format changes it.
const KEY_VERSION: &[u8] = b"bonsai pargz piece v1\0";
/// magic, key, data length, payload length, payload SHA-256.
const HEADER: usize = 16 + 32 + 8 + 8 + 32;
/// What every block ends with (the empty stored block of a sync flush).
const SYNC_MARKER: [u8; 4] = [0, 0, 0xff, 0xff];
/// Temporary files older than this are leftovers of a killed build; prune removes them.
const STALE_TEMP: Duration = Duration::from_secs(3600);

/// Counts for one use of the cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    /// Blocks taken from the cache.
    pub hits: u64,
    /// Blocks compressed (not in the cache, or their entry was corrupt).
    pub misses: u64,
    /// Uncompressed bytes of the blocks taken from the cache.
    pub reused_bytes: u64,
    /// Entries written.
    pub stored: u64,
    /// Entries that failed their checks and were deleted and compressed again.
    pub corrupt: u64,
    /// Entries that could not be written.
    pub write_errors: u64,
}

/// What [`PieceCache::prune`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    pub removed: u64,
    pub removed_bytes: u64,
    pub kept: u64,
    pub kept_bytes: u64,
}

/// A folder of compressed blocks; see the module docs.
#[derive(Debug)]
pub struct PieceCache {
    dir: PathBuf,
    salt: Vec<u8>,
    hits: AtomicU64,
    misses: AtomicU64,
    reused_bytes: AtomicU64,
    stored: AtomicU64,
    write_errors: AtomicU64,
    temp_counter: AtomicU64,
    /// Entries that failed their checks: (path, what was wrong).
    corrupt: Mutex<Vec<(PathBuf, String)>>,
    first_write_error: Mutex<Option<String>>,
}

impl PieceCache {
    /// Opens (creating it if needed) the cache in `dir`; `salt` identifies the compressor's
    /// code and is part of every key.
    pub fn open(dir: &Path, salt: &[u8]) -> Result<PieceCache> {
        fs::create_dir_all(dir).map_err(|e| Error::io("creating the pack cache", dir, e))?;
        Ok(PieceCache {
            dir: dir.to_owned(),
            salt: salt.to_vec(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            reused_bytes: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            temp_counter: AtomicU64::new(0),
            corrupt: Mutex::new(Vec::new()),
            first_write_error: Mutex::new(None),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key of a block: SHA-256 over the format version, the salt, the level, the
    /// dictionary and the data, each length-prefixed.
    pub(crate) fn key(&self, level: u32, dict: &[u8], data: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        let mut part = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        part(KEY_VERSION);
        part(&self.salt);
        part(&level.to_le_bytes());
        part(dict);
        part(data);
        h.finalize().into()
    }

    /// Where the entry for `key` lives: `<dir>/<first two hex digits>/<the other 62>`.
    pub fn path_of(&self, key: &[u8; 32]) -> PathBuf {
        let hex = crate::hex(key);
        self.dir.join(&hex[..2]).join(&hex[2..])
    }

    /// The compressed bytes of the block with `key` and `data_len` uncompressed bytes, if
    /// the cache holds an entry that passes every check.
    pub(crate) fn get(&self, key: &[u8; 32], data_len: usize) -> Option<Vec<u8>> {
        let path = self.path_of(key);
        let entry = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Err(e) => {
                self.reject(
                    path,
                    format!("unreadable: {}", crate::error::io_message(&e)),
                );
                return None;
            }
        };
        match check(&entry, key, data_len) {
            Ok(()) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                self.reused_bytes
                    .fetch_add(data_len as u64, Ordering::Relaxed);
                // Recently used entries survive pruning; failing to note it costs nothing.
                if let Ok(f) = File::options().write(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                Some(entry[HEADER..].to_vec())
            }
            Err(reason) => {
                let _ = fs::remove_file(&path);
                self.reject(path, reason);
                None
            }
        }
    }

    fn reject(&self, path: PathBuf, reason: String) {
        self.misses.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut list) = self.corrupt.lock() {
            list.push((path, reason));
        }
    }

    /// Stores a block's compressed bytes under `key`; a failure is counted, not returned.
    pub(crate) fn put(&self, key: &[u8; 32], payload: &[u8], data_len: usize) {
        match self.write_entry(key, payload, data_len) {
            Ok(()) => {
                self.stored.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.write_errors.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut first) = self.first_write_error.lock() {
                    first.get_or_insert(e);
                }
            }
        }
    }

    fn write_entry(
        &self,
        key: &[u8; 32],
        payload: &[u8],
        data_len: usize,
    ) -> std::result::Result<(), String> {
        let path = self.path_of(key);
        let dir = path.parent().expect("entries live in a subfolder");
        let fail = |what: &str, p: &Path, e: io::Error| {
            format!("{what} {}: {}", p.display(), crate::error::io_message(&e))
        };
        fs::create_dir_all(dir).map_err(|e| fail("creating", dir, e))?;
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".tmp-{}-{n}", std::process::id()));
        let mut entry = Vec::with_capacity(HEADER + payload.len());
        entry.extend_from_slice(MAGIC);
        entry.extend_from_slice(key);
        entry.extend_from_slice(&(data_len as u64).to_le_bytes());
        entry.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        entry.extend_from_slice(&Sha256::digest(payload));
        entry.extend_from_slice(payload);
        let written = File::create(&tmp).and_then(|mut f| f.write_all(&entry));
        if let Err(e) = written.and_then(|()| fs::rename(&tmp, &path)) {
            let _ = fs::remove_file(&tmp);
            return Err(fail("writing", &path, e));
        }
        Ok(())
    }

    /// The counts so far.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            reused_bytes: self.reused_bytes.load(Ordering::Relaxed),
            stored: self.stored.load(Ordering::Relaxed),
            corrupt: self.corrupt.lock().map_or(0, |l| l.len() as u64),
            write_errors: self.write_errors.load(Ordering::Relaxed),
        }
    }

    /// The entries that failed their checks, sorted: (path, what was wrong).
    pub fn corrupt_entries(&self) -> Vec<(PathBuf, String)> {
        let mut list = self.corrupt.lock().map(|l| l.clone()).unwrap_or_default();
        list.sort();
        list
    }

    /// The first entry that could not be written, and why.
    pub fn first_write_error(&self) -> Option<String> {
        self.first_write_error.lock().ok().and_then(|e| e.clone())
    }

    /// Removes the least recently used entries until the cache holds at most `max_bytes`,
    /// and temporary files that killed builds left behind.
    pub fn prune(&self, max_bytes: u64) -> Result<PruneReport> {
        let mut entries = Vec::new();
        let read = |d: &Path| fs::read_dir(d).map_err(|e| Error::io("reading", d, e));
        let now = SystemTime::now();
        let mut report = PruneReport::default();
        for sub in read(&self.dir)? {
            let sub = sub.map_err(|e| Error::io("reading", &self.dir, e))?;
            if !sub.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            for e in read(&sub.path())? {
                let Ok(e) = e else { continue };
                let Ok(meta) = e.metadata() else { continue };
                let modified = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    if now.duration_since(modified).unwrap_or_default() > STALE_TEMP
                        && fs::remove_file(e.path()).is_ok()
                    {
                        report.removed += 1;
                        report.removed_bytes += meta.len();
                    }
                    continue;
                }
                entries.push((modified, e.path(), meta.len()));
            }
        }
        // Oldest first; the path breaks ties so the order is the same every time.
        entries.sort();
        let mut total: u64 = entries.iter().map(|e| e.2).sum();
        for (_, path, len) in &entries {
            if total <= max_bytes {
                report.kept += 1;
                report.kept_bytes += len;
                continue;
            }
            if fs::remove_file(path).is_ok() {
                total -= len;
                report.removed += 1;
                report.removed_bytes += len;
            } else {
                report.kept += 1;
                report.kept_bytes += len;
            }
        }
        Ok(report)
    }
}

/// Checks an entry against its key and the length of the data it stands for.
fn check(entry: &[u8], key: &[u8; 32], data_len: usize) -> std::result::Result<(), String> {
    if entry.len() < HEADER {
        return Err(format!(
            "truncated: {} bytes, shorter than the header",
            entry.len()
        ));
    }
    if &entry[..16] != MAGIC {
        return Err("not a bonsai cache entry (bad magic)".into());
    }
    if &entry[16..48] != key {
        return Err("holds another key".into());
    }
    let field = |at: usize| u64::from_le_bytes(entry[at..at + 8].try_into().expect("8 bytes"));
    if field(48) != data_len as u64 {
        return Err(format!("stands for {} bytes, not {data_len}", field(48)));
    }
    let payload = &entry[HEADER..];
    if field(56) != payload.len() as u64 {
        return Err(format!(
            "truncated: payload is {} bytes, the header says {}",
            payload.len(),
            field(56)
        ));
    }
    if Sha256::digest(payload)[..] != entry[64..96] {
        return Err("checksum mismatch".into());
    }
    if !payload.ends_with(&SYNC_MARKER) {
        return Err("payload does not end a deflate block".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(dir: &Path) -> PieceCache {
        PieceCache::open(&dir.join("pack"), b"test salt").unwrap()
    }

    #[test]
    fn keys_cover_salt_level_dictionary_and_data() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path());
        let base = c.key(9, b"dict", b"data");
        assert_eq!(base, c.key(9, b"dict", b"data"));
        assert_ne!(base, c.key(6, b"dict", b"data"));
        assert_ne!(base, c.key(9, b"dic", b"tdata"));
        assert_ne!(base, c.key(9, b"", b"dictdata"));
        let other = PieceCache::open(&dir.path().join("pack"), b"other salt").unwrap();
        assert_ne!(base, other.key(9, b"dict", b"data"));
    }

    #[test]
    fn round_trip_and_every_kind_of_damage_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path());
        let key = c.key(9, b"", b"hello");
        let payload = [1u8, 2, 3, 0, 0, 0xff, 0xff];
        assert_eq!(c.get(&key, 5), None);
        c.put(&key, &payload, 5);
        assert_eq!(c.get(&key, 5).as_deref(), Some(&payload[..]));
        let path = c.path_of(&key);
        let good = fs::read(&path).unwrap();

        let damage: Vec<(&str, Vec<u8>)> = vec![
            ("truncated", good[..good.len() - 1].to_vec()),
            ("checksum mismatch", {
                let mut b = good.clone();
                b[HEADER] ^= 1;
                b
            }),
            ("bad magic", {
                let mut b = good.clone();
                b[0] = b'X';
                b
            }),
            ("another key", {
                let mut b = good.clone();
                b[20] ^= 1;
                b
            }),
            ("shorter than the header", b"bonsai".to_vec()),
        ];
        for (n, (what, bytes)) in damage.into_iter().enumerate() {
            fs::write(&path, bytes).unwrap();
            assert_eq!(c.get(&key, 5), None, "{what}");
            assert!(!path.exists(), "{what}: the bad entry is deleted");
            let reasons = c.corrupt_entries();
            assert_eq!(reasons.len(), n + 1);
            assert!(
                reasons.iter().any(|r| r.1.contains(what)),
                "{what}: {reasons:?}"
            );
        }
        // Same bytes but for another data length: not used either.
        fs::write(&path, &good).unwrap();
        assert_eq!(c.get(&key, 6), None);
        let s = c.stats();
        assert_eq!((s.hits, s.stored, s.corrupt), (1, 1, 6));
        assert_eq!(s.misses, 7);
    }

    #[test]
    fn write_failures_are_counted_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path());
        let key = c.key(9, b"", b"x");
        // A file where the entry's subfolder should be.
        let sub = c.path_of(&key).parent().unwrap().to_owned();
        fs::write(&sub, b"in the way").unwrap();
        c.put(&key, &[0, 0, 0xff, 0xff], 1);
        assert_eq!(c.stats().write_errors, 1);
        assert!(c
            .first_write_error()
            .unwrap()
            .contains(&sub.display().to_string()));
    }

    #[test]
    fn prune_removes_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path());
        let mut paths = Vec::new();
        for i in 0..4u8 {
            let key = c.key(9, b"", &[i]);
            c.put(&key, &[i; 100], 1);
            let p = c.path_of(&key);
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + u64::from(i));
            File::options()
                .write(true)
                .open(&p)
                .unwrap()
                .set_modified(t)
                .unwrap();
            paths.push(p);
        }
        let size = fs::metadata(&paths[0]).unwrap().len();
        let r = c.prune(2 * size).unwrap();
        assert_eq!((r.removed, r.kept), (2, 2));
        assert!(!paths[0].exists() && !paths[1].exists());
        assert!(paths[2].exists() && paths[3].exists());
    }
}
