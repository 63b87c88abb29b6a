//! The SBOM of a release: CycloneDX 1.5 JSON. One component per store path in the image, with
//! its name and version, Nix narHash (as SHA-256 hex) and NAR size, the package source (the
//! offline set's Debian packages with versions and .deb hashes, or a Nixpkgs reference), and
//! the license where the package's Debian copyright file says one. Timestamps come from
//! SOURCE_DATE_EPOCH; the serial number is derived from the image's hash: no clock, no
//! randomness, no host paths.

use std::path::Path;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::nix::PathInfo;

/// `glibc-2.36-9+deb12u14` → (`glibc`, `2.36-9+deb12u14`): Nix's rule, the version starts at
/// the first `-` followed by a digit.
pub fn split_name(store_path: &str) -> (String, String) {
    let base = store_path.rsplit('/').next().unwrap_or(store_path);
    let name = base.get(33..).unwrap_or(base);
    let bytes = name.as_bytes();
    for i in 0..bytes.len().saturating_sub(1) {
        if bytes[i] == b'-' && bytes[i + 1].is_ascii_digit() {
            return (name[..i].to_string(), name[i + 1..].to_string());
        }
    }
    (name.to_string(), String::new())
}

/// Nix's base-32 (as in `sha256:1b8m03r...`) to hex.
pub fn nix32_to_hex(s: &str) -> Option<String> {
    const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
    let len = s.len() * 5 / 8;
    let mut out = vec![0u8; len];
    for (n, c) in s.bytes().rev().enumerate() {
        let digit = ALPHABET.iter().position(|&a| a == c)? as u16;
        let b = n * 5;
        let i = b / 8;
        let j = b % 8;
        if i < len {
            out[i] |= (digit << j) as u8;
        }
        let carry = digit >> (8 - j);
        if i + 1 < len {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return None;
        }
    }
    Some(crate::digest::hex(&out))
}

fn nar_hash_hex(nar_hash: &str) -> Option<String> {
    let h = nar_hash.strip_prefix("sha256:")?;
    if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) {
        return Some(h.to_lowercase());
    }
    nix32_to_hex(h)
}

/// The first `License:` of a Debian copyright file in the store path, if any.
fn debian_license(store_path: &str) -> Option<String> {
    let doc = Path::new(store_path).join("share/doc");
    for entry in std::fs::read_dir(doc).ok()?.flatten() {
        if let Ok(text) = std::fs::read_to_string(entry.path().join("copyright")) {
            if let Some(l) = text.lines().find_map(|l| l.strip_prefix("License:")) {
                let l = l.trim();
                if !l.is_empty() {
                    return Some(l.to_string());
                }
            }
        }
    }
    None
}

fn debian_packages(store_path: &str) -> Vec<(String, String, String)> {
    std::fs::read_to_string(Path::new(store_path).join("nix-support/debian-packages"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((
                f.next()?.to_string(),
                f.next()?.to_string(),
                f.next()?.to_string(),
            ))
        })
        .collect()
}

pub struct SbomInput<'a> {
    pub board: &'a str,
    pub version: &'a str,
    pub profile: &'a str,
    pub init: &'a str,
    pub source: &'a str,
    pub epoch: u64,
    pub initramfs_sha256: &'a str,
    pub kernel_sha256: &'a str,
    pub paths: &'a [PathInfo],
    /// The profile says `development = true` (an empty password may be in the image).
    pub development: bool,
    /// Image paths of files supplied at build time from outside the repository.
    pub secrets: &'a [String],
}

/// ISO 8601 UTC for a Unix time, without a clock or a time-zone database.
pub fn iso8601(epoch: u64) -> String {
    let days = (epoch / 86400) as i64;
    let secs = epoch % 86400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

pub fn cyclonedx(input: &SbomInput) -> Value {
    let mut components = Vec::new();
    for p in input.paths {
        let (name, version) = split_name(&p.path);
        let mut props = vec![
            json!({"name": "nix:store-path", "value": p.path}),
            json!({"name": "nix:nar-hash", "value": p.nar_hash}),
            json!({"name": "nix:nar-size", "value": p.nar_size.to_string()}),
            json!({"name": "bonsai:package-source", "value": input.source}),
        ];
        for (pkg, ver, sha) in debian_packages(&p.path) {
            props.push(
                json!({"name": "debian:package", "value": format!("{pkg}={ver} sha256:{sha}")}),
            );
        }
        let mut c = json!({
            "type": "library",
            "bom-ref": p.path,
            "name": name,
            "version": version,
            "properties": props,
        });
        if let Some(hex) = nar_hash_hex(&p.nar_hash) {
            c["hashes"] = json!([{"alg": "SHA-256", "content": hex}]);
        }
        if let Some(l) = debian_license(&p.path) {
            c["licenses"] = json!([{"license": {"name": l}}]);
        }
        components.push(c);
    }
    let mut h = Sha256::new();
    h.update(input.board.as_bytes());
    h.update(input.version.as_bytes());
    h.update(input.initramfs_sha256.as_bytes());
    h.update(input.kernel_sha256.as_bytes());
    let d = h.finalize();
    let hex = crate::digest::hex(&d);
    // A version-4-shaped UUID from the image's hash: the same image, the same serial number.
    let uuid = format!(
        "{}-{}-4{}-8{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    );
    let mut image_props = vec![
        json!({"name": "bonsai:profile", "value": input.profile}),
        json!({"name": "bonsai:init", "value": input.init}),
        json!({"name": "bonsai:kernel-sha256", "value": input.kernel_sha256}),
    ];
    // Marked only when true, so other images' SBOMs keep their bytes.
    if input.development {
        image_props.push(json!({"name": "bonsai:development-image", "value": "true"}));
    }
    if !input.secrets.is_empty() {
        image_props.push(json!({"name": "bonsai:holds-secrets", "value": "true"}));
        for path in input.secrets {
            image_props.push(json!({"name": "bonsai:secret", "value": path}));
        }
    }
    json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": format!("urn:uuid:{uuid}"),
        "version": 1,
        "metadata": {
            "timestamp": iso8601(input.epoch),
            "tools": {"components": [{"type": "application", "name": "bonsai", "version": env!("CARGO_PKG_VERSION")}]},
            "component": {
                "type": "operating-system",
                "bom-ref": format!("bonsai-image:{}", input.board),
                "name": input.board,
                "version": input.version,
                "hashes": [{"alg": "SHA-256", "content": input.initramfs_sha256}],
                "properties": image_props,
            },
        },
        "components": components,
        "dependencies": [{
            "ref": format!("bonsai-image:{}", input.board),
            "dependsOn": input.paths.iter().map(|p| p.path.clone()).collect::<Vec<_>>(),
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn development_images_and_secrets_are_marked_only_when_true() {
        let secrets = vec!["/etc/dropbear/dropbear_ed25519_host_key".to_string()];
        let input = |development, secrets: &'static [String]| SbomInput {
            board: "b",
            version: "1",
            profile: "p",
            init: "busybox",
            source: "offline",
            epoch: 0,
            initramfs_sha256: "00",
            kernel_sha256: "11",
            paths: &[],
            development,
            secrets,
        };
        let names = |doc: &Value| -> Vec<String> {
            doc["metadata"]["component"]["properties"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    format!(
                        "{}={}",
                        p["name"].as_str().unwrap(),
                        p["value"].as_str().unwrap()
                    )
                })
                .collect()
        };
        let plain = names(&cyclonedx(&input(false, &[])));
        assert!(
            plain
                .iter()
                .all(|n| !n.contains("development") && !n.contains("secret")),
            "{plain:?}"
        );
        let secrets: &'static [String] = Box::leak(secrets.into_boxed_slice());
        let marked = names(&cyclonedx(&input(true, secrets)));
        for want in [
            "bonsai:development-image=true",
            "bonsai:holds-secrets=true",
            "bonsai:secret=/etc/dropbear/dropbear_ed25519_host_key",
        ] {
            assert!(
                marked.iter().any(|n| n == want),
                "{want} missing from {marked:?}"
            );
        }
    }

    #[test]
    fn names_and_versions_split_like_nix() {
        assert_eq!(
            split_name("/nix/store/kpj6hslx23ajwvspqkdkbrrclzqx8c67-glibc-2.36-9+deb12u14"),
            ("glibc".into(), "2.36-9+deb12u14".into())
        );
        assert_eq!(
            split_name("/nix/store/kpj6hslx23ajwvspqkdkbrrclzqx8c67-hello.c"),
            ("hello.c".into(), String::new())
        );
    }

    #[test]
    fn nix_base32_decodes() {
        // sha256 of the empty string in Nix base-32 and in hex.
        assert_eq!(
            nix32_to_hex("0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73").unwrap(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn timestamps_are_utc_without_a_clock() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(1_764_288_000), "2025-11-28T00:00:00Z");
    }
}
