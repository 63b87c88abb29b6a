//! Keeping dependencies out: `[image] forbid` and `[overrides.<attribute>]`, built for real
//! with the offline set on qemu-x86_64.
//!
//! - A profile that forbids glibc fails, with the chains from hello and busybox into it in one
//!   error, and leaves the output folder it would have replaced as it was.
//! - Forbidding what is absent builds; a match that is only in the Nix closure is a warning with
//!   its chain of store references; `size` and `eval --json` state the patterns; `why <glob>`
//!   prints the same chains.
//! - `[overrides.busybox] enableStatic = true` puts Debian's static busybox in the image
//!   (GNU cpio's view and readelf on the archive's store path); an applet override drops
//!   exactly the applets it names, and that image boots and passes its checks.
//! - Bad overrides are one-line errors: an unknown argument (with the accepted ones), an
//!   attribute without `.override`, an unknown attribute, an applet the binary lacks.
//! - The systemd case through the Nixpkgs fixture (Nixpkgs' `callPackage`, `makeOverridable`
//!   and overlay fixed point): `procps` links libsystemd, `forbid = ["systemd"]` names the
//!   chain, `[overrides.procps] withSystemd = false` builds without it.
//!
//! Everything runs in a scratch copy of the repository's data folders (`BONSAI_ROOT`). Needs
//! Nix, QEMU, GNU cpio and readelf (`cargo xtask test` installs them); fails, never skips.

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
        Scratch {
            dir: common::scratch_repo(),
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn profile(&self, name: &str, text: &str) {
        fs::write(self.root().join(format!("profiles/{name}.toml")), text).unwrap();
    }

    fn run(&self, args: &[&str]) -> Output {
        common::xtask_in(self.root(), args)
    }

    /// Runs, asserts success, returns (stdout, stderr).
    fn ok(&self, args: &[&str]) -> (String, String) {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "xtask {} failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Builds `profile` into `out`, expecting failure: the error (its lines from the first
    /// `error:` on), after checking the exit code and that `out` holds no initramfs.
    fn build_fails(&self, profile: &str, out: &Path) -> String {
        let o = self.run(&[
            "build",
            "--board",
            BOARD,
            "--profile",
            profile,
            "--out",
            &out.display().to_string(),
        ]);
        assert_eq!(o.status.code(), Some(1), "building {profile} did not fail");
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        let at = err
            .find("error:")
            .unwrap_or_else(|| panic!("no error line:\n{err}"));
        assert_eq!(
            err[at..].lines().filter(|l| l.starts_with("error")).count(),
            1,
            "not one error:\n{err}"
        );
        err[at..].to_string()
    }

    fn build(&self, profile: &str, out: &Path) -> String {
        self.ok(&[
            "build",
            "--board",
            BOARD,
            "--profile",
            profile,
            "--out",
            &out.display().to_string(),
        ])
        .1
    }
}

/// GNU cpio's listing of an initramfs (`cpio -t`, names without a leading `/`).
fn cpio_names(out: &Path) -> Vec<String> {
    let gz = fs::read(out.join("initramfs.cpio.gz")).unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("gzip -dc | cpio -t --quiet")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("running gzip | cpio");
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &gz));
    let o = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(o.status.success(), "cpio -t failed");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(String::from)
        .collect()
}

fn sha256(p: &Path) -> String {
    let o = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The store path (`/nix/store/<hash>-<name>`) of the archive entry `…/bin/busybox`.
fn busybox_store_path(names: &[String]) -> PathBuf {
    let hit = names
        .iter()
        .find(|n| n.starts_with("nix/store/") && n.ends_with("/bin/busybox"))
        .unwrap_or_else(|| panic!("no store busybox in the archive: {names:?}"));
    PathBuf::from(format!("/{}", hit.trim_end_matches("/bin/busybox")))
}

const FORBID_GLIBC: &str =
    "description = \"forbids glibc\"\ninherit = [\"minimal\"]\n[image]\nforbid = [\"glibc*\"]\n";
const FORBID_ABSENT: &str = "description = \"forbids what is absent\"\ninherit = [\"minimal\"]\n[image]\nforbid = [\"systemd\", \"openssl*\", \"src\"]\n";

#[test]
fn forbidden_dependencies_fail_with_their_chains() {
    require("nix-build", "nix-bin");
    require("cpio", "cpio");
    let s = Scratch::new();
    s.profile("forbid-glibc", FORBID_GLIBC);
    s.profile("forbid-absent", FORBID_ABSENT);

    // A good build first, into the folder the forbidden one would replace.
    let out = s.root().join("out-forbid");
    s.build("minimal", &out);
    let before = sha256(&out.join("initramfs.cpio.gz"));

    let err = s.build_fails("forbid-glibc", &out);
    assert!(
        err.starts_with("error: profile forbid-glibc: [image] forbid: the image contains what the profile forbids: \"glibc*\" matches glibc-2.36"),
        "{err}"
    );
    // hello and busybox both lead into glibc: each chain is there, from the package's program.
    for want in [
        "[package hello-example] /bin/hello → …-hello-1.0/bin/hello → (DT_NEEDED libc.so.6) …-glibc-2.36",
        "[package hello-example] /bin/hello → …-hello-1.0/bin/hello → (interpreter) …-glibc-2.36",
        "/bin/busybox → (DT_NEEDED libc.so.6) …-glibc-2.36",
    ] {
        assert!(err.contains(want), "no chain {want:?} in:\n{err}");
    }
    assert_eq!(
        sha256(&out.join("initramfs.cpio.gz")),
        before,
        "the refused build changed the output folder"
    );
    let fresh = s.root().join("out-forbid-fresh");
    s.build_fails("forbid-glibc", &fresh);
    assert!(!fresh.exists(), "a refused build left {}", fresh.display());

    // Forbidding what is not in the image builds; "src" (hello's source, a store reference
    // nothing is kept from) warns with its chain.
    let stderr = s
        .ok(&["build", "--board", BOARD, "--profile", "forbid-absent"])
        .1;
    assert!(
        stderr.contains("warning: profile forbid-absent forbids \"src\": src is in the Nix closure but nothing of it is in the image: [package hello-example] …-hello-1.0 → …-src"),
        "{stderr}"
    );
    assert!(!stderr.contains("\"systemd\""), "{stderr}");
    let size: serde_json::Value =
        serde_json::from_str(&s.ok(&["size", "--board", BOARD, "--json"]).0).unwrap();
    assert_eq!(
        size["forbid"],
        serde_json::json!(["systemd", "openssl*", "src"])
    );
    common::assert_matches_schema("size", &size.to_string());
    let text = s.ok(&["size", "--board", BOARD]).0;
    assert!(
        text.contains("forbidden (checked absent): systemd"),
        "{text}"
    );

    // why <glob>: every chain into glibc, and the closure-only chain to src.
    let why = s.ok(&["why", "--board", BOARD, "glibc*"]).0;
    assert!(
        why.contains("-glibc-2.36") && why.contains("(in the image,"),
        "{why}"
    );
    assert!(
        why.contains(
            "[package hello-example] /bin/hello → …-hello-1.0/bin/hello → (DT_NEEDED libc.so.6)"
        ),
        "{why}"
    );
    let why = s.ok(&["why", "--board", BOARD, "src"]).0;
    assert!(
        why.contains("(only in the closure: nothing of it is kept)")
            && why.contains("[package hello-example] …-hello-1.0 → …-src"),
        "{why}"
    );
    let o = s.run(&["why", "--board", BOARD, "systemd*"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains(
        "error: no store path of qemu-x86_64's image or its closure matches \"systemd*\""
    ));
}

const STATIC_BUSYBOX: &str = "description = \"static busybox\"\ninherit = [\"minimal\"]\n[overrides.busybox]\nenableStatic = true\n";
const FEWER_APPLETS: &str = "description = \"busybox without vi and telnet\"\ninherit = [\"minimal\"]\n[overrides.busybox]\nextraConfig = \"\"\"\nCONFIG_VI n\n# CONFIG_TELNET is not set\n\"\"\"\n";

#[test]
fn a_busybox_override_changes_the_image() {
    require("nix-build", "nix-bin");
    require("cpio", "cpio");
    require("readelf", "binutils");
    require("qemu-system-x86_64", "qemu-system-x86");
    let s = Scratch::new();
    s.profile("static-busybox", STATIC_BUSYBOX);
    s.profile("fewer-applets", FEWER_APPLETS);

    // eval --json states the override and shows the other derivation.
    let eval = s
        .ok(&[
            "eval",
            "--board",
            BOARD,
            "--profile",
            "static-busybox",
            "--json",
        ])
        .0;
    common::assert_matches_schema("eval", &eval);
    let eval: serde_json::Value = serde_json::from_str(&eval).unwrap();
    assert_eq!(
        eval["overrides"],
        serde_json::json!({"busybox": {"enableStatic": {"value": true, "profile": "static-busybox"}}})
    );
    let item = eval["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["attribute"] == "busybox")
        .expect("a busybox item");
    assert!(
        item["drv_path"]
            .as_str()
            .unwrap()
            .contains("-busybox-static-1.35.0"),
        "{item}"
    );
    let plain = s
        .ok(&["eval", "--board", BOARD, "--profile", "minimal", "--json"])
        .0;
    let plain: serde_json::Value = serde_json::from_str(&plain).unwrap();
    assert_eq!(plain["overrides"], serde_json::json!({}));

    let (a, b, c) = (
        s.root().join("out-a"),
        s.root().join("out-b"),
        s.root().join("out-c"),
    );
    s.build("minimal", &a);
    s.build("static-busybox", &b);
    s.build("fewer-applets", &c);
    let (na, nb, nc) = (cpio_names(&a), cpio_names(&b), cpio_names(&c));

    // Static: Debian's busybox-static, with no program interpreter; hello keeps glibc.
    let bb = busybox_store_path(&nb);
    assert!(
        bb.display().to_string().contains("-busybox-static-1.35.0"),
        "{}",
        bb.display()
    );
    let elf = Command::new("readelf")
        .arg("-l")
        .arg(bb.join("bin/busybox"))
        .output()
        .unwrap();
    let elf = String::from_utf8_lossy(&elf.stdout);
    assert!(
        elf.contains("Program Headers") && !elf.contains("INTERP"),
        "not static:\n{elf}"
    );
    assert!(busybox_store_path(&na) != bb);
    assert!(
        nb.iter().any(|n| n.contains("-glibc-2.36")),
        "hello lost its glibc"
    );
    assert_ne!(
        sha256(&a.join("initramfs.cpio.gz")),
        sha256(&b.join("initramfs.cpio.gz"))
    );

    // Applets: exactly vi and telnet are gone, from the package and from /bin.
    let pkg = busybox_store_path(&nc);
    assert!(
        pkg.display()
            .to_string()
            .contains("-busybox-applets-1.35.0"),
        "{}",
        pkg.display()
    );
    let short = |names: &[String]| -> Vec<String> {
        let mut v: Vec<String> = names
            .iter()
            .filter_map(|n| {
                n.strip_prefix("nix/store/")
                    .and_then(|r| r.split_once("/bin/"))
                    .map(|(_, a)| a.to_string())
            })
            .collect();
        v.sort();
        v
    };
    let (links_a, links_c) = (short(&na), short(&nc));
    let gone: Vec<&String> = links_a.iter().filter(|l| !links_c.contains(l)).collect();
    let hello_and_bb = |l: &&String| *l != "hello";
    assert_eq!(
        gone.into_iter().filter(hello_and_bb).collect::<Vec<_>>(),
        ["telnet", "vi"]
    );
    for bin in ["bin/vi", "bin/telnet"] {
        assert!(na.iter().any(|n| n == bin), "minimal has no {bin}");
        assert!(!nc.iter().any(|n| n == bin), "the override kept {bin}");
    }
    assert!(nc.iter().any(|n| n == "bin/sh"));
    // ... and that image still boots and passes the profile's checks.
    s.ok(&[
        "boot",
        "--board",
        BOARD,
        "--out",
        &c.display().to_string(),
        "--check",
    ]);
}

#[test]
fn bad_overrides_are_one_line_errors() {
    require("nix-build", "nix-bin");
    let s = Scratch::new();
    let cases = [
        (
            "[overrides.busybox]\nnoSuchArgument = true\n",
            "error: realising packages: profiles/bad.toml: key 'overrides.busybox.noSuchArgument': busybox.override takes no argument 'noSuchArgument'; it takes: enableAppletSymlinks, enableMinimal, enableStatic, extraConfig, useMusl",
        ),
        (
            "[overrides.zlib]\nstatic = true\n",
            "error: realising packages: profiles/bad.toml: key 'overrides.zlib': 'zlib' has no .override (it is not made with callPackage or lib.makeOverridable)",
        ),
        (
            "[overrides.nosuch]\nx = 1\n",
            "error: realising packages: profiles/bad.toml: key 'overrides.nosuch': 'nosuch' is not an attribute of the offline package set",
        ),
        (
            "[overrides.dropbear]\nzlib = false\n",
            "error: realising packages: profiles/bad.toml: key 'overrides.dropbear.zlib': ",
        ),
    ];
    for (body, want) in cases {
        s.profile(
            "bad",
            &format!("description = \"bad\"\ninherit = [\"minimal\"]\n{body}"),
        );
        let out = s.root().join("out-bad");
        let err = s.build_fails("bad", &out);
        let first = err.lines().next().unwrap();
        assert!(first.starts_with(want), "{first}\n  wanted {want}");
        assert!(!out.exists());
    }
    // An applet the binary does not have fails its build, naming the option.
    s.profile("bad", "description = \"bad\"\ninherit = [\"minimal\"]\n[overrides.busybox]\nextraConfig = \"CONFIG_NO_SUCH_APPLET y\"\n");
    let err = s.build_fails("bad", &s.root().join("out-bad"));
    assert!(
        err.starts_with("error: realising packages: profiles/bad.toml: key 'overrides.busybox.extraConfig': extraConfig = (CONFIG_NO_SUCH_APPLET y): CONFIG_NO_SUCH_APPLET names no applet of busybox 1.35.0"),
        "{err}"
    );
    s.profile("bad", "description = \"bad\"\ninherit = [\"minimal\"]\n[overrides.busybox]\nextraConfig = \"CONFIG_FEATURE_EDITING_MAX_LEN 512\"\n");
    let err = s.build_fails("bad", &s.root().join("out-bad"));
    assert!(
        err.starts_with("error: realising packages: profiles/bad.toml: key 'overrides.busybox.extraConfig': extraConfig = (CONFIG_FEATURE_EDITING_MAX_LEN 512): busybox 1.35.0"),
        "{err}"
    );
}

const PROCPS: &str = "description = \"procps, never systemd\"\npackages = [\"busybox\", \"procps\"]\ninit = \"busybox\"\n[image]\nforbid = [\"systemd\"]\n";

#[test]
fn the_systemd_case_through_nixpkgs_shapes() {
    require("nix-build", "nix-bin");
    require("cpio", "cpio");
    let s = Scratch::new();
    let fixture = s
        .root()
        .join("nix/tests/nixpkgs-fixture")
        .display()
        .to_string();
    let build = |profile: &str, out: &Path| -> Output {
        s.run(&[
            "build",
            "--board",
            BOARD,
            "--profile",
            profile,
            "--nixpkgs",
            &fixture,
            "--out",
            &out.display().to_string(),
        ])
    };

    // procps links systemd's library: the forbid names the chain from ps.
    s.profile("procps", PROCPS);
    let out = s.root().join("out-procps");
    let o = build("procps", &out);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("error: profile procps: [image] forbid: the image contains what the profile forbids: \"systemd\" matches systemd-257.6"), "{err}");
    assert!(
        err.contains("[package procps] …-procps-4.0.4/bin/ps → (DT_NEEDED libsystemd.so.0) …-systemd-257.6/lib/libsystemd.so.0"),
        "{err}"
    );
    assert!(!out.exists());

    // The package's own switch, through the profile: no systemd in the image or the closure.
    s.profile(
        "procps",
        &format!("{PROCPS}[overrides.procps]\nwithSystemd = false\n"),
    );
    let o = build("procps", &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !stderr.contains("systemd"),
        "a warning about systemd: {stderr}"
    );
    let names = cpio_names(&out);
    assert!(
        names.iter().any(|n| n.contains("-procps-4.0.4/bin/ps")),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.contains("systemd")), "{names:?}");
    let info: serde_json::Value =
        serde_json::from_slice(&fs::read(out.join("build.json")).unwrap()).unwrap();
    assert!(
        !info["store_paths"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains("systemd")),
        "{info}"
    );
    assert_eq!(info["forbid"], serde_json::json!(["systemd"]));
    assert_eq!(
        info["overrides"]["procps"]["withSystemd"]["value"],
        serde_json::json!(false)
    );

    // An argument procps does not take lists the ones it does, from Nixpkgs' mirrored formals.
    s.profile(
        "procps",
        &format!("{PROCPS}[overrides.procps]\nwithSystemD = false\n"),
    );
    let o = build("procps", &out);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("error: realising packages: profiles/procps.toml: key 'overrides.procps.withSystemD': procps.override takes no argument 'withSystemD'; it takes: stdenv, systemd, withSystemd"),
        "{err}"
    );
}
