//! `rootfs::refs::scan` on arbitrary bytes: never panics, and every reported reference is
//! really in the input, with a hash of 32 characters of Nix's base32 alphabet, a name of
//! store-name characters and a rest that is a path. Every `/nix/store/<32 base32 chars>` in
//! the input is reported (overlapping candidates included), and rewriting the hashes found
//! keeps the length and leaves no reference to them.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use rootfs::refs::{self, HASH_LEN, NIX_BASE32, STORE_DIR};

const PREFIX: &[u8] = b"/nix/store/";

fn name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"+-._?=".contains(&b)
}

fuzz_target!(|data: &[u8]| {
    let found = refs::scan(data);
    let mut last = None;
    for r in &found {
        assert!(
            last.is_none_or(|l| r.offset > l),
            "offsets out of order: {found:?}"
        );
        last = Some(r.offset);
        // It is in the input, exactly as reported.
        let range = r.range();
        assert_eq!(
            data.get(range.clone()),
            Some(r.text().as_bytes()),
            "reference {r:?} is not at {range:?}"
        );
        assert!(data[r.offset..].starts_with(PREFIX));
        // Hash, name and rest follow the store path rules.
        assert_eq!(r.hash.len(), HASH_LEN, "{r:?}");
        assert!(r.hash.bytes().all(|b| NIX_BASE32.contains(&b)), "{r:?}");
        assert!(refs::is_hash(&r.hash));
        assert!(r.name.bytes().all(name_byte), "{r:?}");
        assert!(
            r.rest.is_empty() || (r.rest.starts_with('/') && !r.name.is_empty()),
            "{r:?}"
        );
        assert!(
            !r.rest.contains('\0') && !r.rest.contains(char::is_whitespace),
            "{r:?}"
        );
        // The store path splits back into the same hash.
        let sp = r.store_path();
        assert!(sp.starts_with(STORE_DIR));
        assert_eq!(refs::hash_of(&sp), Some(r.hash.as_str()), "{sp}");
        assert_eq!(refs::hash_of(&r.text()), Some(r.hash.as_str()), "{r:?}");
    }

    // Complete: every candidate is reported, even one overlapping another candidate.
    let offsets: BTreeSet<usize> = found.iter().map(|r| r.offset).collect();
    for start in 0..data.len() {
        let Some(hash) = data.get(start + PREFIX.len()..start + PREFIX.len() + HASH_LEN) else {
            break;
        };
        if data[start..].starts_with(PREFIX) && hash.iter().all(|b| NIX_BASE32.contains(b)) {
            assert!(offsets.contains(&start), "missed the reference at {start}");
        }
    }

    // Exclusions drop exactly the references starting inside them.
    if let Some(first) = found.first() {
        let skip = first.offset..first.offset + 1;
        let rest = refs::scan_excluding(data, std::slice::from_ref(&skip));
        assert_eq!(rest.as_slice(), &found[1..]);
    }

    // Rewriting every hash found keeps the length and leaves none of them behind.
    let hashes: BTreeSet<String> = found.iter().map(|r| r.hash.clone()).collect();
    let mut copy = data.to_vec();
    let n = refs::rewrite_hashes(&mut copy, &hashes);
    assert_eq!(copy.len(), data.len());
    assert!(
        n >= found.len(),
        "rewrote {n} of {} references",
        found.len()
    );
    assert!(refs::scan(&copy).iter().all(|r| !hashes.contains(&r.hash)));
});
