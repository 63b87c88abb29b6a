//! The bench's "Team cache" section: a cold build of a board on a fresh Nix store (an empty
//! `/nix` in a mount namespace of the bench's own, standing in for a new laptop or CI runner),
//! once from a signed `file://` cache that `cache push` filled, once with no cache at all
//! (everything built, the kernel included), in the same run. Both outputs are compared with
//! the board's own build, byte for byte.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::ui;

pub struct TeamResult {
    pub push_s: f64,
    pub pushed: String,
    pub with_cache: Run,
    /// `None` in quick mode (the baseline is a full cold build, the kernel included).
    pub without_cache: Option<Run>,
}

pub struct Run {
    pub wall_s: f64,
    /// Derivations Nix built on this machine.
    pub built: usize,
    /// Store paths it copied from the cache.
    pub fetched: usize,
}

/// Runs `xtask build` in a fresh store with `env`, timed; fails unless its kernel and
/// initramfs equal `reference`'s.
fn fresh_build(
    board: &str,
    reference: &Path,
    out: &Path,
    env: &[(&str, String)],
    no_local: bool,
) -> Result<Run> {
    let store = tempfile::Builder::new()
        .prefix("bonsai-fresh-store-")
        .tempdir()?;
    std::fs::create_dir_all(store.path().join("nix"))?;
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$0/nix\" /nix && exec \"$@\"")
        .arg(store.path())
        .arg(&exe)
        .args(["build", "--board", board, "--out"])
        .arg(out)
        .env("NO_COLOR", "1")
        .env(
            "NIX_CONFIG",
            format!(
                "{}\nsubstituters =",
                std::env::var("NIX_CONFIG").unwrap_or_default()
            ),
        )
        .env_remove("BONSAI_OUT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if no_local {
        cmd.arg("--no-local-builds");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let t = std::time::Instant::now();
    let o = cmd.output().context("running unshare (util-linux)")?;
    let wall_s = t.elapsed().as_secs_f64();
    let log = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() {
        bail!(
            "the fresh-store build failed: {}",
            log.lines()
                .rev()
                .find(|l| l.starts_with("error"))
                .unwrap_or("?")
        );
    }
    for f in ["kernel", "initramfs.cpio.gz"] {
        if std::fs::read(out.join(f))? != std::fs::read(reference.join(f))? {
            bail!(
                "the fresh-store build's {f} differs from {}'s",
                reference.display()
            );
        }
    }
    let count = |p: &str| log.lines().filter(|l| l.contains(p)).count();
    Ok(Run {
        wall_s,
        built: count("nix: building"),
        fetched: count("nix: copying"),
    })
}

pub fn bench_team_cache(
    board: &str,
    reference: &Path,
    scratch: &Path,
    quick: bool,
) -> Result<TeamResult> {
    let keys = scratch.join("team-keys");
    std::fs::create_dir_all(&keys)?;
    let (sec, public) = (keys.join("bench.sec"), keys.join("bench.pub"));
    let mut cmd = crate::nixbin::current()?.command("nix-store");
    cmd.arg("--generate-binary-cache-key")
        .arg("bench-1")
        .arg(&sec)
        .arg(&public);
    if !cmd.output()?.status.success() {
        bail!("nix-store --generate-binary-cache-key failed");
    }
    let cache = scratch.join("team-cache");
    let url = format!("file://{}", cache.display());
    let t = std::time::Instant::now();
    let pushed = crate::teamcache::push(&[board.to_string()], &url, &sec, None)?;
    let push_s = t.elapsed().as_secs_f64();
    ui::step(format!(
        "bench: build {board} on a fresh store from {url} alone"
    ));
    let with = fresh_build(
        board,
        reference,
        &scratch.join("team-with"),
        &[
            ("BONSAI_SUBSTITUTERS", url.clone()),
            (
                "BONSAI_TRUSTED_PUBLIC_KEYS",
                std::fs::read_to_string(&public)?.trim().to_string(),
            ),
        ],
        true,
    )?;
    let without = if quick {
        None
    } else {
        ui::step(format!(
            "bench: build {board} on a fresh store with no cache (the kernel too: minutes)"
        ));
        Some(fresh_build(
            board,
            reference,
            &scratch.join("team-without"),
            &[("BONSAI_SETTINGS", String::new())],
            false,
        )?)
    };
    Ok(TeamResult {
        push_s,
        pushed,
        with_cache: with,
        without_cache: without,
    })
}

pub fn render(r: Option<&TeamResult>, board: &str, line: &mut impl FnMut(String)) {
    line("## Team cache".into());
    line(String::new());
    let Some(r) = r else {
        line("Not measured in this run.".into());
        line(String::new());
        return;
    };
    let baseline = if r.without_cache.is_some() {
        "; once with no cache, so everything is built, the kernel included. Both images are \
         byte-identical to the board's own build. One run each. Both runs share bonsai's own \
         cache folder, which holds the Debian packages a new machine downloads once."
    } else {
        ". The image is byte-identical to the board's own build. One run; the baseline without \
         a cache builds a kernel and is measured by the full bench only."
    };
    line(format!(
        "A cold build of {board} on a fresh Nix store: an empty `/nix` in a mount namespace, \
         standing in for a new laptop or CI runner. Once from a signed `file://` cache that \
         `cargo xtask cache push` filled in {:.1} s with {}, with `--no-local-builds`{baseline}",
        r.push_s, r.pushed
    ));
    line(String::new());
    line("| fresh store | wall | built on this machine | fetched from the cache |".into());
    line("| --- | ---: | ---: | ---: |".into());
    let row = |name: &str, run: &Run| {
        format!(
            "| {name} | {:.1} s | {} derivations | {} store paths |",
            run.wall_s, run.built, run.fetched
        )
    };
    line(row("with the team's cache", &r.with_cache));
    match &r.without_cache {
        Some(w) => {
            line(row("without a cache", w));
            line(String::new());
            line(format!(
                "With the cache the cold build takes {:.1} % of the time without it ({:.1} s against {:.1} s); the goal is 60 s or less with the cache: {}.",
                r.with_cache.wall_s / w.wall_s * 100.0,
                r.with_cache.wall_s,
                w.wall_s,
                if r.with_cache.wall_s <= 60.0 { "met" } else { "not met" }
            ));
        }
        None => {
            line("| without a cache | not measured (`--quick`: it builds a kernel) | | |".into());
        }
    }
    line(String::new());
}
