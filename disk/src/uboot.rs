//! What U-Boot reads from a boot partition: its environment file (`uboot.env`, environment in
//! FAT: a CRC-32 of the data, then `name=value` pairs each ended by NUL, an extra NUL, zero
//! padding to the environment's size) and a boot script as a legacy image (`boot.scr`: a
//! 64-byte big-endian header, then a table of part lengths and the script).

use std::collections::BTreeMap;

use crate::{Error, Result};

/// The size of Debian's `rpi_3` U-Boot environment (`CONFIG_ENV_SIZE`), not redundant.
pub const ENV_SIZE: usize = 0x4000;

/// The environment U-Boot starts from when it has none: `u-boot.bin`'s built-in default,
/// found by its first variable.
pub fn default_env(uboot: &[u8]) -> Result<BTreeMap<String, String>> {
    const FIRST: &[u8] = b"bootcmd=run distro_bootcmd\0";
    let start = find(uboot, FIRST).ok_or_else(|| {
        Error::Layout(
            "u-boot.bin holds no default environment (no 'bootcmd=run distro_bootcmd')".into(),
        )
    })?;
    let end = find(&uboot[start..], b"\0\0")
        .map(|e| start + e)
        .ok_or_else(|| Error::Layout("u-boot.bin: the default environment has no end".into()))?;
    parse_pairs(&uboot[start..end])
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn parse_pairs(data: &[u8]) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for pair in data.split(|b| *b == 0).filter(|p| !p.is_empty()) {
        let text = std::str::from_utf8(pair)
            .map_err(|_| Error::Layout("the U-Boot environment is not UTF-8".into()))?;
        let (k, v) = text.split_once('=').ok_or_else(|| {
            Error::Layout(format!("U-Boot environment entry '{text}' has no '='"))
        })?;
        env.insert(k.to_string(), v.to_string());
    }
    Ok(env)
}

/// `uboot.env`'s bytes for `env` (sorted by name, as U-Boot writes it).
pub fn env_bytes(env: &BTreeMap<String, String>, size: usize) -> Result<Vec<u8>> {
    let mut data = Vec::with_capacity(size);
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(Error::Layout(format!(
                "U-Boot environment variable '{k}' cannot be stored"
            )));
        }
        data.extend_from_slice(k.as_bytes());
        data.push(b'=');
        data.extend_from_slice(v.as_bytes());
        data.push(0);
    }
    data.push(0);
    if data.len() > size - 4 {
        return Err(Error::Layout(format!(
            "the U-Boot environment needs {} bytes, more than its {size}",
            data.len() + 4
        )));
    }
    data.resize(size - 4, 0);
    let mut out = crc32fast::hash(&data).to_le_bytes().to_vec();
    out.extend_from_slice(&data);
    Ok(out)
}

/// Reads `uboot.env`: an error when its CRC does not match (U-Boot would ignore it).
pub fn parse_env(bytes: &[u8]) -> Result<BTreeMap<String, String>> {
    if bytes.len() < 5 {
        return Err(Error::Layout("uboot.env is too short".into()));
    }
    let (crc, data) = bytes.split_at(4);
    let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(data) != want {
        return Err(Error::Layout(
            "uboot.env: bad CRC (U-Boot would use its default environment)".into(),
        ));
    }
    let end = find(data, b"\0\0").map_or(data.len(), |e| e + 1);
    parse_pairs(&data[..end])
}

/// `boot.scr`: `script` as a legacy U-Boot image of type script (as `mkimage -A arm64 -O linux
/// -T script -C none -n <name>` writes it, with `time` as its timestamp).
pub fn script_image(name: &str, script: &str, time: u32) -> Vec<u8> {
    let mut data = Vec::with_capacity(script.len() + 8);
    data.extend_from_slice(&(script.len() as u32).to_be_bytes());
    data.extend_from_slice(&0u32.to_be_bytes());
    data.extend_from_slice(script.as_bytes());
    let mut header = Vec::with_capacity(64);
    header.extend_from_slice(&0x2705_1956u32.to_be_bytes()); // magic
    header.extend_from_slice(&0u32.to_be_bytes()); // header CRC, filled in below
    header.extend_from_slice(&time.to_be_bytes());
    header.extend_from_slice(&(data.len() as u32).to_be_bytes());
    header.extend_from_slice(&0u32.to_be_bytes()); // load address
    header.extend_from_slice(&0u32.to_be_bytes()); // entry point
    header.extend_from_slice(&crc32fast::hash(&data).to_be_bytes());
    header.extend_from_slice(&[5, 22, 6, 0]); // Linux, arm64, script, not compressed
    let mut n = [0u8; 32];
    for (d, s) in n.iter_mut().zip(name.bytes().take(31)) {
        *d = s;
    }
    header.extend_from_slice(&n);
    let hcrc = crc32fast::hash(&header);
    header[4..8].copy_from_slice(&hcrc.to_be_bytes());
    header.extend_from_slice(&data);
    header
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_round_trips_and_a_bad_crc_is_refused() {
        let env: BTreeMap<String, String> = [("BOOT_ORDER", "A B"), ("BOOT_A_LEFT", "3")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let bytes = env_bytes(&env, ENV_SIZE).unwrap();
        assert_eq!(bytes.len(), ENV_SIZE);
        assert_eq!(&bytes[4..], {
            let mut d = b"BOOT_A_LEFT=3\0BOOT_ORDER=A B\0\0".to_vec();
            d.resize(ENV_SIZE - 4, 0);
            d
        });
        assert_eq!(parse_env(&bytes).unwrap(), env);
        let mut bad = bytes.clone();
        bad[10] ^= 1;
        assert!(parse_env(&bad).unwrap_err().to_string().contains("bad CRC"));
        let big: BTreeMap<String, String> = [("x".to_string(), "y".repeat(ENV_SIZE))].into();
        assert!(env_bytes(&big, ENV_SIZE).is_err());
    }

    #[test]
    fn the_default_environment_is_found_in_the_binary() {
        let mut bin = b"\x7fjunk\0".to_vec();
        bin.extend_from_slice(b"bootcmd=run distro_bootcmd\0bootdelay=2\0\0more");
        let env = default_env(&bin).unwrap();
        assert_eq!(env["bootdelay"], "2");
        assert_eq!(env.len(), 2);
        assert!(default_env(b"nothing here").is_err());
    }

    /// The bytes of `mkimage -A arm64 -O linux -T script -C none -n bonsai -d s.cmd s.scr` with
    /// SOURCE_DATE_EPOCH=1700000000 for the script `echo hi\n` (U-Boot's mkimage 2023.01).
    #[test]
    fn the_script_image_matches_mkimage() {
        let img = script_image("bonsai", "echo hi\n", 1_700_000_000);
        let hex: String = img.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "27051956932098d96553f100000000100000000000000000d934016205160600626f6e736169000000000000000000000000000000000000000000000000000000000008000000006563686f2068690a");
        assert_eq!(img.len(), 64 + 8 + 8);
        assert_eq!(&img[..4], &[0x27, 0x05, 0x19, 0x56]);
        assert_eq!(&img[12..16], &16u32.to_be_bytes());
        assert_eq!(&img[28..32], &[5, 22, 6, 0]);
        assert_eq!(&img[64..72], &[0, 0, 0, 8, 0, 0, 0, 0]);
        assert_eq!(&img[72..], b"echo hi\n");
        let mut h = img[..64].to_vec();
        let hcrc = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        h[4..8].fill(0);
        assert_eq!(crc32fast::hash(&h), hcrc);
    }
}
