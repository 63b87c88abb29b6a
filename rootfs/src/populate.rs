//! Populating a [`Tree`] from a [`Selection`]: every kept entry under its store path, with
//! references to dropped store paths rewritten and ELF files stripped; and the size
//! accounting a `size` report needs (closure, kept and stripped bytes per store path and
//! per file).
//!
//! Files that neither stripping nor rewriting changes stay [`Source::Host`] (streamed at pack
//! time); changed ones become [`Source::Bytes`].

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Read;
use std::path::Path;

use serde::Serialize;

use crate::elf::{self, ElfKind};
use crate::error::{Error, Result};
use crate::policy::Policy;
use crate::refs;
use crate::select::{KeptKind, Problem, ProblemKind, Selection};
use crate::strip::{strip_bytes, StripAction, StripOptions};
use crate::tree::{Node, Source, Tree};

/// What [`populate`] did.
#[derive(Clone, Debug, Serialize)]
pub struct PopulateReport {
    pub sizes: SizeReport,
    /// Files left unstripped because they could not be stripped safely.
    pub warnings: Vec<Problem>,
    /// Files whose references were rewritten → the store paths rewritten away (for the
    /// manifest).
    pub rewritten: BTreeMap<String, Vec<String>>,
}

/// Sizes per store path and per kept file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SizeReport {
    pub store_paths: Vec<StorePathSize>,
    pub files: Vec<FileSize>,
    pub totals: SizeTotals,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct StorePathSize {
    pub store_path: String,
    /// Something of it is in the image (else it vanished).
    pub kept: bool,
    pub dropped: bool,
    /// Regular files of the whole store path.
    pub closure_files: u64,
    pub closure_bytes: u64,
    /// Regular files kept, before stripping.
    pub kept_files: u64,
    pub kept_bytes: u64,
    /// Bytes of those files in the image (after rewriting and stripping).
    pub image_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FileSize {
    /// Absolute image path.
    pub path: String,
    pub store_path: String,
    /// Size in the store.
    pub kept_bytes: u64,
    /// Size in the image.
    pub image_bytes: u64,
    /// ELF file type, for ELF files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elf: Option<ElfKind>,
    pub strip: StripAction,
    pub rewritten: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SizeTotals {
    pub closure_files: u64,
    pub closure_bytes: u64,
    pub kept_files: u64,
    pub kept_bytes: u64,
    pub image_bytes: u64,
}

/// Inserts every entry of `selection` into `tree` (owned by its store path), rewriting
/// references to dropped store paths and stripping ELF files as `policy` says.
pub fn populate(tree: &mut Tree, selection: &Selection, policy: &Policy) -> Result<PopulateReport> {
    let strip = policy.strip_enabled().then_some(StripOptions {
        modules: policy.strip_modules(),
    });
    let mut warnings = Vec::new();
    let mut rewritten = BTreeMap::new();
    let mut files = Vec::new();
    let mut per_path: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();

    for (path, kept) in &selection.entries {
        let rel = path.trim_start_matches('/');
        let owner = kept.store_path.as_str();
        match &kept.kind {
            KeptKind::Dir => tree.insert(rel, Node::dir(kept.mode).owned_by(owner))?,
            KeptKind::Symlink { target } => {
                tree.insert(rel, Node::symlink(target.clone()).owned_by(owner))?
            }
            KeptKind::File { size } => {
                let host = selection.host_path(path);
                let dropped = selection.rewrites.get(path);
                let hashes: BTreeSet<String> = dropped
                    .into_iter()
                    .flatten()
                    .filter_map(|sp| refs::hash_of(sp).map(str::to_owned))
                    .collect();
                let prepared = prepare(&host, *size, &hashes, strip.as_ref())?;
                if let StripAction::Failed(reason) = &prepared.action {
                    warnings.push(Problem {
                        file: path.clone(),
                        kind: ProblemKind::StripFailed {
                            reason: reason.clone(),
                        },
                    });
                }
                if prepared.rewritten {
                    rewritten.insert(
                        path.clone(),
                        dropped.into_iter().flatten().cloned().collect(),
                    );
                }
                let Prepared {
                    source,
                    image_bytes,
                    elf: elf_kind,
                    action,
                    rewritten: was_rewritten,
                } = prepared;
                tree.insert(rel, Node::file(source, kept.mode).owned_by(owner))?;
                let acc = per_path.entry(owner).or_default();
                acc.0 += 1;
                acc.1 += size;
                acc.2 += image_bytes;
                files.push(FileSize {
                    path: path.clone(),
                    store_path: owner.to_owned(),
                    kept_bytes: *size,
                    image_bytes,
                    elf: elf_kind,
                    strip: action,
                    rewritten: was_rewritten,
                });
            }
        }
    }

    let mut sizes = SizeReport {
        files,
        ..SizeReport::default()
    };
    for (sp, info) in &selection.store_paths {
        let (kept_files, kept_bytes, image_bytes) =
            per_path.get(sp.as_str()).copied().unwrap_or_default();
        sizes.totals.closure_files += info.closure_files;
        sizes.totals.closure_bytes += info.closure_bytes;
        sizes.totals.kept_files += kept_files;
        sizes.totals.kept_bytes += kept_bytes;
        sizes.totals.image_bytes += image_bytes;
        sizes.store_paths.push(StorePathSize {
            store_path: sp.clone(),
            kept: info.kept,
            dropped: info.dropped,
            closure_files: info.closure_files,
            closure_bytes: info.closure_bytes,
            kept_files,
            kept_bytes,
            image_bytes,
        });
    }
    Ok(PopulateReport {
        sizes,
        warnings,
        rewritten,
    })
}

/// One file as it goes into the image.
struct Prepared {
    source: Source,
    image_bytes: u64,
    elf: Option<ElfKind>,
    action: StripAction,
    rewritten: bool,
}

/// Reads, rewrites and strips one file as needed; untouched files stay host-sourced.
fn prepare(
    host: &Path,
    size: u64,
    hashes: &BTreeSet<String>,
    strip: Option<&StripOptions>,
) -> Result<Prepared> {
    let untouched = |elf, action| Prepared {
        source: Source::Host(host.to_owned()),
        image_bytes: size,
        elf,
        action,
        rewritten: false,
    };
    let wants_strip = strip.is_some() && is_elf_file(host)?;
    if hashes.is_empty() && !wants_strip {
        let action = match strip {
            Some(_) => StripAction::NotElf,
            None => StripAction::Unchanged,
        };
        return Ok(untouched(None, action));
    }
    let mut data = fs::read(host).map_err(|e| Error::io("reading", host, e))?;
    let rewritten = !hashes.is_empty() && refs::rewrite_hashes(&mut data, hashes) > 0;
    let (elf, action, bytes) = match strip.map(|opts| strip_bytes(&data, opts)) {
        Some(o) if o.action == StripAction::Stripped => {
            (o.kind, o.action, Some(o.bytes.into_owned()))
        }
        Some(o) => (o.kind, o.action, None),
        None if elf::is_elf(&data) => (None, StripAction::Unchanged, None),
        None => (None, StripAction::NotElf, None),
    };
    let bytes = match bytes {
        Some(stripped) => stripped,
        None if rewritten => data,
        None => return Ok(untouched(elf, action)),
    };
    Ok(Prepared {
        image_bytes: bytes.len() as u64,
        source: Source::Bytes(bytes),
        elf,
        action,
        rewritten,
    })
}

fn is_elf_file(host: &Path) -> Result<bool> {
    let mut file = File::open(host).map_err(|e| Error::io("reading", host, e))?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match file.read(&mut magic[got..]) {
            Ok(0) => return Ok(false),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("reading", host, e)),
        }
    }
    Ok(elf::is_elf(&magic))
}
