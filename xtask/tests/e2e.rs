//! End to end: the real Nix build of qemu-x86_64 from the offline package set and real QEMU
//! boots. Needs Nix, QEMU, GNU cpio and the kernel toolchain: `cargo xtask test` installs them.
//! These tests fail (never skip) when something is missing.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

mod common;
use common::{ok, require, root, xtask};

/// The tests share their qemu-x86_64 output folder (`common::out_dir`) and a 2-core machine:
/// one at a time.
static LOCK: Mutex<()> = Mutex::new(());

const BOARD: &str = "qemu-x86_64";

fn sha256(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn out_dir() -> PathBuf {
    common::out_dir(BOARD)
}

fn built() {
    ok(&["build", "--board", BOARD]);
}

#[test]
fn build_is_sane_and_reproducible() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    require("cpio", "cpio");
    built();
    let out = out_dir();
    let initramfs = out.join("initramfs.cpio.gz");
    let first = sha256(&initramfs);
    let kernel = std::fs::metadata(out.join("kernel")).unwrap().len();
    assert!(
        kernel <= 2 * 1024 * 1024,
        "kernel is {kernel} bytes, over 2 MiB"
    );

    // GNU cpio is the oracle for the archive.
    let list = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gzip -dc '{}' | cpio -itv --quiet",
            initramfs.display()
        ))
        .output()
        .unwrap();
    assert!(
        list.status.success(),
        "GNU cpio cannot list the initramfs: {}",
        String::from_utf8_lossy(&list.stderr)
    );
    let listing = String::from_utf8_lossy(&list.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.ends_with(" init") || l.contains(" init -> ")),
        "no /init in:\n{listing}"
    );
    assert!(
        listing
            .lines()
            .any(|l| l.contains(" nix/store/") && l.contains("-glibc-")),
        "no glibc store path"
    );
    assert!(
        listing.lines().any(|l| l.contains("-hello-1.0/bin/hello")),
        "no hello program"
    );
    assert!(
        listing
            .lines()
            .all(|l| l.contains(" root     root ") || l.contains(" 0        0 ")),
        "entries not owned by 0:0"
    );

    // The manifest lists every file with its hash and owner.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let files = manifest["files"].as_array().unwrap();
    let hello = files
        .iter()
        .find(|f| f["path"].as_str().unwrap().ends_with("/bin/hello") && f["type"] == "file")
        .expect("hello in manifest");
    assert_eq!(hello["sha256"].as_str().unwrap().len(), 64);
    assert!(hello["store_path"].as_str().unwrap().contains("-hello-1.0"));

    // A second, real build (another output folder, so no fingerprint short cut; no pack
    // cache, so every piece is compressed again) gives the same bytes.
    let again = tempfile::tempdir().unwrap();
    let again_out = again.path().join(BOARD);
    let second = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["build", "--board", BOARD, "--out"])
        .arg(&again_out)
        .current_dir(root())
        .env("BONSAI_PACK_CACHE", "off")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success(), "the second build failed: {stdout}");
    assert!(
        stdout.starts_with("built qemu-x86_64:"),
        "not a real build: {stdout}"
    );
    for f in ["initramfs.cpio.gz", "kernel", "manifest.json"] {
        assert!(
            std::fs::read(out.join(f)).unwrap() == std::fs::read(again_out.join(f)).unwrap(),
            "two builds differ in {f}"
        );
    }
    assert_eq!(first, sha256(&again_out.join("initramfs.cpio.gz")));
}

#[test]
fn boot_check_passes() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    require("qemu-system-x86_64", "qemu-system-x86");
    built();
    let stdout = ok(&["boot", "--board", BOARD, "--check"]);
    assert!(stdout.contains("check passed"), "{stdout}");
    let log = std::fs::read_to_string(out_dir().join("serial.log")).unwrap();
    assert!(
        log.contains("BONSAI-READY "),
        "ready marker not in the serial log"
    );
    assert!(
        log.contains("Hello, world!"),
        "the C application's output is not in the serial log"
    );
}

/// Copies the built output to a scratch folder for corrupting.
fn scratch_copy() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for f in ["kernel", "initramfs.cpio.gz", "manifest.json", "build.json"] {
        std::fs::copy(out_dir().join(f), d.path().join(f)).unwrap();
    }
    d
}

#[test]
fn boot_check_fails_on_a_truncated_initramfs() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    built();
    let d = scratch_copy();
    let p = d.path().join("initramfs.cpio.gz");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
    let out = xtask(&[
        "boot",
        "--board",
        BOARD,
        "--check",
        "--timeout",
        "30",
        "--out",
        d.path().to_str().unwrap(),
    ]);
    assert!(
        !out.status.success(),
        "check passed on a truncated initramfs"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("boot check of qemu-x86_64 failed"), "{err}");
}

#[test]
fn boot_check_fails_when_the_ready_marker_never_comes() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    built();
    let d = scratch_copy();
    // An init that never says it is ready: a second archive appended to the first replaces /init.
    let mut tree = rootfs::Tree::new();
    tree.insert(
        "init",
        rootfs::Node::file(
            rootfs::Source::Bytes(b"#!/bin/sh\necho silent init\nexec sleep 3600\n".to_vec()),
            0o755,
        ),
    )
    .unwrap();
    let extra = d.path().join("extra.cpio.gz");
    rootfs::pack(
        &tree,
        &rootfs::PackOptions {
            compression: rootfs::Compression::Gzip,
            level: None,
            mtime: 0,
        },
        &extra,
    )
    .unwrap();
    let mut bytes = std::fs::read(d.path().join("initramfs.cpio.gz")).unwrap();
    bytes.extend(std::fs::read(&extra).unwrap());
    std::fs::write(d.path().join("initramfs.cpio.gz"), bytes).unwrap();
    let out = xtask(&[
        "boot",
        "--board",
        BOARD,
        "--check",
        "--timeout",
        "20",
        "--out",
        d.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success(), "check passed without a ready marker");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no ready marker within 20 s"), "{err}");
}

fn xtask_in(project: &Path, args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .current_dir(project)
        .env("BONSAI_ROOT", project)
        .output()
        .unwrap();
    common::echo(args, out)
}

/// A kernel warning while the checks run reaches the console and fails the boot, even
/// though every check passes: the guest writes a WARN's lines to /dev/kmsg at KERN_WARNING.
#[test]
fn boot_check_fails_on_a_kernel_warning() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    require("qemu-system-x86_64", "qemu-system-x86");
    let p = common::scratch_repo();
    std::fs::write(
        p.path().join("profiles/kernel-warning.toml"),
        r#"description = "test only: the kernel warns while the checks run"
inherit = ["minimal"]

[[check]]
name = "the kernel warns"
run = """for l in '------------[ cut here ]------------' 'WARNING: CPU: 0 PID: 1 at bonsai/test.c:1 test+0x0/0x1' '---[ end trace 0000000000000000 ]---'; do echo "<4>$l" >/dev/kmsg; done; echo warned"""
expect = "warned"
"#,
    )
    .unwrap();
    let out = p.path().join("out");
    let out_s = out.to_str().unwrap();
    let built = xtask_in(
        p.path(),
        &[
            "build",
            "--board",
            BOARD,
            "--profile",
            "kernel-warning",
            "--out",
            out_s,
        ],
    );
    assert!(built.status.success(), "the scratch build failed");
    let booted = xtask_in(
        p.path(),
        &["boot", "--board", BOARD, "--check", "--out", out_s],
    );
    let err = String::from_utf8_lossy(&booted.stderr);
    assert!(
        !booted.status.success(),
        "a kernel warning passed the check"
    );
    assert!(err.contains("boot check of qemu-x86_64 failed"), "{err}");
    assert!(
        err.contains("[ cut here ]") || err.contains("---[ end trace"),
        "{err}"
    );
    let log = std::fs::read_to_string(out.join("serial.log")).unwrap();
    assert!(
        log.contains("---[ end trace 0000000000000000 ]---"),
        "the warning's end marker is not on the console"
    );
}

#[test]
fn unknown_package_attribute_is_one_clear_line() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = common::scratch_repo();
    std::fs::write(
        scratch.path().join("profiles/minimal.toml"),
        "description = \"x\"\ninherit = [\"base\"]\npackages = [\"no-such-package\"]\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["build", "--board", BOARD])
        .env("BONSAI_ROOT", scratch.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap();
    assert_eq!(last, "error: realising packages: package attribute 'no-such-package' does not exist in the offline package set");
    assert!(
        !scratch.path().join("out").join(BOARD).exists(),
        "a failed build left an output folder"
    );
}

#[test]
fn every_init_backend_passes_the_conformance_suite() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    require("qemu-system-x86_64", "qemu-system-x86");
    let stdout = ok(&["conformance", "--board", BOARD]);
    let header = stdout
        .lines()
        .find(|l| l.starts_with("check "))
        .expect("matrix header");
    for init in ["busybox", "runit", "s6", "bonsai-init"] {
        assert!(header.contains(init), "{header}");
    }
    let rows = common::matrix_rows(&stdout);
    assert!(rows.len() >= 18, "too few rows:\n{stdout}");
    common::assert_every_row_passes(&rows, 4);
    // Services up and the kernel's `Run /init` line are on one clock (the kernel log's), so
    // every backend reports a real, positive time between them.
    let up = rows
        .iter()
        .find(|r| r.starts_with("/init to services up"))
        .expect("the /init to services up row");
    let times: Vec<f64> = up
        .split(" | ")
        .skip(1)
        .map(|c| c.trim().parse().expect("a time in ms"))
        .collect();
    assert_eq!(times.len(), 4, "{up}");
    assert!(times.iter().all(|t| *t > 0.0 && *t < 5000.0), "{up}");
}

#[test]
fn ssh_logs_in_with_every_backend() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    require("ssh", "openssh-client");
    for init in ["busybox", "runit", "s6", "bonsai-init"] {
        let out = ok(&[
            "boot",
            "--board",
            BOARD,
            "--profile",
            "ssh",
            "--init",
            init,
            "--ssh",
            "--ssh-command",
            "echo \"$(id -un)@$(hostname) $(cat /etc/bonsai/init-name)\"",
        ]);
        assert_eq!(
            out.trim(),
            format!("root@qemu-x86-64 {init}"),
            "ssh output with {init}"
        );
    }
}

#[test]
fn image_holds_only_stripped_needed_files() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    require("readelf", "binutils");
    built();
    let root = tempfile::tempdir().unwrap();
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gzip -dc '{}' | cpio -id --quiet",
            out_dir().join("initramfs.cpio.gz").display()
        ))
        .current_dir(root.path())
        .status()
        .unwrap();
    assert!(status.success());
    let mut elves = 0;
    let mut stack = vec![root.path().to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root.path()).unwrap().display().to_string();
            assert!(
                !rel.contains("/share/doc/")
                    && !rel.contains("/share/man/")
                    && !rel.contains("/include/")
                    && !rel.ends_with(".a"),
                "{rel} was not pruned"
            );
            if meta.is_dir() {
                stack.push(p);
            } else if meta.is_file() && std::fs::read(&p).unwrap().starts_with(b"\x7fELF") {
                elves += 1;
                let out = Command::new("readelf")
                    .args(["-S", "-W"])
                    .arg(&p)
                    .output()
                    .unwrap();
                assert!(
                    out.status.success() && out.stderr.is_empty(),
                    "readelf complains about {rel}"
                );
                let sections = String::from_utf8_lossy(&out.stdout);
                assert!(
                    !sections.contains(".symtab") && !sections.contains(".debug_"),
                    "{rel} is not stripped"
                );
            }
        }
    }
    assert!(elves >= 4, "only {elves} ELF files in the image");
    // The C program built with -g runs stripped in the guest (boot_check_passes) and is smaller.
    let text = ok(&["size", "--board", BOARD, "--json"]);
    common::assert_matches_schema("size", &text);
    let report: serde_json::Value = serde_json::from_str(&text).unwrap();
    let same = out_dir();
    let same = same.to_str().unwrap();
    common::assert_matches_schema("size", &ok(&["size", "--compare", same, same, "--json"]));
    let hello = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"].as_str().unwrap().ends_with("-hello-1.0"))
        .unwrap();
    assert!(
        hello["image_bytes"].as_u64().unwrap() < hello["kept_bytes"].as_u64().unwrap(),
        "hello was not stripped"
    );
    assert!(
        report["total"]["image_bytes"].as_u64().unwrap() * 2
            < report["total"]["closure_bytes"].as_u64().unwrap()
    );
    let why = ok(&["why", "--board", BOARD, hello["name"].as_str().unwrap()]);
    assert!(why.contains("root: package hello"), "{why}");
}

/// The bonsai-init in the image (read back with GNU cpio) is the binary cargo just built
/// from the current sources, static and small.
#[test]
fn bonsai_init_is_static_and_small() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    require("cpio", "cpio");
    require("readelf", "binutils");
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join(BOARD);
    let out_s = out.to_str().unwrap();
    ok(&[
        "build",
        "--board",
        BOARD,
        "--init",
        "bonsai-init",
        "--out",
        out_s,
    ]);
    let in_image = d.path().join("bonsai-init");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gzip -dc '{}' | cpio -i --quiet --to-stdout bin/bonsai-init >'{}'",
            out.join("initramfs.cpio.gz").display(),
            in_image.display()
        ))
        .status()
        .unwrap();
    assert!(status.success(), "GNU cpio cannot extract bin/bonsai-init");
    let image = std::fs::read(&in_image).unwrap();
    let built = root().join("target/x86_64-unknown-linux-musl/release-pid1/bonsai-init");
    assert!(
        image == std::fs::read(&built).unwrap(),
        "the image's bonsai-init is not the one just built from pid1/"
    );
    let size = image.len();
    assert!(size <= 1024 * 1024, "bonsai-init is {size} bytes");
    // Without readelf, or when it cannot read the file, there is nothing to judge: fail.
    require("readelf", "binutils");
    let file = Command::new("readelf")
        .args(["-l", "-d"])
        .arg(&in_image)
        .output()
        .unwrap();
    assert!(
        file.status.success(),
        "readelf failed on the image's bonsai-init"
    );
    let text = String::from_utf8_lossy(&file.stdout);
    assert!(text.contains("LOAD"), "no program headers:\n{text}");
    assert!(
        !text.contains("NEEDED") && !text.contains("INTERP"),
        "bonsai-init is dynamically linked:\n{text}"
    );
}

#[test]
fn release_sbom_validates_and_diff_sees_the_change() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    ok(&[
        "release",
        "--board",
        BOARD,
        "--version",
        "t1",
        "--out-dir",
        d,
    ]);
    ok(&[
        "release",
        "--board",
        BOARD,
        "--profile",
        "ssh",
        "--version",
        "t2",
        "--out-dir",
        d,
    ]);
    let a = dir.path().join(format!("{BOARD}-t1"));
    let b = dir.path().join(format!("{BOARD}-t2"));
    for rel in [&a, &b] {
        let names: Vec<String> = std::fs::read_dir(rel)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        for f in [
            "kernel",
            "initramfs.cpio.gz",
            "manifest.json",
            "sbom.cdx.json",
            "SHA256SUMS",
        ] {
            assert!(
                names.contains(&f.to_string()),
                "{f} missing from {}",
                rel.display()
            );
        }
        // SHA256SUMS checks out with coreutils.
        let st = Command::new("sha256sum")
            .args(["-c", "--quiet", "SHA256SUMS"])
            .current_dir(rel)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "SHA256SUMS does not match in {}",
            rel.display()
        );
        let sbom = rel.join("sbom.cdx.json");
        let v = Command::new("python3")
            .arg(root().join("schemas/validate.py"))
            .arg(&sbom)
            .output()
            .expect("python3");
        assert!(
            v.status.success(),
            "SBOM invalid: {}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
        let text = std::fs::read_to_string(&sbom).unwrap();
        assert!(
            !text.contains(root().to_str().unwrap()),
            "host path in the SBOM"
        );
        assert!(
            text.contains("libc6=2.36"),
            "Debian provenance missing from the SBOM"
        );
    }
    let text = ok(&["diff", a.to_str().unwrap(), b.to_str().unwrap(), "--json"]);
    common::assert_matches_schema("diff", &text);
    let diff: serde_json::Value = serde_json::from_str(&text).unwrap();
    let added: Vec<String> = diff["store_paths_added"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap().to_string())
        .collect();
    assert!(
        added.contains(&"dropbear".to_string()),
        "dropbear not among added store paths: {added:?}"
    );
    assert!(diff["added"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["path"].as_str().unwrap().ends_with("/bin/dropbear")));
}

#[test]
fn every_board_rebuilds_bit_for_bit() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let list: serde_json::Value = serde_json::from_str(&ok(&["list", "--json"])).unwrap();
    for b in list["boards"].as_array().unwrap() {
        let name = b["name"].as_str().unwrap();
        let out = ok(&["repro", "--board", name]);
        assert!(out.contains("different=0"), "{name}: {out}");
        if name == BOARD {
            // kernel, initramfs, manifest, SBOM, SHA256SUMS, and the disk: disk.img, disk.json
            assert!(out.contains("same=7 different=0"), "{name}: {out}");
        }
    }
    // bonsai-init is compiled by cargo in each checkout's own target folder: it must match too.
    let out = ok(&[
        "repro",
        "--board",
        BOARD,
        "--profile",
        "conformance",
        "--init",
        "bonsai-init",
    ]);
    assert!(out.contains("different=0"), "{out}");
}

#[test]
fn size_map_renders_in_chromium_and_boot_chart_is_drawn() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    require("chromium", "chromium");
    built();
    ok(&["size", "--board", BOARD, "--html"]);
    let text = ok(&["size", "--board", BOARD, "--files", "--json"]);
    common::assert_matches_schema("size", &text);
    let files: serde_json::Value = serde_json::from_str(&text).unwrap();
    let expected = files["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["image_bytes"].as_u64().unwrap() > 0)
        .count();
    let page = out_dir().join("size-map.html");
    let shot = tempfile::tempdir().unwrap();
    let png = shot.path().join("map.png");
    let profile = shot.path().join("profile");
    let common = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--enable-logging=stderr",
        "--v=0",
    ];
    let run = |extra: &[String]| {
        let out = Command::new("chromium")
            .args(common)
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(extra)
            .arg(format!("file://{}", page.display()))
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok_shot, _, err) = run(&[
        format!("--screenshot={}", png.display()),
        "--window-size=1200,900".into(),
    ]);
    assert!(
        ok_shot
            && std::fs::metadata(&png)
                .map(|m| m.len() > 1000)
                .unwrap_or(false),
        "no screenshot: {err}"
    );
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    let (ok_dom, dom, err) = run(&["--dump-dom".into()]);
    assert!(ok_dom, "{err}");
    assert_eq!(
        dom.matches("class=\"file\"").count(),
        expected,
        "boxes rendered vs files in the image"
    );
    assert!(
        !err.contains("Uncaught") && !err.contains(":ERROR:CONSOLE"),
        "console errors: {err}"
    );

    // The boot chart of a check boot.
    ok(&[
        "boot",
        "--board",
        BOARD,
        "--check",
        "--chart",
        "--init",
        "bonsai-init",
        "--profile",
        "conformance",
    ]);
    let svg = std::fs::read_to_string(out_dir().join("boot.svg")).unwrap();
    assert!(
        svg.starts_with("<svg")
            && svg.contains("kernel: unpack initramfs")
            && svg.contains("service ticker"),
        "{svg}"
    );
    let chart: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir().join("boot.json")).unwrap())
            .unwrap();
    assert!(chart["ready"].as_f64().unwrap() > chart["init_start"].as_f64().unwrap());
}

#[test]
fn new_board_from_the_default_builds_and_boots() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = common::scratch_repo();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
            .args(args)
            .env("BONSAI_ROOT", scratch.path())
            .output()
            .unwrap();
        eprintln!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    };
    let out = run(&["new-board", "bench-board", "--from", BOARD]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("cargo xtask boot --board bench-board --check"));
    let again = run(&["new-board", "bench-board", "--from", BOARD]);
    assert!(
        !again.status.success(),
        "new-board overwrote an existing board"
    );
    assert!(run(&["build", "--board", "bench-board"]).status.success());
    // Its one fragment is a byte-for-byte copy: the same kernel store path as the source board.
    built();
    let kernel_of = |dir: &std::path::Path| -> serde_json::Value {
        let info: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("build.json")).unwrap())
                .unwrap();
        info["nix"]["kernel"].clone()
    };
    assert_eq!(
        kernel_of(&scratch.path().join("out/bench-board")),
        kernel_of(&out_dir()),
        "the new board built a kernel of its own"
    );
    let boot = run(&["boot", "--board", "bench-board", "--check"]);
    assert!(
        boot.status.success() && String::from_utf8_lossy(&boot.stdout).contains("check passed")
    );
}

#[test]
fn every_init_backend_survives_abuse() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    require("qemu-system-x86_64", "qemu-system-x86");
    let stdout = ok(&["conformance", "--board", BOARD, "--profile", "abuse"]);
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" | ") && !l.starts_with("check "))
        .collect();
    for row in rows
        .iter()
        .filter(|r| !r.starts_with("ready at") && !r.starts_with("/init to"))
    {
        assert_eq!(
            row.matches("pass").count(),
            4,
            "not every backend survived: {row}"
        );
    }
    assert!(
        rows.iter().any(|r| r.starts_with("the OOM killer acted")),
        "{stdout}"
    );
}

#[test]
fn board_matrix_and_kernel_config_report() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let text = ok(&["test-boards", "--json"]);
    common::assert_matches_schema("test-boards", &text);
    let cells: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cells = cells.as_array().unwrap();
    let list: serde_json::Value = serde_json::from_str(&ok(&["list", "--json"])).unwrap();
    assert_eq!(
        cells.len(),
        list["boards"].as_array().unwrap().len() * 4,
        "one cell per board and init"
    );
    for c in cells {
        assert!(c["passed"].as_bool().unwrap(), "{c}");
        assert!(c["ready_s"].as_f64().unwrap() > 0.0);
    }
    let report = ok(&["kernel-config", "--board", BOARD]);
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("CONFIG_VIRTIO_NET") && l.trim_end().ends_with("ok")),
        "{report}"
    );
    let diff = ok(&["kernel-config", "--board", BOARD, "--diff", "qemu-aarch64"]);
    assert!(diff.contains("CONFIG_SERIAL_AMBA_PL011"), "{diff}");
}
