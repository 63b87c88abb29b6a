//! A `rootfs::Tree` built from arbitrary structured input (names, kinds, modes, contents),
//! written with `rootfs::write_newc`, read back with the `cpio` crate's `NewcReader` (an
//! independent reader): the same entries in the same (sorted) order, inodes 1..n, nlink 1,
//! uid/gid 0, the given mtime (1 in the store), type bits from the node kind, permission bits as given, file
//! data and symlink targets byte for byte, device numbers, 4-byte alignment, nothing after
//! the trailer, and stats that add up. Inserts the tree rejects are skipped (they must leave
//! the tree unchanged).
#![no_main]

use std::io::Read;

use arbitrary::Arbitrary;
use cpio::NewcReader;
use libfuzzer_sys::fuzz_target;
use rootfs::{write_newc, CpioOptions, Node, NodeKind, Source, Tree};

#[derive(Arbitrary, Debug)]
enum Kind {
    File(Vec<u8>),
    Dir,
    Symlink(String),
    CharDev(u32, u32),
    BlockDev(u32, u32),
}

#[derive(Arbitrary, Debug)]
struct Entry {
    /// Components, joined with `/` (so `..`, empty and odd names are tried too).
    components: Vec<String>,
    kind: Kind,
    mode: u16,
}

#[derive(Arbitrary, Debug)]
struct Input {
    mtime: u32,
    entries: Vec<Entry>,
}

const S_IFMT: u32 = 0o170000;

fuzz_target!(|input: Input| {
    let mut tree = Tree::new();
    for e in input.entries.iter().take(64) {
        let path = e.components.join("/");
        let mode = u32::from(e.mode) & 0o7777;
        let node = match &e.kind {
            Kind::File(data) => Node::file(Source::Bytes(data.clone()), mode),
            Kind::Dir => Node::dir(mode),
            Kind::Symlink(t) => Node::symlink(t.clone()),
            Kind::CharDev(a, b) => Node::char_dev(*a, *b, mode),
            Kind::BlockDev(a, b) => Node::block_dev(*a, *b, mode),
        };
        let before: Vec<(String, Node)> = tree
            .iter()
            .map(|(p, n)| (p.to_string(), n.clone()))
            .collect();
        if tree.insert(&path, node).is_err() {
            let after: Vec<(String, Node)> = tree
                .iter()
                .map(|(p, n)| (p.to_string(), n.clone()))
                .collect();
            assert_eq!(
                before, after,
                "a failed insert of {path:?} changed the tree"
            );
        }
    }

    let mut archive = Vec::new();
    let stats = write_newc(&tree, &CpioOptions { mtime: input.mtime }, &mut archive)
        .expect("writing a valid tree to memory");
    assert_eq!(stats.archive_bytes, archive.len() as u64);
    assert_eq!(archive.len() % 4, 0, "archive not padded to 4 bytes");
    assert_eq!(stats.entries, tree.len() as u64);

    let mut rest: &[u8] = &archive;
    let mut expected = tree.iter();
    let (mut files, mut dirs, mut links, mut devs, mut file_bytes) = (0, 0, 0, 0, 0u64);
    loop {
        let mut reader = NewcReader::new(rest).expect("the cpio crate reads our header");
        let e = reader.entry().clone();
        if e.is_trailer() {
            let tail = reader.finish().expect("reading past the trailer");
            assert!(tail.is_empty(), "{} bytes after the trailer", tail.len());
            assert!(
                expected.next().is_none(),
                "entries missing from the archive"
            );
            break;
        }
        let mut data = Vec::new();
        reader.read_to_end(&mut data).expect("reading entry data");
        assert_eq!(data.len() as u64, u64::from(e.file_size()));
        let (path, node) = expected.next().expect("more entries than the tree has");
        assert_eq!(e.name(), path.as_str());
        assert_eq!(e.ino(), fnv_inode(path.as_str()), "inode is the name's FNV-1a hash");
        assert_eq!((e.uid(), e.gid(), e.nlink()), (0, 0, 1));
        // The given mtime, but 1 (the store's) in the store and for bonsai's own binary.
        let want = if path.as_str().starts_with("nix/store/")
            || rootfs::BUILT_BINARIES.contains(&path.as_str())
        {
            1
        } else {
            input.mtime
        };
        assert_eq!(e.mtime(), want, "{path}");
        assert_eq!((e.dev_major(), e.dev_minor()), (0, 0));
        assert_eq!(e.mode() & 0o7777, node.mode, "{path}");
        let (type_bits, content, rdev): (u32, &[u8], (u32, u32)) = match &node.kind {
            NodeKind::File {
                source: Source::Bytes(b),
            } => {
                files += 1;
                file_bytes += b.len() as u64;
                (0o100000, b, (0, 0))
            }
            NodeKind::File {
                source: Source::Host(_),
            } => unreachable!(),
            NodeKind::Dir => {
                dirs += 1;
                (0o040000, b"", (0, 0))
            }
            NodeKind::Symlink { target } => {
                links += 1;
                (0o120000, target.as_bytes(), (0, 0))
            }
            NodeKind::CharDev { major, minor } => {
                devs += 1;
                (0o020000, b"", (*major, *minor))
            }
            NodeKind::BlockDev { major, minor } => {
                devs += 1;
                (0o060000, b"", (*major, *minor))
            }
        };
        assert_eq!(e.mode() & S_IFMT, type_bits, "{path}");
        assert!(data == content, "{path}: data differs");
        assert_eq!((e.rdev_major(), e.rdev_minor()), rdev, "{path}");
        // Every entry's parent came before it.
        if let Some(parent) = path.parent() {
            assert!(tree.get(parent.as_str()).is_some_and(Node::is_dir));
        }
        rest = reader.finish().expect("skipping to the next entry");
    }
    assert_eq!(
        (
            stats.files,
            stats.dirs,
            stats.symlinks,
            stats.devices,
            stats.file_bytes
        ),
        (files, dirs, links, devs, file_bytes)
    );

    // Deterministic: the same tree writes the same bytes, and so does a tree built from the
    // same nodes in reverse order.
    let mut again = Vec::new();
    write_newc(&tree, &CpioOptions { mtime: input.mtime }, &mut again).unwrap();
    assert!(again == archive, "two writes of one tree differ");
    let mut reversed = Tree::new();
    let nodes: Vec<_> = tree.iter().collect();
    for (p, n) in nodes.iter().rev() {
        reversed
            .insert(p.as_str(), (*n).clone())
            .expect("re-inserting a valid node");
    }
    let mut third = Vec::new();
    write_newc(&reversed, &CpioOptions { mtime: input.mtime }, &mut third).unwrap();
    assert!(third == archive, "insertion order changed the archive");
});

/// FNV-1a of the name, never 0: the inode number the writer gives each entry.
fn fnv_inode(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h.max(1)
}
