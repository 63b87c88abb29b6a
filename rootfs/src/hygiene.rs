//! Image hygiene: what a reproducible image must not hold, checked on the final tree.
//!
//! - [`empty_passwords`] reads an `/etc/shadow` and lists the accounts that log in without a
//!   password (an empty second field). Only a development image may have one; the caller
//!   decides and names the profile key.
//! - [`private_keys`] scans every regular file for a private key: a PEM block
//!   (`-----BEGIN … PRIVATE KEY-----`, base64 lines, the matching `-----END … PRIVATE
//!   KEY-----`; OpenSSH, PKCS#1, PKCS#8, SEC1 and encrypted PEM alike) or a dropbear key file
//!   (length-prefixed fields that parse exactly as an ed25519, RSA, DSS or ECDSA private
//!   key). Programs that merely mention the markers (dropbearconvert, libcrypto) have no
//!   base64 body between them and are not flagged; public keys (`ssh-ed25519 AAAA…`, or a
//!   binary public blob) have fewer fields than a private key.
//!
//! The scan reads each file once and looks for the marker with one `memmem` pass, so it costs
//! about as much as reading the image (a few MB).

use memchr::memmem;

use crate::error::Result;
use crate::tree::{NodeKind, Tree};

/// Dropbear keys are tiny (an RSA 4096 key is about 2.3 KiB); larger files are not parsed.
const DROPBEAR_MAX: usize = 64 * 1024;

/// Users whose password field in `shadow` is empty, in file order. Comments, blank lines and
/// lines without a second field are ignored.
pub fn empty_passwords(shadow: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(shadow);
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let mut fields = l.split(':');
            let user = fields.next()?;
            let password = fields.next()?;
            password.is_empty().then(|| user.to_string())
        })
        .collect()
}

/// Whether `data` holds a private key (see the module docs).
pub fn is_private_key(data: &[u8]) -> bool {
    has_pem_private_key(data) || is_dropbear_private_key(data)
}

/// The absolute image paths of regular files in `tree` that hold a private key, sorted,
/// except those `skip` accepts (declared secrets, `allow-private-keys`).
pub fn private_keys(tree: &Tree, skip: &dyn Fn(&str) -> bool) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for (path, node) in tree {
        let NodeKind::File { source } = &node.kind else {
            continue;
        };
        let abs = path.to_absolute();
        if skip(&abs) {
            continue;
        }
        if is_private_key(&source.read()?) {
            found.push(abs);
        }
    }
    Ok(found)
}

const PEM_TAIL: &[u8] = b"PRIVATE KEY-----";
const PEM_BEGIN: &[u8] = b"-----BEGIN ";

fn has_pem_private_key(data: &[u8]) -> bool {
    let finder = memmem::Finder::new(PEM_TAIL);
    for at in finder.find_iter(data) {
        // The line must be `-----BEGIN <LABEL >PRIVATE KEY-----`, the label in capitals.
        let line_start = data[..at]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let Some(label) = data[line_start..at].strip_prefix(PEM_BEGIN) else {
            continue;
        };
        if !label
            .iter()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b' ')
        {
            continue;
        }
        let body_start = at + PEM_TAIL.len();
        if pem_body_ends(&data[body_start..], label) {
            return true;
        }
    }
    false
}

/// `rest` (after a BEGIN line) is a PEM body: a newline, optional `Name: value` headers,
/// base64 lines, then `-----END <label>PRIVATE KEY-----`.
fn pem_body_ends(rest: &[u8], label: &[u8]) -> bool {
    let rest = match rest {
        [b'\r', b'\n', r @ ..] | [b'\n', r @ ..] => r,
        _ => return false,
    };
    let mut end = b"-----END ".to_vec();
    end.extend_from_slice(label);
    end.extend_from_slice(PEM_TAIL);
    let mut base64 = 0usize;
    for line in rest.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.starts_with(&end) {
            return base64 > 0;
        }
        let is_header = line.iter().position(|&b| b == b':').is_some_and(|i| {
            i > 0
                && line[..i]
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || *b == b'-')
        });
        let is_base64 = !line.is_empty()
            && line
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"+/=".contains(b));
        if is_base64 {
            base64 += line.len();
        } else if !(is_header || line.is_empty()) {
            return false;
        }
    }
    false
}

/// A dropbear private key file: SSH wire-format fields that fill the file exactly.
fn is_dropbear_private_key(data: &[u8]) -> bool {
    if data.len() > DROPBEAR_MAX || data.len() < 4 || data[0] != 0 {
        return false;
    }
    let Some(fields) = wire_fields(data) else {
        return false;
    };
    match fields[0] {
        b"ssh-ed25519" => fields.len() == 2 && fields[1].len() == 64,
        // e, n, d, p, q
        b"ssh-rsa" => fields.len() == 6,
        // p, q, g, y, x
        b"ssh-dss" => fields.len() == 6,
        // curve name, public point, private scalar
        t if t.starts_with(b"ecdsa-sha2-") => {
            fields.len() == 4 && t.ends_with(fields[1]) && fields[2].first() == Some(&4)
        }
        _ => false,
    }
}

/// Splits `data` into `u32 length, bytes` fields; `None` unless they fill it exactly.
fn wire_fields(mut data: &[u8]) -> Option<Vec<&[u8]>> {
    let mut fields = Vec::new();
    while !data.is_empty() {
        let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
        let field = data.get(4..4usize.checked_add(len)?)?;
        fields.push(field);
        data = &data[4 + len..];
    }
    (!fields.is_empty()).then_some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::{Node, Source};

    fn wire(fields: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in fields {
            out.extend_from_slice(&(f.len() as u32).to_be_bytes());
            out.extend_from_slice(f);
        }
        out
    }

    const OPENSSH: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\n\
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n\
QyNTUxOQAAACBnZXN0LWtleS1ub3QtcmVhbC0wMDAwMDAwMDAwMAAAAJg=\n\
-----END OPENSSH PRIVATE KEY-----\n";

    #[test]
    fn empty_password_fields_are_found() {
        let shadow = b"root::1::::::\n# comment\n\napp:*:1::::::\ndev::19000:0:99999:7:::\nhash:$6$salt$abc:1::::::\nbroken\n";
        assert_eq!(empty_passwords(shadow), ["root", "dev"]);
        assert!(empty_passwords(b"root:*:1::::::\n").is_empty());
        assert!(empty_passwords(b"").is_empty());
    }

    #[test]
    fn pem_private_keys_are_found() {
        assert!(is_private_key(OPENSSH.as_bytes()));
        for label in ["RSA ", "EC ", "DSA ", "", "ENCRYPTED "] {
            let pem = format!(
                "junk before\r\n-----BEGIN {label}PRIVATE KEY-----\r\nProc-Type: 4,ENCRYPTED\r\n\r\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu\r\nKUpRKfFLfRYC9AIKjbJTWit+CqvjWYzvQwECAwEAAQ==\r\n-----END {label}PRIVATE KEY-----\r\n"
            );
            assert!(is_private_key(pem.as_bytes()), "{label}");
        }
    }

    #[test]
    fn markers_without_a_key_are_not_flagged() {
        // What dropbearconvert and libcrypto hold: the markers as strings, no base64 body.
        let program = b"\x7fELF\0\0-----BEGIN OPENSSH PRIVATE KEY-----\n\0\x01\x02-----END OPENSSH PRIVATE KEY-----\n\0-----BEGIN \0PRIVATE KEY-----\0";
        assert!(!is_private_key(program));
        // An empty body, a lower-case label, a public key, a certificate.
        assert!(!is_private_key(
            b"-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n"
        ));
        assert!(!is_private_key(
            b"-----BEGIN rsa PRIVATE KEY-----\nQUJD\n-----END rsa PRIVATE KEY-----\n"
        ));
        assert!(!is_private_key(
            b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGdlc3Qta2V5LW5vdC1yZWFsLTAwMDAwMDAwMDAw test\n"
        ));
        assert!(!is_private_key(
            b"-----BEGIN PUBLIC KEY-----\nQUJD\n-----END PUBLIC KEY-----\n"
        ));
        // A BEGIN without its END (a truncated file), or a different END label.
        assert!(!is_private_key(b"-----BEGIN RSA PRIVATE KEY-----\nQUJD\n"));
        assert!(!is_private_key(
            b"-----BEGIN RSA PRIVATE KEY-----\nQUJD\n-----END EC PRIVATE KEY-----\n"
        ));
    }

    #[test]
    fn dropbear_private_keys_are_found_and_public_blobs_are_not() {
        let secret = [7u8; 64];
        assert!(is_private_key(&wire(&[b"ssh-ed25519", &secret])));
        // The binary public blob: a 32-byte key.
        assert!(!is_private_key(&wire(&[b"ssh-ed25519", &[7u8; 32]])));
        let (e, n) = (&[1u8, 0, 1][..], &[0x55u8; 129][..]);
        assert!(is_private_key(&wire(&[b"ssh-rsa", e, n, n, n, n])));
        assert!(!is_private_key(&wire(&[b"ssh-rsa", e, n])));
        let point = [4u8; 65];
        assert!(is_private_key(&wire(&[
            b"ecdsa-sha2-nistp256",
            b"nistp256",
            &point,
            &[9u8; 32]
        ])));
        assert!(!is_private_key(&wire(&[
            b"ecdsa-sha2-nistp256",
            b"nistp256",
            &point
        ])));
        // Trailing bytes, a short field, an unknown type.
        let mut trailing = wire(&[b"ssh-ed25519", &secret]);
        trailing.push(0);
        assert!(!is_private_key(&trailing));
        let full = wire(&[b"ssh-ed25519", &secret]);
        assert!(!is_private_key(&full[..full.len() - 1]));
        assert!(!is_private_key(&wire(&[b"ssh-foo", &secret])));
        assert!(!is_private_key(&[0, 0, 0, 0]));
    }

    #[test]
    fn a_real_dropbear_ed25519_key_is_found() {
        // Made with `dropbearkey -t ed25519` for this test; never used anywhere.
        let hex = "0000000b7373682d65643235353139000000408eed2bf7155440e6f44194adf4a6929d204171\
                   f1de4657aa9e5afaaae6e40c8e665f98684c9231e560996c621df5749abeab00b7c86727f5fcb8\
                   80f5c4bf95f3";
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        assert_eq!(bytes.len(), 83);
        assert!(is_private_key(&bytes));
    }

    #[test]
    fn the_tree_scan_names_files_and_skips_what_is_allowed() {
        let mut tree = Tree::new();
        let file = |b: &[u8]| Node::file(Source::Bytes(b.to_vec()), 0o600);
        tree.insert("etc/key", file(OPENSSH.as_bytes())).unwrap();
        tree.insert("etc/ok", file(b"hello")).unwrap();
        tree.insert("etc/secret", file(OPENSSH.as_bytes())).unwrap();
        tree.insert("etc/link", Node::symlink("key")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("k");
        std::fs::write(&host, wire(&[b"ssh-ed25519", &[1u8; 64]])).unwrap();
        tree.insert("nix/store/x-y/k", Node::file(Source::Host(host), 0o444))
            .unwrap();
        let found = private_keys(&tree, &|p| p == "/etc/secret").unwrap();
        assert_eq!(found, ["/etc/key", "/nix/store/x-y/k"]);
    }
}
