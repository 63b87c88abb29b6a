//! GNU cpio as an independent oracle for the newc writer: it must list the archive exactly
//! as the tree describes it, and extract it to the same contents.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::*;
use rootfs::{write_newc, CpioOptions, Node, NodeKind, Source, Tree};

fn archive(tree: &Tree) -> Vec<u8> {
    let mut out = Vec::new();
    write_newc(tree, &CpioOptions { mtime: MTIME }, &mut out).unwrap();
    out
}

/// `ls -l`-style mode string, written independently of the writer's type bits.
fn mode_string(node: &Node) -> String {
    let kind = match node.kind {
        NodeKind::File { .. } => '-',
        NodeKind::Dir => 'd',
        NodeKind::Symlink { .. } => 'l',
        NodeKind::CharDev { .. } => 'c',
        NodeKind::BlockDev { .. } => 'b',
    };
    let m = node.mode;
    let bit = |mask: u32, c: char| if m & mask != 0 { c } else { '-' };
    let exec = |x: u32, special: u32, set: char, unset: char| match (m & x != 0, m & special != 0) {
        (true, true) => set,
        (false, true) => unset,
        (true, false) => 'x',
        (false, false) => '-',
    };
    [
        kind,
        bit(0o400, 'r'),
        bit(0o200, 'w'),
        exec(0o100, 0o4000, 's', 'S'),
        bit(0o040, 'r'),
        bit(0o020, 'w'),
        exec(0o010, 0o2000, 's', 'S'),
        bit(0o004, 'r'),
        bit(0o002, 'w'),
        exec(0o001, 0o1000, 't', 'T'),
    ]
    .iter()
    .collect()
}

fn contents(source: &Source) -> Vec<u8> {
    match source {
        Source::Bytes(b) => b.clone(),
        Source::Host(p) => fs::read(p).unwrap(),
    }
}

#[test]
fn gnu_cpio_lists_every_entry_as_specified() {
    let store = Store::new(time(1));
    let mut tree = sample_tree(&store, true);
    tree.insert("bin/suid", Node::file(Source::Bytes(b"x".to_vec()), 0o4711))
        .unwrap();
    let archive = archive(&tree);

    let mut cmd = tool("cpio", "cpio");
    cmd.args(["-itv", "--numeric-uid-gid"]).env("TZ", "UTC");
    let output = run(cmd, &archive);
    let listing = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), tree.len(), "{listing}");

    for (line, (path, node)) in lines.iter().zip(tree.iter()) {
        let t: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(t[0], mode_string(node), "{line}");
        assert_eq!(&t[1..4], ["1", "0", "0"], "nlink, uid, gid: {line}");
        let rest = match &node.kind {
            NodeKind::CharDev { major, minor } | NodeKind::BlockDev { major, minor } => {
                assert_eq!(t[4], format!("{major},"), "{line}");
                assert_eq!(t[5], minor.to_string(), "{line}");
                &t[6..]
            }
            kind => {
                let size = match kind {
                    NodeKind::File { source } => contents(source).len(),
                    NodeKind::Symlink { target } => target.len(),
                    _ => 0,
                };
                assert_eq!(t[4], size.to_string(), "{line}");
                &t[5..]
            }
        };
        // 1_700_000_000 is 2023-11-14 UTC; the store's entries keep the store's mtime (1).
        let date = if path.as_str().starts_with("nix/store/") {
            ["Jan", "1", "1970"]
        } else {
            ["Nov", "14", "2023"]
        };
        assert_eq!(&rest[..3], date, "{line}");
        let name = rest[3..].join(" ");
        match &node.kind {
            NodeKind::Symlink { target } => {
                assert_eq!(name, format!("{path} -> {target}"), "{line}")
            }
            _ => assert_eq!(name, path.as_str(), "{line}"),
        }
    }
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(
        stderr.trim(),
        format!("{} blocks", archive.len().div_ceil(512))
    );
}

#[test]
fn gnu_cpio_extracts_the_same_files_and_links() {
    let store = Store::new(time(1));
    // No device nodes: creating them needs privileges the test may not have.
    let tree = sample_tree(&store, false);
    let archive = archive(&tree);

    let dest = tempfile::tempdir().unwrap();
    let mut cmd = tool("cpio", "cpio");
    cmd.args(["-idm", "--no-absolute-filenames", "--quiet"])
        .current_dir(dest.path());
    run(cmd, &archive);

    let mut seen = 0;
    for (path, node) in tree.iter() {
        let host = dest.path().join(path.as_str());
        let meta = fs::symlink_metadata(&host).unwrap_or_else(|e| panic!("{path}: {e}"));
        match &node.kind {
            NodeKind::File { source } => {
                assert!(meta.is_file(), "{path}");
                assert_eq!(fs::read(&host).unwrap(), contents(source), "{path}");
                assert_eq!(meta.mode() & 0o7777, node.mode, "{path}");
                let want = rootfs::mtime_of(path.as_str(), MTIME);
                assert_eq!(meta.mtime(), i64::from(want), "{path}");
            }
            NodeKind::Dir => {
                assert!(meta.is_dir(), "{path}");
                assert_eq!(meta.mode() & 0o7777, node.mode, "{path}");
            }
            NodeKind::Symlink { target } => {
                assert!(meta.file_type().is_symlink(), "{path}");
                assert_eq!(
                    fs::read_link(&host).unwrap().to_str(),
                    Some(target.as_str())
                );
            }
            NodeKind::CharDev { .. } | NodeKind::BlockDev { .. } => unreachable!(),
        }
        seen += 1;
    }
    assert_eq!(seen, tree.len());
    // Nothing else was extracted.
    assert_eq!(
        dir_names(dest.path()),
        ["etc", "init", "nix", "root", "tmp"]
    );
    fs::set_permissions(dest.path(), fs::Permissions::from_mode(0o755)).unwrap();
    make_writable(dest.path());
}
