//! Claims of the docs that a mechanism backs, checked without Nix or QEMU: every row of
//! docs/errors.md names its test in xtask/tests/errors.rs, every `--json` output has a JSON
//! Schema in schemas/ that its `--help` names, and real output of the commands that need no
//! build (`list`, `diff`) validates against it. The outputs that need a build (`size`,
//! `test-boards`, `diff` of real releases) are validated in xtask/tests/e2e.rs.

use std::fs;
use std::process::Command;

mod common;
use common::{assert_matches_schema, check_schema, ok, root};

/// The test names of one docs/errors.md table row: the backticked names in the parentheses
/// that end its first cell, `| situation (`test`) | message | what to do |`.
fn row_tests(row: &str) -> Option<Vec<String>> {
    let first = row.trim_start_matches('|').split(" | ").next()?.trim();
    let inside = first.strip_suffix(')')?.rsplit_once('(')?.1;
    let names: Vec<String> = inside
        .split(',')
        .map(|n| n.trim().trim_matches('`').to_string())
        .collect();
    names
        .iter()
        .all(|n| {
            !n.is_empty()
                && n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .then_some(names)
}

#[test]
fn every_errors_md_row_names_a_test_in_errors_rs() {
    let doc = fs::read_to_string(root().join("docs/errors.md")).unwrap();
    // errors.rs holds most triggers; the others are where their subject is tested (local
    // packages, the Nix glue, the choice of Nix).
    let tests = [
        "xtask/tests/errors.rs",
        "xtask/tests/local_packages.rs",
        "xtask/tests/nix_glue.rs",
        "xtask/tests/optional_deps.rs",
        "xtask/tests/team_cache.rs",
        "xtask/src/settings.rs",
        "xtask/src/config.rs",
        "xtask/src/nixbin.rs",
        "xtask/src/nix.rs",
    ]
    .map(|f| fs::read_to_string(root().join(f)).unwrap())
    .concat();
    let mut rows = 0;
    let mut problems = Vec::new();
    for line in doc.lines().filter(|l| l.starts_with("| ")) {
        if line.starts_with("| ---") || line.starts_with("| situation") {
            continue;
        }
        rows += 1;
        match row_tests(line) {
            None => problems.push(format!("names no test: {line}")),
            Some(names) => {
                for n in names {
                    // a test of its own file, or a unit test (indented, in a tests module)
                    if !tests.contains(&format!("#[test]\nfn {n}() {{"))
                        && !tests.contains(&format!("#[test]\n    fn {n}() {{"))
                    {
                        problems.push(format!(
                            "names `{n}`, which errors.rs does not have: {line}"
                        ));
                    }
                }
            }
        }
    }
    assert!(rows >= 40, "only {rows} rows found in docs/errors.md");
    assert!(
        problems.is_empty(),
        "docs/errors.md:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_row_parser_finds_names_and_rejects_rows_without() {
    assert_eq!(
        row_tests("| unknown board (`unknown_board`) | `error: ...` | Pick one. |"),
        Some(vec!["unknown_board".to_string()])
    );
    assert_eq!(
        row_tests("| a (`one`, `two_2`) | m | w |"),
        Some(vec!["one".to_string(), "two_2".to_string()])
    );
    assert_eq!(
        row_tests("| pack cache not writable | `warning: ...` | Free space. |"),
        None
    );
    assert_eq!(
        row_tests("| boot check failed (see e2e.rs) | m | w |"),
        None
    );
}

#[test]
fn every_json_flag_names_its_schema() {
    let cli = <xtask::Cli as clap::CommandFactory>::command();
    let mut with_json = Vec::new();
    for sub in cli.get_subcommands() {
        let Some(arg) = sub.get_arguments().find(|a| a.get_id() == "json") else {
            continue;
        };
        let name = sub.get_name().to_string();
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        let schema = format!("schemas/{name}.schema.json");
        assert!(
            help.contains(&schema),
            "`{name} --json`'s help does not name {schema}: {help}"
        );
        let text =
            fs::read_to_string(root().join(&schema)).unwrap_or_else(|e| panic!("{schema}: {e}"));
        let v: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{schema}: {e}"));
        assert_eq!(
            v["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{schema}"
        );
        with_json.push(name);
    }
    with_json.sort();
    assert_eq!(
        with_json,
        [
            "ab-test",
            "delta",
            "diff",
            "eval",
            "list",
            "size",
            "test-boards",
            "update-test"
        ]
    );
}

#[test]
fn list_json_matches_its_schema() {
    assert_matches_schema("list", &ok(&["list", "--json"]));
    // Files that do not load are listed too, with their error: a scratch project with a
    // broken board and a broken profile.
    let scratch = tempfile::tempdir().unwrap();
    for d in ["boards", "profiles", "kernel-configs"] {
        let st = Command::new("cp")
            .arg("-r")
            .arg(root().join(d))
            .arg(scratch.path())
            .status()
            .unwrap();
        assert!(st.success());
    }
    fs::write(scratch.path().join("boards/broken.toml"), "arch = \n").unwrap();
    fs::write(
        scratch.path().join("profiles/broken.toml"),
        "description = \"b\"\ninherit = [\"ghost\"]\n",
    )
    .unwrap();
    let out = common::command(&["list", "--json"])
        .env("BONSAI_ROOT", scratch.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_matches_schema("list", &text);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for kind in ["boards", "profiles"] {
        let broken = v[kind]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "broken")
            .unwrap_or_else(|| panic!("no broken entry in {kind}: {text}"));
        assert_eq!(broken["valid"], false, "{broken}");
        assert!(
            broken["error"].as_str().unwrap().contains("broken.toml"),
            "{broken}"
        );
    }
    // The schema is not vacuous: another shape fails it.
    assert!(check_schema("list", r#"{"boards": [{"name": "x"}], "profiles": []}"#).is_err());
}

/// A release-like folder holding only a manifest.json with `files`.
fn manifest_folder(files: serde_json::Value) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    fs::write(
        d.path().join("manifest.json"),
        serde_json::to_string_pretty(&serde_json::json!({ "files": files })).unwrap(),
    )
    .unwrap();
    d
}

#[test]
fn diff_json_matches_its_schema() {
    let h = "0c6kzph7l0dcbyhx8ph5hs5v6d5yvkhd";
    let file = |path: &str, size: u64, sha: &str| serde_json::json!({"path": path, "type": "file", "mode": "0644", "size": size, "sha256": sha.repeat(64)});
    let a = manifest_folder(serde_json::json!([
        file("/etc/hostname", 4, "a"),
        file(&format!("/nix/store/{h}-foo-1.0/bin/foo"), 100, "b"),
        {"path": "/bin/foo", "type": "symlink", "mode": "0777", "size": 40, "target": format!("/nix/store/{h}-foo-1.0/bin/foo")},
        {"path": "/etc", "type": "dir", "mode": "0755", "size": 0},
    ]));
    let b = manifest_folder(serde_json::json!([
        file("/etc/hostname", 6, "c"),
        file(&format!("/nix/store/{h}-foo-1.1/bin/foo"), 120, "d"),
        {"path": "/bin/foo", "type": "symlink", "mode": "0777", "size": 40, "target": format!("/nix/store/{h}-foo-1.1/bin/foo")},
    ]));
    let text = ok(&[
        "diff",
        a.path().to_str().unwrap(),
        b.path().to_str().unwrap(),
        "--json",
    ]);
    assert_matches_schema("diff", &text);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["store_paths_added"], serde_json::json!([["foo", "1.1"]]));
    assert_eq!(
        v["store_paths_removed"],
        serde_json::json!([["foo", "1.0"]])
    );
    assert_eq!(v["added"].as_array().unwrap().len(), 1, "{text}");
    assert_eq!(v["removed"].as_array().unwrap().len(), 1, "{text}");
    assert_eq!(v["changed"].as_array().unwrap().len(), 2, "{text}");
    // The shape the old `--help` described is not what diff prints.
    assert!(check_schema(
        "diff",
        r#"{"files": {"added": [], "removed": [], "changed": []}, "store_paths": {"added": [], "removed": []}, "dirs": []}"#
    )
    .is_err());
}

/// Runs a copy of fuzz/run.sh with `args` in a scratch folder, with a fake `cargo` on PATH
/// that has cargo-fuzz, lists one target and records each `cargo fuzz run`'s arguments.
/// Returns (exit code, the recorded run lines, the scratch folder).
fn fake_fuzz_run(args: &[&str]) -> (Option<i32>, Vec<String>, tempfile::TempDir) {
    let d = tempfile::tempdir().unwrap();
    let fuzz = d.path().join("fuzz");
    fs::create_dir_all(fuzz.join("seeds/t1")).unwrap();
    fs::copy(root().join("fuzz/run.sh"), fuzz.join("run.sh")).unwrap();
    let bin = d.path().join("bin");
    fs::create_dir(&bin).unwrap();
    let log = d.path().join("runs.log");
    fs::write(
        bin.join("cargo"),
        format!(
            "#!/bin/sh\ncase \"$*\" in\n  +nightly*) exit 1 ;;\n  'fuzz list') echo t1 ;;\n  'fuzz run '*) echo \"$*\" >>'{}'; [ -d \"$4\" ] || exit 9; echo 'stat::number_of_executed_units: 7' ;;\nesac\nexit 0\n",
            log.display()
        ),
    )
    .unwrap();
    let mut perms = fs::metadata(bin.join("cargo")).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    fs::set_permissions(bin.join("cargo"), perms).unwrap();
    let out = Command::new("bash")
        .arg(fuzz.join("run.sh"))
        .args(args)
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .env_remove("FUZZ_SEED")
        .output()
        .unwrap();
    eprintln!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let runs = fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect();
    (out.status.code(), runs, d)
}

/// "A fuzz failure replays anywhere": the CI run reads only committed inputs, with a fixed
/// seed, and stops after a number of inputs rather than a time.
#[test]
fn fuzz_runs_are_bounded_by_inputs_and_read_only_committed_seeds() {
    let (code, runs, d) = fake_fuzz_run(&["1234"]);
    assert_eq!(code, Some(0));
    assert_eq!(runs.len(), 1, "{runs:?}");
    let words: Vec<&str> = runs[0].split_whitespace().collect();
    assert!(words.contains(&"-runs=1234"), "{runs:?}");
    assert!(words.contains(&"-seed=1"), "{runs:?}");
    assert!(!runs[0].contains("max_total_time"), "{runs:?}");
    // Corpus folders: a temporary one (gone after the run) and the committed seeds.
    let (corpus, seeds) = (words[3], words[4]);
    assert_eq!(seeds, "seeds/t1");
    assert!(
        !corpus.starts_with("corpus") && !std::path::Path::new(corpus).exists(),
        "the run read or kept a local corpus: {corpus}"
    );
    assert!(!d.path().join("fuzz/corpus").exists());
    // Hunting is the other mode: a time budget, a random seed, the local corpus.
    let (code, runs, _d) = fake_fuzz_run(&["--hunt", "5"]);
    assert_eq!(code, Some(0));
    assert!(
        runs[0].contains("-max_total_time=5")
            && runs[0].contains("-seed=0")
            && runs[0].contains(" corpus/t1 "),
        "{runs:?}"
    );
    assert_eq!(fake_fuzz_run(&["ten"]).0, Some(2));
}

/// No tracked file holds the absolute path of the checkout it was made in (compilers write it
/// into debug info, tools into generated files): the repository speaks of the project only.
#[test]
fn no_tracked_file_names_the_checkout_path() {
    let root = root();
    let out = std::process::Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(&root)
        .output()
        .expect("running git ls-files");
    assert!(out.status.success(), "git ls-files failed");
    let needle = root.display().to_string();
    let mut hits = Vec::new();
    for f in out.stdout.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let rel = String::from_utf8_lossy(f).into_owned();
        let Ok(bytes) = fs::read(root.join(&rel)) else {
            continue;
        };
        if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
            hits.push(rel);
        }
    }
    assert!(hits.is_empty(), "files naming {needle}: {hits:?}");
}
