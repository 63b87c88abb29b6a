//! Whole-flow tests of `pack`: round trips through independent readers and decoders,
//! byte-for-byte determinism, and atomic output.

mod common;

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use common::*;
use rootfs::{
    manifest, pack, pack_cached, write_newc, Compression, CpioOptions, Node, NodeKind, PackOptions,
    PieceCache, Source, Tree,
};

fn options(compression: Compression) -> PackOptions {
    PackOptions {
        compression,
        level: None,
        mtime: MTIME,
    }
}

fn raw_cpio(tree: &Tree) -> Vec<u8> {
    let mut out = Vec::new();
    write_newc(tree, &CpioOptions { mtime: MTIME }, &mut out).unwrap();
    out
}

fn decompress(compression: Compression, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match compression {
        Compression::None => out = data.to_vec(),
        Compression::Gzip => {
            flate2::read::GzDecoder::new(data)
                .read_to_end(&mut out)
                .unwrap();
        }
        Compression::Zstd => out = zstd::decode_all(data).unwrap(),
        Compression::Xz => {
            liblzma::read::XzDecoder::new(data)
                .read_to_end(&mut out)
                .unwrap();
        }
    }
    out
}

/// Builds the sample tree from its parts in a scrambled order.
fn scrambled_tree(store: &Store) -> Tree {
    let mut tree = Tree::new();
    let mut generated = generated_nodes(true);
    generated.reverse();
    for (path, node) in generated {
        tree.insert(path, node).unwrap();
    }
    for pkg in [HELLO, BUSYBOX, GLIBC] {
        store.add(&mut tree, pkg);
    }
    tree
}

#[test]
fn packed_archive_round_trips_through_the_cpio_crate_reader() {
    let store = Store::new(time(1));
    let tree = sample_tree(&store, true);
    for compression in Compression::ALL {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join(compression.file_name());
        let report = pack(&tree, &options(compression), &out).unwrap();
        let packed = fs::read(&out).unwrap();
        assert_eq!(
            report.compressed_bytes,
            packed.len() as u64,
            "{compression}"
        );
        let archive = decompress(compression, &packed);
        assert_eq!(
            report.cpio.archive_bytes,
            archive.len() as u64,
            "{compression}"
        );
        assert_eq!(report.cpio.entries, tree.len() as u64);

        let entries = read_newc(&archive);
        assert_eq!(entries.len(), tree.len());
        for (entry, (path, node)) in entries.iter().zip(tree.iter()) {
            assert_eq!(entry.name, path.as_str());
            assert_eq!(entry.ino, fnv_inode(path.as_str()), "{path}");
            assert_eq!(entry.nlink, 1, "{path}");
            assert_eq!((entry.uid, entry.gid), (0, 0), "{path}");
            let want = rootfs::mtime_of(path.as_str(), MTIME);
            assert_eq!(entry.mtime, want, "{path}");
            assert_eq!(entry.mode & 0o7777, node.mode, "{path}");
            let (type_bits, data, rdev) = match &node.kind {
                NodeKind::File {
                    source: Source::Host(p),
                } => (0o100000, fs::read(p).unwrap(), (0, 0)),
                NodeKind::File {
                    source: Source::Bytes(b),
                } => (0o100000, b.clone(), (0, 0)),
                NodeKind::Dir => (0o040000, vec![], (0, 0)),
                NodeKind::Symlink { target } => (0o120000, target.clone().into_bytes(), (0, 0)),
                NodeKind::CharDev { major, minor } => (0o020000, vec![], (*major, *minor)),
                NodeKind::BlockDev { major, minor } => (0o060000, vec![], (*major, *minor)),
            };
            assert_eq!(entry.mode & 0o170000, type_bits, "{path}");
            assert_eq!(entry.data, data, "{path}");
            assert_eq!(entry.rdev, rdev, "{path}");
        }
    }
}

#[test]
fn packing_is_deterministic_across_insert_order_host_paths_and_mtimes() {
    // Two stores in different directories, with different file times.
    let store_a = Store::new(time(1_000_000));
    let store_b = Store::new(time(1_600_000_000));
    let tree_a = sample_tree(&store_a, true);
    let tree_b = scrambled_tree(&store_b);
    assert_eq!(raw_cpio(&tree_a), raw_cpio(&tree_b));

    let dir = tempfile::tempdir().unwrap();
    for compression in Compression::ALL {
        let a = dir.path().join(format!("a-{}", compression.file_name()));
        let b = dir.path().join(format!("b-{}", compression.file_name()));
        let report_a = pack(&tree_a, &options(compression), &a).unwrap();
        let report_b = pack(&tree_b, &options(compression), &b).unwrap();
        assert_eq!(report_a, report_b, "{compression}");
        assert!(
            fs::read(&a).unwrap() == fs::read(&b).unwrap(),
            "{compression} output differs between equal trees"
        );
    }
    assert_eq!(manifest(&tree_a).unwrap(), manifest(&tree_b).unwrap());
}

#[test]
fn gzip_output_decompresses_with_flate2_and_gzip() {
    let store = Store::new(time(1));
    let tree = sample_tree(&store, true);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(Compression::Gzip.file_name());
    pack(&tree, &options(Compression::Gzip), &out).unwrap();
    let packed = fs::read(&out).unwrap();
    let expected = raw_cpio(&tree);

    assert_eq!(decompress(Compression::Gzip, &packed), expected);
    let mut cmd = tool("gzip", "gzip");
    cmd.arg("-dc");
    assert!(
        run(cmd, &packed).stdout == expected,
        "gzip -dc gave other bytes"
    );
}

#[test]
fn xz_output_passes_xz_test_with_a_crc32_check() {
    let store = Store::new(time(1));
    let tree = sample_tree(&store, true);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(Compression::Xz.file_name());
    pack(&tree, &options(Compression::Xz), &out).unwrap();
    let packed = fs::read(&out).unwrap();
    let expected = raw_cpio(&tree);

    let mut test = tool("xz", "xz-utils");
    test.arg("-t").arg(&out);
    run(test, &[]);
    let mut list = tool("xz", "xz-utils");
    list.args(["--robot", "--list"]).arg(&out);
    let listing = String::from_utf8(run(list, &[]).stdout).unwrap();
    // The kernel's XZ decoder accepts only CRC32 or no check.
    let file_line = listing.lines().find(|l| l.starts_with("file\t")).unwrap();
    assert_eq!(file_line.split('\t').nth(6), Some("CRC32"), "{listing}");
    let mut cmd = tool("xz", "xz-utils");
    cmd.arg("-dc");
    assert!(
        run(cmd, &packed).stdout == expected,
        "xz -dc gave other bytes"
    );
    assert_eq!(decompress(Compression::Xz, &packed), expected);
}

#[test]
fn zstd_output_decompresses_with_the_zstd_decoder() {
    let store = Store::new(time(1));
    let tree = sample_tree(&store, true);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(Compression::Zstd.file_name());
    pack(&tree, &options(Compression::Zstd), &out).unwrap();
    let packed = fs::read(&out).unwrap();
    assert_eq!(&packed[..4], b"\x28\xb5\x2f\xfd");
    assert_eq!(decompress(Compression::Zstd, &packed), raw_cpio(&tree));
}

#[test]
fn invalid_paths_and_conflicts_are_errors_naming_the_path() {
    let mut tree = Tree::new();
    let file = |data: &[u8]| Node::file(Source::Bytes(data.to_vec()), 0o644);
    let err = tree.insert("etc/../shadow", file(b"")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid image path \"etc/../shadow\": contains a `..` component"
    );
    let err = tree.insert("/etc/shadow", file(b"")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid image path \"/etc/shadow\": absolute path, image paths are relative to the \
         image root"
    );
    tree.insert("etc/hostname", file(b"a\n")).unwrap();
    let err = tree
        .insert("etc/hostname", Node::symlink("/proc/sys/kernel/hostname"))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "/etc/hostname: cannot add symlink to /proc/sys/kernel/hostname, \
         file 0644 of 2 generated bytes is already there"
    );

    // Two store paths cannot both claim one file.
    let store = Store::new(time(1));
    let mut tree = Tree::new();
    store.add(&mut tree, GLIBC);
    let other = store.host(BUSYBOX).join("share/motd");
    let err = tree
        .add_host_tree(
            format!("{GLIBC}/lib/libc.so.6"),
            &other,
            Some("/nix/store/x"),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!(
            "/{GLIBC}/lib/libc.so.6: cannot add file 0444 from"
        )),
        "{err}"
    );
    assert!(
        err.ends_with(&format!("(owned by /{GLIBC}) is already there")),
        "{err}"
    );
}

/// Sets up `dir/initramfs.cpio.gz` holding "previous".
fn previous_output(dir: &Path) -> std::path::PathBuf {
    let out = dir.join(Compression::Gzip.file_name());
    fs::write(&out, b"previous").unwrap();
    out
}

#[test]
fn a_source_failing_mid_pack_leaves_the_previous_output_and_no_temp_file() {
    let store = Store::new(time(1));
    let mut tree = sample_tree(&store, true);
    // Sorted last, so most of the archive has been written when it fails.
    let late = store.host("late-file");
    fs::write(&late, b"soon gone").unwrap();
    tree.insert("zzz/late", Node::file(Source::Host(late.clone()), 0o644))
        .unwrap();
    fs::remove_file(&late).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let out = previous_output(dir.path());
    for compression in Compression::ALL {
        let err = pack(&tree, &options(compression), &out).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("reading {}: No such file or directory", late.display())
        );
        assert_eq!(fs::read(&out).unwrap(), b"previous", "{compression}");
        assert_eq!(
            dir_names(dir.path()),
            ["initramfs.cpio.gz"],
            "{compression}"
        );
    }

    // A source that is a directory fails the same way.
    let mut tree = sample_tree(&store, false);
    let host_dir = store.host(GLIBC);
    tree.insert("zzz/dir", Node::file(Source::Host(host_dir.clone()), 0o644))
        .unwrap();
    let err = pack(&tree, &options(Compression::Gzip), &out).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}: is a directory, expected a regular file",
            host_dir.display()
        )
    );
    assert_eq!(fs::read(&out).unwrap(), b"previous");
    assert_eq!(dir_names(dir.path()), ["initramfs.cpio.gz"]);
}

#[test]
fn packing_into_a_missing_directory_errors_and_creates_nothing() {
    let store = Store::new(time(1));
    let tree = sample_tree(&store, false);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("missing/initramfs.cpio.gz");
    let err = pack(&tree, &options(Compression::Gzip), &out).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "creating a temporary file for {}: No such file or directory",
            out.display()
        )
    );
    assert!(dir_names(dir.path()).is_empty());

    // A parent that is a file.
    fs::write(dir.path().join("file"), b"").unwrap();
    let out = dir.path().join("file/initramfs.cpio.gz");
    let err = pack(&tree, &options(Compression::Gzip), &out).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "creating a temporary file for {}: Not a directory",
            out.display()
        )
    );
    assert_eq!(dir_names(dir.path()), ["file"]);
}

#[test]
fn packing_into_a_read_only_directory_errors_and_creates_nothing() {
    let store = Store::new(time(1));
    let tree = sample_tree(&store, false);
    let dir = tempfile::tempdir().unwrap();
    let ro = dir.path().join("ro");
    fs::create_dir(&ro).unwrap();
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
    let out = ro.join("initramfs.cpio.gz");

    if fs::write(ro.join("probe"), b"").is_ok() {
        // Root (CAP_DAC_OVERRIDE) writes anywhere, so there is no read-only directory to test.
        eprintln!("note: running with permission to write to a 0555 directory, case not exercised");
        fs::remove_file(ro.join("probe")).unwrap();
    } else {
        let err = pack(&tree, &options(Compression::Gzip), &out).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "creating a temporary file for {}: Permission denied",
                out.display()
            )
        );
        assert!(dir_names(&ro).is_empty());
    }
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn an_output_path_that_is_a_directory_is_left_alone() {
    let store = Store::new(time(1));
    let tree = sample_tree(&store, false);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("initramfs.cpio.gz");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("keep"), b"").unwrap();
    let err = pack(&tree, &options(Compression::Gzip), &out)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("renaming "), "{err}");
    assert!(
        err.ends_with(&format!(" to {}: Is a directory", out.display())),
        "{err}"
    );
    assert_eq!(dir_names(dir.path()), ["initramfs.cpio.gz"]);
    assert_eq!(dir_names(&out), ["keep"]);
}

#[test]
fn pack_replaces_a_previous_output() {
    let store = Store::new(time(1));
    let tree = sample_tree(&store, true);
    let dir = tempfile::tempdir().unwrap();
    let out = previous_output(dir.path());
    let report = pack(&tree, &options(Compression::Gzip), &out).unwrap();
    assert_eq!(fs::metadata(&out).unwrap().len(), report.compressed_bytes);
    assert_eq!(dir_names(dir.path()), ["initramfs.cpio.gz"]);
    assert!(report.cpio.archive_bytes > report.compressed_bytes);
    assert_eq!(
        report.cpio.files + report.cpio.dirs + report.cpio.symlinks + report.cpio.devices,
        report.cpio.entries
    );
}

/// The sample tree plus a store path of a few MiB (several gzip blocks), with `hello`'s
/// script replaced by `hello` bytes.
fn cache_tree(store: &Store, hello: &[u8]) -> Tree {
    let mut tree = sample_tree(store, false);
    let big = "nix/store/q9i0fjl5yx8k3a1dcm7v2c4rb6n0h8s1-big-1.0";
    let mut text = Vec::new();
    while text.len() < 5 << 20 {
        text.extend_from_slice(
            format!("line {} of a large, compressible file\n", text.len()).as_bytes(),
        );
        text.extend_from_slice(&pseudo_random(40, text.len() as u64));
    }
    tree.insert(
        format!("{big}/share/data"),
        Node::file(Source::Bytes(text), 0o444),
    )
    .unwrap();
    tree.remove(HELLO).expect("the sample tree has hello");
    tree.insert(HELLO, Node::file(Source::Bytes(hello.to_vec()), 0o555))
        .unwrap();
    tree
}

fn pack_with(tree: &Tree, cache: Option<&Arc<PieceCache>>, out: &Path) -> Vec<u8> {
    pack_cached(tree, &options(Compression::Gzip), out, cache.cloned()).unwrap();
    fs::read(out).unwrap()
}

#[test]
fn the_piece_cache_never_changes_the_bytes_and_reuses_unchanged_store_paths() {
    let store = Store::new(time(1));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("initramfs.cpio.gz");
    let cache_dir = dir.path().join("cache");
    let open = || Arc::new(PieceCache::open(&cache_dir, b"salt").unwrap());
    let t1 = cache_tree(&store, b"#!/bin/sh\necho hello\n");
    let t2 = cache_tree(&store, b"#!/bin/sh\necho hello, world\n");
    let a = pack_with(&t1, None, &out);
    let b = pack_with(&t2, None, &out);
    assert_ne!(a, b);

    // Cold, then warm: the same bytes, and the second time every block comes from the cache.
    let cold = open();
    assert!(pack_with(&t1, Some(&cold), &out) == a);
    let s = cold.stats();
    assert_eq!((s.hits, s.corrupt, s.write_errors), (0, 0, 0));
    assert!(s.stored >= 8, "{s:?}");
    let warm = open();
    assert!(pack_with(&t1, Some(&warm), &out) == a);
    assert_eq!(warm.stats().hits, s.stored);
    assert_eq!(warm.stats().misses, 0);

    // One package changed: its blocks are compressed, the big store path's come from the cache.
    let changed = open();
    assert!(pack_with(&t2, Some(&changed), &out) == b);
    let c = changed.stats();
    assert!(c.misses >= 1 && c.misses <= 2, "{c:?}");
    assert!(c.reused_bytes >= 5 << 20, "{c:?}");

    // Damaged entries: detected, deleted, compressed again; the bytes stay the same.
    let mut damaged = 0;
    for sub in fs::read_dir(&cache_dir).unwrap() {
        for e in fs::read_dir(sub.unwrap().path()).unwrap() {
            let p = e.unwrap().path();
            let mut bytes = fs::read(&p).unwrap();
            let last = bytes.len() - 5;
            bytes[last] ^= 0x55;
            fs::write(&p, bytes).unwrap();
            damaged += 1;
        }
    }
    let repair = open();
    assert!(pack_with(&t1, Some(&repair), &out) == a);
    let r = repair.stats();
    assert_eq!(r.hits, 0, "{r:?}");
    assert!(r.corrupt >= s.stored && r.corrupt <= damaged, "{r:?}");
    assert!(repair
        .corrupt_entries()
        .iter()
        .all(|(_, why)| why == "checksum mismatch"));
    let again = open();
    assert!(pack_with(&t1, Some(&again), &out) == a);
    assert_eq!((again.stats().misses, again.stats().corrupt), (0, 0));

    // GNU gzip and GNU cpio read the segmented stream as one archive.
    let mut gzip = tool("gzip", "gzip");
    gzip.arg("-dc");
    let raw = run(gzip, &a).stdout;
    assert!(raw == raw_cpio(&t1), "gzip -dc gives the plain archive");
    let mut cpio = tool("cpio", "cpio");
    cpio.args(["-it", "--quiet"]);
    let listing = run(cpio, &raw).stdout;
    assert_eq!(
        String::from_utf8(listing).unwrap().lines().count(),
        t1.len()
    );
}
