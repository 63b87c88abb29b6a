//! Property tests (proptest) for the cpio writer and image path handling.
//!
//! - Random trees are written with `write_newc` and read back with the `cpio` crate's
//!   `NewcReader`, an independent reader: the same entries, sorted component by component
//!   with every directory before its contents, inodes an FNV-1a hash of the name, nlink 1, uid/gid 0, the given
//!   mtime, sizes and bytes as in the tree, device numbers; stats that add up.
//! - The archive is a function of the tree's contents only: the same nodes inserted in any
//!   order, from memory or from host files, give the same bytes.
//! - `ImagePath::new` accepts exactly the relative, normalised paths (no `..`, `.`, empty
//!   component, leading `/` or NUL, within the kernel's length limits), and what it accepts
//!   round-trips; no tree ever holds a path that escapes the root.
//! - Host file names and symlink targets that are not UTF-8 are rejected by
//!   `Tree::add_host_tree` with an error naming the file; UTF-8 names come through unchanged.
//!
//! `PROPTEST_CASES` raises or lowers the number of cases (default 256 per property).

mod common;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use common::fnv_inode;
use cpio::NewcReader;
use proptest::prelude::*;
use rootfs::{write_newc, CpioOptions, CpioStats, ImagePath, Node, NodeKind, Source, Tree};

// ------------------------------------------------------------------ strategies

/// Path components from a small alphabet, so that random paths share parents, collide and
/// sort in interesting ways (`a` / `a-b` / `a.b` / `A`), with the odd unusual name.
fn component() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec!["a", "b", "a-b", "a.b", "A", "etc", "nix", "é", "x y"])
            .prop_map(str::to_string),
        1 => "[a-z0-9._-]{1,12}",
        1 => "\\PC{1,8}".prop_filter("no slash or NUL", |s| !s.contains('/') && !s.contains('\0')),
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(component(), 1..5).prop_map(|c| c.join("/"))
}

#[derive(Clone, Debug)]
enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(String),
    CharDev(u32, u32),
    BlockDev(u32, u32),
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        4 => prop::collection::vec(any::<u8>(), 0..600).prop_map(Kind::File),
        3 => Just(Kind::Dir),
        2 => "[a-z/.]{1,40}".prop_map(Kind::Symlink),
        1 => (0u32..4096, 0u32..(1 << 20)).prop_map(|(a, b)| Kind::CharDev(a, b)),
        1 => (0u32..4096, 0u32..(1 << 20)).prop_map(|(a, b)| Kind::BlockDev(a, b)),
    ]
}

fn node(kind: &Kind, mode: u32) -> Node {
    match kind {
        Kind::File(data) => Node::file(Source::Bytes(data.clone()), mode),
        Kind::Dir => Node::dir(mode),
        Kind::Symlink(t) => Node::symlink(t.clone()),
        Kind::CharDev(a, b) => Node::char_dev(*a, *b, mode),
        Kind::BlockDev(a, b) => Node::block_dev(*a, *b, mode),
    }
}

fn entries() -> impl Strategy<Value = Vec<(String, Kind, u32)>> {
    prop::collection::vec((path(), kind(), 0u32..0o10000), 0..40)
}

/// A tree from random entries; inserts the tree refuses (conflicts, a file as a parent) are
/// skipped, and must leave the tree as it was.
fn build(entries: &[(String, Kind, u32)]) -> Tree {
    let mut tree = Tree::new();
    for (p, k, mode) in entries {
        let before = snapshot(&tree);
        if tree.insert(p, node(k, *mode)).is_err() {
            assert_eq!(
                snapshot(&tree),
                before,
                "a refused insert of {p:?} changed the tree"
            );
        }
    }
    tree
}

fn snapshot(tree: &Tree) -> Vec<(String, Node)> {
    tree.iter()
        .map(|(p, n)| (p.as_str().to_string(), n.clone()))
        .collect()
}

// ------------------------------------------------------------------ reading back

#[derive(Debug, PartialEq)]
struct ReadEntry {
    name: String,
    ino: u32,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    mtime: u32,
    rdev: (u32, u32),
    data: Vec<u8>,
}

/// Every entry of a newc archive, read with the `cpio` crate; nothing may follow the trailer.
fn read_back(archive: &[u8]) -> Vec<ReadEntry> {
    let mut out = Vec::new();
    let mut rest = archive;
    loop {
        let mut r = NewcReader::new(rest).expect("the cpio crate reads the header");
        let e = r.entry().clone();
        if e.is_trailer() {
            let tail = r.finish().unwrap();
            assert!(tail.is_empty(), "{} bytes after the trailer", tail.len());
            return out;
        }
        assert_eq!((e.dev_major(), e.dev_minor()), (0, 0));
        let mut data = Vec::new();
        r.read_to_end(&mut data).unwrap();
        assert_eq!(data.len() as u64, u64::from(e.file_size()), "{}", e.name());
        out.push(ReadEntry {
            name: e.name().to_string(),
            ino: e.ino(),
            mode: e.mode(),
            uid: e.uid(),
            gid: e.gid(),
            nlink: e.nlink(),
            mtime: e.mtime(),
            rdev: (e.rdev_major(), e.rdev_minor()),
            data,
        });
        rest = r.finish().unwrap();
    }
}

fn write(tree: &Tree, mtime: u32) -> (Vec<u8>, CpioStats) {
    let mut out = Vec::new();
    let stats = write_newc(tree, &CpioOptions { mtime }, &mut out).expect("writing to memory");
    (out, stats)
}

fn expected_data(node: &Node) -> Vec<u8> {
    match &node.kind {
        NodeKind::File {
            source: Source::Bytes(b),
        } => b.clone(),
        NodeKind::File {
            source: Source::Host(p),
        } => fs::read(p).unwrap(),
        NodeKind::Symlink { target } => target.as_bytes().to_vec(),
        _ => Vec::new(),
    }
}

fn type_bits(node: &Node) -> u32 {
    match node.kind {
        NodeKind::File { .. } => 0o100000,
        NodeKind::Dir => 0o040000,
        NodeKind::Symlink { .. } => 0o120000,
        NodeKind::CharDev { .. } => 0o020000,
        NodeKind::BlockDev { .. } => 0o060000,
    }
}

/// Checks `archive` against `tree` entry by entry.
fn check_archive(tree: &Tree, archive: &[u8], stats: &CpioStats, mtime: u32) {
    let read = read_back(archive);
    assert_eq!(read.len(), tree.len());
    assert_eq!(archive.len() % 4, 0);
    assert_eq!(stats.archive_bytes, archive.len() as u64);
    assert_eq!(stats.entries, tree.len() as u64);

    // Sorted component by component (an independent sort of the names).
    let names: Vec<&str> = read.iter().map(|e| e.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_by(|a, b| a.split('/').cmp(b.split('/')));
    assert_eq!(names, sorted, "archive order is not component order");
    let mut seen = BTreeSet::new();
    for name in &names {
        if let Some((parent, _)) = name.rsplit_once('/') {
            assert!(seen.contains(parent), "{name} comes before its parent");
        }
        assert!(seen.insert(*name), "{name} twice");
    }

    let (mut files, mut dirs, mut links, mut devs, mut bytes) = (0, 0, 0, 0, 0);
    for (e, (path, node)) in read.iter().zip(tree.iter()) {
        assert_eq!(e.name, path.as_str());
        assert_eq!(
            e.ino,
            fnv_inode(path.as_str()),
            "{path}: inode is the name's hash"
        );
        assert_eq!((e.uid, e.gid, e.nlink, e.mtime), (0, 0, 1, mtime), "{path}");
        assert_eq!(e.mode, type_bits(node) | node.mode, "{path}");
        assert_eq!(e.data, expected_data(node), "{path}");
        let rdev = match node.kind {
            NodeKind::CharDev { major, minor } | NodeKind::BlockDev { major, minor } => {
                devs += 1;
                (major, minor)
            }
            _ => (0, 0),
        };
        assert_eq!(e.rdev, rdev, "{path}");
        match node.kind {
            NodeKind::File { .. } => {
                files += 1;
                bytes += e.data.len() as u64;
            }
            NodeKind::Dir => dirs += 1,
            NodeKind::Symlink { .. } => links += 1,
            _ => {}
        }
    }
    assert_eq!(
        (
            stats.files,
            stats.dirs,
            stats.symlinks,
            stats.devices,
            stats.file_bytes
        ),
        (files, dirs, links, devs, bytes)
    );
}

// ------------------------------------------------------------------ path rules

/// The rules `ImagePath` documents, written out independently.
fn valid_image_path(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('/')
        && !s.contains('\0')
        && s.len() <= 4095
        && s.split('/').next() != Some("TRAILER!!!")
        && s.split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && c.len() <= 255)
}

/// Strings built to hit every rule: tricky components, slashes in odd places, NULs.
fn tricky_path() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        Just("".to_string()),
        Just(".".to_string()),
        Just("..".to_string()),
        Just("...".to_string()),
        Just(".a".to_string()),
        Just("a\0b".to_string()),
        Just("TRAILER!!!".to_string()),
        Just("x".repeat(255)),
        Just("x".repeat(256)),
        component(),
    ];
    (
        any::<bool>(),
        prop::collection::vec(part, 1..6),
        any::<bool>(),
    )
        .prop_map(|(lead, parts, trail)| {
            let mut s = parts.join("/");
            if lead {
                s.insert(0, '/');
            }
            if trail {
                s.push('/');
            }
            s
        })
}

fn escapes_root(abs: &str) -> bool {
    Path::new(abs)
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
}

// ------------------------------------------------------------------ properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
    ))]

    /// Random trees read back identically through an independent reader.
    #[test]
    fn cpio_round_trips_through_the_cpio_crate(entries in entries(), mtime in any::<u32>()) {
        let tree = build(&entries);
        let (archive, stats) = write(&tree, mtime);
        check_archive(&tree, &archive, &stats, mtime);
    }

    /// The same nodes in any insertion order give the same archive, byte for byte.
    #[test]
    fn cpio_bytes_do_not_depend_on_insertion_order(
        entries in entries(),
        seed in any::<u64>(),
    ) {
        let tree = build(&entries);
        let mut nodes = snapshot(&tree);
        // A deterministic shuffle from the seed (Fisher-Yates with an LCG).
        let mut state = seed | 1;
        for i in (1..nodes.len()).rev() {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            nodes.swap(i, (state >> 33) as usize % (i + 1));
        }
        let mut shuffled = Tree::new();
        for (p, n) in &nodes {
            shuffled.insert(p, n.clone()).unwrap();
        }
        prop_assert_eq!(snapshot(&shuffled), snapshot(&tree));
        prop_assert_eq!(write(&shuffled, 7).0, write(&tree, 7).0);
    }

    /// Files streamed from the host give the same archive as the same bytes from memory.
    #[test]
    fn host_files_and_memory_give_the_same_archive(
        files in prop::collection::btree_map(path(), prop::collection::vec(any::<u8>(), 0..70_000), 1..6),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut from_memory = Tree::new();
        let mut from_host = Tree::new();
        for (i, (p, data)) in files.iter().enumerate() {
            let host = dir.path().join(format!("f{i}"));
            fs::write(&host, data).unwrap();
            let a = from_memory.insert(p, Node::file(Source::Bytes(data.clone()), 0o644));
            let b = from_host.insert(p, Node::file(Source::Host(host), 0o644));
            prop_assert_eq!(a.is_ok(), b.is_ok());
        }
        let (archive, stats) = write(&from_host, 0);
        check_archive(&from_host, &archive, &stats, 0);
        prop_assert_eq!(archive, write(&from_memory, 0).0);
    }

    /// `ImagePath::new` accepts exactly the valid paths, and those round-trip.
    #[test]
    fn image_path_accepts_exactly_the_valid_paths(s in prop_oneof![tricky_path(), any::<String>()]) {
        let valid = valid_image_path(&s);
        match ImagePath::new(s.clone()) {
            Ok(p) => {
                prop_assert!(valid, "accepted {:?}", s);
                prop_assert_eq!(p.as_str(), s.as_str());
                prop_assert_eq!(p.to_string(), s.clone());
                prop_assert_eq!(p.to_absolute(), format!("/{s}"));
                prop_assert_eq!(p.components().collect::<Vec<_>>().join("/"), s.clone());
                prop_assert_eq!(ImagePath::new(p.as_str()).unwrap(), p.clone());
                prop_assert_eq!(s.parse::<ImagePath>().unwrap(), p.clone());
                let last = s.rsplit('/').next().unwrap();
                prop_assert_eq!(p.file_name(), last);
                match p.parent() {
                    Some(parent) => {
                        prop_assert_eq!(format!("{parent}/{last}"), s.clone());
                        prop_assert!(p.starts_with(&parent));
                        prop_assert!(parent < p);
                    }
                    None => prop_assert!(!s.contains('/')),
                }
                prop_assert!(!escapes_root(&p.to_absolute()));
            }
            Err(e) => {
                prop_assert!(!valid, "rejected valid {:?}: {}", s, e);
                let msg = e.to_string();
                prop_assert!(msg.starts_with(&format!("invalid image path {s:?}: ")), "{}", msg);
                prop_assert!(!msg.contains('\n'));
            }
        }
    }

    /// Whatever is inserted, every path in a tree is relative, normalised and inside the root.
    #[test]
    fn a_tree_never_holds_a_path_escaping_the_root(
        paths in prop::collection::vec(tricky_path(), 1..30),
        joins in prop::collection::vec(tricky_path(), 0..10),
    ) {
        let mut tree = Tree::new();
        for p in &paths {
            let _ = tree.insert(p, Node::dir(0o755));
        }
        let existing: Vec<ImagePath> = tree.iter().map(|(p, _)| p.clone()).collect();
        for (base, rest) in existing.iter().zip(&joins) {
            if let Ok(joined) = base.join(rest) {
                prop_assert!(joined.starts_with(base));
                let _ = tree.insert(joined.as_str(), Node::file(Source::Bytes(vec![]), 0o644));
            }
        }
        for (p, _) in tree.iter() {
            prop_assert!(valid_image_path(p.as_str()), "{:?}", p);
            prop_assert!(!escapes_root(&p.to_absolute()), "{:?}", p);
            if let Some(parent) = p.parent() {
                prop_assert!(tree.get(parent.as_str()).is_some_and(Node::is_dir));
            }
        }
    }

    /// A host file name that is not UTF-8 is an error naming the file; the rest of the
    /// folder's UTF-8 names come through unchanged.
    #[test]
    fn non_utf8_host_names_are_rejected_naming_the_file(
        bad in prop::collection::vec(any::<u8>(), 1..40)
            .prop_filter("a valid file name that is not UTF-8", |b| {
                !b.contains(&b'/') && !b.contains(&0) && std::str::from_utf8(b).is_err()
            }),
        good in prop::collection::btree_set("[^/\0]{1,20}".prop_filter("not ., .. or link", |s| s != "." && s != ".." && s != "link"), 0..5),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pkg");
        fs::create_dir(&root).unwrap();
        for name in &good {
            fs::write(root.join(name), name.as_bytes()).unwrap();
        }
        let mut tree = Tree::new();
        tree.add_host_tree("nix/store/x-pkg", &root, Some("/nix/store/x-pkg")).unwrap();
        for name in &good {
            let p = format!("nix/store/x-pkg/{name}");
            let node = tree.get(&p);
            prop_assert!(node.is_some(), "{} missing", p);
            prop_assert_eq!(expected_data(node.unwrap()), name.as_bytes().to_vec());
        }

        let bad_path = root.join(OsStr::from_bytes(&bad));
        fs::write(&bad_path, b"x").unwrap();
        let err = Tree::new().add_host_tree("x", &root, None).unwrap_err().to_string();
        prop_assert_eq!(err, format!("{}: file name is not valid UTF-8", bad_path.display()));
        fs::remove_file(&bad_path).unwrap();

        // A symlink whose target is not UTF-8: the same kind of error.
        let link = root.join("link");
        std::os::unix::fs::symlink(OsStr::from_bytes(&bad), &link).unwrap();
        let err = Tree::new().add_host_tree("x", &root, None).unwrap_err().to_string();
        prop_assert_eq!(err, format!("{}: symlink target is not valid UTF-8", link.display()));
    }
}
