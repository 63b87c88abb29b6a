//! A team's own software through a profile's `[local-packages]` and `overlays`: a C program
//! compiled from a local source tree with the offline set's `stdenv.mkDerivation`, and a
//! prebuilt, dynamically linked binary (made here with the host's compiler, so linked against
//! the host's C library) turned into a store path against the set's glibc by
//! `autoPatchelfHook`. Both go into an image of qemu-x86_64 with a script an overlay adds, and
//! it is booted; the guest console must show that all three ran (the C program also as a
//! service). Then the one-line errors for bad entries, which need no Nix.
//!
//! Everything happens in a scratch copy of the repository's data folders (`BONSAI_ROOT`), with
//! its own `out/`. Needs Nix, QEMU and gcc (`cargo xtask test` installs them); fails, never
//! skips, when something is missing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::require;

const BOARD: &str = "qemu-x86_64";

struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = common::scratch_repo();
        Scratch { dir }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, rel: &str, text: &str) {
        let p = self.root().join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }

    fn run(&self, args: &[&str]) -> Output {
        common::xtask_in(self.root(), args)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "xtask {} failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The one-line error of a failed run (exit code 1), and that it wrote no output folder.
    fn error(&self, args: &[&str], out_dir: &Path) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(1),
            "xtask {} did not fail",
            args.join(" ")
        );
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(lines.len(), 1, "not one error line:\n{err}");
        assert!(
            !out_dir.exists(),
            "a failed build left {}",
            out_dir.display()
        );
        lines[0].to_string()
    }
}

/// A C program from a local source tree (two files), built by the offline set's
/// stdenv.mkDerivation with `cc`.
const GREETER_NIX: &str = r#"{ stdenv }:
stdenv.mkDerivation {
  pname = "greeter";
  version = "0.3";
  src = ./src;
  buildPhase = "cc -O2 -o greeter main.c";
  installPhase = "mkdir -p $out/bin && cp greeter $out/bin/";
}
"#;
const GREETER_H: &str = "#define GREETING \"greeter-ok from a local source tree\"\n";
const GREETER_C: &str = r#"#include <stdio.h>
#include "greeting.h"
int main(int argc, char **argv) { printf("%s%s%s\n", GREETING, argc > 1 ? " as " : "", argc > 1 ? argv[1] : ""); return 0; }
"#;

/// A binary built outside Nix (here by the test, against the host's C library), packaged with
/// autoPatchelfHook: the one place where patching is right.
const PREBUILT_NIX: &str = r#"{ stdenv, autoPatchelfHook }:
stdenv.mkDerivation {
  pname = "prebuilt-hi";
  version = "2.0";
  src = ./prebuilt-hi;
  nativeBuildInputs = [ autoPatchelfHook ];
  installPhase = "mkdir -p $out/bin && cp $src $out/bin/prebuilt-hi && chmod 755 $out/bin/prebuilt-hi";
}
"#;
const PREBUILT_C: &str = r#"#include <stdio.h>
#include <string.h>
int main(void) { char b[32]; strcpy(b, "prebuilt-ok"); puts(b); return 0; }
"#;

/// An overlay that adds a package (a script) with the set's own stdenv, through `final`.
const OVERLAY_NIX: &str = r#"final: prev: {
  overlay-hi = final.stdenv.mkDerivation {
    pname = "overlay-hi";
    version = "1.0";
    src = ./overlay-hi.sh;
    installPhase = "mkdir -p $out/bin && cp $src $out/bin/overlay-hi && chmod 755 $out/bin/overlay-hi";
  };
}
"#;

const PROFILE: &str = r#"description = "local packages: a C program from source and a prebuilt binary"
inherit = ["minimal"]
packages = ["greeter", "prebuilt-hi", "overlay-hi"]
overlays = ["pkgs/overlay/default.nix"]
console-expect = ["[greet] greeter-ok from a local source tree as service"]

[local-packages]
greeter = "pkgs/greeter/default.nix"
prebuilt-hi = "pkgs/prebuilt/default.nix"

[services.greet]
kind = "oneshot"
command = ["greeter", "service"]

[[check]]
name = "local C program runs"
run = "greeter"
expect = "greeter-ok from a local source tree"

[[check]]
name = "prebuilt binary runs"
run = "prebuilt-hi"
expect = "prebuilt-ok"

[[check]]
name = "a package from an overlay runs"
run = "overlay-hi"
expect = "overlay-ok"
"#;

fn make_packages(s: &Scratch) {
    s.write("pkgs/greeter/default.nix", GREETER_NIX);
    s.write("pkgs/greeter/src/greeting.h", GREETER_H);
    s.write("pkgs/greeter/src/main.c", GREETER_C);
    s.write("pkgs/overlay/default.nix", OVERLAY_NIX);
    s.write("pkgs/overlay/overlay-hi.sh", "#!/bin/sh\necho overlay-ok\n");
    s.write("pkgs/prebuilt/default.nix", PREBUILT_NIX);
    s.write("pkgs/prebuilt/prebuilt.c", PREBUILT_C);
    let bin = s.root().join("pkgs/prebuilt/prebuilt-hi");
    let status = Command::new("gcc")
        .arg("-O2")
        .arg("-o")
        .arg(&bin)
        .arg(s.root().join("pkgs/prebuilt/prebuilt.c"))
        .status()
        .expect("running gcc");
    assert!(status.success(), "gcc could not build the prebuilt binary");
    fs::remove_file(s.root().join("pkgs/prebuilt/prebuilt.c")).unwrap();
    s.write("profiles/local.toml", PROFILE);
}

/// The program's store path, from the build's manifest.
fn store_path_of(out: &Path, suffix: &str) -> PathBuf {
    let manifest: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let entries = manifest["files"]
        .as_array()
        .or_else(|| manifest["entries"].as_array())
        .expect("manifest lists files");
    let hit = entries
        .iter()
        .find(|f| f["path"].as_str().is_some_and(|p| p.ends_with(suffix)) && f["type"] == "file")
        .unwrap_or_else(|| panic!("no {suffix} in manifest.json"));
    PathBuf::from("/").join(hit["path"].as_str().unwrap().trim_start_matches('/'))
}

/// readelf's view of a file: interpreter and RUNPATH.
fn readelf(p: &Path) -> String {
    let out = Command::new("readelf")
        .arg("-l")
        .arg("-d")
        .arg(p)
        .output()
        .expect("running readelf");
    assert!(out.status.success(), "readelf {}", p.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn local_source_and_prebuilt_binary_run_at_boot() {
    require("nix-build", "nix-bin");
    require("qemu-system-x86_64", "qemu-system-x86");
    require("gcc", "gcc");
    require("readelf", "binutils");
    let s = Scratch::new();
    make_packages(&s);
    let out = s.root().join("out-local");
    let out_s = out.display().to_string();
    s.ok(&[
        "build",
        "--board",
        BOARD,
        "--profile",
        "local",
        "--out",
        &out_s,
    ]);

    // Both programs are store paths linked against the offline set's glibc.
    let greeter = store_path_of(&out, "/bin/greeter");
    let prebuilt = store_path_of(&out, "/bin/prebuilt-hi");
    assert!(
        greeter.display().to_string().contains("-greeter-0.3/"),
        "{}",
        greeter.display()
    );
    assert!(
        prebuilt.display().to_string().contains("-prebuilt-hi-2.0/"),
        "{}",
        prebuilt.display()
    );
    for p in [&greeter, &prebuilt] {
        let elf = readelf(p);
        assert!(
            elf.lines().any(
                |l| l.contains("[Requesting program interpreter: /nix/store/")
                    && l.contains("-glibc-")
            ),
            "{}: interpreter not the store glibc:\n{elf}",
            p.display()
        );
        assert!(
            elf.lines()
                .any(|l| l.contains("(RUNPATH)") && l.contains("-glibc-")),
            "{}: no RUNPATH into the store glibc:\n{elf}",
            p.display()
        );
    }

    // Boot: the checks pass only if both printed their line; the service's prefixed output
    // is a console expectation. Then the console log itself, judged here.
    s.ok(&["boot", "--board", BOARD, "--out", &out_s, "--check"]);
    let log = fs::read_to_string(out.join("serial.log")).expect("serial.log");
    let lines: Vec<&str> = log.lines().map(|l| l.trim_end_matches('\r')).collect();
    for want in [
        "greeter-ok from a local source tree",
        "prebuilt-ok",
        "overlay-ok",
        "[greet] greeter-ok from a local source tree as service",
    ] {
        assert!(
            lines.contains(&want),
            "the console never showed {want:?}:\n{log}"
        );
    }
}

#[test]
fn bad_local_packages_are_one_line_errors() {
    let s = Scratch::new();
    let out = s.root().join("out-bad");
    let out_s = out.display().to_string();
    let cases = [
        (
            "missing = \"pkgs/missing/default.nix\"",
            "error: profiles/bad.toml: key 'local-packages.missing': pkgs/missing/default.nix does not exist",
        ),
        (
            "up = \"../outside.nix\"",
            "error: profiles/bad.toml: key 'local-packages.up': '../outside.nix' is not a path inside the repository (give it relative to the repository root, without '..')",
        ),
        (
            "abs = \"/etc/hostname\"",
            "error: profiles/bad.toml: key 'local-packages.abs': '/etc/hostname' is not a path inside the repository (give it relative to the repository root, without '..')",
        ),
        (
            "dotted = \"examples/hello/default.nix\"\n\"a.b\" = \"examples/hello/default.nix\"",
            "error: profiles/bad.toml: key 'local-packages.a.b': 'a.b' is not a plain Nix attribute name",
        ),
        (
            "notnix = \"examples/hello/src/hello.c\"",
            "error: profiles/bad.toml: key 'local-packages.notnix': examples/hello/src/hello.c is not a .nix file",
        ),
    ];
    for (entry, want) in cases {
        s.write(
            "profiles/bad.toml",
            &format!("description = \"bad\"\ninherit = [\"minimal\"]\n[local-packages]\n{entry}\n"),
        );
        let err = s.error(
            &[
                "build",
                "--board",
                BOARD,
                "--profile",
                "bad",
                "--out",
                &out_s,
            ],
            &out,
        );
        assert_eq!(err, want);
    }
    // A link that leads out of the repository.
    let outside = tempfile::tempdir().unwrap();
    fs::write(outside.path().join("x.nix"), "{ stdenv }: null\n").unwrap();
    std::os::unix::fs::symlink(outside.path().join("x.nix"), s.root().join("linked.nix")).unwrap();
    s.write(
        "profiles/bad.toml",
        "description = \"bad\"\ninherit = [\"minimal\"]\n[local-packages]\nlinked = \"linked.nix\"\n",
    );
    let err = s.error(
        &[
            "build",
            "--board",
            BOARD,
            "--profile",
            "bad",
            "--out",
            &out_s,
        ],
        &out,
    );
    assert_eq!(
        err,
        "error: profiles/bad.toml: key 'local-packages.linked': linked.nix leads outside the repository"
    );
}

/// A name the package set already has is refused by the evaluation, naming profile and key.
#[test]
fn local_package_clashing_with_the_set_is_an_error() {
    require("nix-build", "nix-bin");
    let s = Scratch::new();
    let out = s.root().join("out-clash");
    let out_s = out.display().to_string();
    s.write(
        "profiles/clash.toml",
        "description = \"clash\"\ninherit = [\"minimal\"]\n[local-packages]\nzlib = \"examples/hello/default.nix\"\n",
    );
    let err = s.error(
        &[
            "build",
            "--board",
            BOARD,
            "--profile",
            "clash",
            "--out",
            &out_s,
        ],
        &out,
    );
    assert_eq!(
        err,
        "error: kernel config: profiles/clash.toml: key 'local-packages.zlib': 'zlib' is already an attribute of the offline package set; choose another name"
    );
}

/// An `overlays` entry that is not a `.nix` file inside the repository: refused before Nix runs.
#[test]
fn bad_overlays_are_one_line_errors() {
    let s = Scratch::new();
    let out = s.root().join("out-bad-overlay");
    let out_s = out.display().to_string();
    for (entry, want) in [
        ("overlays/none.nix", "overlays/none.nix does not exist"),
        ("/etc/hostname", "'/etc/hostname' is not a path inside the repository (give it relative to the repository root, without '..')"),
        ("examples/hello/src/hello.c", "examples/hello/src/hello.c is not a .nix file"),
    ] {
        s.write(
            "profiles/bad.toml",
            &format!("description = \"bad\"\ninherit = [\"minimal\"]\noverlays = [\"{entry}\"]\n"),
        );
        let err = s.error(
            &["build", "--board", BOARD, "--profile", "bad", "--out", &out_s],
            &out,
        );
        assert_eq!(err, format!("error: profiles/bad.toml: key 'overlays': {want}"));
    }
}
