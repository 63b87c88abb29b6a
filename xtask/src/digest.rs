//! SHA-256 of files and lowercase hex: the digests in build.json, releases, SHA256SUMS and the
//! offline set's pins.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

pub use rootfs::hex;

/// The SHA-256 of `data`, in hex.
pub fn sha256_bytes(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// The SHA-256 of the file at `p`, in hex, read in 64 KiB pieces.
pub fn sha256_file(p: &Path) -> Result<String> {
    let mut f = fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)
            .with_context(|| format!("reading {}", p.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_of_a_file_and_errors_name_it() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("abc");
        fs::write(&p, "abc").unwrap();
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let missing = d.path().join("nope");
        let e = sha256_file(&missing).unwrap_err().to_string();
        assert_eq!(e, format!("opening {}", missing.display()));
    }
}
