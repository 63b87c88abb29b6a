//! `cargo xtask size --board <b>`: where the bytes are. Per store path (and with `--files`, per
//! file): bytes in the closure, bytes kept, bytes after stripping, bytes compressed. Terminal
//! table by size, `--json`, `--csv`; `--compare <out-a> <out-b>` prints the delta.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::build::{read_info, Assembly};
use crate::{project_root, ui};

#[derive(Args, Debug)]
pub struct Size {
    /// Board whose out/<board>/ to report on
    #[arg(long, default_value = "qemu-x86_64")]
    pub board: String,
    /// JSON: {board, profile, init, compression, rows: [{name, closure_bytes, kept_bytes, image_bytes, compressed_bytes}], total, vanished}; with --compare: [{name, image_a, image_b, image_delta, compressed_a, compressed_b, compressed_delta}]; every key is described in schemas/size.schema.json
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// CSV output
    #[arg(long)]
    pub csv: bool,
    /// One row per file instead of per store path
    #[arg(long)]
    pub files: bool,
    /// Compare two output folders (out/<board> of two builds, or release folders)
    #[arg(long, num_args = 2, value_names = ["OUT_A", "OUT_B"])]
    pub compare: Option<Vec<PathBuf>>,
    /// Also write a self-contained HTML size map into the output folder
    #[arg(long)]
    pub html: bool,
}

/// One row of the report.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Row {
    /// A store path, or `(bonsai)` for the files bonsai composed, or a file path with --files.
    pub name: String,
    pub closure_bytes: u64,
    pub kept_bytes: u64,
    pub image_bytes: u64,
    pub compressed_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub board: String,
    pub profile: String,
    pub init: String,
    pub compression: String,
    pub rows: Vec<Row>,
    pub total: Row,
    /// Store paths of the closure that vanished from the image.
    pub vanished: Vec<String>,
    /// `[image] forbid`: what the build checked the image does not hold.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub forbid: Vec<String>,
    /// `[overrides.<attribute>]` the packages were built with: attribute -> argument ->
    /// {value, profile}.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub overrides: std::collections::BTreeMap<
        String,
        std::collections::BTreeMap<String, crate::config::OverrideArg>,
    >,
}

impl Size {
    pub fn run(self) -> Result<()> {
        let root = project_root();
        if let Some(dirs) = &self.compare {
            return compare(&dirs[0], &dirs[1], self.json);
        }
        let out = crate::out_root().join(&self.board);
        let report = report(&out, self.files)?;
        if self.html {
            let path = crate::sizemap::write(&out, &report)?;
            ui::step(format!(
                "size map: {}",
                path.strip_prefix(&root).unwrap_or(&path).display()
            ));
        }
        if self.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else if self.csv {
            println!("name,closure_bytes,kept_bytes,image_bytes,compressed_bytes");
            for r in report.rows.iter().chain(std::iter::once(&report.total)) {
                println!(
                    "{},{},{},{},{}",
                    r.name, r.closure_bytes, r.kept_bytes, r.image_bytes, r.compressed_bytes
                );
            }
        } else {
            print_table(&report);
        }
        Ok(())
    }
}

/// Reads out/<board>/selection.json (for `why`).
pub fn read_assembly_pub(out: &Path) -> Result<Assembly> {
    read_assembly(out)
}

fn read_assembly(out: &Path) -> Result<Assembly> {
    let text = std::fs::read_to_string(out.join("selection.json")).with_context(|| {
        format!(
            "{} holds no selection.json; build the board first",
            out.display()
        )
    })?;
    serde_json::from_str(&text).context("parsing selection.json")
}

/// Which group a path of the image belongs to: its store path, or bonsai's own files.
fn group_of(path: &str, by_file: bool) -> String {
    let p = path.trim_start_matches("./").trim_start_matches('/');
    if by_file {
        return format!("/{p}");
    }
    if let Some(rest) = p.strip_prefix("nix/store/") {
        let name = rest.split('/').next().unwrap_or(rest);
        return format!("/nix/store/{name}");
    }
    "(bonsai)".into()
}

/// Reads the initramfs back and compresses each group's entries on their own, so compressed
/// bytes per store path add up to about the archive's size.
fn compressed_by_group(
    archive: &Path,
    compression: rootfs::Compression,
    by_file: bool,
) -> Result<BTreeMap<String, u64>> {
    let file =
        std::fs::File::open(archive).with_context(|| format!("opening {}", archive.display()))?;
    let mut reader: Box<dyn Read> = match compression {
        rootfs::Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        rootfs::Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(file)?),
        rootfs::Compression::Xz => Box::new(liblzma::read::XzDecoder::new(file)),
        rootfs::Compression::None => Box::new(file),
    };
    let mut groups: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    loop {
        let entry = cpio::NewcReader::new(reader)
            .with_context(|| format!("reading {}", archive.display()))?;
        if entry.entry().is_trailer() {
            break;
        }
        let name = entry.entry().name().to_string();
        let buf = groups.entry(group_of(&name, by_file)).or_default();
        buf.extend_from_slice(name.as_bytes());
        let mut r = entry;
        r.read_to_end(buf)?;
        reader = r.finish()?;
    }
    let mut sizes = BTreeMap::new();
    for (g, bytes) in groups {
        let mut enc = rootfs::compress_writer(compression, None, Vec::new())?;
        std::io::Write::write_all(&mut enc, &bytes)?;
        sizes.insert(g, enc.finish()?.len() as u64);
    }
    Ok(sizes)
}

pub fn report(out: &Path, by_file: bool) -> Result<Report> {
    let info = read_info(out).with_context(|| {
        format!(
            "{} holds no build.json; build the board first",
            out.display()
        )
    })?;
    let assembly = read_assembly(out)?;
    let sizes: rootfs::SizeReport = serde_json::from_value(assembly.sizes.clone())
        .context("reading sizes from selection.json")?;
    let compression: rootfs::Compression = info
        .initramfs
        .rsplit('.')
        .next()
        .and_then(|ext| match ext {
            "gz" => Some(rootfs::Compression::Gzip),
            "zst" => Some(rootfs::Compression::Zstd),
            "xz" => Some(rootfs::Compression::Xz),
            "cpio" => Some(rootfs::Compression::None),
            _ => None,
        })
        .context("unknown initramfs compression")?;
    let compressed = compressed_by_group(&out.join(&info.initramfs), compression, by_file)?;
    let mut rows: Vec<Row> = Vec::new();
    if by_file {
        for f in &sizes.files {
            rows.push(Row {
                name: f.path.clone(),
                closure_bytes: f.kept_bytes,
                kept_bytes: f.kept_bytes,
                image_bytes: f.image_bytes,
                compressed_bytes: compressed.get(&f.path).copied().unwrap_or(0),
            });
        }
    } else {
        for sp in &sizes.store_paths {
            rows.push(Row {
                name: sp.store_path.clone(),
                closure_bytes: sp.closure_bytes,
                kept_bytes: sp.kept_bytes,
                image_bytes: sp.image_bytes,
                compressed_bytes: compressed.get(&sp.store_path).copied().unwrap_or(0),
            });
        }
        let bonsai = compressed.get("(bonsai)").copied().unwrap_or(0);
        rows.push(Row {
            name: "(bonsai)".into(),
            closure_bytes: 0,
            kept_bytes: 0,
            image_bytes: 0,
            compressed_bytes: bonsai,
        });
    }
    rows.sort_by(|a, b| {
        b.image_bytes
            .cmp(&a.image_bytes)
            .then(b.compressed_bytes.cmp(&a.compressed_bytes))
            .then(a.name.cmp(&b.name))
    });
    let total = Row {
        name: "total".into(),
        closure_bytes: sizes.totals.closure_bytes,
        kept_bytes: sizes.totals.kept_bytes,
        image_bytes: sizes.totals.image_bytes,
        compressed_bytes: info.initramfs_bytes,
    };
    Ok(Report {
        board: info.board,
        profile: info.profile,
        init: info.init,
        compression: compression.name().to_string(),
        rows,
        total,
        vanished: assembly.vanished,
        forbid: info.forbid,
        overrides: info.overrides,
    })
}

fn short(name: &str) -> String {
    match name.strip_prefix("/nix/store/") {
        Some(rest) if rest.len() > 33 => format!("{}…-{}", &rest[..8], &rest[33..]),
        _ => name.to_string(),
    }
}

fn print_table(r: &Report) {
    println!(
        "{} ({}, init {}), {} initramfs; bytes: closure = whole store paths, kept = selected files, image = after stripping",
        r.board, r.profile, r.init, r.compression
    );
    println!(
        "{:<56} {:>12} {:>12} {:>12} {:>12}",
        "store path", "closure", "kept", "image", "compressed"
    );
    for row in r.rows.iter().chain(std::iter::once(&r.total)) {
        println!(
            "{:<56} {:>12} {:>12} {:>12} {:>12}",
            short(&row.name),
            row.closure_bytes,
            row.kept_bytes,
            row.image_bytes,
            row.compressed_bytes
        );
    }
    for v in &r.vanished {
        println!("vanished: {v}");
    }
    for f in &r.forbid {
        println!("forbidden (checked absent): {f}");
    }
    for (attr, args) in &r.overrides {
        for (arg, a) in args {
            println!("override: {attr}.{arg} = {} ({})", a.value, a.profile);
        }
    }
}

fn compare(a: &Path, b: &Path, json: bool) -> Result<()> {
    let ra = report(a, false)?;
    let rb = report(b, false)?;
    // Store paths differ in their hash across versions; match rows by name after the hash.
    let key = |n: &str| {
        n.strip_prefix("/nix/store/")
            .map(|r| r.get(33..).unwrap_or(r).to_string())
            .unwrap_or_else(|| n.to_string())
    };
    let mut names: Vec<String> = ra
        .rows
        .iter()
        .chain(&rb.rows)
        .map(|r| key(&r.name))
        .collect();
    names.sort();
    names.dedup();
    #[derive(Serialize)]
    struct Delta {
        name: String,
        image_a: u64,
        image_b: u64,
        image_delta: i64,
        compressed_a: u64,
        compressed_b: u64,
        compressed_delta: i64,
    }
    let find = |r: &Report, n: &str| r.rows.iter().find(|x| key(&x.name) == n).cloned();
    let mut deltas = Vec::new();
    for n in names.iter().chain(std::iter::once(&"total".to_string())) {
        let (x, y) = if n == "total" {
            (Some(ra.total.clone()), Some(rb.total.clone()))
        } else {
            (find(&ra, n), find(&rb, n))
        };
        let (ia, ca) = x
            .map(|r| (r.image_bytes, r.compressed_bytes))
            .unwrap_or((0, 0));
        let (ib, cb) = y
            .map(|r| (r.image_bytes, r.compressed_bytes))
            .unwrap_or((0, 0));
        if n != "total" && ia == ib && ca == cb {
            continue;
        }
        deltas.push(Delta {
            name: n.clone(),
            image_a: ia,
            image_b: ib,
            image_delta: ib as i64 - ia as i64,
            compressed_a: ca,
            compressed_b: cb,
            compressed_delta: cb as i64 - ca as i64,
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&deltas)?);
        return Ok(());
    }
    if deltas.len() == 1 && deltas[0].image_delta == 0 && deltas[0].compressed_delta == 0 {
        println!("no size difference");
    }
    println!(
        "{:<48} {:>12} {:>12} {:>10} {:>12}",
        "store path", "image a", "image b", "delta", "compr. delta"
    );
    for d in &deltas {
        println!(
            "{:<48} {:>12} {:>12} {:>+10} {:>+12}",
            d.name, d.image_a, d.image_b, d.image_delta, d.compressed_delta
        );
    }
    if ra.board != rb.board {
        bail!("comparing different boards ({} and {})", ra.board, rb.board);
    }
    Ok(())
}
