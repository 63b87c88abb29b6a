//! bonsai's Nix glue (nix/bonsai.nix, nix/nixpkgs.nix, `cargo xtask eval`) against the Nixpkgs
//! fixture (nix/tests/nixpkgs-fixture), which has Nixpkgs' calling conventions and output
//! shapes and builds real, tiny trees offline; and `eval` of every shipped board from the
//! offline set with import from derivation forbidden. Boards built through the fixture are
//! judged by their image (GNU cpio's listing, the manifest, the kernel file's bytes), never
//! booted: the fixture's kernel is a stand-in file, not a kernel.
//! Needs Nix, GNU cpio and python3's jsonschema (installed by `cargo xtask test`); fails,
//! never skips, without them.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn nix_dir() -> PathBuf {
    root().join("nix")
}

fn fixture() -> PathBuf {
    nix_dir().join("tests/nixpkgs-fixture")
}

fn nix(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for (k, v) in xtask::host::nix_env() {
        cmd.env(k, v);
    }
    cmd
}

fn eval_with(expr: &str, extra: &[&str]) -> Result<serde_json::Value, String> {
    let out = nix("nix-instantiate")
        .args(["--eval", "--strict", "--json"])
        .args(extra)
        .args(["-E", expr])
        .current_dir(nix_dir())
        .output()
        .expect(
            "nix-instantiate is not installed: run `cargo xtask test` or apt-get install nix-bin",
        );
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn eval(expr: &str) -> Result<serde_json::Value, String> {
    eval_with(expr, &[])
}

/// nix/nixpkgs.nix over the fixture, as nix/bonsai.nix imports it.
fn pkgs(system: &str, extra: &str) -> String {
    format!(
        r#"(import ./nixpkgs.nix {{ nixpkgs = ./tests/nixpkgs-fixture; system = "{system}"; hostSystem = "x86_64-linux"; {extra} }})"#
    )
}

fn bonsai(system: &str, request: &str) -> String {
    format!(
        r#"import ./bonsai.nix {{ source = "nixpkgs"; nixpkgs = ./tests/nixpkgs-fixture; system = "{system}"; hostSystem = "x86_64-linux"; request = ''{request}''; }}"#
    )
}

fn xtask(root: &Path, args: &[&str]) -> Output {
    xtask_env(root, args, &[])
}

fn xtask_env(root: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .env("BONSAI_ROOT", root)
        .env_remove("BONSAI_NIXPKGS")
        .envs(env.iter().copied())
        .output()
        .expect("running the xtask binary");
    eprintln!(
        "$ xtask {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn last_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string()
}

fn sha256(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

// ---- the import: pure, cross, overlays, the gate --------------------------------------------

#[test]
fn nixpkgs_is_imported_with_empty_config_and_overlays() {
    let v = eval(&format!("{}.fixture.args", pkgs("x86_64-linux", ""))).unwrap();
    assert_eq!(v["config"], serde_json::json!({}), "{v}");
    assert_eq!(v["overlays"], 0, "{v}");
    assert_eq!(v["localSystem"], "x86_64-linux", "{v}");
    assert_eq!(v["crossSystem"], serde_json::Value::Null, "{v}");
    let v = eval(&format!("{}.fixture.args", pkgs("aarch64-linux", ""))).unwrap();
    assert_eq!(v["localSystem"], "x86_64-linux", "{v}");
    assert_eq!(v["crossSystem"], "aarch64-unknown-linux-gnu", "{v}");
    assert_eq!(v["config"], serde_json::json!({}), "{v}");
}

#[test]
fn the_fixture_refuses_an_impure_import() {
    // `import nixpkgs { inherit system; }`: real Nixpkgs would read ~/.config/nixpkgs.
    let err = eval(r#"(import ./tests/nixpkgs-fixture { system = "x86_64-linux"; }).hello.name"#)
        .unwrap_err();
    assert!(err.contains("imported without `config`"), "{err}");
    let err = eval(
        r#"(import ./tests/nixpkgs-fixture { system = "x86_64-linux"; config = { }; }).hello.name"#,
    )
    .unwrap_err();
    assert!(err.contains("imported without `overlays`"), "{err}");
}

#[test]
fn overlays_given_as_paths_are_applied() {
    let d = tempfile::tempdir().unwrap();
    let overlay = d.path().join("overlay.nix");
    std::fs::write(
        &overlay,
        "self: super: { probe = super.hello; busybox = super.busybox // { overlaid = true; }; }\n",
    )
    .unwrap();
    let p = pkgs(
        "x86_64-linux",
        &format!("overlays = [ {} ];", overlay.display()),
    );
    let v = eval(&format!(
        "{{ n = {p}.fixture.args.overlays; o = {p}.busybox.overlaid; h = {p}.probe.name; }}"
    ))
    .unwrap();
    assert_eq!(
        v,
        serde_json::json!({ "n": 1, "o": true, "h": "hello-2.12.2" })
    );
}

#[test]
fn cross_boards_use_the_cross_set_as_pkgs_cross_names_it() {
    let p = pkgs("aarch64-linux", "");
    let b = bonsai(
        "aarch64-linux",
        r#"{"packages":["busybox","nested.tool"],"kernel":{"base":"tinyconfig","fragments":["qemu-aarch64.config"]}}"#,
    );
    let v = eval(&format!(
        r#"let p = {p}; b = {b}; in {{
          prefix = p.stdenv.cc.targetPrefix;
          same = p.busybox.drvPath == p.pkgsCross.aarch64-multiplatform.busybox.drvPath;
          nativeDiffers = p.busybox.drvPath != p.buildPackages.busybox.drvPath;
          builtOn = b.packages.p0.system;
          nested = b.packages.p1.name;
          cfgPrefix = b.kernelConfig.crossPrefix;
          target = b.kernel.passthru.target;
          outputs = b.kernel.outputs;
          configIsString = builtins.isString b.kernel.configfile;
          staticPrefix = p.buildPackages.pkgsStatic.stdenv.cc.targetPrefix;
          staticName = p.buildPackages.pkgsStatic.busybox.name;
        }}"#
    ))
    .unwrap();
    assert_eq!(
        v,
        serde_json::json!({
            "prefix": "aarch64-unknown-linux-gnu-",
            "same": true,
            "nativeDiffers": true,
            "builtOn": "x86_64-linux",
            "nested": "hello-2.12.2",
            "cfgPrefix": "aarch64-unknown-linux-gnu-",
            "target": "Image",
            "outputs": ["out", "dev"],
            "configIsString": true,
            "staticPrefix": "x86_64-unknown-linux-musl-",
            "staticName": "busybox-static-x86_64-unknown-linux-musl-1.36.1",
        })
    );
}

#[test]
fn a_missing_attribute_is_named() {
    let b = bonsai(
        "x86_64-linux",
        r#"{"packages":["no.such"],"kernel":{"package":"linux"}}"#,
    );
    let err = eval(&format!("({b}).packages.p0.name")).unwrap_err();
    assert!(
        err.contains(
            "bonsai: package attribute 'no.such' does not exist in the nixpkgs package set"
        ),
        "{err}"
    );
}

#[test]
fn the_minimum_nix_gate_is_checked_first_with_a_way_past_it() {
    let d = tempfile::tempdir().unwrap();
    let copy = d.path().join("nixpkgs");
    assert!(Command::new("cp")
        .arg("-r")
        .arg(fixture())
        .arg(&copy)
        .status()
        .unwrap()
        .success());
    let mf = copy.join("lib/minfeatures.nix");
    let text = std::fs::read_to_string(&mf).unwrap();
    assert!(text.contains(r#"minVersion = "2.3";"#));
    std::fs::write(
        &mf,
        text.replace(r#"minVersion = "2.3";"#, r#"minVersion = "99.0";"#),
    )
    .unwrap();
    // The fixture's own gate aborts like Nixpkgs' default.nix ...
    let err = eval(&format!(
        r#"(import {} {{ localSystem = "x86_64-linux"; config = {{ }}; overlays = [ ]; }}).hello.name"#,
        copy.display()
    ))
    .unwrap_err();
    assert!(
        err.contains("requires Nix >= 99.0, please upgrade"),
        "{err}"
    );
    // ... but bonsai checks it first and says how to get past it, in one line.
    let version = String::from_utf8_lossy(
        &nix("nix-instantiate")
            .arg("--version")
            .output()
            .unwrap()
            .stdout,
    )
    .split_whitespace()
    .last()
    .unwrap()
    .to_string();
    let scratch = common::scratch_repo();
    let out_dir = scratch.path().join("o");
    let nixpkgs = copy.display().to_string();
    for args in [
        vec!["eval", "--nixpkgs", &nixpkgs],
        vec![
            "build",
            "--nixpkgs",
            &nixpkgs,
            "--out",
            out_dir.to_str().unwrap(),
        ],
    ] {
        // The Nix on PATH, whose version this test read (BONSAI_NIX may pick another).
        let out = xtask_env(scratch.path(), &args, &[("BONSAI_NIX", "host")]);
        assert!(!out.status.success());
        let what = if args[0] == "eval" {
            "evaluating"
        } else {
            "kernel config"
        };
        assert_eq!(
            last_line(&out),
            format!("error: {what}: Nixpkgs at {nixpkgs} needs Nix >= 99.0; this is Nix {version}: set BONSAI_NIX=debian13 (bonsai's pinned Nix 2.26) or put a newer Nix on PATH"),
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| l.starts_with("error"))
                .count(),
            1
        );
    }
    assert!(!out_dir.exists(), "a failed build left its output folder");
}

// ---- a board built through the fixture, judged by its image --------------------------------

struct Image {
    out: PathBuf,
    /// GNU cpio's `-tv` listing.
    listing: String,
    manifest: serde_json::Value,
}

/// A profile of the fixture's packages: busybox, hello and execline (split outputs, libraries
/// from another package's output), on its own so that the shipped profiles may change.
const GLUE_PROFILE: &str = "description = \"glue test: busybox, hello, execline\"\npackages = [\"busybox\", \"hello\", \"execline\"]\ninit = \"busybox\"\n";

/// qemu-x86_64 with [`GLUE_PROFILE`], built once through the fixture for the tests that
/// inspect it.
fn fixture_image() -> &'static Image {
    static IMAGE: OnceLock<Image> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let scratch = common::scratch_repo().keep();
        std::fs::write(scratch.join("profiles/glue.toml"), GLUE_PROFILE).unwrap();
        let out = scratch.join("out-fixture");
        let o = xtask(
            &scratch,
            &[
                "build",
                "--board",
                "qemu-x86_64",
                "--profile",
                "glue",
                "--nixpkgs",
                fixture().to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert!(
            o.status.success(),
            "build through the fixture failed: {}",
            last_line(&o)
        );
        let list = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "gzip -dc '{}' | cpio -itv --quiet",
                out.join("initramfs.cpio.gz").display()
            ))
            .output()
            .expect("GNU cpio is not installed: run `cargo xtask test` or apt-get install cpio");
        assert!(
            list.status.success(),
            "GNU cpio cannot list the initramfs: {}",
            String::from_utf8_lossy(&list.stderr)
        );
        let manifest =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap())
                .unwrap();
        Image {
            out,
            listing: String::from_utf8_lossy(&list.stdout).into_owned(),
            manifest,
        }
    })
}

/// The entries of GNU cpio's listing whose path matches: (mode string, path, link target).
fn entry(listing: &str, pred: impl Fn(&str) -> bool) -> Vec<(&str, &str, Option<&str>)> {
    listing
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let mode = *f.first()?;
            let arrow = f.iter().position(|x| *x == "->");
            let (name, target) = match arrow {
                Some(i) => (f[i - 1], Some(f[i + 1])),
                None => (*f.last()?, None),
            };
            pred(name).then_some((mode, name, target))
        })
        .collect()
}

#[test]
fn split_outputs_reach_the_image_and_only_the_outputs_needed() {
    let img = fixture_image();
    let lib = entry(&img.listing, |n| {
        n.starts_with("nix/store/")
            && n.ends_with("-skalibs-2.14.4.0-lib/lib/libskarnet.so.2.14.4.0")
    });
    assert_eq!(
        lib.len(),
        1,
        "no libskarnet from skalibs' lib output in:\n{}",
        img.listing
    );
    assert!(
        lib[0].0.starts_with('-'),
        "libskarnet is not a regular file: {:?}",
        lib[0]
    );
    let soname = entry(&img.listing, |n| {
        n.ends_with("-skalibs-2.14.4.0-lib/lib/libskarnet.so.2.14")
    });
    assert!(
        soname.len() == 1 && soname[0].2 == Some("libskarnet.so.2.14.4.0"),
        "{soname:?}"
    );
    assert_eq!(
        entry(&img.listing, |n| n
            .ends_with("-execline-2.9.6.1-lib/lib/libexecline.so.2.9.6.1"))
        .len(),
        1,
        "no libexecline from execline's lib output"
    );
    // The wrapper and the program it runs, from execline's first output (bin).
    let link = entry(&img.listing, |n| n == "bin/execlineb");
    assert_eq!(link.len(), 1, "no /bin/execlineb");
    let target = link[0].2.unwrap();
    assert!(
        target.ends_with("-execline-2.9.6.1-bin/bin/execlineb"),
        "{target}"
    );
    assert_eq!(
        entry(&img.listing, |n| n
            .ends_with("-execline-2.9.6.1-bin/bin/.execlineb-wrapped"))
        .len(),
        1
    );
    for unwanted in [
        "-skalibs-2.14.4.0-dev",
        "-skalibs-2.14.4.0-doc",
        "-execline-2.9.6.1-man",
        "-execline-2.9.6.1-doc",
        "-glibc-2.40-66-dev",
    ] {
        assert!(
            !img.listing.contains(unwanted),
            "{unwanted} is in the image, though nothing kept refers to it"
        );
    }
    // The manifest says which store path each file came from.
    let files = img.manifest["files"].as_array().unwrap();
    let f = files
        .iter()
        .find(|f| {
            f["path"]
                .as_str()
                .unwrap()
                .ends_with("/lib/libskarnet.so.2.14.4.0")
        })
        .expect("libskarnet in manifest.json");
    assert!(
        f["store_path"]
            .as_str()
            .unwrap()
            .ends_with("-skalibs-2.14.4.0-lib"),
        "{f}"
    );
    assert_eq!(f["sha256"].as_str().unwrap().len(), 64);
}

#[test]
fn the_dynamic_busybox_and_hello_come_with_their_glibc() {
    let img = fixture_image();
    let hello = entry(&img.listing, |n| n == "bin/hello");
    assert!(
        hello.len() == 1 && hello[0].2.unwrap().ends_with("-hello-2.12.2/bin/hello"),
        "{hello:?}"
    );
    let files = img.manifest["files"].as_array().unwrap();
    let busybox = files
        .iter()
        .find(|f| {
            f["path"]
                .as_str()
                .unwrap()
                .ends_with("-busybox-1.36.1/bin/busybox")
        })
        .expect("busybox in manifest.json");
    assert_eq!(busybox["type"], "file");
    // Its interpreter, from the fixture's glibc, is in the image (the bytes read from the archive).
    let path = busybox["path"].as_str().unwrap().trim_start_matches('/');
    let elf = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "gzip -dc '{}' | cpio -i --quiet --to-stdout '{path}'",
            img.out.join("initramfs.cpio.gz").display()
        ))
        .output()
        .unwrap()
        .stdout;
    assert_eq!(
        &elf[..4],
        b"\x7fELF",
        "{path} is not an ELF file in the image"
    );
    let text = String::from_utf8_lossy(&elf);
    let interp = text
        .split('\0')
        .find(|s| s.starts_with("/nix/store/") && s.ends_with("/lib/ld-linux-x86-64.so.2"))
        .expect("busybox names no store interpreter");
    assert!(
        img.listing.lines().any(|l| l.ends_with(&interp[1..])),
        "the interpreter {interp} is not in the image"
    );
}

#[test]
fn busybox_sbin_applets_are_reachable_from_bin() {
    // Nixpkgs' busybox keeps ip, poweroff, reboot, init ... in sbin/ (links to ../bin/busybox):
    // /bin/<applet> must exist and, following links inside the image, reach the busybox binary.
    let img = fixture_image();
    for applet in ["sh", "ip", "poweroff", "reboot", "udhcpc"] {
        let mut path = format!("bin/{applet}");
        let mut chain = vec![path.clone()];
        loop {
            let e = entry(&img.listing, |n| n == path);
            assert_eq!(e.len(), 1, "/{path} is not in the image (chain {chain:?})");
            let Some(target) = e[0].2 else { break };
            path = if let Some(abs) = target.strip_prefix('/') {
                abs.to_string()
            } else {
                let dir = Path::new(&path).parent().unwrap().join(target);
                let mut parts: Vec<String> = Vec::new();
                for c in dir.components() {
                    match c {
                        std::path::Component::ParentDir => {
                            parts.pop();
                        }
                        std::path::Component::Normal(n) => parts.push(n.to_string_lossy().into()),
                        _ => {}
                    }
                }
                parts.join("/")
            };
            chain.push(path.clone());
            assert!(chain.len() < 10, "link loop: {chain:?}");
        }
        assert!(
            path.ends_with("-busybox-1.36.1/bin/busybox"),
            "/bin/{applet} does not reach busybox: {chain:?}"
        );
    }
}

#[test]
fn the_kernel_is_the_fixture_image_built_from_the_merged_config() {
    let img = fixture_image();
    let kernel = std::fs::read_to_string(img.out.join("kernel")).unwrap();
    assert!(
        kernel.starts_with("bonsai fixture kernel 6.12.41 x86_64 bzImage\n"),
        "{kernel}"
    );
    // The config it was made from is the merged one bonsai asserted (same derivation).
    let b = bonsai(
        "x86_64-linux",
        r#"{"packages":[],"kernel":{"base":"tinyconfig","fragments":["qemu-x86_64.config"]}}"#,
    );
    let cfg = eval(&format!("({b}).kernelConfig.outPath")).unwrap();
    let config = PathBuf::from(cfg.as_str().unwrap()).join("config");
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("CONFIG_FIXTURE_BASE_tinyconfig=y"), "{text}");
    let fragment =
        std::fs::read_to_string(root().join("kernel-configs/qemu-x86_64.config")).unwrap();
    let first = fragment.lines().find(|l| l.starts_with("CONFIG_")).unwrap();
    assert!(
        text.lines().any(|l| l == first),
        "{first} not in the merged config"
    );
    assert!(kernel.contains(&sha256(&config)), "{kernel}");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(img.out.join("build.json")).unwrap())
            .unwrap();
    assert_eq!(info["source"], format!("nixpkgs {}", fixture().display()));
}

#[test]
fn a_dropped_kernel_option_stops_a_build_through_nixpkgs() {
    let scratch = common::scratch_repo();
    let frag = scratch.path().join("kernel-configs/qemu-x86_64.config");
    let mut text = std::fs::read_to_string(&frag).unwrap();
    text.push_str("CONFIG_FIXTURE_UNSUPPORTED=y\n");
    std::fs::write(&frag, text).unwrap();
    let out_dir = scratch.path().join("o");
    let out = xtask(
        scratch.path(),
        &[
            "build",
            "--nixpkgs",
            fixture().to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    assert_eq!(
        last_line(&out),
        "error: kernel option CONFIG_FIXTURE_UNSUPPORTED=y from kernel-configs/qemu-x86_64.config was dropped by olddefconfig (it became n); check its dependencies (Kconfig: depends on BROKEN)"
    );
    assert!(!out_dir.exists(), "a failed build left its output folder");
}

// ---- eval: no import from derivation, nothing built ----------------------------------------

fn validate_against_schema(json: &str) {
    let d = tempfile::tempdir().unwrap();
    let doc = d.path().join("eval.json");
    std::fs::write(&doc, json).unwrap();
    let out = Command::new("python3")
        .arg("-c")
        .arg(
            "import json,sys,jsonschema\n\
             s=json.load(open(sys.argv[1])); jsonschema.Draft7Validator.check_schema(s)\n\
             jsonschema.Draft7Validator(s).validate(json.load(open(sys.argv[2])))",
        )
        .arg(root().join("schemas/eval.schema.json"))
        .arg(&doc)
        .output()
        .expect("python3 is not installed");
    assert!(
        out.status.success(),
        "eval --json does not match schemas/eval.schema.json (python3 -m pip install jsonschema if it is missing): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn invalid(paths: &[String]) -> std::collections::BTreeSet<String> {
    let out = nix("nix-store")
        .args(["--check-validity", "--print-invalid"])
        .args(paths)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn eval_of_every_shipped_board_forbids_ifd_and_builds_nothing() {
    let scratch = common::scratch_repo();
    // A fresh kernel config for each board: its config and kernel cannot be in the store yet,
    // so a build (or an import from derivation) during eval would show as a new valid path.
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    for board in ["qemu-x86_64", "qemu-aarch64", "raspberrypi3"] {
        let frag = scratch
            .path()
            .join(format!("kernel-configs/{board}.config"));
        let mut text = std::fs::read_to_string(&frag).unwrap();
        text.push_str(&format!("# eval test {nonce}\n"));
        std::fs::write(&frag, text).unwrap();

        let out = xtask(scratch.path(), &["eval", "--board", board, "--json"]);
        assert!(
            out.status.success(),
            "eval --board {board}: {}",
            last_line(&out)
        );
        let json = String::from_utf8_lossy(&out.stdout).into_owned();
        validate_against_schema(&json);
        let r: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(r["board"], board);
        assert_eq!(r["allow_import_from_derivation"], false);
        let items = r["items"].as_array().unwrap();
        let roles: Vec<&str> = items.iter().map(|i| i["role"].as_str().unwrap()).collect();
        assert_eq!(roles.last(), Some(&"kernel"), "{roles:?}");
        assert!(
            roles.contains(&"kernel-config") && roles.contains(&"package"),
            "{roles:?}"
        );
        assert!(items.iter().any(|i| i["attribute"] == "busybox"));
        let mut paths = Vec::new();
        for i in items {
            let drv = i["drv_path"].as_str().unwrap();
            assert!(Path::new(drv).is_file(), "{drv} was not instantiated");
            for o in i["outputs"].as_array().unwrap() {
                paths.push(o["path"].as_str().unwrap().to_string());
            }
            if i["role"] != "package" {
                for o in i["outputs"].as_array().unwrap() {
                    assert_eq!(o["valid"], false, "{board}: {o} is valid before any build");
                }
            }
        }
        // After the eval, each output is exactly as valid as reported: nothing was built.
        let now_invalid = invalid(&paths);
        for i in items {
            for o in i["outputs"].as_array().unwrap() {
                let p = o["path"].as_str().unwrap();
                assert_eq!(
                    o["valid"].as_bool().unwrap(),
                    !now_invalid.contains(p),
                    "{board}: {p} changed validity during eval"
                );
            }
        }
        assert_eq!(
            r["summary"]["outputs"].as_u64().unwrap() as usize,
            paths.len()
        );
        assert!(r["summary"]["to_build"].as_u64().unwrap() >= 2);
    }
}

#[test]
fn eval_fails_on_an_import_from_derivation() {
    // The fixture's fixtureIfd imports a file that a derivation writes.
    let ok = eval_with(
        &format!("{}.fixtureIfd.ifd", pkgs("x86_64-linux", "")),
        &[
            "--read-write-mode",
            "--option",
            "allow-import-from-derivation",
            "true",
        ],
    );
    assert_eq!(
        ok,
        Ok(serde_json::json!(true)),
        "the IFD probe does not evaluate when allowed"
    );
    let scratch = common::scratch_repo();
    std::fs::write(
        scratch.path().join("profiles/ifd.toml"),
        "description = \"an import from derivation\"\npackages = [\"busybox\", \"fixtureIfd\"]\ninit = \"busybox\"\n",
    )
    .unwrap();
    let out = xtask(
        scratch.path(),
        &[
            "eval",
            "--profile",
            "ifd",
            "--nixpkgs",
            fixture().to_str().unwrap(),
        ],
    );
    assert!(!out.status.success());
    let last = last_line(&out);
    assert!(
        last.starts_with("error: evaluating: ")
            && last.contains("-fixture-ifd.nix.drv")
            && last.contains("the option 'allow-import-from-derivation' is disabled"),
        "{last}"
    );
}

#[test]
fn eval_through_the_fixture_names_split_and_cross_outputs() {
    let scratch = common::scratch_repo();
    std::fs::write(
        scratch.path().join("profiles/glue.toml"),
        "description = \"glue\"\npackages = [\"busybox\", \"execline\", \"pkgsStatic.busybox\"]\ninit = \"busybox\"\n",
    )
    .unwrap();
    let out = xtask(
        scratch.path(),
        &[
            "eval",
            "--board",
            "qemu-aarch64",
            "--profile",
            "glue",
            "--json",
            "--nixpkgs",
            fixture().to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", last_line(&out));
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    validate_against_schema(&json);
    let r: serde_json::Value = serde_json::from_str(&json).unwrap();
    let item = |a: &str| {
        r["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["attribute"] == a)
            .unwrap_or_else(|| panic!("no {a} in {r}"))
            .clone()
    };
    let names = |i: &serde_json::Value| -> Vec<String> {
        i["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap().to_string())
            .collect()
    };
    let execline = item("execline");
    assert_eq!(execline["output"], "bin");
    assert_eq!(names(&execline), ["bin", "man", "lib", "dev", "doc", "out"]);
    assert!(execline["outputs"][0]["path"]
        .as_str()
        .unwrap()
        .ends_with("-execline-2.9.6.1-bin"));
    let kernel = item("linuxManualConfig (the merged config)");
    // The board's fragments set CONFIG_MODULES=y: Nixpkgs' kernel then has a modules output.
    assert_eq!(names(&kernel), ["out", "dev", "modules"]);
    assert!(item("pkgsStatic.busybox")["drv_path"]
        .as_str()
        .unwrap()
        .ends_with("-busybox-static-aarch64-unknown-linux-musl-1.36.1.drv"));
}

#[test]
fn test_nixpkgs_that_cannot_be_fetched_is_one_line() {
    // A branch that does not exist: one line offline (no network) and online (not found).
    let r = "github:NixOS/nixpkgs/bonsai-no-such-branch";
    let out = xtask(&root(), &["test", "--nixpkgs", r]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    // A host Nix older than 2.18 adds the one-line notice that the pinned Nix is used.
    let notice = "warning: the host's Nix ";
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with(notice))
        .collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        err.lines().filter(|l| l.starts_with(notice)).count() <= 1,
        "{err}"
    );
    assert!(
        lines[0].starts_with(&format!("error: --nixpkgs {r}: cannot fetch it ("))
            && lines[0].ends_with("testing against a real Nixpkgs needs the network, or a local checkout (--nixpkgs ~/src/nixpkgs)"),
        "{err}"
    );
}

#[test]
fn a_prebuilt_kernel_package_is_evaluated_and_built_without_a_config_step() {
    let scratch = common::scratch_repo();
    let board = std::fs::read_to_string(scratch.path().join("boards/qemu-x86_64.toml")).unwrap();
    let board = board
        .replace("base = \"tinyconfig\"\n", "package = \"linux\"\n")
        .replace("fragments = [\"qemu-x86_64.config\"]\n", "");
    assert!(board.contains("package = \"linux\"") && !board.contains("fragments ="));
    std::fs::write(scratch.path().join("boards/prebuilt.toml"), board).unwrap();
    std::fs::write(scratch.path().join("profiles/glue.toml"), GLUE_PROFILE).unwrap();
    let fixture = fixture().display().to_string();
    let out = xtask(
        scratch.path(),
        &[
            "eval",
            "--board",
            "prebuilt",
            "--profile",
            "glue",
            "--json",
            "--nixpkgs",
            &fixture,
        ],
    );
    assert!(out.status.success(), "{}", last_line(&out));
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    validate_against_schema(&json);
    let r: serde_json::Value = serde_json::from_str(&json).unwrap();
    let items: Vec<(String, String)> = r["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["role"].as_str().unwrap().to_string(),
                i["attribute"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expect: Vec<(String, String)> = [
        ("package", "busybox"),
        ("package", "hello"),
        ("package", "execline"),
        ("kernel", "linux"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(items, expect);
    let o = scratch.path().join("o");
    let out = xtask(
        scratch.path(),
        &[
            "build",
            "--board",
            "prebuilt",
            "--profile",
            "glue",
            "--nixpkgs",
            &fixture,
            "--out",
            o.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", last_line(&out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("realise kernel config"),
        "a prebuilt kernel went through the config step"
    );
    let kernel = std::fs::read_to_string(o.join("kernel")).unwrap();
    assert!(
        kernel.starts_with("bonsai fixture kernel 6.12.41 x86_64 bzImage\n"),
        "{kernel}"
    );
    let kernel_path = r["items"][3]["outputs"][0]["path"].as_str().unwrap();
    assert_eq!(
        std::fs::read_to_string(Path::new(kernel_path).join("bzImage")).unwrap(),
        kernel,
        "the image's kernel is not the evaluated kernel's output"
    );
}

#[test]
fn call_package_and_new_scope_fill_arguments_from_the_set() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("src")).unwrap();
    std::fs::write(
        d.path().join("src/tool.c"),
        "#include <stdio.h>\nint main(void){puts(\"tool-ok\");return 0;}\n",
    )
    .unwrap();
    std::fs::write(
        d.path().join("default.nix"),
        "{ stdenv, lib, helper }:\nstdenv.mkDerivation {\n  pname = \"tool\"; version = \"1.0\"; src = ./src;\n  buildPhase = \"cc -O2 -o tool tool.c\";\n  installPhase = \"mkdir -p $out/bin && cp tool $out/bin/ && echo ${helper} > $out/helper\";\n  passthru.usesLib = lib.versionAtLeast \"2.1\" \"2.0\";\n}\n",
    )
    .unwrap();
    let p = pkgs("x86_64-linux", "");
    let file = d.path().join("default.nix");
    let v = eval_with(&format!(
        r#"let p = {p}; t = p.newScope {{ helper = "h"; }} {} {{ }}; in {{ inherit (t) name usesLib; drv = t.drvPath; }}"#,
        file.display()
    ), &["--read-write-mode"])
    .unwrap();
    assert_eq!(v["name"], "tool-1.0");
    assert_eq!(v["usesLib"], true);
    let out = nix("nix-build")
        .args(["--no-out-link", v["drv"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let run = Command::new(format!("{path}/bin/tool")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout), "tool-ok\n");
    let err = eval(&format!("({p}.callPackage {} {{ }}).name", file.display())).unwrap_err();
    assert!(err.contains("helper"), "{err}");
}

// ---- profile overlays ---------------------------------------------------------------------

/// Two overlays and a local package: the second overlay's `prev` is the first's result, `final`
/// is the set after both, and `callPackage` (of overlays and of local packages) sees `final`.
const OVERLAY_ONE: &str = r#"final: prev: {
  teamVersion = "1";
  team-tool = final.stdenv.mkDerivation {
    pname = "team-tool";
    version = final.teamVersion;
    installPhase = "mkdir -p $out/bin";
  };
}
"#;
const OVERLAY_TWO: &str = "final: prev: { teamVersion = prev.teamVersion + \".2\"; }\n";
const OVERLAY_PROBE: &str = r#"{ stdenv, teamVersion }:
stdenv.mkDerivation { pname = "probe"; version = teamVersion; installPhase = "mkdir -p $out/bin"; }
"#;

fn write_overlay_profile(root: &Path) {
    let w = |rel: &str, text: &str| {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    w("overlays/one.nix", OVERLAY_ONE);
    w("overlays/two.nix", OVERLAY_TWO);
    w("pkgs/probe.nix", OVERLAY_PROBE);
    w(
        "profiles/team-base.toml",
        "description = \"o\"\npackages = [\"busybox\"]\ninit = \"busybox\"\noverlays = [\"overlays/one.nix\"]\n",
    );
    w(
        "profiles/team.toml",
        "description = \"o\"\ninherit = [\"team-base\"]\npackages = [\"team-tool\", \"probe\"]\noverlays = [\"overlays/two.nix\"]\n[local-packages]\nprobe = \"pkgs/probe.nix\"\n",
    );
}

#[test]
fn profile_overlays_apply_in_order_to_the_offline_set_and_to_nixpkgs() {
    let scratch = common::scratch_repo();
    write_overlay_profile(scratch.path());
    let fixture = fixture().display().to_string();
    for extra in [vec![], vec!["--nixpkgs", fixture.as_str()]] {
        let mut args = vec!["eval", "--profile", "team", "--json"];
        args.extend(&extra);
        let out = xtask(scratch.path(), &args);
        assert!(out.status.success(), "{args:?}: {}", last_line(&out));
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let drv = |a: &str| -> String {
            r["items"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["attribute"] == a)
                .unwrap_or_else(|| panic!("{args:?}: no {a} in {r}"))["drv_path"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert!(
            drv("team-tool").ends_with("-team-tool-1.2.drv"),
            "{args:?}: {r}"
        );
        assert!(drv("probe").ends_with("-probe-1.2.drv"), "{args:?}: {r}");
    }
}

#[test]
fn a_file_that_is_not_an_overlay_is_a_one_line_error() {
    let scratch = common::scratch_repo();
    write_overlay_profile(scratch.path());
    for (text, what) in [
        ("{ teamVersion = \"3\"; }\n", "is not a function"),
        (
            "final: { teamVersion = \"3\"; }\n",
            "takes one argument, not two",
        ),
        ("final: prev: [ ]\n", "does not return an attribute set"),
    ] {
        std::fs::write(scratch.path().join("overlays/two.nix"), text).unwrap();
        let out = xtask(scratch.path(), &["eval", "--profile", "team"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
        assert_eq!(errors.len(), 1, "{err}");
        let want = format!(
            "profiles/team.toml: key 'overlays': overlays/two.nix {what} (an overlay is `final: prev: {{ ... }}`)"
        );
        assert!(errors[0].ends_with(&want), "{err}");
    }
}
