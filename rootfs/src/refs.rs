//! Nix store references inside file contents: `/nix/store/<hash>-<name>[/rest]`.
//!
//! The hash is 32 characters of Nix's base32 alphabet (`0123456789abcdfghijklmnpqrsvwxyz`,
//! no `e`, `o`, `t`, `u`), like Nix's own reference scanner; unlike it, we also read the
//! name and the path after it, so a reference can be followed to the file it names.

use std::collections::BTreeSet;
use std::ops::Range;

/// The store directory every reference starts with.
pub const STORE_DIR: &str = "/nix/store";
/// Length of a store path hash.
pub const HASH_LEN: usize = 32;
/// Nix's base32 alphabet.
pub const NIX_BASE32: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";
/// The hash written over references that are rewritten away (not a base32 hash: it has `e`).
pub const REWRITTEN_HASH: &str = "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee";

const PREFIX: &[u8] = b"/nix/store/";

/// One reference found in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreRef {
    /// Byte offset of the leading `/` of `/nix/store/`.
    pub offset: usize,
    /// The 32-character hash.
    pub hash: String,
    /// What follows `<hash>-`, in store-name characters (may be empty, may run on into
    /// text that is not part of the name, like a trailing `.`).
    pub name: String,
    /// The path after the name, starting with `/`, or empty.
    pub rest: String,
}

impl StoreRef {
    /// `/nix/store/<hash>-<name>` (or `/nix/store/<hash>` when there is no name).
    pub fn store_path(&self) -> String {
        if self.name.is_empty() {
            format!("{STORE_DIR}/{}", self.hash)
        } else {
            format!("{STORE_DIR}/{}-{}", self.hash, self.name)
        }
    }

    /// The whole reference as it appears in the file.
    pub fn text(&self) -> String {
        format!("{}{}", self.store_path(), self.rest)
    }

    /// Bytes covered in the file.
    pub fn range(&self) -> Range<usize> {
        let name = if self.name.is_empty() {
            0
        } else {
            1 + self.name.len()
        };
        self.offset..self.offset + PREFIX.len() + HASH_LEN + name + self.rest.len()
    }
}

/// True for a byte of Nix's base32 alphabet.
pub fn is_hash_byte(b: u8) -> bool {
    NIX_BASE32.contains(&b)
}

/// True if `s` is a store path hash.
pub fn is_hash(s: &str) -> bool {
    s.len() == HASH_LEN && s.bytes().all(is_hash_byte)
}

/// Characters Nix allows in store path names.
fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.' | b'_' | b'?' | b'=')
}

/// Characters taken as part of the path after a store name. Stops at whitespace, quotes,
/// `:` (search path lists), `%`/`$` (format strings and variables), NUL, and the like.
fn is_rest_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.' | b'_' | b'=' | b'/' | b'@' | b'~')
}

/// Every store reference in `data`, in file order.
pub fn scan(data: &[u8]) -> Vec<StoreRef> {
    scan_excluding(data, &[])
}

/// Every store reference in `data` that does not start inside one of `exclude`.
pub fn scan_excluding(data: &[u8], exclude: &[Range<usize>]) -> Vec<StoreRef> {
    let mut out = Vec::new();
    for offset in prefix_offsets(data) {
        if exclude.iter().any(|r| r.contains(&offset)) {
            continue;
        }
        let start = offset + PREFIX.len();
        let Some(hash) = data.get(start..start + HASH_LEN) else {
            break;
        };
        if !hash.iter().all(|b| is_hash_byte(*b)) {
            continue;
        }
        let mut pos = start + HASH_LEN;
        let mut name = String::new();
        if data.get(pos) == Some(&b'-') {
            let end = pos
                + 1
                + data[pos + 1..]
                    .iter()
                    .take_while(|b| is_name_byte(**b))
                    .count();
            if end > pos + 1 {
                name = ascii(&data[pos + 1..end]);
                pos = end;
            }
        }
        let mut rest = String::new();
        if !name.is_empty() && data.get(pos) == Some(&b'/') {
            let end = pos + data[pos..].iter().take_while(|b| is_rest_byte(**b)).count();
            rest = ascii(&data[pos..end]);
        }
        out.push(StoreRef {
            offset,
            hash: ascii(hash),
            name,
            rest,
        });
    }
    out
}

/// Every offset of `/nix/store/` in `data`, overlapping ones included: in
/// `/nix/store/nix/store/<hash>` the reference starts at the second one. (memchr's
/// `find_iter` resumes after each match, so it would miss it.)
fn prefix_offsets(data: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let finder = memchr::memmem::Finder::new(PREFIX);
    let mut pos = 0;
    std::iter::from_fn(move || {
        let found = pos + finder.find(data.get(pos..)?)?;
        pos = found + 1;
        Some(found)
    })
}

fn ascii(bytes: &[u8]) -> String {
    // Only ASCII bytes pass the character filters above.
    bytes.iter().map(|b| *b as char).collect()
}

/// Splits an absolute store path into (`<hash>-<name>` base, rest starting with `/` or empty).
pub fn split_store_path(path: &str) -> Option<(&str, &str)> {
    let rel = path.strip_prefix(STORE_DIR)?.strip_prefix('/')?;
    let (base, rest) = match rel.find('/') {
        Some(i) => (&rel[..i], &rel[i..]),
        None => (rel, ""),
    };
    let hash = base.get(..HASH_LEN)?;
    if !is_hash(hash) || !(base.len() == HASH_LEN || base.as_bytes()[HASH_LEN] == b'-') {
        return None;
    }
    Some((base, rest))
}

/// The hash of a store path (`/nix/store/<hash>-name/...`).
pub fn hash_of(path: &str) -> Option<&str> {
    split_store_path(path).map(|(base, _)| &base[..HASH_LEN])
}

/// Replaces `/nix/store/<hash>` by `/nix/store/eeee…` for every hash in `hashes`, the way
/// nixpkgs' `remove-references-to` does (same length, so offsets in ELF files stay valid).
/// Returns how many references were rewritten.
pub fn rewrite_hashes(data: &mut [u8], hashes: &BTreeSet<String>) -> usize {
    let offsets: Vec<usize> = prefix_offsets(data).collect();
    let mut count = 0;
    for offset in offsets {
        let start = offset + PREFIX.len();
        let Some(hash) = data.get(start..start + HASH_LEN) else {
            continue;
        };
        if hashes.iter().any(|h| h.as_bytes() == hash) {
            data[start..start + HASH_LEN].copy_from_slice(REWRITTEN_HASH.as_bytes());
            count += 1;
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "kpj6hslx23ajwvspqkdkbrrclzqx8c67";

    #[test]
    fn finds_references_with_name_and_rest() {
        let text = format!(
            "#!/nix/store/{H}-bash-5.2/bin/sh\nexec /nix/store/{H}-glibc-2.36/lib:/x \
             \"/nix/store/{H}\" /nix/store/{H}-foo.\n/nix/store/too-short-aaaa"
        );
        let refs = scan(text.as_bytes());
        let got: Vec<(String, String)> = refs
            .iter()
            .map(|r| (r.name.clone(), r.rest.clone()))
            .collect();
        assert_eq!(
            got,
            [
                ("bash-5.2".into(), "/bin/sh".into()),
                ("glibc-2.36".into(), "/lib".into()),
                (String::new(), String::new()),
                ("foo.".into(), String::new()),
            ]
        );
        assert_eq!(refs[0].offset, 2);
        assert_eq!(refs[0].text(), format!("/nix/store/{H}-bash-5.2/bin/sh"));
        assert_eq!(
            &text[refs[1].range()],
            format!("/nix/store/{H}-glibc-2.36/lib")
        );
    }

    #[test]
    fn hash_alphabet_is_nix_base32() {
        assert!(is_hash(H));
        assert!(!is_hash(REWRITTEN_HASH));
        assert!(scan(format!("/nix/store/{REWRITTEN_HASH}-x").as_bytes()).is_empty());
        // Truncated at the end of the data: no panic, no reference.
        assert!(scan(b"/nix/store/kpj6hslx").is_empty());
        assert!(scan(b"/nix/store/").is_empty());
    }

    /// Found by the `refs_scan` fuzz target: a reference right after a `/nix/store/` that
    /// starts no reference of its own was missed, and so not rewritten either.
    #[test]
    fn overlapping_prefixes_are_all_scanned() {
        let text = format!("/nix/store/nix/store/{H}-x /nix/store//nix/store/{H}-y");
        let refs = scan(text.as_bytes());
        let got: Vec<(usize, &str)> = refs.iter().map(|r| (r.offset, r.name.as_str())).collect();
        assert_eq!(got, [(10, "x"), (67, "y")]);
        let mut data = text.clone().into_bytes();
        assert_eq!(
            rewrite_hashes(&mut data, &BTreeSet::from([H.to_string()])),
            2
        );
        assert!(scan(&data).is_empty());
    }

    #[test]
    fn exclusions_skip_references_starting_inside() {
        let text = format!("/nix/store/{H}-a /nix/store/{H}-b");
        let skip = 0..5;
        let refs = scan_excluding(text.as_bytes(), std::slice::from_ref(&skip));
        assert_eq!(refs.len(), 1);
        assert_eq!(refs[0].name, "b");
    }

    #[test]
    fn split_and_hash_of() {
        let p = format!("/nix/store/{H}-glibc-2.36/lib/libc.so.6");
        assert_eq!(
            split_store_path(&p),
            Some((format!("{H}-glibc-2.36").as_str(), "/lib/libc.so.6"))
        );
        assert_eq!(hash_of(&p), Some(H));
        assert_eq!(split_store_path("/nix/store/short-x"), None);
        assert_eq!(split_store_path(&format!("/nix/store/{H}x")), None);
        assert_eq!(split_store_path("/etc/passwd"), None);
    }

    #[test]
    fn rewrite_keeps_length_and_only_named_hashes() {
        let other = "00000000000000000000000000000000";
        let mut data = format!("a/nix/store/{H}-x/b /nix/store/{other}-y").into_bytes();
        let before = data.len();
        let n = rewrite_hashes(&mut data, &BTreeSet::from([H.to_string()]));
        assert_eq!(n, 1);
        assert_eq!(data.len(), before);
        assert_eq!(
            String::from_utf8(data).unwrap(),
            format!("a/nix/store/{REWRITTEN_HASH}-x/b /nix/store/{other}-y")
        );
    }
}
