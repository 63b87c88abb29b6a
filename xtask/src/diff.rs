//! `cargo xtask diff <release-a> <release-b>`: files added, removed and changed (with size
//! deltas), store paths added and removed (with versions), per-directory totals.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

#[derive(Args, Debug)]
pub struct Diff {
    pub a: PathBuf,
    pub b: PathBuf,
    /// JSON: {added, removed, changed: [{path, size_a, size_b, delta}], store_paths_added, store_paths_removed: [[name, version]], dirs: [[dir, bytes_a, bytes_b, delta]]}; every key is described in schemas/diff.schema.json
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FileChange {
    pub path: String,
    pub size_a: Option<u64>,
    pub size_b: Option<u64>,
    pub delta: i64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub added: Vec<FileChange>,
    pub removed: Vec<FileChange>,
    pub changed: Vec<FileChange>,
    pub store_paths_added: Vec<(String, String)>,
    pub store_paths_removed: Vec<(String, String)>,
    /// Per top directory (a store path, /etc, /bin, ...): bytes in a, bytes in b, delta.
    pub dirs: Vec<(String, u64, u64, i64)>,
}

fn manifest(dir: &Path) -> Result<BTreeMap<String, (u64, String)>> {
    let text = std::fs::read_to_string(dir.join("manifest.json")).with_context(|| {
        format!(
            "{} holds no manifest.json; is it a release folder?",
            dir.display()
        )
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}/manifest.json", dir.display()))?;
    let mut out = BTreeMap::new();
    for f in v["files"].as_array().cloned().unwrap_or_default() {
        if f["type"] != "file" && f["type"] != "symlink" {
            continue;
        }
        let path = f["path"].as_str().unwrap_or("").to_string();
        let id = f["sha256"]
            .as_str()
            .or(f["target"].as_str())
            .unwrap_or("")
            .to_string();
        out.insert(path, (f["size"].as_u64().unwrap_or(0), id));
    }
    Ok(out)
}

fn store_paths(files: &BTreeMap<String, (u64, String)>) -> BTreeMap<String, String> {
    files
        .keys()
        .filter_map(|p| {
            p.strip_prefix("/nix/store/")
                .and_then(|r| r.split('/').next())
        })
        .map(|sp| {
            let (name, version) = crate::sbom::split_name(sp);
            (name, version)
        })
        .collect()
}

fn top_dir(path: &str) -> String {
    match path.strip_prefix("/nix/store/") {
        Some(r) => format!("/nix/store/{}", r.split('/').next().unwrap_or(r)),
        None => format!(
            "/{}",
            path.trim_start_matches('/').split('/').next().unwrap_or("")
        ),
    }
}

pub fn report(a: &Path, b: &Path) -> Result<Report> {
    let ma = manifest(a)?;
    let mb = manifest(b)?;
    let mut r = Report {
        added: vec![],
        removed: vec![],
        changed: vec![],
        store_paths_added: vec![],
        store_paths_removed: vec![],
        dirs: vec![],
    };
    for (p, (sa, ha)) in &ma {
        match mb.get(p) {
            None => r.removed.push(FileChange {
                path: p.clone(),
                size_a: Some(*sa),
                size_b: None,
                delta: -(*sa as i64),
            }),
            Some((sb, hb)) if hb != ha => r.changed.push(FileChange {
                path: p.clone(),
                size_a: Some(*sa),
                size_b: Some(*sb),
                delta: *sb as i64 - *sa as i64,
            }),
            _ => {}
        }
    }
    for (p, (sb, _)) in &mb {
        if !ma.contains_key(p) {
            r.added.push(FileChange {
                path: p.clone(),
                size_a: None,
                size_b: Some(*sb),
                delta: *sb as i64,
            });
        }
    }
    let (spa, spb) = (store_paths(&ma), store_paths(&mb));
    for (n, v) in &spb {
        if spa.get(n) != Some(v) {
            r.store_paths_added.push((n.clone(), v.clone()));
        }
    }
    for (n, v) in &spa {
        if spb.get(n) != Some(v) {
            r.store_paths_removed.push((n.clone(), v.clone()));
        }
    }
    let mut dirs: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (p, (s, _)) in &ma {
        dirs.entry(top_dir(p)).or_default().0 += s;
    }
    for (p, (s, _)) in &mb {
        dirs.entry(top_dir(p)).or_default().1 += s;
    }
    r.dirs = dirs
        .into_iter()
        .map(|(d, (x, y))| (d, x, y, y as i64 - x as i64))
        .collect();
    Ok(r)
}

impl Diff {
    pub fn run(self) -> Result<()> {
        let r = report(&self.a, &self.b)?;
        if self.json {
            println!("{}", serde_json::to_string_pretty(&r)?);
            return Ok(());
        }
        for (title, list) in [
            ("added", &r.added),
            ("removed", &r.removed),
            ("changed", &r.changed),
        ] {
            println!("{title}: {}", list.len());
            for f in list.iter() {
                println!("  {:<70} {:>+10}", f.path, f.delta);
            }
        }
        println!("store paths added: {}", r.store_paths_added.len());
        for (n, v) in &r.store_paths_added {
            println!("  + {n} {v}");
        }
        println!("store paths removed: {}", r.store_paths_removed.len());
        for (n, v) in &r.store_paths_removed {
            println!("  - {n} {v}");
        }
        println!(
            "{:<60} {:>12} {:>12} {:>10}",
            "directory", "bytes a", "bytes b", "delta"
        );
        for (d, x, y, dl) in &r.dirs {
            println!("{:<60} {:>12} {:>12} {:>+10}", d, x, y, dl);
        }
        Ok(())
    }
}
