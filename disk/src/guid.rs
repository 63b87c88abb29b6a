//! GUIDs: parsed from their text form, written in GPT's mixed-endian byte order, and derived
//! from a seed so that an image's GUIDs are a function of its inputs.

use sha2::{Digest, Sha256};

/// The EFI system partition's type.
pub const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// "Linux filesystem data", the data partition's type.
pub const LINUX_DATA: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// A GUID's 16 bytes as GPT stores them: the first three fields little-endian, the rest as
/// written. `None` when `text` is not `8-4-4-4-12` hex digits.
pub fn to_bytes(text: &str) -> Option<[u8; 16]> {
    let fields: Vec<&str> = text.split('-').collect();
    let lens: Vec<usize> = fields.iter().map(|f| f.len()).collect();
    if lens != [8, 4, 4, 4, 12] || !text.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()) {
        return None;
    }
    let hex: String = fields.concat();
    let mut raw = [0u8; 16];
    for (i, byte) in raw.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    raw[0..4].reverse();
    raw[4..6].reverse();
    raw[6..8].reverse();
    Some(raw)
}

/// The text form (upper case) of GPT's on-disk bytes.
pub fn to_text(bytes: &[u8; 16]) -> String {
    let mut b = *bytes;
    b[0..4].reverse();
    b[4..6].reverse();
    b[6..8].reverse();
    let h: String = b.iter().map(|x| format!("{x:02X}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A version-4-shaped GUID (on-disk bytes) derived from `seed` and `label`: the same inputs give
/// the same GUID, other labels give unrelated ones.
pub fn derive(seed: &[u8], label: &str) -> [u8; 16] {
    let digest = Sha256::new()
        .chain_update(seed)
        .chain_update([0])
        .chain_update(label.as_bytes())
        .finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&digest[..16]);
    // Text byte 6 is the version, byte 8 the variant; on disk byte 6 is byte 7 of the text.
    b[7] = (b[7] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    b
}

/// A 32-bit FAT volume serial number derived from `seed` and `label`.
pub fn derive_serial(seed: &[u8], label: &str) -> u32 {
    let d = derive(seed, label);
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn esp_type_in_gpt_byte_order_and_back() {
        let b = to_bytes(ESP).unwrap();
        assert_eq!(
            b,
            [
                0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e,
                0xc9, 0x3b
            ]
        );
        assert_eq!(to_text(&b), ESP);
        assert_eq!(to_bytes("C12A7328-F81F-11D2-BA4B-00A0C93EC93"), None);
        assert_eq!(to_bytes("G12A7328-F81F-11D2-BA4B-00A0C93EC93B"), None);
    }

    #[test]
    fn derived_guids_are_stable_distinct_and_version_4() {
        let a = derive(b"seed", "esp");
        assert_eq!(a, derive(b"seed", "esp"));
        assert_ne!(a, derive(b"seed", "data"));
        assert_ne!(a, derive(b"other", "esp"));
        let text = to_text(&a);
        assert_eq!(&text[14..15], "4", "{text}");
        assert!("89AB".contains(&text[19..20]), "{text}");
    }
}
