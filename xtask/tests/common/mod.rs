//! Helpers shared by the end-to-end test files: the repository root, running the xtask
//! binary (its output echoed for the test log) with the tests' own output folder, host tools
//! that must be there, and checking JSON output against its schema in `schemas/`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The tests' own output folder (for `BONSAI_OUT`), inside cargo's target folder: the tests
/// never overwrite what a user built under `out/`.
pub fn out_root() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("out")
}

/// The folder the tests' builds of `board` write: `out_root()/<board>`.
pub fn out_dir(board: &str) -> PathBuf {
    out_root().join(board)
}

/// The xtask binary, to run in the repository root with the tests' output folder.
pub fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_xtask"));
    cmd.args(args)
        .current_dir(root())
        .env("BONSAI_OUT", out_root());
    cmd
}

/// Runs the xtask binary in the repository root, writing into [`out_root`].
pub fn xtask(args: &[&str]) -> Output {
    echo(
        args,
        command(args).output().expect("running the xtask binary"),
    )
}

/// Echoes a run of the xtask binary (the command line, its stdout and stderr) for the test
/// log, and returns it.
pub fn echo(args: &[&str], out: Output) -> Output {
    eprintln!(
        "$ xtask {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs the xtask binary on a scratch repository (`BONSAI_ROOT`, see [`scratch_repo`]),
/// without colour and without the caller's BONSAI_NIXPKGS and BONSAI_OUT: its builds write
/// into the scratch folder's `out/`.
pub fn xtask_in(root: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .current_dir(root)
        .env("BONSAI_ROOT", root)
        .env("NO_COLOR", "1")
        .env_remove("BONSAI_NIXPKGS")
        .env_remove("BONSAI_OUT")
        .output()
        .expect("running xtask");
    echo(args, out)
}

/// Runs the xtask binary, fails the test unless it succeeds, and returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let out = xtask(args);
    assert!(
        out.status.success(),
        "xtask {} failed:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails the test, naming the Debian package, when `program` is not on PATH.
pub fn require(program: &str, package: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .unwrap()
        .status
        .success();
    assert!(found, "{program} is not installed: run `cargo xtask test` (it installs {package}) or apt-get install {package}");
}

/// Fails the test unless `json` (the output of `cargo xtask <command> ... --json`) is valid
/// against `schemas/<command>.schema.json`.
pub fn assert_matches_schema(command: &str, json: &str) {
    if let Err(e) = check_schema(command, json) {
        panic!("`{command} --json` does not match schemas/{command}.schema.json:\n{e}");
    }
}

/// Validates `json` against `schemas/<command>.schema.json` (itself checked against its
/// meta-schema), with Python's jsonschema as the oracle; the errors, one per line.
pub fn check_schema(command: &str, json: &str) -> Result<(), String> {
    let schema = root().join(format!("schemas/{command}.schema.json"));
    assert!(schema.is_file(), "no schema {}", schema.display());
    let dir = tempfile::tempdir().unwrap();
    let doc = dir.path().join(format!("{command}.json"));
    std::fs::write(&doc, json).unwrap();
    let check = "import json, sys, jsonschema\n\
        schema = json.load(open(sys.argv[1]))\n\
        cls = jsonschema.validators.validator_for(schema)\n\
        cls.check_schema(schema)\n\
        errors = sorted(cls(schema).iter_errors(json.load(open(sys.argv[2]))), key=lambda e: list(e.path))\n\
        for e in errors[:10]: print('/'.join(map(str, e.path)) or '(root)', e.message)\n\
        sys.exit(1 if errors else 0)\n";
    let out = Command::new("python3")
        .args(["-c", check])
        .arg(&schema)
        .arg(&doc)
        .output()
        .expect("running python3 (cargo xtask test installs its jsonschema module)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !report.contains("ModuleNotFoundError") && !report.contains("SchemaError"),
        "cannot validate against {}: {report}",
        schema.display()
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(report)
    }
}

/// The repository's data folders, which a build reads through `BONSAI_ROOT`.
pub const DATA_DIRS: &[&str] = &["boards", "profiles", "kernel-configs", "nix", "examples"];

/// A fresh temporary folder holding copies of [`DATA_DIRS`]: a repository root (for
/// `BONSAI_ROOT`) a test may change without touching the real one.
pub fn scratch_repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for d in DATA_DIRS {
        let status = Command::new("cp")
            .arg("-r")
            .arg(root().join(d))
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "copying {d}");
    }
    dir
}

/// The rows of a `conformance` matrix on stdout, its header left out.
pub fn matrix_rows(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| l.contains(" | ") && !l.starts_with("check "))
        .collect()
}

/// Fails unless every check row of a conformance matrix (the time rows left out) shows `pass`
/// in each of its `backends` columns.
pub fn assert_every_row_passes(rows: &[&str], backends: usize) {
    for row in rows
        .iter()
        .filter(|r| !r.starts_with("ready at") && !r.starts_with("/init to"))
    {
        assert_eq!(
            row.matches("pass").count(),
            backends,
            "not every backend passed: {row}"
        );
    }
}
