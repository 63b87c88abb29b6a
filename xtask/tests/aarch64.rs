//! End to end for the qemu-aarch64 board: the cross build from the offline package set (Debian
//! arm64 packages, Debian's aarch64 cross compiler), every ELF file of the image checked to be
//! aarch64, and a real QEMU boot with `--check`. Needs Nix, qemu-system-aarch64 and the cross
//! toolchain: `cargo xtask test` or `cargo xtask build --board qemu-aarch64` installs them.
//! These tests fail (never skip) when something is missing.

use std::io::Read;
use std::path::Path;
use std::sync::Mutex;

mod common;
use common::{ok, require};

/// The tests share their qemu-aarch64 output folder and a 2-core machine: one at a time.
static LOCK: Mutex<()> = Mutex::new(());

const BOARD: &str = "qemu-aarch64";
/// ELF e_machine of aarch64.
const EM_AARCH64: u16 = 183;

fn require_file(file: &str, package: &str) {
    assert!(
        Path::new(file).exists(),
        "{file} is missing: run `cargo xtask build --board {BOARD}` (it installs {package}) or apt-get install {package}"
    );
}

fn require_tools() {
    require("nix-build", "nix-bin");
    require("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu");
    require_file(
        "/usr/aarch64-linux-gnu/include/stdio.h",
        "libc6-dev-arm64-cross",
    );
    require("qemu-system-aarch64", "qemu-system-arm");
}

/// An ELF header's facts: e_machine and whether it asks for an interpreter (PT_INTERP).
#[derive(Debug)]
struct Elf {
    machine: u16,
    interp: bool,
}

fn parse_elf(b: &[u8]) -> Option<Elf> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        return None;
    }
    let le = match b[5] {
        1 => true,
        2 => false,
        _ => return None,
    };
    let u16_at = |o: usize| -> Option<u16> {
        let s: [u8; 2] = b.get(o..o + 2)?.try_into().ok()?;
        Some(if le {
            u16::from_le_bytes(s)
        } else {
            u16::from_be_bytes(s)
        })
    };
    let u32_at = |o: usize| -> Option<u32> {
        let s: [u8; 4] = b.get(o..o + 4)?.try_into().ok()?;
        Some(if le {
            u32::from_le_bytes(s)
        } else {
            u32::from_be_bytes(s)
        })
    };
    let u64_at = |o: usize| -> Option<u64> {
        let s: [u8; 8] = b.get(o..o + 8)?.try_into().ok()?;
        Some(if le {
            u64::from_le_bytes(s)
        } else {
            u64::from_be_bytes(s)
        })
    };
    let machine = u16_at(18)?;
    // Program headers: ELF64 offsets (e_phoff 32, e_phentsize 54, e_phnum 56), ELF32 otherwise.
    let (phoff, phentsize, phnum) = match b[4] {
        2 => (
            u64_at(32)? as usize,
            u16_at(54)? as usize,
            u16_at(56)? as usize,
        ),
        1 => (
            u32_at(28)? as usize,
            u16_at(42)? as usize,
            u16_at(44)? as usize,
        ),
        _ => return None,
    };
    let interp = (0..phnum).any(|i| u32_at(phoff + i * phentsize) == Some(3));
    Some(Elf { machine, interp })
}

/// Every regular file of a (compressed) newc archive: (path, bytes).
fn archive_files(path: &Path) -> Vec<(String, Vec<u8>)> {
    let file = std::fs::File::open(path).unwrap();
    let name = path.to_string_lossy();
    let mut reader: Box<dyn Read> = if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(file))
    } else if name.ends_with(".zst") {
        Box::new(zstd::stream::read::Decoder::new(file).unwrap())
    } else if name.ends_with(".xz") {
        Box::new(liblzma::read::XzDecoder::new(file))
    } else {
        Box::new(file)
    };
    let mut files = Vec::new();
    loop {
        let mut entry = cpio::NewcReader::new(reader).expect("reading the initramfs");
        if entry.entry().is_trailer() {
            break;
        }
        let name = entry.entry().name().to_string();
        let is_file = entry.entry().mode() & 0o170000 == 0o100000;
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        if is_file {
            files.push((name, bytes));
        }
        reader = entry.finish().unwrap();
    }
    files
}

fn build_info(out: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("build.json")).unwrap()).unwrap()
}

/// Asserts that every ELF file in the output's initramfs is aarch64; returns them with facts.
fn assert_all_aarch64(out: &Path) -> Vec<(String, Elf)> {
    let info = build_info(out);
    let initramfs = out.join(info["initramfs"].as_str().unwrap());
    let elves: Vec<(String, Elf)> = archive_files(&initramfs)
        .into_iter()
        .filter_map(|(n, b)| parse_elf(&b).map(|e| (n, e)))
        .collect();
    let wrong: Vec<String> = elves
        .iter()
        .filter(|(_, e)| e.machine != EM_AARCH64)
        .map(|(n, e)| format!("{n} (e_machine {})", e.machine))
        .collect();
    assert!(
        wrong.is_empty(),
        "ELF files that are not aarch64 in {}:\n{}",
        initramfs.display(),
        wrong.join("\n")
    );
    elves
}

#[test]
fn qemu_aarch64_builds_only_aarch64_elves_and_passes_its_check() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    require_tools();
    ok(&["build", "--board", BOARD]);
    let out = common::out_dir(BOARD);

    // The kernel is an arm64 Image: "ARM\x64" at offset 56 of its header.
    let kernel = std::fs::read(out.join("kernel")).unwrap();
    assert!(
        kernel.len() > 64 && &kernel[56..60] == b"ARM\x64",
        "out/{BOARD}/kernel is not an arm64 Image"
    );
    assert!(
        kernel.len() <= 8 << 20,
        "kernel is {} bytes, over 8 MiB",
        kernel.len()
    );

    let elves = assert_all_aarch64(&out);
    let names: Vec<&str> = elves.iter().map(|(n, _)| n.as_str()).collect();
    for want in ["/bin/busybox", "/lib/ld-linux-aarch64.so.1", "/bin/hello"] {
        assert!(
            names.iter().any(|n| n.ends_with(want)),
            "no {want} among the image's ELF files: {names:?}"
        );
    }
    let hello = elves
        .iter()
        .find(|(n, _)| n.ends_with("/bin/hello"))
        .unwrap();
    assert!(
        hello.1.interp,
        "hello is not dynamically linked (no PT_INTERP)"
    );

    let stdout = ok(&["boot", "--board", BOARD, "--check"]);
    assert!(stdout.contains("check passed"), "{stdout}");
    let log = std::fs::read_to_string(out.join("serial.log")).unwrap();
    assert!(log.contains("BONSAI-READY "), "no ready marker in the log");
    assert!(
        log.contains("Hello, world!"),
        "the C application's output is not in the serial log"
    );
}

#[test]
fn bonsai_init_for_aarch64_is_static_aarch64() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    require_tools();
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join(BOARD);
    ok(&[
        "build",
        "--board",
        BOARD,
        "--init",
        "bonsai-init",
        "--out",
        out.to_str().unwrap(),
    ]);
    let elves = assert_all_aarch64(&out);
    let (_, pid1) = elves
        .iter()
        .find(|(n, _)| n.ends_with("bonsai-init"))
        .expect("no bonsai-init in the image");
    assert!(!pid1.interp, "bonsai-init asks for an ELF interpreter");
}
