//! Checking a manifest's signature: minisign's formats (public key and signature files),
//! Ed25519 over the BLAKE2b-512 of the message (minisign's default, algorithm `ED`).

use crate::{err, Error, Result};

/// The signature algorithm bonsai writes and accepts: prehashed Ed25519.
pub const SIG_ALG_PREHASHED: &[u8; 2] = b"ED";

/// A minisign public key.
#[derive(Debug, Clone)]
pub struct PublicKey {
    key: minisign_verify::PublicKey,
    /// The key id, as minisign prints it (16 hex digits).
    pub id: String,
}

/// The key id of minisign's key files: 8 bytes, printed as one little-endian number.
pub fn key_id_text(id: &[u8; 8]) -> String {
    format!("{:016X}", u64::from_le_bytes(*id))
}

fn b64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    let t = text.trim_end_matches('=');
    for c in t.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

impl PublicKey {
    /// Parses a minisign public key file (`untrusted comment:` line, then the key) or the bare
    /// base64 line.
    pub fn parse(text: &str) -> Result<PublicKey> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
            .ok_or_else(|| Error("public key: no key line".into()))?;
        let raw = b64_decode(line).filter(|r| r.len() == 42 && &r[..2] == b"Ed");
        let Some(raw) = raw else {
            return err("public key: not a minisign Ed25519 public key");
        };
        let key = minisign_verify::PublicKey::from_base64(line)
            .map_err(|e| Error(format!("public key: {e}")))?;
        let id: [u8; 8] = raw[2..10].try_into().expect("8 bytes");
        Ok(PublicKey {
            key,
            id: key_id_text(&id),
        })
    }

    /// Checks `signature` (a minisign signature file's text) over `message`. Only prehashed
    /// signatures are accepted: the legacy algorithm signs the raw message.
    pub fn verify(&self, message: &[u8], signature: &str) -> Result<()> {
        let sig = minisign_verify::Signature::decode(signature)
            .map_err(|e| Error(format!("signature: not a minisign signature ({e})")))?;
        self.key.verify(message, &sig, false).map_err(|e| {
            Error(match e {
                minisign_verify::Error::UnexpectedKeyId => format!(
                    "signature: made with another key than the built-in one ({})",
                    self.id
                ),
                minisign_verify::Error::UnexpectedAlgorithm => {
                    "signature: legacy (not prehashed) minisign signatures are refused".into()
                }
                _ => format!(
                    "signature: does not verify against the built-in key {}",
                    self.id
                ),
            })
        })
    }
}
