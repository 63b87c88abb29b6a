//! Arbitrary bytes as a file in a fake Nix store, run through `rootfs::select` (then
//! `populate` and `verify`, which strip, rewrite and check what was selected). Never
//! panics; a selection only keeps paths that exist in the store, inside closure paths,
//! with their parents; populate and verify accept what select kept.
//!
//! Input: the first byte is a set of flags, the rest is the file's contents.
//! - bit 0: `strip = false`
//! - bit 1: drop the `lib` store path with `rewrite = true`
//! - bit 2: drop the `lib` store path (no rewrite)
//! - bit 3: the root is the file itself rather than its `bin` directory
//! - bit 4: `dlopen = "suggested"`
//!
//! The fake store (made once per process, like `rootfs/tests/select_strip.rs` does):
//! `<tmp>/nix/store/<LIB>-lib` holds a real tiny shared library (`lib/libx.so.1`, soname
//! `libx.so.1`), a symlink to it, a data file and documentation; `<GLIBC>-glibc` holds
//! stand-ins for the loader and libc and a `bin/sh` script; the fuzzed file is
//! `<FUZZ>-fuzz/bin/prog`.
#![no_main]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rootfs::{populate, select, verify, DlopenThreshold, DropRule, Policy, Root, SelectSpec, Tree};

const FUZZ: &str = "/nix/store/2w4qwkz3z9a6xk0nx6qwcb3n9g0sl8hn-fuzz";
const LIB: &str = "/nix/store/0c6kzph7l0dcbyhx8ph5hs5v6d5yvkhd-lib";
const GLIBC: &str = "/nix/store/1b9p07z77phvv2hf6gm9f28syrgkaaf2-glibc";
const LIBX: &[u8] = include_bytes!("../fixtures/libx.so.1");

struct Store {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn host(root: &Path, image: &str) -> PathBuf {
    root.join(image.trim_start_matches('/'))
}

fn put(root: &Path, image: &str, data: &[u8], mode: u32) {
    let p = host(root, image);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, data).unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
}

fn store() -> &'static Store {
    static STORE: OnceLock<Store> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        put(&root, &format!("{LIB}/lib/libx.so.1"), LIBX, 0o555);
        std::os::unix::fs::symlink("libx.so.1", host(&root, &format!("{LIB}/lib/libx.so")))
            .unwrap();
        put(&root, &format!("{LIB}/share/data.txt"), b"data\n", 0o444);
        put(
            &root,
            &format!("{LIB}/share/doc/lib/README"),
            b"docs\n",
            0o444,
        );
        put(
            &root,
            &format!("{GLIBC}/lib/ld-linux-x86-64.so.2"),
            LIBX,
            0o555,
        );
        put(&root, &format!("{GLIBC}/lib/libc.so.6"), LIBX, 0o555);
        put(
            &root,
            &format!("{GLIBC}/bin/sh"),
            format!("#!{GLIBC}/bin/sh\nexec {LIB}/share/data.txt\n").as_bytes(),
            0o555,
        );
        fs::create_dir_all(host(&root, &format!("{FUZZ}/bin"))).unwrap();
        Store { _dir: dir, root }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, contents)) = data.split_first() else {
        return;
    };
    let s = store();
    let prog = format!("{FUZZ}/bin/prog");
    put(&s.root, &prog, contents, 0o555);

    let mut policy = Policy::default();
    if flags & 1 != 0 {
        policy.strip = Some(false);
    }
    if flags & 6 != 0 {
        policy.drop.push(DropRule {
            path: LIB.into(),
            rewrite: flags & 2 != 0,
        });
    }
    if flags & 16 != 0 {
        policy.dlopen = Some(DlopenThreshold::Suggested);
    }
    let root = if flags & 8 != 0 {
        prog.clone()
    } else {
        format!("{FUZZ}/bin")
    };
    let roots = [Root::new(root, "package fuzz")];
    let closure = [FUZZ.to_string(), LIB.to_string(), GLIBC.to_string()];
    let spec = SelectSpec {
        store_root: &s.root,
        closure: &closure,
        roots: &roots,
        policy: &policy,
    };
    let Ok(sel) = select(&spec) else {
        return;
    };
    // Deterministic.
    let again = select(&spec).expect("a second selection of the same input failed");
    assert_eq!(
        sel.entries.keys().collect::<Vec<_>>(),
        again.entries.keys().collect::<Vec<_>>()
    );
    for (path, kept) in &sel.entries {
        assert!(path.starts_with("/nix/store/"), "{path}");
        assert!(
            closure
                .iter()
                .any(|c| path == c || path.starts_with(&format!("{c}/"))),
            "{path} is outside the closure"
        );
        assert!(
            fs::symlink_metadata(host(&s.root, path)).is_ok(),
            "kept {path}, which is not in the store"
        );
        assert!(
            closure.contains(&kept.store_path),
            "{path}: {}",
            kept.store_path
        );
        if let Some((parent, _)) = path.rsplit_once('/') {
            if closure
                .iter()
                .any(|c| parent.len() > c.len() && parent.starts_with(c.as_str()))
            {
                assert!(
                    sel.entries.contains_key(parent),
                    "{path} without its parent"
                );
            }
        }
    }
    let mut tree = Tree::new();
    if populate(&mut tree, &sel, &policy).is_ok() {
        let _ = verify(&tree, &policy);
    }
});
