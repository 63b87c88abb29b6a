//! Selection, pruning, dropping, stripping and verification over a fake Nix store made by
//! the tests: small C programs and libraries compiled with gcc (interpreters and RUNPATHs
//! pointing into `/nix/store`), scripts and symlinks, laid out under
//! `<tmp>/nix/store/<hash>-<name>`. The fake glibc is a copy of the host's `libc.so.6` and
//! `ld-linux-x86-64.so.2`. binutils' `strip` and `readelf` are oracles; a few tests also
//! look at the real store files of the offline package set (they need
//! `cargo xtask build --board qemu-x86_64` to have run).

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use rootfs::{
    populate, select, strip_bytes, verify, DropRule, Error, KeptKind, Node, Policy, PruneClass,
    Root, SelectSpec, Selection, Source, StripAction, StripModules, StripOptions, Tree,
};

const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";

/// A deterministic store hash for a name.
fn hash(name: &str) -> String {
    let mut state: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        state = (state ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    (0..32)
        .map(|i| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407 + i);
            ALPHABET[(state >> 59) as usize] as char
        })
        .collect()
}

struct Store {
    dir: tempfile::TempDir,
    src: tempfile::TempDir,
}

impl Store {
    fn new() -> Store {
        let store = Store {
            dir: tempfile::tempdir().unwrap(),
            src: tempfile::tempdir().unwrap(),
        };
        fs::create_dir_all(store.dir.path().join("nix/store")).unwrap();
        store
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Creates store path `name` (a directory) and returns `/nix/store/<hash>-<name>`.
    fn sp(&self, name: &str) -> String {
        let sp = format!("/nix/store/{}-{name}", hash(name));
        fs::create_dir_all(self.host(&sp)).unwrap();
        sp
    }

    fn host(&self, image: &str) -> PathBuf {
        self.root().join(image.trim_start_matches('/'))
    }

    fn write(&self, image: &str, data: impl AsRef<[u8]>, mode: u32) {
        let host = self.host(image);
        fs::create_dir_all(host.parent().unwrap()).unwrap();
        fs::write(&host, data).unwrap();
        fs::set_permissions(&host, fs::Permissions::from_mode(mode)).unwrap();
    }

    fn symlink(&self, image: &str, target: &str) {
        let host = self.host(image);
        fs::create_dir_all(host.parent().unwrap()).unwrap();
        symlink(target, host).unwrap();
    }

    fn closure(&self) -> Vec<String> {
        let mut out: Vec<String> = fs::read_dir(self.root().join("nix/store"))
            .unwrap()
            .map(|e| format!("/nix/store/{}", e.unwrap().file_name().to_str().unwrap()))
            .collect();
        out.sort();
        out
    }

    /// A glibc store path holding copies of the host's libc and dynamic loader.
    fn glibc(&self) -> String {
        let sp = self.sp("glibc-2.36");
        for (from, to) in [
            ("/lib/x86_64-linux-gnu/libc.so.6", "lib/libc.so.6"),
            ("/lib64/ld-linux-x86-64.so.2", "lib/ld-linux-x86-64.so.2"),
        ] {
            let dest = self.host(&format!("{sp}/{to}"));
            fs::create_dir_all(dest.parent().unwrap()).unwrap();
            if !dest.exists() {
                fs::copy(from, &dest).unwrap();
            }
        }
        sp
    }

    /// Writes a C source file for the compiler and returns its path.
    fn source(&self, name: &str, text: &str) -> PathBuf {
        let path = self.src.path().join(name);
        fs::write(&path, text).unwrap();
        path
    }

    /// Compiles with gcc; `out` is an image path in the store; returns its host path.
    fn cc(&self, out: &str, args: &[&str]) -> PathBuf {
        let host = self.host(out);
        fs::create_dir_all(host.parent().unwrap()).unwrap();
        run_ok(Command::new("gcc").arg("-o").arg(&host).args(args));
        host
    }

    /// A program linked against `libs` (`-L dir -l:name`) with the fake glibc's loader.
    fn program(&self, out: &str, source: &Path, glibc: &str, link: &[String]) -> PathBuf {
        let interp = format!("-Wl,--dynamic-linker={glibc}/lib/ld-linux-x86-64.so.2");
        let mut args: Vec<String> = vec![source.display().to_string(), interp];
        args.extend(link.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.cc(out, &args)
    }

    /// `libNAME.so.1` with soname `libNAME.so.1`, returning `VALUE` from `NAME()`.
    fn library(&self, out: &str, name: &str, value: &str, extra: &[&str]) -> PathBuf {
        let src = self.source(
            &format!("{name}-{}.c", hash(out)),
            &format!("const char *{name}(void) {{ return \"{value}\"; }}\n"),
        );
        let soname = format!("-Wl,-soname,lib{name}.so.1");
        let mut args = vec!["-shared", "-fPIC", &soname, src.to_str().unwrap()];
        args.extend_from_slice(extra);
        self.cc(out, &args)
    }

    fn select(&self, roots: &[Root], policy: &Policy) -> rootfs::Result<Selection> {
        let closure = self.closure();
        select(&SelectSpec {
            store_root: self.root(),
            closure: &closure,
            roots,
            policy,
        })
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn problems(err: Error) -> Vec<String> {
    match err {
        Error::Problems { problems, .. } => problems.iter().map(|p| p.to_string()).collect(),
        other => panic!("expected problems, got {other}"),
    }
}

fn files(sel: &Selection) -> BTreeSet<String> {
    sel.entries
        .iter()
        .filter(|(_, k)| !matches!(k.kind, KeptKind::Dir))
        .map(|(p, _)| p.clone())
        .collect()
}

const USE_FOO: &str =
    "#include <stdio.h>\nconst char *foo(void);\nint main(void) { puts(foo()); return 0; }\n";

/// Two programs of two store paths both need glibc: the selection keeps the first referrer as
/// the reason and the other in `also`, so every chain into glibc is known; references from
/// inside one store path are not recorded twice.
#[test]
fn every_referrer_from_another_store_path_is_recorded() {
    let s = Store::new();
    let glibc = s.glibc();
    let hello = "#include <stdio.h>\nint main(void) { puts(\"hi\"); return 0; }\n";
    let src = s.source("hi.c", hello);
    let (one, two) = (s.sp("one-1.0"), s.sp("two-2.0"));
    let rpath = format!("-Wl,-rpath,{glibc}/lib");
    for (sp, name) in [(&one, "one"), (&one, "one-b"), (&two, "two")] {
        s.program(
            &format!("{sp}/bin/{name}"),
            &src,
            &glibc,
            std::slice::from_ref(&rpath),
        );
    }
    let roots = [
        Root::new(format!("{one}/bin"), "package one"),
        Root::new(format!("{two}/bin"), "package two"),
    ];
    let sel = s.select(&roots, &Policy::default()).unwrap();
    for lib in ["libc.so.6", "ld-linux-x86-64.so.2"] {
        let path = format!("{glibc}/lib/{lib}");
        let first = sel.entries[&path].reason.from.clone().unwrap();
        let also: Vec<String> = sel.also[&path]
            .iter()
            .filter_map(|r| r.from.clone())
            .collect();
        let mut all = vec![first.clone()];
        all.extend(also.iter().cloned());
        assert!(all.contains(&format!("{one}/bin/one")), "{lib}: {all:?}");
        assert!(all.contains(&format!("{two}/bin/two")), "{lib}: {all:?}");
        // one-b is in the same store path as one: it leads into glibc too, and is a chain of
        // its own, but never the first reason repeated.
        assert!(
            !also.contains(&first),
            "{lib}: the first reason again in {also:?}"
        );
    }
    let json = serde_json::to_string(&sel).unwrap();
    assert!(json.contains("\"also\":{"), "{json}");
}

#[test]
fn runpath_order_origin_and_the_loaded_interpreter() {
    let s = Store::new();
    let glibc = s.glibc();
    let a = s.sp("foo-a");
    let b = s.sp("foo-b");
    let app = s.sp("app");
    s.library(&format!("{a}/lib/libfoo.so.1"), "foo", "a", &[]);
    s.library(&format!("{b}/lib/libfoo.so.1"), "foo", "b", &[]);
    let main = s.source("app.c", USE_FOO);
    s.program(
        &format!("{app}/bin/app"),
        &main,
        &glibc,
        &[
            format!("-L{}", s.host(&format!("{a}/lib")).display()),
            "-l:libfoo.so.1".into(),
            "-Wl,--enable-new-dtags".into(),
            format!("-Wl,-rpath,{a}/lib:{b}/lib:{glibc}/lib"),
        ],
    );
    // $ORIGIN and ${ORIGIN}, in the program's own store path.
    s.library(&format!("{app}/lib/libbar.so.1"), "bar", "bar", &[]);
    let main2 = s.source(
        "app2.c",
        "#include <stdio.h>\nconst char *bar(void);\nint main(void) { puts(bar()); return 0; }\n",
    );
    for (name, origin) in [("app2", "$ORIGIN"), ("app3", "${ORIGIN}")] {
        s.program(
            &format!("{app}/libexec/{name}"),
            &main2,
            &glibc,
            &[
                format!("-L{}", s.host(&format!("{app}/lib")).display()),
                "-l:libbar.so.1".into(),
                "-Wl,--enable-new-dtags".into(),
                format!("-Wl,-rpath,{origin}/../lib:{glibc}/lib"),
            ],
        );
    }
    let unused = s.sp("unused-1.0");
    s.write(&format!("{unused}/bin/x"), "x", 0o755);

    let roots = [
        Root::new(format!("{app}/bin"), "package app"),
        Root::new(format!("{app}/libexec/app2"), "service two"),
        Root::new(format!("{app}/libexec/app3"), "service three"),
    ];
    let sel = s.select(&roots, &Policy::default()).unwrap();
    let kept = files(&sel);
    assert!(kept.contains(&format!("{a}/lib/libfoo.so.1")), "{kept:#?}");
    assert!(
        !kept.contains(&format!("{b}/lib/libfoo.so.1")),
        "first RUNPATH dir wins"
    );
    assert!(kept.contains(&format!("{app}/lib/libbar.so.1")));
    assert!(kept.contains(&format!("{glibc}/lib/libc.so.6")));
    assert!(kept.contains(&format!("{glibc}/lib/ld-linux-x86-64.so.2")));

    // foo-b is only named by a RUNPATH: its top directory stays, no file of it.
    let info = &sel.store_paths[&b];
    assert!(info.kept && info.kept_files == 0, "{info:?}");
    assert!(info.stub_because.is_some());
    assert_eq!(sel.vanished_store_paths(), [unused.as_str()]);

    // why: libc.so.6 ← DT_NEEDED of libfoo (first reached) or app ← root.
    let chain = sel.why(&format!("{glibc}/lib/libc.so.6"));
    let last = chain.last().unwrap();
    assert_eq!(last.1.to_string(), "root: package app");
    assert!(
        chain[0]
            .1
            .to_string()
            .starts_with("DT_NEEDED libc.so.6 from "),
        "{chain:?}"
    );
    let interp = sel.why(&format!("{glibc}/lib/ld-linux-x86-64.so.2"));
    assert_eq!(
        interp[0].1.to_string(),
        format!("interpreter from {app}/bin/app")
    );

    // The selection serializes (for `why` and size reports).
    let json = serde_json::to_string(&sel).unwrap();
    assert!(
        json.contains("\"how\":\"needed\",\"detail\":\"libc.so.6\""),
        "{json}"
    );

    // The whole flow: populate (stripping), verify.
    let mut tree = Tree::new();
    let report = populate(&mut tree, &sel, &Policy::default()).unwrap();
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    verify(&tree, &Policy::default()).unwrap();
    let sizes = &report.sizes;
    let app_size = sizes
        .store_paths
        .iter()
        .find(|p| p.store_path == app)
        .unwrap();
    assert!(app_size.image_bytes < app_size.kept_bytes, "{app_size:?}");
    let regular = sel
        .entries
        .values()
        .filter(|k| matches!(k.kind, KeptKind::File { .. }))
        .count();
    assert_eq!(sizes.totals.kept_files, regular as u64);
}

#[test]
fn rpath_when_there_is_no_runpath_and_rpath_inheritance() {
    let s = Store::new();
    let glibc = s.glibc();
    let dep = s.sp("dep");
    let mid = s.sp("mid");
    let app = s.sp("app-rpath");
    s.library(&format!("{dep}/lib/libdep.so.1"), "dep", "dep", &[]);
    // libmid needs libdep but has neither RUNPATH nor RPATH: found through the RPATH of
    // the program that loads it, like ld.so does.
    let mid_src = s.source(
        "mid.c",
        "const char *dep(void);\nconst char *foo(void) { return dep(); }\n",
    );
    s.cc(
        &format!("{mid}/lib/libfoo.so.1"),
        &[
            "-shared",
            "-fPIC",
            "-Wl,-soname,libfoo.so.1",
            mid_src.to_str().unwrap(),
            &format!("-L{}", s.host(&format!("{dep}/lib")).display()),
            "-l:libdep.so.1",
        ],
    );
    let main = s.source("app.c", USE_FOO);
    let exe = s.program(
        &format!("{app}/bin/app"),
        &main,
        &glibc,
        &[
            format!("-L{}", s.host(&format!("{mid}/lib")).display()),
            "-l:libfoo.so.1".into(),
            "-Wl,--disable-new-dtags".into(),
            format!("-Wl,-rpath,{mid}/lib:{dep}/lib:{glibc}/lib"),
            format!(
                "-Wl,-rpath-link,{}",
                s.host(&format!("{dep}/lib")).display()
            ),
        ],
    );
    let dynamic = run_ok(Command::new("readelf").arg("-d").arg(&exe));
    assert!(
        dynamic.contains("(RPATH)") && !dynamic.contains("(RUNPATH)"),
        "{dynamic}"
    );

    let sel = s
        .select(
            &[Root::new(format!("{app}/bin/app"), "test")],
            &Policy::default(),
        )
        .unwrap();
    let kept = files(&sel);
    assert!(kept.contains(&format!("{mid}/lib/libfoo.so.1")));
    assert!(
        kept.contains(&format!("{dep}/lib/libdep.so.1")),
        "{kept:#?}"
    );
    let why = sel.why(&format!("{dep}/lib/libdep.so.1"));
    assert_eq!(
        why[0].1.to_string(),
        format!("DT_NEEDED libdep.so.1 from {mid}/lib/libfoo.so.1")
    );

    // With RUNPATH in the program instead, the inherited RPATH does not apply: an error
    // naming the library and the (empty) search path of the object that needs it.
    let exe2 = s.program(
        &format!("{app}/bin/app2"),
        &main,
        &glibc,
        &[
            format!("-L{}", s.host(&format!("{mid}/lib")).display()),
            "-l:libfoo.so.1".into(),
            "-Wl,--enable-new-dtags".into(),
            format!("-Wl,-rpath,{mid}/lib:{dep}/lib:{glibc}/lib"),
            format!(
                "-Wl,-rpath-link,{}",
                s.host(&format!("{dep}/lib")).display()
            ),
        ],
    );
    assert!(exe2.exists());
    let err = s
        .select(
            &[Root::new(format!("{app}/bin/app2"), "test")],
            &Policy::default(),
        )
        .unwrap_err();
    assert_eq!(
        problems(err),
        [format!(
            "{mid}/lib/libfoo.so.1: library libdep.so.1 not found in no RUNPATH or RPATH"
        )]
    );
}

#[test]
fn missing_library_is_an_error_naming_binary_and_library_unless_allowed() {
    let s = Store::new();
    let glibc = s.glibc();
    let gone = s.sp("gone");
    let app = s.sp("needy");
    s.library(&format!("{gone}/lib/libbar.so.1"), "bar", "x", &[]);
    let main = s.source(
        "app.c",
        "#include <stdio.h>\nconst char *bar(void);\nint main(void) { puts(bar()); return 0; }\n",
    );
    s.program(
        &format!("{app}/bin/foo"),
        &main,
        &glibc,
        &[
            format!("-L{}", s.host(&format!("{gone}/lib")).display()),
            "-l:libbar.so.1".into(),
            "-Wl,--enable-new-dtags".into(),
            format!(
                "-Wl,-rpath,/nix/store/{}-a/lib:{gone}/lib:{glibc}/lib",
                hash("a")
            ),
        ],
    );
    fs::remove_file(s.host(&format!("{gone}/lib/libbar.so.1"))).unwrap();
    let roots = [Root::new(format!("{app}/bin"), "package needy")];
    let err = s.select(&roots, &Policy::default()).unwrap_err();
    assert_eq!(
        problems(err),
        [format!(
            "{app}/bin/foo: library libbar.so.1 not found in RUNPATH \
             /nix/store/{}-a/lib:{gone}/lib:{glibc}/lib",
            hash("a")
        )]
    );
    let policy: Policy = toml::from_str("allow-missing = [\"libbar.so.1\"]").unwrap();
    let sel = s.select(&roots, &policy).unwrap();
    assert!(sel
        .warnings
        .iter()
        .any(|w| w.to_string().contains("library libbar.so.1 not found")));
}

#[test]
fn symlink_chains_with_relative_and_absolute_targets() {
    let s = Store::new();
    let pkg = s.sp("links");
    let other = s.sp("other");
    s.write(&format!("{other}/share/c"), "#!/bin/sh\necho c\n", 0o755);
    s.write(&format!("{other}/share/unrelated"), "x", 0o644);
    s.symlink(&format!("{pkg}/bin/a"), "b");
    s.symlink(&format!("{pkg}/bin/b"), &format!("{other}/lib64/c"));
    s.symlink(&format!("{other}/lib64"), "share"); // a symlinked directory on the way
    s.symlink(
        &format!("{pkg}/bin/dangling"),
        &format!("{other}/share/nope"),
    );
    s.symlink(&format!("{pkg}/etc/service"), "/run/service"); // outside the store: kept as is

    let sel = s
        .select(
            &[Root::new(format!("{pkg}/bin/a"), "test")],
            &Policy::default(),
        )
        .unwrap();
    let kept = files(&sel);
    let want: BTreeSet<String> = [
        format!("{pkg}/bin/a"),
        format!("{pkg}/bin/b"),
        format!("{other}/lib64"),
        format!("{other}/share/c"),
    ]
    .into();
    assert_eq!(kept, want);
    match &sel.entries[&format!("{pkg}/bin/b")].kind {
        KeptKind::Symlink { target } => assert_eq!(target, &format!("{other}/lib64/c")),
        k => panic!("{k:?}"),
    }
    let why: Vec<String> = sel
        .why(&format!("{other}/share/c"))
        .iter()
        .map(|(p, r)| format!("{p}: {r}"))
        .collect();
    assert_eq!(
        why,
        [
            format!("{other}/share/c: symlink target from {pkg}/bin/b"),
            format!("{pkg}/bin/b: symlink target from {pkg}/bin/a"),
            format!("{pkg}/bin/a: root: test"),
        ]
    );

    let err = s
        .select(&[Root::new(pkg.clone(), "whole")], &Policy::default())
        .unwrap_err();
    assert_eq!(
        problems(err),
        [format!(
            "{pkg}/bin/dangling: symlink target {other}/share/nope does not exist"
        )]
    );
    let policy = Policy {
        allow_dangling: vec![format!("{pkg}/bin/dangling")],
        ..Policy::default()
    };
    let sel = s
        .select(&[Root::new(pkg.clone(), "whole")], &policy)
        .unwrap();
    assert!(sel.entries.contains_key(&format!("{pkg}/etc/service")));

    // Loops are errors, not hangs.
    s.symlink(&format!("{pkg}/loop/x"), "y");
    s.symlink(&format!("{pkg}/loop/y"), "x");
    let err = s
        .select(
            &[Root::new(format!("{pkg}/loop/x"), "loop")],
            &Policy::default(),
        )
        .unwrap_err();
    assert!(problems(err)[0].contains("too many levels of symlinks"));
}

#[test]
fn script_shebang_and_body_references_are_followed() {
    let s = Store::new();
    let shell = s.sp("busybox");
    let data = s.sp("data");
    let scripts = s.sp("scripts");
    s.write(&format!("{shell}/bin/busybox"), "not really", 0o755);
    s.symlink(&format!("{shell}/bin/sh"), "busybox");
    s.write(&format!("{shell}/bin/other"), "unused", 0o755);
    s.write(&format!("{data}/share/data.txt"), "data", 0o644);
    s.write(&format!("{data}/share/conf.d/a.conf"), "a", 0o644);
    s.write(&format!("{data}/share/conf.d/b.conf"), "b", 0o644);
    s.write(&format!("{data}/share/unused.txt"), "unused", 0o644);
    s.write(
        &format!("{scripts}/bin/run"),
        format!(
            "#!{shell}/bin/sh -e\ncat {data}/share/data.txt\nfor f in {data}/share/conf.d/*; do :; done\n"
        ),
        0o755,
    );
    let sel = s
        .select(
            &[Root::new(format!("{scripts}/bin/run"), "service run")],
            &Policy::default(),
        )
        .unwrap();
    let kept = files(&sel);
    let want: BTreeSet<String> = [
        format!("{scripts}/bin/run"),
        format!("{shell}/bin/sh"),
        format!("{shell}/bin/busybox"),
        format!("{data}/share/data.txt"),
        format!("{data}/share/conf.d/a.conf"),
        format!("{data}/share/conf.d/b.conf"),
    ]
    .into();
    assert_eq!(kept, want);
    assert_eq!(
        sel.why(&format!("{shell}/bin/sh"))[0].1.to_string(),
        format!("#! interpreter from {scripts}/bin/run")
    );
    assert_eq!(
        sel.why(&format!("{data}/share/data.txt"))[0].1.to_string(),
        format!("text reference from {scripts}/bin/run")
    );
}

#[test]
fn composed_files_give_roots_and_the_flow_verifies() {
    let s = Store::new();
    let shell = s.sp("busybox");
    let svc = s.sp("service");
    s.write(&format!("{shell}/bin/busybox"), "bb", 0o755);
    s.symlink(&format!("{shell}/bin/sh"), "busybox");
    s.symlink(&format!("{shell}/bin/ls"), "busybox");
    s.write(&format!("{svc}/bin/daemon"), "#!/bin/sh\n", 0o755);
    s.write(&format!("{svc}/share/unused"), "x", 0o644);

    // What compose would add: links into the store and a generated script.
    let mut tree = Tree::new();
    tree.insert("bin/sh", Node::symlink(format!("{shell}/bin/sh")))
        .unwrap();
    tree.insert(
        "etc/sv/daemon/run",
        Node::file(
            Source::Bytes(format!("#!/bin/sh\nexec {svc}/bin/daemon -f\n").into_bytes()),
            0o755,
        ),
    )
    .unwrap();
    let roots = rootfs::roots_from_tree(&tree).unwrap();
    let listed: Vec<String> = roots
        .iter()
        .map(|r| format!("{} ({})", r.path, r.reason))
        .collect();
    assert_eq!(
        listed,
        [
            format!("{shell}/bin/sh (referenced by /bin/sh)"),
            format!("{svc}/bin/daemon (referenced by /etc/sv/daemon/run)"),
        ]
    );
    let sel = s.select(&roots, &Policy::default()).unwrap();
    populate(&mut tree, &sel, &Policy::default()).unwrap();
    verify(&tree, &Policy::default()).unwrap();
    assert!(tree.contains(format!("{}/bin/busybox", &shell[1..])));
    assert!(!tree.contains(format!("{}/bin/ls", &shell[1..])));
    assert!(!tree.contains(format!("{}/share/unused", &svc[1..])));
    assert_eq!(
        tree.get(format!("{}/bin", &shell[1..]))
            .unwrap()
            .owner
            .as_deref(),
        Some(shell.as_str())
    );
}

#[test]
fn verify_lists_every_dangling_reference() {
    let s = Store::new();
    let a = s.sp("a");
    let gone = s.sp("gone");
    let gone2 = s.sp("gone-too");
    s.write(
        &format!("{a}/bin/a"),
        format!("#!/bin/sh\n# {gone2}/x\n"),
        0o755,
    );
    let sel = s
        .select(
            &[Root::new(format!("{a}/bin/a"), "test")],
            &Policy::default(),
        )
        .unwrap();
    // gone-too does not exist as a file: a warning, and its store path stays as a stub.
    assert!(sel.store_paths[&gone2].kept);
    let mut tree = Tree::new();
    populate(&mut tree, &sel, &Policy::default()).unwrap();
    verify(&tree, &Policy::default()).unwrap();

    // Generated files are scanned too; gone vanished from the image.
    tree.insert(
        "etc/bonsai/run",
        Node::file(
            Source::Bytes(format!("exec {gone}/bin/x\n").into_bytes()),
            0o755,
        ),
    )
    .unwrap();
    tree.insert("bin/link", Node::symlink(format!("{gone}/bin/y")))
        .unwrap();
    let err = verify(&tree, &Policy::default()).unwrap_err();
    assert_eq!(
        problems(err),
        [
            format!("/bin/link: refers to {gone}, which is not in the image"),
            format!("/etc/bonsai/run: refers to {gone}, which is not in the image"),
        ]
    );
}

#[test]
fn drop_breaks_references_or_rewrites_them() {
    let s = Store::new();
    let glibc = s.glibc();
    let big = s.sp("linux-headers-6.1");
    let app = s.sp("app");
    s.write(&format!("{big}/share/data"), "x", 0o644);
    let src = s.source(
        "drop.c",
        &format!(
            "#include <stdio.h>\nconst char *path = \"{big}/share/data\";\nint main(void) {{ puts(path); return 0; }}\n"
        ),
    );
    let exe = s.program(
        &format!("{app}/bin/app"),
        &src,
        &glibc,
        &[format!("-Wl,-rpath,{glibc}/lib")],
    );
    let original = fs::read(&exe).unwrap();
    let roots = [Root::new(format!("{app}/bin/app"), "test")];

    let policy: Policy = toml::from_str("drop = [\"*-linux-headers-*\"]").unwrap();
    let err = s.select(&roots, &policy).unwrap_err();
    let lines = problems(err);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].starts_with(&format!(
            "{app}/bin/app: text reference to {big}, which is dropped"
        )),
        "{lines:?}"
    );

    let policy: Policy =
        toml::from_str("drop = [{ path = \"/nix/store/*-linux-headers-*\", rewrite = true }]")
            .unwrap();
    let sel = s.select(&roots, &policy).unwrap();
    assert!(!sel.store_paths[&big].kept);
    assert!(sel.store_paths[&big].dropped);
    let mut tree = Tree::new();
    let report = populate(&mut tree, &sel, &policy).unwrap();
    assert_eq!(
        report.rewritten[&format!("{app}/bin/app")],
        std::slice::from_ref(&big),
        "the manifest can say which files were rewritten"
    );
    let node = tree.get(format!("{}/bin/app", &app[1..])).unwrap();
    let rootfs::NodeKind::File {
        source: Source::Bytes(bytes),
    } = &node.kind
    else {
        panic!("{node:?}")
    };
    let out_path = s.src.path().join("rewritten");
    fs::write(&out_path, bytes).unwrap();
    fs::set_permissions(&out_path, fs::Permissions::from_mode(0o755)).unwrap();
    let text = String::from_utf8_lossy(bytes);
    assert!(!text.contains(&big));
    let rewritten = big.replace(
        &hash("linux-headers-6.1"),
        "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee",
    );
    assert!(text.contains(&format!("{rewritten}/share/data")));
    // Same length before stripping, and still a valid program that prints the new string.
    let unstripped = {
        let mut data = original.clone();
        let n =
            rootfs::refs::rewrite_hashes(&mut data, &BTreeSet::from([hash("linux-headers-6.1")]));
        assert_eq!(n, 1);
        data
    };
    assert_eq!(unstripped.len(), original.len());
    readelf_clean(&out_path);
    let printed = run_ok(Command::new("/lib64/ld-linux-x86-64.so.2").arg(&out_path));
    assert_eq!(printed.trim(), format!("{rewritten}/share/data"));
    verify(&tree, &policy).unwrap();

    // A library that is only in a dropped store path: the program cannot run.
    let libs = s.sp("libs-only");
    s.library(&format!("{libs}/lib/libfoo.so.1"), "foo", "x", &[]);
    let main = s.source("app.c", USE_FOO);
    s.program(
        &format!("{app}/bin/needs"),
        &main,
        &glibc,
        &[
            format!("-L{}", s.host(&format!("{libs}/lib")).display()),
            "-l:libfoo.so.1".into(),
            format!("-Wl,-rpath,{libs}/lib:{glibc}/lib"),
        ],
    );
    let policy: Policy =
        toml::from_str("drop = [{ path = \"*-libs-only\", rewrite = true }]").unwrap();
    let err = s
        .select(&[Root::new(format!("{app}/bin/needs"), "t")], &policy)
        .unwrap_err();
    assert_eq!(
        problems(err),
        [format!(
            "{app}/bin/needs: library libfoo.so.1 not found in RUNPATH {libs}/lib:{glibc}/lib \
             (only in dropped {libs})"
        )]
    );
}

#[test]
fn prune_classes_and_keep_lists() {
    let s = Store::new();
    let pkg = s.sp("misc-1.0");
    let files_in = [
        ("bin/tool", "tool"),
        ("share/doc/misc/README", "doc"),
        ("share/doc-base/misc", "doc"),
        ("share/man/man1/tool.1.gz", "man"),
        ("share/info/misc.info", "info"),
        ("include/misc.h", "header"),
        ("lib/libmisc.a", "static"),
        ("lib/libmisc.la", "libtool"),
        ("lib/pkgconfig/misc.pc", "pc"),
        ("lib/cmake/misc/misc.cmake", "cmake"),
        ("share/locale/de/LC_MESSAGES/misc.mo", "de"),
        ("share/locale/fr/LC_MESSAGES/misc.mo", "fr"),
        ("lib/locale/C.utf8/LC_CTYPE", "c"),
        ("lib/locale/de_DE.utf8/LC_CTYPE", "de"),
        ("lib/gconv/UTF-16.so", "utf16"),
        ("lib/gconv/IBM880.so", "ibm"),
        ("lib/gconv/gconv-modules", "conf"),
        ("lib/gconv/gconv-modules.d/extra.conf", "conf"),
        ("share/terminfo/l/linux", "linux"),
        ("share/terminfo/a/ansi", "ansi"),
        ("share/bash-completion/completions/tool", "compl"),
        ("share/lintian/overrides/misc", "lint"),
        ("share/misc/data", "data"),
    ];
    for (rel, text) in files_in {
        s.write(&format!("{pkg}/{rel}"), text, 0o644);
    }
    let policy: Policy = toml::from_str("keep-gconv = [\"UTF-16\"]").unwrap();
    let sel = s
        .select(&[Root::new(pkg.clone(), "whole package")], &policy)
        .unwrap();
    let kept: BTreeSet<String> = files(&sel)
        .iter()
        .map(|p| p.strip_prefix(&format!("{pkg}/")).unwrap().to_owned())
        .collect();
    let want: BTreeSet<String> = [
        "bin/tool",
        "lib/locale/C.utf8/LC_CTYPE",
        "lib/gconv/UTF-16.so",
        "lib/gconv/gconv-modules",
        "lib/gconv/gconv-modules.d/extra.conf",
        "share/terminfo/l/linux",
        "share/misc/data",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(kept, want);
    assert!(
        !sel.entries.contains_key(&format!("{pkg}/share/doc")),
        "no empty shells"
    );
    assert_eq!(sel.pruned["docs"].files, 2);
    assert_eq!(sel.pruned["locales"].files, 3);
    assert_eq!(sel.pruned["static-libs"].bytes, 13);

    // Without kept modules the gconv configuration goes too; keep-classes turns a class off.
    let policy: Policy =
        toml::from_str("keep-classes = [\"man\"]\nkeep-locales = [\"de_DE.UTF-8\"]").unwrap();
    let sel = s
        .select(&[Root::new(pkg.clone(), "whole")], &policy)
        .unwrap();
    let kept = files(&sel);
    assert!(kept.contains(&format!("{pkg}/share/man/man1/tool.1.gz")));
    assert!(kept.contains(&format!("{pkg}/share/locale/de/LC_MESSAGES/misc.mo")));
    assert!(kept.contains(&format!("{pkg}/lib/locale/de_DE.utf8/LC_CTYPE")));
    assert!(!kept.contains(&format!("{pkg}/lib/gconv/gconv-modules")));

    // A kept file that refers to a pruned file is an error naming both.
    let user = s.sp("user");
    s.write(
        &format!("{user}/bin/show-doc"),
        format!("#!/bin/sh\ncat {pkg}/share/doc/misc/README\n"),
        0o755,
    );
    let roots = [Root::new(format!("{user}/bin/show-doc"), "test")];
    let err = s.select(&roots, &Policy::default()).unwrap_err();
    assert_eq!(
        problems(err),
        [format!(
            "{user}/bin/show-doc: text reference to {pkg}/share/doc/misc/README, which is pruned by class docs"
        )]
    );
    let policy = Policy {
        allow_dangling: vec!["/nix/store/*/share/doc/**".into()],
        ..Policy::default()
    };
    s.select(&roots, &policy).unwrap();
    // prune-globs drop more; keep globs win over classes.
    let policy: Policy = toml::from_str(&format!(
        "prune-globs = [\"{pkg}/share/misc/**\"]\nkeep = [\"/nix/store/*-misc-*/share/man/**/*.gz\"]"
    ))
    .unwrap();
    let sel = s
        .select(&[Root::new(pkg.clone(), "whole")], &policy)
        .unwrap();
    let kept = files(&sel);
    assert!(!kept.contains(&format!("{pkg}/share/misc/data")));
    assert!(kept.contains(&format!("{pkg}/share/man/man1/tool.1.gz")));
    assert_eq!(sel.pruned[&format!("glob {pkg}/share/misc/**")].files, 1);
}

#[test]
fn dlopen_notes_are_resolved_by_priority() {
    let s = Store::new();
    let glibc = s.glibc();
    let plugins = s.sp("plugins");
    let app = s.sp("dl-app");
    s.library(&format!("{plugins}/lib/libplug.so.1"), "plug", "p", &[]);
    s.library(&format!("{plugins}/lib/libsugg.so.1"), "sugg", "s", &[]);
    s.library(&format!("{plugins}/lib/libalt.so.2"), "alt", "a", &[]);
    let note = |json: &str| {
        let escaped = json.replace('"', "\\\"");
        format!(
            "#define JSON \"{escaped}\"\n\
             struct note {{ unsigned n_namesz, n_descsz, n_type; char name[4]; char desc[(sizeof(JSON) + 3) & ~3]; }};\n\
             __attribute__((used, section(\".note.dlopen\"), aligned(4))) static const struct note dlopen_note = {{ 4, sizeof(JSON), 0x407c0c0a, \"FDO\", JSON }};\n\
             int main(void) {{ return 0; }}\n"
        )
    };
    let json = r#"[{"feature":"plug","description":"plugins","priority":"required","soname":["libplug.so.1"]},{"feature":"alt","priority":"recommended","soname":["libalt.so.1","libalt.so.2"]},{"feature":"nope","soname":["libnope.so.9"]},{"feature":"sugg","priority":"suggested","soname":["libsugg.so.1"]}]"#;
    let src = s.source("dl.c", &note(json));
    let exe = s.program(
        &format!("{app}/bin/app"),
        &src,
        &glibc,
        &[format!("-Wl,-rpath,{plugins}/lib:{glibc}/lib")],
    );
    // readelf exits 1 on note types it does not know, so only its output is looked at.
    let notes = Command::new("readelf")
        .arg("-n")
        .arg(&exe)
        .output()
        .unwrap();
    let notes = String::from_utf8_lossy(&notes.stdout);
    assert!(
        notes.contains(".note.dlopen") && notes.contains("FDO"),
        "{notes}"
    );

    let roots = [Root::new(format!("{app}/bin/app"), "test")];
    let sel = s.select(&roots, &Policy::default()).unwrap();
    let kept = files(&sel);
    assert!(kept.contains(&format!("{plugins}/lib/libplug.so.1")));
    assert!(
        kept.contains(&format!("{plugins}/lib/libalt.so.2")),
        "second alternative"
    );
    assert!(
        !kept.contains(&format!("{plugins}/lib/libsugg.so.1")),
        "below the threshold"
    );
    assert_eq!(
        sel.why(&format!("{plugins}/lib/libplug.so.1"))[0]
            .1
            .to_string(),
        format!("dlopen libplug.so.1 from {app}/bin/app")
    );
    let warnings: Vec<String> = sel.warnings.iter().map(|w| w.to_string()).collect();
    assert!(
        warnings.contains(&format!(
            "{app}/bin/app: dlopen library libnope.so.9 (recommended, feature nope) not found in RUNPATH {plugins}/lib:{glibc}/lib"
        )),
        "{warnings:?}"
    );

    let policy: Policy = toml::from_str("dlopen = \"suggested\"").unwrap();
    let sel = s.select(&roots, &policy).unwrap();
    assert!(files(&sel).contains(&format!("{plugins}/lib/libsugg.so.1")));
    let policy: Policy = toml::from_str("dlopen = \"none\"").unwrap();
    let sel = s.select(&roots, &policy).unwrap();
    assert!(!files(&sel).contains(&format!("{plugins}/lib/libplug.so.1")));

    // A missing required library is an error.
    fs::remove_file(s.host(&format!("{plugins}/lib/libplug.so.1"))).unwrap();
    let err = s.select(&roots, &Policy::default()).unwrap_err();
    assert_eq!(
        problems(err),
        [format!(
            "{app}/bin/app: dlopen library libplug.so.1 (required, feature plug) not found in RUNPATH {plugins}/lib:{glibc}/lib"
        )]
    );
}

/// `readelf -a -W` exits 0 and prints nothing on stderr.
fn readelf_clean(path: &Path) {
    let out = Command::new("readelf")
        .args(["-a", "-W"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "readelf -a {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn section_names(path: &Path) -> Vec<String> {
    let out = run_ok(Command::new("readelf").args(["-S", "-W"]).arg(path));
    out.lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l.strip_prefix('[')?;
            let (_, rest) = rest.split_once(']')?;
            rest.split_whitespace().next().map(str::to_owned)
        })
        .collect()
}

/// Strips `input` ourselves and with binutils, checks ours, returns (ours, binutils) sizes.
fn compare_with_binutils(input: &Path, work: &Path, binutils_flag: &str) -> (u64, u64) {
    let data = fs::read(input).unwrap();
    let out = strip_bytes(&data, &StripOptions::default());
    let name = input.file_name().unwrap().to_str().unwrap();
    let ours = work.join(format!("{name}.ours"));
    let theirs = work.join(format!("{name}.binutils"));
    fs::write(&ours, &out.bytes).unwrap();
    fs::set_permissions(&ours, fs::Permissions::from_mode(0o755)).unwrap();
    run_ok(
        Command::new("strip")
            .arg(binutils_flag)
            .arg("-o")
            .arg(&theirs)
            .arg(input),
    );
    readelf_clean(&ours);
    let names = section_names(&ours);
    assert!(
        !names
            .iter()
            .any(|n| n == ".symtab" || n.starts_with(".debug")),
        "{name}: {names:?}"
    );
    assert_eq!(out.after, fs::metadata(&ours).unwrap().len());
    (out.after, fs::metadata(&theirs).unwrap().len())
}

#[test]
fn strip_gcc_fixtures_like_binutils() {
    let s = Store::new();
    let work = s.src.path().to_owned();
    let prog = s.source(
        "prog.c",
        "#include <stdio.h>\n#include <stdlib.h>\nconst char *lib(void);\n\
         static int square(int x) { return x * x; }\n\
         int main(int argc, char **argv) { printf(\"%s %d\\n\", lib(), square(argc + 6)); return 0; }\n",
    );
    let lib = s.source("lib.c", "const char *lib(void) { return \"from lib\"; }\n");
    let libdir = work.join("lib");
    fs::create_dir_all(&libdir).unwrap();
    let so = libdir.join("libdemo.so.1");
    run_ok(
        Command::new("gcc")
            .args([
                "-g",
                "-O1",
                "-shared",
                "-fPIC",
                "-Wl,-soname,libdemo.so.1",
                "-o",
            ])
            .arg(&so)
            .arg(&lib),
    );
    let mut figures = Vec::new();
    let build = |name: &str, extra: &[&str]| -> PathBuf {
        let out = work.join(name);
        run_ok(
            Command::new("gcc")
                .args(["-g", "-O1", "-o"])
                .arg(&out)
                .arg(&prog)
                .args(extra)
                .arg(format!("-L{}", libdir.display()))
                .arg("-l:libdemo.so.1")
                .arg(format!("-Wl,-rpath,{}", libdir.display())),
        );
        out
    };
    let pie = build("pie", &["-pie", "-fPIE"]);
    let nopie = build("nopie", &["-no-pie"]);
    let expected = run_ok(&mut Command::new(&pie));
    assert_eq!(expected, "from lib 49\n");

    for exe in [&pie, &nopie] {
        let (ours, theirs) = compare_with_binutils(exe, &work, "--strip-all");
        figures.push((
            exe.file_name().unwrap().to_str().unwrap().to_owned(),
            ours,
            theirs,
        ));
        let stripped = work.join(format!(
            "{}.ours",
            exe.file_name().unwrap().to_str().unwrap()
        ));
        assert_eq!(
            run_ok(&mut Command::new(&stripped)),
            expected,
            "the stripped program runs"
        );
        assert!(
            ours as f64 <= theirs as f64 * 1.01,
            "{exe:?}: {ours} vs {theirs}"
        );
    }

    // Shared library: .dynsym stays, and programs still load it.
    let (ours, theirs) = compare_with_binutils(&so, &work, "--strip-all");
    figures.push(("libdemo.so.1".into(), ours, theirs));
    assert!(ours as f64 <= theirs as f64 * 1.01);
    let ours_so = work.join("libdemo.so.1.ours");
    assert!(section_names(&ours_so).contains(&".dynsym".to_owned()));
    let dynsyms = run_ok(
        Command::new("readelf")
            .args(["--dyn-syms", "-W"])
            .arg(&ours_so),
    );
    assert!(dynsyms.contains(" lib"), "{dynsyms}");
    fs::copy(&ours_so, &so).unwrap();
    assert_eq!(run_ok(&mut Command::new(&pie)), expected);

    // Static executable.
    let static_exe = work.join("static");
    let static_src = s.source(
        "static.c",
        "#include <stdio.h>\nint main(void) { puts(\"static\"); return 0; }\n",
    );
    run_ok(
        Command::new("gcc")
            .args(["-g", "-static", "-o"])
            .arg(&static_exe)
            .arg(&static_src),
    );
    let (ours, theirs) = compare_with_binutils(&static_exe, &work, "--strip-all");
    figures.push(("static".into(), ours, theirs));
    assert!(ours as f64 <= theirs as f64 * 1.01);
    assert_eq!(
        run_ok(&mut Command::new(work.join("static.ours"))),
        "static\n"
    );

    // Relocatable (a kernel module's shape): untouched by default, debug only on request.
    let obj = work.join("mod.ko");
    run_ok(
        Command::new("gcc")
            .args(["-g", "-c", "-o"])
            .arg(&obj)
            .arg(&lib),
    );
    let data = fs::read(&obj).unwrap();
    let same = strip_bytes(&data, &StripOptions::default());
    assert_eq!(same.action, StripAction::Unchanged);
    assert_eq!(&*same.bytes, &data[..]);
    let debug = strip_bytes(
        &data,
        &StripOptions {
            modules: StripModules::Debug,
        },
    );
    assert_eq!(debug.action, StripAction::Stripped);
    let stripped_obj = work.join("mod-stripped.ko");
    fs::write(&stripped_obj, &debug.bytes).unwrap();
    readelf_clean(&stripped_obj);
    let names = section_names(&stripped_obj);
    assert!(names.contains(&".symtab".to_owned()), "{names:?}");
    assert!(!names.iter().any(|n| n.contains("debug")), "{names:?}");
    // The object still links into a working program.
    let linked = work.join("linked");
    let main = s.source(
        "main.c",
        "#include <stdio.h>\nconst char *lib(void);\nint main(void) { puts(lib()); return 0; }\n",
    );
    run_ok(
        Command::new("gcc")
            .arg("-o")
            .arg(&linked)
            .arg(&main)
            .arg(&stripped_obj),
    );
    assert_eq!(run_ok(&mut Command::new(&linked)), "from lib\n");
    let binutils_obj = work.join("mod-binutils.ko");
    run_ok(
        Command::new("strip")
            .args(["--strip-debug", "-o"])
            .arg(&binutils_obj)
            .arg(&obj),
    );
    figures.push((
        "mod.ko (debug)".into(),
        debug.after,
        fs::metadata(&binutils_obj).unwrap().len(),
    ));

    for (name, ours, theirs) in figures {
        println!("strip {name}: ours {ours} bytes, binutils {theirs} bytes");
    }
}

/// Files of the offline package set in the real store.
fn real_store_files() -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/nix/store") else {
        return found;
    };
    let mut dirs: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    dirs.sort();
    for dir in dirs {
        let name = dir.file_name().unwrap().to_str().unwrap_or("").to_owned();
        if name.ends_with(".drv") || !dir.is_dir() {
            continue;
        }
        let wanted: &[&str] = if name.contains("-glibc-") {
            &["lib/libc.so.6", "lib/libm.so.6"]
        } else if name.contains("-busybox-") {
            &["bin/busybox"]
        } else if name.ends_with("-hello-1.0") {
            &["bin/hello"]
        } else if name.contains("-runit-") {
            &["bin/runsv", "bin/runsvdir", "bin/sv"]
        } else {
            &[]
        };
        for rel in wanted {
            let path = dir.join(rel);
            if path.is_file() && is_host_elf(&path) {
                found.push(path);
            }
        }
    }
    found
}

/// The store may hold other architectures' packages too (aarch64 boards); binutils here only
/// reads the host's.
fn is_host_elf(path: &Path) -> bool {
    let Ok(bytes) = fs::read(path) else {
        return false;
    };
    let machine = bytes.get(18..20).map(|m| u16::from_le_bytes([m[0], m[1]]));
    let host: u16 = if cfg!(target_arch = "x86_64") {
        62
    } else if cfg!(target_arch = "aarch64") {
        183
    } else {
        0
    };
    bytes.starts_with(b"\x7fELF") && machine == Some(host)
}

#[test]
fn strip_real_store_files_like_binutils() {
    let found = real_store_files();
    assert!(
        !found.is_empty(),
        "no glibc/busybox/hello/runit files in /nix/store: run `cargo xtask build --board qemu-x86_64` first"
    );
    let work = tempfile::tempdir().unwrap();
    for (i, path) in found.iter().enumerate() {
        let sub = work.path().join(i.to_string());
        fs::create_dir_all(&sub).unwrap();
        let (ours, theirs) = compare_with_binutils(path, &sub, "--strip-all");
        let (_, unneeded) = compare_with_binutils(path, &sub, "--strip-unneeded");
        println!(
            "strip {}: {} -> ours {ours}, binutils --strip-all {theirs}, --strip-unneeded {unneeded}",
            path.display(),
            fs::metadata(path).unwrap().len()
        );
        assert!(ours as f64 <= theirs as f64 * 1.01, "{}", path.display());
    }
}

#[test]
fn select_over_the_real_glibc() {
    // A hello built with -g from a source in the store: its debug info names that store path.
    let sources_of = |hello: &Path| -> Vec<String> {
        let bytes = fs::read(hello).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let mut found: Vec<String> = text
            .match_indices("/nix/store/")
            .filter_map(|(i, _)| text.get(i..i + 11 + 32))
            .filter_map(|prefix| {
                fs::read_dir("/nix/store")
                    .ok()?
                    .filter_map(|e| e.ok())
                    .find_map(|e| {
                        let p = e.path().to_str()?.to_owned();
                        (p.starts_with(prefix) && !p.contains("-glibc-") && !p.ends_with(".drv"))
                            .then_some(p)
                    })
            })
            .collect();
        found.sort();
        found.dedup();
        found
    };
    let (hello, sources) = real_store_files()
        .into_iter()
        .filter(|p| p.ends_with("bin/hello"))
        .map(|p| {
            let s = sources_of(&p);
            (p, s)
        })
        .find(|(_, s)| !s.is_empty())
        .expect("no hello built with -g from a store source in /nix/store: run `cargo xtask build --board qemu-x86_64` first");
    let hello_sp = hello
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let mut closure: Vec<String> = fs::read_dir("/nix/store")
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path().to_str().unwrap().to_owned())
        .filter(|p| {
            !p.ends_with(".drv")
                && ((p.contains("-glibc-")
                    && is_host_elf(Path::new(&format!("{p}/lib/libc.so.6"))))
                    || sources.contains(p)
                    || *p == hello_sp)
        })
        .collect();
    closure.sort();
    let roots = [Root::new(format!("{hello_sp}/bin"), "package hello")];
    let sel = select(&SelectSpec {
        store_root: Path::new("/"),
        closure: &closure,
        roots: &roots,
        policy: &Policy::default(),
    })
    .unwrap();
    let kept = files(&sel);
    assert!(
        kept.iter().any(|p| p.ends_with("/lib/libc.so.6")),
        "{kept:#?}"
    );
    assert!(kept
        .iter()
        .any(|p| p.ends_with("/lib/ld-linux-x86-64.so.2")));
    assert!(!kept
        .iter()
        .any(|p| p.contains("/gconv/") || p.contains("/share/")));
    // hello's debug info names its source; stripping removes it, so the source vanishes.
    assert!(sel
        .vanished_store_paths()
        .iter()
        .any(|p| sources.iter().any(|s| s == p)));
    let mut tree = Tree::new();
    let report = populate(&mut tree, &sel, &Policy::default()).unwrap();
    verify(&tree, &Policy::default()).unwrap();
    println!(
        "real hello closure: {} bytes in {} files; kept {} bytes in {} files; image {} bytes",
        report.sizes.totals.closure_bytes,
        report.sizes.totals.closure_files,
        report.sizes.totals.kept_bytes,
        report.sizes.totals.kept_files,
        report.sizes.totals.image_bytes
    );
    // Without stripping, the debug reference keeps the source store path.
    let policy = Policy {
        strip: Some(false),
        ..Policy::default()
    };
    let sel = select(&SelectSpec {
        store_root: Path::new("/"),
        closure: &closure,
        roots: &roots,
        policy: &policy,
    })
    .unwrap();
    assert!(sel
        .kept_store_paths()
        .iter()
        .any(|p| sources.iter().any(|s| s == p)));
}

#[test]
fn truncated_and_corrupt_elf_never_panics() {
    let s = Store::new();
    let glibc = s.glibc();
    let app = s.sp("app");
    let a = s.sp("foo-a");
    s.library(&format!("{a}/lib/libfoo.so.1"), "foo", "a", &["-g"]);
    let main = s.source("app.c", USE_FOO);
    let exe = s.program(
        &format!("{app}/bin/app"),
        &main,
        &glibc,
        &[
            "-g".into(),
            format!("-L{}", s.host(&format!("{a}/lib")).display()),
            "-l:libfoo.so.1".into(),
            format!("-Wl,-rpath,{a}/lib:{glibc}/lib"),
        ],
    );
    let mut inputs = vec![fs::read(&exe).unwrap()];
    inputs.push(fs::read(s.host(&format!("{a}/lib/libfoo.so.1"))).unwrap());
    if let Some(real) = real_store_files()
        .into_iter()
        .find(|p| p.ends_with("bin/hello"))
    {
        inputs.push(fs::read(real).unwrap());
    }
    let opts = [
        StripOptions::default(),
        StripOptions {
            modules: StripModules::Debug,
        },
    ];
    let mut checked = 0;
    for data in &inputs {
        let len = data.len();
        let mut cuts: Vec<usize> = (0..len.min(4096)).step_by(7).collect();
        cuts.extend((4096..len).step_by(97));
        for cut in cuts {
            for opt in &opts {
                let out = strip_bytes(&data[..cut], opt);
                assert!(out.after as usize <= cut.max(out.bytes.len()));
            }
            checked += 1;
        }
        // Flipped bytes in the headers and tables.
        let mut state = 0x1234_5678u64;
        for _ in 0..2000 {
            let mut bad = data.clone();
            for _ in 0..4 {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1);
                let at = if state & 1 == 0 {
                    (state >> 33) as usize % 64.min(len)
                } else {
                    (state >> 33) as usize % len
                };
                bad[at] ^= (state >> 16) as u8 | 1;
            }
            let out = strip_bytes(&bad, &opts[1]);
            if out.action == StripAction::Stripped {
                // Whatever we produce must parse again.
                assert!(strip_bytes(&out.bytes, &opts[1]).action != StripAction::NotElf);
            }
            checked += 1;
        }
    }
    assert!(checked > 1000);

    // Selection over truncated and corrupted programs: errors or warnings, never a panic.
    let whole = fs::read(&exe).unwrap();
    let target = s.host(&format!("{app}/bin/app"));
    let roots = [Root::new(format!("{app}/bin/app"), "t")];
    let mut state = 0x9e37_79b9u64;
    for cut in (0..whole.len()).step_by(whole.len() / 60 + 1) {
        fs::write(&target, &whole[..cut]).unwrap();
        let _ = s.select(&roots, &Policy::default());
        let mut bad = whole.clone();
        for _ in 0..8 {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            let at = (state >> 33) as usize % bad.len();
            bad[at] ^= (state >> 8) as u8 | 1;
        }
        fs::write(&target, &bad).unwrap();
        if let Ok(sel) = s.select(&roots, &Policy::default()) {
            let mut tree = Tree::new();
            let _ = populate(&mut tree, &sel, &Policy::default());
        }
    }
}

#[test]
fn image_policy_table_parses_strictly() {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Profile {
        image: Policy,
    }
    let text = r#"
        [image]
        keep = ["/nix/store/*-glibc-*/lib/gconv/UTF-16.so"]
        keep-classes = ["terminfo"]
        keep-locales = ["en_US.UTF-8"]
        keep-gconv = ["UTF-16", "UTF-32"]
        keep-terminfo = ["screen"]
        prune-globs = ["/nix/store/*-busybox-*/share/initramfs-tools/**", "*.pyc"]
        drop = ["*-linux-headers-*", { path = "/nix/store/*-gcc-*-lib", rewrite = true }]
        allow-missing = ["libgcc_s.so.1"]
        allow-dangling = ["/nix/store/*-hello.c"]
        allow-setuid = ["/nix/store/*-busybox-*/bin/busybox"]
        allow-world-writable = []
        dlopen = "recommended"
        strip = true
        strip-modules = "debug"
    "#;
    let profile: Profile = toml::from_str(text).unwrap();
    let p = profile.image;
    p.validate().unwrap();
    assert_eq!(
        p.drop,
        [
            DropRule {
                path: "*-linux-headers-*".into(),
                rewrite: false
            },
            DropRule {
                path: "/nix/store/*-gcc-*-lib".into(),
                rewrite: true
            }
        ]
    );
    assert_eq!(p.keep_classes, [PruneClass::Terminfo]);
    assert_eq!(p.strip_modules(), StripModules::Debug);
    let err = toml::from_str::<Policy>("strip-everything = true").unwrap_err();
    assert!(err.to_string().contains("unknown field"), "{err}");
    let err = toml::from_str::<Policy>("drop = [{ path = \"x\", rewirte = true }]").unwrap_err();
    assert!(err.to_string().contains("rewirte"), "{err}");
    let err = toml::from_str::<Policy>("keep-classes = [\"dogs\"]").unwrap_err();
    assert!(err.to_string().contains("dogs"), "{err}");
    // Serializes back to the same table.
    let again: Policy = toml::from_str(&toml::to_string(&p).unwrap()).unwrap();
    assert_eq!(again, p);
}
