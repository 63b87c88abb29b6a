//! Team scale with Nix's own machinery, all on this machine and offline:
//!
//! - `cache keygen`, then `cache push` of qemu-x86_64 to a signed `file://` cache: every
//!   narinfo is signed by the key, and holds every store path of the image, the kernel and its
//!   config; `cache status` says so.
//! - A second, empty Nix store (a fresh `/nix` in a mount namespace of the test's own, standing
//!   in for a second machine) builds the board with `--no-local-builds` from the cache alone,
//!   over `file://` and over HTTP (`cargo xtask serve` on 127.0.0.1), and the kernel and the
//!   initramfs are byte-identical to the first machine's.
//! - A tampered NAR, a tampered narinfo and a key that is not trusted are each refused with one
//!   line naming the store path, and nothing is written.
//! - A remote builder over `ssh-ng` through Nix's localhost shortcut (a store of its own under
//!   a folder, its daemon with the sandbox and the host's tool folders, as a builder machine
//!   would have) builds a kernel config derivation and a small package, and a local rebuild
//!   (`nix-store --check`) gives the same bytes.
//!
//! The settings reach Nix through the scratch repository's `bonsai.toml`. Needs root (for the
//! mount namespace), Nix, util-linux's unshare; fails, never skips.

use std::fs;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

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
    let store = tempfile::tempdir().unwrap();
    fs::create_dir_all(store.path().join("nix")).unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$0/nix\" /nix && exec \"$@\"")
        .arg(store.path())
        .arg(env!("CARGO_BIN_EXE_xtask"))
        .args(args);
    scratch_env(&mut cmd, &t.root);
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
    let info: serde_json::Value =
        serde_json::from_slice(&fs::read(t.reference.join("build.json")).unwrap()).unwrap();
    let mut needed: Vec<String> = info["store_paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    needed.push(info["nix"]["kernel"].as_str().unwrap().to_string());
    needed.push(
        info["nix"]["kernel_config_path"]
            .as_str()
            .unwrap()
            .to_string(),
    );
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
            "qemu-x86_64: 4 of 4 store paths in {url}; the kernel is cached"
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
        text.contains("0 of 4 store paths") && text.contains("the kernel is MISSING"),
        "{text}"
    );

    // A second machine: nothing in its store, the team's bonsai.toml, no local builds.
    from_cache_alone(t, &url, &t.root.join("out-from-file"));

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
    let dir = t.root.join(name);
    let status = Command::new("cp")
        .arg("-a")
        .arg(&t.cache)
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

fn refused(t: &Team, substituter: &str, key: &str) -> String {
    settings(t, substituter, key);
    let out = t.root.join("out-refused");
    let o = in_fresh_store(
        t,
        &[
            "build",
            "--board",
            BOARD,
            "--no-local-builds",
            "--out",
            out.to_str().unwrap(),
        ],
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
    let narinfo = tampered(t, "cache-bad-narinfo", |dir, hash| {
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
    });
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
    // New derivations nobody built: a kernel fragment with one more comment (the kernel config
    // alone: a kernel would take minutes), then hello with another greeting.
    let stamp = format!("{:?}", std::time::SystemTime::now());
    let frag = root.join("kernel-configs/qemu-x86_64.config");
    let original = fs::read_to_string(&frag).unwrap();
    fs::write(&frag, format!("{original}# built remotely: {stamp}\n")).unwrap();
    let o = run_in(
        root,
        &["kernel-config", "--board", BOARD, "--no-local-builds"],
        &[],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(
        log.contains("nix: building linux-config-6.1.192 on ssh-ng://localhost?"),
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
    let args = [
        "build",
        "--board",
        BOARD,
        "--no-local-builds",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = run_in(root, &args, &[]);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "the build with a remote builder failed:\n{log}"
    );
    assert!(
        log.contains("nix: building hello-1.0 on ssh-ng://localhost?"),
        "{log}"
    );
    assert!(!built_here(&log), "{log}");

    // Built remotely, then rebuilt here: the same bytes (nix-store --check fails otherwise).
    for drv in [&config_drv, &hello_drv] {
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
