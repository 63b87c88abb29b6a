//! Team scale with Nix's own machinery, all on this machine and offline:
//!
//! - `cache keygen`, then `cache push` of qemu-x86_64 to a signed `file://` cache: every
//!   narinfo is signed by the key, and holds every store path of the image, the kernel and its
//!   config; `cache status` says so.
//! - A second, empty Nix store (a fresh `/nix` in a mount namespace of the test's own, standing
//!   in for a second machine) builds the board with `--no-local-builds` from the cache alone,
//!   over `file://` and over HTTP (`cargo xtask serve` on 127.0.0.1), and the kernel and the
//!   initramfs are byte-identical to the first machine's.
//! - bonsai-init is a store path (`nix-store --add` of the reproducible binary): the image's
//!   `/bin/bonsai-init` is that path's file, the push carries it, and the second machine gets
//!   the same path and a byte-identical image.
//! - A tampered NAR, a tampered narinfo and a key that is not trusted are each refused with one
//!   line naming the store path, and nothing is written.
//! - A remote builder over `ssh-ng` through Nix's localhost shortcut (a store of its own under
//!   a folder, its daemon with the sandbox and the host's tool folders, as a builder machine
//!   would have) builds a kernel config derivation and a small package, and a local rebuild
//!   (`nix-store --check`) gives the same bytes; again with Nix 2.26 as the client.
//! - Nix 2.26 (`BONSAI_NIX=debian13`) signs and pushes, and a fresh store pulls from that cache
//!   alone; a tampered narinfo is refused there too.
//!
//! - The same through a real sshd (Debian's openssh-server) in a network namespace of the
//!   test's own, logged in with a key and checked against the builder's host key from
//!   `bonsai.toml` (no known_hosts): a kernel config and a package built on it equal a local
//!   build; `cache push` over `ssh://` and `ssh-ng://` to that sshd leaves every path the
//!   board needs, bonsai-init's store path included, signed in the far store.
//!
//! The settings reach Nix through the scratch repository's `bonsai.toml`. Needs root (for the
//! mount and network namespaces), Nix, util-linux's unshare, iproute2, OpenSSH's client and
//! server; fails, never skips.

use std::fs;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};

mod common;
use common::require;

const BOARD: &str = "qemu-x86_64";

/// A scratch repository, its reference build in this machine's store, a key pair and the
/// board pushed to a `file://` cache.
struct Team {
    root: PathBuf,
    reference: PathBuf,
    cache: PathBuf,
    public: String,
    secret: PathBuf,
}

/// NIX_CONFIG for every run: no cache.nixos.org (there is no network here), so only the
/// team's cache is asked. Single-user as root where no daemon runs, like xtask's own Nix
/// environment, so the test's direct `nix-store` call works where no NIX_CONFIG is set (CI).
fn nix_config() -> String {
    let mut conf = std::env::var("NIX_CONFIG").unwrap_or_default();
    let daemon = Path::new("/nix/var/nix/daemon-socket/socket").exists();
    if !daemon && !conf.contains("build-users-group") {
        conf.push_str("\nbuild-users-group =");
    }
    if !daemon && !conf.contains("sandbox") {
        conf.push_str("\nsandbox = false");
    }
    format!("{conf}\nsubstituters =")
}

/// The environment of a run on the scratch repository `root`: its settings only (the
/// caller's BONSAI_* overrides removed), no cache.nixos.org.
fn scratch_env(cmd: &mut Command, root: &Path) {
    cmd.current_dir(root)
        .env("BONSAI_ROOT", root)
        .env("NO_COLOR", "1")
        .env("NIX_CONFIG", nix_config());
    for v in [
        "BONSAI_NIXPKGS",
        "BONSAI_OUT",
        "BONSAI_SUBSTITUTERS",
        "BONSAI_TRUSTED_PUBLIC_KEYS",
        "BONSAI_BUILDERS",
        "BONSAI_SETTINGS",
    ] {
        cmd.env_remove(v);
    }
}

fn run_in(root: &Path, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.args(args);
    scratch_env(&mut cmd, root);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    common::echo(args, cmd.output().expect("running xtask"))
}

fn ok(root: &Path, args: &[&str]) -> String {
    let o = run_in(root, args, &[]);
    assert!(
        o.status.success(),
        "xtask {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn team() -> &'static Team {
    static TEAM: OnceLock<Team> = OnceLock::new();
    TEAM.get_or_init(|| {
        let root = common::scratch_repo().keep();
        let reference = root.join("out-reference");
        ok(
            &root,
            &[
                "build",
                "--board",
                BOARD,
                "--out",
                reference.to_str().unwrap(),
            ],
        );
        let prefix = root.join("keys/team");
        fs::create_dir_all(prefix.parent().unwrap()).unwrap();
        let out = ok(
            &root,
            &["cache", "keygen", "--out", prefix.to_str().unwrap()],
        );
        assert!(out.contains("trusted-public-keys = [\"team-1:"), "{out}");
        let secret = root.join("keys/team.sec");
        let public = fs::read_to_string(root.join("keys/team.pub"))
            .unwrap()
            .trim()
            .to_string();
        let cache = root.join("cache");
        let url = format!("file://{}", cache.display());
        let out = ok(
            &root,
            &[
                "cache",
                "push",
                "--board",
                BOARD,
                "--to",
                &url,
                "--key",
                secret.to_str().unwrap(),
            ],
        );
        assert!(
            out.contains(&format!("for qemu-x86_64 to {url}, signed by team-1")),
            "{out}"
        );
        Team {
            root,
            reference,
            cache,
            public,
            secret,
        }
    })
}

/// The team's scratch repository has one `bonsai.toml`: a test that writes it, or runs
/// xtask there, holds this lock meanwhile (the tests run in parallel).
fn settings_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn settings(t: &Team, substituter: &str, key: &str) {
    fs::write(
        t.root.join("bonsai.toml"),
        format!("[nix]\nsubstituters = [\"{substituter}\"]\ntrusted-public-keys = [\"{key}\"]\n"),
    )
    .unwrap();
}

/// Runs `xtask args` with an empty Nix store: `/nix` is a fresh folder, bind-mounted in a
/// mount namespace of its own, so the run sees none of this machine's store paths.
fn in_fresh_store(t: &Team, args: &[&str]) -> Output {
    in_fresh_store_with(t, args, &[])
}

/// [`in_fresh_store`] with more environment (`BONSAI_NIX`).
fn in_fresh_store_with(t: &Team, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
    let store = tempfile::tempdir().unwrap();
    fs::create_dir_all(store.path().join("nix")).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$0/nix\" /nix && exec \"$@\"")
        .arg(store.path())
        .arg(env!("CARGO_BIN_EXE_xtask"))
        .args(args);
    scratch_env(&mut cmd, &t.root);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let o = common::echo(args, cmd.output().expect("running unshare"));
    // The namespace is gone: the folder holds what that store fetched.
    let fetched = fs::read_dir(store.path().join("nix/store"))
        .map(|d| d.count())
        .unwrap_or(0);
    eprintln!("(the fresh store held {fetched} entries)");
    o
}

/// Builds the board in a fresh store from `substituter` alone into `out`; the same kernel and
/// initramfs as the reference, each fetched path from the cache, nothing built.
fn from_cache_alone(t: &Team, substituter: &str, out: &Path) {
    settings(t, substituter, &t.public);
    let args = [
        "build",
        "--board",
        BOARD,
        "--no-local-builds",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = in_fresh_store(t, &args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = String::from_utf8_lossy(&o.stderr);
    let fetched = format!("nix: copying linux-6.1.192 from {substituter}");
    assert!(log.contains(&fetched), "{log}");
    assert!(
        !log.contains("nix: building"),
        "something was built:\n{log}"
    );
    same_bytes(&t.reference, out);
}

/// Whether a run's log says Nix built something on this machine.
fn built_here(log: &str) -> bool {
    log.lines()
        .any(|l| l.contains("nix: building") && l.contains(" on this machine"))
}

/// The store paths of the reference image, its kernel and the kernel's config.
fn needed_paths(t: &Team) -> Vec<String> {
    let info: serde_json::Value =
        serde_json::from_slice(&fs::read(t.reference.join("build.json")).unwrap()).unwrap();
    let mut needed: Vec<String> = info["store_paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    for key in ["kernel", "kernel_config_path"] {
        needed.push(info["nix"][key].as_str().unwrap().to_string());
    }
    needed
}

fn same_bytes(a: &Path, b: &Path) {
    for f in ["kernel", "initramfs.cpio.gz"] {
        assert_eq!(
            fs::read(a.join(f)).unwrap(),
            fs::read(b.join(f)).unwrap(),
            "{f} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

#[test]
fn push_status_and_a_fresh_store_from_file_and_http() {
    require("nix-build", "nix-bin");
    require("unshare", "util-linux");
    let t = team();
    let _settings = settings_lock();

    // Every narinfo is signed by the team's key, and the cache has every path the image needs.
    let mut narinfos = 0;
    for e in fs::read_dir(&t.cache).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "narinfo") {
            narinfos += 1;
            let text = fs::read_to_string(&p).unwrap();
            assert!(
                text.lines().any(|l| l.starts_with("Sig: team-1:")),
                "unsigned: {}",
                p.display()
            );
        }
    }
    let needed = needed_paths(t);
    for p in &needed {
        let h = &p[11..43];
        assert!(
            t.cache.join(format!("{h}.narinfo")).is_file(),
            "{p} is not in the cache"
        );
    }
    assert!(
        narinfos >= needed.len(),
        "{narinfos} narinfos for {} paths",
        needed.len()
    );

    let url = format!("file://{}", t.cache.display());
    let status = ok(
        &t.root,
        &["cache", "status", "--board", BOARD, "--from", &url],
    );
    assert!(
        status.contains(&format!(
            "qemu-x86_64: 5 of 5 store paths in {url}; the kernel is cached"
        )),
        "{status}"
    );
    assert!(
        status.lines().any(|l| l.contains("kernel ")
            && l.contains("linux-6.1.192")
            && l.contains("cached (closure: 1 of 1 in the cache)")),
        "{status}"
    );
    // An empty cache: status names what is missing, the kernel first of all.
    let empty = t.root.join("empty-cache");
    fs::create_dir_all(&empty).unwrap();
    fs::write(empty.join("nix-cache-info"), "StoreDir: /nix/store\n").unwrap();
    let o = run_in(
        &t.root,
        &[
            "cache",
            "status",
            "--board",
            BOARD,
            "--from",
            &format!("file://{}", empty.display()),
        ],
        &[],
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("0 of 5 store paths") && text.contains("the kernel is MISSING"),
        "{text}"
    );

    // A second machine: nothing in its store, the team's bonsai.toml, no local builds.
    from_cache_alone(t, &url, &t.root.join("out-from-file"));

    // bonsai-init is a store path like the rest: the image takes /bin/bonsai-init from
    // …-bonsai-init-<version>-<target>, the cache holds that path, and a second machine gets
    // the same path (the binary is reproducible) and the same image, with nothing built by Nix.
    let pid1_here = t.root.join("out-pid1-reference");
    let pid1_args = |out: &Path| -> Vec<String> {
        ["build", "--board", BOARD, "--init", "bonsai-init", "--out"]
            .iter()
            .map(|s| s.to_string())
            .chain([out.display().to_string()])
            .collect()
    };
    let args = pid1_args(&pid1_here);
    ok(
        &t.root,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let pid1_path = |out: &Path| -> String {
        let info: serde_json::Value =
            serde_json::from_slice(&fs::read(out.join("build.json")).unwrap()).unwrap();
        info["nix"]["bonsai_init"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let here = pid1_path(&pid1_here);
    assert!(
        here.starts_with("/nix/store/")
            && here.ends_with("-bonsai-init-0.1.0-x86_64-unknown-linux-musl"),
        "build.json's nix.bonsai_init: '{here}'"
    );
    assert!(
        t.cache.join(format!("{}.narinfo", &here[11..43])).is_file(),
        "{here} is not in the cache"
    );
    let from_store = fs::read(Path::new(&here).join("bin/bonsai-init")).unwrap();
    let cpio = Command::new("sh")
        .arg("-c")
        .arg("zcat \"$0\" | cpio -i --quiet --to-stdout bin/bonsai-init")
        .arg(pid1_here.join("initramfs.cpio.gz"))
        .output()
        .unwrap();
    assert!(
        cpio.status.success() && cpio.stdout == from_store,
        "the image's /bin/bonsai-init is not {here}/bin/bonsai-init"
    );
    settings(t, &url, &t.public);
    let there = t.root.join("out-pid1-from-file");
    let mut args = pid1_args(&there);
    args.push("--no-local-builds".into());
    let o = in_fresh_store(t, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(
        !log.contains("nix: building"),
        "something was built:\n{log}"
    );
    assert_eq!(pid1_path(&there), here);
    same_bytes(&pid1_here, &there);

    // The same over HTTP, from cargo xtask serve on 127.0.0.1.
    let mut serve = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["serve", "--port", "0"])
        .arg(&t.cache)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(serve.stderr.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let port = first
        .trim()
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .to_string();
    let http = format!("http://127.0.0.1:{port}/cache");
    from_cache_alone(t, &http, &t.root.join("out-from-http"));
    serve.kill().ok();
    serve.wait().ok();
    fs::remove_file(t.root.join("bonsai.toml")).unwrap();
}

/// A copy of the team's cache, with `edit` applied to the narinfo of the kernel config.
fn tampered(t: &Team, name: &str, edit: impl Fn(&Path, &str)) -> PathBuf {
    tampered_from(t, &t.cache, name, edit)
}

/// A copy of the cache `cache`, with `edit` applied to the narinfo of the kernel config.
fn tampered_from(t: &Team, cache: &Path, name: &str, edit: impl Fn(&Path, &str)) -> PathBuf {
    let dir = t.root.join(name);
    let status = Command::new("cp")
        .arg("-a")
        .arg(cache)
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success());
    let info: serde_json::Value =
        serde_json::from_slice(&fs::read(t.reference.join("build.json")).unwrap()).unwrap();
    let config = info["nix"]["kernel_config_path"].as_str().unwrap();
    edit(&dir, &config[11..43]);
    dir
}

/// A narinfo's signed fields changed: its NarSize one more.
fn bump_nar_size(dir: &Path, hash: &str) {
    let p = dir.join(format!("{hash}.narinfo"));
    let text = fs::read_to_string(&p).unwrap();
    let changed: String = text
        .lines()
        .map(|l| match l.strip_prefix("NarSize: ") {
            Some(n) => format!("NarSize: {}\n", n.parse::<u64>().unwrap() + 1),
            None => format!("{l}\n"),
        })
        .collect();
    assert_ne!(changed, text);
    fs::write(&p, changed).unwrap();
}

fn refused(t: &Team, substituter: &str, key: &str) -> String {
    refused_with(t, substituter, key, &[])
}

/// A fresh-store build from `substituter` fails with one error line, and writes nothing.
fn refused_with(t: &Team, substituter: &str, key: &str, env: &[(&str, &str)]) -> String {
    settings(t, substituter, key);
    let out = t.root.join("out-refused");
    let o = in_fresh_store_with(
        t,
        &[
            "build",
            "--board",
            BOARD,
            "--no-local-builds",
            "--out",
            out.to_str().unwrap(),
        ],
        env,
    );
    assert_eq!(o.status.code(), Some(1), "a bad cache was accepted");
    assert!(!out.exists(), "a refused build left {}", out.display());
    let err = String::from_utf8_lossy(&o.stderr);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "not one error line:\n{err}");
    lines[0].to_string()
}

#[test]
fn tampered_caches_and_a_wrong_key_are_refused() {
    require("nix-build", "nix-bin");
    require("unshare", "util-linux");
    require("xz", "xz-utils");
    let t = team();
    let _settings = settings_lock();
    let info: serde_json::Value =
        serde_json::from_slice(&fs::read(t.reference.join("build.json")).unwrap()).unwrap();
    let config = info["nix"]["kernel_config_path"]
        .as_str()
        .unwrap()
        .to_string();

    // A NAR whose bytes changed (decompressed, one bit flipped, compressed again).
    let nar = tampered(t, "cache-bad-nar", |dir, hash| {
        let narinfo = fs::read_to_string(dir.join(format!("{hash}.narinfo"))).unwrap();
        let url = narinfo
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .unwrap();
        let file = dir.join(url);
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("xz -dc '{0}' > '{0}.raw'", file.display()))
            .status()
            .unwrap();
        assert!(out.success());
        let raw = PathBuf::from(format!("{}.raw", file.display()));
        let mut bytes = fs::read(&raw).unwrap();
        let i = bytes.len() / 2;
        bytes[i] ^= 1;
        fs::write(&raw, bytes).unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "xz -c '{0}.raw' > '{0}' && rm '{0}.raw'",
                file.display()
            ))
            .status()
            .unwrap();
        assert!(out.success());
    });
    let err = refused(t, &format!("file://{}", nar.display()), &t.public);
    assert!(
        err.contains(&format!(
            "{config}: the NAR a substituter sent does not match the hash in its signed narinfo"
        )),
        "{err}"
    );

    // A narinfo whose signed fields changed.
    let narinfo = tampered(t, "cache-bad-narinfo", bump_nar_size);
    let url = format!("file://{}", narinfo.display());
    let err = refused(t, &url, &t.public);
    assert_eq!(
        err,
        format!("error: {config}: {url} has it, but signed by no trusted key (its narinfo was changed, or it was signed with a key bonsai.toml's trusted-public-keys does not list)")
    );

    // A cache without the kernel: what would be built here is named, before anything runs.
    let kernel = info["nix"]["kernel"].as_str().unwrap().to_string();
    let no_kernel = tampered(t, "cache-no-kernel", |dir, _| {
        fs::remove_file(dir.join(format!("{}.narinfo", &kernel[11..43]))).unwrap();
    });
    let err = refused(t, &format!("file://{}", no_kernel.display()), &t.public);
    assert!(
        err.starts_with("error: --no-local-builds: 3 derivations would be built on this machine, and bonsai.toml sets no remote builder: ")
            && err.contains("…-linux-6.1.192.drv")
            && err.contains("…-linux-6.1.192-2.tar.xz.drv"),
        "{err}"
    );

    // The right cache, but trusting another key.
    let other = t.root.join("keys/other");
    ok(
        &t.root,
        &["cache", "keygen", "--out", other.to_str().unwrap()],
    );
    let other_pub = fs::read_to_string(t.root.join("keys/other.pub"))
        .unwrap()
        .trim()
        .to_string();
    let url = format!("file://{}", t.cache.display());
    let err = refused(t, &url, &other_pub);
    assert!(
        err.starts_with("error: /nix/store/")
            && err.contains(&format!(": {url} has it, but signed by no trusted key")),
        "{err}"
    );
    // keygen never overwrites a key.
    let o = run_in(
        &t.root,
        &["cache", "keygen", "--out", other.to_str().unwrap()],
        &[],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr)
        .contains("other.sec: exists; cache keygen never overwrites a key"));
    // Pushing to HTTP or S3 is refused before anything runs.
    for (to, want) in [
        (
            "https://cache.example",
            "an HTTP binary cache is for reading",
        ),
        ("s3://bucket", "Debian's nix-bin (2.8) has none"),
    ] {
        let o = run_in(
            &t.root,
            &[
                "cache",
                "push",
                "--to",
                to,
                "--key",
                t.secret.to_str().unwrap(),
            ],
            &[],
        );
        assert_eq!(o.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&o.stderr).contains(want), "{to}");
    }
    fs::remove_file(t.root.join("bonsai.toml")).unwrap();
}

/// The builder's nix-daemon: the sandbox, with the host's tool folders in it (what a Debian
/// builder's nix.conf would set; the offline set's builds use the host toolchain).
const DAEMON: &str = "#!/bin/sh\nNIX_CONFIG=\"$NIX_CONFIG\nsandbox = true\nextra-sandbox-paths = /bin /usr /lib /lib64 /etc\nmax-jobs = 2\"\nexport NIX_CONFIG\nexec nix-daemon \"$@\"\n";

#[test]
fn a_remote_builder_builds_a_kernel_config_and_a_package() {
    require("nix-build", "nix-bin");
    require("nix-daemon", "nix-bin");
    let scratch = common::scratch_repo();
    let root = scratch.path();
    let builder = tempfile::tempdir().unwrap();
    let daemon = builder.path().join("daemon");
    fs::write(&daemon, DAEMON).unwrap();
    fs::set_permissions(&daemon, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let store = builder.path().join("store");
    fs::create_dir_all(&store).unwrap();
    let uri = format!(
        "ssh-ng://localhost?remote-store=local?root={}&remote-program={}",
        store.display(),
        daemon.display()
    );
    fs::write(
        root.join("bonsai.toml"),
        format!("[[nix.builders]]\nuri = \"{uri}\"\nsystems = [\"x86_64-linux\"]\nmax-jobs = 2\n"),
    )
    .unwrap();
    // The kernel that the package build below takes from this machine's store.
    team();
    builds_remotely(root, "ssh-ng://localhost?", Some(&store), &|args| {
        run_in(root, args, &[])
    });
    // The same with Nix 2.26 on this side (the builder's daemon stays the host's 2.8).
    builds_remotely(root, "ssh-ng://localhost?", Some(&store), &|args| {
        run_in(root, args, &[("BONSAI_NIX", "debian13")])
    });
}

/// New derivations nobody built go to the builder with `--no-local-builds`: a kernel fragment
/// with one more comment (the kernel config alone: a kernel would take minutes), then hello
/// with another greeting. The log names the builder (`on <prefix>…`) and nothing was built
/// here; the builder's store holds the results when given; `nix-store --check` rebuilds both
/// here and finds the same bytes. `run` runs xtask with the builder reachable.
fn builds_remotely(
    root: &Path,
    prefix: &str,
    builder_store: Option<&Path>,
    run: &dyn Fn(&[&str]) -> Output,
) {
    let stamp = format!("{:?} {prefix}", std::time::SystemTime::now());
    let frag = root.join("kernel-configs/qemu-x86_64.config");
    let original = fs::read_to_string(&frag).unwrap();
    fs::write(&frag, format!("{original}# built remotely: {stamp}\n")).unwrap();
    let o = run(&["kernel-config", "--board", BOARD, "--no-local-builds"]);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains(&format!("nix: building linux-config-6.1.192 on {prefix}")),
        "{log}"
    );
    assert!(!built_here(&log), "{log}");
    let drv_of = |attr: &str| -> String {
        let o = run_in(root, &["eval", "--board", BOARD, "--json"], &[]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let items = v["items"].as_array().unwrap();
        let item = items.iter().find(|i| i["attribute"] == attr).unwrap();
        item["drv_path"].as_str().unwrap().to_string()
    };
    let config_drv = drv_of("kernel config (tinyconfig + qemu-x86_64.config)");
    fs::write(&frag, original).unwrap();

    let hello = root.join("examples/hello/src/hello.c");
    let src = fs::read_to_string(&hello).unwrap();
    fs::write(&hello, format!("{src}\n/* built remotely: {stamp} */\n")).unwrap();
    let hello_drv = drv_of("hello-example");
    let out = root.join("out-remote");
    let o = run(&[
        "build",
        "--board",
        BOARD,
        "--no-local-builds",
        "--out",
        out.to_str().unwrap(),
    ]);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "the build with a remote builder failed:\n{log}"
    );
    assert!(
        log.contains(&format!("nix: building hello-1.0 on {prefix}")),
        "{log}"
    );
    assert!(!built_here(&log), "{log}");

    for drv in [&config_drv, &hello_drv] {
        // The builder's own store has the results (built there, not copied in).
        if let Some(store) = builder_store {
            let o = Command::new("nix-store")
                .args(["--query", "--outputs", drv])
                .env("NIX_CONFIG", nix_config())
                .output()
                .unwrap();
            for p in String::from_utf8_lossy(&o.stdout).lines() {
                let there = store.join(p.trim_start_matches('/'));
                assert!(there.exists(), "{p} is not in the builder's store");
            }
        }
        // Built remotely, then rebuilt here: the same bytes (nix-store --check fails otherwise).
        let o = Command::new("nix-store")
            .args(["--realise", "--check", drv])
            .env("NIX_CONFIG", format!("{}\nbuilders =", nix_config()))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{drv}: a local rebuild differs from the remote one:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// sshd's configuration: root logs in with the test's key only, on 127.0.0.1:22 of the
/// namespace. `UsePAM no` and `StrictModes no`: the files are in a temporary folder.
fn sshd_config(dir: &Path) -> String {
    format!(
        "ListenAddress 127.0.0.1:22\nHostKey {d}/host\nAuthorizedKeysFile {d}/authorized_keys\nPidFile {d}/sshd.pid\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nLogLevel VERBOSE\n",
        d = dir.display()
    )
}

/// What the builder machine's programs see: sshd hands them a clean environment, so the
/// wrappers set all of Nix's settings themselves (single-user as root, the sandbox with the
/// host's tool folders, as a Debian builder's nix.conf would; no cache.nixos.org). A store
/// that takes pushes over ssh-ng:// checks signatures against its own trusted keys: it trusts
/// the team's key, as a team's cache machine would.
fn remote_config(team_key: &str) -> String {
    format!("build-users-group =\nsandbox = true\nextra-sandbox-paths = /bin /usr /lib /lib64 /etc\nmax-jobs = 2\nsubstituters =\ntrusted-public-keys = {team_key}")
}

/// An SSH server of the test's own: keys, configuration, and the remote programs Nix runs.
struct Sshd {
    dir: tempfile::TempDir,
    host_key: String,
    client_key: PathBuf,
}

fn sshd(team_key: &str) -> Sshd {
    let dir = tempfile::tempdir().unwrap();
    for name in ["host", "client"] {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(dir.path().join(name))
            .status()
            .unwrap();
        assert!(st.success(), "ssh-keygen");
    }
    fs::copy(
        dir.path().join("client.pub"),
        dir.path().join("authorized_keys"),
    )
    .unwrap();
    fs::write(dir.path().join("sshd_config"), sshd_config(dir.path())).unwrap();
    let stranger = remote_config("");
    for (name, program, config) in [
        ("daemon", "nix-daemon", remote_config(team_key)),
        ("store", "nix-store", remote_config(team_key)),
        // A machine whose Nix does not trust the team's key.
        ("daemon-untrusting", "nix-daemon", stranger),
    ] {
        let path = dir.path().join(name);
        fs::write(
            &path,
            format!("#!/bin/sh\nNIX_CONFIG='{config}'\nexport NIX_CONFIG\nexec {program} \"$@\"\n"),
        )
        .unwrap();
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let host_key = fs::read_to_string(dir.path().join("host.pub"))
        .unwrap()
        .trim()
        .to_string();
    let client_key = dir.path().join("client");
    Sshd {
        dir,
        host_key,
        client_key,
    }
}

impl Sshd {
    /// `xtask args` in a new network namespace where this sshd listens on 127.0.0.1:22: it
    /// starts, answers a login (with the host key checked), the run happens, sshd stops.
    fn run(&self, root: &Path, args: &[&str]) -> Output {
        let d = self.dir.path();
        fs::write(
            d.join("known_hosts"),
            format!("127.0.0.1 {}\n", self.host_key),
        )
        .unwrap();
        let script = r#"set -e
d=$0
ip link set lo up
mkdir -p /run/sshd
/usr/sbin/sshd -D -e -f "$d/sshd_config" 2>>"$d/sshd.log" &
sshd=$!
i=0
until ssh -q -o BatchMode=yes -o UserKnownHostsFile="$d/known_hosts" -i "$d/client" root@127.0.0.1 true; do
	i=$((i + 1)); [ $i -lt 100 ] || { echo "sshd did not answer: $(tail -3 "$d/sshd.log")" >&2; kill $sshd; exit 99; }
	sleep 0.1
done
set +e
"$@"
rc=$?
kill $sshd
exit $rc"#;
        let mut cmd = Command::new("unshare");
        cmd.args(["--net", "sh", "-c", script])
            .arg(d)
            .arg(env!("CARGO_BIN_EXE_xtask"))
            .args(args);
        scratch_env(&mut cmd, root);
        let o = common::echo(args, cmd.output().expect("running unshare"));
        assert_ne!(
            o.status.code(),
            Some(99),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        o
    }

    /// The URI query that logs in with the test's key and checks the host key.
    fn login(&self) -> String {
        let b64 = {
            let o = Command::new("sh")
                .arg("-c")
                .arg("printf %s \"$0\" | base64 -w0")
                .arg(
                    self.host_key
                        .split_whitespace()
                        .take(2)
                        .collect::<Vec<_>>()
                        .join(" "),
                )
                .output()
                .unwrap();
            String::from_utf8(o.stdout).unwrap()
        };
        format!(
            "ssh-key={}&base64-ssh-public-host-key={b64}",
            self.client_key.display()
        )
    }
}

#[test]
fn a_remote_builder_and_pushes_through_a_real_sshd() {
    require("nix-build", "nix-bin");
    require("nix-daemon", "nix-bin");
    require("unshare", "util-linux");
    require("ip", "iproute2");
    require("ssh", "openssh-client");
    require("/usr/sbin/sshd", "openssh-server");
    // The kernel the package build below takes from this machine's store, and the key.
    let t = team();
    let server = sshd(&t.public);
    let d = server.dir.path();
    let scratch = common::scratch_repo();
    let root = scratch.path();
    let builder_store = d.join("builder");
    fs::create_dir_all(&builder_store).unwrap();
    let uri = format!(
        "ssh-ng://root@127.0.0.1?remote-store=local?root={}&remote-program={}",
        builder_store.display(),
        d.join("daemon").display()
    );
    fs::write(
        root.join("bonsai.toml"),
        format!(
            "[[nix.builders]]\nuri = \"{uri}\"\nsystems = [\"x86_64-linux\"]\nmax-jobs = 2\nssh-key = \"{}\"\npublic-host-key = \"{}\"\n",
            server.client_key.display(),
            server.host_key
        ),
    )
    .unwrap();

    builds_remotely(
        root,
        "ssh-ng://root@127.0.0.1?",
        Some(&builder_store),
        &|args| server.run(root, args),
    );
    fs::remove_file(root.join("bonsai.toml")).unwrap();

    // cache push over ssh:// (nix-store --serve) and ssh-ng:// (nix-daemon --stdio) to the
    // same sshd, each into a store of its own: every path the board needs arrives, signed, and
    // `cache status` over the same URL says so.
    let needed = needed_paths(t);
    let _settings = settings_lock();
    // A store that does not trust the team's key refuses the push over ssh-ng://, in one line
    // that names the key and what to do; nothing of it is valid there.
    let far = d.join("pushed-untrusting");
    fs::create_dir_all(&far).unwrap();
    let to = format!(
        "ssh-ng://root@127.0.0.1?{}&remote-program={}&remote-store=local?root={}",
        server.login(),
        d.join("daemon-untrusting").display(),
        far.display()
    );
    let key = t.secret.to_str().unwrap();
    let o = server.run(
        &t.root,
        &["cache", "push", "--board", BOARD, "--to", &to, "--key", key],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let line = err.lines().find(|l| l.starts_with("error:")).unwrap_or("");
    assert!(
        line.contains("lacks a valid signature")
            && line.contains("/nix/store/")
            && line.contains("does not trust team-1")
            && line.contains("trusted-public-keys"),
        "{err}"
    );
    for (scheme, program) in [("ssh", "store"), ("ssh-ng", "daemon")] {
        let far = d.join(format!("pushed-{scheme}"));
        fs::create_dir_all(&far).unwrap();
        let to = format!(
            "{scheme}://root@127.0.0.1?{}&remote-program={}&remote-store=local?root={}",
            server.login(),
            d.join(program).display(),
            far.display()
        );
        let key = t.secret.to_str().unwrap();
        let push = ["cache", "push", "--board", BOARD, "--to", &to, "--key", key];
        let o = server.run(&t.root, &push);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "push to {scheme}:// failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.contains("signed by team-1"), "{out}");
        let o = server.run(
            &t.root,
            &["cache", "status", "--board", BOARD, "--from", &to],
        );
        let status = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            status.contains("qemu-x86_64: 5 of 5 store paths in")
                && status.contains("the kernel is cached")
                && !status.contains("MISSING"),
            "{status}"
        );
        assert!(
            status
                .lines()
                .any(|l| l.trim_start().starts_with("bonsai-init ") && l.contains("cached")),
            "{status}"
        );
        // What arrived: every path valid in the far store, each signed by the team's key.
        let o = Command::new("nix")
            .args(["--extra-experimental-features", "nix-command"])
            .args(["path-info", "--all", "--sigs", "--store"])
            .arg(format!("local?root={}", far.display()))
            .env("NIX_CONFIG", nix_config())
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        for p in &needed {
            assert!(
                listing.lines().any(|l| l.starts_with(p.as_str())),
                "{p} was not pushed over {scheme}://:\n{listing}"
            );
        }
        assert!(
            listing.lines().any(|l| l.contains("-bonsai-init-")),
            "bonsai-init was not pushed over {scheme}://:\n{listing}"
        );
        for l in listing.lines() {
            assert!(l.contains("team-1:"), "unsigned in the far store: {l}");
        }
    }
}

/// The same with Nix 2.26 (`BONSAI_NIX=debian13`, which bonsai provisions): it signs and
/// pushes, a fresh store pulls the board from that cache alone with the same bytes, and a
/// tampered narinfo is refused in the same one line.
#[test]
fn nix_2_26_pushes_and_builds_from_the_cache_alone() {
    require("unshare", "util-linux");
    let t = team();
    let _settings = settings_lock();
    let nix = [("BONSAI_NIX", "debian13")];
    let cache = t.root.join("cache-2.26");
    let url = format!("file://{}", cache.display());
    let push = [
        "cache",
        "push",
        "--board",
        BOARD,
        "--to",
        &url,
        "--key",
        t.secret.to_str().unwrap(),
    ];
    let o = run_in(&t.root, &push, &nix);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("nix: nix (Nix) 2.26"), "{log}");
    let mut narinfos = 0;
    for e in fs::read_dir(&cache).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "narinfo") {
            narinfos += 1;
            let text = fs::read_to_string(&p).unwrap();
            assert!(text.contains("\nSig: team-1:"), "unsigned: {}", p.display());
        }
    }
    assert!(narinfos >= 5, "{narinfos} narinfos");

    settings(t, &url, &t.public);
    let out = t.root.join("out-2.26");
    let args = [
        "build",
        "--board",
        BOARD,
        "--no-local-builds",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = in_fresh_store_with(t, &args, &nix);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(log.contains("nix: nix (Nix) 2.26"), "{log}");
    assert!(
        log.contains(&format!("nix: copying linux-6.1.192 from {url}")),
        "{log}"
    );
    assert!(
        !log.contains("nix: building"),
        "something was built:\n{log}"
    );
    same_bytes(&t.reference, &out);

    // A narinfo whose signed fields changed: refused, naming the store path.
    let bad = tampered_from(t, &cache, "cache-2.26-bad", bump_nar_size);
    let info: serde_json::Value =
        serde_json::from_slice(&fs::read(t.reference.join("build.json")).unwrap()).unwrap();
    let config = info["nix"]["kernel_config_path"].as_str().unwrap();
    let bad_url = format!("file://{}", bad.display());
    assert_eq!(
        refused_with(t, &bad_url, &t.public, &nix),
        format!("error: {config}: {bad_url} has it, but signed by no trusted key (its narinfo was changed, or it was signed with a key bonsai.toml's trusted-public-keys does not list)")
    );
    fs::remove_file(t.root.join("bonsai.toml")).unwrap();
}
