//! Keys and signing (the host only): minisign's unencrypted secret key format, so `minisign -S`
//! signs with a bonsai key too, and its signature format, so `minisign -V` verifies bonsai's.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use blake2::digest::consts::U32;
use blake2::{Blake2b, Blake2b512, Digest};
use ed25519_dalek::{Signer, SigningKey};

use crate::sig::{key_id_text, SIG_ALG_PREHASHED};
use crate::{err, Error, Result};

/// The first line of a secret key file.
pub const SECRET_KEY_COMMENT: &str =
    "untrusted comment: bonsai update signing key (minisign format, unencrypted): keep it secret";

/// An Ed25519 signing key with its minisign key id.
pub struct SecretKey {
    key: SigningKey,
    id: [u8; 8],
}

fn checksum(id: &[u8; 8], sk: &[u8; 64]) -> [u8; 32] {
    let mut h = Blake2b::<U32>::new();
    h.update(b"Ed");
    h.update(id);
    h.update(sk);
    h.finalize().into()
}

impl SecretKey {
    /// A new key from 40 random bytes (32 for the key, 8 for its id).
    pub fn from_random(random: &[u8; 40]) -> SecretKey {
        let seed: [u8; 32] = random[..32].try_into().expect("32 bytes");
        SecretKey {
            key: SigningKey::from_bytes(&seed),
            id: random[32..].try_into().expect("8 bytes"),
        }
    }

    pub fn id(&self) -> String {
        key_id_text(&self.id)
    }

    /// The secret key file: minisign's layout with no key derivation (not password-protected).
    pub fn to_file(&self) -> String {
        let sk = self.key.to_keypair_bytes();
        let mut raw = Vec::with_capacity(158);
        raw.extend_from_slice(b"Ed");
        raw.extend_from_slice(&[0, 0]); // no KDF: unencrypted
        raw.extend_from_slice(b"B2");
        raw.extend_from_slice(&[0u8; 32 + 8 + 8]); // salt, opslimit, memlimit: unused
        raw.extend_from_slice(&self.id);
        raw.extend_from_slice(&sk);
        raw.extend_from_slice(&checksum(&self.id, &sk));
        format!("{SECRET_KEY_COMMENT}\n{}\n", B64.encode(raw))
    }

    /// Reads a secret key file written by [`SecretKey::to_file`] or by `minisign -G -W`.
    pub fn parse(text: &str) -> Result<SecretKey> {
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
            .ok_or_else(|| Error("secret key: no key line".into()))?;
        let raw = B64
            .decode(line)
            .map_err(|_| Error("secret key: the key line is not base64".into()))?;
        if raw.len() != 158 || &raw[..2] != b"Ed" || &raw[4..6] != b"B2" {
            return err("secret key: not a minisign Ed25519 secret key");
        }
        if raw[2..4] != [0, 0] {
            return err(
                "secret key: it is password-protected; bonsai reads unencrypted keys (cargo xtask keygen, or minisign -G -W)",
            );
        }
        let id: [u8; 8] = raw[54..62].try_into().expect("8 bytes");
        let sk: [u8; 64] = raw[62..126].try_into().expect("64 bytes");
        if checksum(&id, &sk)[..] != raw[126..158] {
            return err("secret key: its checksum does not match (damaged file)");
        }
        let key = SigningKey::from_keypair_bytes(&sk)
            .map_err(|_| Error("secret key: the key pair does not match".into()))?;
        Ok(SecretKey { key, id })
    }

    /// The public key file, as `minisign -G` writes it.
    pub fn public_file(&self) -> String {
        let mut raw = b"Ed".to_vec();
        raw.extend_from_slice(&self.id);
        raw.extend_from_slice(self.key.verifying_key().as_bytes());
        format!(
            "untrusted comment: minisign public key {}\n{}\n",
            self.id(),
            B64.encode(raw)
        )
    }

    /// A minisign signature file over `message` (prehashed), with `trusted` as its trusted
    /// comment. Ed25519 is deterministic: the same key and message give the same file.
    pub fn sign(&self, message: &[u8], trusted: &str) -> Result<String> {
        if trusted.contains(['\n', '\r']) {
            return err("trusted comment: one line only");
        }
        let hash = Blake2b512::digest(message);
        let sig = self.key.sign(&hash).to_bytes();
        let mut line = SIG_ALG_PREHASHED.to_vec();
        line.extend_from_slice(&self.id);
        line.extend_from_slice(&sig);
        let mut global = sig.to_vec();
        global.extend_from_slice(trusted.as_bytes());
        let global = self.key.sign(&global).to_bytes();
        Ok(format!(
            "untrusted comment: signature from bonsai key {}\n{}\ntrusted comment: {trusted}\n{}\n",
            self.id(),
            B64.encode(line),
            B64.encode(global)
        ))
    }
}
