//! One test per row of docs/errors.md: every failure a user can meet, triggered through the
//! `xtask` binary against a scratch copy of the repository's data folders (`BONSAI_ROOT`),
//! checking the exact message, the non-zero exit code, that the error is one line on stderr
//! (plus one line per problem for selection and verification errors), and that no output
//! folder or temporary folder is left behind.
//!
//! The rows that realise packages need Nix and the offline package set's cache (a few
//! seconds each once the default board has been built; the kernel-config row builds one
//! extra kernel config, about 20 s the first time, cached afterwards). Packages that fail
//! to build, fail to evaluate or hard-code a store path come from a wrapper around the
//! scratch copy's offline package set (see `with_test_packages`).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BOARD: &str = "qemu-x86_64";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A scratch project: copies of boards/, profiles/, kernel-configs/ and nix/.
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

    /// A profile on top of `minimal` with `extra` TOML.
    fn profile(&self, name: &str, extra: &str) {
        self.write(
            &format!("profiles/{name}.toml"),
            &format!("description = \"{name}\"\ninherit = [\"minimal\"]\n{extra}"),
        );
    }

    /// A copy of the default board under `name`, changed by `edit` (on the parsed TOML, so
    /// the test does not depend on the board file's layout).
    fn board(&self, name: &str, edit: impl FnOnce(&mut toml::Table)) {
        let text = fs::read_to_string(self.root().join(format!("boards/{BOARD}.toml"))).unwrap();
        let mut table: toml::Table = toml::from_str(&text).unwrap();
        edit(&mut table);
        self.write(
            &format!("boards/{name}.toml"),
            &toml::to_string(&table).unwrap(),
        );
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
        cmd.args(args)
            .current_dir(self.root())
            .env("BONSAI_ROOT", self.root())
            .env("NO_COLOR", "1")
            .env_remove("BONSAI_OUT")
            .env_remove("BONSAI_NIXPKGS")
            .env_remove("BONSAI_TEST_PACK_DELAY_MS");
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        common::echo(args, self.command(args).output().expect("running xtask"))
    }

    fn out(&self, board: &str) -> PathBuf {
        self.root().join("out").join(board)
    }

    /// Nothing was written for `board`: no output folder, no stage folder.
    fn assert_nothing_written(&self, board: &str) {
        assert!(
            !self.out(board).exists(),
            "a failed build left {}",
            self.out(board).display()
        );
        self.assert_no_leftovers(board);
    }

    /// No `.<board>.tmp-*` or `.<board>.old-*` beside the output folder.
    fn assert_no_leftovers(&self, board: &str) {
        let Ok(entries) = fs::read_dir(self.root().join("out")) else {
            return;
        };
        for e in entries {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with(&format!(".{board}.tmp-"))
                    && !name.starts_with(&format!(".{board}.old-")),
                "left behind: out/{name}"
            );
        }
    }
}

/// The error a failed run printed: its `error:` line and the problem lines after it. Checks
/// the exit code, that there is exactly one `error:` line, and that only indented problem
/// lines follow it.
fn error_of(out: &Output, code: i32) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit status; stderr:\n{stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    let errors: Vec<usize> = (0..lines.len())
        .filter(|i| lines[*i].starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "want one error line:\n{stderr}");
    let rest = &lines[errors[0] + 1..];
    assert!(
        rest.iter().all(|l| l.starts_with("  ")),
        "only problem lines may follow the error:\n{stderr}"
    );
    lines[errors[0]..].join("\n")
}

/// `text` matches `pattern`, where `*` stands for any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if parts.len() == 1 {
        return text == pattern;
    }
    if !text.starts_with(first) || !text[first.len()..].ends_with(last) {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for p in &parts[1..parts.len() - 1] {
        match rest.find(p) {
            Some(i) => rest = &rest[i + p.len()..],
            None => return false,
        }
    }
    true
}

fn assert_glob(pattern: &str, text: &str) {
    assert!(glob(pattern, text), "\n  want: {pattern}\n   got: {text}");
}

/// Runs `args` in `s`, expects exit code 1 with exactly `want`, and nothing written.
fn fails_with(s: &Scratch, args: &[&str], want: &str) {
    let err = error_of(&s.run(args), 1);
    assert_glob(want, &err);
    s.assert_nothing_written(BOARD);
}

/// Replaces the scratch offline package set by a wrapper that adds packages for the error
/// rows: `dangler` (a script that hard-codes a store path Nix does not know), `broken` (its
/// build fails like a compile error) and `unevaluable` (its Nix file has a syntax error).
fn with_test_packages(s: &Scratch) {
    let offline = s.root().join("nix/offline");
    fs::rename(offline.join("default.nix"), offline.join("upstream.nix")).unwrap();
    s.write(
        "nix/offline/default.nix",
        r#"# xtask/tests/errors.rs: the offline package set plus packages that fail.
args:
let
  pkgs = import ./upstream.nix args;
  tools = pkgs.bonsai.tools;
  mk = name: script: derivation {
    inherit name;
    system = args.hostSystem;
    builder = "${tools}/bin/sh";
    PATH = "${tools}/bin";
    args = [ "-e" "-c" script ];
  };
in
pkgs // {
  dangler = mk "dangler-1.0" ''
    mkdir -p $out/bin
    printf '#!/bin/sh\nexec /nix/store/0c6kzph7l0dcbyhx8ph5hs5v6d5yvkhd-plugin-2.0/bin/plugin "$@"\n' >$out/bin/dangler
    chmod 555 $out/bin/dangler
  '';
  broken = mk "broken-1.0" ''
    echo "compiling broken.c"
    echo "broken.c:3:1: error: expected ';' before '}' token" >&2
    exit 1
  '';
  unevaluable = import ./unevaluable.nix;
}
"#,
    );
    s.write("nix/offline/unevaluable.nix", "{ x = ; }\n");
}

/// A folder of links to every program on the host except those `hide` rejects, for a PATH
/// on which some tool is missing.
fn path_without(dir: &Path, hide: impl Fn(&str) -> bool) -> String {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).unwrap();
    for d in [
        "/usr/local/bin",
        "/usr/bin",
        "/bin",
        "/usr/local/sbin",
        "/usr/sbin",
        "/sbin",
    ] {
        let Ok(entries) = fs::read_dir(d) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !hide(&name) && !bin.join(&name).exists() {
                let _ = std::os::unix::fs::symlink(e.path(), bin.join(&name));
            }
        }
    }
    bin.display().to_string()
}

// ------------------------------------------------------------------ boards and profiles

#[test]
fn unknown_board() {
    let s = Scratch::new();
    fails_with(
        &s,
        &["build", "--board", "nope"],
        "error: unknown board 'nope' (no boards/nope.toml); known boards: *qemu-x86_64*",
    );
}

#[test]
fn unknown_profile() {
    let s = Scratch::new();
    fails_with(
        &s,
        &["build", "--profile", "nope"],
        "error: unknown profile 'nope' (no profiles/nope.toml); known profiles: *minimal*",
    );
    s.write(
        "profiles/orphan.toml",
        "description = \"o\"\ninherit = [\"ghost\"]\n",
    );
    fails_with(
        &s,
        &["build", "--profile", "orphan"],
        "error: profiles/orphan.toml: key 'inherit': unknown profile 'ghost'; known profiles: *",
    );
}

#[test]
fn unknown_init() {
    let s = Scratch::new();
    s.profile("sysd", "init = \"systemd\"\n");
    fails_with(
        &s,
        &["build", "--profile", "sysd"],
        "error: profiles/sysd.toml: key 'init': unknown init 'systemd' (expected one of busybox, runit, s6, bonsai-init)",
    );
    // On the command line: a usage error, exit code 2, still one line.
    let err = error_of(&s.run(&["build", "--init", "systemd"]), 2);
    assert_eq!(
        err,
        "error: invalid value 'systemd' for '--init <INIT>' [possible values: busybox, runit, s6, bonsai-init]"
    );
}

#[test]
fn unknown_command_line_argument() {
    let s = Scratch::new();
    let err = error_of(&s.run(&["build", "--colour"]), 2);
    assert_glob("error: unexpected argument '--colour' found*", &err);
}

#[test]
fn malformed_toml() {
    let s = Scratch::new();
    s.write(
        "boards/bad.toml",
        "arch = \"x86_64\"\nnix-system\nconsole = \"ttyS0\"\n",
    );
    fails_with(
        &s,
        &["build", "--board", "bad"],
        "error: boards/bad.toml:2:11: key with no value, expected `=`",
    );
    s.write("profiles/bad.toml", "description = \"unterminated\n");
    fails_with(
        &s,
        &["build", "--profile", "bad"],
        "error: profiles/bad.toml:1:28: invalid basic string, expected `\"`",
    );
}

#[test]
fn unknown_key() {
    let s = Scratch::new();
    s.board("colour", |t| {
        t.insert("colour".into(), "red".into());
    });
    fails_with(
        &s,
        &["build", "--board", "colour"],
        "error: boards/colour.toml:*:1: unknown field `colour`, expected one of `description`, `arch`, *",
    );
    s.profile("typo", "pakages = [\"hello\"]\n");
    fails_with(
        &s,
        &["build", "--profile", "typo"],
        "error: profiles/typo.toml:3:1: unknown field `pakages`, expected one of *",
    );
}

#[test]
fn wrong_type() {
    let s = Scratch::new();
    s.board("typed", |t| {
        t["qemu"]
            .as_table_mut()
            .unwrap()
            .insert("smp".into(), "two".into());
    });
    fails_with(
        &s,
        &["build", "--board", "typed"],
        "error: boards/typed.toml:*:7: invalid type: string \"two\", expected u32",
    );
}

#[test]
fn inheritance_cycle_and_diamond() {
    let s = Scratch::new();
    s.write(
        "profiles/ca.toml",
        "description = \"a\"\ninherit = [\"cb\"]\npackages = [\"hello\"]\n",
    );
    s.write(
        "profiles/cb.toml",
        "description = \"b\"\ninherit = [\"ca\"]\n",
    );
    fails_with(
        &s,
        &["build", "--profile", "ca"],
        "error: profiles/cb.toml: key 'inherit': inheritance cycle ca -> cb -> ca",
    );
    s.write(
        "profiles/left.toml",
        "description = \"l\"\ninherit = [\"base\"]\n",
    );
    s.write(
        "profiles/right.toml",
        "description = \"r\"\ninherit = [\"base\"]\n",
    );
    s.write(
        "profiles/both.toml",
        "description = \"t\"\ninherit = [\"left\", \"right\"]\n",
    );
    fails_with(
        &s,
        &["build", "--profile", "both"],
        "error: profiles/both.toml: key 'inherit': profile 'base' is inherited twice (through 'left' and 'right'); diamonds are not allowed",
    );
}

// ------------------------------------------------------------------ Nix and host tools

#[test]
fn package_attribute_missing() {
    let s = Scratch::new();
    s.profile("nopkg", "packages = [\"no-such-package\"]\n");
    fails_with(
        &s,
        &["build", "--profile", "nopkg"],
        "error: realising packages: package attribute 'no-such-package' does not exist in the offline package set",
    );
}

#[test]
fn nix_evaluation_failure() {
    let s = Scratch::new();
    with_test_packages(&s);
    s.profile("uneval", "packages = [\"unevaluable\"]\n");
    fails_with(
        &s,
        &["build", "--profile", "uneval"],
        &format!(
            "error: realising packages: Nix evaluation failed: syntax error, unexpected ';' at {}/nix/offline/unevaluable.nix:1:7",
            s.root().display()
        ),
    );
}

#[test]
fn nix_build_failure() {
    let s = Scratch::new();
    with_test_packages(&s);
    s.profile("broken", "packages = [\"broken\"]\n");
    fails_with(
        &s,
        &["build", "--profile", "broken"],
        "error: realising packages: builder for broken-1.0 failed with exit code 1: broken.c:3:1: error: expected ';' before '}' token (full log: nix-store -l /nix/store/*-broken-1.0.drv)",
    );
}

#[test]
fn nix_missing_and_not_installable() {
    let s = Scratch::new();
    let tools = tempfile::tempdir().unwrap();
    let path = path_without(tools.path(), |name| name.starts_with("nix"));
    let out = s
        .command(&["build"])
        .env("PATH", &path)
        .env("BONSAI_NO_INSTALL", "1")
        .output()
        .unwrap();
    assert_eq!(
        error_of(&out, 1),
        "error: missing host packages: nix-bin; install them with: sudo apt-get install -y nix-bin"
    );
    s.assert_nothing_written(BOARD);
}

#[test]
fn qemu_missing_and_not_installable() {
    let s = Scratch::new();
    let built = s.run(&["build"]);
    assert!(built.status.success(), "the scratch build failed");
    let tools = tempfile::tempdir().unwrap();
    let path = path_without(tools.path(), |name| name.starts_with("qemu-system-"));
    let out = s
        .command(&["boot", "--check", "--timeout", "5"])
        .env("PATH", &path)
        .env("BONSAI_NO_INSTALL", "1")
        .output()
        .unwrap();
    assert_eq!(
        error_of(&out, 1),
        "error: missing host packages: qemu-system-x86; install them with: sudo apt-get install -y qemu-system-x86"
    );
}

#[test]
fn kernel_option_dropped() {
    let s = Scratch::new();
    s.write(
        "kernel-configs/usb-storage.config",
        "# USB mass storage, on a board without USB\nCONFIG_USB_STORAGE=y\n",
    );
    s.board("nousb", |t| {
        let kernel = t["kernel"].as_table_mut().unwrap();
        let mut fragments = kernel["fragments"].as_array().unwrap().clone();
        fragments.push("usb-storage.config".into());
        kernel.insert("fragments".into(), fragments.into());
    });
    let err = error_of(&s.run(&["build", "--board", "nousb"]), 1);
    assert_eq!(
        err,
        "error: kernel option CONFIG_USB_STORAGE=y from kernel-configs/usb-storage.config was dropped by olddefconfig (it became n); check its dependencies (Kconfig: depends on SCSI)"
    );
    s.assert_nothing_written("nousb");
}

// ------------------------------------------------------------------ selection and verification

#[test]
fn unresolved_library() {
    let s = Scratch::new();
    s.profile("noglibc", "[image]\ndrop = [\"*-glibc-*\"]\n");
    let err = error_of(&s.run(&["build", "--profile", "noglibc"]), 1);
    let lines: Vec<&str> = err.lines().collect();
    // hello and Nixpkgs-shaped (dynamic) busybox both need the dropped glibc.
    assert_eq!(
        lines[0],
        "error: select found 7 problems in profile noglibc:"
    );
    let want = [
        "  /nix/store/*-hello-1.0/bin/hello: library libc.so.6 not found in RUNPATH /nix/store/*-glibc-*/lib (only in dropped /nix/store/*-glibc-*)",
        "  /nix/store/*-hello-1.0/bin/hello: RUNPATH/RPATH entry in /nix/store/*-glibc-*, which is dropped (rewrite = true in its drop rule rewrites the reference)",
        "  /nix/store/*-hello-1.0/bin/hello: interpreter is in /nix/store/*-glibc-*, which is dropped",
        "  /nix/store/*-busybox-*/bin/busybox: library libc.so.6 not found in RUNPATH /nix/store/*-glibc-*/lib (only in dropped /nix/store/*-glibc-*)",
        "  /nix/store/*-busybox-*/bin/busybox: library libresolv.so.2 not found in RUNPATH /nix/store/*-glibc-*/lib (only in dropped /nix/store/*-glibc-*)",
        "  /nix/store/*-busybox-*/bin/busybox: RUNPATH/RPATH entry in /nix/store/*-glibc-*, which is dropped (rewrite = true in its drop rule rewrites the reference)",
        "  /nix/store/*-busybox-*/bin/busybox: interpreter is in /nix/store/*-glibc-*, which is dropped",
    ];
    for (want, got) in want.iter().zip(&lines[1..]) {
        assert_glob(want, got);
    }
    assert_eq!(lines.len(), 8);
    s.assert_nothing_written(BOARD);
}

#[test]
fn dangling_store_reference() {
    let s = Scratch::new();
    with_test_packages(&s);
    s.profile("dangling", "packages = [\"dangler\"]\n");
    fails_with(
        &s,
        &["build", "--profile", "dangling"],
        "error: verify found 1 problem in profile dangling:\n  /nix/store/*-dangler-1.0/bin/dangler: refers to /nix/store/0c6kzph7l0dcbyhx8ph5hs5v6d5yvkhd-plugin-2.0, which is not in the image",
    );
}

#[test]
fn missing_store_path_named_in_a_profile() {
    let s = Scratch::new();
    s.profile(
        "plugin",
        "[[setup.files]]\npath = \"/etc/app.conf\"\ncontent = \"plugin = /nix/store/0c6kzph7l0dcbyhx8ph5hs5v6d5yvkhd-plugin/lib/p.so\\n\"\n",
    );
    fails_with(
        &s,
        &["build", "--profile", "plugin"],
        "error: select found 1 problem in profile plugin:\n  /nix/store/0c6kzph7l0dcbyhx8ph5hs5v6d5yvkhd-plugin/lib/p.so: does not exist (referenced by /etc/bonsai/setup-files/0)",
    );
}

#[test]
fn size_budget_exceeded() {
    let s = Scratch::new();
    s.board("tight-kernel", |t| {
        t["budget"]
            .as_table_mut()
            .unwrap()
            .insert("kernel".into(), "1 MiB".into());
    });
    let err = error_of(&s.run(&["build", "--board", "tight-kernel"]), 1);
    assert_glob(
        "error: boards/tight-kernel.toml: budget.kernel: kernel is * MiB (* B), over the budget of 1.00 MiB (1048576 B)",
        &err,
    );
    s.assert_nothing_written("tight-kernel");

    s.board("tight-initramfs", |t| {
        t["budget"]
            .as_table_mut()
            .unwrap()
            .insert("initramfs".into(), "512 KiB".into());
    });
    let err = error_of(&s.run(&["build", "--board", "tight-initramfs"]), 1);
    assert_glob(
        "error: boards/tight-initramfs.toml: budget.initramfs: initramfs is * MiB, over the budget of 512.0 KiB; largest: /nix/store/*-glibc-* * MiB, /nix/store/*",
        &err,
    );
    s.assert_nothing_written("tight-initramfs");
}

#[test]
fn output_folder_unwritable() {
    let s = Scratch::new();
    let file = s.root().join("a-file");
    fs::write(&file, "").unwrap();
    let out = file.join("out");
    let err = error_of(&s.run(&["build", "--out", out.to_str().unwrap()]), 1);
    assert_eq!(
        err,
        format!(
            "error: cannot write the output folder {}: {} is a file, not a folder",
            out.display(),
            file.display()
        )
    );
    // The output folder itself a file.
    let err = error_of(&s.run(&["build", "--out", file.to_str().unwrap()]), 1);
    assert_eq!(
        err,
        format!(
            "error: cannot write the output folder {}: it is a file, not a folder",
            file.display()
        )
    );
    assert_eq!(fs::read(&file).unwrap(), b"");
}

#[test]
fn output_folder_not_writable() {
    let s = Scratch::new();
    let ro = s.root().join("read-only");
    fs::create_dir(&ro).unwrap();
    let out = ro.join("out");
    // Root may write anywhere: drop to nobody for this run (a read-only folder is enough
    // for anyone else).
    let root_user = fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    let mut cmd = if root_user {
        for p in [s.root(), ro.as_path()] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let mut cmd = Command::new("setpriv");
        cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_xtask"))
            .current_dir("/")
            .env("BONSAI_ROOT", s.root())
            .env("HOME", "/nonexistent");
        cmd
    } else {
        fs::set_permissions(&ro, fs::Permissions::from_mode(0o555)).unwrap();
        s.command(&[])
    };
    let output = cmd
        .args(["build", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        error_of(&output, 1),
        format!(
            "error: cannot write the output folder {}: creating {}/.out.lock: Permission denied",
            out.display(),
            ro.display()
        )
    );
    assert_eq!(fs::read_dir(&ro).unwrap().count(), 0);
}

// ------------------------------------------------------------------ services and users

#[test]
fn unknown_service_in_a_dependency() {
    let s = Scratch::new();
    s.profile(
        "svc",
        "[services.web]\ncommand = [\"/bin/sh\", \"-c\", \"true\"]\nafter = [\"db\"]\n",
    );
    fails_with(
        &s,
        &["build", "--profile", "svc"],
        "error: profiles/svc.toml: services.web.after: unknown service 'db'",
    );
}

#[test]
fn dependency_cycle() {
    let s = Scratch::new();
    s.profile(
        "cycle",
        "[services.a]\ncommand = [\"/bin/sh\"]\nafter = [\"b\"]\n[services.b]\ncommand = [\"/bin/sh\"]\nafter = [\"a\"]\n",
    );
    fails_with(
        &s,
        &["build", "--profile", "cycle"],
        "error: profiles/cycle.toml: services.a.after: dependency cycle a -> b -> a",
    );
}

#[test]
fn service_program_not_in_the_image() {
    let s = Scratch::new();
    s.profile(
        "nginx",
        "[services.web]\ncommand = [\"/bin/nginx\", \"-g\", \"daemon off;\"]\n",
    );
    fails_with(
        &s,
        &["build", "--profile", "nginx"],
        "error: profiles/nginx.toml: services.web.command: program '/bin/nginx' is not in the image",
    );
}

#[test]
fn health_check_out_of_place() {
    let s = Scratch::new();
    s.profile("probe", "[health.checks.net]\ncommand = [\"/bin/probe\"]\n");
    fails_with(
        &s,
        &["build", "--profile", "probe"],
        "error: profiles/probe.toml: health.checks.net.command: program '/bin/probe' is not in the image",
    );
    s.profile(
        "late",
        "[health]\ntrial-deadline-ms = 12000\n[health.checks.net]\ncommand = [\"/bin/sh\", \"-c\", \"true\"]\ndeadline-ms = 15000\n",
    );
    fails_with(
        &s,
        &["build", "--profile", "late"],
        "error: profiles/late.toml: health.checks.net.deadline-ms: 15000 must be above 0 and below the trial deadline (12000 ms)",
    );
}

#[test]
fn unknown_update_test_scenario() {
    let s = Scratch::new();
    fails_with(
        &s,
        &["update-test", "--only", "install-twice"],
        "error: --only: unknown scenario 'install-twice' (one of: install, refuse-wrong-signature, refuse-other-board, refuse-older-version, refuse-corrupt-chunk, refuse-truncated-bundle, resume-over-http, rollback, or a prefix such as power-cut or refuse)",
    );
}

#[test]
fn bundle_key_unusable() {
    let s = Scratch::new();
    s.write("keys/ci.pub", "untrusted comment: minisign public key 0\nRWQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n");
    fails_with(
        &s,
        &["bundle", "--version", "1", "--key", "keys/ci.pub"],
        "error: keys/ci.pub: secret key: not a minisign Ed25519 secret key",
    );
    fails_with(
        &s,
        &["bundle", "--version", "1", "--key", "keys/absent.key"],
        "error: keys/absent.key: No such file or directory",
    );
}

#[test]
fn unknown_ab_test_scenario() {
    let s = Scratch::new();
    fails_with(
        &s,
        &["ab-test", "--only", "b-explodes"],
        "error: --only: unknown scenario 'b-explodes' (one of: fresh-a-blessed, update-b-blessed, b-init-panics-rolls-back, b-health-fails-rolls-back, b-hangs-rolls-back, all-slots-bad-stays-up)",
    );
}

#[test]
fn unknown_user() {
    let s = Scratch::new();
    s.profile(
        "www",
        "[services.web]\ncommand = [\"/bin/sh\"]\nuser = \"www\"\n",
    );
    fails_with(
        &s,
        &["build", "--profile", "www"],
        "error: profiles/www.toml: services.web.user: unknown user 'www' (define [users.www])",
    );
}

#[test]
fn unknown_group() {
    let s = Scratch::new();
    // A user's primary group is the group of its name unless `group` names another.
    s.profile("nogroup", "[users.app]\nuid = 1000\n");
    fails_with(
        &s,
        &["build", "--profile", "nogroup"],
        "error: profiles/nogroup.toml: users.app.group: unknown group 'app' (define [groups.app])",
    );
    s.profile(
        "svcgroup",
        "[services.web]\ncommand = [\"/bin/sh\"]\ngroup = \"www\"\n",
    );
    fails_with(
        &s,
        &["build", "--profile", "svcgroup"],
        "error: profiles/svcgroup.toml: services.web.group: unknown group 'www' (define [groups.www])",
    );
}

// ------------------------------------------------------------------ concurrency and interrupts

/// Starts a build that pauses after packing (`BONSAI_TEST_PACK_DELAY_MS`) with a new
/// SOURCE_DATE_EPOCH, so it is not up to date.
fn slow_build(s: &Scratch, epoch: &str) -> Child {
    s.command(&["build"])
        .env("BONSAI_TEST_PACK_DELAY_MS", "60000")
        .env("SOURCE_DATE_EPOCH", epoch)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `what` holds, up to two minutes (the first build of a scratch copy
/// evaluates everything).
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The stage folder of a running build, once the initramfs is packed into it.
fn packed_stage(s: &Scratch) -> Option<PathBuf> {
    fs::read_dir(s.root().join("out"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&format!(".{BOARD}.tmp-"))
                && p.join("initramfs.cpio.gz").exists()
        })
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

fn digest(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn two_builds_of_the_same_board_at_once() {
    let s = Scratch::new();
    let mut first = slow_build(&s, "1000");
    let lock = s.root().join(format!("out/.{BOARD}.lock"));
    let pid = first.id().to_string();
    wait_for("the first build to take the lock", || {
        fs::read_to_string(&lock).is_ok_and(|t| t.trim() == pid)
    });
    let start = Instant::now();
    let err = error_of(&s.run(&["build"]), 1);
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "the second build waited {:?}",
        start.elapsed()
    );
    assert_eq!(
        err,
        format!(
            "error: another build of {BOARD} is running (lock out/.{BOARD}.lock held by pid {pid})"
        )
    );
    signal(&first, "INT");
    first.wait().unwrap();
    s.assert_no_leftovers(BOARD);
}

#[test]
fn interrupted_build_leaves_the_previous_output_and_no_temporary_files() {
    let s = Scratch::new();
    let built = s.run(&["build"]);
    assert!(built.status.success(), "the first scratch build failed");
    let before = digest(&s.out(BOARD));

    // SIGINT while packing: the handler removes the stage folder.
    let first = slow_build(&s, "2000");
    wait_for("the build to pack", || packed_stage(&s).is_some());
    signal(&first, "INT");
    let out = first.wait_with_output().unwrap();
    assert_eq!(
        error_of(&out, 130),
        "error: interrupted (SIGINT); the unfinished output was removed, the previous one is unchanged"
    );
    assert_eq!(digest(&s.out(BOARD)), before, "the previous output changed");
    s.assert_no_leftovers(BOARD);

    // SIGKILL runs no handler: the stage stays, and the next build removes it.
    let mut second = slow_build(&s, "3000");
    wait_for("the build to pack", || packed_stage(&s).is_some());
    let stage = packed_stage(&s).unwrap();
    signal(&second, "KILL");
    second.wait().unwrap();
    assert!(stage.exists());
    assert_eq!(digest(&s.out(BOARD)), before, "the previous output changed");
    let again = s.run(&["build"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("left by an interrupted build"));
    assert!(!stage.exists(), "{} was not cleaned up", stage.display());
    s.assert_no_leftovers(BOARD);
}

/// SIGINT while Nix runs (long before anything is written): the same message and exit code
/// as an interrupt while packing, and nothing written.
#[test]
fn interrupted_during_nix_exits_130_with_the_message() {
    use std::io::BufRead;
    let s = Scratch::new();
    let mut child = s
        .command(&["build"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "the build ended before realising anything:\n{seen}"
        );
        seen.push_str(&line);
        if line.starts_with("==> realise") {
            break;
        }
    }
    signal(&child, "INT");
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    seen.push_str(&rest);
    let status = child.wait().unwrap();
    let out = Output {
        status,
        stdout: Vec::new(),
        stderr: seen.clone().into_bytes(),
    };
    assert_eq!(
        error_of(&out, 130),
        "error: interrupted (SIGINT); the unfinished output was removed, the previous one is unchanged"
    );
    assert!(
        !seen.contains("==> pack"),
        "the interrupt came only after packing:\n{seen}"
    );
    s.assert_nothing_written(BOARD);
}

/// Every output file that build.json lists has the recorded hash, and the build is the one
/// with this SOURCE_DATE_EPOCH.
fn assert_complete(out: &Path, epoch: u64) {
    use sha2::Digest;
    let info: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join("build.json")).unwrap()).unwrap();
    assert_eq!(info["source_date_epoch"], epoch, "{}", out.display());
    let outputs = info["outputs"].as_object().unwrap();
    assert!(outputs.contains_key("kernel") && outputs.contains_key("initramfs.cpio.gz"));
    for (file, sum) in outputs {
        let bytes = fs::read(out.join(file)).unwrap();
        let hex: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(Some(hex.as_str()), sum.as_str(), "{file} is damaged");
    }
}

/// A build killed with SIGKILL between the steps of the output swap
/// (`BONSAI_TEST_KILL_IN_SWAP`): with RENAME_EXCHANGE the new output is complete in place at
/// once; with the two-rename fallback the next build puts the previous one back. The next
/// build removes what the killed one left.
#[test]
fn killed_during_the_swap_leaves_a_complete_output() {
    use std::os::unix::process::ExitStatusExt;
    let s = Scratch::new();
    let build = |epoch: &str, exchange: bool| {
        let mut cmd = s.command(&["build"]);
        cmd.env("SOURCE_DATE_EPOCH", epoch)
            .env("BONSAI_TEST_KILL_IN_SWAP", "1");
        if !exchange {
            cmd.env("BONSAI_TEST_NO_RENAME_EXCHANGE", "1");
        }
        cmd.output().unwrap()
    };
    let first = s
        .command(&["build"])
        .env("SOURCE_DATE_EPOCH", "4000")
        .output()
        .unwrap();
    assert!(first.status.success(), "the first scratch build failed");
    assert_complete(&s.out(BOARD), 4000);

    // RENAME_EXCHANGE: the new output is in place the moment the swap's one step is done.
    let killed = build("5000", true);
    assert_eq!(killed.status.signal(), Some(9), "not killed in the swap");
    assert_complete(&s.out(BOARD), 5000);

    // Two renames: killed between them, the previous output is aside until the next build.
    let killed = build("6000", false);
    assert_eq!(killed.status.signal(), Some(9), "not killed in the swap");
    let again = s
        .command(&["build"])
        .env("SOURCE_DATE_EPOCH", "5000")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(again.status.success(), "{stderr}");
    assert!(
        stderr.contains("(a build was interrupted while swapping it)"),
        "{stderr}"
    );
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("is up to date"),
        "the restored output is not the previous build"
    );
    assert_complete(&s.out(BOARD), 5000);
    s.assert_no_leftovers(BOARD);
}

#[test]
fn damaged_pack_cache_entries_are_rebuilt_never_used() {
    let s = Scratch::new();
    let cache = s.root().join("pack-cache");
    let build = |out: &str| {
        let o = s
            .command(&["build", "--out", out])
            .env("BONSAI_PACK_CACHE", &cache)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "build --out {out} failed: {stderr}");
        let image = fs::read(s.root().join(out).join("initramfs.cpio.gz")).unwrap();
        (stderr, image)
    };
    let reused = |stderr: &str| -> (u64, u64) {
        let line = stderr
            .lines()
            .find_map(|l| l.trim().strip_prefix("pack cache: "))
            .unwrap_or_else(|| panic!("no pack cache line in {stderr}"));
        let words: Vec<&str> = line.split_whitespace().collect();
        (words[0].parse().unwrap(), words[2].parse().unwrap())
    };
    let (cold, first) = build("first");
    let (hits, pieces) = reused(&cold);
    assert_eq!(hits, 0, "{cold}");
    assert!(pieces >= 3, "{cold}");

    // Damage every entry: one byte of its payload. Entries live in subfolders; the file
    // beside them remembers bonsai's executable hash.
    let mut damaged = Vec::new();
    for sub in fs::read_dir(&cache).unwrap() {
        let sub = sub.unwrap().path();
        if !sub.is_dir() {
            assert_eq!(sub.file_name().unwrap(), "exe-sha256");
            continue;
        }
        for e in fs::read_dir(sub).unwrap() {
            let p = e.unwrap().path();
            let mut bytes = fs::read(&p).unwrap();
            let at = bytes.len() - 6;
            bytes[at] ^= 0xff;
            fs::write(&p, bytes).unwrap();
            damaged.push(p);
        }
    }
    assert_eq!(damaged.len() as u64, pieces);
    let (repair, second) = build("second");
    assert_eq!(reused(&repair), (0, pieces), "{repair}");
    let warnings: Vec<&str> = repair
        .lines()
        .filter(|l| l.starts_with("warning: pack cache entry "))
        .collect();
    assert_eq!(warnings.len(), 3, "{repair}");
    assert_glob(
        &format!(
            "warning: pack cache entry {}/*/* was damaged (checksum mismatch): deleted and compressed again",
            cache.display()
        ),
        warnings[0],
    );
    assert!(repair.contains(&format!(
        "warning: ... and {} more damaged pack cache entries",
        pieces - 3
    )));
    assert!(second == first, "the damaged cache changed the image");

    let (warm, third) = build("third");
    assert_eq!(reused(&warm), (pieces, pieces), "{warm}");
    assert!(!warm.contains("warning:"), "{warm}");
    assert!(third == first);
}

#[test]
fn pack_cache_not_writable() {
    let s = Scratch::new();
    // A pack cache on a tmpfs with room for its bookkeeping (the executable's remembered
    // hash) but not for the compressed pieces.
    let cache = s.root().join("full-cache");
    let tmpfs = Tmpfs::mount(&cache, 16 << 10);
    let o = s
        .command(&["build"])
        .env("BONSAI_PACK_CACHE", &cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "the build failed: {stderr}");
    let warning = stderr
        .lines()
        .find(|l| l.starts_with("warning: pack cache: "))
        .unwrap_or_else(|| panic!("no pack cache warning in {stderr}"));
    assert_glob(
        &format!(
            "warning: pack cache: * pieces not stored (first: writing {}/*: *); the image is complete, the next build packs them again",
            cache.display()
        ),
        warning,
    );
    assert!(
        warning.to_lowercase().contains("no space left on device"),
        "{warning}"
    );
    let stored: u64 = warning["warning: pack cache: ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(stored >= 1, "{warning}");
    // Complete: the same bytes as a build without the cache.
    let image = fs::read(s.out(BOARD).join("initramfs.cpio.gz")).unwrap();
    let off = s
        .command(&["build", "--out", "nocache"])
        .env("BONSAI_PACK_CACHE", "off")
        .output()
        .unwrap();
    assert!(off.status.success());
    assert!(
        image == fs::read(s.root().join("nocache/initramfs.cpio.gz")).unwrap(),
        "the image packed beside a full cache differs from one packed without a cache"
    );
    drop(tmpfs);
}

// ------------------------------------------------------------------ image hygiene

/// A private key in OpenSSH's PEM form (its base64 is not a usable key).
const FAKE_KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\nQyNTUxOQAAACBnZXN0LWtleS1ub3QtcmVhbC0wMDAwMDAwMDAwMAAAAJg=\n-----END OPENSSH PRIVATE KEY-----\n";

fn manifest_json(s: &Scratch) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(s.out(BOARD).join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn empty_password_outside_a_development_image() {
    let s = Scratch::new();
    s.profile("nopw", "[users.root]\npassword = \"empty\"\n");
    fails_with(
        &s,
        &["build", "--profile", "nopw"],
        "error: profiles/nopw.toml: users.root.password: an empty password needs 'development = true' (this is not a development image)",
    );
    // An /etc/shadow written at boot by [[setup.files]] is checked too.
    s.profile(
        "shadow",
        "[[setup.files]]\npath = \"/etc/shadow\"\ncontent = \"root:*:1::::::\\nguest::1::::::\\n\"\nmode = \"0600\"\n",
    );
    fails_with(
        &s,
        &["build", "--profile", "shadow"],
        "error: profiles/shadow.toml: setup.files[0]: /etc/shadow gives 'guest' an empty password, which needs 'development = true' (this is not a development image)",
    );
    s.profile("badpw", "[users.root]\npassword = \"hunter2\"\n");
    fails_with(
        &s,
        &["build", "--profile", "badpw"],
        "error: profiles/badpw.toml: users.root.password: 'hunter2' is not \"locked\", \"empty\" or a crypt(3) hash starting with '$'",
    );
    // A development image may; it says so, and so does its manifest.
    s.write(
        "profiles/dev.toml",
        "description = \"dev\"\ninherit = [\"nopw\"]\ndevelopment = true\n",
    );
    let out = s.run(&["build", "--profile", "dev"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: profile dev is a development image (development = true): accounts may log in without a password; do not ship it"),
        "{stderr}"
    );
    assert_eq!(manifest_json(&s)["development"], serde_json::json!(true));
    // Other images do not carry the field.
    assert!(s.run(&["build"]).status.success());
    assert!(manifest_json(&s).get("development").is_none());
}

#[test]
fn private_key_in_the_image() {
    let s = Scratch::new();
    s.profile(
        "leaky",
        &format!(
            "[[setup.files]]\npath = \"/etc/app/key.pem\"\ncontent = \"\"\"\n{FAKE_KEY}\"\"\"\nmode = \"0600\"\n"
        ),
    );
    fails_with(
        &s,
        &["build", "--profile", "leaky"],
        "error: the image holds a private key at /etc/app/key.pem (from setup.files[0] of profiles/leaky.toml): generate keys at first boot or supply them with [[secrets]]",
    );
    // A test fixture may be allowed by path.
    s.write(
        "profiles/fixture.toml",
        "description = \"fixture\"\ninherit = [\"leaky\"]\n[image]\nallow-private-keys = [\"/etc/app/*.pem\"]\n",
    );
    assert!(s.run(&["build", "--profile", "fixture"]).status.success());
}

#[test]
fn secret_source_missing_or_inside_the_repository() {
    let s = Scratch::new();
    let host = tempfile::tempdir().unwrap();
    let missing = host.path().join("nope");
    s.profile(
        "gone",
        &format!(
            "[[secrets]]\npath = \"/etc/dropbear/dropbear_ed25519_host_key\"\nsource = \"{}\"\n",
            missing.display()
        ),
    );
    fails_with(
        &s,
        &["build", "--profile", "gone"],
        &format!(
            "error: profiles/gone.toml: secrets[0].source: cannot read {}: No such file or directory",
            missing.display()
        ),
    );
    let inside = s.root().join("keys/host_key");
    s.write("keys/host_key", FAKE_KEY);
    s.profile(
        "committed",
        &format!(
            "[[secrets]]\npath = \"/etc/key\"\nsource = \"{}\"\n",
            inside.display()
        ),
    );
    fails_with(
        &s,
        &["build", "--profile", "committed"],
        &format!(
            "error: profiles/committed.toml: secrets[0].source: {} is inside the repository; keep secrets outside it so they are never committed",
            inside.display()
        ),
    );
    let key = host.path().join("host_key");
    fs::write(&key, FAKE_KEY).unwrap();
    s.profile(
        "relative",
        &format!(
            "[[secrets]]\npath = \"etc/key\"\nsource = \"{}\"\n",
            key.display()
        ),
    );
    fails_with(
        &s,
        &["build", "--profile", "relative"],
        "error: profiles/relative.toml: secrets[0].path: 'etc/key' is not an absolute path in the image (like /etc/dropbear/dropbear_ed25519_host_key)",
    );

    // A secret from outside: in the image, named in the warning and the manifest, never
    // its host path; the private-key scan accepts it.
    s.profile(
        "keyed",
        &format!(
            "[[secrets]]\npath = \"/etc/dropbear/dropbear_ed25519_host_key\"\nsource = \"{}\"\n",
            key.display()
        ),
    );
    let out = s.run(&["build", "--profile", "keyed"]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: the image holds secrets: /etc/dropbear/dropbear_ed25519_host_key (supplied at build time; no reproducibility claim covers them)"),
        "{stderr}"
    );
    let m = manifest_json(&s);
    assert_eq!(m["holds_secrets"], serde_json::json!(true));
    assert_eq!(
        m["secrets"],
        serde_json::json!(["/etc/dropbear/dropbear_ed25519_host_key"])
    );
    let entry = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == "/etc/dropbear/dropbear_ed25519_host_key")
        .expect("the secret is in the image");
    assert_eq!(entry["mode"], "0600");
    for f in ["manifest.json", "build.json", "selection.json"] {
        let text = fs::read_to_string(s.out(BOARD).join(f)).unwrap();
        assert!(
            !text.contains(&host.path().display().to_string()) && !text.contains("BEGIN OPENSSH"),
            "{f} names the secret's source or contents"
        );
    }
    // The secret's bytes stay out of the shared pack cache, and the image is the owner's only.
    assert!(
        stderr.contains("pack cache: not used (the image holds secrets)"),
        "{stderr}"
    );
    let mode = fs::metadata(s.out(BOARD).join("initramfs.cpio.gz"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "initramfs mode {mode:o}");
}

/// A tmpfs mounted for one test, unmounted however the test ends.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, bytes: u64) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let root_user = fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
        assert!(
            root_user,
            "disk_full_while_packing mounts a small tmpfs and needs root (run the test as root, \
             or under `unshare -rm cargo test ...`)"
        );
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn disk_full_while_packing() {
    let s = Scratch::new();
    // A first build elsewhere, to size the tmpfs: room for the kernel, not the initramfs.
    let built = s.run(&["build"]);
    assert!(built.status.success(), "the first scratch build failed");
    let kernel = fs::metadata(s.out(BOARD).join("kernel")).unwrap().len();
    let initramfs = fs::metadata(s.out(BOARD).join("initramfs.cpio.gz"))
        .unwrap()
        .len();
    assert!(
        initramfs > 300 << 10,
        "the initramfs is too small for this test"
    );
    let size = (kernel + (256 << 10)).div_ceil(4096) * 4096;
    let mnt = s.root().join("small");
    let tmpfs = Tmpfs::mount(&mnt, size);
    // A previous output (small and fake: the real one does not fit twice).
    let out = mnt.join("out");
    fs::create_dir(&out).unwrap();
    fs::write(out.join("kernel"), "previous kernel").unwrap();
    let before = digest(&out);

    let err = error_of(&s.run(&["build", "--out", out.to_str().unwrap()]), 1);
    assert_glob(
        &format!(
            "error: writing {}/initramfs.cpio.gz: no space left on device (kernel * MiB, image * MiB before compression); the unfinished output was removed, the previous one is unchanged",
            out.display()
        ),
        &err,
    );
    assert_eq!(digest(&out), before, "the previous output changed");
    let mut left: Vec<String> = fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    // The lock file stays by design (see docs/errors.md); nothing else may.
    assert_eq!(left, [".out.lock", "out"], "left behind in the tmpfs");
    drop(tmpfs);
}

// ------------------------------------------------------------------ boot

#[test]
fn boot_check_failed() {
    let s = Scratch::new();
    assert!(
        s.run(&["build"]).status.success(),
        "the scratch build failed"
    );
    // A QEMU that prints one console line and then nothing: the ready marker never comes.
    let fake = s.root().join("fake-qemu");
    fs::write(
        &fake,
        "#!/bin/sh\necho 'Linux version 0.0 (a fake QEMU)'\nexec sleep 60\n",
    )
    .unwrap();
    fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
    s.board(BOARD, |t| {
        t["qemu"]["binary"] = fake.display().to_string().into();
    });
    let out = s.out(BOARD);
    let started = Instant::now();
    let err = error_of(
        &s.run(&[
            "boot",
            "--check",
            "--timeout",
            "3",
            "--out",
            out.to_str().unwrap(),
        ]),
        1,
    );
    assert_glob(
        "error: boot check of qemu-x86_64 failed: no ready marker within 3 s; last console line: Linux version 0.0 (a fake QEMU)*",
        &err,
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the check waited {:?} for a 3 s timeout",
        started.elapsed()
    );
    let log = fs::read_to_string(out.join("serial.log")).unwrap();
    assert!(log.contains("Linux version 0.0 (a fake QEMU)"), "{log}");
}

// ---- the pinned Nix's provisioning ---------------------------------------------------------

/// A scratch cache (`BONSAI_CACHE`) holding the pinned Nix's packages as links to the real
/// cache's files (which `cargo xtask test` provisions first), except the files `skip` names.
fn scratch_nix_cache(skip: impl Fn(&str) -> bool) -> tempfile::TempDir {
    let arch = xtask::host::host_arch().unwrap();
    let real = xtask::cache::cache_dir()
        .join("debs")
        .join(format!("trixie-{}", arch.debian()));
    // Make sure the real cache holds them (a no-op once the pinned Nix is provisioned).
    xtask::nixbin::provision(&repo()).expect("provisioning the pinned Nix");
    let cache = tempfile::tempdir().unwrap();
    let debs = cache
        .path()
        .join("debs")
        .join(format!("trixie-{}", arch.debian()));
    fs::create_dir_all(&debs).unwrap();
    for e in fs::read_dir(&real).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".deb") && !skip(&name) {
            std::os::unix::fs::symlink(real.join(&name), debs.join(&name)).unwrap();
        }
    }
    cache
}

/// `build` of the default board with the pinned Nix and the cache `cache`.
fn build_with_pinned_nix(s: &Scratch, cache: &Path) -> Output {
    s.command(&["build", "--board", BOARD])
        .env("BONSAI_NIX", "debian13")
        .env("BONSAI_CACHE", cache)
        .output()
        .unwrap()
}

fn pinned_lock(root: &Path) -> (PathBuf, serde_json::Value) {
    let arch = xtask::host::host_arch().unwrap();
    let file = root.join(format!("nix/debian13-nix.{}.lock.json", arch.debian()));
    let lock = serde_json::from_str(&fs::read_to_string(&file).unwrap()).unwrap();
    (file, lock)
}

#[test]
fn a_damaged_package_of_the_pinned_nix_is_removed_and_named() {
    let s = Scratch::new();
    let (_, lock) = pinned_lock(s.root());
    let victim = lock["packages"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()["file"]
        .as_str()
        .unwrap()
        .to_string();
    let cache = scratch_nix_cache(|n| n == victim);
    let debs = cache.path().join("debs").join(format!(
        "trixie-{}",
        xtask::host::host_arch().unwrap().debian()
    ));
    fs::write(debs.join(&victim), b"not a Debian package").unwrap();
    let err = error_of(&build_with_pinned_nix(&s, cache.path()), 1);
    assert_glob(
        &format!("error: */debs/trixie-*/{victim}: sha256 * does not match the pin * in nix/debian13-nix.*.lock.json (removed; run again to download it anew)"),
        &err,
    );
    assert!(!debs.join(&victim).exists(), "the damaged file was kept");
    s.assert_nothing_written(BOARD);
}

#[test]
fn a_pinned_nix_package_the_archive_lacks_is_a_one_line_error() {
    let s = Scratch::new();
    let (file, mut lock) = pinned_lock(s.root());
    // A version of a pinned package that Debian trixie never had, and no file in the cache.
    let first = lock["packages"]
        .as_object()
        .unwrap()
        .keys()
        .next()
        .unwrap()
        .clone();
    let p = &mut lock["packages"][&first];
    p["version"] = "0.0~bonsai-never".into();
    p["file"] = format!("{first}_0.0~bonsai-never_all.deb").into();
    fs::write(&file, serde_json::to_string_pretty(&lock).unwrap()).unwrap();
    let cache = scratch_nix_cache(|_| false);
    let err = error_of(&build_with_pinned_nix(&s, cache.path()), 1);
    assert_glob(
        "error: cannot download the pinned Nix's packages from Debian trixie: * (the archive may have dropped a pinned version; rewrite the pins with cargo xtask nix-lock)",
        &err,
    );
    s.assert_nothing_written(BOARD);
}
