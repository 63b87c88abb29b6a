//! The offline package set has Nixpkgs' shapes (the outputs and layouts of the Nixpkgs
//! expressions it stands for): outputs in Nixpkgs' order, `sbin/` kept, busybox dynamic
//! against the store glibc with its applets where busybox installs them, `pkgsStatic.busybox`
//! static, execline's wrapper, references between outputs that are store paths. Built with
//! Nix for x86_64 from the pinned Debian packages (seconds once cached); judged on the real
//! trees and ELF headers. Needs Nix (`cargo xtask test` installs it); fails, never skips.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The expression of the offline set for x86_64, with the cached Debian inputs.
fn offline_set() -> String {
    let inputs = xtask::offline::prepare(&repo(), xtask::config::Arch::X86_64)
        .expect("the offline set's inputs");
    format!(
        r#"import {}/nix/offline {{ system = "x86_64-linux"; hostSystem = "x86_64-linux"; debs = {}; bootstrap = {}; }}"#,
        repo().display(),
        inputs.debs.display(),
        inputs.bootstrap.display()
    )
}

fn nix(program: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(program);
    cmd.args(args);
    for (k, v) in xtask::host::nix_env() {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap_or_else(|_| {
        panic!("{program} is not installed: run `cargo xtask test` or apt-get install nix-bin")
    });
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `x.outputs` of an attribute, evaluated.
fn outputs(set: &str, attr: &str) -> Vec<String> {
    let json = nix(
        "nix-instantiate",
        &[
            "--eval",
            "--strict",
            "--json",
            "-E",
            &format!("({set}).{attr}.outputs"),
        ],
    );
    serde_json::from_str(&json).unwrap()
}

/// Builds an attribute the way xtask does (`nix-build -A`) and returns the one path printed.
fn build(set: &str, attr: &str) -> PathBuf {
    let out = nix(
        "nix-build",
        &["--no-out-link", "-E", &format!("({set}).{attr}")],
    );
    let paths: Vec<&str> = out.lines().filter(|l| l.starts_with('/')).collect();
    assert_eq!(paths.len(), 1, "nix-build -A {attr} printed {paths:?}");
    PathBuf::from(paths[0])
}

/// An output other than the first: `x.<output>`.
fn output(set: &str, attr: &str, out: &str) -> PathBuf {
    build(set, &format!("{attr}.{out}"))
}

fn link(p: &Path) -> String {
    fs::read_link(p)
        .unwrap_or_else(|_| panic!("{} is not a symlink", p.display()))
        .display()
        .to_string()
}

/// binutils' readelf, the oracle for ELF headers.
fn readelf(flag: &str, p: &Path) -> String {
    let out = Command::new("readelf")
        .arg(flag)
        .arg(p)
        .output()
        .expect("readelf is not installed: apt-get install binutils");
    assert!(out.status.success(), "readelf {flag} {}", p.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// PT_INTERP of an ELF file (None for a static one).
fn interpreter(p: &Path) -> Option<String> {
    readelf("-l", p).lines().find_map(|l| {
        l.split("[Requesting program interpreter: ")
            .nth(1)
            .map(|r| r.trim_end_matches(']').to_string())
    })
}

/// DT_NEEDED entries.
fn needed(p: &Path) -> Vec<String> {
    readelf("-d", p)
        .lines()
        .filter_map(|l| l.split("Shared library: [").nth(1))
        .map(|r| r.trim_end_matches(']').to_string())
        .collect()
}

#[test]
fn outputs_are_in_nixpkgs_order() {
    let set = offline_set();
    for (attr, want) in [
        ("glibc", &["out", "bin", "dev", "static", "getent"][..]),
        ("busybox", &["out"]),
        ("pkgsStatic.busybox", &["out"]),
        ("skalibs", &["lib", "dev", "doc", "out"]),
        ("execline", &["bin", "man", "lib", "dev", "doc", "out"]),
        ("s6", &["out", "man", "dev", "doc"]),
        ("runit", &["out", "man"]),
        ("zlib", &["out", "dev", "static"]),
        ("libxcrypt", &["out", "man"]),
        ("dropbear", &["out"]),
    ] {
        assert_eq!(outputs(&set, attr), want, "outputs of {attr}");
    }
}

#[test]
fn busybox_is_dynamic_with_applets_in_bin_and_sbin() {
    let set = offline_set();
    let bb = build(&set, "busybox");
    let glibc = build(&set, "glibc");
    let exe = bb.join("bin/busybox");
    assert_eq!(
        interpreter(&exe).as_deref(),
        Some(format!("{}/lib/ld-linux-x86-64.so.2", glibc.display()).as_str()),
        "busybox's interpreter is not the store glibc's"
    );
    assert!(
        needed(&exe).iter().any(|l| l == "libc.so.6"),
        "busybox needs no libc"
    );
    for a in [
        "ip",
        "sysctl",
        "init",
        "poweroff",
        "reboot",
        "halt",
        "ifconfig",
        "route",
        "udhcpc",
        "mdev",
        "modprobe",
        "switch_root",
        "klogd",
        "syslogd",
    ] {
        assert_eq!(link(&bb.join("sbin").join(a)), "../bin/busybox", "sbin/{a}");
        assert!(!bb.join("bin").join(a).exists(), "{a} is also in bin/");
    }
    for a in ["sh", "ls", "mkdir", "cat", "start-stop-daemon"] {
        let p = if bb.join("bin").join(a).exists() {
            bb.join("bin").join(a)
        } else {
            bb.join("sbin").join(a)
        };
        let want = if p.starts_with(bb.join("bin")) {
            "busybox"
        } else {
            "../bin/busybox"
        };
        assert_eq!(link(&p), want, "{}", p.display());
    }
    let st = build(&set, "pkgsStatic.busybox");
    assert_eq!(
        interpreter(&st.join("bin/busybox")),
        None,
        "pkgsStatic.busybox is not static"
    );
    assert_eq!(link(&st.join("sbin/ip")), "../bin/busybox");
}

#[test]
fn split_outputs_hold_nixpkgs_layout() {
    let set = offline_set();
    // skalibs: the library in `lib` (the first output), the dev link pointing into it.
    let sk = build(&set, "skalibs");
    assert!(
        sk.display().to_string().ends_with("-lib"),
        "{}",
        sk.display()
    );
    assert!(sk.join("lib/libskarnet.so.2.13").exists());
    let sk_dev = output(&set, "skalibs", "dev");
    assert!(link(&sk_dev.join("lib/libskarnet.so")).starts_with(&sk.display().to_string()));
    // execline: programs in `bin`, execlineb a wrapper around .execlineb-wrapped.
    let el = build(&set, "execline");
    assert!(
        el.display().to_string().ends_with("-bin"),
        "{}",
        el.display()
    );
    let wrapper = fs::read_to_string(el.join("bin/execlineb")).unwrap();
    assert!(wrapper.starts_with("#!/nix/store/"), "{wrapper}");
    assert!(
        wrapper.contains(&format!("{}/bin/.execlineb-wrapped", el.display())),
        "{wrapper}"
    );
    assert!(interpreter(&el.join("bin/.execlineb-wrapped")).is_some());
    for p in ["if", "foreground", "importas"] {
        assert!(el.join("bin").join(p).exists(), "execline bin/{p}");
    }
    let el_lib = output(&set, "execline", "lib");
    assert!(el_lib.join("lib/libexecline.so.2.9").exists());
    // s6 finds execline's library in its lib output, and keeps its helper in libexec.
    let s6 = build(&set, "s6");
    assert!(s6.join("bin/s6-svscan").exists() && s6.join("libexec/s6lockd-helper").exists());
    assert!(s6.join("lib/libs6.so.2.11").exists());
    // runit: every program in out/bin.
    let runit = build(&set, "runit");
    for p in [
        "runit",
        "runit-init",
        "runsv",
        "runsvdir",
        "sv",
        "svlogd",
        "chpst",
    ] {
        assert!(runit.join("bin").join(p).is_file(), "runit bin/{p}");
    }
    assert!(!runit.join("sbin").exists() && !runit.join("etc").exists());
    // dropbear: the server in sbin/.
    let db = build(&set, "dropbear");
    assert!(db.join("sbin/dropbear").is_file() && db.join("bin/dropbearkey").is_file());
    // glibc: lib64 -> lib.
    let glibc = build(&set, "glibc");
    assert_eq!(link(&glibc.join("lib64")), "lib");
}
