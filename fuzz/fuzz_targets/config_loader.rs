//! Arbitrary bytes as a board file and a profile file through xtask's real loader
//! (`Config::load_board`, `Config::load_profile`) in a scratch project folder. The input is
//! split at its first NUL byte: board text before, profile text after (TOML forbids raw
//! NULs, so nothing is lost). The project also holds `profiles/base.toml` and
//! `kernel-configs/k.config`, so inheritance and fragments can resolve. Never panics; every
//! error is one line naming the file it is about.
#![no_main]

use std::fs;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use xtask::config::Config;

struct Project {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

fn project() -> &'static Project {
    static P: OnceLock<Project> = OnceLock::new();
    P.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        for d in ["boards", "profiles", "kernel-configs"] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("kernel-configs/k.config"), "CONFIG_X=y\n").unwrap();
        fs::write(
            root.join("profiles/base.toml"),
            "description = \"b\"\npackages = [\"busybox\"]\n",
        )
        .unwrap();
        Project { _dir: dir, root }
    })
}

fn check(e: anyhow::Error, file: &str) {
    let text = format!("{e:#}");
    assert!(!text.contains('\n'), "error on several lines: {text:?}");
    assert!(
        text.contains(file)
            || text.contains("profiles/base.toml")
            || text.starts_with("unknown profile"),
        "error does not name {file}: {text:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let p = project();
    let (board, profile) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    fs::write(p.root.join("boards/fuzz.toml"), board).unwrap();
    fs::write(p.root.join("profiles/fuzz.toml"), profile).unwrap();
    let cfg = Config::new(&p.root);
    match cfg.load_board("fuzz") {
        Ok(b) => assert_eq!(b.name, "fuzz"),
        Err(e) => check(e, "boards/fuzz.toml"),
    }
    match cfg.load_profile("fuzz") {
        Ok(prof) => assert!(!prof.packages.is_empty()),
        Err(e) => check(e, "profiles/fuzz.toml"),
    }
});
