//! Shared test helpers: a small fake Nix store on disk, trees built from it, and the host
//! tools used as independent oracles (tests may spawn them; the crate never does).

#![allow(dead_code)] // Each test binary uses a different subset.

use std::fs::{self, File, FileTimes};
use std::io::{Read, Write};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use rootfs::{Node, Source, Tree};

pub const GLIBC: &str = "nix/store/3n58xw4373jp0ljirf06d8077j15pc4j-glibc-2.40";
pub const BUSYBOX: &str = "nix/store/9ci8l2dqvbl2rk0kvbxsrjmb4jrkcryh-busybox-1.36.1";
pub const HELLO: &str = "nix/store/a0q3cvj9q5fwbq2dxnr4wkp5z2g1d3y7-hello.sh";
pub const MTIME: u32 = 1_700_000_000;

/// A fake store with a few packages, shaped like real store paths: read-only directories
/// and files, symlinks between them, one store path that is a single file.
pub struct Store {
    dir: tempfile::TempDir,
}

impl Store {
    /// Creates the store; `mtime` is stamped on every file so tests can vary it.
    pub fn new(mtime: SystemTime) -> Store {
        let dir = tempfile::tempdir().unwrap();
        let store = Store { dir };
        let glibc = store.host(GLIBC);
        let busybox = store.host(BUSYBOX);
        fs::create_dir_all(glibc.join("lib")).unwrap();
        fs::create_dir_all(busybox.join("bin")).unwrap();
        fs::create_dir_all(busybox.join("share/empty")).unwrap();

        write(
            &glibc.join("lib/libc.so.6"),
            &pseudo_random(150_001, 1),
            0o555,
            mtime,
        );
        write(
            &glibc.join("lib/ld-linux-x86-64.so.2"),
            &pseudo_random(4099, 2),
            0o555,
            mtime,
        );
        symlink("libc.so.6", glibc.join("lib/libc.so")).unwrap();
        write(
            &busybox.join("bin/busybox"),
            &pseudo_random(300_000, 3),
            0o555,
            mtime,
        );
        symlink("busybox", busybox.join("bin/sh")).unwrap();
        symlink(
            format!("/{GLIBC}/lib/libc.so.6"),
            busybox.join("bin/libc-link"),
        )
        .unwrap();
        write(&busybox.join("share/motd"), b"hi\n", 0o444, mtime);
        write(
            &store.host(HELLO),
            format!("#!/{BUSYBOX}/bin/sh\necho hello\n").as_bytes(),
            0o555,
            mtime,
        );
        for dir in [
            glibc.join("lib"),
            glibc.clone(),
            busybox.join("bin"),
            busybox.join("share/empty"),
            busybox.join("share"),
            busybox.clone(),
        ] {
            set_times(&dir, mtime);
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o555)).unwrap();
        }
        store
    }

    /// The host path of an image path under this store's root.
    pub fn host(&self, image_path: &str) -> PathBuf {
        self.dir.path().join(image_path)
    }

    /// Adds one package to `tree`.
    pub fn add(&self, tree: &mut Tree, image_path: &str) {
        tree.add_host_tree(
            image_path,
            &self.host(image_path),
            Some(&format!("/{image_path}")),
        )
        .unwrap();
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Read-only directories would stop TempDir from removing their contents.
        make_writable(self.dir.path());
    }
}

pub fn make_writable(dir: &Path) {
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                make_writable(&entry.path());
            }
        }
    }
}

fn write(path: &Path, data: &[u8], mode: u32, mtime: SystemTime) {
    let mut f = File::create(path).unwrap();
    f.write_all(data).unwrap();
    f.set_times(FileTimes::new().set_modified(mtime).set_accessed(mtime))
        .unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn set_times(path: &Path, mtime: SystemTime) {
    File::open(path)
        .unwrap()
        .set_times(FileTimes::new().set_modified(mtime).set_accessed(mtime))
        .unwrap();
}

/// Deterministic bytes that compress somewhat, like real binaries.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i % 3 == 0 {
                (x % 16) as u8
            } else {
                b"\0\0ELF_text"[(x % 10) as usize]
            }
        })
        .collect()
}

/// Generated nodes every image has: /init, /etc, and (optionally) device nodes.
pub fn generated_nodes(with_devices: bool) -> Vec<(&'static str, Node)> {
    let mut nodes = vec![
        ("init", Node::symlink(format!("/{BUSYBOX}/bin/sh"))),
        (
            "etc/passwd",
            Node::file(
                Source::Bytes(b"root:x:0:0:root:/:/bin/sh\n".to_vec()),
                0o644,
            ),
        ),
        (
            "etc/hostname",
            Node::file(Source::Bytes(b"bonsai\n".to_vec()), 0o644),
        ),
        ("tmp", Node::dir(0o1777)),
        ("root", Node::dir(0o700)),
    ];
    if with_devices {
        nodes.push(("dev/console", Node::char_dev(5, 1, 0o600)));
        nodes.push(("dev/vda", Node::block_dev(253, 0, 0o660)));
    }
    nodes
}

/// The usual test image: three store paths plus generated nodes.
pub fn sample_tree(store: &Store, with_devices: bool) -> Tree {
    let mut tree = Tree::new();
    for pkg in [GLIBC, BUSYBOX, HELLO] {
        store.add(&mut tree, pkg);
    }
    for (path, node) in generated_nodes(with_devices) {
        tree.insert(path, node).unwrap();
    }
    tree
}

/// A time far from any other the tests use.
pub fn time(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// A command for a host tool used as an oracle. A missing tool fails the test, it does not
/// skip it: these checks are the point.
pub fn tool(name: &str, apt_package: &str) -> Command {
    match Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => Command::new(name),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "`{name}` is not installed, and this test uses it as an independent oracle: \
             install it (apt-get install {apt_package})"
        ),
        Err(e) => panic!("running `{name} --version`: {e}"),
    }
}

/// Runs `cmd` with `input` on stdin; panics with stderr if it fails.
pub fn run(mut cmd: Command, input: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || {
        // The tool may exit early (e.g. on a bad archive); that shows in its status.
        let _ = stdin.write_all(&input);
    });
    let output = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert!(
        output.status.success(),
        "{cmd:?} failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// One entry as read back by the `cpio` crate's reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub ino: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub rdev: (u32, u32),
    pub data: Vec<u8>,
}

/// Reads a whole newc archive with the `cpio` crate (an implementation independent of our
/// writer's header code), checking that nothing follows the trailer.
pub fn read_newc(mut archive: &[u8]) -> Vec<Entry> {
    let mut entries = Vec::new();
    loop {
        let mut reader = cpio::NewcReader::new(archive).unwrap();
        let e = reader.entry().clone();
        if e.is_trailer() {
            assert!(
                reader.finish().unwrap().is_empty(),
                "data after the trailer"
            );
            return entries;
        }
        let mut data = Vec::new();
        reader.read_to_end(&mut data).unwrap();
        entries.push(Entry {
            name: e.name().to_owned(),
            ino: e.ino(),
            mode: e.mode(),
            uid: e.uid(),
            gid: e.gid(),
            nlink: e.nlink(),
            mtime: e.mtime(),
            rdev: (e.rdev_major(), e.rdev_minor()),
            data,
        });
        archive = reader.finish().unwrap();
    }
}

/// Names of the entries in `dir`, sorted.
pub fn dir_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// FNV-1a of the name, never 0: the inode number the writer gives each entry (written
/// here independently of the writer, as an oracle).
pub fn fnv_inode(name: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    h.max(1)
}
