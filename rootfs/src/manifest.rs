//! `manifest.json`: every entry of the image with its type, mode, size, sha256 and owning
//! store path, in archive order.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::host::{HostFile, BUF_SIZE};
use crate::tree::{NodeKind, Source, Tree};

/// Version of the manifest format; bumped when a field changes meaning.
pub const MANIFEST_VERSION: u32 = 1;

/// The whole manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub version: u32,
    /// A development image (the profile says `development = true`): accounts may log in
    /// without a password. Absent (false) otherwise.
    #[serde(default, skip_serializing_if = "is_false")]
    pub development: bool,
    /// The image holds secrets supplied at build time (`[[secrets]]`): its bytes depend on
    /// files outside the repository, so no reproducibility claim covers them. Absent (false)
    /// otherwise.
    #[serde(default, skip_serializing_if = "is_false")]
    pub holds_secrets: bool,
    /// The image paths of those secrets (never their contents or where they came from).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
    pub files: Vec<ManifestEntry>,
    pub totals: Totals,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One image entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestEntry {
    /// Absolute path on the booted system: `/nix/store/…`, `/init`.
    pub path: String,
    #[serde(rename = "type")]
    pub kind: EntryType,
    /// Permission bits as four octal digits: `"0755"`.
    pub mode: String,
    /// Bytes of data in the archive: file contents, or the symlink target's length.
    pub size: u64,
    /// Lowercase hex sha256 of the contents, files only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Symlinks only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Device nodes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub major: Option<u32>,
    /// Device nodes only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub minor: Option<u32>,
    /// The owning store path, or `null` for generated entries and implicit directories.
    pub store_path: Option<String>,
}

/// The `type` field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    File,
    Dir,
    Symlink,
    Char,
    Block,
}

/// Counts over the whole image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Totals {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub devices: u64,
    /// Sum of file sizes.
    pub bytes: u64,
}

impl Manifest {
    /// Pretty JSON with a trailing newline, the form written to `manifest.json`.
    pub fn to_json(&self) -> String {
        // Plain structs with string keys: serde_json cannot fail on them.
        let mut json = serde_json::to_string_pretty(self).expect("manifest serializes to JSON");
        json.push('\n');
        json
    }
}

/// Builds the manifest of `tree`, hashing every file (host files are streamed).
pub fn manifest(tree: &Tree) -> Result<Manifest> {
    let mut buf = vec![0u8; BUF_SIZE];
    let mut totals = Totals::default();
    let mut files = Vec::with_capacity(tree.len());
    for (path, node) in tree {
        let mut entry = ManifestEntry {
            path: path.to_absolute(),
            kind: EntryType::Dir,
            mode: format!("{:04o}", node.mode),
            size: 0,
            sha256: None,
            target: None,
            major: None,
            minor: None,
            store_path: node.owner.clone(),
        };
        match &node.kind {
            NodeKind::File { source } => {
                let (size, digest) = hash(source, &mut buf)?;
                entry.kind = EntryType::File;
                entry.size = size;
                entry.sha256 = Some(digest);
                totals.files += 1;
                totals.bytes += size;
            }
            NodeKind::Dir => totals.dirs += 1,
            NodeKind::Symlink { target } => {
                entry.kind = EntryType::Symlink;
                entry.size = target.len() as u64;
                entry.target = Some(target.clone());
                totals.symlinks += 1;
            }
            NodeKind::CharDev { major, minor } | NodeKind::BlockDev { major, minor } => {
                entry.kind = match node.kind {
                    NodeKind::CharDev { .. } => EntryType::Char,
                    _ => EntryType::Block,
                };
                entry.major = Some(*major);
                entry.minor = Some(*minor);
                totals.devices += 1;
            }
        }
        files.push(entry);
    }
    Ok(Manifest {
        version: MANIFEST_VERSION,
        development: false,
        holds_secrets: false,
        secrets: Vec::new(),
        files,
        totals,
    })
}

fn hash(source: &Source, buf: &mut [u8]) -> Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let size = match source {
        Source::Bytes(data) => {
            hasher.update(data);
            data.len() as u64
        }
        Source::Host(path) => {
            let file = HostFile::open(path)?;
            let size = file.size();
            file.stream(buf, |chunk| {
                hasher.update(chunk);
                Ok(())
            })?;
            size
        }
    };
    Ok((size, crate::hex(&hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tree::Node;

    #[test]
    fn manifest_lists_everything_in_archive_order() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("hello");
        std::fs::write(&host, b"abc").unwrap();

        let mut tree = Tree::new();
        let owner = "/nix/store/abc-hello";
        tree.insert(
            "nix/store/abc-hello/bin/hello",
            Node::file(Source::Host(host), 0o555).owned_by(owner),
        )
        .unwrap();
        tree.insert("init", Node::symlink("/nix/store/abc-hello/bin/hello"))
            .unwrap();
        tree.insert("dev/null", Node::char_dev(1, 3, 0o666))
            .unwrap();
        tree.insert("etc/hostname", Node::file(Source::Bytes(Vec::new()), 0o644))
            .unwrap();

        let m = manifest(&tree).unwrap();
        let paths: Vec<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/dev",
                "/dev/null",
                "/etc",
                "/etc/hostname",
                "/init",
                "/nix",
                "/nix/store",
                "/nix/store/abc-hello",
                "/nix/store/abc-hello/bin",
                "/nix/store/abc-hello/bin/hello",
            ]
        );
        assert_eq!(
            m.totals,
            Totals {
                files: 2,
                dirs: 6,
                symlinks: 1,
                devices: 1,
                bytes: 3
            }
        );

        let json: serde_json::Value = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(
            json["files"][9],
            serde_json::json!({
                "path": "/nix/store/abc-hello/bin/hello",
                "type": "file",
                "mode": "0555",
                "size": 3,
                "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
                "store_path": "/nix/store/abc-hello",
            })
        );
        assert_eq!(
            json["files"][4],
            serde_json::json!({
                "path": "/init",
                "type": "symlink",
                "mode": "0777",
                "size": 30,
                "target": "/nix/store/abc-hello/bin/hello",
                "store_path": null,
            })
        );
        assert_eq!(
            json["files"][1],
            serde_json::json!({
                "path": "/dev/null",
                "type": "char",
                "mode": "0666",
                "size": 0,
                "major": 1,
                "minor": 3,
                "store_path": null,
            })
        );
        assert_eq!(
            json["files"][3]["sha256"],
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            json["totals"],
            serde_json::json!({"files": 2, "dirs": 6, "symlinks": 1, "devices": 1, "bytes": 3})
        );
        let back: Manifest = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn missing_host_file_is_an_error_naming_it() {
        let mut tree = Tree::new();
        let gone = std::path::PathBuf::from("/nonexistent/bonsai-test/sh");
        tree.insert("bin/sh", Node::file(Source::Host(gone), 0o755))
            .unwrap();
        let err = manifest(&tree).unwrap_err().to_string();
        assert_eq!(
            err,
            "reading /nonexistent/bonsai-test/sh: No such file or directory"
        );
    }
}
